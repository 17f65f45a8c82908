"""Scoring speed and memory, measured side by side in one run on the same samples.

    python benchmarks/bench_scoring.py [--samples 3] [--n-docs 20] [--long-docs 62]

Prints three ratios (lower is better for fdlib):
  1. fdlib's greedy answer + every head's span scores (the batched engine, as every study runs
     it, one row)  vs  plain transformers sdpa `generate`
     of the same answer                                             (target <= 1.25)
  2. the same  vs  the authors' method: generate, then re-run prompt + response with eager
     attention and `output_attentions=True`                         (target <= 0.33)
  3. peak extra memory of fdlib's scoring at ~8k tokens  vs  one plain sdpa forward of the prompt
It also checks that every way gives the same answer and the same scores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time

import torch

import fdlib
from fdlib.interventions.engine import decode_batch
from fdlib.interventions.row import RowIntervention
from fdlib.model.decoding import prefill
from fdlib.model.loading import converted_checkpoint


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def authors_scores(eager, ids, prompt_len, spans):
    """Re-run prompt + response with every attention pattern materialised, then slice rows."""
    with torch.no_grad():
        attn = eager(ids[None], output_attentions=True).attentions
    return {n: torch.stack([a[0, :, prompt_len:, s.slice].sum(-1).mean(-1) for a in attn]) for n, s in spans.items()}


def speed(args) -> None:
    from transformers import AutoModelForCausalLM

    model = fdlib.load_model()
    path = converted_checkpoint(fdlib.DEFAULT_MODEL)
    sdpa = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    eager = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    samples = fdlib.NQBuilder(model.tokenizer).samples(split="test", size=args.samples, n_docs=args.n_docs)
    t_fd = t_gen = t_auth = 0.0
    worst = 0.0
    for s in samples:
        spans = s.named_spans()
        # the path every study takes (run_study -> the batched engine), here with one row
        ans, dt = timed(lambda: decode_batch(model, prefill(model, s.input_ids), [RowIntervention()], spans=spans,
                                             max_new_tokens=32)[0])
        t_fd += dt
        # generate the answer plus the token that stopped it, as fdlib's decode does
        mask = torch.ones(1, s.n_tokens, dtype=torch.long)
        with torch.no_grad():
            gen, dt = timed(
                lambda: sdpa.generate(s.input_ids[None], attention_mask=mask, max_new_tokens=len(ans.tokens) + 1, do_sample=False)
            )
        t_gen += dt
        got = gen[0, s.n_tokens : s.n_tokens + len(ans.tokens)].tolist()
        if got != ans.tokens:
            raise SystemExit(f"{s.id}: answers differ: fdlib {ans.tokens} vs transformers {got}")
        ids = gen[0, : s.n_tokens + len(ans.tokens)]
        ref, dt = timed(lambda: authors_scores(eager, ids, s.n_tokens, spans))
        t_auth += dt
        worst = max(worst, max((ref[n] - ans.scores[n]).abs().max().item() for n in spans))
        print(f"  {s.id}: {s.n_tokens} prompt tokens, {len(ans.tokens)} answer tokens: {ans.text!r}", flush=True)
    t_auth += t_gen  # the authors' method generates first, then re-runs
    print(f"{len(samples)} samples x {args.n_docs} documents; same answers everywhere; "
          f"max |score difference| vs output_attentions re-run = {worst:.2e}")
    print(f"ratio 1  fdlib answer+scores / transformers sdpa generate = {t_fd / t_gen:.2f}  "
          f"({t_fd:.1f} s vs {t_gen:.1f} s; target <= 1.25)")
    print(f"ratio 2  fdlib answer+scores / authors' generate + output_attentions re-run = {t_fd / t_auth:.2f}  "
          f"({t_fd:.1f} s vs {t_auth:.1f} s; target <= 0.33)")
    return {"samples": len(samples), "n_docs": args.n_docs, "max_score_difference": worst,
            "ratio_vs_sdpa_generate": t_fd / t_gen, "ratio_vs_authors": t_fd / t_auth}


def _peak_rss_during(fn) -> tuple[float, float]:
    """(peak RSS above the level just before fn, in MB; seconds): sampled every 5 ms."""
    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = base
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, dt = timed(fn)
    done.set()
    t.join()
    return (max(peak, proc.memory_info().rss) - base) / 2**20, dt


def memory_child(which: str, n_docs: int) -> None:
    """One measurement per process, so neither path inherits the other's allocator state."""
    model = fdlib.load_model()
    s = fdlib.NQBuilder(model.tokenizer).samples(split="test", size=1, n_docs=n_docs)[0]
    if which == "sdpa":
        twin = fdlib.model.loading.fast_prefill_model(model)
        with torch.inference_mode():
            mb, dt = _peak_rss_during(lambda: twin(s.input_ids[None], use_cache=True, logits_to_keep=1))
    else:
        mb, dt = _peak_rss_during(lambda: fdlib.score_sample(model, s, max_new_tokens=8))
    print(f"{s.n_tokens} {mb:.1f} {dt:.1f}")


def memory(args) -> None:
    out = {}
    for which in ("sdpa", "fdlib"):
        res = subprocess.run(
            [sys.executable, __file__, "--memory-child", which, "--long-docs", str(args.long_docs)],
            capture_output=True, text=True, check=True,
        )
        n_tok, mb, dt = res.stdout.split()[-3:]
        out[which] = (int(n_tok), float(mb), float(dt))
    (n, a, ta), (_, b, tb) = out["fdlib"], out["sdpa"]
    print(f"ratio 3  peak extra memory, fdlib answer+scores / plain sdpa forward at {n} tokens = {a / b:.2f}  "
          f"({a:.0f} MB vs {b:.0f} MB above the loaded model; {ta:.0f} s vs {tb:.0f} s)")
    return {"memory_tokens": n, "memory_ratio": a / b, "memory_mb_fdlib": a, "memory_mb_sdpa": b}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--n-docs", type=int, default=20)
    ap.add_argument("--long-docs", type=int, default=62, help="documents in the ~8k-token prompt")
    ap.add_argument("--memory-child", choices=["sdpa", "fdlib"])
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--out", help="write the ratios as JSON here")
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.long_docs)
        return
    res = speed(args)
    if not args.skip_memory:
        res.update(memory(args))
    if args.out:
        import json
        from pathlib import Path

        res["command"] = "python benchmarks/bench_scoring.py " + " ".join(sys.argv[1:])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
