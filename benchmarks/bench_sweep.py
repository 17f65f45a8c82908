"""Study speed: the conditions of one 20-document sample decoded as one batch over the shared
prompt cache vs one after another through the bridge's hooks, measured side by side.

    python benchmarks/bench_sweep.py [--samples 2] [--conditions 32] [--questions 200]

Per sample, the same shared prefill, then
  batched:    fdlib.engine.decode_batch, every condition a row, one forward per step;
  sequential: every condition through the TransformerBridge with its hooks (the reference).
Both must give identical answers (checked). Prints: conditions per second (batched / sequential,
target >= 15x); the batched cost per row and step vs the compute floor (FLOPs per token over the
matmul throughput the prefill reaches); peak memory batched / sequential (target <= 1.5x); and
the projected wall time of the paper's Figure 3 grid (5 tau x 10 k x contextual + 3 random seeds,
and 3 baselines) on `--questions` test questions (target <= 1.5 h on the 2-core CPU).
"""

from __future__ import annotations

import argparse
import math
import threading
import time
from pathlib import Path

import torch

import fdlib
from fdlib.conditions import Condition
from fdlib.decoding import prefill
from fdlib.directions import FocusDirections
from fdlib.engine import decode_batch
from fdlib.study import StudySample, row_intervention, decode_sequential

DIRECTIONS = Path(__file__).resolve().parents[1] / "figures" / "data" / "directions_gold_post_rope.safetensors"


def conditions(n: int) -> list[Condition]:
    out = [Condition.baseline()]
    out += [Condition.split(t, "contextual", k) for t in (0.1, 0.3, 0.6, 1.5, 1000.0) for k in (1, 5, 20, 50)]
    out += [Condition.split(0.1, "random", k, seed=0) for k in (5, 20)]
    out += [Condition.focus(a, "gold-post", "contextual", 5) for a in (0.2, 0.5, 1.0)] + [Condition.focus(0.5, "gold-post", "random", 5, seed=0)]
    out += [Condition.ablate("contextual", 5), Condition.ablate("contextual", 20), Condition.ablate("random", 20, seed=0)]
    out += [Condition.reweight("odds", 0.01, "contextual", 20), Condition.reweight("boost", 19, "contextual", 20)]
    return (out * math.ceil(n / len(out)))[:n] if n > len(out) else out[:n]


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def peak_rss(fn):
    """Run fn, sampling the process RSS every 5 ms; returns (result, peak bytes, start bytes)."""
    start, peak, done = _rss(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.005)

    t = threading.Thread(target=watch)
    t.start()
    try:
        out = fn()
    finally:
        done.set()
        t.join()
    return out, max(peak[0], _rss()), start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--conditions", type=int, default=32)
    ap.add_argument("--questions", type=int, default=200, help="questions of the projected Figure 3 grid")
    args = ap.parse_args()
    model = fdlib.load_model()
    dirs = {"gold-post": FocusDirections.load(DIRECTIONS, model=model)}
    samples = fdlib.NQBuilder(model.tokenizer).samples(split="test", size=args.samples, n_docs=20)
    ranked = fdlib.top_heads(fdlib.score_sample(model, samples[0]).kinds["relevant"], 50)
    conds = conditions(args.conditions)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    t = {"prefill": 0.0, "batched": 0.0, "sequential": 0.0}
    mem = {"batched": 0, "sequential": 0}
    row_steps = 0
    prefill_flops = 0.0
    n_params = sum(p.numel() for n, p in fast_params(model))
    for s in samples:
        st = StudySample(s)
        start = time.perf_counter()
        prefix = prefill(model, s.input_ids)
        t["prefill"] += time.perf_counter() - start
        T = s.n_tokens - 1
        prefill_flops += 2 * n_params * T + 2 * L * H * model.cfg.d_head * T * T  # weights + QK^T and PV (causal)
        planned = [(c, c.head_set({"contextual": ranked}, L, H)) for c in conds]
        rows = [row_intervention(c, h, st, dirs) for c, h in planned]
        start = time.perf_counter()
        got, mem_b, base_b = peak_rss(lambda: decode_batch(model, prefix, rows, spans=st.spans(), max_new_tokens=32))
        t["batched"] += time.perf_counter() - start
        start = time.perf_counter()
        ref, mem_s, base_s = peak_rss(lambda: [decode_sequential(model, st, prefix, c, h, directions=dirs, max_new_tokens=32)
                                               for c, h in planned])
        t["sequential"] += time.perf_counter() - start
        mem["batched"] = max(mem["batched"], mem_b)
        mem["sequential"] = max(mem["sequential"], mem_s)
        for (c, _), a, b in zip(planned, got, ref):
            if a.tokens != b.tokens:
                raise SystemExit(f"{s.id} {c.key}: answers differ: batched {a.tokens} vs sequential {b.tokens}")
        row_steps += sum(len(a.tokens) + 1 for a in got)
        print(f"  {s.id}: {s.n_tokens} tokens, {len(conds)} conditions, identical answers batched and sequential "
              f"(answer lengths {min(len(a.tokens) for a in got)}-{max(len(a.tokens) for a in got)})", flush=True)
    n = len(samples) * len(conds)
    cps_b, cps_s = n / t["batched"], n / t["sequential"]
    print(f"1. conditions per second: batched {cps_b:.2f}, sequential {cps_s:.2f}: ratio {cps_b / cps_s:.1f}x (target >= 15x)")
    T = sum(s.n_tokens for s in samples) / len(samples)
    flops_token = 2 * n_params + 4 * L * H * model.cfg.d_head * T
    throughput = prefill_flops / t["prefill"]
    floor = flops_token / throughput
    per = t["batched"] / row_steps
    print(f"2. batched cost per row-step {per * 1e3:.1f} ms vs compute floor {floor * 1e3:.1f} ms "
          f"({flops_token / 1e9:.2f} GFLOP per token at {T:.0f} tokens, {throughput / 1e9:.0f} GFLOP/s measured in the prefill): "
          f"ratio {per / floor:.1f}x")
    print(f"3. peak memory (process RSS): batched {mem['batched'] / 2**20:.0f} MiB, sequential {mem['sequential'] / 2**20:.0f} MiB: "
          f"ratio {mem['batched'] / mem['sequential']:.2f}x (target <= 1.5x)")
    grid = 5 * 10 * 4 - 5 * 3 + 3  # tau x k x (contextual + 3 seeds), no random set at k = all heads, 3 baselines
    per_q = 3 * t["prefill"] / len(samples) + grid * t["batched"] / n
    per_q_seq = 3 * t["prefill"] / len(samples) + grid * t["sequential"] / n
    print(f"4. projected Figure 3 grid ({grid} conditions) on {args.questions} questions: batched "
          f"{per_q * args.questions / 3600:.2f} h, sequential {per_q_seq * args.questions / 3600:.1f} h (target <= 1.5 h; "
          "3 prefills per question counted at the 20-document cost)")


def fast_params(model):
    """The HF model's parameters minus the input embedding (a lookup, no FLOPs)."""
    twin = fdlib.models.fast_prefill_model(model)
    emb = twin.get_input_embeddings().weight
    tied = twin.get_output_embeddings().weight
    out = [(n, p) for n, p in twin.named_parameters() if p is not emb or p is tied]
    if all(p is not tied for _, p in out):
        out.append(("lm_head", tied))
    return out


if __name__ == "__main__":
    main()
