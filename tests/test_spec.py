"""Tree speculative decoding: tree structure, lossless greedy and sampling, drafters, bad input."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

import jaxaccel
from conftest import ROWS, SMALL, TINY, chi2_pvalue, exact_pair_probs, randomize
from jaxaccel.decode.recycling import PAPER_WIDTHS, build_template
from jaxaccel.decode.tree import (TreeMethod, TreeShape, ancestor_mask, children_table, static_tree,
                                  tree_paths, verify_greedy)
from jaxaccel.decode import tuning
from jaxaccel.errors import InvalidArgumentError
from jaxaccel.model.options import TreeKernelAttention
from jaxaccel.model.transformer import init_params

PROMPTS = [[5, 17, 33], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [42],
           [7, 7, 7, 7, 9, 7, 7, 7]]
METHODS = [("recycling", {}), ("recycling", {"template": "paper"}), ("recycling", {"template": [3, 2, 1], "k": 3}),
           ("pld", {}), ("chain", {"k": 3}), ("chain", {"k": 2, "draft": "recycling"})]


def random_tree(rng, n):
    parents = [-1] + [int(rng.integers(0, i)) for i in range(1, n)]
    depth = [0]
    for i in range(1, n):
        depth.append(depth[parents[i]] + 1)
    return np.array(parents, np.int32), np.array(depth, np.int32)


def test_tree_structure_against_python():
    rng = np.random.default_rng(0)
    trees = [random_tree(rng, 12) for _ in range(3)]
    parents = jnp.asarray(np.stack([t[0] for t in trees]))
    depth = jnp.asarray(np.stack([t[1] for t in trees]))
    max_depth = int(depth.max())
    valid = jnp.asarray(rng.random((3, 12)) < 0.8).at[:, 0].set(True)
    mask = np.asarray(ancestor_mask(parents, max_depth))
    paths = np.asarray(tree_paths(parents, depth, max_depth))
    children = np.asarray(children_table(parents, valid, 12))
    for b, (par, dep) in enumerate(trees):
        for i in range(12):
            chain, j = [], i
            while j >= 0:
                chain.append(j)
                j = par[j]
            assert set(np.flatnonzero(mask[b, i])) == set(chain)
            assert list(paths[b, i, :dep[i] + 1]) == chain[::-1] and (paths[b, i, dep[i] + 1:] == -1).all()
            kids = [j for j in range(12) if par[j] == i and valid[b, j]]
            assert list(children[b, i, :len(kids)]) == kids and (children[b, i, len(kids):] == -1).all()


def test_static_tables_equal_the_device_tables():
    """The host (numpy) tables of static templates are the device functions' tables."""
    from jaxaccel.decode.tree import static_tables

    rng = np.random.default_rng(1)
    for par, dep in [random_tree(rng, 12) for _ in range(3)] + [build_template(PAPER_WIDTHS, 8)[::2]]:
        max_depth, max_children = int(dep.max()), int(np.bincount(par[1:], minlength=len(par)).max())
        mask, paths, children = static_tables(tuple(par.tolist()), tuple(dep.tolist()), max_depth, max_children)
        p, d = jnp.asarray(par)[None], jnp.asarray(dep)[None]
        np.testing.assert_array_equal(mask, ancestor_mask(p, max_depth))
        np.testing.assert_array_equal(paths, tree_paths(p, d, max_depth))
        np.testing.assert_array_equal(children, children_table(p, jnp.ones(p.shape, bool), max_children))


def test_paper_template_shape():
    parents, ranks, depth = build_template(PAPER_WIDTHS, 8)
    assert len(parents) == 81 and np.bincount(depth).tolist() == [1, 8, 21, 25, 15, 8, 3]
    assert all(parents[i] < i for i in range(1, 81)) and ranks.max() == 7
    assert [ranks[i] for i in range(1, 9)] == list(range(8))  # level 1: all 8 candidates of the root


