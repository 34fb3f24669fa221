"""TokenSelect kernels: key scoring, top-k selection and sparse RoPE attention.

The Pallas kernels run in interpret mode on CPU against their jnp references; the references
are checked against numpy brute force, the model's RoPE and the project's dense attention;
both hardware lowerings are produced from this CPU host. Shapes stay tiny (2 CPU cores)."""
import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaccel.pallas_kernels import token_select as ts
from jaxaccel.pallas_kernels.ops import attend

THETA = 10000.0

# One compiled program per call instead of op-by-op dispatch (the kernels are jitted already).
score_reference = jax.jit(ts.score_keys_reference)
sparse_reference = jax.jit(ts.sparse_attention_reference, static_argnames=("positions",))
select_indices = jax.jit(ts.select_indices, static_argnames=("k", "n_init", "n_local", "pool"))


def normal(rng, shape, dtype=jnp.float32, scale=1.0):
    return jnp.asarray(scale * rng.normal(size=shape), dtype)


def cache_inputs(seed, b, h, kvh, d, s, dtype=jnp.float32):
    """q [b, h, d] scaled by 1/sqrt(d), k / v [b, kvh, s, d], own k / v [b, kvh, d]."""
    rng = np.random.default_rng(seed)
    return (normal(rng, (b, h, d), dtype, d ** -0.5), normal(rng, (b, kvh, s, d), dtype),
            normal(rng, (b, kvh, s, d), dtype), normal(rng, (b, kvh, d), dtype), normal(rng, (b, kvh, d), dtype))


def numpy_scores(q, k, lengths, candidate_mask=None) -> np.ndarray:
    """Soft voting straight from the definition, float64: head h reads KV head h // group."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, h, _ = q.shape
    s = k.shape[2]
    group = h // k.shape[1]
    out = np.zeros((b, s))
    for row in range(b):
        visible = np.arange(s) < lengths[row]
        if candidate_mask is not None:
            visible &= np.asarray(candidate_mask[row])
        if not visible.any():
            continue
        for head in range(h):
            logits = k[row, head // group][visible] @ q[row, head]
            probs = np.exp(logits - logits.max())
            out[row, visible] += probs / probs.sum()
    return out


def numpy_selection(scores, length, *, k, n_init, n_local, pool=None):
    """One row's selected slots (ascending), by brute force; ties to the lower slot."""
    budget = n_init + k + n_local
    if length <= budget:
        return list(range(length))
    s = len(scores)
    slot = np.arange(s)
    candidate = (slot >= n_init) & (slot < length - n_local)
    ranked = np.where(candidate, scores, -np.inf)
    if pool:
        r = pool // 2
        ranked = np.where(candidate, [ranked[max(0, j - r):j + r + 1].max() for j in range(s)], -np.inf)
    top = np.argsort(-ranked, kind="stable")[:k]
    return sorted(list(range(n_init)) + list(top) + list(range(length - n_local, length)))


def selection(seed, scores_shape, lengths, *, k, n_init, n_local, pool=None):
    scores = jnp.asarray(np.random.default_rng(seed).random(scores_shape), jnp.float32)
    return select_indices(scores, jnp.asarray(lengths, jnp.int32), k=k, n_init=n_init, n_local=n_local,
                             pool=pool)


def model_rope(x, positions):
    """The model's own RoPE (jaxaccel.model.layers) on x [b, seq, heads, d], positions [b, seq]."""
    from jaxaccel.model.layers import apply_rope, rope_inv_freq, rope_tables

    return apply_rope(x, rope_tables(positions, rope_inv_freq(x.shape[-1], THETA, None)))


