"""Study speed: the conditions of one 20-document sample decoded as one batch over the shared
prompt cache vs one after another through the bridge's hooks, measured side by side, in float32
and in bfloat16 in one run (the same samples, conditions and ranked heads for both dtypes).

    python benchmarks/bench_sweep.py [--samples 2] [--conditions 32] [--questions 200]
                                     [--dtype float32,bfloat16] [--grid full] [--threads N]
                                     [--out FILE]

Each dtype's model is loaded once (`fdlib.load_model(dtype=...)`) and warmed up; the heads are
ranked once, by the float32 model's relevant-document scores on the first sample, and that
ranking serves every dtype. Per sample, for each dtype in turn, the same shared prefill, then
  batched:    fdlib.interventions.engine.decode_batch, every condition a row, one forward per step;
  sequential: every condition through the TransformerBridge with its hooks (the reference).
In float32 both must give identical answers (checked). In bfloat16 the rounding order differs
between the two paths, so near ties can go either way: the share of rows with the same answer
text and the same EM (the sample's `score`) is reported instead, and so is the share of rows whose
bfloat16 answer (text, EM) equals the float32 one.

Prints a table, one line per figure with a column per dtype, bfloat16 / float32 and the target,
and writes every figure (`--out`, JSON: one key per dtype, `bfloat16_vs_float32`, the command
line and torch's thread count):
  1. conditions per second, batched / sequential (target >= 15x in bfloat16), one sample at a
     time and with the next sample's rows filling the places of finished ones (`decode_jobs`,
     two in flight); batched conditions per second bfloat16 / float32 (target >= 2.5x);
  2. the batched cost per row and step vs the compute floor: FLOPs per token over the throughput
     of a [2400 x 576] x [576 x 1536] matmul in the same dtype, timed in this run with its torch
     threads (target <= 2x; GFLOP/s per dtype), and over the throughput the prefill reaches;
  3. peak memory (the process's high-water mark, each way and dtype in a fresh process after the
     same load and prefill), batched / sequential (target <= 1.5x); and the high-water mark of the
     prefill and decode alone (reset after the load, the resident model included), which is what
     bfloat16 lowers: a bfloat16 load itself peaks above that (the float32 checkpoint is read while
     the bfloat16 copy is made);
  4. the paper's Figure 3 grid (`sweeps.split_grid("full")`: 5 tau x 10 k x contextual + 3 random
     seeds, 3 baselines; `--grid quick` for a smoke test) run with `run_study` on `--samples` test
     questions, timed, and projected to `--questions` (target <= 0.75 h in bfloat16, 1.5 h in
     float32, on the 2-core CPU), one sample in flight and with overlap 1;
  5. the answers: batched vs sequential, and bfloat16 vs float32.
`--threads N` sets torch's threads (default: torch's choice; on a CPU shared with other work, 1
avoids threads waiting on each other); the memory processes get the same.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from _dtype import (
    Line,
    add_dtype_option,
    add_threads_option,
    chosen_dtypes,
    fmt,
    matmul_gflops,
    ratio,
    reset_hwm,
    set_threads,
    table,
    vm_hwm,
    write_json,
)

import fdlib
from fdlib.experiments import sweeps
from fdlib.interventions.directions import FocusDirections
from fdlib.interventions.engine import Job, decode_batch, decode_jobs
from fdlib.interventions.row import RowIntervention
from fdlib.model.decoding import decode, prefill
from fdlib.study.conditions import Condition
from fdlib.study.runner import StudySample, decode_sequential, run_study

DIRECTIONS = Path(__file__).resolve().parents[1] / "figures" / "data" / "directions_gold_post_rope.safetensors"
RANKED_WITH = "float32"  # the dtype whose model ranks the heads every dtype's conditions use


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


def load(dtype: str):
    """The model in `dtype` and its focus directions."""
    model = fdlib.load_model(dtype=dtype)
    return model, {"gold-post": FocusDirections.load(DIRECTIONS, model=model)}


def test_samples(model, n_samples: int):
    return fdlib.NQBuilder(model.tokenizer).samples(split="test", size=n_samples, n_docs=20)


def rank(model, sample) -> list[tuple[int, int]]:
    """Every head, best first, by its relevant-document score on `sample`."""
    return fdlib.top_heads(fdlib.score_sample(model, sample).kinds["relevant"], model.cfg.n_layers * model.cfg.n_heads)


def setup(n_samples: int, dtypes: list[str]):
    """Every dtype's model (with directions), the samples and the heads ranked by the float32 model."""
    models = {d: load(d) for d in dtypes}
    ranker = models[RANKED_WITH][0] if RANKED_WITH in models else fdlib.load_model(dtype=RANKED_WITH)
    samples = test_samples(ranker, n_samples)
    ranked = rank(ranker, samples[0])
    for model, _ in models.values():
        warm_up(model, samples[0])
    return models, samples, ranked


