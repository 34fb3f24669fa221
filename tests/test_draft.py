"""Draft-model speculation (sps, specinfer, dyspec): lossless greedy and sampling, the draft's
own KV cache, tree forwards over a growing tree, and bad input."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxaccel
from conftest import ROWS, SMALL, TINY, chi2_pvalue, exact_pair_probs, perturbed, randomize
from jaxaccel.decode import methods
from jaxaccel.decode.draft import SpS, draft_probs
from jaxaccel.decode.dyspec import DySpec
from jaxaccel.decode.engine import DecodeState, StepContext
from jaxaccel.decode.sampling import make_sampling, target_probs
from jaxaccel.errors import InvalidArgumentError
from jaxaccel.model.transformer import init_params

PROMPTS = [[5, 9, 3, 5, 9, 3, 5], [7, 1, 8, 2, 8], [4] * 11, [60, 61]]
METHODS = [
    ("sps", {"budget": 3}),
    ("specinfer", {"widths": [2, 2]}),
    ("dyspec", {"budget": 8, "pops_per_round": 1}),
    ("dyspec", {"budget": 12, "pops_per_round": 4}),
    ("dyspec", {"budget": 10, "expand": "threshold", "threshold": 0.02}),
    ("sequoia", {"budget": 9, "acceptance": [0.6, 0.2, 0.1]}),
]



@pytest.fixture(scope="module")
def lm(tiny_params):
    return jaxaccel.from_params(TINY, tiny_params)


@pytest.fixture(scope="module")
def draft_lm(tiny_params):
    """A draft close to the target (its params perturbed): deep trees get accepted."""
    return jaxaccel.from_params(TINY, perturbed(tiny_params, 7, 0.01))


@pytest.fixture(scope="module")
def reference(lm):
    return lm.generate(PROMPTS, max_new_tokens=24).tokens


@pytest.mark.parametrize("method,opts", METHODS)
def test_greedy_is_identical_to_autoregressive_batch4_and_batch1(lm, draft_lm, reference, method, opts):
    out = lm.generate(PROMPTS, max_new_tokens=24, method=method, draft=draft_lm, **opts)
    assert out.tokens == reference
    assert out.stats["mean_accepted"] > 1.5
    single = lm.generate([PROMPTS[1]], max_new_tokens=24, method=method, draft=draft_lm, **opts)
    assert single.tokens[0] == reference[1]


def test_a_draft_identical_to_the_target_is_always_accepted(lm, reference):
    """With draft == target, every drafted chain token is the target's argmax: each step
    commits budget + 1 tokens. A stale or misplaced draft K/V (catch-up, compaction) would
    break this."""
    out = lm.generate(PROMPTS[:2], max_new_tokens=24, method="sps", budget=3, draft=lm)
    assert out.tokens == reference[:2]
    assert out.stats["steps"] == 6  # 24 tokens, 4 per step


class _KeepState(SpS):
    name = "test-keep-state"

    def final_state(self, method_state):
        return method_state


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_draft_cache_holds_the_committed_sequence(lm, draft_lm, monkeypatch, temperature):
    """After generation the draft's cache, slots [0, length), equals a fresh draft forward over
    prompt + generated tokens; length is at most the committed length."""
    from jaxaccel.model.transformer import forward

    monkeypatch.setitem(methods.METHODS, _KeepState.name, _KeepState)
    out = lm.generate(PROMPTS[:2], max_new_tokens=13, method=_KeepState.name, budget=3, draft=draft_lm,
                      temperature=temperature, seed=3)
    cache, length = out.method_output
    for row, (prompt, gen) in enumerate(zip(PROMPTS[:2], out.tokens)):
        seq = prompt + gen
        committed = len(seq) - 1  # the last token is not in any cache yet
        n = int(length[row])
        assert committed - 1 <= n <= committed
        ref_cache = draft_lm.handle.init_cache(1, 64)
        _, ref_cache = forward(draft_lm.params, TINY, jnp.asarray([seq]), cache=ref_cache,
                               write_slots=jnp.arange(len(seq))[None], prefix_len=jnp.zeros((1,), jnp.int32))
        for layer, ref in zip(cache, ref_cache):
            np.testing.assert_allclose(np.asarray(layer.k[row, :, :n]), np.asarray(ref.k[0, :, :n]), atol=2e-5)
            np.testing.assert_allclose(np.asarray(layer.v[row, :, :n]), np.asarray(ref.v[0, :, :n]), atol=2e-5)


def grow_once(method, draft_lm, prompt, temperature, slots: int = 64):
    """One tree grown by `method` from the draft alone, for one row after `prompt`."""
    h = draft_lm.handle
    toks = np.zeros((1, slots), np.int32)
    toks[0, :len(prompt)] = prompt
    lens = jnp.asarray([len(prompt)])
    mode, sp = make_sampling(temperature, None, None)

    def grow(h, toks, lens):
        ctx = StepContext(model=h, mode=mode, sampling=sp, eos_ids=jnp.zeros((0,), jnp.int32), max_new=jnp.int32(8),
                          draft=h, cache_slots=slots)
        ds = method.init_state(ctx, 1, None, toks, lens)
        state = DecodeState(cache=None, cache_len=lens - 1, last_token=toks[:, len(prompt) - 1],
                            out_tokens=jnp.zeros((1, 16), jnp.int32), num_new=jnp.zeros((1,), jnp.int32),
                            done=jnp.zeros((1,), bool), rng=None, step=jnp.int32(0), forwards=None, method_state=ds)
        cache, root_logits = method.catch_up(state, ctx, ds)
        keys = jax.random.split(jax.random.key(4), 1)
        return method.grow(state, ctx, cache, draft_probs(root_logits, ctx), keys)

    return jax.jit(grow)(h, jnp.asarray(toks), lens)


@pytest.mark.parametrize("expand,window", [("heap", None), ("threshold", None), ("heap", 2)])
def test_tree_node_distributions_equal_full_sequence_forwards(draft_lm, tiny_params, expand, window):
    """Each node the draft ran holds the draft distribution a plain forward over prompt +
    the node's root-to-node path gives: the ancestor mask over a tree grown in several
    forwards is right, also for a draft with a sliding window shorter than the tree (a cached
    node's distance is its depth, not its slot)."""
    if window is not None:
        draft_lm = jaxaccel.from_params(dataclasses.replace(TINY, sliding_window=window),
                                        perturbed(tiny_params, 7, 0.01))
    prompt = PROMPTS[0]
    method = DySpec(budget=9, pops_per_round=2, expand=expand, **({"threshold": 0.01} if expand == "threshold" else {}))
    grown = grow_once(method, draft_lm, prompt, 0.3)  # peaked: children outvalue the root's residual
    tree = grown.tree
    tokens, parents, valid, run = (np.asarray(a)[0] for a in (tree.tokens, tree.parents, tree.valid, grown.run))
    assert valid.sum() >= 5 and run.sum() >= 3 and (np.asarray(tree.depth)[0] >= 2).any()
    for i in np.flatnonzero(run):
        path, j = [], i
        while j > 0:
            path.append(int(tokens[j]))
            j = parents[j]
        seq = prompt + path[::-1]
        logits = draft_lm.logits([seq])[0, -1]
        expected = np.asarray(target_probs(jnp.asarray(logits), *make_sampling(0.3, None, None)))
        np.testing.assert_allclose(np.asarray(tree.draft_q)[0, i], expected, atol=1e-5)
    mask = np.asarray(tree.mask)[0]
    for i in np.flatnonzero(valid):  # the ancestor mask the verifier gets
        anc, j = {i}, i
        while j > 0:
            j = parents[j]
            anc.add(int(j))
        assert set(np.flatnonzero(mask[i])) == anc


def test_sharded_decoding_is_identical(tiny_params, draft_lm, reference):
    from jaxaccel.sharding import make_mesh

    mesh = make_mesh("tensor=2,data=4")
    target = jaxaccel.from_params(TINY, tiny_params, mesh=mesh)
    draft = jaxaccel.from_params(TINY, draft_lm.params, mesh=mesh)
    for method, opts in (METHODS[3], METHODS[1]):
        assert target.generate(PROMPTS, max_new_tokens=24, method=method, draft=draft, **opts).tokens == reference


@pytest.mark.slow
def test_shipped_pair_is_lossless():
    lm = jaxaccel.load()
    prompts = ["def fib(n):", "import os\nimport sys\n", "class Point:\n    def __init__(self", "# x"]
    ref = lm.generate(prompts, max_new_tokens=32).tokens
    for method, opts in (("sps", {"budget": 4}), ("specinfer", {"budget": 8}), ("dyspec", {"budget": 16})):
        out = lm.generate(prompts, max_new_tokens=32, method=method, **opts)  # draft: builtin:draft
        assert out.tokens == ref, method
        assert out.stats["mean_accepted"] > 1.5


# ----------------------------------------------------------------------------- sampling

SAMPLE_PROMPT = [1, 4, 2]


@pytest.fixture(scope="module")
def small_pair():
    params = randomize(init_params(SMALL, jax.random.key(3), "unrolled"), seed=4, scale=0.15)
    target = jaxaccel.from_params(SMALL, params)
    return target, jaxaccel.from_params(SMALL, perturbed(params, 8, 0.3))


@pytest.mark.parametrize("method,opts,temperature,top_k", [
    ("sps", {"budget": 2}, 1.0, None),
    ("specinfer", {"widths": [3, 2]}, 0.7, 4),
    ("dyspec", {"budget": 6, "pops_per_round": 2}, 1.0, None),
    ("dyspec", {"budget": 6, "expand": "threshold", "threshold": 0.05, "values": "draft"}, 1.0, None),
    ("sequoia", {"budget": 5, "acceptance": [0.5, 0.3]}, 1.0, None),
])
def test_sampling_matches_the_target_distribution(small_pair, method, opts, temperature, top_k):
    """Chi-square goodness of fit of the first two generated tokens (ROWS independent rows)
    against the exact target distribution; fails at p < 1e-4."""
    target, draft = small_pair
    out = target.generate([SAMPLE_PROMPT] * ROWS, max_new_tokens=2, method=method, draft=draft,
                          temperature=temperature, top_k=top_k, seed=11, **opts)
    expected = exact_pair_probs(target, SAMPLE_PROMPT, temperature, top_k)
    assert chi2_pvalue([t[:2] for t in out.tokens], expected) > 1e-4
    assert out.stats["mean_accepted"] > 1.2  # drafted tokens were accepted, not only bonus tokens


class _WrongQ(SpS):
    """A drafter whose reported q is a little off the distribution it sampled from."""

    name = "test-wrong-q"

    def grow(self, state, ctx, cache, root_q, keys):
        grown = super().grow(state, ctx, cache, root_q, keys)
        q = grown.tree.draft_q
        wrong = q * jnp.where(jnp.arange(q.shape[-1]) == 0, 1.25, 1.0)
        return grown._replace(tree=grown.tree._replace(draft_q=wrong / wrong.sum(-1, keepdims=True)))


def test_a_drafter_with_a_slightly_wrong_q_fails_the_check(small_pair, monkeypatch):
    """The check has power: q off by 25% on one token of six is caught (at 4x the rows: at
    ROWS this error gives p ~ 0.05)."""
    monkeypatch.setitem(methods.METHODS, _WrongQ.name, _WrongQ)
    target, draft = small_pair
    out = target.generate([SAMPLE_PROMPT] * (4 * ROWS), max_new_tokens=2, method=_WrongQ.name, draft=draft,
                          temperature=1.0, seed=11, budget=2)
    assert chi2_pvalue([t[:2] for t in out.tokens], exact_pair_probs(target, SAMPLE_PROMPT, 1.0)) < 1e-4


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("method,opts,message", [
    ("dyspec", {"bugdet": 4}, "valid options: budget, draft"),
    ("dyspec", {"budget": 0}, "budget must be an integer >= 1"),
    ("sps", {"budget": 2.5}, "budget must be an integer >= 1"),
    ("dyspec", {"threshold": 1.5, "expand": "threshold"}, "threshold must be in (0, 1)"),
    ("dyspec", {"threshold": 0}, "threshold must be in (0, 1)"),
    ("dyspec", {"pops_per_round": 0}, "pops_per_round must be an integer >= 1"),
    ("dyspec", {"budget": 4, "pops_per_round": 5}, "must not exceed budget"),
    ("dyspec", {"expand": "bfs"}, 'expand must be "heap" or "threshold"'),
    ("specinfer", {"widths": [2, 0]}, "widths must be a non-empty list"),
    ("specinfer", {"widths": [2, 2], "budget": 5}, "give one or the other"),
    # counted before a template is built (a MemoryError traceback, or a hang for [2] * 30, before)
    ("specinfer", {"widths": [100, 100, 100]}, "make more than 512 nodes, the most allowed"),
    ("specinfer", {"widths": [2] * 30}, "make more than 512 nodes"),
    ("sequoia", {"acceptance": [0.7, 0.6]}, "summing to at most 1"),
    ("sequoia", {"acceptance": "/nonexistent.json"}, "cannot read an acceptance vector"),
    ("dyspec", {"budget": "auto", "expand": "threshold"}, 'budget="auto" plans a heap-grown tree'),
    ("dyspec", {"budget": "auto", "pops_per_round": 200}, 'the largest budget budget="auto" plans (128)'),
    ("dyspec", {"budget": 8, "threshold": 0.1}, 'threshold applies to expand="threshold" only'),
    ("dyspec", {"greedy_temperature": -1}, "greedy_temperature must be"),
    # a heap that cannot fill its budget (the verifier would pay for nodes never grown)
    ("dyspec", {"budget": 32, "pops_per_round": 8, "max_children": 4}, "must not exceed max_children (4)"),
    ("dyspec", {"budget": "auto", "pops_per_round": 8, "max_children": 4}, "must not exceed max_children (4)"),
    ("dyspec", {"budget": 10, "pops_per_round": 1, "max_depth": 2, "max_children": 2},
     "budget (10) must not exceed the 6 nodes a tree of max_depth 2 and max_children 2 holds"),
    ("dyspec", {"values": "exact"}, 'values must be "calibrated" or "draft"'),
])
def test_bad_options(lm, draft_lm, method, opts, message):
    with pytest.raises(InvalidArgumentError, match=None) as err:
        lm.generate([[1, 2]], max_new_tokens=4, method=method, draft=draft_lm, **opts)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_drafts(lm, tmp_path):
    cases = [
        (dict(), "needs a draft model"),
        (dict(draft=str(tmp_path / "missing")), "does not exist"),
        (dict(draft=str(tmp_path)), "neither a jaxaccel checkpoint"),
        (dict(draft=jaxaccel.from_params(SMALL, init_params(SMALL, jax.random.key(0), "unrolled"))), "vocabulary"),
        (dict(draft=jaxaccel.from_params(
            dataclasses.replace(TINY, max_seq_len=12), init_params(TINY, jax.random.key(0), "unrolled"))),
         "maximum length"),
        (dict(draft=3), "draft must be a model path or name"),
    ]
    for opts, message in cases:
        with pytest.raises(InvalidArgumentError) as err:
            lm.generate([[1, 2]], max_new_tokens=8, method="dyspec", budget=4, **opts)
        assert message in str(err.value), (opts, str(err.value))


def test_a_draft_too_short_for_the_request_is_refused_before_any_calibration(lm, draft_lm, monkeypatch):
    from jaxaccel.decode import dyspec

    monkeypatch.setattr(dyspec.DySpec, "prepare", lambda *a, **k: pytest.fail("calibrated first"))
    with pytest.raises(InvalidArgumentError, match=r"the draft's maximum length \(256\) is shorter than the 300 "
                                                   r"positions this call needs \(longest prompt \+ max_new_tokens\)"):
        lm.generate([[1] * 200], max_new_tokens=100, method="dyspec", draft=draft_lm)


def test_budget_past_the_drafts_maximum_length(lm, draft_lm):
    """The target's cache is sized from the request (past its maximum length it only warns),
    but the draft must cover every position the call needs, its tree included: the tree's
    depth (16 at most for DySpec), not its 65 node slots (200 + 40 tokens used to be refused
    as 305 positions)."""
    with pytest.raises(InvalidArgumentError, match=r"the draft's maximum length \(256\) is shorter than the 261 "
                                                   r"positions this call needs \(longest prompt \+ max_new_tokens \+ "
                                                   r"the tree's depth\)"):
        lm.generate([[1] * 200], max_new_tokens=45, method="dyspec", budget=64, draft=draft_lm)
    from jaxaccel.decode.methods import get_method

    assert get_method("dyspec", budget=64).position_headroom() == 16
    assert get_method("sequoia", budget=64).position_headroom() == 8  # its max_depth
    assert get_method("sps", budget=5).position_headroom() == 5
    assert get_method("autoregressive").position_headroom() == 0


# ----------------------------------------------------------------------------- planning


def test_greedy_acceptance_vector_is_the_rank_of_the_target_argmax():
    from jaxaccel.decode.acceptance import acceptance_from_probs

    rng = np.random.default_rng(0)
    q = rng.dirichlet(np.ones(8), size=500)
    p = rng.dirichlet(np.ones(8), size=500)
    vec = acceptance_from_probs(p, q, greedy=True, max_rank=8)
    ranks = [list(np.argsort(-q[i], kind="stable")).index(int(p[i].argmax())) for i in range(500)]
    np.testing.assert_allclose(vec, np.bincount(ranks, minlength=8) / 500)
    assert vec.sum() == pytest.approx(1.0)


def test_sampled_acceptance_of_the_first_child_is_the_overlap():
    """p_1 = P(the first drafted token is accepted) = sum_x min(p(x), q(x)) (speculative
    sampling), and the whole vector sums to P(some drafted token is accepted) <= 1."""
    from jaxaccel.decode.acceptance import acceptance_from_probs

    rng = np.random.default_rng(1)
    q = rng.dirichlet(np.ones(6), size=40)
    p = rng.dirichlet(np.ones(6), size=40)
    vec = acceptance_from_probs(p, q, greedy=False, max_rank=6, samples=500)
    assert vec[0] == pytest.approx(np.minimum(p, q).sum(axis=1).mean(), abs=0.02)
    assert vec.sum() == pytest.approx(1.0, abs=1e-9)  # 6 draws without replacement cover the vocabulary


def _dense_simulated_draws(p, q, max_rank, samples, seed):
    """The verifier simulation written plainly (every row's residuals rewritten at every rank):
    the reference `acceptance._simulated_draws` must reproduce draw for draw."""
    rng = np.random.default_rng(seed)
    p = np.repeat(p, samples, axis=0).astype(np.float64)
    q = np.repeat(q, samples, axis=0).astype(np.float64)
    rows = np.arange(len(p))
    norm = lambda a: np.where(a.sum(-1, keepdims=True) > 0, a / np.maximum(a.sum(-1, keepdims=True), 1e-300), a)
    with np.errstate(divide="ignore"):
        scores = np.log(q) + rng.gumbel(size=q.shape)
    drafted = np.argsort(-scores, axis=1, kind="stable")[:, :max_rank]
    done = np.zeros(len(p), bool)
    for k in range(min(max_rank, p.shape[1])):
        x = drafted[:, k]
        qx = q[rows, x]
        live = ~done & (qx > 0)
        accept = live & (rng.random(len(p)) * qx < p[rows, x])
        yield k, qx, live, accept
        done |= accept
        rejected = live & ~accept
        p = np.where(rejected[:, None], norm(np.maximum(p - q, 0.0)), p)
        q_new = q.copy()
        q_new[rows, x] = 0.0
        q = np.where(rejected[:, None], norm(q_new), q)


@pytest.mark.parametrize("vocab,max_rank", [(50, 8), (6, 8)])
def test_the_verifier_simulation_equals_the_dense_reference(vocab, max_rank):
    """Draw for draw (same seed): which rank is live, what it drew and whether it was
    accepted, with drafts that have fewer tokens than ranks (top-k'd q: zeros)."""
    from jaxaccel.decode.acceptance import _simulated_draws

    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(vocab) * 0.3, size=60)
    q = rng.dirichlet(np.ones(vocab) * 0.3, size=60)
    q[:20, 3:] = 0.0  # rows whose draft has only 3 tokens
    q[:20] /= q[:20].sum(1, keepdims=True)
    got = list(_simulated_draws(p, q, max_rank, samples=7, seed=5))
    want = list(_dense_simulated_draws(p, q, max_rank, samples=7, seed=5))
    assert len(got) == len(want) == min(max_rank, vocab)
    for (k, qx, live, acc), (k2, qx2, live2, acc2) in zip(got, want):
        assert k == k2
        np.testing.assert_array_equal(live, live2)
        np.testing.assert_array_equal(acc, acc2)
        np.testing.assert_allclose(qx[live], qx2[live], rtol=1e-12)
    assert sum(a.sum() for *_, a in got) > 0 and sum(a.sum() for *_, a in got[1:]) > 0  # later ranks accept too