def test_verify_greedy_picks_deepest_matching_path():
    parents = np.array([-1, 0, 0, 1, 2, 3], np.int32)
    depth = np.array([0, 1, 1, 2, 2, 3], np.int32)
    tokens = jnp.array([[9, 4, 5, 6, 7, 8]])
    vocab = 10
    # target argmax after each node: root->5, node1->6, node2->7, node3->8 (mismatch at node 3: predicts 1)
    pred = np.array([5, 6, 7, 1, 3, 2])
    logits = jax.nn.one_hot(jnp.asarray(pred)[None], vocab) * 5.0
    tree = static_tree(tokens[:, 0], tokens, jnp.ones((1, 6), bool), parents, depth)
    node, bonus = verify_greedy(tree, logits, 3)
    assert int(node[0]) == 4 and int(bonus[0]) == 3  # path root -> 2 (token 5) -> 4 (token 7), bonus argmax(4)


def test_tree_forward_through_the_pallas_kernel_matches_the_reference(tiny_params):
    """The verification forward with the Pallas tree-attention kernel (interpret mode) gives
    the logits and cache of the plain attention path."""
    from jaxaccel.decode.lm import decode_params
    from jaxaccel.model.transformer import forward, init_cache

    params = decode_params(tiny_params, TINY, None)
    rng = np.random.default_rng(1)
    parents, depth = random_tree(rng, 9)
    mask = ancestor_mask(jnp.asarray(parents)[None], int(depth.max()))
    cache = init_cache(TINY, 2, 48)
    prompt = jnp.asarray(rng.integers(0, TINY.vocab_size, (2, 20)), jnp.int32)
    lens = jnp.array([20, 13])
    _, cache = forward(params, TINY, prompt, cache=cache, write_slots=jnp.where(jnp.arange(20) < lens[:, None],
                       jnp.arange(20), -1), prefix_len=jnp.zeros(2, jnp.int32))
    tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (2, 9)), jnp.int32)
    args = dict(cache=cache, write_slots=lens[:, None] + jnp.arange(9), prefix_len=lens,
                new_mask=jnp.broadcast_to(mask, (2, 9, 9)))
    positions = lens[:, None] + jnp.asarray(depth)[None]
    ref_logits, ref_cache = forward(params, TINY, tokens, positions, **args)
    ker_logits, ker_cache = forward(params, TINY, tokens, positions, attention=TreeKernelAttention(interpret=True), **args)
    np.testing.assert_allclose(np.asarray(ker_logits), np.asarray(ref_logits), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ker_cache[1].k), np.asarray(ref_cache[1].k), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def lm(tiny_params):
    return jaxaccel.from_params(TINY, tiny_params)


@pytest.fixture(scope="module")
def reference(lm):
    return lm.generate(PROMPTS, max_new_tokens=40).tokens


@pytest.mark.parametrize("method,opts", METHODS)
def test_greedy_is_identical_to_autoregressive_batch4_and_batch1(lm, reference, method, opts):
    out = lm.generate(PROMPTS, max_new_tokens=40, method=method, **opts)
    assert out.tokens == reference
    single = lm.generate([PROMPTS[1]], max_new_tokens=40, method=method, **opts)
    assert single.tokens[0] == reference[1]
    random_chain = method == "chain" and opts.get("draft") != "recycling"  # may accept nothing
    auto = method == "recycling" and "template" not in opts  # may fall back to plain steps here
    if not (random_chain or auto):  # something was accepted (steps end when the slowest row is done)
        assert out.stats["mean_accepted"] > 1.0


def test_recycling_accepts_more_than_one_token_on_repetitive_text(lm):
    # A model fed its own greedy output back: the continuation repeats, so recycled candidates hit.
    out = lm.generate([PROMPTS[3]], max_new_tokens=120, method="recycling", template=[4, 4, 3, 2, 1])
    ref = lm.generate([PROMPTS[3]], max_new_tokens=120)
    assert out.tokens == ref.tokens
    assert out.stats["mean_accepted"] > 1.5 and out.stats["steps"] < 80


