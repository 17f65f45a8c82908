"""The model's dtype as a setting: what `load_model` casts and keeps, what it refuses, and a
bridge moved or cast after loading (unit tier, tiny random models)."""

from __future__ import annotations

import pytest
import torch
from arch_models import build_hf
from conftest import build_tiny, build_tokenizer, fake_samples

import fdlib
from fdlib.interventions.directions import FocusDirections
from fdlib.interventions.engine import decode_batch, teacher_forced
from fdlib.interventions.row import RowIntervention
from fdlib.model.decoding import prefill
from fdlib.model.loading import check_dtype, model_dtype, model_name, resolve_dtype


def _tables(hf):
    return {n: b for n, b in hf.named_buffers() if "inv_freq" in n}


def _fresh_tables(name="llama"):
    return {n.replace("._original_component", ""): b for n, b in _tables(build_hf(name)).items()}


@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi3_partial"])
def test_casting_keeps_the_rotary_tables_in_float32(arch):
    """load_model(dtype=bfloat16) casts the parameters, not the rotary tables (as transformers'
    from_pretrained(dtype=...) loads them); the tables equal a float32 model's bit for bit."""
    hf = build_hf(arch)
    want = {n: b.clone() for n, b in _tables(hf).items()}
    assert want, "the architecture has rotary tables"
    model = fdlib.load_model(hf, build_tokenizer(), dtype="bf16")
    assert model_dtype(model) == torch.bfloat16 and model.cfg.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in hf.parameters())
    got = {n.replace("._original_component", ""): b for n, b in _tables(model.original_model).items()}
    for name, table in want.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], table), name


def test_a_model_cast_with_to_gets_its_tables_back_in_float32():
    """A model whose tables `.to(bfloat16)` rounded is repaired (recomputed from its config),
    documented in load_model; dtype=None keeps the model's bfloat16 weights."""
    hf = build_hf("llama").to(torch.bfloat16)
    assert all(b.dtype == torch.bfloat16 for b in _tables(hf).values())
    model = fdlib.load_model(hf, build_tokenizer())
    assert model_dtype(model) == torch.bfloat16
    for name, table in _fresh_tables().items():
        got = dict(_tables(model.original_model))[name.replace("model.rotary_emb.", "model.rotary_emb._original_component.")]
        assert got.dtype == torch.float32 and torch.equal(got, table)


def test_dtype_none_keeps_a_passed_models_dtype():
    hf32 = build_hf("llama")
    assert model_dtype(fdlib.load_model(hf32, build_tokenizer())) == torch.float32
    hf16 = build_hf("llama")
    for p in hf16.parameters():
        p.data = p.data.to(torch.bfloat16)
    assert model_dtype(fdlib.load_model(hf16, build_tokenizer())) == torch.bfloat16


@pytest.mark.parametrize("bad", ["int8", torch.float64, "float8", 3])
def test_a_dtype_fdlib_does_not_compute_in_is_refused(bad):
    with pytest.raises(ValueError, match="bfloat16"):
        resolve_dtype(bad)
    with pytest.raises(ValueError, match="bfloat16"):
        fdlib.load_model(build_hf("llama"), build_tokenizer(), dtype=bad)


def test_float16_on_the_cpu_is_refused_before_any_forward():
    with pytest.raises(ValueError, match="float16 on the CPU"):
        check_dtype(torch.float16, "cpu")
    with pytest.raises(ValueError, match="float16 on the CPU"):
        fdlib.load_model(build_hf("llama"), build_tokenizer(), dtype=torch.float16)
    hf = build_hf("llama").half()
    with pytest.raises(ValueError, match="float16 on the CPU"):
        fdlib.load_model(hf, build_tokenizer())
    assert resolve_dtype("bf16") == resolve_dtype("bfloat16") == torch.bfloat16
    assert resolve_dtype(None) is None


def test_a_bridge_cast_after_loading_computes_as_one_loaded_in_that_dtype():
    """bridge.to(bfloat16) after load_model: the twins (prefill, batched engine) are rebuilt on the
    new weights and the rotary tables put back in float32, so every number equals a model loaded
    in bfloat16; a later .half() on the CPU is refused at the next forward."""
    sample = fake_samples(1)[0]
    rows = [RowIntervention(), RowIntervention(((1, 3), (0, 1)), span_map="split", strength=0.1, span=sample.gold_span)]
    tokens = [5, 9, 14, 30]

    def forced(model):
        return teacher_forced(model, prefill(model, sample.input_ids), rows, tokens, sample.named_spans())

    cast = build_tiny(seed=3)
    forced(cast.model)  # the float32 twins exist before the cast
    cast.model.to(torch.bfloat16)
    loaded = build_tiny(seed=3, dtype=torch.bfloat16)
    (got, got_rows), (want, want_rows) = forced(cast.model), forced(loaded.model)
    assert prefill(cast.model, sample.input_ids).cache.layers[0].keys.dtype == torch.bfloat16
    assert torch.equal(got, want)
    for a, b in zip(got_rows, want_rows):
        assert all(torch.equal(a.scores[k], b.scores[k]) for k in b.scores)
    assert all(b.dtype == torch.float32 for b in _tables(cast.model.original_model).values())
    cast.model.half()
    with pytest.raises(ValueError, match="float16 on the CPU"):
        prefill(cast.model, sample.input_ids)