def test_greedy_temperature_fit_recovers_a_known_temperature():
    from jaxaccel.decode.acceptance import greedy_temperature_from

    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4000, 12)) * 2
    z = logits / 0.5  # the target's argmax is drawn from softmax(logits / 0.5)
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    argmax = np.array([rng.choice(12, p=row) for row in probs])
    assert greedy_temperature_from(logits, argmax) == pytest.approx(0.5, rel=0.1)


def test_budget_plan_follows_the_cost_curve():
    from jaxaccel.decode import tuning

    value = lambda n, depth: 1 + sum(0.7 ** d for d in range(1, min(n, depth) + 1))  # noqa: E731 - a chain
    cpu = tuning.plan_draft_budget(value, 1, 0.12, curve=tuning.VERIFY_COST["cpu"])
    accel = tuning.plan_draft_budget(value, 1, 0.02, curve=tuning.ACCELERATOR_VERIFY_COST)
    assert cpu.budget < accel.budget  # expensive verification: small trees
    assert accel.pops_per_round == 1  # a chain needs one round per level; cheap draft forwards
    assert cpu.speedup == pytest.approx(cpu.expected_tokens / cpu.step_cost)
    best = max(value(b, b) / tuning.step_cost(b, 1, 1, 0.02, tuning.ACCELERATOR_VERIFY_COST) for b in range(1, 129))
    assert accel.speedup == pytest.approx(best)