def test_auto_fallback_prices_the_rows_each_device_verifies(tiny_params, monkeypatch):
    """The cost table is per device: one prompt on a data=2 mesh is one row per device (a
    padded batch of 2), priced as batch 1 — not as 2, which asked the drafts for more hits."""
    from jaxaccel.decode import recycling
    from jaxaccel.sharding import make_mesh

    seen, real = [], recycling.Recycling.cost_for_batch
    monkeypatch.setattr(recycling.Recycling, "cost_for_batch", lambda self, b: seen.append(b) or real(self, b))
    monkeypatch.setitem(tuning.RECYCLING_COST, jax.default_backend(), {1: 1.5, 4: 2.0})
    lm = jaxaccel.from_params(TINY, tiny_params, mesh=make_mesh("data=2"))
    lm.generate(PROMPTS[:1], max_new_tokens=2, method="recycling")
    assert set(seen) == {1}


def test_auto_template_falls_back_to_plain_steps_when_drafts_miss(tiny_params, monkeypatch):
    """With drafts that never hit, "auto" takes plain steps (one forward per token) and stays exact."""
    from jaxaccel.decode import recycling

    lm = jaxaccel.from_params(TINY, tiny_params)
    ref = lm.generate(PROMPTS, max_new_tokens=30)
    monkeypatch.setitem(tuning.RECYCLING_COST, jax.default_backend(), {1: 1.5, 4: 2.0})
    auto = jaxaccel.from_params(TINY, tiny_params)
    out = auto.generate(PROMPTS, max_new_tokens=30, method="recycling")
    assert out.tokens == ref.tokens
    forced = jaxaccel.from_params(TINY, tiny_params)
    monkeypatch.setattr(recycling.Recycling, "expected_tokens", lambda self, h: h * 0.0)  # trees never pay
    plain = forced.generate(PROMPTS, max_new_tokens=30, method="recycling")
    assert plain.tokens == ref.tokens and plain.stats["steps"] == 30 and plain.stats["mean_accepted"] == 1.0


def test_auto_template_decision_follows_the_hit_rate(tiny_params, monkeypatch):
    """The fallback decision itself, counted per step: drafts that never exist keep every step
    plain, and drafts that always hit (a matrix warmed on the same greedy text) switch to tree
    steps once the first plain step has hit — both outputs exact."""
    from jaxaccel.decode import recycling

    counts = {"tree": 0, "plain": 0}

    def counted(kind, real):
        def wrapper(self, state, tree, ctx):
            jax.debug.callback(lambda: counts.__setitem__(kind, counts[kind] + 1))  # runs only when taken
            return real(self, state, tree, ctx)
        return wrapper

    monkeypatch.setattr(recycling.Recycling, "verify", counted("tree", recycling.Recycling.verify))
    monkeypatch.setattr(recycling.Recycling, "plain_verify", counted("plain", recycling.Recycling.plain_verify))
    monkeypatch.setitem(tuning.RECYCLING_COST, jax.default_backend(), {1: 1.5})
    prompt = [PROMPTS[1]]
    ref = jaxaccel.from_params(TINY, tiny_params).generate(prompt, max_new_tokens=24)
    lm = jaxaccel.from_params(TINY, tiny_params)
    empty = np.full((TINY.vocab_size, 8), -1, np.int32)  # no candidates: every draft tree is just the root
    cold = lm.generate(prompt, max_new_tokens=24, method="recycling", method_input=empty)
    assert cold.tokens == ref.tokens and counts == {"tree": 0, "plain": 24}
    counts.update(tree=0, plain=0)
    warm = lm.generate(prompt, max_new_tokens=24, method="recycling", method_input=np.asarray(cold.method_output)[0])
    assert warm.tokens == ref.tokens
    # the first step is plain (the hit rate starts low); once drafts hit, steps are trees
    assert counts["plain"] + counts["tree"] == warm.stats["steps"] and counts["plain"] >= 1
    assert counts["tree"] > 2 * counts["plain"] and warm.stats["mean_accepted"] > 1.5


