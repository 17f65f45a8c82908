"""The long-context studies of notebooks 04-05 at a chosen size, printed as tables (issue 7):

- `tasks`: focus directions on the HELMET-style tasks (the paper's Table 2) and the top-5
  contextual heads' sink scores per task and length with their spread (Tables 12-13);
- `lost`: EM vs the gold document's position (1, 5, 10, 15, 20 of 20), without intervention,
  with split-softmax and with focus directions, and the top-5 heads' gold-document score;
- `retrieval`: retrieval heads (Wu et al.) vs contextual heads: overlap of the top-k lists, and NQ
  EM when each set (or a random one) is boosted or ablated.

    python benchmarks/longctx_study.py --size full                     # 2k, 4k, 8k; the full counts
    python benchmarks/longctx_study.py --study tasks --lengths 2048 4096 --samples 5
    python benchmarks/longctx_study.py --study tasks --lengths 2048 4096 8192 --samples 20 10 5
    python benchmarks/longctx_study.py --study lost retrieval --questions 20

Resumable: each study writes to its own store under --runs (named by size), and a rerun skips
every stored result. On a 2-core CPU the full task study at 8k tokens takes many hours.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

import fdlib
from fdlib.data.tasks import TASKS
from fdlib.experiments import longctx, retrieval
from fdlib.interventions.directions import FocusDirections
from fdlib.interventions.training import train_nq_directions


def _size(text: str) -> str | int:
    return int(text) if text.isdigit() else text


def _print(title: str, table: pd.DataFrame | str) -> None:
    print(f"\n== {title}\n{table if isinstance(table, str) else table.to_string()}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=fdlib.DEFAULT_MODEL)
    ap.add_argument("--size", choices=["quick", "full"], default="full", help="default counts and lengths")
    ap.add_argument("--study", nargs="+", choices=["tasks", "lost", "retrieval"], default=["tasks", "lost", "retrieval"])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--lengths", nargs="+", type=int, help="prompt + answer budgets (default: the size's)")
    ap.add_argument("--samples", type=int, nargs="+",
                    help="samples per task and length: one count, or one per length (default: the size's)")
    ap.add_argument("--questions", type=int, help="NQ questions per gold position (lost) and for boost/ablate")
    ap.add_argument("--needles", type=int, help="needle samples ranking the retrieval heads")
    ap.add_argument("--boost-docs", type=int, nargs="+", default=[20, 1],
                    help="documents per NQ prompt for boost/ablate (1 = gold only, where the baseline is not ~0)")
    ap.add_argument("--k", type=int, default=20, help="size of the retrieval / contextual / random head sets")
    ap.add_argument("--heads-size", default="quick", help="size of the train-split study ranking the contextual heads")
    ap.add_argument("--heads-store", help="its store (default: runs/01_contextual_<heads-size>.sqlite)")
    ap.add_argument("--directions", default="figures/data/directions_gold_post_rope.safetensors",
                    help="focus directions (trained here at --heads-size when the file is absent)")
    ap.add_argument("--runs", default="runs", help="where the studies' stores go")
    args = ap.parse_args()

    start = time.perf_counter()
    model = fdlib.load_model(args.model)
    runs = Path(args.runs)
    heads_size = _size(args.heads_size)
    heads_store = args.heads_store or runs / f"01_contextual_{args.heads_size}.sqlite"
    study = fdlib.contextual_study(model, size=heads_size, split="train", n_docs=20, store=heads_store)
    ranked = study.heads(max(max(longctx.KS), args.k))
    print("top-5 contextual heads:", [fdlib.head_label(*h) for h in ranked[: longctx.SINK_K]], flush=True)
    needs_directions = {"tasks", "lost"} & set(args.study)
    directions = None
    if needs_directions:
        path = Path(args.directions)
        directions = (FocusDirections.load(path, model=model) if path.exists()
                      else train_nq_directions(model, size=heads_size).directions)
        print("directions:", path if path.exists() else f"trained at size {args.heads_size}", flush=True)
    # One store per study and size: rows are keyed by sample and condition and each table keeps
    # this run's samples only, so other counts or lengths share it (another head ranking is refused).
    tag = args.size
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", None)

    if "tasks" in args.study:
        lengths = args.lengths or longctx.LENGTHS[args.size]
        counts = args.samples or [args.size]
        if len(counts) not in (1, len(lengths)):
            ap.error(f"--samples takes one count or one per length ({len(lengths)}), got {len(counts)}")
        counts = counts * len(lengths) if len(counts) == 1 else counts
        suite = [s for length, n in zip(lengths, counts)
                 for s in longctx.task_suite(model, tasks=args.tasks, lengths=[length], size=n)]
        frame = fdlib.run_study(model, suite, longctx.task_conditions(), heads={"contextual": ranked},
                                directions={"focus": directions}, store=runs / f"longctx_tasks_{tag}.sqlite")
        _print("Table 2: mean score [95% bootstrap CI] per task and length", longctx.table2(frame, ci=True))
        signs = longctx.versus_baseline(longctx.table2(frame)).astype(object).replace({1.0: "+", -1.0: "-", 0.0: "="}).fillna("")
        _print("vs baseline (+ better, - worse)", signs)
        sinks = longctx.sink_table(frame, ranked[: longctx.SINK_K])
        _print(f"Sink score of the top-{longctx.SINK_K} contextual heads (no intervention)", sinks.round(4))
        _print("Sink score spread across tasks", longctx.sink_spread(sinks).round(4))

    if "lost" in args.study:
        lost = fdlib.run_study(model, longctx.position_samples(model, size=args.questions or args.size),
                               longctx.lost_conditions(), heads={"contextual": ranked}, directions={"focus": directions},
                               store=runs / f"longctx_lost_{tag}.sqlite")
        _print("Lost in the middle: EM and top-5 relevant score per gold position",
               longctx.position_table(lost, ranked[:5]).round(3))

    if "retrieval" in args.study:
        needles = longctx.needle_samples(model, size=args.needles or args.size)
        found = retrieval.retrieval_heads(model, needles)
        retrieval_top = longctx.positive_top_heads(found.scores, args.k)
        print(f"\nretrieval heads: {found.n_used} of {len(needles)} needle answers recovered; "
              f"{len(retrieval_top)} heads copied at least once", flush=True)
        contextual_top = ranked[: args.k]
        overlap = longctx.head_overlap(retrieval_top, contextual_top)
        scores = {"retrieval": found.scores, "relevant": study.relevant()}
        _print(f"top-{len(retrieval_top)} retrieval heads", longctx.head_scores_table(retrieval_top, scores).round(4))
        _print(f"top-{len(contextual_top)} contextual heads", longctx.head_scores_table(contextual_top, scores).round(4))
        print(f"\noverlap: {overlap.count} heads:", [fdlib.head_label(*h) for h in overlap.both], flush=True)
        k = len(retrieval_top)
        head_sets = {"retrieval": retrieval_top, "contextual": contextual_top[:k]}  # and k random heads (seed 0)
        for n_docs in args.boost_docs:
            samples = longctx.boost_samples(model, size=args.questions or args.size, n_docs=n_docs)
            frame = fdlib.run_study(model, samples, longctx.boost_ablate_conditions(list(head_sets), k=k), heads=head_sets,
                                    store=runs / f"longctx_boost_ablate_{tag}.sqlite")
            _print(f"NQ EM, {n_docs} document(s), boosted (split-softmax tau=0.1) or ablated, k={k}",
                   longctx.condition_table(frame).round(3))
    print(f"\ntotal {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
