"""TokenSelect decoding (`method="tokenselect"`): exact when every key fits the budget, the
selection rule against numpy brute force for one layer (decode step and prefill chunk), the
selection cache, compact vs original positions, contexts past the trained length, bad input.
Models are tiny (2 CPU cores shared with other work)."""
import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxaccel
from conftest import randomize
from jaxaccel.cli import run_cli
from jaxaccel.config import ModelConfig
from jaxaccel.decode import methods
from jaxaccel.decode.__main__ import main as decode_main
from jaxaccel.decode.tokenselect import TokenSelect
from jaxaccel.errors import InvalidArgumentError
from jaxaccel.model.layers import Attention, assemble_selection, rope_inv_freq, rope_tables
from jaxaccel.model.options import LayerOptions, SelectionState, TokenSelectAttention
from jaxaccel.model.transformer import build_visibility, init_params
from jaxaccel.pallas_kernels import token_select as ts

CFG = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=128)
SMALL_BUDGET = dict(k=8, n_init=4, n_local=8)  # 20 keys: a 60-token context has gaps


@pytest.fixture(scope="module")
def lm():
    return jaxaccel.from_params(CFG, randomize(init_params(CFG, jax.random.key(0), "unrolled")), eos_token_ids=())


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, CFG.vocab_size, size=n).tolist() for n in lengths]


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("lengths,options", [
    ([23], {}),  # the whole cache fits the default budget: plain attention over rotated keys
    ([23, 5, 37], {}),
    ([23, 5, 30], dict(k=40, n_init=4, n_local=8, chunk=16)),  # cache > budget, every row fits: all keys selected
])
def test_tokenselect_with_room_for_every_key_equals_autoregressive(lm, lengths, options):
    ps = prompts(lengths)
    want = lm.generate(ps, max_new_tokens=16).tokens
    got = lm.generate(ps, max_new_tokens=16, method="tokenselect", **options)
    assert got.tokens == want
    assert got.stats["selection_lookups"] == 0  # no row outgrew the budget


# ----------------------------------------------------------------------------- one layer vs numpy


def np_rope(x, pos, inv_freq):
    """Rotate-half RoPE, float64: x [..., hd] at positions broadcastable to x.shape[:-1]."""
    angles = np.asarray(pos, np.float64)[..., None] * inv_freq
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * np.cos(angles) - x2 * np.sin(angles), x2 * np.cos(angles) + x1 * np.sin(angles)], -1)