def close(got, want, tol=1e-5) -> float:
    """Assert got ~= want; -> the largest absolute difference (for a test's own assertion)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    return float(np.abs(got - want).max())


# ----------------------------------------------------------------------------- RoPE


def test_rope_helper_equals_the_model_rope():
    from jaxaccel.model.layers import rope_inv_freq

    rng = np.random.default_rng(0)
    x = normal(rng, (2, 5, 3, 16))
    positions = jnp.asarray(rng.integers(0, 5000, (2, 5)), jnp.int32)
    np.testing.assert_array_equal(ts.rope_inv_freq(16, THETA), rope_inv_freq(16, THETA, None))
    close(ts.apply_rope(x, positions[:, :, None], ts.rope_inv_freq(16, THETA)), model_rope(x, positions), 1e-6)


# ----------------------------------------------------------------------------- scoring

SCORE_CASES = [
    # b, heads, kv_heads, head_dim, cache_len, block_k, lengths, candidate window (n_init, n_local) or None
    (3, 4, 4, 16, 64, 16, [64, 0, 37], None),  # GQA 1, a padding row
    (2, 4, 2, 32, 72, 16, [72, 5], (2, 3)),  # GQA 2, cache_len padded to 80 in the wrapper
    (2, 8, 2, 16, 64, 32, [1, 50], (1, 4)),  # GQA 4, a row with no candidate at all
    (1, 8, 1, 16, 48, 16, [48], None),  # GQA 8
]


@pytest.mark.parametrize("clamp", [False, True], ids=["every-block", "clamped"])
@pytest.mark.parametrize("b,h,kvh,d,s,block_k,lengths,window", SCORE_CASES)
def test_score_kernel_matches_reference_and_brute_force(b, h, kvh, d, s, block_k, lengths, window, clamp):
    """clamp (TPU's default; here Pallas's TPU interpreter): the lengths scalar-prefetched and
    the key block index clamped to each row's last block, so blocks past it are not fetched."""
    q, k, *_ = cache_inputs(s + h, b, h, kvh, d, s)
    lengths = jnp.asarray(lengths, jnp.int32)
    mask = None if window is None else ts.selection_candidates(lengths, s, n_init=window[0], n_local=window[1])
    got = ts.score_keys_kernel(q, k, lengths, candidate_mask=mask, block_k=block_k, interpret=True, clamp=clamp)
    want = score_reference(q, k, lengths, candidate_mask=mask)
    assert got.shape == (b, s) and got.dtype == jnp.float32
    close(got, want)
    close(want, numpy_scores(q, k, np.asarray(lengths), mask))
    # every row with a visible key casts one vote per head; padding and non-candidates get 0
    visible = np.asarray(ts.key_visibility(lengths, s, mask))
    np.testing.assert_allclose(np.asarray(got).sum(1), np.where(visible.any(1), h, 0), rtol=1e-5)
    assert (np.asarray(got)[~visible] == 0).all()


def test_score_kernel_bfloat16():
    q, k, *_ = cache_inputs(3, 2, 8, 2, 32, 64, jnp.bfloat16)
    lengths = jnp.asarray([64, 23], jnp.int32)
    got = ts.score_keys_kernel(q, k, lengths, block_k=16, interpret=True)
    assert got.dtype == jnp.float32  # bf16 inputs, float32 math and output
    assert close(got, score_reference(q, k, lengths), 1e-4) < 1e-4
    assert close(got, numpy_scores(q, k, np.asarray(lengths)), 1e-4) < 1e-4
    votes = np.asarray(got).sum(1)
    np.testing.assert_allclose(votes, [8, 8], rtol=1e-3)  # every head votes once per row
    assert (np.asarray(got)[1, 23:] == 0).all()  # nothing past row 1's length


def test_the_last_block_of_a_row():
    lengths = jnp.asarray([0, 1, 16, 17, 32, 33], jnp.int32)
    np.testing.assert_array_equal(ts.last_block(lengths, 16), [0, 0, 0, 1, 1, 2])


@pytest.mark.parametrize("clamp", [False, True], ids=["every-block", "clamped"])
def test_score_kernel_never_reads_past_the_length(clamp):
    """NaN in every slot at or beyond a row's length changes nothing: partly visible blocks
    are masked, wholly invisible ones skip the matmul (clamped: are not even fetched)."""
    q, k, *_ = cache_inputs(5, 3, 4, 2, 16, 64)
    lengths = [0, 20, 64]
    poisoned = np.array(k)
    for row, length in enumerate(lengths):
        poisoned[row, :, length:] = np.nan
    lengths = jnp.asarray(lengths, jnp.int32)
    got = np.asarray(ts.score_keys_kernel(q, jnp.asarray(poisoned), lengths, block_k=16, interpret=True,
                                          clamp=clamp))
    assert np.isfinite(got).all(), "a NaN past the length reached the scores"
    assert close(got, score_reference(q, k, lengths)) < 1e-5
    assert (got[0] == 0).all() and (got[1, 20:] == 0).all()