def test_budget_plan_keeps_the_trees_depth_and_fan_out_limits():
    """budget="auto" planned depth-16, unbounded fan-out trees whatever max_depth and
    max_children said: a budget the tree could not fill, and a speedup it could not reach."""
    from jaxaccel.decode import tuning
    from jaxaccel.decode.dyspec import _plan
    from jaxaccel.decode.sequoia import padded_acceptance, tree_value_curve

    acceptance = (0.55, 0.15, 0.08, 0.05, 0.03)
    costs = repr(("cpu", tuning.VERIFY_COST, tuning.TREE_STEP_OVERHEAD, tuning.DRAFT_COST_FLOOR))
    curve = tuple(sorted(tuning.ACCELERATOR_VERIFY_COST.items()))
    free = _plan(acceptance, 1, 0.02, curve, None, costs)
    flat = _plan(acceptance, 1, 0.02, curve, None, costs, max_depth=1)
    thin = _plan(acceptance, 1, 0.02, curve, None, costs, max_depth=2, max_children=1)
    assert free.budget > 5  # deep trees pay with cheap verification
    one_level = tree_value_curve(padded_acceptance(acceptance, 128, 1), 128, 1)
    assert flat.expected_tokens == pytest.approx(one_level[flat.budget]) and flat.expected_tokens < free.expected_tokens
    assert thin.budget <= 2 and thin.expected_tokens == pytest.approx(1 + 0.55 + 0.55 ** 2)