def test_inputs_that_mean_the_same_reuse_the_compiled_loop(tiny_params):
    """The same recycling matrix as float64 or int64, and filters that keep every token
    (top_k of the vocabulary's size, top_p 1), each compiled the loop again."""
    lm = jaxaccel.from_params(TINY, tiny_params)
    matrix = np.full((TINY.vocab_size, 8), -1, np.int32)
    matrix[:, 0] = np.arange(TINY.vocab_size)[::-1]
    first = lm.generate([PROMPTS[1]], max_new_tokens=8, method="recycling", method_input=matrix)
    for same in (matrix.astype(np.float64), matrix.astype(np.int64)):
        again = lm.generate([PROMPTS[1]], max_new_tokens=8, method="recycling", method_input=same)
        assert again.tokens == first.tokens and again.stats["compile_s"] == 0, same.dtype
    sampled = lm.generate(PROMPTS, max_new_tokens=8, temperature=0.8, seed=3)
    for filters in ({"top_k": TINY.vocab_size}, {"top_p": 1.0}, {"top_k": 10 * TINY.vocab_size, "top_p": 1}):
        again = lm.generate(PROMPTS, max_new_tokens=8, temperature=0.8, seed=3, **filters)
        assert again.tokens == sampled.tokens and again.stats["compile_s"] == 0, filters


def test_eos_and_max_new_tokens_end_rows_like_plain_decoding(tiny_params):
    free = jaxaccel.from_params(TINY, tiny_params)
    ref = free.generate(PROMPTS, max_new_tokens=30).tokens
    eos = ref[3][5]
    lm = jaxaccel.from_params(TINY, tiny_params, eos_token_ids=(eos,))
    plain = lm.generate(PROMPTS, max_new_tokens=30).tokens
    for method, opts in METHODS[:1] + METHODS[3:4]:
        assert lm.generate(PROMPTS, max_new_tokens=30, method=method, **opts).tokens == plain
    assert plain[3][-1] == eos and len(plain[3]) <= 6
    for n in (1, 2, 7):
        assert free.generate(PROMPTS, max_new_tokens=n, method="recycling").tokens == [r[:n] for r in ref]


def test_sharded_model_decodes_trees_identically(tiny_params, reference):
    from jaxaccel.sharding import make_mesh

    lm = jaxaccel.from_params(TINY, tiny_params, mesh=make_mesh("tensor=2,data=2"))
    out = lm.generate(PROMPTS, max_new_tokens=40, method="recycling", template=[2, 2, 1])
    assert out.tokens == reference


def test_move_kv_matches_python():
    from jaxaccel.decode.tree import move_kv
    from jaxaccel.model.transformer import LayerKV

    rng = np.random.default_rng(3)
    k = rng.normal(size=(2, 1, 20, 2)).astype(np.float32)
    v = rng.normal(size=(2, 1, 20, 2)).astype(np.float32)
    cache_len = np.array([3, 7])
    path = np.array([[0, 2, 5, 9], [0, 1, 4, -1]])  # row 1: node 1 already in place, depth 2
    (moved,) = move_kv((LayerKV(jnp.asarray(k), jnp.asarray(v)),), jnp.asarray(cache_len), jnp.asarray(path))
    ek, ev = k.copy(), v.copy()
    for b in range(2):
        for d in range(1, 4):
            if path[b, d] >= 0:
                ek[b, :, cache_len[b] + d] = k[b, :, cache_len[b] + path[b, d]]
                ev[b, :, cache_len[b] + d] = v[b, :, cache_len[b] + path[b, d]]
    np.testing.assert_array_equal(np.asarray(moved.k), ek)
    np.testing.assert_array_equal(np.asarray(moved.v), ev)


