"""Sweep speed: N split-softmax configurations per 20-document sample, measured side by side.

    python benchmarks/bench_sweep.py [--samples 2] [--configs 10]

Three ways, same samples, same configurations, checked to give identical answers:
  A. fdlib: one fast prefill per sample, every configuration decoded from the shared cache;
  B. what a TransformerLens user does without fdlib: per configuration, the full prompt through
     the bridge (eager attention) with the hooks on, then greedy decoding;
  C. fdlib's fast path re-run per configuration (fast prefill + decode, no sharing).
Prints B/A (target >= 10 at N = 10) and C/A, and the ratio projected to larger N from the
measured per-configuration costs (the gap grows with N because A pays one prefill per sample).
"""

from __future__ import annotations

import argparse
import time

import fdlib
from fdlib.decoding import decode, prefill
from fdlib.interventions import split_softmax
from fdlib.sweeps import SweepConfig


def answer(model, sample, prefix, heads, tau):
    with split_softmax(model, heads, sample.gold_span, tau, from_pos=sample.n_tokens - 1):
        return decode(model, prefix, max_new_tokens=32).tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--configs", type=int, default=10)
    args = ap.parse_args()
    model = fdlib.load_model()
    samples = fdlib.NQBuilder(model.tokenizer).samples(split="test", size=args.samples, n_docs=20)
    # heads ranked on the first sample (any fixed ranking serves a timing benchmark)
    ranked = fdlib.top_heads(fdlib.score_sample(model, samples[0]).kinds["relevant"], 50)
    taus, ks = (0.1, 0.3, 0.6, 1.5, 1000.0), (5, 20, 1, 10, 50)
    configs = [SweepConfig(tau=t, heads="contextual", k=k) for k in ks for t in taus][: args.configs]
    t = {"A": 0.0, "B": 0.0, "C": 0.0, "prefill_A": 0.0}
    for s in samples:
        start = time.perf_counter()
        shared = prefill(model, s.input_ids)
        t["prefill_A"] += time.perf_counter() - start
        for c in configs:
            heads = ranked[: c.k]
            t0 = time.perf_counter()
            a = answer(model, s, shared, heads, c.tau)
            t1 = time.perf_counter()
            with split_softmax(model, heads, s.gold_span, c.tau, from_pos=s.n_tokens - 1):
                b = decode(model, prefill(model, s.input_ids, fast=False), max_new_tokens=32).tokens
            t2 = time.perf_counter()
            cc = answer(model, s, prefill(model, s.input_ids), heads, c.tau)
            t3 = time.perf_counter()
            t["A"] += t1 - t0
            t["B"] += t2 - t1
            t["C"] += t3 - t2
            if not a == b == cc:
                raise SystemExit(f"{s.id} {c.key}: answers differ: {a} / {b} / {cc}")
        print(f"  {s.id}: {s.n_tokens} tokens, {len(configs)} configurations, same answers three ways", flush=True)
    A = t["A"] + t["prefill_A"]
    n_s, n_c = len(samples), len(configs)
    print(f"N = {n_c} configurations x {n_s} samples: A (fdlib shared prefill) {A:.1f} s, "
          f"B (bridge, full prompt per configuration) {t['B']:.1f} s, C (fast path, no sharing) {t['C']:.1f} s")
    print(f"ratio B/A = {t['B'] / A:.1f}x  (target >= 10 at N = 10)")
    print(f"ratio C/A = {t['C'] / A:.1f}x")
    p, d, b = t["prefill_A"] / n_s, t["A"] / (n_s * n_c), t["B"] / (n_s * n_c)
    proj = ", ".join(f"N={n}: {n * b / (p + n * d):.1f}x" for n in (10, 20, 50, 100))
    print(f"B/A projected from per-configuration costs (prefill {p:.1f} s, shared decode {d:.2f} s, "
          f"bridge configuration {b:.1f} s): {proj}")


if __name__ == "__main__":
    main()