def test_sequoia_takes_a_vector_summing_to_exactly_one_and_fan_out_past_a_tiny_vocabulary(lm, draft_lm, reference):
    """[1/6] * 6 rounded to nearest summed past 1 + 1e-6 and the DP refused it ("got sum 1"), as
    it did vectors measured on small vocabularies; a fan-out past the vocabulary crashed in
    lax.top_k instead of leaving the extra ranks as padding."""
    from jaxaccel.config import replace

    out = lm.generate(PROMPTS[:1], max_new_tokens=8, method="sequoia", budget=8, acceptance=[1 / 6] * 6,
                      draft=draft_lm)
    assert out.tokens[0] == reference[0][:8]
    small = replace(TINY, vocab_size=6)
    params = init_params(small, jax.random.key(0), "unrolled")
    target = jaxaccel.from_params(small, params)
    draft = jaxaccel.from_params(small, perturbed(params, 3, 0.01))
    ref = target.generate([[1, 4, 2]], max_new_tokens=6).tokens
    for method, opts in (("specinfer", {"widths": [8]}), ("sequoia", {"budget": 10, "max_depth": 1,
                                                                        "acceptance": [0.5, 0.2]})):
        assert target.generate([[1, 4, 2]], max_new_tokens=6, method=method, draft=draft, **opts).tokens == ref


