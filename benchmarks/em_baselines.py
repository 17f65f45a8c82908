"""Greedy EM of the default model on test questions: gold-only, 10-document and 20-document
inputs (gold in the middle), with bootstrap CIs and the contextual-head counts of the 20-doc run.

    python benchmarks/em_baselines.py --n 100 --store runs/em.sqlite

Resumable: rerunning with the same store skips finished samples.
"""

from __future__ import annotations

import argparse

import fdlib
from fdlib.experiments.contextual import scored
from fdlib.study.scores import em_summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--store", default="runs/em.sqlite")
    ap.add_argument("--model", default=fdlib.DEFAULT_MODEL)
    args = ap.parse_args()
    model = fdlib.load_model(args.model)
    builder = fdlib.NQBuilder(model.tokenizer)
    settings = [("gold-only", dict(variant="gold")), ("10 docs, gold 5", dict(n_docs=10)), ("20 docs, gold 10", dict(n_docs=20))]
    for label, kw in settings:
        samples = builder.samples(split="test", size=args.n, **kw)
        frame = fdlib.run_study(model, samples, [fdlib.Condition.baseline(samples[0].variant)], store=args.store)
        results = scored(model, frame, samples)
        s = em_summary(results)
        n_tok = sum(x.n_tokens for x in samples) / len(samples)
        print(f"{label:>18}: EM {s['em']:.3f} [{s['lo']:.3f}, {s['hi']:.3f}] n={s['n']} mean prompt {n_tok:.0f} tokens", flush=True)
        if kw.get("n_docs") == 20:
            rel = fdlib.mean_scores(results, "relevant")
            print("    heads above thresholds (mean relevant score):", fdlib.heads_above(rel))
            print("    top-5:", [fdlib.head_label(*h) for h in fdlib.top_heads(rel, 5)])


if __name__ == "__main__":
    main()