def warm_up(model, sample) -> None:
    """One short prefill and a two-token decode each way (batched; through the bridge), so no
    dtype's first timed call pays for kernel set-up."""
    prefix = prefill(model, sample.input_ids[:256])
    decode_batch(model, prefix, [RowIntervention()], max_new_tokens=2)
    decode(model, prefix, max_new_tokens=2)


def planned(model, sample, ranked, dirs, n):
    st = StudySample(sample)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    out = []
    for c in conditions(n):
        heads = c.head_set({"contextual": ranked}, L, H)
        out.append((c, heads, c.row(heads, st.spans(), dirs)))
    return st, out


def peak_memory(phase: str, n: int, dtype: str, ranked) -> None:
    """One way (batched or sequential) on one sample in this process; prints the process's
    high-water mark (VmHWM, the load included) and that of the prefill and decode alone (VmHWM
    reset after the load: a bfloat16 load peaks above its decode), in bytes."""
    model, dirs = load(dtype)
    sample = test_samples(model, 1)[0]
    st, plan = planned(model, sample, ranked, dirs, n)
    load_peak = reset_hwm()
    prefix = prefill(model, sample.input_ids)
    if phase == "batched":
        decode_batch(model, prefix, [r for _, _, r in plan], spans=st.spans(), max_new_tokens=32)
    else:
        for c, heads, _ in plan:
            decode_sequential(model, st, prefix, c, heads, directions=dirs, max_new_tokens=32)
    work = vm_hwm()
    print(max(load_peak, work), work)


def measure_sample(model, dirs, s, ranked, n: int) -> dict:
    """One sample's prefill, batched decode and sequential decode, timed; with the answers."""
    st, plan = planned(model, s, ranked, dirs, n)
    t = {}
    start = time.perf_counter()
    prefix = prefill(model, s.input_ids)
    t["prefill"] = time.perf_counter() - start
    start = time.perf_counter()
    got = decode_batch(model, prefix, [r for _, _, r in plan], spans=st.spans(), max_new_tokens=32)
    t["batched"] = time.perf_counter() - start
    start = time.perf_counter()
    ref = [decode_sequential(model, st, prefix, c, h, directions=dirs, max_new_tokens=32) for c, h, _ in plan]
    t["sequential"] = time.perf_counter() - start
    return {"t": t, "st": st, "keys": [c.key for c, _, _ in plan], "batched": got, "sequential": ref,
            "row_steps": sum(len(a.tokens) + 1 for a in got)}


def answers(rec: dict, way: str) -> list[tuple[str, float]]:
    """(answer text, EM) of every row of a sample's record, one way."""
    return [(a.text, rec["st"].score(a.text)) for a in rec[way]]


def agreement(a: list[tuple[str, float]], b: list[tuple[str, float]]) -> dict:
    """How many rows have the same answer text and the same EM in a and b, of how many."""
    return {"rows": len(a), "same_text": sum(x[0] == y[0] for x, y in zip(a, b, strict=True)),
            "same_em": sum(x[1] == y[1] for x, y in zip(a, b, strict=True))}


def add_counts(total: dict, part: dict) -> dict:
    return {k: total.get(k, 0) + v for k, v in part.items()}


def shares(counts: dict, prefix: str) -> dict:
    return {f"{prefix}_same_text": counts["same_text"] / counts["rows"], f"{prefix}_same_em": counts["same_em"] / counts["rows"]}


def overlap_seconds(model, dirs, samples, ranked, n: int, t_prefill: float) -> float:
    """The same rows with the next sample's rows filling the places of finished ones (overlap 1),
    less the prefills (counted in neither way)."""
    jobs = []
    for s in samples:
        st, plan = planned(model, s, ranked, dirs, n)
        jobs.append(Job(s.id, (lambda ids=s.input_ids: prefill(model, ids)), [r for _, _, r in plan], st.spans()))
    start = time.perf_counter()
    list(decode_jobs(model, jobs, batch_size=n, max_new_tokens=32, max_jobs=2))
    return time.perf_counter() - start - t_prefill