def test_sequoia_programs_are_keyed_by_the_tree_not_the_vector(lm, draft_lm, reference):
    """Two acceptance vectors (two temperatures' measurements) that plan the same tree share
    one compiled program; one that plans another tree compiles its own, and runs it."""
    from jaxaccel.decode.methods import get_method

    vectors = ([0.6, 0.2, 0.1], [0.61, 0.19, 0.1], [0.2, 0.2, 0.2])
    trees = [get_method("sequoia", budget=9, acceptance=v).template().parents.tolist() for v in vectors]
    assert trees[0] == trees[1] != trees[2]
    target = jaxaccel.from_params(TINY, lm.params)
    runs = [target.generate(PROMPTS, max_new_tokens=24, method="sequoia", budget=9, acceptance=v, draft=draft_lm)
            for v in vectors]
    assert [r.tokens for r in runs] == [reference] * 3
    assert runs[1].stats["compile_s"] == 0 < runs[2].stats["compile_s"]
    assert runs[0].stats["mean_accepted"] == runs[1].stats["mean_accepted"] != runs[2].stats["mean_accepted"]


def test_a_temperature_generate_treats_as_greedy_is_measured_as_greedy(small_pair):
    from jaxaccel.decode.acceptance import positional_acceptance

    target, draft = small_pair
    kw = dict(prompts=[[1, 2, 3, 4]], new_tokens=6)
    np.testing.assert_array_equal(positional_acceptance(target, draft, temperature=5e-6, top_k=3, **kw),
                                  positional_acceptance(target, draft, temperature=0.0, **kw))


@pytest.mark.parametrize("cheap", [True, False])
def test_auto_budget_is_lossless_and_planned(lm, draft_lm, reference, monkeypatch, cheap):
    """budget="auto" runs the planned tree; when no tree is predicted to pay (expensive
    verification), plain autoregressive steps."""
    from jaxaccel.decode import acceptance, tuning

    monkeypatch.setattr(acceptance, "cached_acceptance", lambda *a, **k: np.array([0.6, 0.2, 0.1]))
    monkeypatch.setattr(acceptance, "cached_greedy_temperature", lambda *a, **k: 0.7)
    monkeypatch.setattr(tuning, "draft_cost_ratio", lambda *a, **k: 0.01 if cheap else 0.5)  # same-size draft here
    monkeypatch.setitem(tuning.TREE_STEP_OVERHEAD, "cpu", 0.0 if cheap else 2.0)
    out = lm.generate(PROMPTS, max_new_tokens=24, method="dyspec", budget="auto", draft=draft_lm)
    assert out.tokens == reference
    assert (out.stats["mean_accepted"] > 1.1) if cheap else (out.stats["mean_accepted"] == 1.0)
    assert (out.stats["budget"] >= 1) if cheap else (out.stats["budget"] == out.stats["pops_per_round"] == 0)


