"""Every architecture x every sequential operation, against the eager reference
(`eager_reference`: plain Hugging Face, attention recomputed by hand in float64).

Architectures (`arch_models`): Llama (GQA), Qwen2 (q/k/v biases), Qwen3 and OLMo2 (q/k norms),
Mistral without and with a sliding window (8), Gemma 2 (softcap, window, query_pre_attn_scalar),
Gemma 3 (sliding + global layers with their own rotary bases, q/k norms), Phi-3 (fused QKV),
GPT-2 (learned positions). Prompts are longer than the window and some spans lie entirely
outside it. Every cell matches the reference (1e-5 on scores, 1e-4 on logits) or is refused
before any forward.
"""

from __future__ import annotations

import eager_reference as ref
import pytest
import torch
from arch_models import ARCH_FACTS, ARCHS, WINDOW, build_arch, cached_arch

import fdlib
from fdlib.experiments.retrieval import ArgmaxRecorder
from fdlib.interventions.directions import FocusDirections, focus_directions
from fdlib.interventions.hooks import ablate_heads, split_softmax
from fdlib.interventions.training import (
    collect_activations,
    contrast_score,
    span_score,
    span_score_settings,
    train_focus_directions,
)
from fdlib.model import arch
from fdlib.model.decoding import prefill

# Tiny matrices: one thread is ~1000x faster than several spinning on shared cores.
torch.set_num_threads(1)

LOGITS, SCORES = 1e-4, 1e-5
FAR, NEAR = fdlib.Span(1, 6), fdlib.Span(14, 21)  # FAR lies outside the window of rows >= 14


@pytest.fixture(params=ARCHS)
def tiny(request):
    return cached_arch(request.param)


def ids_of(n: int, seed: int) -> torch.Tensor:
    return torch.randint(5, 64, (n,), generator=torch.Generator().manual_seed(seed))


def heads_of(model) -> list[tuple[int, int]]:
    L = model.cfg.n_layers
    return list(dict.fromkeys([(0, 1), (1, 2), (L - 1, 3)]))


def random_dirs(tiny, placement: str, seed: int = 0, scale: float = 1.0) -> FocusDirections:
    g = torch.Generator().manual_seed(seed)
    cfg = tiny.model.cfg
    shape = (cfg.n_layers, cfg.n_heads, cfg.d_head)
    return FocusDirections(torch.randn(shape, generator=g) * scale, torch.randn(shape, generator=g) * scale,
                           fdlib.model.loading.model_name(tiny.model), placement=placement)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None], return_type="logits")[0]


def cached_step(model, ids, fast: bool = True) -> torch.Tensor:
    """The last row's logits from a prefill of ids[:-1] and one bridge step."""
    prefix = prefill(model, ids, fast=fast)
    with torch.no_grad():
        return model(ids[None, -1:], past_key_values=prefix.cache, return_type="logits")[0, -1]


def close(got, want, atol):
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=0)


# --- the reference itself ----------------------------------------------------------------------


def test_reference_is_the_model_and_windows_bite(tiny):
    ids = ids_of(24, 1)
    with torch.no_grad():
        hf = tiny.hf(ids[None]).logits[0]
    r = ref.run(tiny.hf, ids)
    close(r.logits, hf, LOGITS)
    close(logits(tiny.model, ids), r.logits, LOGITS)
    facts = ARCH_FACTS[type_name(tiny)]
    for l, p in r.patterns.items():
        close(p.sum(-1), torch.ones_like(p.sum(-1)), 1e-9)
        if l in facts.sliding_layers:  # a row gives nothing to keys at or beyond the window
            assert float(p[:, 20, : 20 - WINDOW + 1].abs().max()) == 0.0
            assert float(p[:, 20, 20 - WINDOW + 1 :].sum(-1).min()) > 0.999


def type_name(tiny) -> str:
    return next(n for n in ARCHS if cached_arch(n) is tiny)


# --- scores, decode ------------------------------------------------------------------------------