@pytest.mark.parametrize("stochastic", [False, True])
def test_verify_sample_emits_the_target_distribution_on_a_hand_built_tree(stochastic):
    """One verification, many rows: the first emitted token is distributed as p(root) and,
    when a drafted token x was accepted, the next one as p(node of x) — with a duplicate
    sibling (deterministic drafts) and a different draft distribution at every node."""
    from jaxaccel.decode.sampling import make_sampling
    from jaxaccel.decode.tree import TreeShape, Tree, verify_sample

    v, rows = 5, 40000
    # root(0) -> 1:a, 2:a (duplicate), 3:b ; 1 -> 4:c, 5:d ; 3 -> 6:c      (stochastic: no duplicate)
    tokens = [0, 2, 2 if not stochastic else 4, 1, 3, 0, 3]
    parents = [-1, 0, 0, 0, 1, 1, 3]
    depth = [0, 1, 1, 1, 2, 2, 2]
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, v)).astype(np.float32) * 1.2
    logits[2] = logits[1]  # the same context gives the same distribution
    tree = Tree(tokens=jnp.broadcast_to(jnp.array(tokens), (rows, 7)), parents=jnp.broadcast_to(jnp.array(parents), (rows, 7)),
                depth=jnp.broadcast_to(jnp.array(depth), (rows, 7)), valid=jnp.ones((rows, 7), bool))
    tok = np.broadcast_to(np.array(tokens), (rows, 7)).copy()
    if stochastic:  # each node's children drawn from its own q without replacement (Gumbel top-k)
        q = jax.nn.softmax(jnp.asarray(rng.normal(size=(7, v)), jnp.float32), axis=-1)
        order = np.asarray(jnp.argsort(-(jax.random.gumbel(jax.random.key(2), (rows, 7, v)) + jnp.log(q)), axis=-1))
        for node_idx, (parent, rank) in {1: (0, 0), 2: (0, 1), 3: (0, 2), 4: (1, 0), 5: (1, 1), 6: (3, 0)}.items():
            tok[:, node_idx] = order[:, parent, rank]
        tree = tree._replace(tokens=jnp.asarray(tok), draft_q=jnp.broadcast_to(q, (rows, 7, v)))
    mode, sp = make_sampling(1.0, None, None)
    keys = jax.random.split(jax.random.key(1), rows)
    node, bonus = jax.jit(lambda t, l, k: verify_sample(t, l, k, mode, sp, TreeShape(7, 2, 3)))(
        tree, jnp.broadcast_to(jnp.asarray(logits), (rows, 7, v)), keys)
    node, bonus = np.asarray(node), np.asarray(bonus)
    p = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1), np.float64)
    path_first = {1: 1, 2: 2, 3: 3, 4: 1, 5: 1, 6: 3}  # the depth-1 node on each node's path
    on_path = np.array([path_first.get(n, 0) for n in node])
    first = np.where(node == 0, bonus, tok[np.arange(rows), on_path])
    counts = np.bincount(first, minlength=v)
    expected = lambda probs, n: probs / probs.sum() * n  # noqa: E731 (float64: chisquare checks the totals agree)
    assert sps.chisquare(counts, expected(p[0], rows)).pvalue > 1e-4
    for d1 in (1, 3):  # second token given an accepted depth-1 node
        sel = (on_path == d1) & (node != 0)
        second = np.where(node[sel] == d1, bonus[sel], tok[np.arange(rows)[sel], node[sel]])
        assert sel.sum() > 1000
        assert sps.chisquare(np.bincount(second, minlength=v), expected(p[d1], sel.sum())).pvalue > 1e-4


def test_hot_start_carries_the_matrix(tiny_params):
    lm = jaxaccel.from_params(TINY, tiny_params)
    cold = lm.generate([PROMPTS[1]], max_new_tokens=40, method="recycling", hot_start=True)
    (memory,) = lm._method_memory.values()
    assert memory.shape == (TINY.vocab_size, 8)
    hot = lm.generate([PROMPTS[1]], max_new_tokens=40, method="recycling", hot_start=True)
    assert hot.tokens == cold.tokens
    assert hot.stats["steps"] < cold.stats["steps"]  # the same text again: the carried matrix drafts it
    again = lm.generate([PROMPTS[1]], max_new_tokens=40, method="recycling")  # hot_start off: cold again
    assert again.stats["steps"] == cold.stats["steps"]