def test_auto_budget_plans_for_the_rows_each_device_verifies(lm, draft_lm, monkeypatch):
    """3 prompts run the 4-row compiled loop (padding rows verify trees too): the plan is made
    for 4 rows, not 3; and a plan never pops more per round than max_children."""
    from jaxaccel.decode import dyspec, tuning

    asked = []

    def spy(*args, **kwargs):
        asked.append(args[5])  # batch
        return tuning.DraftPlan(0, 0, 1.0, 1.0, 1.0)

    monkeypatch.setattr(dyspec, "plan_budget", spy)
    monkeypatch.setattr(dyspec.DySpec, "greedy_temperature", 0.7)
    lm.generate(PROMPTS[:3], max_new_tokens=2, method="dyspec", budget="auto", greedy_temperature=0.7,
                draft=draft_lm)
    assert asked == [4]
    value = lambda n, depth: 1 + sum(0.9 ** d for d in range(1, n + 1))  # noqa: E731 - wide trees pay
    plan = tuning.plan_draft_budget(value, 1, 0.01, curve=tuning.ACCELERATOR_VERIFY_COST, max_pops=3)
    assert plan.budget > 3 and 1 <= plan.pops_per_round <= 3


def test_a_heap_within_its_limits_fills_its_budget(draft_lm):
    """With pops_per_round <= max_children and budget <= the nodes max_depth x max_children
    hold, these trees fill their budget (near a tree's room a round can still find fewer
    ready nodes than pops, see dyspec's docstring; not with these values)."""
    from jaxaccel.decode.dyspec import DySpec

    for opts in ({"budget": 6, "pops_per_round": 1, "max_depth": 2, "max_children": 2},
                 {"budget": 12, "pops_per_round": 4, "max_depth": 2, "max_children": 4},
                 {"budget": 7, "pops_per_round": 3, "max_depth": 3, "max_children": 3}):
        m = DySpec(greedy_temperature=1.0, **opts)
        grown = grow_once(m, draft_lm, PROMPTS[0], 0.0)
        assert int(np.asarray(grown.tree.valid)[0].sum()) - 1 == opts["budget"], opts


def test_a_draft_loaded_from_a_path_once_is_reused_without_recompiling(lm, draft_lm, reference, tmp_path,
                                                                       monkeypatch):
    import shutil

    folder = draft_lm.save(tmp_path / "draft").resolve()
    target = jaxaccel.from_params(TINY, lm.params)  # nothing compiled yet
    first = target.generate(PROMPTS, max_new_tokens=24, method="sps", budget=3, draft=str(folder))
    again = target.generate(PROMPTS, max_new_tokens=24, method="sps", budget=3, draft=str(folder))
    # the same folder spelled otherwise (loaded twice, and compiled again, before)
    monkeypatch.chdir(tmp_path)
    outs = [target.generate(PROMPTS, max_new_tokens=24, method="sps", budget=3, draft=spelling)
            for spelling in (f"{folder}/./", "draft", "./draft/")]
    assert first.tokens == again.tokens == reference and all(out.tokens == reference for out in outs)
    assert first.stats["compile_s"] > 0 and again.stats["compile_s"] == 0
    assert all(out.stats["compile_s"] == 0 for out in outs)
    assert list(target._drafts) == [str(folder)]
    shutil.rmtree(folder)  # a draft the target holds is not looked up again (it was, and refused once gone)
    assert target.generate(PROMPTS, max_new_tokens=24, method="sps", budget=3, draft="draft").tokens == reference


def test_another_draft_object_of_the_same_shape_reuses_the_compiled_loop(lm, draft_lm, reference):
    """The compile key holds a draft object's structure, not its identity: a draft loaded
    again (here: another object, other params) reuses the program, and its own params are
    what the program runs (a far draft is accepted less), still losslessly."""
    target = jaxaccel.from_params(TINY, lm.params)
    far = jaxaccel.from_params(TINY, perturbed(draft_lm.params, 11, 0.5))
    near = target.generate(PROMPTS, max_new_tokens=24, method="sps", budget=3, draft=draft_lm)
    again = target.generate(PROMPTS, max_new_tokens=24, method="sps", budget=3, draft=far)
    assert near.tokens == again.tokens == reference
    assert near.stats["compile_s"] > 0 and again.stats["compile_s"] == 0
    assert again.stats["mean_accepted"] < near.stats["mean_accepted"]


def test_a_first_call_that_measures_the_draft_says_so_once(lm, draft_lm, reference, capsys):
    """A first Sequoia/DySpec call on a new model pair measures the draft's acceptance first
    (~10 s on a CPU for the shipped pair), which the decode CLI used to do in silence. With
    `progress` (the CLI at a terminal) one line says so; a call that measures nothing, or one
    without progress, prints nothing."""
    draft = jaxaccel.from_params(TINY, draft_lm.params)  # a new object: nothing measured for it yet
    kw = dict(max_new_tokens=24, method="sequoia", budget=6, draft=draft)
    first = lm.generate(PROMPTS[:2], progress=True, **kw)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("measuring ")]
    assert lines == ["measuring how the draft's tokens are accepted on 16 calibration prompts (once per model "
                     "pair and sampling settings; kept for this process)"]
    again = lm.generate(PROMPTS[:2], progress=True, **kw)  # measured: nothing to say
    quiet = lm.generate(PROMPTS[:2], **{**kw, "draft": jaxaccel.from_params(TINY, draft_lm.params)})
    assert "measuring" not in capsys.readouterr().err
    assert first.tokens == again.tokens == quiet.tokens == reference[:2]


