"""Study speed: the conditions of one 20-document sample decoded as one batch over the shared
prompt cache vs one after another through the bridge's hooks, measured side by side.

    python benchmarks/bench_sweep.py [--samples 2] [--conditions 32] [--questions 200] [--out FILE]

Per sample, the same shared prefill, then
  batched:    fdlib.interventions.engine.decode_batch, every condition a row, one forward per step;
  sequential: every condition through the TransformerBridge with its hooks (the reference).
Both must give identical answers (checked). Prints and writes (`--out`, JSON):
  1. conditions per second, batched / sequential (target >= 15x), one sample at a time and with
     the next sample's rows filling the places of finished ones (`decode_jobs`, two in flight);
  2. the batched cost per row and step vs the compute floor (FLOPs per token over the matmul
     throughput the prefill reaches);
  3. peak memory (the process's high-water mark, each way in a fresh process after the same
     load and prefill), batched / sequential (target <= 1.5x);
  4. the paper's Figure 3 grid (`sweeps.split_grid("full")`: 5 tau x 10 k x contextual + 3 random
     seeds, 3 baselines) run with `run_study` on `--samples` test questions, timed, and projected
     to `--questions` (target <= 1.5 h on the 2-core CPU), one sample in flight and with overlap 1.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import fdlib
from fdlib.experiments import sweeps
from fdlib.interventions.directions import FocusDirections
from fdlib.interventions.engine import Job, decode_batch, decode_jobs
from fdlib.model.decoding import prefill
from fdlib.study.conditions import Condition
from fdlib.study.runner import StudySample, decode_sequential, run_study

DIRECTIONS = Path(__file__).resolve().parents[1] / "figures" / "data" / "directions_gold_post_rope.safetensors"


def conditions(n: int) -> list[Condition]:
    """A mixed set: baseline, split-softmax at 5 tau x 4 k, random heads, focus directions,
    ablation, odds and boost."""
    out = [Condition.baseline()]
    out += [Condition.split(t, "contextual", k) for t in (0.1, 0.3, 0.6, 1.5, 1000.0) for k in (1, 5, 20, 50)]
    out += [Condition.split(0.1, "random", k, seed=0) for k in (5, 20)]
    out += [Condition.focus(a, "gold-post", "contextual", 5) for a in (0.2, 0.5, 1.0)] + [Condition.focus(0.5, "gold-post", "random", 5, seed=0)]
    out += [Condition.ablate("contextual", 5), Condition.ablate("contextual", 20), Condition.ablate("random", 20, seed=0)]
    out += [Condition.reweight("odds", 0.01, "contextual", 20), Condition.reweight("boost", 19, "contextual", 20)]
    return (out * math.ceil(n / len(out)))[:n]


def setup(n_samples: int):
    model = fdlib.load_model()
    dirs = {"gold-post": FocusDirections.load(DIRECTIONS, model=model)}
    samples = fdlib.NQBuilder(model.tokenizer).samples(split="test", size=n_samples, n_docs=20)
    ranked = fdlib.top_heads(fdlib.score_sample(model, samples[0]).kinds["relevant"], model.cfg.n_layers * model.cfg.n_heads)
    return model, dirs, samples, ranked


def planned(model, sample, ranked, dirs, n):
    st = StudySample(sample)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    out = []
    for c in conditions(n):
        heads = c.head_set({"contextual": ranked}, L, H)
        out.append((c, heads, c.row(heads, st.spans(), dirs)))
    return st, out


def peak_memory(phase: str, n: int) -> None:
    """One way (batched or sequential) on one sample in this process; prints VmHWM in bytes."""
    model, dirs, samples, ranked = setup(1)
    st, plan = planned(model, samples[0], ranked, dirs, n)
    prefix = prefill(model, samples[0].input_ids)
    if phase == "batched":
        decode_batch(model, prefix, [r for _, _, r in plan], spans=st.spans(), max_new_tokens=32)
    else:
        for c, heads, _ in plan:
            decode_sequential(model, st, prefix, c, heads, directions=dirs, max_new_tokens=32)
    with open("/proc/self/status") as f:
        print(next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM")))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--conditions", type=int, default=32)
    ap.add_argument("--questions", type=int, default=200, help="questions of the projected Figure 3 grid")
    ap.add_argument("--out", help="write the figures as JSON here")
    ap.add_argument("--memory", choices=["batched", "sequential"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory:
        return peak_memory(args.memory, args.conditions)
    model, dirs, samples, ranked = setup(args.samples)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    t = {"prefill": 0.0, "batched": 0.0, "sequential": 0.0}
    row_steps, prefill_flops = 0, 0.0
    n_params = sum(p.numel() for _, p in compute_params(model))
    for s in samples:
        st, plan = planned(model, s, ranked, dirs, args.conditions)
        start = time.perf_counter()
        prefix = prefill(model, s.input_ids)
        t["prefill"] += time.perf_counter() - start
        T = s.n_tokens - 1
        prefill_flops += 2 * n_params * T + 2 * L * H * model.cfg.d_head * T * T  # weights + QK^T and PV (causal)
        start = time.perf_counter()
        got = decode_batch(model, prefix, [r for _, _, r in plan], spans=st.spans(), max_new_tokens=32)
        t["batched"] += time.perf_counter() - start
        start = time.perf_counter()
        ref = [decode_sequential(model, st, prefix, c, h, directions=dirs, max_new_tokens=32) for c, h, _ in plan]
        t["sequential"] += time.perf_counter() - start
        for (c, _, _), a, b in zip(plan, got, ref):
            if a.tokens != b.tokens:
                raise SystemExit(f"{s.id} {c.key}: answers differ: batched {a.tokens} vs sequential {b.tokens}")
        row_steps += sum(len(a.tokens) + 1 for a in got)
        print(f"  {s.id}: {s.n_tokens} tokens, {len(plan)} conditions, identical answers batched and sequential "
              f"(answer lengths {min(len(a.tokens) for a in got)}-{max(len(a.tokens) for a in got)})", flush=True)
    # the same rows with the next sample's rows filling the places of finished ones (overlap 1)
    jobs = []
    for s in samples:
        st, plan = planned(model, s, ranked, dirs, args.conditions)
        jobs.append(Job(s.id, (lambda ids=s.input_ids: prefill(model, ids)), [r for _, _, r in plan], st.spans()))
    start = time.perf_counter()
    list(decode_jobs(model, jobs, batch_size=args.conditions, max_new_tokens=32, max_jobs=2))
    t["overlap"] = time.perf_counter() - start - t["prefill"]  # the prefills are counted in neither way
    res: dict = {"samples": len(samples), "conditions": args.conditions,
                 "mean_prompt_tokens": sum(s.n_tokens for s in samples) / len(samples)}
    n = len(samples) * args.conditions
    res["batched_conditions_per_s"], res["sequential_conditions_per_s"] = n / t["batched"], n / t["sequential"]
    res["speedup"] = t["sequential"] / t["batched"]
    res["speedup_overlap1"] = t["sequential"] / t["overlap"]
    print(f"1. conditions per second: batched {n / t['batched']:.2f}, sequential {n / t['sequential']:.2f}: "
          f"ratio {res['speedup']:.1f}x (target >= 15x); with the next sample's rows filling the batch (overlap 1): "
          f"{n / t['overlap']:.2f}, ratio {res['speedup_overlap1']:.1f}x")
    T = res["mean_prompt_tokens"]
    flops_token = 2 * n_params + 4 * L * H * model.cfg.d_head * T
    throughput = prefill_flops / t["prefill"]
    floor, per = flops_token / throughput, t["batched"] / row_steps
    res.update(row_step_ms=per * 1e3, floor_ms=floor * 1e3, gflop_per_token=flops_token / 1e9,
               prefill_gflops=throughput / 1e9, floor_ratio=per / floor)
    print(f"2. batched cost per row-step {per * 1e3:.1f} ms vs compute floor {floor * 1e3:.1f} ms "
          f"({flops_token / 1e9:.2f} GFLOP per token at {T:.0f} tokens, {throughput / 1e9:.0f} GFLOP/s measured in the "
          f"prefill): ratio {per / floor:.1f}x")
    mem = {}
    for phase in ("batched", "sequential"):
        out = subprocess.run([sys.executable, __file__, "--memory", phase, "--conditions", str(args.conditions)],
                             capture_output=True, text=True, check=True).stdout.split()
        mem[phase] = int(out[-1])
    res["peak_mib_batched"], res["peak_mib_sequential"] = mem["batched"] / 2**20, mem["sequential"] / 2**20
    res["memory_ratio"] = mem["batched"] / mem["sequential"]
    print(f"3. peak memory (VmHWM, fresh process each): batched {mem['batched'] / 2**20:.0f} MiB, sequential "
          f"{mem['sequential'] / 2**20:.0f} MiB: ratio {res['memory_ratio']:.2f}x (target <= 1.5x)")
    questions = sweeps.question_inputs(model, split="test", size=args.samples, n_docs=20)
    grid = sweeps.split_grid("full", n_total_heads=L * H)
    flat = [x for q in questions for x in q.samples()]
    for overlap in (0, 1):
        start = time.perf_counter()
        frame = run_study(model, flat, grid, heads={"contextual": ranked}, progress=False, overlap=overlap)
        dt = time.perf_counter() - start
        per_q = dt / len(questions)
        res[f"grid_s_per_question_overlap{overlap}"] = per_q
        res[f"grid_projected_h_overlap{overlap}"] = per_q * args.questions / 3600
        print(f"4. Figure 3 grid ({len(grid)} conditions, {len(frame)} rows) on {len(questions)} questions: "
              f"{per_q:.1f} s per question (overlap {overlap}) -> {per_q * args.questions / 3600:.2f} h projected for "
              f"{args.questions} questions (target <= 1.5 h)", flush=True)
    res["command"] = "python benchmarks/bench_sweep.py " + " ".join(sys.argv[1:])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


def compute_params(model):
    """The HF model's parameters that cost FLOPs per token: all but the input embedding (a
    lookup), the output embedding counted once even when tied to it."""
    twin = fdlib.model.loading.fast_prefill_model(model)
    emb = twin.get_input_embeddings().weight
    head = twin.get_output_embeddings().weight
    out = [(n, p) for n, p in twin.named_parameters() if p is not emb]
    if head is emb:
        out.append(("lm_head", head))
    return out


if __name__ == "__main__":
    main()