def test_contextual_scores(tiny):
    ids, start = ids_of(30, 2), 14
    spans = {"far": FAR, "near": NEAR, "all": fdlib.Span(0, 30)}
    got = fdlib.contextual_scores(tiny.model, ids, start, spans)
    r = ref.run(tiny.hf, ids)
    for name, span in spans.items():
        close(got[name], r.span_scores((span.start, span.end), start), SCORES)


@pytest.mark.parametrize("fast", [True, False])
def test_cached_step_equals_full_forward(tiny, fast):
    ids = ids_of(21, 3)
    close(cached_step(tiny.model, ids, fast), ref.run(tiny.hf, ids).logits[-1], LOGITS)


def test_decode_matches_uncached_greedy_with_scores(tiny):
    prompt = ids_of(22, 4)
    stop = fdlib.model.loading.stop_tokens(tiny.tokenizer)
    want = []
    for t in ref.greedy(tiny.hf, prompt, 12):  # cut where decode stops: EOS, or a newline after some text
        if t in stop.eos or (t in stop.newline and tiny.tokenizer.decode(want).strip()):
            break
        want.append(t)
    prefix = prefill(tiny.model, prompt)
    spans = {"far": FAR, "near": NEAR}
    a = fdlib.decode(tiny.model, prefix, max_new_tokens=12, spans=spans)
    assert a.tokens == want
    assert prefix.cache.get_seq_length() == len(prompt) - 1  # restored, reusable
    assert fdlib.decode(tiny.model, prefix, max_new_tokens=12).tokens == want
    if want:
        full = torch.cat([prompt, torch.tensor(want)])
        r = ref.run(tiny.hf, full)
        for name, span in spans.items():
            close(a.scores[name], r.span_scores((span.start, span.end), len(prompt)), SCORES)


# --- interventions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("span", [FAR, NEAR], ids=["far", "near"])
@pytest.mark.parametrize("tau", [0.0, 0.3, 2.0])
def test_split_softmax(tiny, span, tau):
    ids = ids_of(24, 5)
    heads = heads_of(tiny.model)
    want = ref.run(tiny.hf, ids, split=ref.Split(heads, (span.start, span.end), tau, 23)).logits[-1]
    with split_softmax(tiny.model, heads, span, tau, from_pos=23):
        step = cached_step(tiny.model, ids)
    close(step, want, LOGITS)
    full_want = ref.run(tiny.hf, ids, split=ref.Split(heads, (span.start, span.end), tau, 16)).logits
    with split_softmax(tiny.model, heads, span, tau, from_pos=16):
        close(logits(tiny.model, ids), full_want, LOGITS)


def test_ablate_heads(tiny):
    ids = ids_of(22, 6)
    heads = heads_of(tiny.model)
    with ablate_heads(tiny.model, heads, from_pos=0):
        close(logits(tiny.model, ids), ref.run(tiny.hf, ids, ablate=ref.Ablate(heads, 0)).logits, LOGITS)
    with ablate_heads(tiny.model, heads, from_pos=21):
        step = cached_step(tiny.model, ids)
    close(step, ref.run(tiny.hf, ids, ablate=ref.Ablate(heads, 21)).logits[-1], LOGITS)


@pytest.mark.parametrize("placement", ["post_rope", "pre_rope"])
def test_focus_directions(tiny, placement):
    ids = ids_of(22, 7)
    heads = heads_of(tiny.model)
    dirs = random_dirs(tiny, placement)
    focus = lambda from_pos: ref.Focus(dirs.d_q, dirs.d_k, heads, 0.7, placement, from_pos)  # noqa: E731
    plain = logits(tiny.model, ids)
    with focus_directions(tiny.model, dirs, heads, 0.7, from_pos=0):
        got = logits(tiny.model, ids)
    close(got, ref.run(tiny.hf, ids, focus=focus(0)).logits, LOGITS)
    assert (got - plain).abs().max() > 1e-3
    with focus_directions(tiny.model, dirs, heads, 0.7, from_pos=21):
        step = cached_step(tiny.model, ids)
    close(step, ref.run(tiny.hf, ids, focus=focus(21)).logits[-1], LOGITS)
    # the softcap is back in place and the hooks are gone
    close(logits(tiny.model, ids), plain, 0.0)