def test_default_model_greedy_is_lossless():
    lm = jaxaccel.load("builtin:default", dtype="float32")
    prompts = ["import os\nimport sys\n\n\ndef main(", "class Stack:\n    def __init__(self):\n        self.items = []\n",
               "for i in range(10):\n", "# Copyright"]
    ref = lm.generate(prompts, max_new_tokens=48)
    for method, opts in [("recycling", {"template": "paper"}), ("recycling", {}), ("pld", {})]:
        out = lm.generate(prompts, max_new_tokens=48, method=method, **opts)
        assert out.tokens == ref.tokens, method
        assert lm.generate(prompts[:1], max_new_tokens=48, method=method, **opts).tokens[0] == ref.tokens[0]


# ----------------------------------------------------------------------------- sampling

@pytest.fixture(scope="module")
def small_lm():
    params = randomize(init_params(SMALL, jax.random.key(3), "unrolled"), seed=4, scale=0.15)
    return jaxaccel.from_params(SMALL, params)


def warm_matrix(k=3):
    """A recycling matrix with k distinct candidates per token."""
    rng = np.random.default_rng(5)
    return np.stack([rng.permutation(SMALL.vocab_size)[:k] for _ in range(SMALL.vocab_size)]).astype(np.int32)


class _StochasticDrafter(TreeMethod):
    """Test-only DySpec-shaped drafter: each node's children are drawn without replacement
    from a fixed random draft distribution q (the verifier's min(1, p/q) + residual path)."""

    name = "test-stochastic"
    options: dict = {}
    widths = (3, 2)

    def __init__(self):
        super().__init__()
        self.parents, self.ranks, self.depth = build_template(self.widths, 3)

    def tree_shape(self):
        return TreeShape(nodes=len(self.parents), max_depth=len(self.widths), max_children=3)

    def init_state(self, ctx, batch, method_input, prompt_tokens=None, prompt_lens=None):
        return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(99), i))(jnp.arange(batch))

    def draft(self, state, ctx):
        v = ctx.config.vocab_size
        q = jax.nn.softmax(jnp.linspace(1.0, -1.0, v))  # fixed, different from the target
        keys = jax.vmap(jax.random.fold_in)(state.method_state, state.step + jnp.zeros_like(state.cache_len))
        n = len(self.parents)

        def row(key):
            gumbel = jax.random.gumbel(key, (n, v)) + jnp.log(q)
            order = jnp.argsort(-gumbel, axis=-1)  # each node's children: q without replacement
            return order[jnp.maximum(jnp.asarray(self.parents), 0), jnp.maximum(jnp.asarray(self.ranks), 0)]

        tokens = jax.vmap(row)(keys).astype(jnp.int32)
        b = tokens.shape[0]
        tree = static_tree(state.last_token, tokens, jnp.ones((b, n), bool), self.parents, self.depth)
        return tree._replace(draft_q=jnp.broadcast_to(q, (b, n, v)))


@pytest.mark.parametrize("method,opts,temperature,top_k,min_mat", [
    ("recycling", {"template": [3, 2], "k": 3}, 1.0, None, 1.2),
    ("recycling", {"k": 3}, 1.0, None, 1.02),  # "auto": tree and plain steps mixed by the fallback
    ("chain", {"k": 2}, 0.7, 4, 1.05),  # random drafts: few accepted
    ("test-stochastic", {}, 1.0, None, 1.2),
])
def test_sampling_matches_the_target_distribution(small_lm, monkeypatch, method, opts, temperature, top_k, min_mat):
    """Chi-square goodness of fit of the first two generated tokens (ROWS independent rows,
    one call) against the exact target distribution; the test fails at p < 1e-4 (a correct
    sampler fails it once in 10^4 runs; a lossy verifier is off by far more at this size)."""
    from jaxaccel.decode import methods

    monkeypatch.setitem(methods.METHODS, "test-stochastic", _StochasticDrafter)
    monkeypatch.setitem(tuning.RECYCLING_COST, jax.default_backend(), {1: 1.2, 2: 1.2})  # trees when h > ~0.17
    prompt = [1, 4, 2]
    matrix = None
    if method == "recycling":  # a warm matrix, so that trees are full from the first step
        matrix = warm_matrix()
    out = small_lm.generate([prompt] * ROWS, max_new_tokens=2, method=method, temperature=temperature, top_k=top_k,
                            seed=11, method_input=matrix, **opts)
    pairs = [t[:2] for t in out.tokens]
    expected = exact_pair_probs(small_lm, prompt, temperature, top_k)
    assert chi2_pvalue(pairs, expected) > 1e-4
    assert out.stats["mean_accepted"] > min_mat  # the trees were used, not just the bonus token


