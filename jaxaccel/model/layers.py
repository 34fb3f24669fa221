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


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate [batch, seq, heads, head_dim] by `positions` [batch, seq] (rotate-half layout,
    as Hugging Face Llama checkpoints store q/k)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [b, t, d/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    half = x.shape[-1] // 2
    x1 = x[..., :half].astype(jnp.float32)
    x2 = x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------- attention


def attend(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
    """Grouped-query attention of new queries over a set of keys (the reference path).

    q: [batch, seq, heads, head_dim], already scaled by 1/sqrt(head_dim).
    k, v: [batch, kv_heads, keys, head_dim].
    visible: [batch, seq, keys] bool.
    Returns [batch, seq, heads, head_dim] in v's dtype.
    """
    b, t, h, d = q.shape
    kvh = k.shape[1]
    g = h // kvh
    # Query heads of one KV group become extra rows of the same GEMM: [b, kvh, g*t, d].
    qg = q.reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * t, d)
    scores = jnp.einsum("bkqd,bksd->bkqs", qg, k, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, kvh, g, t, -1)
    scores = jnp.where(visible[:, None, None], scores, MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kvh, g * t, -1)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v)
    return out.reshape(b, kvh, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def write_kv(cache: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """Scatter new keys/values [batch, seq, kv_heads, head_dim] into a layer cache
    [batch, kv_heads, max_len, head_dim] at `slots` [batch, seq]; slot -1 writes nothing."""
    max_len = cache.shape[2]
    rows = jnp.arange(cache.shape[0])[:, None]
    slots = jnp.where(slots < 0, max_len, slots)  # out of range: dropped
    return cache.at[rows, :, slots].set(new.astype(cache.dtype), mode="drop")


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, visible, cache_kv=None, write_slots=None):
        """x [b, t, d] -> ([b, t, d], updated (k, v) cache or the new (k, v) when uncached)."""
        cfg = self.config
        hd = cfg.resolved_head_dim
        dtype, pdtype = jnp_dtype(cfg.dtype), jnp_dtype(cfg.param_dtype)

        def proj(name, heads, head_axis):
            return nn.DenseGeneral(
                (heads, hd), use_bias=cfg.qkv_bias, dtype=dtype, param_dtype=pdtype, name=name,
                kernel_init=_init(cfg.init_std, (EMBED, head_axis, HEAD_DIM)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (head_axis, HEAD_DIM)),
            )(x)

        q = proj("q", cfg.n_heads, HEADS)
        k = proj("k", cfg.n_kv_heads, KV_HEADS)
        v = proj("v", cfg.n_kv_heads, KV_HEADS)
        inv_freq = rope_inv_freq(hd, cfg.rope_theta, cfg.rope_scaling)
        q = apply_rope(q, positions, inv_freq) * jnp.asarray(hd ** -0.5, dtype)
        k = apply_rope(k, positions, inv_freq)
        if cache_kv is None:
            keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
            new_kv = (keys, values)
        else:
            keys = write_kv(cache_kv[0], k, write_slots)
            values = write_kv(cache_kv[1], v, write_slots)
            new_kv = (keys, values)
        out = attend(q, keys.astype(dtype), values.astype(dtype), visible)
        out = nn.DenseGeneral(
            cfg.d_model, axis=(-2, -1), use_bias=False, dtype=dtype, param_dtype=pdtype, name="o",
            kernel_init=_init(cfg.init_std / math.sqrt(2 * cfg.n_layers), (HEADS, HEAD_DIM, EMBED)),
        )(out)
        return out, new_kv


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dtype, pdtype = jnp_dtype(cfg.dtype), jnp_dtype(cfg.param_dtype)

        def dense(name, features, axes, std):
            return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=pdtype, name=name,
                            kernel_init=_init(std, axes))

        gate = dense("gate", cfg.ffn_dim, (EMBED, MLP_HIDDEN), cfg.init_std)(x)
        up = dense("up", cfg.ffn_dim, (EMBED, MLP_HIDDEN), cfg.init_std)(x)
        return dense("down", cfg.d_model, (MLP_HIDDEN, EMBED), cfg.init_std / math.sqrt(2 * cfg.n_layers))(
            nn.silu(gate) * up)