def prefill_flops(model, T: int) -> float:
    """FLOPs of a T-token prefill: the weights, and QK^T and PV (causal)."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    return 2 * n_params(model) * T + 2 * L * H * model.cfg.d_head * T * T


def n_params(model) -> int:
    return sum(p.numel() for _, p in compute_params(model))


def floor_figures(model, t: dict, row_steps: int, flops_prefill: float, T: float, dtype: str) -> dict:
    """The batched cost per row-step against the compute floor: FLOPs per token at T prompt
    tokens over the throughput of a matmul in the model's dtype (timed now) and over the
    throughput the prefill reached."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    flops_token = 2 * n_params(model) + 4 * L * H * model.cfg.d_head * T
    throughput = flops_prefill / t["prefill"]
    mm = matmul_gflops(dtype) * 1e9
    floor, mm_floor, per = flops_token / throughput, flops_token / mm, t["batched"] / row_steps
    return {"row_step_ms": per * 1e3, "floor_ms": floor * 1e3, "gflop_per_token": flops_token / 1e9,
            "prefill_gflops": throughput / 1e9, "floor_ratio": per / floor, "matmul_gflops": mm / 1e9,
            "matmul_floor_ms": mm_floor * 1e3, "matmul_floor_ratio": per / mm_floor}


def memory(dtype: str, n: int, ranked, threads: list[str]) -> dict:
    """Peak memory of each way in a fresh process (same load, same prefill, same heads): the
    process's high-water mark, and that of the prefill and decode alone (the resident model
    included: float32 weights are mapped from the checkpoint and come in on first use)."""
    mem = {}
    for phase in ("batched", "sequential"):
        out = subprocess.run([sys.executable, __file__, "--memory", phase, "--conditions", str(n), "--dtype", dtype,
                              "--heads", json.dumps(ranked), *threads], capture_output=True, text=True, check=True).stdout.split()
        mem[phase], mem[f"{phase}_work"] = int(out[-2]), int(out[-1])
    return {"peak_mib_batched": mem["batched"] / 2**20, "peak_mib_sequential": mem["sequential"] / 2**20,
            "memory_ratio": mem["batched"] / mem["sequential"],
            "work_peak_mib_batched": mem["batched_work"] / 2**20, "work_peak_mib_sequential": mem["sequential_work"] / 2**20,
            "work_memory_ratio": mem["batched_work"] / mem["sequential_work"]}


