"""What bench_sweep.py and bench_scoring.py share to measure float32 and bfloat16 side by side: the
`--dtype` option, the matmul throughput a dtype reaches here (the compute floor), the process's
peak memory from a point on, the table that prints one line per figure with a column per dtype,
and the JSON record."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fdlib.model.loading import dtype_name, resolve_dtype

DTYPES = ("float32", "bfloat16")  # the dtypes the benchmarks measure, in the order they are run and printed
SHORT = {"float32": "fp32", "bfloat16": "bf16"}


def _dtype_list(value: str) -> list[str]:
    names = []
    for part in filter(None, (p.strip() for p in value.split(","))):
        try:
            name = dtype_name(resolve_dtype(part))
        except ValueError:
            name = part
        if name not in DTYPES:
            raise argparse.ArgumentTypeError(f"{part!r}: expected one of {', '.join(DTYPES)}")
        names.append(name)
    return names


def add_dtype_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--dtype", action="append", type=_dtype_list, metavar="DTYPE",
                    help="float32, bfloat16 (repeat it or give a comma list; default: both, side by side)")


def add_threads_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own choice); passed on to the memory processes")


def set_threads(args: argparse.Namespace) -> list[str]:
    """Apply `--threads`; the arguments that give a child process the same thread count."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return ["--threads", str(torch.get_num_threads())]


def chosen_dtypes(args: argparse.Namespace) -> list[str]:
    """The dtypes `--dtype` names, in the order of DTYPES (default: all of them)."""
    given = {n for names in (args.dtype or [list(DTYPES)]) for n in names}
    return [n for n in DTYPES if n in given]


def matmul_gflops(dtype: str | torch.dtype, shape: tuple[int, int, int] = (2400, 576, 1536), seconds: float = 1.0) -> float:
    """The best throughput (GFLOP/s) of an [m x k] x [k x n] matmul in `dtype` with this process's
    torch threads: the best of repeated runs over about `seconds` after a warm-up. The default
    shape is a prompt's worth of SmolLM2's MLP up-projection (d_model 576, d_mlp 1536)."""
    m, k, n = shape
    dtype = resolve_dtype(dtype)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen).to(dtype), torch.randn(k, n, generator=gen).to(dtype)
    with torch.inference_mode():
        a @ b
        best, spent, reps = float("inf"), 0.0, 0
        while spent < seconds or reps < 5:
            start = time.perf_counter()
            a @ b
            dt = time.perf_counter() - start
            best, spent, reps = min(best, dt), spent + dt, reps + 1
    return 2 * m * k * n / best / 1e9


def vm_hwm() -> int:
    """The process's high-water mark of resident memory (VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def reset_hwm() -> int:
    """Reset VmHWM to the memory resident now (Linux's clear_refs "5"), so that it measures what
    comes after (a bfloat16 load peaks well above the model it leaves: the float32 checkpoint is
    read while the bfloat16 copy is made); returns the high-water mark up to now, in bytes."""
    before = vm_hwm()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return before


def ratio(values: Mapping[str, Mapping[str, Any]], key: str, num: str = "bfloat16", den: str = "float32") -> float | None:
    """values[num][key] / values[den][key], None where either is missing."""
    a, b = values.get(num, {}).get(key), values.get(den, {}).get(key)
    return a / b if a is not None and b else None


def fmt(value: Any, spec: str = ".2f", unit: str = "") -> str:
    """A figure for the table; "-" where it was not measured."""
    if value is None:
        return "-"
    return f"{value:{spec}}{unit}" if not isinstance(value, str) else value


@dataclass
class Line:
    """One figure of the table: its value per dtype (formatted), a cross-dtype figure (usually
    bfloat16 over float32) and the target."""

    figure: str
    values: Mapping[str, str] = field(default_factory=dict)
    across: str = ""
    target: str = ""


def table(lines: Sequence[Line], dtypes: Sequence[str], across: str = "bf16 / fp32") -> str:
    """A Markdown table, one line per figure, a column per dtype; the cross-dtype column only when
    more than one dtype was measured."""
    head = ["figure", *dtypes] + ([across] if len(dtypes) > 1 else []) + ["target"]
    rows = [[ln.figure, *(ln.values.get(d, "") for d in dtypes)] + ([ln.across] if len(dtypes) > 1 else []) + [ln.target]
            for ln in lines]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in [head, ["-" * w for w in widths], *rows]]
    return "\n".join(out)


def write_json(path: str | None, script: str, res: dict) -> dict:
    """The figures with the command line and torch's thread count; written to `path` if given."""
    res = {"command": f"python benchmarks/{script} " + " ".join(sys.argv[1:]), "torch_threads": torch.get_num_threads(), **res}
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(res, indent=1) + "\n")
    return res