def np_selection(query, keys, length, policy):
    """The selected slots of one row, straight from the rule: soft votes of the query heads
    (head h reads KV head h // group) over the candidates between the init and local windows,
    max-pool, top-k (ties to the lower slot), plus both windows."""
    if length <= policy.budget:
        return np.arange(length)
    n_heads, group = query.shape[0], query.shape[0] // keys.shape[0]
    candidates = np.arange(policy.n_init, length - policy.n_local)
    votes = np.zeros(keys.shape[1])
    for head in range(n_heads):
        logits = keys[head // group, candidates] @ query[head]
        probs = np.exp(logits - logits.max())
        votes[candidates] += probs / probs.sum()
    ranked = np.full(keys.shape[1], -np.inf)
    ranked[candidates] = votes[candidates]
    if policy.pool:
        r = policy.pool // 2
        ranked = np.array([ranked[max(j - r, 0):j + r + 1].max() if j in candidates else -np.inf
                           for j in range(len(ranked))])
    top = np.argsort(-ranked, kind="stable")[:policy.k]
    return np.array(sorted(set(range(policy.n_init)) | set(top) | set(range(length - policy.n_local, length))))


def np_attention(q, sel_k, sel_v, sel_pos, new_k, new_v, new_pos, query_pos):
    """Each query [h, hd] (already scaled) over the selected keys and the new keys it sees;
    keys before RoPE, rotated here. q: [T, h, hd]; new_k / new_v [T, kvh, hd] (query t sees
    new keys 0..t); positions in the same frame."""
    n_heads, group = q.shape[1], q.shape[1] // sel_k.shape[0]
    inv = INV_FREQ
    out = np.zeros(q.shape)
    for t in range(q.shape[0]):
        keys = np.concatenate([np_rope(sel_k, sel_pos, inv), np_rope(new_k[:t + 1].transpose(1, 0, 2),
                                                                     new_pos[:t + 1], inv)], axis=1)
        values = np.concatenate([sel_v, new_v[:t + 1].transpose(1, 0, 2)], axis=1)
        q_rot = np_rope(q[t], query_pos[t], inv)
        for head in range(n_heads):
            logits = keys[head // group] @ q_rot[head]
            p = np.exp(logits - logits.max())
            out[t, head] = (p / p.sum()) @ values[head // group]
    return out


HD = CFG.resolved_head_dim
INV_FREQ = rope_inv_freq(HD, CFG.rope_theta, None).astype(np.float64)
CACHE = 128


def layer_case(seed, lengths, t, cache_len=CACHE):
    """Attention params, a pre-RoPE cache [b, kvh, cache_len, hd] and t new tokens' inputs."""
    rng = np.random.default_rng(seed)
    d, h, kvh = CFG.d_model, CFG.n_heads, CFG.n_kv_heads
    params = {"q": {"kernel": rng.normal(size=(d, h, HD)) * 0.5}, "k": {"kernel": rng.normal(size=(d, kvh, HD)) * 0.5},
              "v": {"kernel": rng.normal(size=(d, kvh, HD)) * 0.5}, "o": {"kernel": rng.normal(size=(h, HD, d)) * 0.2}}
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    b = len(lengths)
    cache = tuple(jnp.asarray(rng.normal(size=(b, kvh, cache_len, HD)), jnp.float32) for _ in range(2))
    x = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    return params, cache, x


def run_layer(policy, params, cache, x, lengths, write_slots, state=None):
    lengths = jnp.asarray(lengths, jnp.int32)
    t = x.shape[1]
    positions = lengths[:, None] + jnp.arange(t, dtype=jnp.int32)
    rope = rope_tables(positions, rope_inv_freq(HD, CFG.rope_theta, None))
    visibility = build_visibility(positions, cache_len=cache[0].shape[2], prefix_len=lengths)
    layer = Attention(CFG, LayerOptions(attention=policy))
    extra = () if state is None else (state,)
    return jax.jit(lambda *a: layer.apply({"params": params}, *a))(x, rope, visibility, cache,
                                                                   jnp.asarray(write_slots, jnp.int32), *extra)


def projections(params, x):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    return (np.einsum("btd,dhe->bthe", x, p["q"]["kernel"]), np.einsum("btd,dhe->bthe", x, p["k"]["kernel"]),
            np.einsum("btd,dhe->bthe", x, p["v"]["kernel"]), p["o"]["kernel"])


@pytest.mark.parametrize("positions,pool", [("compact", None), ("original", 3)])
def test_decode_step_attends_over_the_brute_force_selection(positions, pool):
    lengths = [100, 57, 15]  # budget 20: two rows select (with gaps), the last keeps every key
    policy = TokenSelectAttention(**SMALL_BUDGET, pool=pool, positions=positions, cache_threshold=None)
    params, cache, x = layer_case(0, lengths, 1)
    out, (new_k, _) = run_layer(policy, params, cache, x, lengths, np.array(lengths)[:, None])
    q, k, v, wo = projections(params, x)
    ck, cv = (np.asarray(c, np.float64) for c in cache)
    for row, length in enumerate(lengths):
        sel = np_selection(q[row, 0], ck[row, :, :length], length, policy)
        sel_pos = np.arange(len(sel)) if positions == "compact" else sel
        own = len(sel) if positions == "compact" else length
        attn = np_attention(q[row] * HD ** -0.5, ck[row][:, sel], cv[row][:, sel], sel_pos, k[row], v[row],
                            np.array([own]), np.array([own]))
        np.testing.assert_allclose(np.asarray(out[row]), np.einsum("the,hed->td", attn, wo), rtol=2e-4, atol=2e-5)
        # the new key goes into the cache before RoPE
        np.testing.assert_allclose(np.asarray(new_k[row, :, length]), k[row, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lengths,cache_len", [([90, 40, 12], CACHE), ([131000, 40, 12], 131072)])
def test_prefill_chunk_selects_with_its_mean_query(lengths, cache_len):
    """Also at ~128K tokens: the chunk is rotated at its compacted positions, not at its true
    ones with the selected keys shifted (float32 angles at 131K are off by ~1e-2 rad)."""
    t = 8
    policy = TokenSelectAttention(**SMALL_BUDGET, positions="compact")
    params, cache, x = layer_case(1, lengths, t, cache_len)
    real = np.ones((3, t), bool)
    real[1, 5:] = False  # row 1's chunk ends early: its padding neither votes nor is written
    slots = np.where(real, np.array(lengths)[:, None] + np.arange(t), -1)
    out, (new_k, _) = run_layer(policy, params, cache, x, lengths, slots)
    q, k, v, wo = projections(params, x)
    ck, cv = (np.asarray(c, np.float64) for c in cache)
    for row, length in enumerate(lengths):
        n = real[row].sum()
        sel = np_selection(q[row, :n].mean(axis=0), ck[row, :, :length], length, policy)
        new_pos = len(sel) + np.arange(n)  # compact: the chunk right after its selection
        attn = np_attention(q[row, :n] * HD ** -0.5, ck[row][:, sel], cv[row][:, sel], np.arange(len(sel)),
                            k[row, :n], v[row, :n], new_pos, new_pos)
        np.testing.assert_allclose(np.asarray(out[row, :n]), np.einsum("the,hed->td", attn, wo), rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(np.asarray(new_k[row, :, length:length + n]).transpose(1, 0, 2), k[row, :n],
                                   rtol=1e-5, atol=1e-5)
    # row 1's slots past its real tokens still hold what the cache held
    np.testing.assert_array_equal(np.asarray(new_k[1, :, 45:128]), np.asarray(cache[0][1, :, 45:128]))


def test_compact_and_original_positions_differ_only_when_the_selection_has_gaps():
    lengths = [100, 15]
    params, cache, x = layer_case(2, lengths, 1)
    outs = [run_layer(TokenSelectAttention(**SMALL_BUDGET, positions=p), params, cache, x, lengths,
                      np.array(lengths)[:, None])[0] for p in ("compact", "original")]
    assert not np.allclose(outs[0][0], outs[1][0], atol=1e-4)  # 100 keys -> 20 selected: gaps
    np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-6)  # 15 keys: all selected, no gap


def test_reused_selection_is_laid_out_like_a_fresh_one():
    lengths = jnp.array([100, 57, 15, 0], jnp.int32)
    policy = TokenSelectAttention(**SMALL_BUDGET)
    scores = jax.random.uniform(jax.random.key(0), (4, CACHE))
    indices, valid = ts.select_indices(scores, lengths, k=8, n_init=4, n_local=8)
    again = assemble_selection(indices[:, 4:12], lengths, policy, CACHE)
    np.testing.assert_array_equal(again[0], indices)
    np.testing.assert_array_equal(again[1], valid)


def test_selection_cache_state_of_a_decode_step():
    """A hit reuses the cached top-k (and keeps the query that chose it); a miss selects
    afresh and caches the new query; short rows never look up."""
    lengths = [100, 57, 15]
    params, cache, x = layer_case(3, lengths, 1)
    slots = np.array(lengths)[:, None]
    empty = SelectionState.empty(3, 8, CFG.n_heads * HD)
    policy = TokenSelectAttention(**SMALL_BUDGET, cache_threshold=0.5)
    out, _, first = run_layer(policy, params, cache, x, lengths, slots, empty)
    np.testing.assert_array_equal(first.filled, [True, True, False])
    np.testing.assert_array_equal(first.lookups, [1, 1, 0])
    np.testing.assert_array_equal(first.hits, [0, 0, 0])
    # Row 0 asks again with the same query (cos = 1: a hit), row 1 with the opposite one (a miss).
    stale = first._replace(top=first.top.at[0].set(jnp.arange(10, 18)))
    x2 = x.at[1].multiply(-1.0)
    out2, _, second = run_layer(policy, params, cache, x2, lengths, slots, stale)
    np.testing.assert_array_equal(second.hits, [1, 0, 0])
    np.testing.assert_array_equal(second.lookups, [2, 2, 0])
    np.testing.assert_array_equal(second.top[0], np.arange(10, 18))  # reused as cached
    np.testing.assert_allclose(second.query[1], -first.query[1], rtol=1e-6)
    fresh = run_layer(dataclasses.replace(policy, cache_threshold=None), params, cache, x2, lengths, slots)[0]
    assert not np.allclose(out2[0], fresh[0], atol=1e-4)  # row 0 attended over the stale selection
    np.testing.assert_allclose(out2[1:], fresh[1:], rtol=1e-5, atol=1e-6)
    # Threshold -1 reuses even the opposite query.
    always = run_layer(dataclasses.replace(policy, cache_threshold=-1.0), params, cache, x2, lengths, slots, first)[2]
    np.testing.assert_array_equal(always.hits, [1, 1, 0])


def test_a_selection_is_reused_only_while_the_keys_written_since_are_in_the_local_window():
    """A top-k chosen at length L0 holds no slot past L0 - n_local; reused at L > L0 + n_local,
    the keys written in between ([L0, L - n_local)) were in no part of the selection, so no
    step saw them until a miss. Even threshold -1 (always reuse) selects afresh then."""
    n_local, l0 = SMALL_BUDGET["n_local"], 60
    params, cache, x = layer_case(6, [l0], 1)
    policy = TokenSelectAttention(**SMALL_BUDGET, cache_threshold=-1.0)
    first = run_layer(policy, params, cache, x, [l0], [[l0]], SelectionState.empty(1, 8, CFG.n_heads * HD))[2]
    np.testing.assert_array_equal(first.length, [l0])
    assert int(first.top.max()) < l0 - n_local
    within = run_layer(policy, params, cache, x, [l0 + n_local], [[l0 + n_local]], first)
    np.testing.assert_array_equal(within[2].hits, [1])
    np.testing.assert_array_equal(within[2].length, [l0])  # a hit keeps the selection's own length
    past = run_layer(policy, params, cache, x, [l0 + n_local + 1], [[l0 + n_local + 1]], within[2])
    np.testing.assert_array_equal(past[2].hits, [1])  # a miss: the hit count stays
    np.testing.assert_array_equal(past[2].length, [l0 + n_local + 1])
    fresh = run_layer(dataclasses.replace(policy, cache_threshold=None), params, cache, x, [l0 + n_local + 1],
                      [[l0 + n_local + 1]])
    np.testing.assert_array_equal(past[0], fresh[0])


def test_threshold_one_reuses_an_identical_query_and_just_above_one_never_does():
    """cos(q, q) in float32 is 1 - 6e-8 for about a quarter of queries, so "1 reuses only an
    identical query" missed on those rows; just above 1, not even an identical query hits."""
    from jaxaccel.model.layers import query_cosine

    lengths = [100] * 16
    params, cache, x = layer_case(4, lengths, 1)
    slots = np.array(lengths)[:, None]
    empty = SelectionState.empty(16, 8, CFG.n_heads * HD)
    policy = TokenSelectAttention(**SMALL_BUDGET, cache_threshold=1.0)
    first = run_layer(policy, params, cache, x, lengths, slots, empty)[2]
    assert np.any(np.asarray(query_cosine(first.query, first.query)) < 1.0)  # rows the rounding hits
    again = run_layer(policy, params, cache, x, lengths, slots, first)[2]
    np.testing.assert_array_equal(again.hits, [1] * 16)
    above = run_layer(dataclasses.replace(policy, cache_threshold=1.0 + 1e-6), params, cache, x, lengths, slots,
                      first)[2]
    np.testing.assert_array_equal(above.hits, [0] * 16)


def test_query_cosine_stays_within_minus_one_and_one():
    """float32 rounding puts cos(q, -q) below -1 for many 256-wide queries (about a quarter of
    these); a threshold of -1 must still reuse, so the cosine is clipped."""
    from jaxaccel.model.layers import query_cosine

    q = jax.random.normal(jax.random.key(0), (2000, 256), jnp.float32)
    cos = np.asarray(query_cosine(q, -q))
    assert cos.min() >= -1.0 and np.all(cos <= -0.999)
    assert np.all(np.asarray(query_cosine(q, q)) <= 1.0)


# ----------------------------------------------------------------------------- baseline selections


def test_recent_selection_is_streamingllm_at_the_same_budget():
    """selection="recent": init + a local window of k + n_local keys, the attention exactly
    as if those were selected by score."""
    lengths = [100, 57, 15]
    policy = TokenSelectAttention(**SMALL_BUDGET, selection="recent", cache_threshold=None)
    params, cache, x = layer_case(4, lengths, 1)
    out, _ = run_layer(policy, params, cache, x, lengths, np.array(lengths)[:, None])
    q, k, v, wo = projections(params, x)
    ck, cv = (np.asarray(c, np.float64) for c in cache)
    window = policy.k + policy.n_local
    for row, length in enumerate(lengths):
        sel = np.arange(length) if length <= policy.budget else np.concatenate(
            [np.arange(policy.n_init), np.arange(length - window, length)])
        attn = np_attention(q[row] * HD ** -0.5, ck[row][:, sel], cv[row][:, sel], np.arange(len(sel)), k[row],
                            v[row], np.array([len(sel)]), np.array([len(sel)]))
        np.testing.assert_allclose(np.asarray(out[row]), np.einsum("the,hed->td", attn, wo), rtol=2e-4, atol=2e-5)


def test_random_selection_draws_k_distinct_candidates_per_row_step_and_layer():
    from jaxaccel.model.layers import _fresh_top

    lengths = jnp.array([100, 57, 100, 100], jnp.int32)
    policy = TokenSelectAttention(**SMALL_BUDGET, selection="random")
    query = jax.random.normal(jax.random.key(2), (4, CFG.n_heads, HD))
    query = query.at[2].set(query[0])  # rows 0 and 2: the same length and query; row 3 another query
    cache_k = jnp.zeros((4, CFG.n_kv_heads, CACHE, HD))
    top = np.asarray(_fresh_top(policy, query, cache_k, lengths))
    assert top.shape == (4, policy.k)
    for row, length in enumerate(np.asarray(lengths)):
        assert len(set(top[row])) == policy.k and np.all(np.diff(top[row]) > 0)
        assert top[row].min() >= policy.n_init and top[row].max() < length - policy.n_local
    np.testing.assert_array_equal(top[0], top[2])  # deterministic
    np.testing.assert_array_equal(top, np.asarray(_fresh_top(policy, query, cache_k, lengths)))
    # Another example of that length, or another layer (its own query), draws its own subset.
    assert not np.array_equal(top[0], top[3])
    other_layer = np.asarray(_fresh_top(policy, query * 1.5 + 0.25, cache_k, lengths))
    assert all(not np.array_equal(top[row], other_layer[row]) for row in range(4))
    later = np.asarray(_fresh_top(policy, query, cache_k, lengths + 1))
    assert not np.array_equal(top[0], later[0])  # the next step draws again
    scored = np.asarray(_fresh_top(dataclasses.replace(policy, selection="topk"), query,
                                   jax.random.normal(jax.random.key(1), cache_k.shape), lengths))
    assert not np.array_equal(top[0], scored[0])


def test_baseline_selections_decode_past_the_budget_and_select_afresh_at_every_step(lm):
    """The baselines never reuse a selection, at the default cache_threshold too (with 0.9 a
    "recent" block chosen steps earlier was reused while the local window moved on, leaving a
    gap StreamingLLM does not have)."""
    ps = prompts([60, 45], seed=3)
    outs = {sel: lm.generate(ps, max_new_tokens=20, method="tokenselect", **SMALL_BUDGET, chunk=16,
                             selection=sel) for sel in ("topk", "recent", "random")}
    assert all([len(t) for t in o.tokens] == [20, 20] for o in outs.values())
    for sel in ("recent", "random"):
        assert outs[sel].stats["selection_lookups"] == 2 * 2 * 20 and outs[sel].stats["selection_cache_hits"] == 0
        # no selection cache: no hit rate (not a rate of 0)
        assert outs[sel].stats["selection_cache_hit_rate"] is None
        assert outs[sel].stats["selection_cache_hit_rate_per_layer"] == [None, None]


# ----------------------------------------------------------------------------- the selection cache in decoding


class UncheckedTokenSelect(TokenSelect):
    THRESHOLD_RANGE = (-1.0, 2.0)  # lets a test ask for a threshold no cosine reaches


def test_selection_cache_thresholds(lm, monkeypatch):
    ps = prompts([60, 45], seed=1)
    run = lambda **o: lm.generate(ps, max_new_tokens=10, method="tokenselect", **SMALL_BUDGET, chunk=16, **o)  # noqa
    plain = run(cache_threshold=None)
    assert plain.stats["selection_cache_hits"] == 0 and plain.stats["selection_lookups"] == 2 * 2 * 10
    monkeypatch.setitem(methods.METHODS, "tokenselect", UncheckedTokenSelect)
    never = run(cache_threshold=1.0 + 1e-6)
    assert never.tokens == plain.tokens and never.stats["selection_cache_hits"] == 0
    always = run(cache_threshold=-1.0)
    # every step reuses each layer's last selection of each row while it is at most n_local (8)
    # steps old: steps 1-8 of 10 hit, step 9 selects afresh
    assert always.stats["selection_cache_hits"] == always.stats["selection_lookups"] - 2 * 2 * 2
    assert always.stats["selection_cache_hit_rate"] == pytest.approx(0.8)
    # The threshold is read only by the decode steps: a new value compiles the loop, not the prefill.
    prefills = lambda: sum(1 for key in lm._compiled if key[0] == "prefill")  # noqa: E731
    before = prefills()
    again = run(cache_threshold=0.5)
    assert prefills() == before and again.stats["compile_s"] > 0


# ----------------------------------------------------------------------------- long contexts


def test_contexts_past_the_trained_length(lm):
    ps = prompts([150, 40], seed=2)  # max_seq_len 128
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # TokenSelect does not warn
        out = lm.generate(ps, max_new_tokens=8, method="tokenselect", **SMALL_BUDGET, chunk=32, temperature=0.8)
    assert [len(t) for t in out.tokens] == [8, 8]
    with pytest.warns(UserWarning, match="past the model's maximum length 128") as record:
        plain = lm.generate(ps[:1], max_new_tokens=8)
    assert len(record) == 1 and len(plain.tokens[0]) == 8


@pytest.mark.parametrize("options,match", [
    # A prefill chunk's tokens sit after the <= 20 keys they select: 20 + 112 positions > 128
    # (the second 112-token chunk of the 224-token prompt reaches position 131).
    (dict(chunk=112), r"maximum length 128: .*may reach position 131\)$"),
    # True positions run to the end of the context: no extrapolation at all.
    (dict(chunk=32, positions="original"), r"maximum length 128: method 'tokenselect' uses positions the model "
                                           r"was not trained at$"),
])
def test_positions_past_the_trained_length_are_warned_about(lm, options, match):
    with pytest.warns(UserWarning, match=match) as record:
        out = lm.generate(prompts([224], seed=4), max_new_tokens=4, method="tokenselect", **SMALL_BUDGET, **options)
    assert len(record) == 1 and len(out.tokens[0]) == 4


# ----------------------------------------------------------------------------- bad input


def test_a_k_past_the_cache_allocates_nothing_for_it(lm):
    """k = 10**12 is a valid budget that covers any cache: the whole cache is attended (as
    dense) and no [batch, k] selection state is allocated (it was: out of memory)."""
    ps = prompts([60, 20], seed=7)
    out = lm.generate(ps, max_new_tokens=4, method="tokenselect", k=10 ** 12, n_init=4, n_local=8)
    assert out.tokens == lm.generate(ps, max_new_tokens=4).tokens


@pytest.mark.parametrize("options,message", [
    (dict(k=0), "k must be an integer >= 1, got 0"),
    (dict(n_init=-1), "n_init must be an integer >= 0, got -1"),
    (dict(n_local=-2), "n_local must be an integer >= 0, got -2"),
    (dict(pool=2), "pool must be an odd integer >= 1 or None, got 2"),
    (dict(pool=0), "pool must be an odd integer >= 1 or None, got 0"),
    (dict(chunk=0), "chunk must be an integer >= 1, got 0"),
    (dict(cache_threshold=1.5), "cache_threshold must be a number in [-1, 1] or None, got 1.5"),
    (dict(cache_threshold=-1.01), "cache_threshold must be a number in [-1, 1] or None, got -1.01"),
    (dict(positions="rank"), "positions must be 'compact' or 'original', got 'rank'"),
    (dict(selection="none"), "selection must be 'topk', 'recent' or 'random', got 'none'"),
    (dict(selection="recent", cache_threshold=0.9), "cache_threshold is for selection='topk' only"),
    (dict(selection="random", pool=3), "pool is for selection='topk' only"),
    (dict(budget=3), "unknown option budget for method 'tokenselect'"),
])
def test_bad_options_are_one_line_errors(lm, options, message):
    with pytest.raises(InvalidArgumentError) as err:
        lm.generate([[1, 2, 3]], max_new_tokens=4, method="tokenselect", **options)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_option_none_means_no_value(capsys):
    """`--option cache_threshold=None` is Python's spelling of YAML's null, not the string 'None'."""
    from jaxaccel.decode.__main__ import parse_options

    assert parse_options(["cache_threshold=None", "pool=none", "k=null"]) == {"cache_threshold": None, "pool": None,
                                                                              "k": None}
    assert run_cli(decode_main, ["--prompt-ids", "1,2", "--method", "tokenselect", "--max-new-tokens", "2",
                                 "--option", "cache_threshold=None", "--option", "pool=None"]) in (0, None)


def test_cli_bad_option_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(decode_main, ["--prompt-ids", "1,2", "--method", "tokenselect", "--option", "pool=4"])
    assert exit_.value.code == 2
    assert "pool must be an odd integer" in capsys.readouterr().err


def test_sliding_window_models_say_that_nothing_is_selected():
    cfg = dataclasses.replace(CFG, sliding_window=16, architecture="mistral")
    lm = jaxaccel.from_params(cfg, init_params(cfg, jax.random.key(0), "unrolled"), eos_token_ids=())
    with pytest.warns(UserWarning, match="sliding window of 16 tokens, so no key is selected"):
        out = lm.generate([[1, 2, 3]], max_new_tokens=4, method="tokenselect", **SMALL_BUDGET)
    assert out.tokens == lm.generate([[1, 2, 3]], max_new_tokens=4).tokens
