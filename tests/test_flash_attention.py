"""Flash attention for training: equal to dense attention under the packed-segment mask rule,
in value and gradient, with memory linear in the sequence length; the TPU splash path agrees
with it in Pallas interpret mode and lowers for TPU from this CPU host."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaccel.pallas_kernels.flash_attention import flash_attention

# One compiled program per test instead of op-by-op dispatch around the loops.
jit_flash_attention = jax.jit(flash_attention, static_argnames=("block_q", "block_k", "implementation"))

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


def visible_mask(segment_ids: np.ndarray, bidirectional: np.ndarray | None) -> np.ndarray:
    """[B, T, T] bool straight from the rule: same non-padding segment and (causal or both
    bidirectional), or the diagonal."""
    t = segment_ids.shape[1]
    if bidirectional is None:
        bidirectional = np.zeros(segment_ids.shape, bool)
    query, key = np.arange(t)[:, None], np.arange(t)[None, :]
    same_segment = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] != 0)
    both_bidirectional = bidirectional[:, :, None] & bidirectional[:, None, :]
    return (same_segment & ((key <= query)[None] | both_bidirectional)) | (key == query)[None]


def dense_attention_float64(q, k, v, mask) -> np.ndarray:
    """Dense softmax attention in numpy float64, GQA by repeating KV heads."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.where(mask[:, None], np.einsum("bqhd,bkhd->bhqk", q, k), -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


