"""fdlib's one command line: `python -m fdlib <command>`.

    python -m fdlib train --training-set gold --out dirs.safetensors   # focus directions on NQ
    python -m fdlib sweep --size paper --shard 3 8                     # a split-softmax sweep
    python -m fdlib paper status|run|merge|export [--only 02 07]       # the paper-size run
    python -m fdlib reproduce [--size quick]                           # render notebooks + README

Every command takes `--dtype float32|bfloat16|float16`, the dtype the model computes in (default
float32; `paper` and `reproduce`: `FDLIB_DTYPE`, else float32). Rows, stores, results and figures
of another dtype than float32 are kept apart from float32's (`fdlib.runs.workspace`).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]  # the checkout: notebooks/, results/, figures/


def _dtype_arg(ap: argparse.ArgumentParser, *, from_env: bool = False) -> None:
    from fdlib.model.loading import DTYPES

    ap.add_argument("--dtype", choices=list(DTYPES), default=None if from_env else "float32",
                    help="the dtype the model computes in (default: " + ("FDLIB_DTYPE, else " if from_env else "")
                         + "float32)")


def _runs_file(given: str | None, name: str, dtype: str) -> str:
    """A working store named on the command line, or `runs/[<dtype>/]<name>`: rows of a dtype other
    than float32 go to a store of their own."""
    from fdlib.core.store import BASE_DTYPE

    if given is not None:
        return given
    return str(Path("runs") / name if dtype == BASE_DTYPE else Path("runs") / dtype / name)


def _train_args(ap: argparse.ArgumentParser) -> None:
    from fdlib.interventions.directions import TRAINING_SETS
    from fdlib.interventions.training import LOSSES
    from fdlib.model.loading import DEFAULT_MODEL

    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--training-set", choices=list(TRAINING_SETS), default="gold")
    ap.add_argument("--placement", choices=["post_rope", "pre_rope"], default="post_rope")
    ap.add_argument("--size", default="quick", help="'quick', 'full' or a number of training questions")
    ap.add_argument("--top", type=int, help="train only the top-N contextual heads (default: every head)")
    ap.add_argument("--random", type=int, default=0, metavar="K",
                    help="with --top, also train the K random heads of --random-seed (their control's heads)")
    ap.add_argument("--random-seed", type=int, default=0)
    ap.add_argument("--positions", type=int, nargs="+",
                    help="gold positions of the 'positions' set (default: the authors' 1 5 10 15 20)")
    ap.add_argument("--max-new-tokens", type=int,
                    help="R_g's budget (default: 100 for 'positions', the authors'; 32 for the other sets)")
    ap.add_argument("--init-std", type=float,
                    help="initial directions ~ N(0, std^2) (default: 0.01 for 'positions', the authors'; else 0)")
    ap.add_argument("--heads-size", default="quick", help="size of the train-split study ranking the heads (with --top)")
    ap.add_argument("--heads-store", help="default: runs/[<dtype>/]contextual.sqlite")
    ap.add_argument("--heads-from", help="rank by the long-input rows stored in this store or results file, in "
                    "whatever dtype they were made (e.g. results/01_contextual.jsonl.gz), instead of --heads-store")
    ap.add_argument("--cache", help="activation cache root (default: <fdlib cache>/activations)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--loss", choices=list(LOSSES), default="relevant",
                    help="relevant: -S_C (the paper's); contrast: -(S_C - S_IRmax), k-document training sets only")
    ap.add_argument("--max-norm", type=float, help="bound each head's |d_Q| and |d_K| (default: none)")
    ap.add_argument("--out", help="where to write the .safetensors file (required unless --cache-only)")
    ap.add_argument("--cache-only", action="store_true", help="build the activation cache (resumable) and stop")
    ap.add_argument("--shard", default="0/1", help="with --cache-only, i/n: this process's share of the questions")
    ap.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    _dtype_arg(ap)


def train(args: argparse.Namespace) -> None:
    """Train one set of directions on the NQ training split and save it (or only build its
    activation cache, a share of it with --shard)."""
    import torch

    from fdlib.core.heads import random_heads
    from fdlib.data.nq import parse_size
    from fdlib.experiments.contextual import committed_ranking, contextual_study
    from fdlib.interventions.training import cache_nq_activations, train_nq_directions
    from fdlib.model.loading import load_model
    from fdlib.runs.workspace import parse_shard

    if not args.cache_only and not args.out:
        raise SystemExit("--out is required (or --cache-only)")
    shard = parse_shard(args.shard)
    if shard != (0, 1) and not args.cache_only:
        raise SystemExit("--shard splits the cache build: give --cache-only, then train unsharded")
    if args.random and not args.top:
        raise SystemExit("--random adds random heads to the --top heads: give --top too")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype=args.dtype)
    heads = None
    if args.top:
        if args.heads_from:
            heads = committed_ranking(model, args.heads_from, size=parse_size(args.heads_size))[0][: args.top]
        else:
            study = contextual_study(model, size=parse_size(args.heads_size), split="train",
                                     store=_runs_file(args.heads_store, "contextual.sqlite", args.dtype))
            heads = study.heads(args.top)
        if args.random:
            heads = list(dict.fromkeys(heads + random_heads(model.cfg.n_layers, model.cfg.n_heads, args.random,
                                                            args.random_seed)))
    extra = {k: v for k, v in (("positions", args.positions), ("max_new_tokens", args.max_new_tokens),
                               ("init_std", args.init_std)) if v is not None}
    if args.cache_only:
        extra.pop("init_std", None)
        cache, examples = cache_nq_activations(model, training_set=args.training_set, size=parse_size(args.size),
                                               heads=heads, root=args.cache, shard=shard, **extra)
        print(f"{len(examples)} examples in {cache.dir} ({sum(e.path.stat().st_size for e in examples) / 2**20:.0f} MiB)")
        return
    result = train_nq_directions(model, training_set=args.training_set, placement=args.placement,
                                 size=parse_size(args.size), heads=heads, root=args.cache, lr=args.lr,
                                 epochs=args.epochs, seed=args.seed, loss=args.loss, max_norm=args.max_norm, **extra)
    result.directions.save(args.out)


def _sweep_args(ap: argparse.ArgumentParser) -> None:
    from fdlib.model.loading import DEFAULT_MODEL

    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--size", choices=["quick", "paper", "full"], default="quick", help="grid and question count")
    ap.add_argument("--questions", type=int, help="number of test questions (overrides --size)")
    ap.add_argument("--skip", type=int, default=0, help="leave out the first N test questions")
    ap.add_argument("--taus", type=float, nargs="+")
    ap.add_argument("--ks", type=int, nargs="+")
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--heads-size", default="quick", help="size of the train-split study ranking the heads")
    ap.add_argument("--heads-store", help="default: runs/[<dtype>/]contextual.sqlite")
    ap.add_argument("--store", help="default: runs/[<dtype>/]sweep.sqlite")
    ap.add_argument("--shard", type=int, nargs=2, default=(0, 1), metavar=("I", "N"))
    ap.add_argument("--batch-size", type=int, default=32, help="conditions decoded together over one prompt cache")
    _dtype_arg(ap)


def sweep(args: argparse.Namespace) -> None:
    """One split-softmax sweep (or one shard of it) into a store; see the README's SLURM example."""
    from fdlib.data.nq import parse_size
    from fdlib.experiments.contextual import contextual_study
    from fdlib.experiments.sweeps import question_inputs, split_grid, sweep_samples
    from fdlib.model.loading import load_model
    from fdlib.study.runner import run_study

    model = load_model(args.model, dtype=args.dtype)
    study = contextual_study(model, size=parse_size(args.heads_size), split="train",
                             store=_runs_file(args.heads_store, "contextual.sqlite", args.dtype))
    n_total = model.cfg.n_layers * model.cfg.n_heads
    count = args.questions if args.questions is not None else args.size
    if isinstance(count, int):
        count += args.skip
    questions = question_inputs(model, split="test", size=count)[args.skip :]
    configs = split_grid(args.size, n_total_heads=n_total, taus=args.taus, ks=args.ks, seeds=args.seeds)
    run_study(model, sweep_samples(questions, configs), configs, heads={"contextual": study.heads(n_total)},
              store=_runs_file(args.store, "sweep.sqlite", args.dtype), shard=tuple(args.shard),
              batch_size=args.batch_size,
              desc=f"sweep shard {args.shard[0]}/{args.shard[1]}")


