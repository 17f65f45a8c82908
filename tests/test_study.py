"""The study runner (fdlib.study.runner) and conditions (fdlib.study.conditions): batched == sequential,
resume after a kill, rows keyed by everything that made them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fake_samples

import fdlib
from fdlib.core.store import Store
from fdlib.interventions.directions import FocusDirections
from fdlib.model.loading import model_name
from fdlib.study.conditions import Condition, focus_conditions, reweight_conditions
from fdlib.study.runner import StudySample, run_study, study_frame

RANKED = [(1, 2), (0, 3), (1, 0), (0, 0), (1, 1), (0, 1), (1, 3), (0, 2)]


def _dirs(model, seed=0, placement="post_rope"):
    g = torch.Generator().manual_seed(seed)
    shape = (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)
    return FocusDirections(torch.randn(shape, generator=g), torch.randn(shape, generator=g), model_name(model), placement)


def _conditions():
    return (
        [Condition.baseline(), Condition.baseline("gold")]
        + reweight_conditions([0.1, 0.0, 1000.0], [1, 3], n_total_heads=8)
        + [Condition.reweight("odds", 0.05, "contextual", 2), Condition.reweight("boost", 10, "contextual", 2)]
        + focus_conditions([0.5, 0.0], [2], directions="d")
        + [Condition.focus(0.3, "p", "contextual", 3), Condition.ablate("random", 2, seed=1),
           Condition.ablate([(0, 1), (1, 1)]), Condition.focus(0.5, "d", [(0, 1)], rows="all")]
    )


def test_condition_keys_labels_and_validation():
    c = Condition.split(0.1, "contextual", 5)
    assert c.key == "split|tau=0.1|contextual|k=5" and c.label == "split tau=0.1, contextual k=5"
    assert Condition.split(0.1, "random", 5, seed=2).key == "split|tau=0.1|random|k=5|seed=2"
    assert Condition.focus(0.5, "gold-post", "contextual", 5, rows="all").key == "focus|gold-post|alpha=0.5|contextual|k=5|rows=all"
    assert Condition.ablate([(1, 2), (0, 3)]).key == "ablate|heads=L1H2,L0H3"
    assert Condition.baseline("gold").key == "baseline|gold"
    assert Condition.reweight("odds", 0.01, "contextual", 3).key == "odds|a=0.01|contextual|k=3"
    assert Condition.focus(0.0, "d", "contextual", 2).identity and not Condition.focus(0.1, "d", "contextual", 2).identity
    for bad in (dict(method="split", value=-1, heads="contextual", k=2), dict(method="split", value=0.1, heads="random", k=2),
                dict(method="focus", value=float("nan"), directions="d", heads="contextual", k=1),
                dict(method="focus", value=0.5, heads="contextual", k=1), dict(method="baseline", k=3),
                dict(method="odds", value=0, heads="contextual", k=1), dict(method="dropout"),
                dict(method="split", value=0.1, heads="contextual", k=0)):
        with pytest.raises(ValueError):
            Condition(**bad)


def test_batched_equals_sequential_and_batch_sizes(tiny):
    samples = fake_samples(3) + fake_samples(3, "gold")
    dirs = {"d": _dirs(tiny.model), "p": _dirs(tiny.model, 1, "pre_rope")}
    kw = dict(heads={"contextual": RANKED}, directions=dirs, progress=False, max_new_tokens=8)
    conds = _conditions()
    a = run_study(tiny.model, samples, conds, **kw)
    b = run_study(tiny.model, samples, conds, engine="sequential", **kw)
    c = run_study(tiny.model, samples, conds, batch_size=3, **kw)
    d = run_study(tiny.model, samples, conds, batch_size=7, overlap=3, **kw)  # rows of several samples per batch
    assert len(a) == len(b) == len(c) == len(d) == 3 * (len(conds) - 1) + 3
    for other in (b, c, d):
        assert list(a.answer) == list(other.answer) and list(a.condition) == list(other.condition)
        for x, y in zip(a.relevant_score, other.relevant_score):
            assert (x is None) == (y is None)
            if x is not None:
                np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
        for x, y in zip(a.sink_score, other.sink_score):
            if x is not None:
                np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
    # the runner's answers are fdlib.decode's under the same hooks (a spot check by hand)
    s = samples[0]
    last = s.n_tokens - 1
    with fdlib.split_softmax(tiny.model, RANKED[:3], s.gold_span, 0.1, from_pos=last):
        want = fdlib.decode(tiny.model, fdlib.prefill(tiny.model, s.input_ids), max_new_tokens=8).text
    assert a[(a.sample_id == s.id) & (a.condition == "split|tau=0.1|contextual|k=3")].answer.item() == want


def test_store_refuses_rows_of_another_setup(tiny, tmp_path):
    """The measured case: a store filled with one prompt set and one ranking must not be reused
    by a run with other prompts or another ranking, nor with other directions."""
    store = tmp_path / "s.sqlite"
    samples = fake_samples(2)
    conds = [Condition.baseline(), Condition.split(0.1, "contextual", 2), Condition.focus(0.5, "d", "contextual", 2)]
    kw = dict(directions={"d": _dirs(tiny.model)}, progress=False, max_new_tokens=4)
    first = run_study(tiny.model, samples, conds, heads={"contextual": RANKED}, store=store, **kw)
    assert len(first) == 6
    # same setup: nothing recomputed, same rows
    again = run_study(tiny.model, samples, conds, heads={"contextual": RANKED}, store=store, **kw)
    assert list(again.answer) == list(first.answer) and len(Store(store)) == 6
    other_prompt = [replace(s, input_ids=torch.roll(s.input_ids, 1)) for s in samples]  # same ids, other tokens
    with pytest.raises(ValueError, match="prompt_sha"):
        run_study(tiny.model, other_prompt, conds, heads={"contextual": RANKED}, store=store, **kw)
    with pytest.raises(ValueError, match="heads"):
        run_study(tiny.model, samples, conds, heads={"contextual": RANKED[::-1]}, store=store, **kw)
    with pytest.raises(ValueError, match="directions_sha"):
        run_study(tiny.model, samples, conds, heads={"contextual": RANKED}, store=store,
                  **{**kw, "directions": {"d": _dirs(tiny.model, 5)}})
    with pytest.raises(ValueError, match="max_new_tokens"):
        run_study(tiny.model, samples, conds, heads={"contextual": RANKED}, store=store, **{**kw, "max_new_tokens": 5})
    # the same heads in another order are the same intervention
    reordered = [RANKED[1], RANKED[0]] + RANKED[2:]
    run_study(tiny.model, samples, conds, heads={"contextual": reordered}, store=store, **kw)
    # replace=True recomputes and overwrites: no stale row stays
    new = run_study(tiny.model, other_prompt, conds, heads={"contextual": RANKED}, store=store, replace=True, **kw)
    assert len(Store(store)) == 6 and set(new.prompt_sha) != set(first.prompt_sha)
    assert len(study_frame(store, conds, samples=samples)) == 0  # the old prompts' rows are gone


_CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
from conftest import build_tiny, fake_samples
from fdlib.study.conditions import Condition
from fdlib.core.store import Store
from fdlib.study.runner import run_study
put = Store.put
def slow_put(self, rows):
    put(self, rows)
    time.sleep(0.4)
Store.put = slow_put
t = build_tiny()
conds = [Condition.baseline(), Condition.split(0.1, "contextual", 2), Condition.ablate("random", 2, seed=0)]
run_study(t.model, fake_samples(12), conds, heads={{"contextual": {ranked!r}}}, store={store!r}, progress=False, max_new_tokens=6)
"""