# ----------------------------------------------------------------------------- selection

LENGTHS = [64, 0, 3, 15, 16, 17, 40]  # budget = 2 + 8 + 6 = 16: short, exactly, one over, long


@pytest.mark.parametrize("pool", [None, 3, 5])
def test_selection_matches_numpy_brute_force(pool):
    n_init, k, n_local = 2, 8, 6
    rng = np.random.default_rng(pool or 0)
    scores = rng.random((len(LENGTHS), 64)).astype(np.float32)
    indices, valid = select_indices(jnp.asarray(scores), jnp.asarray(LENGTHS, jnp.int32), k=k, n_init=n_init,
                                       n_local=n_local, pool=pool)
    indices, valid = np.asarray(indices), np.asarray(valid)
    assert indices.shape == valid.shape == (len(LENGTHS), n_init + k + n_local) and indices.dtype == np.int32
    for row, length in enumerate(LENGTHS):
        chosen = list(indices[row][valid[row]])
        assert chosen == numpy_selection(scores[row], length, k=k, n_init=n_init, n_local=n_local, pool=pool)
        assert (np.diff(indices[row]) >= 0).all() and (indices[row] < 64).all()


def test_init_and_local_windows_are_always_selected_and_never_twice():
    """Even when the windows hold the highest scores, top-k picks k distinct keys between them."""
    n_init, k, n_local = 3, 4, 5
    lengths = np.array([30, 12, 64])
    scores = np.zeros((3, 64), np.float32)
    for row, length in enumerate(lengths):
        scores[row, :n_init] = scores[row, length - n_local:length] = 100.0
        scores[row, length:] = 1000.0  # past the length: must never win
    indices, valid = select_indices(jnp.asarray(scores), jnp.asarray(lengths, jnp.int32), k=k, n_init=n_init,
                                       n_local=n_local)
    for row, length in enumerate(lengths):
        chosen = np.asarray(indices[row])[np.asarray(valid[row])]
        assert len(set(chosen)) == n_init + k + n_local
        assert set(range(n_init)) <= set(chosen) and set(range(length - n_local, length)) <= set(chosen)
        assert chosen.max() < length


def test_short_rows_select_every_valid_key_and_mask_the_rest():
    indices, valid = selection(1, (3, 32), [0, 5, 9], k=4, n_init=2, n_local=3)
    np.testing.assert_array_equal(np.asarray(valid).sum(1), [0, 5, 9])
    np.testing.assert_array_equal(np.asarray(indices)[2], np.arange(9))
    np.testing.assert_array_equal(np.asarray(indices)[1], [0, 1, 2, 3, 4, 4, 4, 4, 4])  # padding: last valid slot
    # a budget larger than the cache: every row is short
    indices, valid = selection(2, (2, 8), [8, 6], k=10, n_init=1, n_local=1)
    assert indices.shape == (2, 12)
    np.testing.assert_array_equal(np.asarray(valid).sum(1), [8, 6])


# ----------------------------------------------------------------------------- attention

SPARSE_CASES = [
    # heads, kv_heads, head_dim, positions, gather, own key, dtype
    (4, 4, 16, "compact", "kernel", True, jnp.float32),  # GQA 1
    (4, 2, 32, "original", "xla", False, jnp.float32),  # GQA 2
    (8, 2, 16, "compact", "xla", True, jnp.float32),  # GQA 4
    (8, 1, 16, "original", "kernel", True, jnp.float32),  # GQA 8
    (4, 2, 32, "compact", "kernel", True, jnp.bfloat16),
    (8, 2, 16, "compact", "dma", True, jnp.float32),  # TPU: indices in SMEM, DMA copies
    (4, 4, 32, "original", "dma", False, jnp.bfloat16),
]


