"""Self-checking workshop exercises (notebook 00), in the style of ARENA's `tests.py`.

Each `check_*` takes the learner's function, runs it against a reference implementation written
here (independently of the rest of fdlib) on small random inputs, and either returns a one-line
success message or raises `AssertionError` saying what is wrong: the shape, which head or
position, by how much, and, when the answer matches a typical mistake, which one. Nothing is
printed here; the notebook prints the returned message.

| exercise | learner writes | check |
| --- | --- | --- |
| (a) contextual score | `contextual_score(pattern, span, response_start) -> [n_heads]` | `check_contextual_score` |
| (b) contextual heads | `top_k_heads(scores, k) -> [(layer, head), ...]` | `check_top_k_heads` |
| (c) split-softmax | `split_softmax_row(row, span, tau) -> row'` | `check_split_softmax_row` |
| (d) d_K after RoPE | `dk_logit_shift(q, k, d_k) -> [query_pos, key_pos]` | `check_dk_logit_shift` |
| (d') d_K before RoPE | `dk_logit_shift_pre_rope(q, k, d_k, q_positions)` using `rotate` | `check_dk_logit_shift_pre_rope` |
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from fdlib.core.spans import Span

Head = tuple[int, int]


# --- helpers ---------------------------------------------------------------------------------


def _as_tensor(value: Any, what: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().double().cpu()
    try:
        return torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise AssertionError(f"{what} must return a tensor, got {type(value).__name__}") from None


def _check_shape(got: Tensor, want: tuple[int, ...], what: str, meaning: str) -> None:
    if tuple(got.shape) != want:
        raise AssertionError(f"{what} returned shape {tuple(got.shape)}, expected {want} ({meaning})")


def _matches(got: Tensor, candidate: Tensor, atol: float = 1e-6) -> bool:
    return got.shape == candidate.shape and bool(torch.allclose(got, candidate.double(), atol=atol, rtol=0))


def _diagnose(got: Tensor, want: Tensor, mistakes: dict[str, Tensor], atol: float) -> str | None:
    """None if `got` equals `want`; else a hint naming the typical mistake it equals, if any."""
    if _matches(got, want, atol):
        return None
    for hint, candidate in mistakes.items():
        if _matches(got, candidate, atol):
            return hint
    return ""


def causal_pattern(n_heads: int, n_pos: int, generator: torch.Generator) -> Float[Tensor, "n_heads query_pos key_pos"]:
    """A random causal attention pattern (each row a softmax over the keys it can see)."""
    logits = torch.randn(n_heads, n_pos, n_pos, generator=generator, dtype=torch.float64) * 2
    mask = torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)


# --- (a) contextual score --------------------------------------------------------------------


def reference_contextual_score(
    pattern: Float[Tensor, "n_heads query_pos key_pos"], span: Span, response_start: int
) -> Float[Tensor, "n_heads"]:
    """S_X = 1/|R| sum_{i in R} sum_{j in X} W_ij with R = rows [response_start, T)."""
    n_rows = pattern.shape[1] - response_start
    total = torch.zeros(pattern.shape[0], dtype=pattern.dtype)
    for i in range(response_start, pattern.shape[1]):
        for j in range(span.start, span.end):
            total += pattern[:, i, j]
    return total / n_rows


def check_contextual_score(
    fn: Callable[[Tensor, Span, int], Any], *, n_cases: int = 6, seed: int = 0
) -> str:
    """Check `fn(pattern [n_heads, T, T], span, response_start) -> [n_heads]`."""
    g = torch.Generator().manual_seed(seed)
    for case in range(n_cases):
        n_heads = 3 + case % 3
        T = int(torch.randint(14, 24, (1,), generator=g))
        response_start = int(torch.randint(T // 2, T - 2, (1,), generator=g))
        start = int(torch.randint(1, response_start - 4, (1,), generator=g))
        end = int(torch.randint(start + 2, response_start - 1, (1,), generator=g))
        span = Span(start, end)
        pattern = causal_pattern(n_heads, T, g)
        got = _as_tensor(fn(pattern.clone().float(), span, response_start), "contextual_score")
        want = reference_contextual_score(pattern, span, response_start)
        _check_shape(got, (n_heads,), "contextual_score", "one score per head")
        rows = pattern[:, response_start:]
        mistakes = {
            "you averaged over all rows instead of the response rows [response_start, T)": pattern[:, :, span.slice].sum(-1).mean(-1),
            "your rows start one too early: the response rows are [response_start, T)": pattern[:, response_start - 1 :, span.slice].sum(-1).mean(-1),
            "you summed over the response rows instead of averaging": rows[:, :, span.slice].sum((-1, -2)),
            "you averaged over the span's columns instead of summing them": rows[:, :, span.slice].mean(-1).mean(-1),
            "off-by-one at the span's end: a Span is half-open, columns start..end-1": rows[:, :, start : end + 1].sum(-1).mean(-1),
            "off-by-one at the span's end: a Span is half-open, columns start..end-1 (you dropped the last one)": rows[:, :, start : end - 1].sum(-1).mean(-1),
            "you swapped rows and columns (the span indexes keys, the last axis)": pattern[:, span.slice, response_start:].sum(-2).mean(-1),
        }
        hint = _diagnose(got, want.double(), mistakes, atol=1e-5)
        if hint is not None:
            h = int((got - want).abs().argmax())
            raise AssertionError(
                f"contextual_score is wrong (T={T}, response_start={response_start}, span={span}): head {h} got "
                f"{float(got[h]):.5f}, expected {float(want[h]):.5f} (off by {float(got[h] - want[h]):+.2g})"
                + (f". It looks like {hint}." if hint else ".")
            )
    return f"contextual_score: all {n_cases} random cases pass"


# --- (b) top-k heads ---------------------------------------------------------------------------


def reference_top_k_heads(scores: Float[Tensor, "n_layers n_heads"], k: int) -> list[Head]:
    n_heads = scores.shape[1]
    flat = [(float(scores[l, h]), l * n_heads + h) for l in range(scores.shape[0]) for h in range(n_heads)]
    flat.sort(key=lambda t: -t[0])
    return [divmod(i, n_heads) for _, i in flat[:k]]


def _as_heads(value: Any, what: str) -> list[Head]:
    if isinstance(value, Tensor):
        value = value.tolist()
    try:
        out = [(int(a), int(b)) for a, b in value]
    except (TypeError, ValueError):
        raise AssertionError(f"{what} must return a list of (layer, head) pairs, got {value!r:.120}") from None
    return out


def check_top_k_heads(fn: Callable[[Tensor, int], Any], *, seed: int = 0) -> str:
    """Check `fn(scores [n_layers, n_heads], k) -> [(layer, head), ...]`, best first."""
    g = torch.Generator().manual_seed(seed)
    cases = [((5, 3), 1), ((5, 3), 4), ((4, 7), 6), ((6, 2), 12), ((3, 9), 5)]
    for shape, k in cases:
        scores = torch.rand(*shape, generator=g, dtype=torch.float64)  # continuous: no ties
        got = _as_heads(fn(scores.clone().float(), k), "top_k_heads")
        want = reference_top_k_heads(scores, k)
        if len(got) != k:
            raise AssertionError(f"top_k_heads returned {len(got)} heads for k={k} (scores of shape {shape})")
        if got == want:
            continue

        def name(h: Head) -> str:
            return f"L{h[0]}H{h[1]}"

        def score(h: Head) -> str:
            ok = 0 <= h[0] < shape[0] and 0 <= h[1] < shape[1]
            return f"{float(scores[h]):.3f}" if ok else "outside the array"

        if got == [(h, l) for l, h in want]:
            raise AssertionError("top_k_heads returns (head, layer): return (layer, head) pairs, layer first")
        if got == [divmod(l * shape[1] + h, shape[0]) for l, h in want]:
            raise AssertionError(
                f"top_k_heads unflattens with the wrong size: flat index i is (i // n_heads, i % n_heads) "
                f"with n_heads = scores.shape[1] = {shape[1]}"
            )
        if got == reference_top_k_heads(-scores, k):
            raise AssertionError("top_k_heads returns the k LOWEST scores: sort in descending order")
        if set(got) == set(want):
            raise AssertionError(
                f"top_k_heads has the right heads in the wrong order: expected best first "
                f"{[name(h) for h in want]}, got {[name(h) for h in got]}"
            )
        missing = [h for h in want if h not in got]
        extra = [h for h in got if h not in want]
        raise AssertionError(
            f"top_k_heads is wrong for scores of shape {shape}, k={k}: missing "
            + ", ".join(f"{name(h)} (score {score(h)})" for h in missing)
            + "; should not contain " + ", ".join(f"{name(h)} (score {score(h)})" for h in extra)
        )
    return f"top_k_heads: all {len(cases)} random cases pass"


# --- (c) split-softmax on one row --------------------------------------------------------------


def reference_split_softmax_row(row: Float[Tensor, "key_pos"], span: Span, tau: float) -> Float[Tensor, "key_pos"]:
    """pi = mass on the span; inside x pi^tau/pi, outside x (1 - pi^tau)/(1 - pi)."""
    out = row.double().clone()
    pi = float(out[span.start : span.end].sum())
    new = pi**tau
    for j in range(out.shape[0]):
        out[j] *= new / pi if span.start <= j < span.end else (1 - new) / (1 - pi)
    return out


def check_split_softmax_row(fn: Callable[[Tensor, Span, float], Any], *, seed: int = 0) -> str:
    """Check `fn(row [key_pos], span, tau) -> row'` (a probability row re-weighted)."""
    g = torch.Generator().manual_seed(seed)
    taus = [0.1, 0.5, 2.0, 1.0, 0.0, 0.3]
    for tau in taus:
        n = int(torch.randint(10, 30, (1,), generator=g))
        row = torch.softmax(torch.randn(n, generator=g, dtype=torch.float64) * 1.5, dim=-1)
        start = int(torch.randint(1, n // 2, (1,), generator=g))
        end = int(torch.randint(start + 2, n - 1, (1,), generator=g))
        span = Span(start, end)
        got = _as_tensor(fn(row.clone().float(), span, tau), "split_softmax_row")
        want = reference_split_softmax_row(row, span, tau)
        _check_shape(got, (n,), "split_softmax_row", "one weight per key")
        if _matches(got, want, 1e-5):
            continue
        pi = float(row[span.slice].sum())
        if abs(float(got.sum()) - 1) > 1e-4:
            only_inside = row.clone()
            only_inside[span.slice] *= pi**tau / pi
            hint = (
                "you scaled the span but not the rest: outside the span multiply by (1 - pi^tau)/(1 - pi) so the row sums to 1"
                if _matches(got, only_inside, 1e-5) else "a re-weighted row must still be a probability distribution"
            )
            raise AssertionError(f"split_softmax_row (tau={tau}, span={span}): the row sums to {float(got.sum()):.5f}, not 1; {hint}")
        powered = row**tau / (row**tau).sum()
        if _matches(got, powered, 1e-5):
            raise AssertionError(
                "split_softmax_row raised every weight to the power tau: only the span's total mass pi becomes pi^tau, "
                "each weight inside scaled by the same factor pi^tau/pi (and outside by (1 - pi^tau)/(1 - pi))"
            )
        mass = float(got[span.slice].sum())
        if abs(mass - pi**tau) > 1e-4:
            off_by_one = reference_split_softmax_row(row, Span(start, end + 1), tau)
            hint = (
                "off-by-one at the span's end: a Span is half-open, columns start..end-1"
                if _matches(got, off_by_one, 1e-5) else "the span's new mass must be pi^tau"
            )
            raise AssertionError(
                f"split_softmax_row (tau={tau}, span={span}, pi={pi:.4f}): the span gets {mass:.5f}, expected "
                f"pi^tau = {pi**tau:.5f}; {hint}"
            )
        j = int((got - want).abs().argmax())
        where = "inside" if span.start <= j < span.end else "outside"
        raise AssertionError(
            f"split_softmax_row (tau={tau}, span={span}): position {j} ({where} the span) is {float(got[j]):.5f}, expected "
            f"{float(want[j]):.5f}: the mass is right but not its spread; every weight {where} the span is scaled by one common factor"
        )
    return f"split_softmax_row: all {len(taus)} random cases pass"


# --- (d) d_K after and before RoPE ---------------------------------------------------------------


def _check_logit_shift(name: str, got: Tensor, want: Tensor, mistakes: dict[str, Tensor]) -> None:
    """Both d_K exercises: the (query, key) logit shift that is furthest off, and the mistake it looks like."""
    hint = _diagnose(got, want, mistakes, atol=1e-5)
    if hint is not None:
        i, j = divmod(int((got - want).abs().argmax()), got.shape[1])
        raise AssertionError(
            f"{name}: logit ({i}, {j}) shifts by {float(got[i, j]):.5f}, expected {float(want[i, j]):.5f}"
            + (f". It looks like {hint}." if hint else ".")
        )


def rotate(x: Float[Tensor, "pos d_head"], positions: Int[Tensor, "pos"], base: float = 10000.0) -> Float[Tensor, "pos d_head"]:
    """Llama's rotary embedding (the `rotate_half` form): row p of x rotated by position p."""
    d = x.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.double()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    half = d // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.double() * angles.cos() + rotated_half.double() * angles.sin()).to(x.dtype)


