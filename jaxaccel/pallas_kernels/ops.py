"""Attention math shared by the model and the kernels: the pure-jnp reference every kernel
is checked against. A leaf module: it imports nothing from jaxaccel, so kernels never depend
on model code (DESIGN decision 12) and model code reaches kernels only through their ops.

Dtype policy: scores, the softmax and its normaliser are float32; the value product runs in
the values' dtype with float32 accumulation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Masked attention scores: a large finite number, not -inf, so no softmax ever computes
# inf - inf = NaN. A query row with no visible key at all (a padded tree node) attends to
# nothing: its output is 0, in `attend` as in every kernel.
MASKED_SCORE = -1e30


def rope_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """Unscaled RoPE inverse frequencies [head_dim // 2], float64 (the model applies its
    linear / Llama-3 scaling on top, `model.layers.rope_inv_freq`)."""
    return 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))


def rotate_half(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE in the rotate-half layout (Hugging Face Llama's): x [..., head_dim] by angles
    whose cos / sin broadcast against x[..., :head_dim // 2]; float32 math, x.dtype out. The
    one rotation the model and the kernels' references share."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def segment_visible(seg_q: jax.Array, seg_k: jax.Array, bid_q: jax.Array | None, bid_k: jax.Array | None,
                    q_start=0, k_start=0) -> jax.Array:
    """The packed-segment visibility rule on a block of queries x keys: [b, Tq] x [b, Tk] ->
    [b, Tq, Tk] bool. Key j is visible to query i when both are in the same non-padding
    segment (id != 0) and j <= i or both are bidirectional; every token sees itself.
    q_start / k_start: the block's first positions (a tile of flash attention; 0 for the
    whole sequence). The same rule as `jaxaccel.data.attention_mask` (the data package's
    host-side copy; `tests/test_flash_attention.py` checks they agree)."""
    q_pos = q_start + jnp.arange(seg_q.shape[1])[:, None]
    k_pos = k_start + jnp.arange(seg_k.shape[1])[None, :]
    in_order = (k_pos <= q_pos)[None]
    if bid_q is not None:
        in_order = in_order | (bid_q[:, :, None].astype(bool) & bid_k[:, None, :].astype(bool))
    same_segment = (seg_q[:, :, None] == seg_k[:, None, :]) & (seg_q[:, :, None] != 0)
    return (same_segment & in_order) | (k_pos == q_pos)[None]


def attend(q: jax.Array, k_new: jax.Array, v_new: jax.Array, new_visible: jax.Array,
           k_cache: jax.Array | None = None, v_cache: jax.Array | None = None,
           cache_visible: jax.Array | None = None) -> jax.Array:
    """Grouped-query attention of T new queries over two key blocks, one softmax (reference).

    The keys are the committed cache prefix (optional) followed by the T new tokens
    themselves; this is the shape of every call — training (no cache), prefill chunks,
    single-token steps and token trees (`new_visible` = the ancestor mask). Keeping the
    blocks apart means attention never reads the cache *after* this step's write, so XLA
    updates the cache in place instead of copying it every step.

    q: [batch, T, heads, head_dim], already scaled by 1/sqrt(head_dim).
    k_new, v_new: [batch, T, kv_heads, head_dim]; new_visible: [batch, T, T] bool.
    k_cache, v_cache: [batch, kv_heads, S, head_dim]; cache_visible: [batch, T, S] bool.
    Returns [batch, T, heads, head_dim] in v_new's dtype; 0 for a query row that sees no key.
    """
    b, t, h, d = q.shape
    kvh = k_new.shape[2]
    g = h // kvh
    # Query heads of one KV group become extra rows of the same GEMM: [b, kvh, g*t, d].
    qg = q.reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * t, d)
    kn, vn = k_new.transpose(0, 2, 1, 3), v_new.transpose(0, 2, 1, 3)
    s_new = jnp.einsum("bkqd,bktd->bkqt", qg, kn, preferred_element_type=jnp.float32).reshape(b, kvh, g, t, t)
    s_new = jnp.where(new_visible[:, None, None], s_new, MASKED_SCORE)
    m = jnp.max(s_new, axis=-1, keepdims=True)
    if k_cache is not None:
        s_cache = jnp.einsum("bkqd,bksd->bkqs", qg, k_cache.astype(q.dtype),
                             preferred_element_type=jnp.float32).reshape(b, kvh, g, t, -1)
        s_cache = jnp.where(cache_visible[:, None, None], s_cache, MASKED_SCORE)
        m = jnp.maximum(m, jnp.max(s_cache, axis=-1, keepdims=True))
    p_new = jnp.exp(s_new - m)
    denom = jnp.sum(p_new, axis=-1, keepdims=True)
    out = jnp.einsum("bkqt,bktd->bkqd", p_new.astype(vn.dtype).reshape(b, kvh, g * t, t), vn,
                     preferred_element_type=jnp.float32)
    if k_cache is not None:
        p_cache = jnp.exp(s_cache - m)
        denom = denom + jnp.sum(p_cache, axis=-1, keepdims=True)
        out = out + jnp.einsum("bkqs,bksd->bkqd", p_cache.astype(vn.dtype).reshape(b, kvh, g * t, -1),
                               v_cache.astype(vn.dtype), preferred_element_type=jnp.float32)
    # A row that sees no key has m == MASKED_SCORE and every weight exp(0) = 1: 0, not their mean
    out = jnp.where(m > MASKED_SCORE, out.reshape(b, kvh, g, t, d) / denom, 0.0)
    return out.astype(v_new.dtype).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