def test_resume_after_sigkill_equals_an_uninterrupted_run(tiny, tmp_path):
    store = tmp_path / "killed.sqlite"
    code = _CHILD.format(tests=str(Path(__file__).parent), ranked=RANKED, store=str(store))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if store.exists():
                try:
                    with Store(store) as db:
                        if len(db) >= 6:
                            break
                except Exception:
                    pass
            if proc.poll() is not None:
                pytest.fail("the child finished before it could be killed")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    with Store(store) as db:
        partial = len(db)
    assert 6 <= partial < 36 and partial % 3 == 0, partial  # whole samples only
    conds = [Condition.baseline(), Condition.split(0.1, "contextual", 2), Condition.ablate("random", 2, seed=0)]
    kw = dict(heads={"contextual": RANKED}, progress=False, max_new_tokens=6)
    resumed = run_study(tiny.model, fake_samples(12), conds, store=store, **kw)
    clean = run_study(tiny.model, fake_samples(12), conds, store=tmp_path / "clean.sqlite", **kw)
    with Store(store) as db:
        keys = [(r.sample_id, r.condition) for r in db.rows(arrays=False)]
    assert len(keys) == len(set(keys)) == 36
    cols = ["sample_id", "condition", "answer", "score", "setup_sha"] if "setup_sha" in clean else ["sample_id", "condition", "answer", "score"]
    key = ["sample_id", "condition"]
    r, c = resumed.sort_values(key).reset_index(drop=True), clean.sort_values(key).reset_index(drop=True)
    assert r[cols].equals(c[cols])
    for x, y in zip(r.relevant_score, c.relevant_score):
        if x is not None:
            np.testing.assert_array_equal(x, y)