def test_plain_sampling_passes_the_same_check(small_lm):
    out = small_lm.generate([[1, 4, 2]] * ROWS, max_new_tokens=2, temperature=1.0, seed=11)
    assert chi2_pvalue([t[:2] for t in out.tokens], exact_pair_probs(small_lm, [1, 4, 2], 1.0)) > 1e-4


def test_a_lossy_verifier_fails_the_check(small_lm, monkeypatch):
    """The check has power: a verifier that favours the first drafted token (logit +1) is caught."""
    from jaxaccel.decode import tree as tree_mod

    real = tree_mod.verify_sample

    def lossy(tree, logits, *args):
        return real(tree, logits.at[:, 0].add(jax.nn.one_hot(tree.tokens[:, 1], logits.shape[-1])), *args)

    monkeypatch.setattr(tree_mod, "verify_sample", lossy)
    fresh = jaxaccel.from_params(SMALL, small_lm.params)  # nothing compiled with the real verifier
    matrix = warm_matrix()
    out = fresh.generate([[1, 4, 2]] * ROWS, max_new_tokens=2, method="recycling", temperature=1.0, seed=12,
                         method_input=matrix, template=[3, 2], k=3)
    assert chi2_pvalue([t[:2] for t in out.tokens], exact_pair_probs(small_lm, [1, 4, 2], 1.0)) < 1e-4


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("method,opts,message", [
    ("recycling", {"width": 3}, "unknown option width for method 'recycling'; valid options: hot_start, k, template;"),
    ("recycling", {"k": 0}, "k must be an integer >= 1"),
    ("recycling", {"k": 500}, "larger than the vocabulary (97 tokens)"),
    ("recycling", {"k": 10**9}, "larger than the vocabulary (97 tokens)"),  # at once (k tuples per node before)
    ("recycling", {"template": "big"}, "template must be"),
    ("recycling", {"template": [9]}, "template level 1 has width 9"),
    ("recycling", {"template": [1] * 3000}, "template has 3000 nodes; at most 512 are allowed"),
    ("pld", {"num_draft": 0}, "num_draft must be an integer >= 1"),
    ("chain", {"k": 0}, "k must be an integer >= 1"),
    ("chain", {"draft": "model"}, 'draft must be "random" or "recycling"'),
])
def test_bad_method_options(lm, method, opts, message):
    with pytest.raises(InvalidArgumentError) as e:
        lm.generate([[1, 2]], max_new_tokens=4, method=method, **opts)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_tree_past_the_maximum_length_warns_as_autoregressive_does(lm):
    """The cache is sized from the request, tree slots included: a tree that reaches past the
    model's maximum length decodes (with the warning autoregressive gives past it), and one
    that fits says nothing. A tree's nodes sit at the root's position + their depth, so its
    depth counts, not its node slots (the 81-node, 6-level paper tree used to warn here).
    Greedy output stays autoregressive's."""
    prompt = [list(range(1, 90))]
    with pytest.warns(UserWarning, match="the draft tree's depth 20 runs past the model's maximum length 256"):
        out = lm.generate(prompt, max_new_tokens=150, method="recycling", template=[1] * 20)
    assert out.tokens == lm.generate(prompt, max_new_tokens=150).tokens
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lm.generate(prompt, max_new_tokens=150, method="recycling", template="paper")  # 239 + depth 6 fit



def pld_reference(seq, max_ngram, num_draft):
    """transformers' prompt-lookup rule, in plain Python: longest n-gram first, earliest match."""
    for n in range(max_ngram, 0, -1):
        if len(seq) <= n:
            continue
        tail = seq[-n:]
        for s in range(len(seq) - n):
            if seq[s:s + n] == tail and s + n < len(seq):
                return seq[s + n:s + n + num_draft]
    return []