def reference_dk_logit_shift(
    q: Float[Tensor, "query_pos d_head"], k: Float[Tensor, "key_pos d_head"], d_k: Float[Tensor, "d_head"]
) -> Float[Tensor, "query_pos key_pos"]:
    scale = 1 / math.sqrt(q.shape[-1])
    return (q @ (k + d_k).T - q @ k.T) * scale


def check_dk_logit_shift(fn: Callable[[Tensor, Tensor, Tensor], Any], *, seed: int = 0) -> str:
    """Check `fn(q [query_pos, d_head], k [key_pos, d_head], d_k [d_head]) -> [query_pos, key_pos]`:
    how much the scaled logits q_i . k_j / sqrt(d_head) change when d_K is added to every key
    after RoPE. The check also verifies the point of the exercise: the shift is the same for
    every key of a row, so the softmax does not change."""
    g = torch.Generator().manual_seed(seed)
    for n_q, n_k, d in [(3, 7, 8), (5, 5, 16), (1, 9, 4)]:
        q, k, d_k = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((n_q, d), (n_k, d), (d,)))
        got = _as_tensor(fn(q.clone().float(), k.clone().float(), d_k.clone().float()), "dk_logit_shift")
        want = reference_dk_logit_shift(q, k, d_k)
        if tuple(got.shape) == (n_q,):
            raise AssertionError(
                f"dk_logit_shift returned shape ({n_q},): one value per query; return the shift of every logit, "
                f"[query_pos, key_pos] = ({n_q}, {n_k}) (broadcast it over the keys)"
            )
        _check_shape(got, (n_q, n_k), "dk_logit_shift", "one shift per (query, key) logit")
        scale = 1 / math.sqrt(d)
        mistakes = {
            "you forgot the 1/sqrt(d_head) scale of the logits": want / scale,
            "you returned the new logits q . (k_j + d_K) / sqrt(d_head), not their change": (q @ (k + d_k).T) * scale,
            "you returned minus the shift (old - new)": -want,
        }
        _check_logit_shift("dk_logit_shift", got, want, mistakes)
    # What the exercise shows: the shift is constant along the keys, so the softmax is unchanged.
    spread = float((got - got[:, :1]).abs().max())
    logits = (q @ k.T) * scale
    change = float((torch.softmax(logits + got, -1) - torch.softmax(logits, -1)).abs().max())
    return (
        f"dk_logit_shift: all 3 random cases pass; along each row the shift varies by at most {spread:.1e}, "
        f"so the softmax moves by at most {change:.1e}: after RoPE, d_K cannot move attention"
    )


