"""Where a notebook's studies keep their rows and write their figures, for one model, dtype and size.

- `quick`, `full` or a count: stores `runs/[<model>/][<dtype>/]<name>_<size>.sqlite`, figures and
  findings `runs/[<model>/][<dtype>/]figures/<size>/`. A CI run (`quick`) never touches the
  committed gallery.
- `paper`: figures and findings in `figures/[<model>/][<dtype>/]` (the README's gallery). Its
  studies read the committed results files `results/[<model>/][<dtype>/]<name>.jsonl.gz`,
  read-only: the notebooks render from them and decode nothing. With `recompute`, the studies
  run (resuming) into `runs/[<model>/][<dtype>/]paper/<name>.sqlite` (one store per shard when
  sharded), which `python -m fdlib paper export` turns into the results files.

`[<model>/]` is empty for the default model and `[<dtype>/]` for float32, so rows of two dtypes
never share a store, results file or table. The committed focus directions are the model's, in
`figures/[<model>/]data/`, whatever the dtype. `Workspace.from_env()` reads the notebooks'
switches: `FDLIB_MODEL`, `FDLIB_DTYPE` (float32, bfloat16 or float16; default float32),
`FDLIB_SIZE` (default quick), `FDLIB_RECOMPUTE=1`, `FDLIB_SHARD=i/n`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from fdlib.core.store import BASE_DTYPE, RESULTS_SUFFIX, atomic_write, check_shard
from fdlib.data.nq import SIZES, parse_size, sized

PAPER = "paper"
# Notebooks whose studies compute in another dtype than float32 unless `FDLIB_DTYPE` (or the
# CLI's --dtype) says otherwise: their committed results are in that dtype's folders.
NOTEBOOK_DTYPES: dict[str, str] = {}


def notebook_dtype(notebook: str) -> str:
    """The dtype notebook `notebook` (e.g. "03_focus_directions") computes in by default."""
    return NOTEBOOK_DTYPES.get(notebook, BASE_DTYPE)


def model_slug(model: str) -> str:
    """A model's folder name: the last part of its hub name, safe for a path."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", model.split("/")[-1])