def grid_seconds(model, questions, grid, ranked, overlap: int) -> tuple[float, int]:
    """(seconds, rows) of the grid run with `run_study` on the questions."""
    flat = [x for q in questions for x in q.samples()]
    start = time.perf_counter()
    frame = run_study(model, flat, grid, heads={"contextual": ranked}, progress=False, overlap=overlap)
    return time.perf_counter() - start, len(frame)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--conditions", type=int, default=32)
    ap.add_argument("--questions", type=int, default=200, help="questions of the projected Figure 3 grid")
    add_dtype_option(ap)
    add_threads_option(ap)
    ap.add_argument("--grid", choices=["full", "quick"], default="full",
                    help="the split-softmax grid timed in 4: full (the paper's Figure 3) or quick (a smoke test)")
    ap.add_argument("--out", help="write the figures as JSON here")
    ap.add_argument("--memory", choices=["batched", "sequential"], help=argparse.SUPPRESS)
    ap.add_argument("--heads", help=argparse.SUPPRESS)  # the ranked heads, as JSON, for --memory
    args = ap.parse_args()
    dtypes = chosen_dtypes(args)
    threads = set_threads(args)
    if args.memory:
        return peak_memory(args.memory, args.conditions, dtypes[0], [tuple(h) for h in json.loads(args.heads)])
    models, samples, ranked = setup(args.samples, dtypes)
    acc = {d: {"t": {"prefill": 0.0, "batched": 0.0, "sequential": 0.0}, "row_steps": 0, "prefill_flops": 0.0,
               "answers": {"batched": [], "sequential": []}, "paths": {}} for d in dtypes}
    for s in samples:  # the dtypes interleaved, sample by sample
        for d in dtypes:
            model, dirs = models[d]
            rec, a = measure_sample(model, dirs, s, ranked, args.conditions), acc[d]
            if d == "float32":  # exact arithmetic order: the two ways must agree token for token
                for key, x, y in zip(rec["keys"], rec["batched"], rec["sequential"]):
                    if x.tokens != y.tokens:
                        raise SystemExit(f"{s.id} {key} ({d}): answers differ: batched {x.tokens} vs sequential {y.tokens}")
            a["t"] = {k: a["t"][k] + v for k, v in rec["t"].items()}
            a["row_steps"] += rec["row_steps"]
            a["prefill_flops"] += prefill_flops(model, s.n_tokens - 1)
            for way in ("batched", "sequential"):
                a["answers"][way] += answers(rec, way)
            same = agreement(answers(rec, "batched"), answers(rec, "sequential"))
            a["paths"] = add_counts(a["paths"], same)
            lengths = [len(x.tokens) for x in rec["batched"]]
            print(f"  {s.id} {d}: {s.n_tokens} tokens, {len(rec['keys'])} conditions, "
                  + ("identical answers batched and sequential" if d == "float32" else
                     f"batched and sequential: same answer text {same['same_text']}/{same['rows']}, same EM {same['same_em']}/{same['rows']}")
                  + f" (answer lengths {min(lengths)}-{max(lengths)})", flush=True)
    n = len(samples) * args.conditions
    T = sum(s.n_tokens for s in samples) / len(samples)
    res: dict = {"samples": len(samples), "conditions": args.conditions, "mean_prompt_tokens": T, "dtypes": dtypes,
                 "heads_ranked_with": RANKED_WITH}
    for d in dtypes:
        model, dirs = models[d]
        t = acc[d]["t"]
        t["overlap"] = overlap_seconds(model, dirs, samples, ranked, args.conditions, t["prefill"])
        r = res[d] = {}
        r["batched_conditions_per_s"], r["sequential_conditions_per_s"] = n / t["batched"], n / t["sequential"]
        r["speedup"] = t["sequential"] / t["batched"]
        r["speedup_overlap1"] = t["sequential"] / t["overlap"]
        r["overlap1_conditions_per_s"] = n / t["overlap"]
        r["prefill_s_per_sample"] = t["prefill"] / len(samples)
        r.update(floor_figures(model, t, acc[d]["row_steps"], acc[d]["prefill_flops"], T, d))
        r["em_batched"] = sum(em for _, em in acc[d]["answers"]["batched"]) / n
        r.update(shares(acc[d]["paths"], "batched_vs_sequential"))
        print(f"{d}: 1. conditions per second: batched {n / t['batched']:.2f}, sequential {n / t['sequential']:.2f}: "
              f"ratio {r['speedup']:.1f}x (overlap 1: {n / t['overlap']:.2f}, ratio {r['speedup_overlap1']:.1f}x); "
              f"2. row-step {r['row_step_ms']:.1f} ms vs floor {r['matmul_floor_ms']:.1f} ms at {r['matmul_gflops']:.0f} GFLOP/s "
              f"(matmul) / {r['floor_ms']:.1f} ms at {r['prefill_gflops']:.0f} GFLOP/s (prefill)", flush=True)
    for d in dtypes:
        res[d].update(memory(d, args.conditions, ranked, threads))
        print(f"{d}: 3. peak memory (VmHWM, fresh process each): batched {res[d]['peak_mib_batched']:.0f} MiB, sequential "
              f"{res[d]['peak_mib_sequential']:.0f} MiB: ratio {res[d]['memory_ratio']:.2f}x; prefill and decode alone (reset "
              f"after the load): {res[d]['work_peak_mib_batched']:.0f} MiB vs {res[d]['work_peak_mib_sequential']:.0f} MiB: "
              f"ratio {res[d]['work_memory_ratio']:.2f}x", flush=True)
    first = models[dtypes[0]][0]
    questions = sweeps.question_inputs(first, split="test", size=args.samples, n_docs=20)
    grid = sweeps.split_grid(args.grid, n_total_heads=first.cfg.n_layers * first.cfg.n_heads)
    res["grid"], res["grid_conditions"] = args.grid, len(grid)
    for overlap in (0, 1):
        for d in dtypes:
            dt, rows = grid_seconds(models[d][0], questions, grid, ranked, overlap)
            per_q = dt / len(questions)
            res[d][f"grid_s_per_question_overlap{overlap}"] = per_q
            res[d][f"grid_projected_h_overlap{overlap}"] = per_q * args.questions / 3600
            print(f"{d}: 4. {args.grid} grid ({len(grid)} conditions, {rows} rows) on {len(questions)} questions: {per_q:.1f} s "
                  f"per question (overlap {overlap}) -> {per_q * args.questions / 3600:.2f} h projected for {args.questions} "
                  "questions", flush=True)
    if "float32" in dtypes and "bfloat16" in dtypes:
        cross = {}
        for way in ("batched", "sequential"):
            cross.update(shares(agreement(acc["bfloat16"]["answers"][way], acc["float32"]["answers"][way]), f"{way}_bf16_vs_fp32"))
        for key in ("batched_conditions_per_s", "sequential_conditions_per_s", "overlap1_conditions_per_s", "matmul_gflops",
                    "prefill_gflops", "row_step_ms", "peak_mib_batched", "peak_mib_sequential", "work_peak_mib_batched",
                    "work_peak_mib_sequential", "grid_projected_h_overlap0",
                    "grid_projected_h_overlap1"):
            cross[key] = ratio(res, key)
        res["bfloat16_vs_float32"] = cross
    res = write_json(args.out, "bench_sweep.py", res)
    print(f"\n{len(samples)} samples x {args.conditions} conditions, 20 documents ({T:.0f} prompt tokens on average); heads "
          f"ranked by the {RANKED_WITH} model; {res['torch_threads']} torch threads\n")
    print(table(lines(res, dtypes, args), dtypes))