def test_directions_of_another_dtype_are_used_in_float32():
    """Focus directions are applied as alpha * d in float32, added in the model's dtype
    (FocusDirections' documented cast): directions stored in bfloat16 or float16 give exactly
    what the same values in float32 give, on a bfloat16 model."""
    t = build_tiny(seed=3, dtype=torch.bfloat16)
    sample = fake_samples(1)[0]
    g = torch.Generator().manual_seed(0)
    shape = (t.model.cfg.n_layers, t.model.cfg.n_heads, t.model.cfg.d_head)
    d_q, d_k = torch.randn(shape, generator=g).to(torch.bfloat16), torch.randn(shape, generator=g).to(torch.bfloat16)
    heads = ((1, 3), (0, 1))
    out = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        dirs = FocusDirections(d_q.to(dtype), d_k.to(dtype), model_name(t.model))
        out[dtype] = decode_batch(t.model, prefill(t.model, sample.input_ids), [RowIntervention(heads, directions=dirs, alpha=0.8)],
                                  spans=sample.named_spans(), max_new_tokens=6)[0]
    for dtype in (torch.bfloat16, torch.float16):
        assert out[dtype].tokens == out[torch.float32].tokens
        assert all(torch.equal(out[dtype].scores[k], out[torch.float32].scores[k]) for k in out[dtype].scores)


def test_activations_a_bfloat16_model_makes_are_cached_apart(tmp_path):
    from fdlib.interventions.training import ActivationCache

    f32, bf16 = ActivationCache(tmp_path, build_tiny().model, "gold"), ActivationCache(tmp_path, build_tiny(dtype=torch.bfloat16).model, "gold")
    assert f32.dir != bf16.dir and "bfloat16" in bf16.dir.parts and "float32" not in f32.dir.parts


def test_a_table_cast_there_and_back_is_repaired_too():
    """bridge.to(bfloat16) then .to(float32), with no fdlib call between: the tables are float32
    again but hold bfloat16-rounded angles; the next forward puts the exact ones back."""
    t = build_tiny(seed=3)
    sample = fake_samples(1)[0]
    t.model.to(torch.bfloat16)
    t.model.to(torch.float32)
    rounded = [b for b in _tables(t.model.original_model).values()]
    assert all(b.dtype == torch.float32 for b in rounded) and not all(torch.equal(b, f) for b, f in zip(rounded, _fresh_tables().values()))
    prefill(t.model, sample.input_ids)
    for got, want in zip(_tables(t.model.original_model).values(), _fresh_tables().values()):
        assert got.dtype == torch.float32 and torch.equal(got, want)


def test_rows_of_a_bridge_cast_after_a_run_carry_its_new_weights_hash():
    from fdlib.study.runner import model_fingerprint

    t = build_tiny(seed=3)
    before = model_fingerprint(t.model)
    t.model.to(torch.bfloat16)
    after = model_fingerprint(t.model)
    assert after["model_sha"] != before["model_sha"]
    assert after == model_fingerprint(build_tiny(seed=3, dtype=torch.bfloat16).model)


def test_a_bfloat16_study_ranks_heads_by_the_committed_float32_rows(tmp_path):
    """`committed_ranking` reads the ranking from stored rows of any dtype: a bfloat16 model gets
    exactly the float32 study's ranking (the heads its directions were trained on), and a
    store missing a question's row or holding another model's rows is refused."""
    from fdlib.experiments.contextual import committed_ranking, contextual_study

    f32 = build_tiny(max_position_embeddings=4096)
    store = tmp_path / "01.sqlite"
    study = contextual_study(f32.model, size=3, n_docs=3, store=store, progress=False)
    bf16 = build_tiny(dtype=torch.bfloat16, max_position_embeddings=4096)
    ranked, dtype = committed_ranking(bf16.model, store, size=3, n_docs=3)
    assert dtype == "float32" and ranked == study.heads(8)
    with pytest.raises(ValueError, match="no stored long-input row for 1 of 4"):
        committed_ranking(bf16.model, store, size=4, n_docs=3)