@pytest.mark.parametrize("h,kvh,d,positions,gather,own_key,dtype", SPARSE_CASES)
def test_sparse_kernel_matches_reference(h, kvh, d, positions, gather, own_key, dtype):
    """Ragged rows: long (top-k with gaps), short (everything valid, rest masked), padding."""
    lengths = jnp.asarray([48, 7, 0], jnp.int32)
    q, k, v, k_new, v_new = cache_inputs(h * d, 3, h, kvh, d, 48, dtype)
    indices, valid = selection(h, (3, 48), lengths, k=9, n_init=2, n_local=4)  # 15 keys: one block of 8 padded
    own = dict(k_new=k_new, v_new=v_new) if own_key else {}
    got = ts.sparse_attention_kernel(q, k, v, indices, valid, lengths, positions=positions, gather=gather,
                                     block_k=8, interpret=True, **own)
    want = sparse_reference(q, k, v, indices, valid, lengths, positions=positions, **own)
    assert got.shape == (3, h, d) and got.dtype == dtype
    close(got, want, 1e-5 if dtype == jnp.float32 else 1e-2)
    if not own_key:  # a padding row sees nothing: zeros, not NaN
        assert (np.asarray(got)[2] == 0).all()


@jax.jit
def dense_decode_attention(q, k, v, k_new, v_new, lengths, cache_visible):
    """The model's decode attention (ops.attend + the model's RoPE), no selection: cache slots
    at their positions (slot == position), the query and its own key at position `lengths`;
    cache_visible [b, cache_len] says which slots it sees."""
    b, s = k.shape[0], k.shape[2]
    slots = jnp.broadcast_to(jnp.arange(s), (b, s))
    k_rot = model_rope(k.transpose(0, 2, 1, 3), slots).transpose(0, 2, 1, 3)
    q_rot = model_rope(q[:, None], lengths[:, None])
    own_rot = model_rope(k_new[:, None], lengths[:, None])
    return attend(q_rot, own_rot, v_new[:, None], jnp.ones((b, 1, 1), bool), k_rot, v, cache_visible[:, None])[:, 0]


def test_compact_positions_with_every_key_selected_equal_full_attention():
    """No gaps: compact rank == slot, so TokenSelect attention is exactly the model's attention."""
    b, h, kvh, d, s = 3, 4, 2, 16, 24
    q, k, v, k_new, v_new = cache_inputs(9, b, h, kvh, d, s)
    lengths = jnp.asarray([24, 10, 0], jnp.int32)
    indices = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    valid = indices < lengths[:, None]
    want = dense_decode_attention(q, k, v, k_new, v_new, lengths, valid)
    args = (q, k, v, indices, valid, lengths)
    own = dict(k_new=k_new, v_new=v_new)
    kernel = ts.sparse_attention_kernel(*args, positions="compact", block_k=8, interpret=True, **own)
    assert kernel.shape == (b, h, d) and np.isfinite(np.asarray(kernel)).all()
    assert close(kernel, want) < 1e-5
    assert close(sparse_reference(*args, positions="compact", **own), want) < 1e-5
    assert close(sparse_reference(*args, positions="original", **own), want) < 1e-5
    # row 2 has an empty cache: it attends to its own key only, so its output is v_new
    group = h // kvh
    np.testing.assert_allclose(np.asarray(kernel)[2], np.repeat(np.asarray(v_new)[2], group, axis=0), atol=1e-6)


def test_original_positions_equal_dense_attention_over_the_selected_slots():
    """With gaps, "original" is the model's attention with the unselected slots masked out,
    and "compact" (keys moved closer to the query) differs from it."""
    b, h, kvh, d, s = 2, 4, 2, 16, 40
    q, k, v, k_new, v_new = cache_inputs(4, b, h, kvh, d, s)
    lengths = jnp.asarray([40, 33], jnp.int32)
    indices, valid = selection(4, (b, s), lengths, k=5, n_init=2, n_local=3)
    args = (q, k, v, indices, valid, lengths)
    own = dict(k_new=k_new, v_new=v_new)
    selected = np.zeros((b, s), bool)
    for row in range(b):
        selected[row, np.asarray(indices[row])[np.asarray(valid[row])]] = True
    want = dense_decode_attention(q, k, v, k_new, v_new, lengths, jnp.asarray(selected))
    original = sparse_reference(*args, positions="original", **own)
    close(original, want)
    compact = sparse_reference(*args, positions="compact", **own)
    assert np.abs(np.asarray(compact) - np.asarray(want)).max() > 1e-3


