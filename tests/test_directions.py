"""Focus directions on a tiny GQA Llama: logits against plain transformers eager attention with
alpha * d added to the chosen heads' queries and keys by separate reference code; the d_K
no-op after RoPE; the file format."""

import pytest
import torch
from transformers import AttentionInterface

import fdlib
from fdlib.interventions.directions import FocusDirections, focus_directions
from fdlib.model.decoding import prefill

HEADS = [(0, 1), (1, 3), (1, 2)]


def reference_rotation(n_pos, d, theta):
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv[None]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def rotate_vec(v, cos, sin):  # [d] -> [n_pos, d], independent of fdlib's helper
    h = v.shape[0] // 2
    return v.double()[None] * cos + torch.cat([-v[h:], v[:h]]).double()[None] * sin


def use_reference(hf, dirs, heads, alpha, from_pos):
    theta = getattr(hf.config, "rope_theta", None) or hf.config.rope_parameters["rope_theta"]

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        n_q, n_k, d = query.shape[-2], key.shape[-2], query.shape[-1]
        g = module.num_key_value_groups
        q = query.double().clone()
        k = key.double().repeat_interleave(g, dim=1)  # per query head from here on
        k_plain = k.clone()  # what rows before from_pos attend to (they are untouched)
        v = value.repeat_interleave(g, dim=1)
        cos, sin = reference_rotation(n_k, d, theta)
        for l, h in heads:
            if l != module.layer_idx:
                continue
            dq, dk = alpha * dirs.d_q[l, h].double(), alpha * dirs.d_k[l, h].double()
            rows = torch.arange(n_k - n_q, n_k)
            keep = rows >= from_pos
            if dirs.placement == "post_rope":
                q[0, h, keep] += dq
                k[0, h] += dk
            else:
                q[0, h, keep] += rotate_vec(dq, cos, sin)[rows[keep]]
                k[0, h] += rotate_vec(dk, cos, sin)
        causal = torch.ones(n_q, n_k, dtype=torch.bool).tril(diagonal=n_k - n_q)
        scores = (q @ k.transpose(-1, -2)) * scaling
        early = torch.arange(n_k - n_q, n_k) < from_pos
        scores[:, :, early] = ((q @ k_plain.transpose(-1, -2)) * scaling)[:, :, early]
        scores = scores.masked_fill(~causal, float("-inf"))
        w = torch.softmax(scores, dim=-1).to(query.dtype)
        return (w @ v).transpose(1, 2).contiguous(), w

    AttentionInterface.register("fdlib_reference_directions", attention)
    hf.set_attn_implementation("fdlib_reference_directions")