def reference_dk_logit_shift_pre_rope(
    q: Float[Tensor, "query_pos d_head"],
    k: Float[Tensor, "key_pos d_head"],
    d_k: Float[Tensor, "d_head"],
    q_positions: Int[Tensor, "query_pos"],
) -> Float[Tensor, "query_pos key_pos"]:
    scale = 1 / math.sqrt(q.shape[-1])
    k_pos = torch.arange(k.shape[0])
    rq = rotate(q, q_positions)
    return (rq @ rotate(k + d_k, k_pos).T - rq @ rotate(k, k_pos).T) * scale


def check_dk_logit_shift_pre_rope(fn: Callable[[Tensor, Tensor, Tensor, Tensor], Any], *, seed: int = 0) -> str:
    """Check `fn(q, k, d_k, q_positions) -> [query_pos, key_pos]`: the same shift when d_K is
    added to the keys BEFORE RoPE (pre-RoPE q and k; keys at positions 0..key_pos-1, queries at
    `q_positions`; use `fdlib.views.exercises.rotate`). Now the shift depends on the key's position."""
    g = torch.Generator().manual_seed(seed)
    for n_q, n_k, d in [(3, 7, 8), (4, 10, 16)]:
        q, k, d_k = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((n_q, d), (n_k, d), (d,)))
        q_positions = torch.arange(n_k - n_q, n_k)
        got = _as_tensor(fn(q.clone(), k.clone(), d_k.clone(), q_positions.clone()), "dk_logit_shift_pre_rope")
        _check_shape(got, (n_q, n_k), "dk_logit_shift_pre_rope", "one shift per (query, key) logit")
        want = reference_dk_logit_shift_pre_rope(q, k, d_k, q_positions)
        scale = 1 / math.sqrt(d)
        rq = rotate(q, q_positions)
        mistakes = {
            "you did not rotate d_K: added before RoPE, it is rotated with each key's position j": (rq @ d_k[:, None]).expand(n_q, n_k) * scale,
            "you rotated d_K by the query's position instead of the key's": (rq * rotate(d_k.expand(n_q, d), q_positions)).sum(-1, keepdim=True).expand(n_q, n_k) * scale,
            "you left the queries unrotated": (q @ rotate(d_k.expand(n_k, d), torch.arange(n_k)).T) * scale,
            "you forgot the 1/sqrt(d_head) scale of the logits": want / scale,
        }
        _check_logit_shift("dk_logit_shift_pre_rope", got, want, mistakes)
    return "dk_logit_shift_pre_rope: all 2 random cases pass; before RoPE the shift varies with the key, so d_K can move attention"