def _paper_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("action", choices=["status", "run", "merge", "export"])
    ap.add_argument("--only", nargs="*", help="notebook prefixes, e.g. 02 07 (default: all, in order)")
    ap.add_argument("--shard", default="0/1", help="i/n: this job's share of every study's questions")
    ap.add_argument("--model", help="default: FDLIB_MODEL or the default model")
    _dtype_arg(ap, from_env=True)
    ap.add_argument("--root", default=str(ROOT))
    ap.add_argument("--threads", type=int, help="torch threads per notebook (default: all cores; give each job of a "
                                                "shared machine its share)")
    ap.add_argument("--from-results", action="store_true",
                    help="run: start every missing working store from its committed results (continue a "
                         "committed run; the inputs from earlier notebooks included)")


def paper(args: argparse.Namespace) -> None:
    """The paper-size run: status, run (resumes, then exports), merge (shards), export."""
    from fdlib.runs import paper as run
    from fdlib.runs.workspace import notebook_dtype, parse_shard

    # a SIGTERM (a cluster's time limit, `kill`) unwinds like Ctrl-C, so a running notebook stops too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = Path(args.root)
    given = args.dtype or os.environ.get("FDLIB_DTYPE")
    ws = run.workspace(args.model or os.environ.get("FDLIB_MODEL"), root, parse_shard(args.shard), given)
    chosen = run.chosen(args.only)
    # without a dtype given, each notebook runs, merges and exports in its own (`notebook_dtype`)
    in_own = lambda nb: ws if given else ws.in_dtype(notebook_dtype(nb))  # noqa: E731
    if args.action == "status":
        print(run.format_status([s for w in dict.fromkeys(in_own(nb) for nb in chosen) for s in run.study_status(w)
                                 if s["notebook"] in chosen and in_own(s["notebook"]) == w]))
    elif args.action == "merge":
        print("\n".join(str(p) for nb in chosen for p in run.merge(in_own(nb), [nb])) or "no shard stores")
    elif args.action == "export":
        print("\n".join(str(p) for nb in chosen for p in run.export(in_own(nb), [nb])))
    else:
        if args.from_results:
            for p in run.seed_from_results(ws):
                print(f"started {p} from the committed results", flush=True)
        print(f"paper-size run of {ws.model} in {ws.dtype}; stores in {ws.runs / run.PAPER}. Where it stands:",
              flush=True)
        print(run.format_status(run.study_status(ws)), flush=True)
        for nb in chosen:
            print(f"\n== {nb} ({in_own(nb).dtype}) ==", flush=True)
            seconds = run.run_notebook(root / "notebooks" / f"{nb}.ipynb", in_own(nb), args.threads)
            print(f"{nb}: {run.hms(seconds)}", flush=True)
            if not ws.sharded:
                run.export(in_own(nb), [nb])
        print(run.format_status(run.study_status(ws)), flush=True)