def random_dirs(tiny, placement, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    cfg = tiny.model.cfg
    shape = (cfg.n_layers, cfg.n_heads, cfg.d_head)
    return FocusDirections(torch.randn(shape, generator=g) * scale, torch.randn(shape, generator=g) * scale,
                           fdlib.model.loading.model_name(tiny.model), placement=placement)


@pytest.mark.parametrize("placement", ["post_rope", "pre_rope"])
@pytest.mark.parametrize("from_pos", [0, 17])
def test_logits_match_reference(tiny, placement, from_pos):
    torch.manual_seed(8)
    ids = torch.randint(5, 64, (24,))
    dirs = random_dirs(tiny, placement)
    use_reference(tiny.hf, dirs, HEADS, 0.7, from_pos)
    try:
        with torch.no_grad():
            ref = tiny.hf(ids[None]).logits[0]
            plain = tiny.model(ids[None], return_type="logits")[0]
            with focus_directions(tiny.model, dirs, HEADS, 0.7, from_pos=from_pos):
                got = tiny.model(ids[None], return_type="logits")[0]
    finally:
        tiny.hf.set_attn_implementation("eager")
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert (got - plain).abs().max() > 1e-3


def test_alpha_zero_and_post_rope_d_k_alone_are_identities(tiny):
    ids = torch.randint(5, 64, (1, 20))
    dirs = random_dirs(tiny, "post_rope")
    only_k = FocusDirections(torch.zeros_like(dirs.d_q), dirs.d_k * 10, dirs.model_name, "post_rope")
    pre_k = FocusDirections(torch.zeros_like(dirs.d_q), dirs.d_k * 10, dirs.model_name, "pre_rope")
    with torch.no_grad():
        plain = tiny.model(ids, return_type="logits")
        with focus_directions(tiny.model, dirs, HEADS, 0.0):
            zero = tiny.model(ids, return_type="logits")
        with focus_directions(tiny.model, only_k, HEADS, 1.0):
            k_post = tiny.model(ids, return_type="logits")
        with focus_directions(tiny.model, pre_k, HEADS, 1.0):
            k_pre = tiny.model(ids, return_type="logits")
    torch.testing.assert_close(zero, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(k_post, plain, atol=1e-5, rtol=0)  # a row constant cancels in the softmax
    assert (k_pre - plain).abs().max() > 1e-3  # before RoPE, R_j d_K differs per key: it matters


@pytest.mark.parametrize("placement", ["post_rope", "pre_rope"])
def test_response_only_from_shared_prefill_equals_full_forward(tiny, placement):
    ids = torch.randint(5, 64, (26,))
    dirs = random_dirs(tiny, placement, seed=1, scale=1.0)
    with torch.no_grad(), focus_directions(tiny.model, dirs, HEADS, 0.5, from_pos=25):
        full = tiny.model(ids[None], return_type="logits")[0, -1]
        prefix = prefill(tiny.model, ids)
        step = tiny.model(ids[None, -1:], past_key_values=prefix.cache, return_type="logits")[0, -1]
    with torch.no_grad():
        plain = tiny.model(ids[None], return_type="logits")[0, -1]
    torch.testing.assert_close(step, full, atol=1e-4, rtol=0)
    assert (full - plain).abs().max() > 1e-3


def test_save_load_round_trip_and_validation(tiny, tmp_path):
    dirs = random_dirs(tiny, "pre_rope")
    dirs = FocusDirections(dirs.d_q, dirs.d_k, dirs.model_name, "pre_rope", "long", 7, {"lr": 1e-3, "epochs": 10})
    path = dirs.save(tmp_path / "d.safetensors")
    back = FocusDirections.load(path, model=tiny.model)
    assert torch.equal(back.d_q, dirs.d_q) and torch.equal(back.d_k, dirs.d_k)
    assert (back.placement, back.training_set, back.split_seed, back.settings) == ("pre_rope", "long", 7, {"lr": 1e-3, "epochs": 10})
    other_shape = FocusDirections(dirs.d_q[:, :3], dirs.d_k[:, :3], dirs.model_name)
    with pytest.raises(ValueError, match=r"shape \(2, 3, 8\).*has \(2, 4, 8\)"):
        FocusDirections.load(other_shape.save(tmp_path / "s.safetensors"), model=tiny.model)
    renamed = FocusDirections(dirs.d_q, dirs.d_k, "some/other-model")
    with pytest.raises(ValueError, match="trained on 'some/other-model'"):
        FocusDirections.load(renamed.save(tmp_path / "n.safetensors"), model=tiny.model)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable fdlib focus-directions file"):
        FocusDirections.load(tmp_path / "cut.safetensors")
    with pytest.raises(ValueError, match="placement"):
        FocusDirections(dirs.d_q, dirs.d_k, "x", placement="mid_rope")
    with pytest.raises(ValueError, match=r"head L5H0 is outside"):
        with focus_directions(tiny.model, dirs, [(5, 0)], 1.0):
            pass


def planted_activations(tiny, n=6, placement="post_rope"):
    """Prompts of random tokens with a 'relevant' span; the response is the prompt's tail."""
    from fdlib.interventions.training import collect_activations

    out = []
    for i in range(n):
        ids = torch.randint(5, 64, (30,), generator=torch.Generator().manual_seed(100 + i))
        out.append(collect_activations(tiny.model, ids, 24, fdlib.Span(8, 14), HEADS, placement))
    return out


def test_collected_activations_reproduce_the_model_pattern(tiny):
    from fdlib.interventions.training import span_score

    ids = torch.randint(5, 64, (30,), generator=torch.Generator().manual_seed(3))
    span = fdlib.Span(8, 14)
    want = fdlib.contextual_scores(tiny.model, ids, 24, {"c": span})["c"]
    for placement in ("post_rope", "pre_rope"):
        from fdlib.interventions.training import _rope_cos_sin, collect_activations

        acts = collect_activations(tiny.model, ids, 24, span, HEADS, placement)
        zeros = torch.zeros(len(HEADS), tiny.model.cfg.d_head)
        rotation = None
        if placement == "pre_rope":
            cos, sin = _rope_cos_sin(tiny.model, 30, acts.q)
            rotation = (cos.float(), sin.float())
        got = span_score(acts, zeros, zeros, scale=tiny.model.cfg.d_head ** -0.5, rotation=rotation)
        torch.testing.assert_close(got, torch.stack([want[l, h] for l, h in HEADS]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("placement", ["post_rope", "pre_rope"])
def test_training_raises_the_relevant_score_deterministically(tiny, placement):
    from fdlib.interventions.training import train_focus_directions

    acts = planted_activations(tiny, placement=placement)
    a = train_focus_directions(tiny.model, acts, HEADS, placement=placement, lr=0.3, epochs=10, progress=False)
    b = train_focus_directions(tiny.model, acts, HEADS, placement=placement, lr=0.3, epochs=10, progress=False)
    assert a.losses[-1] < a.losses[0]
    assert (a.score_after > a.score_before + 0.02).all()
    assert torch.equal(a.directions.d_q, b.directions.d_q) and a.losses == b.losses
    # After RoPE the gradient of S_C with respect to d_K is zero up to float rounding (the term
    # it adds is constant along each row); before RoPE it is a real gradient.
    from fdlib.interventions.training import _rope_cos_sin, span_score

    d_q = torch.randn(len(HEADS), tiny.model.cfg.d_head, generator=torch.Generator().manual_seed(0)).requires_grad_()
    d_k = torch.zeros(len(HEADS), tiny.model.cfg.d_head, requires_grad=True)
    rotation = None
    if placement == "pre_rope":
        cos, sin = _rope_cos_sin(tiny.model, 30, acts[0].q)
        rotation = (cos.float(), sin.float())
    span_score(acts[0], d_q, d_k, scale=tiny.model.cfg.d_head ** -0.5, rotation=rotation).sum().backward()
    if placement == "post_rope":  # computed as the key bias d_Q . k_j: d_K takes no part
        assert d_k.grad is None and d_q.grad.abs().max() > 0
        from fdlib.interventions.training import attention_rows

        a0, dk = acts[0], torch.randn(len(HEADS), tiny.model.cfg.d_head)
        full = torch.einsum("hrd,htd->hrt", a0.q + d_q[:, None], a0.k + dk[:, None]) * tiny.model.cfg.d_head ** -0.5
        T, rows = a0.k.shape[1], torch.arange(a0.response_start, a0.response_start + a0.q.shape[1])
        full = full.masked_fill(torch.arange(T)[None, None, :] > rows[None, :, None], float("-inf")).softmax(-1)
        got = attention_rows(a0, d_q.detach(), dk, scale=tiny.model.cfg.d_head ** -0.5)
        torch.testing.assert_close(got, full, atol=1e-6, rtol=1e-5)  # the full product, d_K included
    else:
        assert d_k.grad.abs().max() / d_q.grad.abs().max() > 1e-2
    # the trained directions, applied with focus_directions, raise the model's own score
    ids = torch.randint(5, 64, (30,), generator=torch.Generator().manual_seed(100))
    span = fdlib.Span(8, 14)
    plain = fdlib.contextual_scores(tiny.model, ids, 24, {"c": span})["c"]
    with focus_directions(tiny.model, a.directions, HEADS, 1.0):
        boosted = fdlib.contextual_scores(tiny.model, ids, 24, {"c": span})["c"]
    for l, h in HEADS:
        assert boosted[l, h] > plain[l, h]


def test_contrastive_loss_and_norm_bound(tiny):
    """loss='contrast' trains on S_C - S_IRmax and raises it; max_norm keeps every direction
    within its bound (and binds: unbounded training goes past it); bad settings are refused
    before a step."""
    from fdlib.interventions.training import collect_activations, contrast_score, train_focus_directions

    others = [fdlib.Span(0, 6), fdlib.Span(16, 22)]
    acts = [collect_activations(tiny.model, torch.randint(5, 64, (30,), generator=torch.Generator().manual_seed(100 + i)),
                                24, fdlib.Span(8, 14), HEADS, "post_rope", others=others) for i in range(6)]
    kw = dict(lr=0.3, epochs=10, progress=False)
    free = train_focus_directions(tiny.model, acts, HEADS, **kw)
    contrast = train_focus_directions(tiny.model, acts, HEADS, loss="contrast", **kw)
    assert contrast.directions.settings["loss"] == "contrast" and contrast.losses[-1] < contrast.losses[0]
    scale = tiny.model.cfg.d_head ** -0.5

    def gap(d_q, d_k):
        return torch.stack([contrast_score(a, d_q, d_k, scale=scale) for a in acts]).mean(0)

    def trained(result):
        return [torch.stack([d[l, h] for l, h in HEADS]) for d in (result.directions.d_q, result.directions.d_k)]

    zeros = torch.zeros(len(HEADS), tiny.model.cfg.d_head)
    assert (gap(*trained(contrast)) > gap(zeros, zeros)).all()
    # it optimises the gap, which the relevant loss only follows
    assert gap(*trained(contrast)).mean() > gap(*trained(free)).mean()
    bound = 0.5 * free.directions.d_q.norm(dim=-1).max().item()
    capped = train_focus_directions(tiny.model, acts, HEADS, max_norm=bound, **kw)
    for d in (capped.directions.d_q, capped.directions.d_k):
        assert d.norm(dim=-1).max() <= bound * (1 + 1e-5)
    assert capped.directions.settings["max_norm"] == bound and (capped.score_after > capped.score_before).all()
    with pytest.raises(ValueError, match="loss must be one of"):
        train_focus_directions(tiny.model, acts, HEADS, loss="sink", **kw)
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        train_focus_directions(tiny.model, acts, HEADS, max_norm=0.0, **kw)
    with pytest.raises(ValueError, match="6 of 6 training examples have none"):
        train_focus_directions(tiny.model, planted_activations(tiny), HEADS, loss="contrast", **kw)


def test_activation_cache_round_trip_resume_and_errors(tmp_path):
    """The on-disk cache on a tiny model reading real NQ prompts: what it returns equals a fresh
    collection; an interrupted build resumes at the missing example only; bad files fail clearly."""
    from conftest import build_tiny
    from safetensors import safe_open

    from fdlib.interventions.training import (
        ActivationCache,
        CachedActivations,
        build_activation_cache,
        collect_activations,
    )

    tiny = build_tiny(max_position_embeddings=4096)
    cache = ActivationCache(tmp_path, tiny.model, "long", dtype=torch.float32, max_new_tokens=4)
    examples = build_activation_cache(tiny.model, cache, size=3, n_docs=3, progress=False)
    assert 1 <= len(examples) <= 3 and not list(cache.dir.glob(".*"))  # no temp file left behind
    heads = [(0, 1), (1, 3)]
    for ex in examples:
        ids = safe_open(str(ex.path), "pt").get_tensor("tokens")
        assert ex.span.end <= ex.response_start < ex.n_tokens == len(ids)
        # the other two documents' spans are kept, apart from the gold one and each other
        assert len(ex.others) == 2 and not any(o.overlaps(ex.span) for o in ex.others)
        assert not ex.others[0].overlaps(ex.others[1]) and all(o.end <= ex.response_start for o in ex.others)
        for placement in ("post_rope", "pre_rope"):
            want = collect_activations(tiny.model, ids, ex.response_start, ex.span, heads, placement)
            got = cache.read(ex, heads, placement)
            assert got.others == ex.others
            torch.testing.assert_close(got.q, want.q, atol=1e-5, rtol=0)
            torch.testing.assert_close(got.k, want.k, atol=1e-5, rtol=0)
    lazy = CachedActivations(cache, examples, heads, "post_rope")
    assert len(lazy) == len(examples) and lazy[0].q.shape[0] == 2
    # resume: remove one example; a rebuild recomputes that one and leaves the others untouched
    files = sorted(cache.dir.glob("*.safetensors"))
    stamps = {p: p.stat().st_mtime_ns for p in files[1:]}
    files[0].unlink()
    again = build_activation_cache(tiny.model, cache, size=3, n_docs=3, progress=False)
    assert [e.id for e in again] == [e.id for e in examples] and files[0].exists()
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert cache.nbytes() == sum(p.stat().st_size for p in files)
    files[1].write_bytes(files[1].read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable fdlib activation file"):
        cache.example(files[1].stem)
    other = ActivationCache(tmp_path, build_tiny(seed=1).model, "long", max_new_tokens=4)
    assert other.dir == cache.dir  # same name (both tiny) ...
    with pytest.raises(ValueError, match="training_set"):
        ActivationCache(tmp_path, tiny.model, "short")


def test_key_bias_is_d_q_dot_keys_after_rope(tiny):
    """The view's bias, read from the model's scores, equals alpha * d_Q . k_j * scale plus a
    row constant, computed from the cached keys by hand."""
    from conftest import fake_samples

    from fdlib.interventions.directions import key_bias

    s = fake_samples(1)[0]
    dirs = random_dirs(tiny, "post_rope", scale=1.0)
    l, h = HEADS[0]
    bias = key_bias(tiny.model, s, dirs, (l, h), 0.8)
    prefix = prefill(tiny.model, s.input_ids)
    with torch.no_grad():
        tiny.model(s.input_ids[None, -1:], past_key_values=prefix.cache, return_type=None)
    keys = prefix.cache.layers[l].keys[0, h // 2].float()  # [T, d]
    want = 0.8 * keys @ dirs.d_q[l, h] * tiny.model.cfg.d_head ** -0.5
    diff = bias - want
    torch.testing.assert_close(diff, diff[:1].expand_as(diff), atol=1e-4, rtol=0)  # equal up to a constant


def test_focus_table_shape_and_direction(tiny):
    from conftest import fake_samples

    from fdlib.experiments.contextual import focus_table, table3_conditions
    from fdlib.interventions.training import train_focus_directions
    from fdlib.study.runner import run_study

    acts = planted_activations(tiny)
    trained = train_focus_directions(tiny.model, acts, HEADS, lr=0.3, epochs=10, progress=False).directions
    samples = fake_samples(3) + fake_samples(2, "gold")
    frame = run_study(tiny.model, samples, table3_conditions(samples, 1.0, HEADS), directions={"focus": trained},
                      progress=False)
    t = focus_table(tiny.model, frame, samples, 1.0, HEADS)
    assert set(t.index.get_level_values("case")) == {"long", "gold"}
    assert set(t.index.get_level_values("directions")) == {"without", "alpha=1"}
    assert {"R", "IR", "IR-max", "Sink", "Sink 0-1", "EM", "n"} <= set(t.columns)
    assert len(t) == 2 * 2 * len(HEADS)
    # the authors' sink (tokens 0-1) holds at least token 0's share, recorded from the same rows
    assert (t["Sink 0-1"] >= t["Sink"] - 1e-6).all() and (t["Sink 0-1"] > t["Sink"]).any()


def test_shuffled_training_set_puts_the_gold_document_anywhere(tmp_path):
    """`shuffled` training prompts: the k-document prompt with the gold document at a position
    drawn per question (reproducibly), so directions cannot learn one position."""
    from conftest import build_tiny

    from fdlib.data.nq import NQBuilder
    from fdlib.interventions.training import ActivationCache, build_activation_cache, shuffled_position

    positions = [shuffled_position(f"nq{i:04d}", 20) for i in range(200)]
    assert set(positions) == set(range(1, 21)) and positions == [shuffled_position(f"nq{i:04d}", 20) for i in range(200)]
    tiny = build_tiny(max_position_embeddings=4096)
    cache = ActivationCache(tmp_path, tiny.model, "shuffled", dtype=torch.float32, max_new_tokens=4)
    examples = build_activation_cache(tiny.model, cache, size=4, n_docs=5, progress=False)
    builder = NQBuilder(tiny.tokenizer)
    assert examples
    for ex in examples:
        example = next(e for e in builder.examples if e.id == ex.id)
        want = builder.sample(example, n_docs=5, gold_position=shuffled_position(ex.id, 5))
        assert ex.span == want.gold_span and ex.response_start == want.n_tokens


def test_positions_training_set_caches_only_the_chosen_heads(tmp_path):
    """The authors' recipe (`positions`): per question one example per gold position, sharing
    R_g (computed once, kept in answers.json); only the chosen heads' queries and their KV heads'
    keys are stored, in half precision, and read back equal to a fresh collection; heads the
    cache does not hold are refused by name; a cache built for fewer heads is rebuilt."""
    import json

    from conftest import build_tiny
    from safetensors import safe_open

    from fdlib.data.nq import NQBuilder
    from fdlib.interventions.training import ActivationCache, build_activation_cache, collect_activations

    tiny = build_tiny(max_position_embeddings=4096)
    heads = [(0, 1), (1, 3), (1, 2)]  # (1, 2) and (1, 3) share KV head 1 of layer 1
    cache = ActivationCache(tmp_path, tiny.model, "positions", heads=heads, max_new_tokens=4)
    assert cache.dir.name == "positions-t4"
    examples = build_activation_cache(tiny.model, cache, size=2, n_docs=5, positions=(1, 3, 5), progress=False)
    answers = json.loads((cache.dir / "answers.json").read_text())
    assert len(answers) == 2 and all(len(a) <= 4 for a in answers.values())
    usable = [q for q, a in answers.items() if a]
    assert {e.id for e in examples} == {f"{q}/g{p}" for q in usable for p in (1, 3, 5)}
    builder = NQBuilder(tiny.tokenizer)
    by_id = {e.id: e for e in builder.examples}
    for ex in examples:
        qid = ex.id.split("/")[0]
        want_prompt = builder.sample(by_id[qid], n_docs=5, gold_position=ex.gold_position)
        assert ex.span == want_prompt.gold_span and ex.response_start == want_prompt.n_tokens
        with safe_open(str(ex.path), "pt") as f:
            ids = f.get_tensor("tokens")
            names = set(f.keys())
            assert ids[ex.response_start:].tolist() == answers[qid]  # one R_g for all positions
            assert names == {"tokens", "q.L0H1", "q.L1H3", "q.L1H2", "k.L0G0", "k.L1G1"}
            assert f.get_tensor("q.L0H1").dtype == torch.float16
        for placement in ("post_rope", "pre_rope"):
            want = collect_activations(tiny.model, ids, ex.response_start, ex.span, heads, placement)
            got = cache.read(ex, heads, placement)
            torch.testing.assert_close(got.q, want.q, atol=2e-3, rtol=1e-3)  # float16 storage
            torch.testing.assert_close(got.k, want.k, atol=2e-3, rtol=1e-3)
    with pytest.raises(ValueError, match=r"L0H0"):
        cache.read(examples[0], [(0, 0)], "post_rope")
    assert examples[0].id in cache
    more = ActivationCache(tmp_path, tiny.model, "positions", heads=heads + [(0, 0)], max_new_tokens=4)
    assert examples[0].id not in more  # the file lacks L0H0: a build with it recomputes the example
    held_out = build_activation_cache(tiny.model, more, size=2, n_docs=5, positions=(3,), progress=False)
    assert {e.gold_position for e in held_out} == {3}
    more.read(held_out[0], [(0, 0)], "post_rope")
    with pytest.raises(ValueError, match="gold positions must be in 1..5"):
        build_activation_cache(tiny.model, more, size=2, n_docs=5, positions=(6,), progress=False)


def test_prefill_continues_a_shared_prefix(tiny):
    """`prefill(reuse=...)` cuts an earlier cache back to the common prefix and continues it:
    the same keys and values as a fresh prefill, and a decode from it gives the same answer."""
    from fdlib.model.decoding import decode

    a = torch.arange(3, 40)
    b = torch.cat([a[:20], torch.arange(50, 60)])
    first = prefill(tiny.model, a)
    with torch.no_grad():  # the cache grows past the prompt, as after a forward over an answer
        tiny.model(a[None, -1:], past_key_values=first.cache, return_type=None)
    first.tokens = a
    reused, fresh = prefill(tiny.model, b, reuse=first), prefill(tiny.model, b)
    for x, y in zip(reused.cache.layers, fresh.cache.layers):
        assert x.keys.shape == y.keys.shape
        torch.testing.assert_close(x.keys, y.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(x.values, y.values, atol=1e-5, rtol=0)
    assert decode(tiny.model, reused, max_new_tokens=5).tokens == decode(tiny.model, fresh, max_new_tokens=5).tokens