# ----------------------------------------------------------------------------- calibrated values


def test_calibration_fits_the_models_maximum_length(small_pair):
    """The calibration ran 32 prompt + 48 new tokens whatever the models' maximum length: for a
    64-position pair it measured at positions neither model was trained at (and warned three
    times). It now splits the shorter maximum length 2:3; 80 positions and more keep 32 + 48."""
    import warnings

    from jaxaccel.decode.acceptance import calibration_lengths, positional_acceptance

    target, draft = small_pair
    assert calibration_lengths(target, draft) == (25, 39)
    long = jaxaccel.from_params(dataclasses.replace(SMALL, max_seq_len=80), target.params)
    assert calibration_lengths(long, long) == (32, 48)
    assert calibration_lengths(long, draft) == (25, 39)  # the shorter of the two
    from jaxaccel.decode.acceptance import _calibration_settings

    short = jaxaccel.from_params(dataclasses.replace(SMALL, max_seq_len=79), target.params)
    assert calibration_lengths(short, short) == (31, 48)  # same new tokens as 80 positions: the key must differ
    assert _calibration_settings(short, short) != _calibration_settings(long, long)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a "past the model's maximum length" warning fails the test
        vec = positional_acceptance(target, draft, temperature=1.0, max_rank=3, samples=1)
    assert vec.shape == (3,) and 0 < vec[0] <= 1


def test_conditional_acceptance_against_closed_forms():
    """The first child is accepted with probability sum_x min(p(x), q(x)) (averaged over
    positions); a perfect draft (q == p) has every first child accepted and draws no second."""
    from jaxaccel.decode.acceptance import conditional_acceptance

    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(12, 0.5), size=300)
    q = rng.dirichlet(np.full(12, 0.5), size=300)
    table, rank_mean = conditional_acceptance(p, q, max_rank=4, samples=40)
    assert abs(rank_mean[0] - np.minimum(p, q).sum(1).mean()) < 0.01
    assert table.shape == (4, 14) and np.all((table >= 0) & (table <= 1))
    assert rank_mean[1] > 0  # later siblings of rejected ones are drawn and sometimes accepted
    table, rank_mean = conditional_acceptance(p, p, max_rank=3, samples=4)
    assert rank_mean[0] == 1.0 and np.all(rank_mean[1:] == 1.0)  # rank 1 never drawn: rank 0's
    assert np.all(table[1] == table[0])


def test_calibrated_values_grow_a_different_tree(small_pair):
    """Sampling, the calibrated values grow a different tree from the paper's draft values
    (different acceptance). Lossless sampling with them: test_sampling_matches_the_target_distribution;
    greedy does not use them (test_greedy_is_identical_to_autoregressive_batch4_and_batch1)."""
    target, draft = small_pair
    kw = dict(max_new_tokens=16, method="dyspec", draft=draft, budget=8, pops_per_round=2, temperature=1.0, seed=5)
    stats = {v: target.generate([SAMPLE_PROMPT] * 4, values=v, **kw).stats for v in ("calibrated", "draft")}
    assert stats["calibrated"]["mean_accepted"] != stats["draft"]["mean_accepted"]


def test_a_new_temperature_measures_a_new_table_and_reuses_the_compiled_loop(small_pair):
    """The calibrated table is measured per sampling setting and is an argument of the loop,
    not a constant in it: a second temperature compiles nothing, and runs its own table (the
    same tokens as a model that never ran the first temperature)."""
    target, draft = small_pair
    kw = dict(max_new_tokens=16, method="dyspec", draft=draft, budget=8, pops_per_round=2, seed=5)
    warm = jaxaccel.from_params(SMALL, target.params)
    first = warm.generate([SAMPLE_PROMPT] * 4, temperature=1.0, **kw)
    second = warm.generate([SAMPLE_PROMPT] * 4, temperature=0.5, **kw)
    fresh = jaxaccel.from_params(SMALL, target.params).generate([SAMPLE_PROMPT] * 4, temperature=0.5, **kw)
    assert first.stats["compile_s"] > 0 and second.stats["compile_s"] == 0
    assert second.tokens == fresh.tokens and second.stats["mean_accepted"] == fresh.stats["mean_accepted"]
    assert second.tokens != first.tokens


def test_acceptance_cache_is_keyed_by_the_model_files_as_loaded(tmp_path, tiny_params):
    """A draft retrained into the same folder gets a new cache entry (its acceptance would
    differ), the same folder read again the same one, the same files loaded in another dtype
    another one (a bfloat16 target accepts other tokens: `bench acceptance` and `bench dyspec`
    shared one entry), and an in-memory model none. The files are those the model was loaded
    from: a target still holding the old draft after the folder was rewritten stored the old
    draft's measurement under the new files' key, and later processes read it."""
    from types import SimpleNamespace

    from jaxaccel.decode.acceptance import cache_path
    from jaxaccel.model.checkpoint import save_model

    save_model(tmp_path / "target", TINY, tiny_params)
    save_model(tmp_path / "draft", TINY, perturbed(tiny_params, 1, 0.01))
    target, draft = jaxaccel.load(tmp_path / "target"), jaxaccel.load(tmp_path / "draft")
    settings = {"temperature": 0.0}
    first = cache_path(target, draft, settings)
    assert cache_path(jaxaccel.load(tmp_path / "target"), jaxaccel.load(tmp_path / "draft"), settings) == first
    assert cache_path(target, draft, {"temperature": 0.6}) != first
    assert cache_path(jaxaccel.load(tmp_path / "target", dtype="bfloat16"), draft, settings) != first
    assert cache_path(target, jaxaccel.load(tmp_path / "draft", dtype="bfloat16"), settings) != first
    save_model(tmp_path / "draft", TINY, perturbed(tiny_params, 2, 0.01))  # retrained in place
    assert cache_path(target, draft, settings) == first  # still the draft that was loaded
    assert cache_path(target, jaxaccel.load(tmp_path / "draft"), settings) != first
    assert cache_path(target, jaxaccel.from_params(TINY, tiny_params), settings) is None
    assert cache_path(target, SimpleNamespace(source=draft.source, config=TINY), settings) is None  # files unknown


