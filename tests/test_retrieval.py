"""Retrieval heads (fdlib.experiments.retrieval): the per-step copy-paste rule by hand, the ROUGE filter, and
the decode alignment on the tiny model with one head's attention and the answer forced."""

from __future__ import annotations

import math

import pytest
import torch

import fdlib
from fdlib.data.tasks import TaskSample
from fdlib.experiments import retrieval
from fdlib.model.decoding import hooks


def test_rouge1_recall():
    assert retrieval.rouge1_recall("1234567", "The number is 1,234,567.") == 1.0  # punctuation dropped
    assert retrieval.rouge1_recall("red green blue yellow", "Green, purple") == 0.25
    assert retrieval.rouge1_recall("go go stop", "go") == pytest.approx(1 / 3)  # multiplicity counts
    assert retrieval.rouge1_recall("go go stop", "go go go") == pytest.approx(2 / 3)
    assert retrieval.rouge1_recall("1234567", "") == 0.0
    with pytest.raises(ValueError, match="no word"):
        retrieval.rouge1_recall("the ...", "x")


def test_recovers_needle_threshold():
    assert retrieval.recovers_needle("It is 7654321", ["7654321"])
    assert not retrieval.recovers_needle("one", ["one two"])  # 0.5 is not above 0.5
    assert retrieval.recovers_needle("one two", ["three four", "one two three"])  # best answer: 2/3
    with pytest.raises(ValueError, match="non-empty"):
        retrieval.recovers_needle("x", [])


