"""Greedy answers in bfloat16 vs the committed float32 ones, on the paper-size test questions of
notebook 02 (20 documents, gold at 10): the baseline and split-softmax tau = 0.1 on the top-20
contextual heads (ranked by notebook 01's committed float32 study).

    python benchmarks/bf16_agreement.py [--questions 200] [--store runs/bfloat16/agreement.sqlite]
                                        [--out benchmarks/results/bf16_agreement.json]

The bfloat16 rows are decoded by `run_study` into `--store` (resumable: a rerun continues) and
exported beside the summary (`<out stem>.jsonl.gz`); the float32 rows are read from
`results/02_split_softmax.jsonl.gz`, decoding nothing. Prints and writes, per condition: EM in
each dtype, the share of questions with the same answer text and with the same EM, and the
questions whose EM changed (float32 -> bfloat16).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import fdlib
from fdlib.core.store import export_results
from fdlib.experiments import sweeps
from fdlib.study.conditions import Condition

ROOT = Path(__file__).resolve().parents[1]
CONDITIONS = [Condition.baseline("long"), Condition.split(0.1, "contextual", 20)]


def compare(f32, b16) -> dict:
    """Per condition: EM in each dtype, agreement shares, and the questions whose EM changed."""
    out = {}
    merged = f32.merge(b16, on=["sample_id", "condition"], suffixes=("_f32", "_b16"))
    for key, rows in merged.groupby("condition"):
        changed = rows[rows.score_f32 != rows.score_b16]
        out[key] = {
            "n": len(rows),
            "em_float32": float(rows.score_f32.mean()),
            "em_bfloat16": float(rows.score_b16.mean()),
            "same_text": float((rows.answer_f32 == rows.answer_b16).mean()),
            "same_em": float((rows.score_f32 == rows.score_b16).mean()),
            "em_changed": {g: f"{a:g} -> {b:g}" for g, a, b in zip(changed.group_f32, changed.score_f32, changed.score_b16)},
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--store", default=str(ROOT / "runs" / "bfloat16" / "agreement.sqlite"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bf16_agreement.json"))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    f32 = fdlib.load_model()
    ranking = fdlib.contextual_study(f32, size="paper", split="train", n_docs=20, store=ROOT / "results" / "01_contextual.jsonl.gz",
                                     progress=False)
    ranked = ranking.heads(f32.cfg.n_layers * f32.cfg.n_heads)
    questions = sweeps.question_inputs(f32, split="test", size="paper", n_docs=20)[: args.questions]
    samples = sweeps.sweep_samples(questions, CONDITIONS)
    frame32 = fdlib.run_study(f32, samples, CONDITIONS, heads={"contextual": ranked},
                              store=ROOT / "results" / "02_split_softmax.jsonl.gz", progress=False)
    del f32
    b16 = fdlib.load_model(dtype=torch.bfloat16)
    Path(args.store).parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    frame16 = fdlib.run_study(b16, samples, CONDITIONS, heads={"contextual": ranked}, store=args.store, desc="bfloat16")
    seconds = time.perf_counter() - start
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "threads": torch.get_num_threads(),
        "questions": len(questions),
        "decode_seconds_this_call": round(seconds, 1),
        "conditions": compare(frame32, frame16),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    export_results(args.store, out.with_suffix("").with_suffix(".jsonl.gz") if out.suffix == ".json" else out.with_suffix(".jsonl.gz"),
                   arrays=False)
    for key, r in result["conditions"].items():
        print(f"{key:36s} n={r['n']}  EM float32 {r['em_float32']:.3f}  bfloat16 {r['em_bfloat16']:.3f}  "
              f"same text {r['same_text']:.1%}  same EM {r['same_em']:.1%}  EM changed: {r['em_changed']}")


if __name__ == "__main__":
    main()
