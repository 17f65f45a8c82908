"""Scoring speed and memory, measured side by side in one run on the same samples, in float32 and
in bfloat16.

    python benchmarks/bench_scoring.py [--samples 3] [--n-docs 20] [--long-docs 62]
                                       [--dtype float32,bfloat16] [--skip-memory] [--threads N]
                                       [--out FILE]

Per dtype: fdlib's model (`fdlib.load_model(dtype=...)`) and the transformers references loaded as
transformers loads them (`AutoModelForCausalLM.from_pretrained(path, dtype=..., attn_implementation=
"sdpa" / "eager")`, path the converted checkpoint of fdlib's default model); each model loaded
once and warmed up, the dtypes interleaved sample by sample. Prints a table, one line per figure
with a column per dtype, bfloat16 / float32 and the target (lower is better for fdlib's ratios):
  1. fdlib's greedy answer + every head's span scores (the batched engine, as every study runs
     it, one row)  vs  plain transformers sdpa `generate`
     of the same answer, in the same dtype                          (target <= 1.25, both dtypes)
  2. the same  vs  the authors' method: generate, then re-run prompt + response with eager
     attention and `output_attentions=True`                         (target <= 0.33)
  3. peak extra memory of fdlib's scoring at ~8k tokens  vs  one plain sdpa forward of the prompt,
     per dtype, each in a fresh process, above the loaded model with its weights resident (a
     few-token forward first: float32 weights are mapped from the checkpoint and come in on first
     use); and the peak resident memory itself (bfloat16 no higher than float32 for both);
  4. fdlib's speed in bfloat16 over float32 (and transformers' generate's).
In float32 every way must give the same answer (checked); in bfloat16 the share of samples where
transformers' answer equals fdlib's is reported, and the share whose bfloat16 answer (text, EM)
equals the float32 one. Scores are compared with the `output_attentions` re-run of prompt +
fdlib's answer (summed in float32). `--out` writes every figure as JSON: one key per dtype,
`bfloat16_vs_float32`, the command line and torch's thread count. `--threads N` sets torch's
threads (default: torch's choice); the memory processes get the same.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from functools import partial

import torch
from _dtype import (
    Line,
    add_dtype_option,
    add_threads_option,
    chosen_dtypes,
    fmt,
    ratio,
    set_threads,
    table,
    write_json,
)

import fdlib
from fdlib.interventions.engine import decode_batch
from fdlib.interventions.row import RowIntervention
from fdlib.model.decoding import prefill
from fdlib.model.loading import converted_checkpoint, resolve_dtype


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def authors_scores(eager, ids, prompt_len, spans):
    """Re-run prompt + response with every attention pattern materialised, then slice rows
    (summed in float32: in bfloat16 the reference should not add rounding of its own)."""
    with torch.no_grad():
        attn = eager(ids[None], output_attentions=True).attentions
    return {n: torch.stack([a[0, :, prompt_len:, s.slice].float().sum(-1).mean(-1) for a in attn]) for n, s in spans.items()}


def fdlib_scores(model, ids, spans, max_new_tokens=32):
    """The path every study takes (run_study -> the batched engine), here with one row."""
    return decode_batch(model, prefill(model, ids), [RowIntervention()], spans=spans, max_new_tokens=max_new_tokens)[0]


def generate(sdpa, ids, n_new):
    with torch.no_grad():
        return sdpa.generate(ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=n_new,
                             do_sample=False)


def load(dtype: str) -> dict:
    """fdlib's model in `dtype` and the transformers references, loaded as transformers does."""
    from transformers import AutoModelForCausalLM

    path, torch_dtype = converted_checkpoint(fdlib.DEFAULT_MODEL), resolve_dtype(dtype)
    return {"fdlib": fdlib.load_model(dtype=dtype),
            **{a: AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=a).eval() for a in ("sdpa", "eager")}}


def warm_up(m: dict, s) -> None:
    """Each model once on a short prompt, so no dtype's first timed call pays for kernel set-up."""
    ids, spans = s.input_ids[:256], {}
    fdlib_scores(m["fdlib"], ids, spans, max_new_tokens=2)
    generate(m["sdpa"], ids, 2)
    authors_scores(m["eager"], ids, len(ids) - 2, spans)


def measure(m: dict, s, check: bool) -> dict:
    """One sample: fdlib's answer + scores, transformers' generate of as many tokens (plus the one
    that stopped fdlib), the authors' re-run; timed. With `check`, a different answer is an error."""
    spans = s.named_spans()
    ans, t_fd = timed(partial(fdlib_scores, m["fdlib"], s.input_ids, spans))
    gen, t_gen = timed(partial(generate, m["sdpa"], s.input_ids, len(ans.tokens) + 1))
    got = gen[0, s.n_tokens : s.n_tokens + len(ans.tokens)].tolist()
    if check and got != ans.tokens:
        raise SystemExit(f"{s.id}: answers differ: fdlib {ans.tokens} vs transformers {got}")
    ids = torch.cat([s.input_ids, torch.tensor(ans.tokens, dtype=s.input_ids.dtype)])
    ref, t_auth = timed(partial(authors_scores, m["eager"], ids, s.n_tokens, spans))
    worst = max((ref[n] - ans.scores[n]).abs().max().item() for n in spans) if ans.tokens else 0.0
    return {"fdlib": t_fd, "generate": t_gen, "authors": t_auth + t_gen,  # the authors' method generates first, then re-runs
            "same_as_generate": got == ans.tokens, "worst": worst, "text": ans.text, "em": float(s.score(ans.text)),
            "n_answer": len(ans.tokens)}


