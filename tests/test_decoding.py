import pytest
import torch

import fdlib
from fdlib.model.decoding import prefill


def test_cached_decode_step_equals_full_forward(tiny):
    """Regression guard for the transformers cap (<5.24): a bridge step over the fast-prefill
    cache must equal the full forward, not attend to its own token only."""
    torch.manual_seed(3)
    ids = torch.randint(5, 64, (33,))
    prefix = prefill(tiny.model, ids)
    with torch.no_grad():
        step = tiny.model(ids[None, -1:], past_key_values=prefix.cache, return_type="logits")[0, -1]
        full = tiny.hf(ids[None]).logits[0, -1]
        bridge_full = tiny.model(ids[None], return_type="logits")[0, -1]
    torch.testing.assert_close(step, full, atol=1e-4, rtol=0)
    torch.testing.assert_close(bridge_full, full, atol=1e-4, rtol=0)
    assert (step - full).abs().max() < 1e-4


def greedy_reference(hf, prompt, n):
    """Greedy decoding by full forwards of an independent eager model (no cache at all)."""
    ids = prompt.clone()
    out = []
    with torch.no_grad():
        for _ in range(n):
            tok = int(hf(ids[None]).logits[0, -1].argmax())
            out.append(tok)
            ids = torch.cat([ids, torch.tensor([tok])])
    return out


def test_decode_matches_uncached_greedy_and_restores_cache(tiny):
    torch.manual_seed(4)
    prompt = torch.randint(5, 64, (20,))
    prefix = prefill(tiny.model, prompt)
    ref = greedy_reference(tiny.hf, prompt, 8)
    stop = fdlib.model.loading.stop_tokens(tiny.tokenizer)
    assert stop.eos == {2} and stop.newline == {4}  # "</s>" and "\n" in the tiny vocabulary
    expected = []
    for t in ref:  # the reference cut where decode stops (EOS, or a newline after some text)
        if t in stop.eos or (t in stop.newline and expected):
            break
        expected.append(t)
    a = fdlib.decode(tiny.model, prefix, max_new_tokens=8)
    assert a.tokens == expected
    assert prefix.cache.get_seq_length() == prompt.shape[0] - 1
    b = fdlib.decode(tiny.model, prefix, max_new_tokens=8)  # reusing the same prefix
    assert b.tokens == a.tokens and b.text == a.text


def test_decode_rejects_bad_arguments(tiny):
    prefix = prefill(tiny.model, torch.randint(5, 64, (10,)))
    with pytest.raises(ValueError, match="max_new_tokens"):
        fdlib.decode(tiny.model, prefix, max_new_tokens=0)
    with pytest.raises(ValueError, match=r"Span\(5, 50\).*sequence length 10"):
        fdlib.decode(tiny.model, prefix, spans={"x": fdlib.Span(5, 50)})


def test_hooks_removed_even_when_body_raises(tiny):
    calls = []
    name = "blocks.0.attn.hook_pattern"
    with pytest.raises(RuntimeError):
        with fdlib.hooks(tiny.model, [(name, lambda t, hook: calls.append(1))]):
            tiny.model(torch.tensor([[5, 6, 7]]))
            raise RuntimeError("boom")
    assert calls == [1]
    tiny.model(torch.tensor([[5, 6, 7]]))
    assert calls == [1]


def test_too_long_input_fails_before_any_forward(tiny):
    n_ctx = tiny.model.cfg.n_ctx
    with pytest.raises(ValueError, match=f"{n_ctx + 1} tokens exceed the model's context window of {n_ctx}"):
        prefill(tiny.model, torch.randint(5, 64, (n_ctx + 1,)))
    prefix = prefill(tiny.model, torch.randint(5, 64, (n_ctx - 2,)))
    with pytest.raises(ValueError, match="context window"):
        fdlib.decode(tiny.model, prefix, max_new_tokens=8)
    with pytest.raises(ValueError, match="context window"):
        fdlib.contextual_scores(tiny.model, torch.randint(5, 64, (n_ctx + 3,)), 4, {"a": fdlib.Span(0, 2)})


def test_hooks_nest_and_remove_only_their_own(tiny):
    seen = []
    name = "blocks.1.attn.hook_pattern"
    with fdlib.hooks(tiny.model, [(name, lambda t, hook: seen.append("outer"))]):
        with fdlib.hooks(tiny.model, [(name, lambda t, hook: seen.append("inner"))]):
            tiny.model(torch.tensor([[5, 6]]))
        tiny.model(torch.tensor([[5, 6]]))
    tiny.model(torch.tensor([[5, 6]]))
    assert seen == ["outer", "inner", "outer"]
    with pytest.raises(ValueError, match="no hook point named 'blocks.9.attn.hook_pattern'"):
        with fdlib.hooks(tiny.model, [("blocks.9.attn.hook_pattern", lambda t, hook: None)]):
            pass


def test_bridge_prefill_equals_fast_prefill(tiny):
    ids = torch.randint(5, 64, (30,))
    fast, slow = prefill(tiny.model, ids), prefill(tiny.model, ids, fast=False)
    for a, b in zip(fast.cache.layers, slow.cache.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=0)
    assert fdlib.decode(tiny.model, fast).tokens == fdlib.decode(tiny.model, slow).tokens


def test_growable_cache_layer_matches_concatenation():
    from fdlib.model.decoding import GrowableLayer

    torch.manual_seed(7)
    layer, ref_k, ref_v = GrowableLayer(), [], []
    for n in (50, 1, 1, 30, 1):  # the buffer is re-grown past its reserve of 64 spare positions
        k, v = torch.randn(1, 2, n, 4), torch.randn(1, 2, n, 4)
        ref_k.append(k)
        ref_v.append(v)
        out_k, out_v = layer.update(k, v)
        torch.testing.assert_close(out_k, torch.cat(ref_k, dim=-2), rtol=0, atol=0)
        torch.testing.assert_close(out_v, torch.cat(ref_v, dim=-2), rtol=0, atol=0)
    layer.crop(-32)  # back to the first 51 positions, then a different continuation
    k, v = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4)
    out_k, _ = layer.update(k, v)
    torch.testing.assert_close(out_k, torch.cat([torch.cat(ref_k, dim=-2)[..., :51, :], k], dim=-2), rtol=0, atol=0)
    assert layer.get_seq_length() == 52