def dense_attention(q, k, v, mask):
    """The same in jax float32 (differentiable), full-precision matmuls."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest")
    probs = jax.nn.softmax(jnp.where(mask[:, None], scores, -1e30), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision="highest")


def packed_batch(seed: int, t: int, with_prefixes: bool):
    """Random q/k/v plus rows of packed documents, trailing padding (segment 0) and, if asked,
    a bidirectional prefix at the start of each document."""
    rng = np.random.default_rng(seed)
    b = 3
    segment_ids = np.zeros((b, t), np.int32)
    bidirectional = np.zeros((b, t), bool)
    for row in range(b):
        start, segment = 0, 1
        end_of_data = t - int(rng.integers(0, t // 3))  # the rest is padding
        while start < end_of_data:
            length = int(rng.integers(1, t // 2))
            segment_ids[row, start:min(start + length, end_of_data)] = segment
            if with_prefixes:
                bidirectional[row, start:min(start + int(rng.integers(0, length + 1)), end_of_data)] = True
            start, segment = start + length, segment + 1
    q = rng.normal(size=(b, t, HEADS, HEAD_DIM)).astype(np.float32)  # unit scale: peaky softmax
    k = rng.normal(size=(b, t, KV_HEADS, HEAD_DIM)).astype(np.float32)
    v = rng.normal(size=(b, t, KV_HEADS, HEAD_DIM)).astype(np.float32)
    return q, k, v, segment_ids, (bidirectional if with_prefixes else None)


# T = 37 is a multiple of neither block; 64 > T is one padded tile.
CASES = [(37, 8, 16), (37, 16, 8), (37, 64, 64), (48, 16, 16)]


@pytest.mark.parametrize("with_prefixes", [False, True], ids=["causal", "prefix"])
@pytest.mark.parametrize("t, block_q, block_k", CASES)
def test_flash_forward_equals_dense_reference(t, block_q, block_k, with_prefixes):
    q, k, v, segment_ids, bidirectional = packed_batch(t + block_q, t, with_prefixes)
    expected = dense_attention_float64(q, k, v, visible_mask(segment_ids, bidirectional))
    out = jit_flash_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(segment_ids),
                              None if bidirectional is None else jnp.asarray(bidirectional),
                              block_q=block_q, block_k=block_k)
    assert out.shape == q.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t, block_q, block_k, with_prefixes", [(37, 8, 16, False), (37, 16, 8, True)],
                         ids=["causal", "prefix"])
def test_flash_gradients_equal_dense_reference(t, block_q, block_k, with_prefixes):
    q, k, v, segment_ids, bidirectional = packed_batch(7 * t + block_q, t, with_prefixes)
    mask = jnp.asarray(visible_mask(segment_ids, bidirectional))
    segment_ids = jnp.asarray(segment_ids)
    bidirectional = None if bidirectional is None else jnp.asarray(bidirectional)
    weights = jnp.asarray(np.random.default_rng(t).normal(size=q.shape), jnp.float32)

    def flash_loss(q, k, v):
        return jnp.sum(weights * flash_attention(q, k, v, segment_ids, bidirectional,
                                                 block_q=block_q, block_k=block_k))

    def dense_loss(q, k, v):
        return jnp.sum(weights * dense_attention(q, k, v, mask))

    args = tuple(jnp.asarray(x) for x in (q, k, v))
    got = jax.jit(jax.grad(flash_loss, argnums=(0, 1, 2)))(*args)
    want = jax.jit(jax.grad(dense_loss, argnums=(0, 1, 2)))(*args)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert g.shape == w.shape and g.dtype == jnp.float32, name
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=3e-5, rtol=1e-5, err_msg=name)


def test_flash_equals_training_reference_attend():
    """Drop-in for what training runs today: `attend` over `objectives.attention_mask`."""
    from jaxaccel.data.objectives import attention_mask
    from jaxaccel.model.layers import attend

    q, k, v, segment_ids, bidirectional = packed_batch(3, 40, with_prefixes=True)
    q = q / np.sqrt(HEAD_DIM)
    mask = attention_mask({"segment_ids": segment_ids, "bidirectional": bidirectional})
    with jax.default_matmul_precision("highest"):
        expected = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
    out = jit_flash_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(segment_ids),
                              jnp.asarray(bidirectional), block_q=16, block_k=16)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5, rtol=1e-5)


def test_padding_rows_see_only_themselves():
    q, k, v, _, _ = packed_batch(5, 20, with_prefixes=False)
    segment_ids = np.ones((3, 20), np.int32)
    segment_ids[:, 12:] = 0
    out = np.asarray(jit_flash_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                         jnp.asarray(segment_ids), block_q=8, block_k=8))
    own_value = np.repeat(v, HEADS // KV_HEADS, axis=2)  # query head h reads KV head h // group
    np.testing.assert_allclose(out[:, 12:], own_value[:, 12:], atol=1e-6)


def test_bfloat16_inputs_accumulate_in_float32():
    q, k, v, segment_ids, bidirectional = packed_batch(11, 37, with_prefixes=True)
    expected = dense_attention_float64(q, k, v, visible_mask(segment_ids, bidirectional))
    bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    segment_ids, bidirectional = jnp.asarray(segment_ids), jnp.asarray(bidirectional)

    def loss(q, k, v):
        out = flash_attention(q, k, v, segment_ids, bidirectional, block_q=16, block_k=16)
        return jnp.sum(out.astype(jnp.float32)), out

    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(*bf16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=0.1)  # bf16 inputs' rounding
    assert all(g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g))) for g in grads)


def _grad_temp_bytes(attention, t: int) -> int:
    """Temporary bytes XLA plans for jit(grad) of a linear functional of attention's output."""
    def loss(q, k, v, segment_ids, weights):
        return jnp.sum(weights * attention(q, k, v, segment_ids))

    heads, kv_heads, head_dim = 4, 2, 16
    shape = jax.ShapeDtypeStruct
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
        shape((1, t, heads, head_dim), jnp.float32), shape((1, t, kv_heads, head_dim), jnp.float32),
        shape((1, t, kv_heads, head_dim), jnp.float32), shape((1, t), jnp.int32),
        shape((1, t, heads, head_dim), jnp.float32)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def _dense_from_segments(q, k, v, segment_ids):
    t = segment_ids.shape[1]
    query, key = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    same_segment = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] != 0)
    return dense_attention(q, k, v, (same_segment & (key <= query)[None]) | (key == query)[None])