def speed(args, dtypes: list[str]) -> dict:
    models = {d: load(d) for d in dtypes}
    samples = fdlib.NQBuilder(models[dtypes[0]]["fdlib"].tokenizer).samples(split="test", size=args.samples, n_docs=args.n_docs)
    for m in models.values():
        warm_up(m, samples[0])
    recs = {d: [] for d in dtypes}
    for s in samples:  # the dtypes interleaved, sample by sample
        for d in dtypes:
            r = measure(models[d], s, check=d == "float32")
            recs[d].append(r)
            print(f"  {s.id} {d}: {s.n_tokens} prompt tokens, {r['n_answer']} answer tokens: {r['text']!r}"
                  + ("" if r["same_as_generate"] else " (transformers' generate answers differently)"), flush=True)
    res: dict = {"samples": len(samples), "n_docs": args.n_docs, "dtypes": dtypes}
    for d in dtypes:
        t = {k: sum(r[k] for r in recs[d]) for k in ("fdlib", "generate", "authors")}
        res[d] = {"max_score_difference": max(r["worst"] for r in recs[d]),
                  "ratio_vs_sdpa_generate": t["fdlib"] / t["generate"], "ratio_vs_authors": t["fdlib"] / t["authors"],
                  "fdlib_s": t["fdlib"], "sdpa_generate_s": t["generate"], "authors_s": t["authors"],
                  "same_answer_as_generate": sum(r["same_as_generate"] for r in recs[d]) / len(samples),
                  "em_fdlib": sum(r["em"] for r in recs[d]) / len(samples)}
        print(f"{d}: {len(samples)} samples x {args.n_docs} documents; max |score difference| vs output_attentions re-run = "
              f"{res[d]['max_score_difference']:.2e}; ratio 1 fdlib / sdpa generate = {res[d]['ratio_vs_sdpa_generate']:.2f} "
              f"({t['fdlib']:.1f} s vs {t['generate']:.1f} s); ratio 2 fdlib / authors = {res[d]['ratio_vs_authors']:.2f} "
              f"({t['authors']:.1f} s)", flush=True)
    if "float32" in dtypes and "bfloat16" in dtypes:
        pairs = list(zip(recs["bfloat16"], recs["float32"], strict=True))
        res["bfloat16_vs_float32"] = {
            "fdlib_speed": res["float32"]["fdlib_s"] / res["bfloat16"]["fdlib_s"],
            "sdpa_generate_speed": res["float32"]["sdpa_generate_s"] / res["bfloat16"]["sdpa_generate_s"],
            "authors_speed": res["float32"]["authors_s"] / res["bfloat16"]["authors_s"],
            "same_text": sum(a["text"] == b["text"] for a, b in pairs) / len(pairs),
            "same_em": sum(a["em"] == b["em"] for a, b in pairs) / len(pairs),
        }
    return res


def _peak_rss_during(fn) -> tuple[float, float, float]:
    """(peak RSS above the level just before fn, in MB; seconds; the peak RSS itself, in MB):
    sampled every 5 ms."""
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
    peak = max(peak, proc.memory_info().rss)
    return (peak - base) / 2**20, dt, peak / 2**20


def memory_child(which: str, n_docs: int, dtype: str) -> None:
    """One measurement per process, so neither path inherits the other's allocator state; prints
    the prompt's tokens, the peak extra MB, the seconds and the peak resident MB.

    A forward of a few tokens first brings every weight in: float32 weights are mapped from the
    checkpoint and only become resident on first use (bfloat16 ones are a copy, resident from the
    load), so without it "extra" would count the float32 weights and not the bfloat16 ones."""
    model = fdlib.load_model(dtype=dtype)
    s = fdlib.NQBuilder(model.tokenizer).samples(split="test", size=1, n_docs=n_docs)[0]
    twin = fdlib.model.loading.fast_prefill_model(model)
    with torch.inference_mode():
        twin(s.input_ids[None, :4], use_cache=False)
    if which == "sdpa":
        with torch.inference_mode():
            mb, dt, peak = _peak_rss_during(lambda: twin(s.input_ids[None], use_cache=True, logits_to_keep=1))
    else:
        mb, dt, peak = _peak_rss_during(lambda: fdlib.score_sample(model, s, max_new_tokens=8))
    print(f"{s.n_tokens} {mb:.1f} {dt:.1f} {peak:.1f}")


