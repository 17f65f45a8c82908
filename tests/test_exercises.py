"""Each workshop check passes the correct solution and fails, with a message that names the
mistake, on the typical wrong answers; the checks print nothing."""

from __future__ import annotations

import math

import pytest
import torch

from fdlib.core.spans import Span
from fdlib.views import exercises as X

# --- (a) contextual score ----------------------------------------------------------------------


def score_ok(pattern, span, response_start):
    return pattern[:, response_start:, span.start : span.end].sum(-1).mean(-1)


def test_reference_contextual_score_by_hand():
    pattern = torch.zeros(1, 4, 4)
    pattern[0] = torch.tensor([[1, 0, 0, 0], [0.5, 0.5, 0, 0], [0.2, 0.3, 0.5, 0], [0.1, 0.2, 0.3, 0.4]])
    # rows 2 and 3, columns 1..2: (0.3 + 0.5 + 0.2 + 0.3) / 2
    assert float(X.reference_contextual_score(pattern, Span(1, 3), 2)[0]) == pytest.approx(0.65)


@pytest.mark.parametrize(
    "wrong,message",
    [
        (lambda p, s, r: p[:, :, s.start : s.end].sum(-1).mean(-1), "all rows instead of the response rows"),
        (lambda p, s, r: p[:, r:, s.start : s.end + 1].sum(-1).mean(-1), "off-by-one at the span's end"),
        (lambda p, s, r: p[:, r:, s.start : s.end].sum(-1).sum(-1), "summed over the response rows"),
        (lambda p, s, r: p[:, r - 1 :, s.start : s.end].sum(-1).mean(-1), "rows start one too early"),
        (lambda p, s, r: p[:, r:, s.start : s.end].sum(-1).mean(-1)[:-1], r"shape \(\d,\), expected \(\d,\)"),
        (lambda p, s, r: p[:, r:, s.start : s.end].sum(-1).mean(-1) * 1.01, r"head \d got .* expected .*\(off by"),
    ],
)
def test_contextual_score_check_catches(wrong, message):
    with pytest.raises(AssertionError, match=message):
        X.check_contextual_score(wrong)


def test_contextual_score_check_passes_and_prints_nothing(capsys):
    assert "pass" in X.check_contextual_score(score_ok)
    assert "pass" in X.check_contextual_score(lambda p, s, r: score_ok(p, s, r).numpy().tolist())  # any array-like
    assert capsys.readouterr() == ("", "")


# --- (b) top-k heads ---------------------------------------------------------------------------