def test_flash_gradient_memory_grows_linearly_dense_quadratically():
    # Measured on jax 0.10.2 / CPU: flash 2.28 MB -> 5.33 MB (x2.3), dense 51 MB -> 810 MB (x15.8).
    flash_ratio = _grad_temp_bytes(flash_attention, 4096) / _grad_temp_bytes(flash_attention, 1024)
    dense_ratio = _grad_temp_bytes(_dense_from_segments, 4096) / _grad_temp_bytes(_dense_from_segments, 1024)
    assert flash_ratio < 6, flash_ratio
    assert dense_ratio > 10, dense_ratio


# ----------------------------------------------------------------------------- TPU splash path


def test_splash_path_matches_jnp_in_interpret_mode():
    """Splash (Pallas interpreter on CPU) with padding given and added (T = 200 -> 256)."""
    rng = np.random.default_rng(0)
    t, head_dim = 200, 128
    q = jnp.asarray(rng.normal(size=(1, t, 2, head_dim)) / np.sqrt(head_dim), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(1, t, 1, head_dim)), jnp.float32) for _ in range(2))
    segment_ids = np.zeros((1, t), np.int32)
    segment_ids[0, :50], segment_ids[0, 50:170] = 1, 2
    segment_ids = jnp.asarray(segment_ids)
    weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def loss(attention):
        return lambda q, k, v: jnp.sum(weights * attention(q, k, v))

    splash = loss(lambda q, k, v: flash_attention(q, k, v, segment_ids, interpret=True))  # auto picks splash
    reference = loss(lambda q, k, v: flash_attention(q, k, v, segment_ids, implementation="jnp"))
    assert "pallas_call" in str(jax.make_jaxpr(splash)(q, k, v))
    (value, grads), (want_value, want_grads) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)
                                                for f in (splash, reference))
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=1e-5, err_msg=name)


def test_splash_path_lowers_for_tpu():
    t = 200

    def loss(q, k, v, segment_ids):
        out = flash_attention(q, k, v, segment_ids, implementation="splash")
        return jnp.sum(out.astype(jnp.float32))

    shape = jax.ShapeDtypeStruct
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(
        shape((2, t, 4, 128), jnp.bfloat16), shape((2, t, 2, 128), jnp.bfloat16),
        shape((2, t, 2, 128), jnp.bfloat16), shape((2, t), jnp.int32)).lower(lowering_platforms=("tpu",))
    assert lowered.as_text().count("tpu_custom_call") == 3  # forward, dq and dkv kernels


def test_splash_refuses_what_it_cannot_do_and_auto_falls_back():
    q, k, v, segment_ids, bidirectional = packed_batch(1, 16, with_prefixes=True)
    args = [jnp.asarray(x) for x in (q, k, v, segment_ids, bidirectional)]
    with pytest.raises(ValueError, match="bidirectional"):
        flash_attention(*args, implementation="splash")
    with pytest.raises(ValueError, match="multiples of 128"):
        flash_attention(*args[:4], block_q=64, implementation="splash")
    # Here (CPU, and bidirectional given) auto is the jnp path: the same jaxpr.
    auto = jax.make_jaxpr(lambda *a: flash_attention(*a, block_q=8, block_k=8))(*args)
    jnp_path = jax.make_jaxpr(lambda *a: flash_attention(*a, block_q=8, block_k=8, implementation="jnp"))(*args)
    assert str(auto) == str(jnp_path)


def test_bad_shapes_are_reported():
    q, k, v, segment_ids, _ = packed_batch(1, 16, with_prefixes=False)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        flash_attention(jnp.asarray(q[:, :, :3]), jnp.asarray(k), jnp.asarray(v), jnp.asarray(segment_ids))
    with pytest.raises(ValueError, match="segment_ids"):
        flash_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(segment_ids[:, :8]))