@pytest.mark.parametrize("gather", ["kernel", "dma"])
def test_sparse_kernel_reads_only_the_selected_slots(gather):
    """NaN in every unselected slot of K and V changes nothing (in-kernel gather, TPU DMAs)."""
    q, k, v, k_new, v_new = cache_inputs(6, 2, 4, 2, 16, 32)
    lengths = jnp.asarray([32, 20], jnp.int32)
    indices, valid = selection(6, (2, 32), lengths, k=4, n_init=1, n_local=2)
    k_bad, v_bad = np.array(k), np.array(v)
    for row in range(2):
        unread = np.setdiff1d(np.arange(32), np.asarray(indices[row]))
        k_bad[row][:, unread] = np.nan
        v_bad[row][:, unread] = np.nan
    assert np.isnan(k_bad).any() and np.isnan(v_bad).any()
    got = ts.sparse_attention_kernel(q, jnp.asarray(k_bad), jnp.asarray(v_bad), indices, valid, lengths, k_new=k_new,
                                     v_new=v_new, block_k=8, gather=gather, interpret=True)
    assert np.isfinite(np.asarray(got)).all(), "an unselected (NaN) slot was read"
    assert close(got, sparse_reference(q, k, v, indices, valid, lengths, k_new=k_new, v_new=v_new)) < 1e-5


# ----------------------------------------------------------------------------- public ops


def test_public_ops_run_the_reference_on_cpu_and_the_kernel_when_interpreting():
    q, k, v, k_new, v_new = cache_inputs(2, 2, 4, 2, 16, 32)
    lengths = jnp.asarray([32, 9], jnp.int32)
    indices, valid = selection(2, (2, 32), lengths, k=4, n_init=1, n_local=2)
    # bit for bit (both eager: jit may fuse differently)
    np.testing.assert_array_equal(np.asarray(ts.score_keys(q, k, lengths)),
                                  np.asarray(ts.score_keys_reference(q, k, lengths)))
    sparse_args = (q, k, v, indices, valid, lengths)
    np.testing.assert_array_equal(np.asarray(ts.sparse_attention(*sparse_args, k_new=k_new, v_new=v_new)),
                                  np.asarray(ts.sparse_attention_reference(*sparse_args, k_new=k_new, v_new=v_new)))

    def jaxpr(fn, *args, **kw):
        return str(jax.make_jaxpr(functools.partial(fn, **kw))(*args))

    assert "pallas_call" not in jaxpr(ts.score_keys, q, k, lengths)
    assert "pallas_call" in jaxpr(ts.score_keys, q, k, lengths, block_k=16, interpret=True)
    assert "pallas_call" not in jaxpr(ts.sparse_attention, *sparse_args)
    assert "pallas_call" in jaxpr(ts.sparse_attention, *sparse_args, block_k=8, interpret=True)
    assert "pallas_call" not in jaxpr(ts.sparse_attention, *sparse_args, interpret=True, use_kernel=False)


def test_an_empty_selection_attends_to_the_query_alone_in_kernel_and_reference():
    """select_indices allows k = n_init = n_local = 0: a [b, 0] selection. Both sides then see the
    query's own key only (its value), or no key at all (zeros)."""
    q, k, v, k_new, v_new = cache_inputs(4, 2, 4, 2, 16, 32)
    lengths = jnp.asarray([32, 5], jnp.int32)
    indices, valid = ts.select_indices(jnp.zeros((2, 32)), lengths, k=0, n_init=0, n_local=0)
    assert indices.shape == (2, 0)
    own = np.repeat(np.asarray(v_new), 2, axis=1)  # each kv head's value for its two query heads
    for kw in ({}, {"block_k": 8, "interpret": True}):
        got = ts.sparse_attention(q, k, v, indices, valid, lengths, k_new=k_new, v_new=v_new, **kw)
        assert close(got, own) < 1e-6
        got = ts.sparse_attention(q, k, v, indices, valid, lengths, **kw)
        np.testing.assert_array_equal(np.asarray(got), 0.0)