def test_shards_cover_the_samples_once(tiny, tmp_path):
    from fdlib.core.store import merge_stores

    conds = [Condition.baseline(), Condition.split(0.3, "contextual", 2)]
    kw = dict(heads={"contextual": RANKED}, progress=False, max_new_tokens=4)
    parts = []
    for i in range(3):
        path = tmp_path / f"shard{i}.sqlite"
        run_study(tiny.model, fake_samples(5), conds, store=path, shard=(i, 3), **kw)
        parts.append(path)
    assert merge_stores(parts, tmp_path / "all.sqlite") == 10
    whole = run_study(tiny.model, fake_samples(5), conds, store=tmp_path / "one.sqlite", **kw)
    merged = study_frame(tmp_path / "all.sqlite", conds)
    key = ["sample_id", "condition"]
    assert list(merged.sort_values(key).answer) == list(whole.sort_values(key).answer)


def test_runner_refuses_before_any_forward(tiny):
    samples = fake_samples(2)
    with pytest.raises(ValueError, match="ranking 'retrieval'"):
        run_study(tiny.model, samples, [Condition.split(0.1, "retrieval", 2)], progress=False)
    with pytest.raises(ValueError, match="needs 9 heads"):
        run_study(tiny.model, samples, [Condition.split(0.1, "contextual", 9)], heads={"contextual": RANKED}, progress=False)
    with pytest.raises(ValueError, match="directions 'd'"):
        run_study(tiny.model, samples, [Condition.focus(0.5, "d", "contextual", 2)], heads={"contextual": RANKED}, progress=False)
    with pytest.raises(ValueError, match="duplicate"):
        run_study(tiny.model, samples, [Condition.baseline(), Condition.baseline()], progress=False)
    with pytest.raises(ValueError, match="input 'gold'"):
        run_study(tiny.model, samples, [Condition.baseline("gold")], progress=False)
    with pytest.raises(ValueError, match="no span"):
        run_study(tiny.model, fake_samples(1, "negative"), [Condition.split(0.1, "contextual", 2, input="negative")],
                  heads={"contextual": RANKED}, progress=False)


def test_nq_and_task_samples_share_one_protocol():
    from fdlib.data.tasks import TaskSample

    qa = fake_samples(1)[0]
    assert qa.named_spans()["relevant"] == qa.gold_span and qa.named_spans()["sink"] == fdlib.Span(0, 1)
    assert [n for n in qa.named_spans() if n.startswith("doc")] == ["doc0", "doc1", "doc2"]
    assert qa.metric == "em" and qa.score("it is w7") == 1.0 and qa.score("w8") == 0.0
    assert "relevant" not in fake_samples(1, "negative")[0].named_spans()
    ids = torch.arange(5, 35)
    task = TaskSample(id="niah/30/s0/0", task="niah", text="", input_ids=ids, relevant_span=fdlib.Span(10, 16),
                      answers=("w7",), question="q", depth=0.5)
    assert task.variant == "long" and task.metric == "em" and task.score("w7") == 1.0
    for s in (qa, task):
        st = StudySample(s)
        assert st.spans() == s.named_spans() and st.score("w7") == s.score("w7") and st.variant == s.variant