def test_post_rope_d_k_is_a_no_op_except_under_a_softcap(tiny):
    ids = ids_of(20, 8)
    heads = heads_of(tiny.model)
    d = random_dirs(tiny, "post_rope", scale=2.0)
    only_k = FocusDirections(torch.zeros_like(d.d_q), d.d_k, d.model_name, "post_rope")
    plain = logits(tiny.model, ids)
    with focus_directions(tiny.model, only_k, heads, 1.0):
        got = logits(tiny.model, ids)
    close(got, ref.run(tiny.hf, ids, focus=ref.Focus(only_k.d_q, only_k.d_k, heads, 1.0)).logits, LOGITS)
    if ARCH_FACTS[type_name(tiny)].softcap:
        assert (got - plain).abs().max() > 1e-3  # tanh is not shift-invariant: d_K matters
    else:
        close(got, plain, 1e-5)


# --- training ---------------------------------------------------------------------------------------


def steered_case(tiny, placement: str, ids, seed: int):
    """Random directions on every head, their per-head rows for `span_score`, its settings, and
    the reference run with the directions on each layer's heads (one layer at a time: a head's own
    pattern does not depend on edits in its layer or later)."""
    heads = heads_of(tiny.model)
    dirs = random_dirs(tiny, placement, seed=seed, scale=0.7)
    dq = torch.stack([dirs.d_q[l, h] for l, h in heads])
    dk = torch.stack([dirs.d_k[l, h] for l, h in heads])
    steered = {l: ref.run(tiny.hf, ids, focus=ref.Focus(dirs.d_q, dirs.d_k, [(m, h) for m, h in heads if m == l], 1.0, placement, 0))
               for l in {l for l, _ in heads}}
    return heads, dq, dk, span_score_settings(tiny.model, heads, placement, len(ids)), steered


@pytest.mark.parametrize("placement", ["post_rope", "pre_rope"])
def test_span_score_is_the_model_attention(tiny, placement):
    """span_score on collected activations, with directions, equals the reference's S_C with the
    same directions added to each head."""
    ids, start = ids_of(28, 9), 16
    heads, dq, dk, settings, steered_ref = steered_case(tiny, placement, ids, seed=3)
    plain_ref = ref.run(tiny.hf, ids)
    for span in (FAR, NEAR):  # FAR: outside the window of every response row
        acts = collect_activations(tiny.model, ids, start, span, heads, placement)
        got = span_score(acts, dq, dk, **settings)
        plain = span_score(acts, torch.zeros_like(dq), torch.zeros_like(dk), **settings)
        s = (span.start, span.end)
        close(got, torch.stack([steered_ref[l].span_scores(s, start)[l, h] for l, h in heads]), SCORES)
        close(plain, torch.stack([plain_ref.span_scores(s, start)[l, h] for l, h in heads]), SCORES)
    assert (got - plain).abs().max() > 1e-3  # NEAR: the directions move the score


@pytest.mark.parametrize("placement", ["post_rope", "pre_rope"])
def test_contrast_score_is_relevant_minus_the_top_irrelevant_document(tiny, placement):
    """contrast_score equals the reference's S_C minus the largest S of the other spans, with the
    same directions added; activations without other spans are refused."""
    ids, start = ids_of(28, 11), 16
    heads, dq, dk, settings, steered = steered_case(tiny, placement, ids, seed=5)
    others = [FAR, fdlib.Span(7, 12)]
    acts = collect_activations(tiny.model, ids, start, NEAR, heads, placement, others=others)
    want = torch.stack([
        steered[l].span_scores((NEAR.start, NEAR.end), start)[l, h]
        - max(steered[l].span_scores((o.start, o.end), start)[l, h] for o in others)
        for l, h in heads])
    close(contrast_score(acts, dq, dk, **settings), want, SCORES)
    bare = collect_activations(tiny.model, ids, start, NEAR, heads, placement)
    with pytest.raises(ValueError, match="irrelevant documents' spans"):
        contrast_score(bare, dq, dk, **settings)
    with pytest.raises(ValueError, match="lies past the sequence"):
        collect_activations(tiny.model, ids, start, NEAR, heads, placement, others=[fdlib.Span(20, 40)])