def parse_shard(text: str) -> tuple[int, int]:
    """`"i/n"` -> (i, n), checked."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise ValueError(f"a shard is 'i/n' with 0 <= i < n, got {text!r}")
    return check_shard((int(m[1]), int(m[2])))


@dataclass(frozen=True)
class Workspace:
    """One model, dtype and size: the paths its studies and figures use (see the module
    docstring). `dtype` is what the notebooks load the model in (`load_model(..., dtype=WS.dtype)`):
    a name or alias ("bf16") or a torch dtype, kept as its canonical name ("bfloat16")."""

    model: str
    size: str | int = "quick"
    recompute: bool = False
    shard: tuple[int, int] = (0, 1)
    root: Path = Path("..")
    dtype: str = BASE_DTYPE

    def __post_init__(self) -> None:
        from fdlib.model.loading import DTYPES, dtype_name, resolve_dtype

        sized(SIZES, self.size)  # a size name or a positive count, else a ValueError naming them
        if check_shard(self.shard)[1] > 1 and self.rendering:
            raise ValueError("a sharded run computes: set recompute=True (FDLIB_RECOMPUTE=1) with a shard")
        if self.dtype is None:  # load_model's "the checkpoint's own": not a folder of results
            raise ValueError(f"a workspace's dtype is one of {sorted(DTYPES)}, got None")
        object.__setattr__(self, "dtype", dtype_name(resolve_dtype(self.dtype)))
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def from_env(cls, root: str | Path = "..", environ: Mapping[str, str] | None = None, *,
                 dtype: str = BASE_DTYPE) -> "Workspace":
        """The workspace the environment's switches name; `dtype` is the notebook's own default,
        for when `FDLIB_DTYPE` is unset."""
        from fdlib.model.loading import DEFAULT_MODEL

        env = os.environ if environ is None else environ
        flag = env.get("FDLIB_RECOMPUTE", "0").strip().lower()
        if flag not in ("", "0", "1", "false", "true", "no", "yes"):
            raise ValueError(f"FDLIB_RECOMPUTE must be 0 or 1, got {flag!r}")
        return cls(
            model=env.get("FDLIB_MODEL") or DEFAULT_MODEL,
            size=parse_size(env.get("FDLIB_SIZE") or "quick"),
            recompute=flag in ("1", "true", "yes"),
            shard=parse_shard(env.get("FDLIB_SHARD") or "0/1"),
            root=root,
            dtype=env.get("FDLIB_DTYPE") or dtype,
        )

    def in_dtype(self, dtype: str) -> "Workspace":
        """The same model, size and run in another dtype (e.g. to read notebook 01's float32
        ranking from a bfloat16 notebook)."""
        return replace(self, dtype=dtype)

    @property
    def rendering(self) -> bool:
        """True when the studies read the committed results and compute nothing."""
        return self.size == PAPER and not self.recompute

    @property
    def sharded(self) -> bool:
        return self.shard[1] > 1

    @property
    def torch_dtype(self) -> Any:
        """`dtype` as a torch dtype."""
        from fdlib.model.loading import DTYPES

        return DTYPES[self.dtype]

    def _under(self, top: str, *, by_dtype: bool = True) -> Path:
        """`<root>/<top>/[<model>/][<dtype>/]`: the model's folder, then the dtype's unless float32."""
        from fdlib.model.loading import DEFAULT_MODEL

        base = self.root / top
        base = base if self.model == DEFAULT_MODEL else base / model_slug(self.model)
        return base / self.dtype if by_dtype and self.dtype != BASE_DTYPE else base

    @property
    def results(self) -> Path:
        """The committed results folder of this model and dtype."""
        return self._under("results")

    @property
    def runs(self) -> Path:
        """This model's and dtype's working stores (not committed)."""
        return self._under("runs")

    @property
    def committed_figures(self) -> Path:
        """The gallery's folder for this model (its float32 figures); the committed directions
        files, which a run in any dtype applies, are in its `data/`."""
        return self._under("figures", by_dtype=False)

    @property
    def figures(self) -> Path:
        """Where this run writes figures and findings: the gallery only at `paper`, unsharded (in a
        folder of its own for a dtype other than float32)."""
        if self.size == PAPER and not self.sharded:
            return self._under("figures")
        tag = f"{self.size}-shard-{self.shard[0]}-of-{self.shard[1]}" if self.sharded else str(self.size)
        return self.runs / "figures" / tag

    def store(self, name: str) -> Path:
        """The store of study `name` (e.g. `"02_split_softmax"`) for this size."""
        if not re.fullmatch(r"\d\d_[a-z0-9_]+", name):
            raise ValueError(f"a study name looks like '02_split_softmax', got {name!r}")
        if self.rendering:
            return self.committed(name)
        if self.size == PAPER:
            suffix = f".shard-{self.shard[0]}-of-{self.shard[1]}" if self.sharded else ""
            return self.runs / PAPER / f"{name}{suffix}.sqlite"
        return self.runs / f"{name}_{self.size}.sqlite"

    def input(self, name: str) -> Path:
        """The store of an earlier notebook's study read as an input (the head ranking): as
        `store`, but never a shard's (a sharded stage runs after the merge of the one before)."""
        return replace(self, shard=(0, 1)).store(name)

    def committed(self, name: str, *, kept: bool = False) -> Path:
        """The committed results file of study `name`: store rows (`.jsonl.gz`) or, for a
        `keep` result, its JSON."""
        return self.results / (f"{name}.json" if kept else f"{name}{RESULTS_SUFFIX}")

    def kept_file(self, name: str) -> Path:
        """Where `keep` reads and writes `name`: the committed JSON when rendering, else one
        working copy for all shards of a run."""
        return self.committed(name, kept=True) if self.rendering else self.input(name).with_suffix(".json")

    def keep(self, name: str, compute: Callable[[], dict[str, Any]], *, setup: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A study result that is not store rows (a JSON-able dict, e.g. the retrieval heads):
        read from the committed `results/<name>.json` when rendering, else computed once per size
        into `runs/` and reused (a `paper` run's copy is what `export` commits). With `setup`, the
        dict's "setup" must equal it: a kept result made under another setup is recomputed, or
        refused when rendering. Deterministic computations only: every shard of a sharded run
        may compute it."""
        path = self.kept_file(name)
        if path.exists():
            value = json.loads(path.read_text(encoding="utf-8"))
            got = value.get("setup", {})
            diff = sorted(k for k in set(got) | set(setup) if got.get(k) != setup.get(k)) if setup is not None else []
            if not diff:
                return value
            if self.rendering:
                raise ValueError(f"{path} was made with other {', '.join(diff)}: recompute it with `./dev figures paper`")
        elif self.rendering:
            raise FileNotFoundError(f"no committed results at {path}: compute them with `./dev figures paper`")
        value = compute()
        if setup is not None and value.get("setup") != dict(setup):
            raise ValueError(f"{name}: the computed result does not hold the setup it was asked for")
        text = json.dumps(value, sort_keys=True, indent=0)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        return value