def one_line_error(fn, match) -> str:
    """Assert fn() raises a one-line ValueError matching `match`; -> its message."""
    with pytest.raises(ValueError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_shapes_and_blocks_fail_up_front_with_one_line_errors():
    q, k, v, *_ = cache_inputs(0, 1, 4, 2, 16, 32)
    lengths = jnp.asarray([32], jnp.int32)
    indices, valid = selection(0, (1, 32), lengths, k=4, n_init=1, n_local=2)
    odd = jnp.zeros((1, 4, 15))
    messages = [
        one_line_error(lambda: ts.score_keys(q[:, :3], k, lengths), "multiple of n_kv_heads"),
        one_line_error(lambda: ts.score_keys(q, k, lengths, block_k=12, interpret=True), "multiple of 8"),
        one_line_error(lambda: ts.sparse_attention(odd, jnp.zeros((1, 2, 32, 15)), jnp.zeros((1, 2, 32, 15)),
                                                   indices, valid, lengths), "even"),
        one_line_error(lambda: ts.sparse_attention(q, k, v, indices, valid, lengths, positions="relative"),
                       "compact"),
        one_line_error(lambda: ts.select_indices(jnp.zeros((1, 32)), lengths, k=2, n_init=1, n_local=1, pool=4),
                       "odd"),
    ]
    with mock.patch("jax.default_backend", return_value="gpu"):  # Triton: powers of two, tl.dot >= 16
        messages.append(one_line_error(lambda: ts.score_keys(q, k, lengths, block_k=24), "power of two"))
        messages.append(one_line_error(lambda: ts.sparse_attention(q, k, v, indices, valid, lengths, block_k=16),
                                       "head_dim"))
    with mock.patch("jax.default_backend", return_value="tpu"):
        messages.append(one_line_error(lambda: ts.score_keys(q, k, lengths, block_k=64), "multiple of 128"))
    # a block given on CPU asks for the kernel: the reference runs, but a block no backend takes raises
    messages.append(one_line_error(lambda: ts.score_keys(q, k, lengths, block_k=7), "multiple of 8, got 7"))
    messages.append(one_line_error(lambda: ts.sparse_attention(q, k, v, indices, valid, lengths, block_k=20),
                                   "multiple of 8, got 20"))
    assert len(set(messages)) == len(messages) == 10  # ten distinct one-line messages
    assert "12" in messages[1] and "15" in messages[2] and "relative" in messages[3] and "4" in messages[4]
    # and the valid calls next to them run
    assert ts.score_keys(q, k, lengths).shape == (1, 32)


@pytest.mark.parametrize("platform,backend,marker", [("tpu", "tpu", "tpu_custom_call"), ("cuda", "gpu", "triton")])
def test_kernels_lower_for_accelerators(platform, backend, marker):
    """Lowering only (no device here): TPU through Mosaic (indices in SMEM and DMA
    copies by default; the XLA gather too), CUDA through Triton (in-kernel gather; the XLA
    gather too; the DMA path is TPU's alone). Compiling and running need the hardware."""
    b, h, kvh, d, s, n = 2, 8, 2, 64, 256, 128
    q, k = jnp.zeros((b, h, d), jnp.bfloat16), jnp.zeros((b, kvh, s, d), jnp.bfloat16)
    own = jnp.zeros((b, kvh, d), jnp.bfloat16)
    lengths = jnp.asarray([100, 256], jnp.int32)
    indices, valid = jnp.zeros((b, n), jnp.int32), jnp.ones((b, n), bool)
    calls = [
        (lambda q, k, l: ts.score_keys_kernel(q, k, l, block_k=128), (q, k, lengths)),
        (lambda q, k, l: ts.score_keys_kernel(q, k, l, candidate_mask=jnp.ones((b, s), bool), block_k=128),
         (q, k, lengths)),
        (lambda q, k, i, m, l, o: ts.sparse_attention_kernel(q, k, k, i, m, l, k_new=o, v_new=o, block_k=128),
         (q, k, indices, valid, lengths, own)),
        (lambda q, k, i, m, l: ts.sparse_attention_kernel(q, k, k, i, m, l, block_k=128, gather="xla"),
         (q, k, indices, valid, lengths)),
    ]
    jax.clear_caches()
    try:
        with mock.patch("jax.default_backend", return_value=backend):
            for fn, args in calls:
                text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
                assert marker in text.lower()
            if backend == "tpu":
                assert ts.default_gather() == "dma"
            else:
                one_line_error(lambda: ts.sparse_attention_kernel(q, k, k, indices, valid, lengths, gather="dma"),
                               "runs on TPU")
    finally:
        jax.clear_caches()