def _reproduce_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--size", default="paper", help="paper (default: render the committed results), quick, full, or a count")
    ap.add_argument("--notebooks", default=str(ROOT / "notebooks"))
    _dtype_arg(ap, from_env=True)
    ap.add_argument("notebook", nargs="*", help="only these notebooks (default: all, in name order)")


def reproduce(args: argparse.Namespace) -> None:
    """Run the notebooks top to bottom so each writes its figures; at `paper`, render the README."""
    from fdlib.runs.reproduce import reproduce as render

    render(Path(args.notebooks), args.size, [Path(p) for p in args.notebook], dtype=args.dtype)


COMMANDS = {
    "train": (train, _train_args),
    "sweep": (sweep, _sweep_args),
    "paper": (paper, _paper_args),
    "reproduce": (reproduce, _reproduce_args),
}


def parser() -> argparse.ArgumentParser:
    from fdlib.runs import paper as paper_run
    from fdlib.runs import reproduce as reproduce_run

    descriptions = {"paper": paper_run.__doc__, "reproduce": reproduce_run.__doc__}
    ap = argparse.ArgumentParser(prog="python -m fdlib", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="command")
    for name, (run, add_args) in COMMANDS.items():
        p = sub.add_parser(name, help=run.__doc__.splitlines()[0], description=descriptions.get(name, run.__doc__),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_args(p)
        p.set_defaults(run=run)
    return ap


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