def test_automatic_alpha_probe_choice_and_runs(tiny):
    """focus_auto: one probe step over the shared prefix measures the heads' sink share at the
    first answer row for every candidate alpha (checked against the bridge's recorder), the
    closest to the target wins, and the row decodes as focus directions at that alpha."""
    from fdlib.interventions.engine import first_row_scores
    from fdlib.interventions.row import RowIntervention
    from fdlib.model.decoding import SpanRecorder, hooks, prefill
    from fdlib.study.conditions import AUTO_ALPHAS
    from fdlib.study.runner import StudySample, choose_alpha

    s = fake_samples(1)[0]
    dirs = _dirs(tiny.model, 3)
    heads = RANKED[:3]
    prefix = prefill(tiny.model, s.input_ids)
    rows = [RowIntervention(tuple(heads), directions=dirs, alpha=a) for a in AUTO_ALPHAS]
    sink = {"sink": fdlib.Span(0, 1)}
    got = first_row_scores(tiny.model, prefix, rows, sink)
    P = s.n_tokens - 1
    for i, a in enumerate(AUTO_ALPHAS):  # the reference: the bridge's last prompt row under the hooks
        rec = SpanRecorder(sink, from_pos=P, n_layers=tiny.model.cfg.n_layers)
        with fdlib.focus_directions(tiny.model, dirs, heads, a, from_pos=P), hooks(tiny.model, rec.fwd_hooks()):
            tiny.model(prefix.tokens[None, -1:], past_key_values=prefix.cache, return_type=None)
        prefix.cache.crop(-1)
        torch.testing.assert_close(got[i, ..., 0], rec.mean()["sink"], atol=1e-5, rtol=0)
    idx = torch.tensor(heads)
    shares = got[:, idx[:, 0], idx[:, 1], 0].mean(-1)
    assert shares.max() - shares.min() > 1e-3  # the candidates differ, so the choice means something
    target = float(shares[4] + shares[5]) / 2 + 1e-4  # nearer candidate 5 than 4
    want = AUTO_ALPHAS[int(torch.argmin((shares - target).abs()))]
    assert choose_alpha(tiny.model, prefix, StudySample(s), heads, dirs, target) == want
    conds = [Condition.focus_auto(target, "d", "contextual", 3), Condition.focus(want, "d", "contextual", 3)]
    kw = dict(heads={"contextual": RANKED}, directions={"d": dirs}, progress=False, max_new_tokens=6)
    a = run_study(tiny.model, [s], conds, **kw)
    b = run_study(tiny.model, [s], conds, engine="sequential", **kw)
    assert list(a.answer) == list(b.answer) and a.answer[0] == a.answer[1]
    assert a.chosen_alpha[0] == want and b.chosen_alpha[0] == want
    np.testing.assert_allclose(a.relevant_score[0], a.relevant_score[1], atol=1e-6)
    with pytest.raises(ValueError, match="target sink share"):
        Condition.focus_auto(1.5, "d", "contextual", 3)

    # relative target: a fraction of the input's own unsteered share (candidate alpha 0)
    kept = float(shares[7] + shares[8]) / 2 / float(shares[0]) + 1e-4
    want = AUTO_ALPHAS[int(torch.argmin((shares - kept * shares[0]).abs()))]
    assert choose_alpha(tiny.model, prefix, StudySample(s), heads, dirs, kept, rule="focus_kept") == want
    conds = [Condition.focus_kept(kept, "d", "contextual", 3), Condition.focus(want, "d", "contextual", 3),
             Condition.focus_auto(kept, "d", "contextual", 3)]
    a = run_study(tiny.model, [s], conds, **kw)
    assert a.chosen_alpha[0] == want and a.answer[0] == a.answer[1] and a.condition[0] == f"focus_kept|d|kept={kept:g}|contextual|k=3"
    assert a.chosen_alpha[2] == AUTO_ALPHAS[int(torch.argmin((shares - kept).abs()))]  # the same value, absolute
    with pytest.raises(ValueError, match="fraction of the sink share kept"):
        Condition.focus_kept(0.0, "d", "contextual", 3)
    with pytest.raises(ValueError, match="alpha 0 as the first candidate"):
        choose_alpha(tiny.model, prefix, StudySample(s), heads, dirs, kept, alphas=(0.5, 1.0), rule="focus_kept")

    # the working rule: the smallest alpha that moves the share `drop` of the input's own sink
    # (tokens 0-1) share off the sink, measured on the same heads and row
    from fdlib.study.conditions import DROP_ALPHAS

    rows = [RowIntervention(tuple(heads), directions=dirs, alpha=a) for a in DROP_ALPHAS]
    sink2 = first_row_scores(tiny.model, prefix, rows, {"sink2": fdlib.Span(0, 2)})[:, idx[:, 0], idx[:, 1], 0].mean(-1)
    ratio = sink2 / sink2[0]
    assert ratio[-1] < ratio[3] < 1  # the directions do move attention off the sink here
    drop = 1 - float(ratio[3] + ratio[4]) / 2 if ratio[4] < ratio[3] else 1 - float(ratio[3])
    want = DROP_ALPHAS[int((ratio <= 1 - drop).nonzero()[0])]
    assert want > 0 and choose_alpha(tiny.model, prefix, StudySample(s), heads, dirs, drop, rule="focus_drop") == want
    unreachable = 1 - float(ratio.min()) / 2
    assert choose_alpha(tiny.model, prefix, StudySample(s), heads, dirs, unreachable, rule="focus_drop") == DROP_ALPHAS[-1]
    conds = [Condition.focus_drop(drop, "d", "contextual", 3), Condition.focus(want, "d", "contextual", 3)]
    a = run_study(tiny.model, [s], conds, **kw)
    b = run_study(tiny.model, [s], conds, engine="sequential", **kw)
    assert a.chosen_alpha[0] == want == b.chosen_alpha[0] and a.answer[0] == a.answer[1] == b.answer[0]
    assert a.condition[0] == f"focus_drop|d|drop={drop:g}|contextual|k=3"
    with pytest.raises(ValueError, match="share of the sink share removed"):
        Condition.focus_drop(1.0, "d", "contextual", 3)