def memory(args, dtype: str, threads: list[str]) -> dict:
    out = {}
    for which in ("sdpa", "fdlib"):
        res = subprocess.run(
            [sys.executable, __file__, "--memory-child", which, "--long-docs", str(args.long_docs), "--dtype", dtype, *threads],
            capture_output=True, text=True, check=True,
        )
        n_tok, mb, dt, peak = res.stdout.split()[-4:]
        out[which] = (int(n_tok), float(mb), float(dt), float(peak))
    (n, a, ta, pa), (_, b, tb, pb) = out["fdlib"], out["sdpa"]
    print(f"{dtype}: ratio 3  peak extra memory, fdlib answer+scores / plain sdpa forward at {n} tokens = {a / b:.2f}  "
          f"({a:.0f} MB vs {b:.0f} MB above the loaded model; {ta:.0f} s vs {tb:.0f} s; peak resident {pa:.0f} MB vs "
          f"{pb:.0f} MB)", flush=True)
    return {"memory_tokens": n, "memory_ratio": a / b, "memory_mb_fdlib": a, "memory_mb_sdpa": b,
            "peak_mb_fdlib": pa, "peak_mb_sdpa": pb}


def lines(res: dict, dtypes: list[str]) -> list[Line]:
    """The table's figures."""
    cross = res.get("bfloat16_vs_float32", {})

    def row(figure, key, spec=".2f", unit="", target="", across=None):
        return Line(figure, {d: fmt(res[d].get(key), spec, unit) for d in dtypes}, across or "", target)

    def bf16_over_fp32(key):
        return fmt(ratio(res, key), ".2f", "x")

    out = [
        row("fdlib answer + all heads' scores, s", "fdlib_s", ".1f", across=f"speed {fmt(cross.get('fdlib_speed'), '.2f', 'x')}",
            target="bf16 faster"),
        row("transformers sdpa generate, s", "sdpa_generate_s", ".1f", across=f"speed {fmt(cross.get('sdpa_generate_speed'), '.2f', 'x')}"),
        row("authors: generate + output_attentions re-run, s", "authors_s", ".1f",
            across=f"speed {fmt(cross.get('authors_speed'), '.2f', 'x')}"),
        row("ratio 1  fdlib / sdpa generate (same dtype)", "ratio_vs_sdpa_generate", target="<= 1.25"),
        row("ratio 2  fdlib / authors' method", "ratio_vs_authors", target="<= 0.33"),
        Line("fdlib answer = transformers' answer",
             {d: "all (checked)" if d == "float32" else fmt(res[d]["same_answer_as_generate"], ".0%") for d in dtypes}, "",
             "identical (fp32); report (bf16)"),
        row("max |score difference| vs output_attentions re-run", "max_score_difference", ".1e"),
        row("EM, fdlib's answers", "em_fdlib", ".3f"),
    ]
    if "memory_ratio" in res[dtypes[0]]:
        n = res[dtypes[0]]["memory_tokens"]
        out += [
            row(f"peak extra memory, fdlib score_sample, {n} tokens, MB", "memory_mb_fdlib", ".0f", across=bf16_over_fp32("memory_mb_fdlib"),
                target="bf16 <= fp32"),
            row(f"peak extra memory, plain sdpa forward, {n} tokens, MB", "memory_mb_sdpa", ".0f", across=bf16_over_fp32("memory_mb_sdpa")),
            row("ratio 3  fdlib / sdpa extra memory (same dtype)", "memory_ratio", target="report"),
            row("peak resident memory, fdlib score_sample, MB", "peak_mb_fdlib", ".0f", across=bf16_over_fp32("peak_mb_fdlib"),
                target="bf16 <= fp32"),
            row("peak resident memory, plain sdpa forward, MB", "peak_mb_sdpa", ".0f", across=bf16_over_fp32("peak_mb_sdpa")),
        ]
    if cross:
        out.append(Line("bf16 answer = fp32 answer (fdlib)", {}, f"{cross['same_text']:.0%} text, {cross['same_em']:.0%} EM", "report"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--n-docs", type=int, default=20)
    ap.add_argument("--long-docs", type=int, default=62, help="documents in the ~8k-token prompt")
    add_dtype_option(ap)
    add_threads_option(ap)
    ap.add_argument("--memory-child", choices=["sdpa", "fdlib"])
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    dtypes = chosen_dtypes(args)
    threads = set_threads(args)
    if args.memory_child:
        memory_child(args.memory_child, args.long_docs, dtypes[0])
        return
    res = speed(args, dtypes)
    if not args.skip_memory:
        for d in dtypes:
            res[d].update(memory(args, d, threads))
        if "bfloat16_vs_float32" in res:
            res["bfloat16_vs_float32"].update({k: ratio(res, k) for k in ("memory_mb_fdlib", "memory_mb_sdpa", "peak_mb_fdlib", "peak_mb_sdpa")})
            res["bfloat16_vs_float32"]["memory_mb_fdlib_bf16_over_sdpa_bf16"] = res["bfloat16"]["memory_ratio"]
    res = write_json(args.out, "bench_scoring.py", res)
    print(f"\n{res['samples']} samples x {args.n_docs} documents; {res['torch_threads']} torch threads\n")
    print(table(lines(res, dtypes), dtypes))


if __name__ == "__main__":
    main()