def test_a_damaged_acceptance_cache_entry_is_measured_again(tmp_path, monkeypatch, tiny_params):
    """An entry of the wrong JSON type crashed every Sequoia call with a TypeError traceback;
    values no measurement gives (NaN, > 1, negative; a temperature of 0) either failed every
    call, blaming the user's input, or silently shrank every tree (DySpec's MAT 4.00 -> 1.00).
    Each is now a miss: measured again and rewritten. A write that fails leaves no
    temporary file behind."""
    import json as json_

    from jaxaccel.decode import acceptance
    from jaxaccel.model.checkpoint import save_model

    monkeypatch.setenv(acceptance.CACHE_ENV, str(tmp_path / "cache"))
    save_model(tmp_path / "target", TINY, tiny_params)
    save_model(tmp_path / "draft", TINY, perturbed(tiny_params, 1, 0.01))
    target, draft = jaxaccel.load(str(tmp_path / "target")), jaxaccel.load(str(tmp_path / "draft"))
    measured = []
    vector = np.array([0.5, 0.25, 0.125, 0.0625])
    monkeypatch.setattr(acceptance, "positional_acceptance", lambda *a, **k: measured.append(1) or vector)
    monkeypatch.setattr(acceptance, "teacher_forced", lambda *a, **k: (np.ones((2, 3)), None, np.zeros((2, 3))))
    monkeypatch.setattr(acceptance, "greedy_temperature_from", lambda *a: measured.append(1) or 0.7)
    kw = dict(temperature=0.0, top_k=None, top_p=None, max_rank=4)
    read = acceptance.cached_acceptance.__wrapped__  # past the per-process memo: the disk entry each time
    np.testing.assert_array_equal(read(target, draft, **kw), vector)
    (path,) = (tmp_path / "cache").iterdir()
    good = path.read_text()
    for damaged in ("[1, 2, 3]", '{"acceptance": {"a": 1}}', "null", '{"acceptance": [NaN, 0, 0, 0]}',
                    '{"acceptance": [0.9, 0.9, 0, 0]}', '{"acceptance": [-1, 0, 0, 0]}', '{"acceptance": [0.5]}',
                    good[:len(good) // 2]):
        path.write_text(damaged)
        measured.clear()
        np.testing.assert_array_equal(read(target, draft, **kw), vector)
        assert measured == [1], damaged
        assert json_.loads(path.read_text())["acceptance"] == vector.tolist()
    measured.clear()
    read(target, draft, **kw)
    assert measured == []  # a sound entry is read
    tau = acceptance.cached_greedy_temperature.__wrapped__
    assert tau(target, draft) == 0.7
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if p != path]
    for damaged in ('{"greedy_temperature": NaN}', '{"greedy_temperature": 0}', '{"greedy_temperature": -1}',
                    '{"greedy_temperature": "inf"}', '{"greedy_temperature": true}'):
        entry.write_text(damaged)
        measured.clear()
        assert tau(target, draft) == 0.7 and measured == [1], damaged
    entry.unlink()
    entry.mkdir()  # the entry cannot be written
    assert tau(target, draft) == 0.7
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([path.name, entry.name])


def test_acceptance_cache_folder_follows_its_environment_variable(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from jaxaccel.decode.acceptance import CACHE_ENV, cache_path

    pair = [SimpleNamespace(source=tmp_path / name, config=TINY, files="") for name in ("t", "d")]
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert cache_path(*pair, {}).parent == tmp_path / "mine"
    monkeypatch.setenv(CACHE_ENV, "off")
    assert cache_path(*pair, {}) is None
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_path(*pair, {}).parent == tmp_path / "xdg" / "jaxaccel" / "acceptance"


def test_a_measured_draft_is_not_kept_alive_by_the_target(tiny_params, monkeypatch):
    """The per-process memo of measurements held each draft strongly: a notebook evaluating one
    draft after another kept every one (its parameters) alive for as long as the target."""
    import gc
    import weakref

    from jaxaccel.decode import acceptance

    calls = []
    monkeypatch.setattr(acceptance, "greedy_temperature_from", lambda *a: calls.append(1) or 0.7)
    monkeypatch.setattr(acceptance, "teacher_forced", lambda *a, **k: (np.ones((2, 3)), None, np.zeros((2, 3))))
    target = jaxaccel.from_params(TINY, tiny_params)
    draft = jaxaccel.from_params(TINY, perturbed(tiny_params, 3, 0.01))
    assert acceptance.cached_greedy_temperature(target, draft) == 0.7
    assert acceptance.cached_greedy_temperature(target, draft) == 0.7 and calls == [1]  # remembered
    gone = weakref.ref(draft)
    del draft
    gc.collect()
    assert gone() is None
    assert target._measurements == {}  # its entries went with it