def test_task_samples_are_their_own_groups(tiny, tmp_path):
    """Each task sample is a transaction and shard unit of its own (two samples of one task are
    not one group), while an NQ question's variants share one."""
    from fdlib.data.tasks import TaskSample

    def task(i):
        ids = torch.randint(5, 64, (30,), generator=torch.Generator().manual_seed(i))
        return TaskSample(id=f"niah/30/s0/{i}", task="niah", text="", input_ids=ids, relevant_span=fdlib.Span(10, 16),
                          answers=("w7",), question="q", depth=0.5)

    samples = [task(0), task(1), task(2)]
    assert len({StudySample(s).group for s in samples}) == 3
    assert {s.group for s in fake_samples(1) + fake_samples(1, "gold")} == {"s0"}
    conds = [Condition.baseline(), Condition.split(0.1, "contextual", 2)]
    kw = dict(heads={"contextual": RANKED}, progress=False, max_new_tokens=3)
    first = run_study(tiny.model, samples, conds, store=tmp_path / "a.sqlite", shard=(0, 3), **kw)
    assert set(first.sample_id) == {"niah/30/s0/0"}


# --- the dtype in a row's setup ----------------------------------------------------------------


def _bf16_twin(tiny):
    """A bridge over a copy of the tiny model's weights, in bfloat16."""
    from conftest import build_llama_config, build_tokenizer
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(build_llama_config()).eval()
    hf.load_state_dict(tiny.hf.state_dict())  # the reference copy: the same weights as the tiny bridge
    return fdlib.load_model(hf, build_tokenizer(), dtype="bf16")


