"""Llama-family building blocks in flax.linen: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Dtype policy (the whole model follows it): parameters are stored in `config.param_dtype`;
matmuls run in `config.dtype`; RMSNorm statistics, RoPE angles and the attention softmax are
always float32. Logical axis names (the constants below) are attached to every parameter;
`jaxaccel.sharding` maps them to mesh axes with one rule table.

Shapes: activations are [batch, seq, ...]; the KV cache of one layer is
[batch, kv_heads, max_len, head_dim] so that both attention matmuls are plain batched GEMMs
with (batch, kv_heads) as batch dimensions and nothing is transposed per step.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.config import ModelConfig, RopeScaling

# Logical axis names: one vocabulary for parameters and activations.
BATCH = "batch"
LENGTH = "length"
EMBED = "embed"
VOCAB = "vocab"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP_HIDDEN = "mlp"
LAYERS = "layers"
CACHE_LEN = "cache_len"

# Masked attention scores: a large finite number, so a query with no visible key (a padded
# tree node) yields a uniform, finite distribution rather than NaN.
MASKED_SCORE = -1e30


def jnp_dtype(name: str):
    return jnp.dtype(name)


def _init(std: float, axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, statistics in float32."""

    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (EMBED,)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies [head_dim // 2], float32, with optional linear / Llama-3 scaling."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        pass
    elif scaling.kind == "linear":
        inv = inv / scaling.factor
    elif scaling.kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        wavelen = 2 * math.pi / inv
        low_wavelen = scaling.original_max_position / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position / scaling.high_freq_factor
        smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        blended = (1 - smooth) * inv / scaling.factor + smooth * inv
        inv = np.where(wavelen < high_wavelen, inv, np.where(wavelen > low_wavelen, inv / scaling.factor, blended))
    return inv.astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin [batch, seq, 1, head_dim // 2] float32 for `positions` [batch, seq]; computed
    once per forward and shared by every layer."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate [batch, seq, heads, head_dim] (rotate-half layout, as Hugging Face Llama
    checkpoints store q/k)."""
    cos, sin = rope
    half = x.shape[-1] // 2
    x1 = x[..., :half].astype(jnp.float32)
    x2 = x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# ----------------------------------------------------------------------------- attention


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
    Returns [batch, T, heads, head_dim] in v_new's dtype.
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
    out = out.reshape(b, kvh, g, t, d) / denom
    return out.astype(v_new.dtype).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def write_kv(cache: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """Scatter new keys/values [batch, seq, kv_heads, head_dim] into a layer cache
    [batch, kv_heads, max_len, head_dim] at `slots` [batch, seq]; slot -1 writes nothing."""
    max_len = cache.shape[2]
    rows = jnp.arange(cache.shape[0])[:, None]
    slots = jnp.where(slots < 0, max_len, slots)  # out of range: dropped
    return cache.at[rows, :, slots].set(new.astype(cache.dtype), mode="drop")


class Attention(nn.Module):
    config: ModelConfig
    fused: bool = False  # decode layout: one "qkv" kernel instead of "q", "k", "v"
    # Cached calls whose cache visibility is a plain prefix (no sliding window) may run the
    # tree-attention op: None = `attend`; "auto" = the Pallas kernel on TPU/GPU, `attend` on
    # CPU; "interpret" = the kernel in Pallas interpret mode (tests).
    tree_attention: str | None = None

    @nn.compact
    def __call__(self, x, rope, visibility, cache_kv=None, write_slots=None):
        """x [b, t, d] -> ([b, t, d], updated (k, v) cache, or None when uncached).

        visibility = (new_visible [b, t, t], cache_visible [b, t, S] or None, prefix_len [b] or None:
        set when cache_visible is exactly the slots below prefix_len)."""
        cfg = self.config
        hd = cfg.resolved_head_dim
        dtype, pdtype = jnp_dtype(cfg.dtype), jnp_dtype(cfg.param_dtype)

        def proj(name, heads, head_axis):
            return nn.DenseGeneral(
                (heads, hd), use_bias=cfg.qkv_bias, dtype=dtype, param_dtype=pdtype, name=name,
                kernel_init=_init(cfg.init_std, (EMBED, head_axis, HEAD_DIM)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (head_axis, HEAD_DIM)),
            )(x)

        if self.fused:
            # One GEMM for q, k and v, grouped per KV head: [d, kv_heads, q_per_kv + 2, head_dim].
            g = cfg.q_per_kv
            qkv = nn.DenseGeneral(
                (cfg.n_kv_heads, g + 2, hd), use_bias=cfg.qkv_bias, dtype=dtype, param_dtype=pdtype, name="qkv",
                kernel_init=_init(cfg.init_std, (EMBED, KV_HEADS, None, HEAD_DIM)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (KV_HEADS, None, HEAD_DIM)),
            )(x)
            b, t = x.shape[:2]
            q = qkv[:, :, :, :g].reshape(b, t, cfg.n_heads, hd)
            k, v = qkv[:, :, :, g], qkv[:, :, :, g + 1]
        else:
            q = proj("q", cfg.n_heads, HEADS)
            k = proj("k", cfg.n_kv_heads, KV_HEADS)
            v = proj("v", cfg.n_kv_heads, KV_HEADS)
        q = apply_rope(q, rope) * jnp.asarray(hd ** -0.5, dtype)
        k = apply_rope(k, rope)
        new_visible, cache_visible, prefix_len = visibility
        if cache_kv is None:
            out = attend(q, k, v, new_visible)
            new_kv = None
        else:
            if self.tree_attention is not None and prefix_len is not None:
                from jaxaccel.pallas_kernels.tree_attention import tree_attention

                cache_len = cache_kv[0].shape[2]
                block_k = next(bk for bk in (128, 64, 32, 16, 8, cache_len) if cache_len % bk == 0)
                out = tree_attention(q, k, v, new_visible, cache_kv[0], cache_kv[1], prefix_len, block_k=block_k,
                                     interpret=self.tree_attention == "interpret")
            else:
                out = attend(q, k, v, new_visible, cache_kv[0], cache_kv[1], cache_visible)
            # Order the write after the read: with the dependency explicit, XLA updates the
            # cache buffer in place instead of copying it on every step.
            out, cache_k, cache_v = jax.lax.optimization_barrier((out, cache_kv[0], cache_kv[1]))
            new_kv = (write_kv(cache_k, k, write_slots), write_kv(cache_v, v, write_slots))
        out = nn.DenseGeneral(
            cfg.d_model, axis=(-2, -1), use_bias=False, dtype=dtype, param_dtype=pdtype, name="o",
            kernel_init=_init(cfg.init_std / math.sqrt(2 * cfg.n_layers), (HEADS, HEAD_DIM, EMBED)),
        )(out)
        return out, new_kv


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: ModelConfig
    fused: bool = False  # decode layout: one "gate_up" kernel [d, 2, ffn] instead of "gate", "up"

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dtype, pdtype = jnp_dtype(cfg.dtype), jnp_dtype(cfg.param_dtype)

        def dense(name, features, axes, std):
            return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=pdtype, name=name,
                            kernel_init=_init(std, axes))

        if self.fused:
            gate_up = nn.DenseGeneral((2, cfg.ffn_dim), use_bias=False, dtype=dtype, param_dtype=pdtype,
                                      name="gate_up", kernel_init=_init(cfg.init_std, (EMBED, None, MLP_HIDDEN)))(x)
            gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
        else:
            gate = dense("gate", cfg.ffn_dim, (EMBED, MLP_HIDDEN), cfg.init_std)(x)
            up = dense("up", cfg.ffn_dim, (EMBED, MLP_HIDDEN), cfg.init_std)(x)
        return dense("down", cfg.d_model, (MLP_HIDDEN, EMBED), cfg.init_std / math.sqrt(2 * cfg.n_layers))(
            nn.silu(gate) * up)