def test_attended_positions_takes_the_row_argmax():
    rows = torch.tensor([[[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], [[0.0, 0.0, 1.0], [0.4, 0.4, 0.2]]])
    assert retrieval.attended_positions(rows).tolist() == [[1, 0], [2, 0]]  # a tie: the first


def test_copy_paste_scores_by_hand():
    ids = [10, 11, 12, 13, 14, 15, 16, 17]
    span = fdlib.Span(3, 6)  # tokens 13 14 15
    generated = [13, 14, 15]
    # [step, layer, head]: one layer, five heads
    attended = torch.tensor([
        [[3, 4, 0, 3, 2]],
        [[4, 5, 4, 3, 2]],
        [[5, 6, 9, 5, 2]],
    ])
    scores = retrieval.copy_paste_scores(attended, generated, ids, span)
    assert scores.shape == (1, 5)
    expected = [
        1.0,  # copies every needle token from its position
        0.0,  # one position late: in the span but another token (then outside the span)
        1 / 3,  # step 1 only; position 9 is an answer token, never in the span
        2 / 3,  # steps 0 and 2 (step 1 attends to 13 while 14 is generated)
        0.0,  # attends to 12 (outside the span) at every step
    ]
    torch.testing.assert_close(scores[0], torch.tensor(expected))
    # The same token outside the span does not count.
    ids2 = [13, 11, 12, 13, 14, 15, 16, 17]
    assert retrieval.copy_paste_scores(torch.tensor([[[0]]]), [13], ids2, span).item() == 0.0
    with pytest.raises(ValueError, match="one step per generated token"):
        retrieval.copy_paste_scores(attended, [13, 14], ids, span)
    with pytest.raises(ValueError, match="sequence length 8"):
        retrieval.copy_paste_scores(attended, generated, ids, fdlib.Span(6, 9))


NEEDLE = fdlib.Span(8, 12)
COPY_LAYER = 1


def _needle_sample(tok, seed: int) -> TaskSample:
    g = torch.Generator().manual_seed(seed)
    ids = 5 + torch.randperm(59, generator=g)[:20]  # distinct ids, none is EOS (2) or newline (4)
    answer = tok.decode(ids[NEEDLE.slice].tolist())
    return TaskSample(
        id=f"needle{seed}", task="niah", text="", input_ids=ids, relevant_span=NEEDLE, answers=(answer,),
        question="q", depth=0.5,
    )


def _forcing_hooks(targets: list[list[int]]):
    """The c-th forward of the current sample emits targets[sample][c] (then EOS), and in layer
    COPY_LAYER head 0 attends to the needle position of the token it emits, head 1 to position 0.

    Steps are counted by the logits hook (the last hook of a forward), so the pattern hook of
    forward c sees c."""
    state = {"sample": 0, "step": 0}

    def pattern_hook(pattern, hook):
        c = state["step"]
        out = pattern.clone()
        n_keys = out.shape[-1]
        copy_pos = NEEDLE.start + c if c < len(NEEDLE) else 0
        out[0, 0, -1] = torch.nn.functional.one_hot(torch.tensor(copy_pos), n_keys).to(out.dtype)
        out[0, 1, -1] = torch.nn.functional.one_hot(torch.tensor(0), n_keys).to(out.dtype)
        return out

    def logits_hook(logits, hook):
        tokens = targets[state["sample"]]
        c = state["step"]
        token = tokens[c] if c < len(tokens) else 2  # EOS after the forced answer
        out = torch.full_like(logits, -1e4)
        out[0, -1, token] = 1e4
        state["step"] += 1
        if token == 2:
            state["sample"], state["step"] = state["sample"] + 1, 0
        return out

    return [(f"blocks.{COPY_LAYER}.attn.hook_pattern", pattern_hook), ("unembed.hook_out", logits_hook)]


def test_forced_copy_head_scores_one_and_a_sink_head_zero(tiny):
    good, bad = _needle_sample(tiny.tokenizer, 0), _needle_sample(tiny.tokenizer, 1)
    copied = good.input_ids[NEEDLE.slice].tolist()
    wrong = bad.input_ids[:4].tolist()  # not the needle: the answer fails the ROUGE filter
    with hooks(tiny.model, _forcing_hooks([copied, wrong])):
        result = retrieval.retrieval_heads(tiny.model, [good, bad], max_new_tokens=8, progress=False)
    first, second = result.samples
    assert first.answer == good.answers[0] and first.recall == 1.0 and first.used
    assert not second.used and second.recall == 0.0
    assert result.n_used == 1
    assert first.scores[COPY_LAYER, 0].item() == pytest.approx(1.0)  # 4 copies x 1/4
    assert first.scores[COPY_LAYER, 1].item() == 0.0
    assert second.scores[COPY_LAYER, 0].item() == 0.0  # attends to the needle, emits other tokens
    torch.testing.assert_close(result.scores, first.scores)  # the mean over used samples only
    assert result.scores.shape == (tiny.model.cfg.n_layers, tiny.model.cfg.n_heads)


def test_rows_after_the_last_answer_token_are_not_scored(tiny):
    """max_new_tokens = |needle|: decode runs one more row after the last answer token."""
    good = _needle_sample(tiny.tokenizer, 0)
    copied = good.input_ids[NEEDLE.slice].tolist()
    with hooks(tiny.model, _forcing_hooks([copied])):
        scores = retrieval.retrieval_scores(tiny.model, [good], max_new_tokens=len(NEEDLE), progress=False)
    assert scores[COPY_LAYER, 0].item() == pytest.approx(1.0)
    assert scores[COPY_LAYER, 1].item() == 0.0


def test_no_recovered_needle_gives_nan(tiny):
    bad = _needle_sample(tiny.tokenizer, 1)
    with hooks(tiny.model, _forcing_hooks([bad.input_ids[:3].tolist()])):
        result = retrieval.retrieval_heads(tiny.model, [bad], max_new_tokens=8, progress=False)
    assert result.n_used == 0 and torch.isnan(result.scores).all()
    with pytest.raises(ValueError, match="no samples"):
        retrieval.retrieval_heads(tiny.model, [])


def test_top_retrieval_heads():
    scores = torch.tensor([[0.0, 0.5], [1.0, float("nan")]])
    assert retrieval.top_retrieval_heads(scores, 2) == [(1, 0), (0, 1)]
    assert not math.isnan(scores[1, 0])