def lines(res: dict, dtypes: list[str], args) -> list[Line]:
    """The table's figures."""
    cross = res.get("bfloat16_vs_float32", {})

    def row(figure, key, spec=".2f", unit="", target="", across=True):
        return Line(figure, {d: fmt(res[d].get(key), spec, unit) for d in dtypes}, fmt(cross.get(key), ".2f", "x") if across else "", target)

    def agree(d):
        if d == "float32":
            return "identical (checked)"
        return f"{res[d]['batched_vs_sequential_same_text']:.0%} text, {res[d]['batched_vs_sequential_same_em']:.0%} EM"

    g, q = res["grid_conditions"], args.questions
    out = [
        row("conditions/s, batched", "batched_conditions_per_s", target=">= 2.5x bf16 / fp32"),
        row("conditions/s, sequential (bridge hooks)", "sequential_conditions_per_s"),
        row("batched / sequential", "speedup", ".1f", "x", ">= 15x (bf16)", across=False),
        row("conditions/s, batched with overlap 1", "overlap1_conditions_per_s"),
        row("batched (overlap 1) / sequential", "speedup_overlap1", ".1f", "x", across=False),
        Line("batched = sequential answers", {d: agree(d) for d in dtypes}, "", "identical (fp32); report (bf16)"),
        row("EM, batched rows", "em_batched", ".3f", across=False),
        row("matmul 2400x576 @ 576x1536, GFLOP/s", "matmul_gflops", ".0f"),
        row("prefill, GFLOP/s", "prefill_gflops", ".0f"),
        row("batched cost per row-step, ms", "row_step_ms", ".1f"),
        row("compute floor per token (matmul), ms", "matmul_floor_ms", ".2f", across=False),
        row("row-step / floor (matmul)", "matmul_floor_ratio", ".1f", "x", "<= 2x", across=False),
        row("row-step / floor (prefill)", "floor_ratio", ".1f", "x", "report", across=False),
        row("peak memory, batched, MiB", "peak_mib_batched", ".0f"),
        row("peak memory, sequential, MiB", "peak_mib_sequential", ".0f"),
        row("peak memory batched / sequential", "memory_ratio", ".2f", "x", "<= 1.5x", across=False),
        row("peak memory of prefill + decode alone, batched, MiB", "work_peak_mib_batched", ".0f", target="bf16 < fp32"),
        row("peak memory of prefill + decode alone, sequential, MiB", "work_peak_mib_sequential", ".0f", target="bf16 < fp32"),
        row("  batched / sequential", "work_memory_ratio", ".2f", "x", "<= 1.5x", across=False),
    ]
    for o in (0, 1):
        out += [row(f"{res['grid']} grid ({g} conditions), s per question, overlap {o}", f"grid_s_per_question_overlap{o}", ".1f",
                    across=False),
                row(f"  projected to {q} questions, h, overlap {o}", f"grid_projected_h_overlap{o}", ".2f", " h",
                    "<= 0.75 h bf16 (1.5 h fp32)")]
    if cross:
        for way in ("batched", "sequential"):
            out.append(Line(f"bf16 answer = fp32 answer, {way}", {}, f"{cross[f'{way}_bf16_vs_fp32_same_text']:.0%} text, "
                            f"{cross[f'{way}_bf16_vs_fp32_same_em']:.0%} EM", "report"))
    return out


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