def test_training_runs_and_raises_the_score(tiny):
    heads = heads_of(tiny.model)
    acts = [collect_activations(tiny.model, ids_of(26, 20 + i), 18, NEAR, heads, "pre_rope") for i in range(2)]
    out = train_focus_directions(tiny.model, acts, heads, placement="pre_rope", lr=0.3, epochs=3, progress=False)
    assert (out.score_after > out.score_before).all()


# --- retrieval ----------------------------------------------------------------------------------------


def test_retrieval_argmax_positions_are_absolute(tiny):
    prompt = ids_of(20, 10)
    rec = ArgmaxRecorder(tiny.model.cfg.n_layers)
    a = fdlib.decode(tiny.model, prefill(tiny.model, prompt), max_new_tokens=6, extra_hooks=rec.fwd_hooks())
    n = len(a.tokens)
    if n == 0:
        pytest.skip("the tiny model answered nothing")
    r = ref.run(tiny.hf, torch.cat([prompt, torch.tensor(a.tokens)]))
    rows = torch.arange(len(prompt) - 1, len(prompt) - 1 + n)
    want = torch.stack([r.patterns[l][:, rows, :].argmax(-1).T for l in sorted(r.patterns)], dim=1)  # [step, L, H]
    assert torch.equal(rec.attended(n), want)


# --- refusals -------------------------------------------------------------------------------------------


def forwards_counted(model):
    calls = []
    handle = model.original_model.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls, handle


def test_refusals_come_before_any_forward():
    """RoPE whose angles depend on the forward's length (dynamic NTK) cannot be rotated to other
    positions exactly: pre-RoPE directions and their training are refused, naming the model and
    the feature; post-RoPE directions (no rotation needed) work."""
    tiny = build_arch("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    heads = [(0, 1)]
    calls, handle = forwards_counted(tiny.model)
    try:
        with pytest.raises(NotImplementedError, match=r"focus_pre_rope is not supported: .*dynamic"):
            with focus_directions(tiny.model, random_dirs(tiny, "pre_rope"), heads, 1.0):
                pass
        with pytest.raises(NotImplementedError, match=r"model '.*'.*dynamic"):
            collect_activations(tiny.model, ids_of(12, 0), 8, fdlib.Span(1, 4), heads, "pre_rope")
        assert not calls
    finally:
        handle.remove()
    with focus_directions(tiny.model, random_dirs(tiny, "post_rope"), heads, 1.0):
        pass
    with pytest.raises(ValueError, match="unknown operation"):
        arch.check_supported(tiny.model, "fly")


def test_nested_directions_on_a_softcapped_layer_are_refused():
    tiny = cached_arch("gemma2")
    dirs = random_dirs(tiny, "post_rope")
    with focus_directions(tiny.model, dirs, [(0, 1)], 1.0):
        with pytest.raises(ValueError, match="softcap is already handled"):
            with focus_directions(tiny.model, dirs, [(0, 2)], 1.0):
                pass
        with focus_directions(tiny.model, dirs, [(1, 2)], 1.0):  # another layer is fine
            pass
    assert all(tiny.model.blocks[l].attn.original_component.attn_logit_softcapping == 1.5 for l in range(3))


def test_model_facts():
    f = arch.model_facts(cached_arch("gemma2").model)
    assert [l.window for l in f.layers] == [WINDOW, None, WINDOW]
    assert all(l.softcap == 1.5 and l.scaling == 16**-0.5 for l in f.layers)
    assert arch.model_facts(cached_arch("phi3").model).query_kind == arch.BEFORE_ROTATION
    g = arch.model_facts(cached_arch("gpt2").model)
    assert g.query_kind == arch.NO_ROTATION and not g.rope
    assert arch.model_facts(cached_arch("qwen3").model).qk_norm
