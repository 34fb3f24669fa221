"""Tree attention: the Pallas kernel (interpret mode on CPU) against the jnp reference."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaccel.pallas_kernels.tree_attention import tree_attention, tree_attention_kernel, tree_attention_reference


def random_tree_mask(rng, t, n_valid):
    """Ancestor mask (incl. self) of a random tree whose parents precede their children;
    nodes >= n_valid are padding and see only themselves."""
    mask = np.zeros((t, t), bool)
    for i in range(t):
        if i < n_valid:
            parent = rng.integers(-1, i)  # -1: a root hanging off the cache prefix
            if parent >= 0:
                mask[i] = mask[parent]
        mask[i, i] = True
    return mask


def make_inputs(seed, b, h, kvh, d, s, t, prefix, *, shared_mask=False, dtype=jnp.float32):
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), dtype)

    q = normal(b, t, h, d)  # unit scale: scores ~ N(0, d), peaky enough to exercise rescaling
    k_new, v_new = normal(b, t, kvh, d), normal(b, t, kvh, d)
    k_cache, v_cache = normal(b, kvh, s, d), normal(b, kvh, s, d)
    n_masks = 1 if shared_mask else b
    mask = np.stack([random_tree_mask(rng, t, int(rng.integers(1, t + 1)) if t > 1 else 1) for _ in range(n_masks)])
    return q, k_new, v_new, jnp.asarray(mask), k_cache, v_cache, jnp.asarray(prefix, jnp.int32)


CASES = [
    # b, heads, kv_heads, head_dim, S, block_k, T, prefix_len per row
    (1, 2, 2, 16, 64, 32, 1, [64]),
    (3, 4, 2, 32, 128, 64, 7, [0, 128, 45]),
    (3, 4, 1, 16, 256, 64, 17, [256, 1, 130]),
    (1, 8, 2, 32, 100, 32, 9, [77]),  # S not a multiple of block_k: padded in the wrapper
]


@pytest.mark.parametrize("b,h,kvh,d,s,block_k,t,prefix", CASES)
def test_kernel_matches_reference(b, h, kvh, d, s, block_k, t, prefix):
    args = make_inputs(len(prefix) * 100 + t, b, h, kvh, d, s, t, prefix)
    got = tree_attention_kernel(*args, block_k=block_k, interpret=True)
    want = tree_attention_reference(*args)
    assert got.shape == (b, t, h, d) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_kernel_shared_mask():
    """tree_mask with a leading dim of 1 is shared by every batch row."""
    args = make_inputs(7, 3, 2, 2, 16, 96, 17, [0, 96, 64], shared_mask=True)
    assert args[3].shape == (1, 17, 17)
    got = tree_attention_kernel(*args, block_k=32, interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(tree_attention_reference(*args)), rtol=1e-5, atol=1e-5)


def test_kernel_bfloat16():
    args = make_inputs(11, 3, 4, 2, 32, 128, 9, [0, 70, 128], dtype=jnp.bfloat16)
    got = tree_attention_kernel(*args, block_k=32, interpret=True)
    want = tree_attention_reference(*args)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=3e-2, atol=3e-2)


def test_row_with_no_visible_key_is_finite():
    """An empty mask row with prefix 0 sees nothing: the reference averages all S + T values,
    the kernel averages the keys it visited; only finiteness is required of that row, and the
    other rows must still match."""
    q, k_new, v_new, mask, k_cache, v_cache, _ = make_inputs(5, 2, 2, 1, 16, 64, 4, [0, 0])
    mask = np.array(mask)
    mask[0, 3] = False
    prefix = jnp.asarray([0, 40], jnp.int32)
    args = (q, k_new, v_new, jnp.asarray(mask), k_cache, v_cache, prefix)
    got = np.asarray(tree_attention_kernel(*args, block_k=32, interpret=True))
    want = np.asarray(tree_attention_reference(*args))
    assert np.isfinite(got).all() and np.isfinite(want).all()
    np.testing.assert_allclose(got[0, :3], want[0, :3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)


def test_public_op_dispatch():
    args = make_inputs(3, 3, 4, 2, 16, 64, 5, [0, 64, 20])
    # On CPU the default is the reference, bit for bit.
    np.testing.assert_array_equal(np.asarray(tree_attention(*args, block_k=32)),
                                  np.asarray(tree_attention_reference(*args)))

    def traced(**kw):
        return str(jax.make_jaxpr(functools.partial(tree_attention, block_k=32, **kw))(*args))

    assert "pallas_call" not in traced()
    assert "pallas_call" not in traced(interpret=True, use_kernel=False)
    assert "pallas_call" in traced(interpret=True)  # interpret=True really runs the kernel
    got = tree_attention(*args, block_k=32, interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(tree_attention_reference(*args)), rtol=1e-5, atol=1e-5)


def test_blocks_beyond_prefix_are_skipped():
    """Cache blocks that start at or after prefix_len are never read: NaN there changes nothing."""
    args = make_inputs(13, 3, 4, 2, 16, 128, 6, [0, 64, 33])
    k_cache, v_cache = np.array(args[4]), np.array(args[5])
    for row, first_unread in enumerate([0, 64, 64]):  # block_k = 32
        k_cache[row, :, first_unread:] = np.nan
        v_cache[row, :, first_unread:] = np.nan
    poisoned = args[:4] + (jnp.asarray(k_cache), jnp.asarray(v_cache), args[6])
    got = np.asarray(tree_attention_kernel(*poisoned, block_k=32, interpret=True))
    np.testing.assert_allclose(got, np.asarray(tree_attention_reference(*args)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("platform,backend,marker", [("tpu", "tpu", "tpu_custom_call"), ("cuda", "gpu", "triton")])
def test_kernel_lowers_for_accelerators(platform, backend, marker):
    """Lowering (no device needed) for TPU through Mosaic and for CUDA through Triton, so an
    API drift breaks here and not first on a pod. Compiling and timing need the hardware."""
    from unittest import mock

    from jaxaccel.pallas_kernels.tree_attention import tree_attention_kernel

    b, t, h, kvh, d, s = 2, 8, 4, 2, 64, 256
    args = (jnp.zeros((b, t, h, d)), jnp.zeros((b, t, kvh, d)), jnp.zeros((b, t, kvh, d)), jnp.ones((b, t, t), bool),
            jnp.zeros((b, kvh, s, d)), jnp.zeros((b, kvh, s, d)), jnp.array([10, 200], jnp.int32))
    jax.clear_caches()
    try:
        with mock.patch("jax.default_backend", return_value=backend):
            text = jax.jit(lambda *a: tree_attention_kernel(*a, block_k=128)).trace(*args).lower(
                lowering_platforms=(platform,)).as_text()
    finally:
        jax.clear_caches()
    assert marker in text.lower()