def test_prompt_lookup_drafts_like_transformers():
    from jaxaccel.decode.chains import PromptLookup
    from jaxaccel.decode.engine import DecodeState

    rng = np.random.default_rng(7)
    method = PromptLookup(num_draft=5)
    for trial in range(20):
        b, p, o = 3, 12, 16
        plen = rng.integers(1, p + 1, b)
        num_new = rng.integers(0, o, b)
        prompt = rng.integers(0, 4, (b, p))  # a small alphabet: many matches
        out = rng.integers(0, 4, (b, o))
        seqs = [list(prompt[i, :plen[i]]) + list(out[i, :num_new[i]]) for i in range(b)]
        last = np.array([s[-1] for s in seqs])
        state = DecodeState(cache=None, cache_len=jnp.asarray(plen + num_new - 1), last_token=jnp.asarray(last),
                            out_tokens=jnp.asarray(out), num_new=jnp.asarray(num_new), done=jnp.zeros(b, bool),
                            rng=None, step=jnp.int32(0), forwards=None,
                            method_state=(jnp.asarray(prompt, jnp.int32), jnp.asarray(plen, jnp.int32)))
        tree = method.draft(state, None)
        for i in range(b):
            expected = pld_reference([int(t) for t in seqs[i]], 3, 5)
            n = int(tree.valid[i].sum()) - 1
            assert [int(t) for t in tree.tokens[i, 1:1 + n]] == expected, (trial, i)


def test_decode_cli_methods_and_bad_options(capsys):
    import json

    from jaxaccel.cli import run_cli
    from jaxaccel.decode.__main__ import main

    def run(*extra):
        try:
            code = run_cli(main, ["--prompt", "import os\n", "--max-new-tokens", "24", "--output", "json", *extra])
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err

    (code_a, out_a, err_a), (code_b, out_b, err_b) = run(), run("--method", "recycling", "--option",
                                                                   "template=[2,1]", "--option", "k=4")
    assert code_a == 0 and code_b == 0, err_a + err_b
    a, b = json.loads(out_a), json.loads(out_b)
    assert a["results"][0]["tokens"] == b["results"][0]["tokens"]
    assert b["stats"]["method"] == "recycling" and b["stats"]["steps"] <= a["stats"]["steps"]
    code, _, err = run("--method", "pld", "--option", "depth=3")
    assert code == 2 and err.strip().startswith("error: unknown option depth for method 'pld'; valid options: "
                                                "max_ngram, num_draft; generate's own arguments: max_new_tokens")


def test_recycling_template_does_not_depend_on_ks_past_the_widths():
    """build_template ranks only r < width per parent: the template is the one k alone would give."""
    from jaxaccel.decode.recycling import build_template
    from jaxaccel.decode.tuning import PAPER_WIDTHS

    for widths in (PAPER_WIDTHS, (1, 1, 1), (3, 5, 2), (4, 16, 9, 1)):
        for k in (max(widths), 8, 64):
            brute = _template_all_ranks(widths, k)
            got = build_template(widths, k)
            assert all(np.array_equal(a, b) for a, b in zip(got, brute)), (widths, k)


def _template_all_ranks(widths, k):
    """The template with every rank < k a candidate (the code before the r < width bound)."""
    from jaxaccel.decode.recycling import _rank_prior

    parents, ranks, depth, score, level = [-1], [-1], [0], [1.0], [0]
    for d, width in enumerate(widths, start=1):
        candidates = sorted([(score[p] * _rank_prior(r), p, r) for p in level for r in range(k)],
                            key=lambda c: (-c[0], c[1], c[2]))
        level = []
        for s, p, r in sorted(candidates[:width], key=lambda c: (c[1], c[2])):
            level.append(len(parents))
            parents.append(p)
            ranks.append(r)
            depth.append(d)
            score.append(s)
    return np.asarray(parents, np.int32), np.asarray(ranks, np.int32), np.asarray(depth, np.int32)