def top_ok(scores, k):
    flat = scores.flatten().argsort(descending=True)[:k]
    return [(int(i) // scores.shape[1], int(i) % scores.shape[1]) for i in flat]


def test_top_k_heads_check():
    assert "pass" in X.check_top_k_heads(top_ok)
    with pytest.raises(AssertionError, match=r"returns \(head, layer\)"):
        X.check_top_k_heads(lambda s, k: [(h, l) for l, h in top_ok(s, k)])
    with pytest.raises(AssertionError, match="LOWEST"):
        X.check_top_k_heads(lambda s, k: top_ok(-s, k))
    with pytest.raises(AssertionError, match="wrong order"):
        X.check_top_k_heads(lambda s, k: top_ok(s, k)[::-1])
    with pytest.raises(AssertionError, match=r"n_heads = scores.shape\[1\]"):
        X.check_top_k_heads(lambda s, k: [divmod(int(i), s.shape[0]) for i in s.flatten().argsort(descending=True)[:k]])
    with pytest.raises(AssertionError, match=r"returned 2 heads for k=1"):
        X.check_top_k_heads(lambda s, k: top_ok(s, k + 1))
    with pytest.raises(AssertionError, match=r"missing L\d+H\d+ \(score 0\.\d+\).*should not contain"):
        X.check_top_k_heads(lambda s, k: top_ok(s, k + 1)[1:])  # drops the best one
    with pytest.raises(AssertionError, match="list of \\(layer, head\\) pairs"):
        X.check_top_k_heads(lambda s, k: "L0H0")


# --- (c) split-softmax on a row ------------------------------------------------------------------


def split_ok(row, span, tau):
    pi = row[span.start : span.end].sum()
    out = row * (1 - pi**tau) / (1 - pi)
    out[span.start : span.end] = row[span.start : span.end] * pi**tau / pi
    return out


def test_reference_split_softmax_row_by_hand():
    row = torch.tensor([0.5, 0.25, 0.25])
    got = X.reference_split_softmax_row(row, Span(1, 3), 0.5)  # pi = 0.5 -> sqrt(0.5)
    assert float(got[1:].sum()) == pytest.approx(math.sqrt(0.5))
    assert float(got[1]) == pytest.approx(float(got[2])) and float(got.sum()) == pytest.approx(1.0)


def test_split_softmax_row_check():
    assert "pass" in X.check_split_softmax_row(split_ok)

    def forgot_outside(row, span, tau):
        pi = row[span.start : span.end].sum()
        out = row.clone()
        out[span.start : span.end] *= pi**tau / pi
        return out

    with pytest.raises(AssertionError, match=r"sums to .* not 1; you scaled the span but not the rest"):
        X.check_split_softmax_row(forgot_outside)
    with pytest.raises(AssertionError, match="off-by-one at the span's end"):
        X.check_split_softmax_row(lambda r, s, t: split_ok(r, Span(s.start, s.end + 1), t))
    with pytest.raises(AssertionError, match="power tau"):
        X.check_split_softmax_row(lambda r, s, t: r**t / (r**t).sum())

    def uneven(row, span, tau):  # right masses, but the span's mass all on its first token
        out = split_ok(row, span, tau)
        mass = out[span.start : span.end].sum()
        out[span.start : span.end] = 0
        out[span.start] = mass
        return out

    with pytest.raises(AssertionError, match=r"position \d+ \(inside the span\).*one common factor"):
        X.check_split_softmax_row(uneven)
    with pytest.raises(AssertionError, match=r"shape \(\d+, 1\)"):
        X.check_split_softmax_row(lambda r, s, t: split_ok(r, s, t)[:, None])


# --- (d) d_K ------------------------------------------------------------------------------------


def shift_ok(q, k, d_k):
    return (q @ d_k / math.sqrt(q.shape[-1]))[:, None].expand(q.shape[0], k.shape[0])


def shift_pre_ok(q, k, d_k, q_positions):
    rk = X.rotate(d_k.expand(k.shape[0], -1), torch.arange(k.shape[0]))  # R_j d_K for every key j
    return X.rotate(q, q_positions) @ rk.T / math.sqrt(q.shape[-1])


def test_rotate_is_a_rotation_matching_relative_positions():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 8, generator=g, dtype=torch.float64)
    p = torch.tensor([3])
    assert float(X.rotate(x[None], p).norm()) == pytest.approx(float(x.norm()))
    # q_i . k_j after RoPE depends only on i - j
    a = X.rotate(x[None], torch.tensor([5])) @ X.rotate(y[None], torch.tensor([2])).T
    b = X.rotate(x[None], torch.tensor([13])) @ X.rotate(y[None], torch.tensor([10])).T
    assert float(a) == pytest.approx(float(b))


def test_dk_logit_shift_check():
    message = X.check_dk_logit_shift(shift_ok)
    assert "pass" in message and "cannot move attention" in message
    with pytest.raises(AssertionError, match="1/sqrt"):
        X.check_dk_logit_shift(lambda q, k, d: shift_ok(q, k, d) * math.sqrt(q.shape[-1]))
    with pytest.raises(AssertionError, match="new logits"):
        X.check_dk_logit_shift(lambda q, k, d: q @ (k + d).T / math.sqrt(q.shape[-1]))
    with pytest.raises(AssertionError, match="broadcast it over the keys"):
        X.check_dk_logit_shift(lambda q, k, d: q @ d / math.sqrt(q.shape[-1]))
    with pytest.raises(AssertionError, match=r"logit \(\d+, \d+\) shifts by"):
        X.check_dk_logit_shift(lambda q, k, d: k @ d / math.sqrt(q.shape[-1]) + 0 * shift_ok(q, k, d))


def test_dk_logit_shift_pre_rope_check():
    assert "pass" in X.check_dk_logit_shift_pre_rope(shift_pre_ok)
    # the learner's pre-RoPE shift really varies along the keys (the point of the exercise)
    q, k, d = torch.randn(2, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    assert float(shift_pre_ok(q, k, d, torch.tensor([4, 5])).std(-1).min()) > 1e-3
    with pytest.raises(AssertionError, match="did not rotate d_K"):
        X.check_dk_logit_shift_pre_rope(lambda q, k, d, p: shift_ok(X.rotate(q, p), k, d))
    with pytest.raises(AssertionError, match="query's position"):
        X.check_dk_logit_shift_pre_rope(
            lambda q, k, d, p: ((X.rotate(q, p) * X.rotate(d.expand(q.shape[0], -1), p)).sum(-1, keepdim=True)
                                / math.sqrt(q.shape[-1])).expand(q.shape[0], k.shape[0])
        )
    with pytest.raises(AssertionError, match="unrotated"):
        X.check_dk_logit_shift_pre_rope(
            lambda q, k, d, p: q @ X.rotate(d.expand(k.shape[0], -1), torch.arange(k.shape[0])).T / math.sqrt(q.shape[-1])
        )
