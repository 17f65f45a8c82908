"""split_softmax against plain transformers eager attention re-weighted by separate reference
code, on a tiny GQA Llama; the limits of the re-weighting; bad inputs; hook hygiene."""

import math

import pytest
import torch
from transformers import AttentionInterface
from transformers.models.llama.modeling_llama import eager_attention_forward

import fdlib
from fdlib.interventions.hooks import reweight, split_softmax
from fdlib.model.decoding import prefill


def reference_reweight(weights, heads, span, tau, from_pos):
    """Row by row, in float64: W' = pi^tau/pi W inside, (1-pi^tau)/(1-pi) W outside."""
    w = weights.double().clone()
    for h in heads:
        for i in range(from_pos, w.shape[-2]):
            row = w[0, h, i]
            pi = row[span.start : span.end].sum().item()
            if 0 < pi < 1:
                inside = torch.zeros_like(row, dtype=torch.bool)
                inside[span.start : span.end] = True
                row[inside] *= pi**tau / pi
                row[~inside] *= (1 - pi**tau) / (1 - pi)
    return w.to(weights.dtype)


def use_reference_attention(hf, heads, span, tau, from_pos):
    by_layer = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        # transformers hands a custom attention function no mask: build the causal one here.
        n_q, n_k = query.shape[-2], key.shape[-2]
        causal = torch.ones(n_q, n_k, dtype=torch.bool).tril(diagonal=n_k - n_q)
        additive = torch.zeros(n_q, n_k).masked_fill(~causal, float("-inf"))[None, None]
        _, weights = eager_attention_forward(module, query, key, value, additive, scaling, dropout)
        if module.layer_idx in by_layer:
            weights = reference_reweight(weights, by_layer[module.layer_idx], span, tau, from_pos)
        groups = module.num_key_value_groups
        v = value.repeat_interleave(groups, dim=1)
        return torch.matmul(weights, v).transpose(1, 2).contiguous(), weights

    AttentionInterface.register("fdlib_reference_split", attention)
    hf.set_attn_implementation("fdlib_reference_split")


@pytest.mark.parametrize("tau", [0.3, 2.0, 1000.0])
def test_logits_match_reweighted_eager_reference(tiny, tau):
    torch.manual_seed(5)
    ids = torch.randint(5, 64, (30,))
    heads, span, from_pos = [(0, 1), (1, 3), (1, 0)], fdlib.Span(4, 12), 20
    use_reference_attention(tiny.hf, heads, span, tau, from_pos)
    try:
        with torch.no_grad():
            ref = tiny.hf(ids[None]).logits[0]
            plain = tiny.model(ids[None], return_type="logits")[0]
            with split_softmax(tiny.model, heads, span, tau, from_pos):
                got = tiny.model(ids[None], return_type="logits")[0]
    finally:
        tiny.hf.set_attn_implementation("eager")
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert (got[from_pos:] - plain[from_pos:]).abs().max() > 1e-3  # the intervention did something
    torch.testing.assert_close(got[:from_pos], plain[:from_pos], atol=1e-5, rtol=0)  # rows before untouched


def test_cached_decode_step_sees_absolute_positions(tiny):
    """Through the fast prefill, the decode step's single row is at position len(prompt) - 1."""
    torch.manual_seed(6)
    ids = torch.randint(5, 64, (25,))
    heads, span, tau = [(1, 2), (0, 0)], fdlib.Span(2, 9), 0.2
    with torch.no_grad(), split_softmax(tiny.model, heads, span, tau, from_pos=24):
        full = tiny.model(ids[None], return_type="logits")[0, -1]
        prefix = prefill(tiny.model, ids)
        step = tiny.model(ids[None, -1:], past_key_values=prefix.cache, return_type="logits")[0, -1]
    torch.testing.assert_close(step, full, atol=1e-4, rtol=0)


def rows(n_q=3, n_k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(2, n_q, n_k, generator=g), dim=-1)


def mask(n_k, start, end):
    m = torch.zeros(n_k, dtype=torch.bool)
    m[start:end] = True
    return m