def test_a_float32_setup_names_no_dtype_and_hashes_as_before(tiny):
    """Pinned: the setup a float32 row had before the dtype was a setting, built here by its
    recipe, is the one `_plan` gives now, with the same setup_sha (so every committed row stays valid)."""
    import hashlib
    import json

    from fdlib.core.heads import labels
    from fdlib.study import runner

    s = StudySample(fake_samples(1)[0])
    conds = [Condition.baseline(), Condition.split(0.1, "contextual", 2)]
    planned = runner._plan(tiny.model, s, conds, {"contextual": RANKED}, {}, 6)
    for p, heads in zip(planned, ([], RANKED[:2])):
        before = {**runner.model_fingerprint(tiny.model), "prompt_sha": s.fingerprint, "max_new_tokens": 6,
                  "decoding": runner.DECODING, "condition": p.condition.key, "heads": sorted(labels(heads))}
        if p.condition.is_reweight:
            span = s.spans()[p.condition.span]
            before["span"] = [span.start, span.end]
        assert p.setup == before and "dtype" not in p.setup
        assert p.setup_sha == hashlib.sha1(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
        assert runner.setup_dtype(p.setup) == "float32"
    assert runner.dtype_setup(tiny.model) == {}


def test_a_bfloat16_row_names_its_dtype_and_is_not_a_float32_row(tiny, tmp_path):
    from fdlib.core.store import Row
    from fdlib.experiments import compare
    from fdlib.study import runner

    bf16 = _bf16_twin(tiny)
    s = StudySample(fake_samples(1)[0])
    conds = [Condition.baseline(), Condition.split(0.1, "contextual", 2)]
    ours = runner._plan(bf16, s, conds, {"contextual": RANKED}, {}, 6)
    theirs = runner._plan(tiny.model, s, conds, {"contextual": RANKED}, {}, 6)
    for a, b in zip(ours, theirs):
        assert a.setup["dtype"] == "bfloat16" and runner.setup_dtype(a.setup) == "bfloat16"
        assert a.setup_sha != b.setup_sha
        assert {k: v for k, v in a.setup.items() if k not in ("dtype", "model_sha")} == \
            {k: v for k, v in b.setup.items() if k != "model_sha"}
    # a store of float32 rows refuses a bfloat16 run, naming the dtype (before any forward)
    store = tmp_path / "s.sqlite"
    kw = dict(heads={"contextual": RANKED}, store=store, progress=False, max_new_tokens=4)
    frame = run_study(tiny.model, fake_samples(2), conds, **kw)
    assert list(frame.dtype) == ["float32"] * 4 and "dtype" in frame.columns
    with pytest.raises(ValueError, match="dtype: stored None, now 'bfloat16'"):
        run_study(bf16, fake_samples(2), conds, **kw)
    # study_frame's dtype column: the setup's, float32 where it names none
    with Store(store) as db:
        db.put([Row("other", "baseline|long", "x", {"condition": "baseline|long", "metric": "em", "score": 0.0,
                                                     "setup": {"dtype": "bfloat16"}}, {})])
    got = study_frame(store).set_index(["sample_id", "condition"]).dtype
    assert got[("other", "baseline|long")] == "bfloat16" and (got.drop(("other", "baseline|long")) == "float32").all()
    # a kept result's setup follows the same rule
    samples, heads = fake_samples(1), RANKED[:2]
    assert "dtype" not in compare.prior_setup(tiny.model, samples, {}, heads, {})
    assert compare.prior_setup(bf16, samples, {}, heads, {})["dtype"] == "bfloat16"


def test_directions_untrained_on_a_head_are_refused(tiny):
    """A directions set trained on some heads only (zeros elsewhere) applied to a head it holds
    no vector for would be a silent no-op: refused, naming the head."""
    from fdlib.interventions.directions import FocusDirections

    dirs = FocusDirections.zeros(tiny.model)
    dirs.d_q[1, 2] = 1.0
    spans = fake_samples(1)[0].named_spans()
    Condition.focus(0.5, "d", "contextual", 1).row([(1, 2)], spans, {"d": dirs})
    with pytest.raises(ValueError, match=r"no trained vector for heads \['L0H1'\]"):
        Condition.focus(0.5, "d", "contextual", 2).row([(1, 2), (0, 1)], spans, {"d": dirs})