def test_rows_sum_to_one_and_span_mass_is_pi_to_tau():
    w = rows()
    m = mask(6, 1, 3)
    pos = torch.arange(3, 6)
    for tau in (0.0, 0.1, 0.5, 1.5, 1000.0):
        out = reweight(w, m, tau, pos)
        torch.testing.assert_close(out.sum(-1), torch.ones(2, 3), atol=1e-6, rtol=0)
        pi = w[..., m].sum(-1)
        torch.testing.assert_close(out[..., m].sum(-1), pi**tau, atol=1e-6, rtol=0)


def test_limits():
    w = rows()
    m = mask(6, 1, 3)
    pos = torch.arange(3, 6)
    assert reweight(w, m, 1.0, pos) is w  # tau = 1: identity
    zero_mass = w.clone()
    zero_mass[..., 1:3] = 0
    zero_mass /= zero_mass.sum(-1, keepdim=True)
    out = reweight(zero_mass, m, 0.5, pos)  # pi = 0, tau > 0: unchanged, finite
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, zero_mass)
    out = reweight(zero_mass, m, 0.0, pos)  # pi = 0, tau = 0: all mass on the span, uniformly
    torch.testing.assert_close(out[..., 1:3], torch.full((2, 3, 2), 0.5))
    full_mass = torch.zeros(2, 3, 6)
    full_mass[..., 1], full_mass[..., 2] = 0.25, 0.75
    for tau in (0.0, 0.3, 3.0):  # pi = 1: unchanged (1**tau = 1), finite
        out = reweight(full_mass, m, tau, pos)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, full_mass)
    out = reweight(w, m, 0.0, pos)  # tau = 0: all mass on the span
    torch.testing.assert_close(out[..., m].sum(-1), torch.ones(2, 3))
    assert (out[..., ~m] == 0).all()


def test_bad_inputs_name_the_value(tiny):
    span = fdlib.Span(0, 2)
    for tau in (-0.1, math.nan, "x"):
        with pytest.raises(ValueError, match="tau must be a number >= 0"):
            with split_softmax(tiny.model, [(0, 0)], span, tau):
                pass
    with pytest.raises(ValueError, match=r"head L2H0 is outside the model \(2 layers x 4 heads\)"):
        with split_softmax(tiny.model, [(2, 0)], span, 0.5):
            pass
    with pytest.raises(ValueError, match=r"head L0H4"):
        with split_softmax(tiny.model, [(0, 4)], span, 0.5):
            pass
    with pytest.raises(ValueError, match="span must be an fdlib.Span"):
        with split_softmax(tiny.model, [(0, 0)], (0, 2), 0.5):
            pass
    with pytest.raises(ValueError, match="from_pos"):
        with split_softmax(tiny.model, [(0, 0)], span, 0.5, from_pos=-1):
            pass
    with pytest.raises(ValueError, match=r"Span\(3, 40\) lies past the 10 positions"):
        with split_softmax(tiny.model, [(0, 0)], fdlib.Span(3, 40), 0.5):
            tiny.model(torch.randint(5, 64, (1, 10)))


def test_hooks_removed_on_error_and_nesting_composes(tiny):
    ids = torch.randint(5, 64, (1, 12))
    with torch.no_grad():
        plain = tiny.model(ids, return_type="logits")
        with pytest.raises(RuntimeError):
            with split_softmax(tiny.model, [(0, 1)], fdlib.Span(0, 4), 0.2):
                raise RuntimeError("boom")
        torch.testing.assert_close(tiny.model(ids, return_type="logits"), plain)
        with split_softmax(tiny.model, [(0, 1)], fdlib.Span(0, 4), 0.2):
            one = tiny.model(ids, return_type="logits")
            with split_softmax(tiny.model, [(1, 2)], fdlib.Span(5, 9), 3.0):
                both = tiny.model(ids, return_type="logits")
            torch.testing.assert_close(tiny.model(ids, return_type="logits"), one)
        torch.testing.assert_close(tiny.model(ids, return_type="logits"), plain)
    assert (both - one).abs().max() > 1e-4 and (one - plain).abs().max() > 1e-4
