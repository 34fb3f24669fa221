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
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.config import ModelConfig, RopeScaling
from jaxaccel.model.options import FlashAttention, LayerOptions, Segments, TreeKernelAttention
from jaxaccel.sharding import constrain
from jaxaccel.pallas_kernels.ops import MASKED_SCORE, attend  # noqa: F401  (re-exported)

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


class Visibility(NamedTuple):
    """Which keys each new token may attend to (built once per forward, shared by the layers).

    new [batch, T, T] bool among the new tokens, or None when `segments` carry the rule
    (flash attention); cache [batch, T, S] bool over the committed cache slots, or None
    without a cache; prefix_len [batch] when the cache rule is exactly `slot < prefix_len`
    (no sliding window: what the tree kernel takes); token_mask [batch, T] (False on
    padding: kept out of MoE routing)."""

    new: jax.Array | None
    cache: jax.Array | None = None
    prefix_len: jax.Array | None = None
    segments: Segments | None = None
    token_mask: jax.Array | None = None


def write_kv(cache: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """Scatter new keys/values [batch, seq, kv_heads, head_dim] into a layer cache
    [batch, kv_heads, max_len, head_dim] at `slots` [batch, seq]; slot -1 writes nothing."""
    max_len = cache.shape[2]
    rows = jnp.arange(cache.shape[0])[:, None]
    slots = jnp.where(slots < 0, max_len, slots)  # out of range: dropped
    return cache.at[rows, :, slots].set(new.astype(cache.dtype), mode="drop")


class Attention(nn.Module):
    config: ModelConfig
    options: LayerOptions = LayerOptions()

    @nn.compact
    def __call__(self, x, rope, visibility: Visibility, cache_kv=None, write_slots=None):
        """x [b, t, d] -> ([b, t, d], updated (k, v) cache, or None when uncached). How the
        scores are computed is `options.attention` (see `jaxaccel.model.options`)."""
        cfg, opts = self.config, self.options
        hd = cfg.resolved_head_dim
        dtype, pdtype = jnp_dtype(cfg.dtype), jnp_dtype(cfg.param_dtype)

        def proj(name, heads, head_axis):
            return nn.DenseGeneral(
                (heads, hd), use_bias=cfg.qkv_bias, dtype=dtype, param_dtype=pdtype, name=name,
                kernel_init=_init(cfg.init_std, (EMBED, head_axis, HEAD_DIM)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (head_axis, HEAD_DIM)),
            )(x)

        if opts.fused:
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
        q = constrain(q, (BATCH, LENGTH, HEADS, HEAD_DIM), opts.mesh)
        k = constrain(k, (BATCH, LENGTH, KV_HEADS, HEAD_DIM), opts.mesh)
        v = constrain(v, (BATCH, LENGTH, KV_HEADS, HEAD_DIM), opts.mesh)
        policy = opts.attention
        if cache_kv is None:
            if isinstance(policy, FlashAttention) and visibility.new is None:
                from jaxaccel.pallas_kernels.flash_attention import flash_attention

                seg = visibility.segments
                out = flash_attention(q, k, v, seg.ids, seg.bidirectional, block_q=policy.block_q,
                                      block_k=policy.block_k, implementation=policy.implementation)
            else:
                out = attend(q, k, v, visibility.new)
            new_kv = None
        else:
            if isinstance(policy, TreeKernelAttention) and visibility.prefix_len is not None:
                from jaxaccel.pallas_kernels.tree_attention import default_block_k, tree_attention

                block_k = policy.block_k or default_block_k(cache_kv[0].shape[2])
                out = tree_attention(q, k, v, visibility.new, cache_kv[0], cache_kv[1], visibility.prefix_len,
                                     block_k=block_k, interpret=policy.interpret, use_kernel=True)
            else:
                out = attend(q, k, v, visibility.new, cache_kv[0], cache_kv[1], visibility.cache)
            # Order the write after the read: with the dependency explicit, XLA updates the
            # cache buffer in place instead of copying it on every step.
            out, cache_k, cache_v = jax.lax.optimization_barrier((out, cache_kv[0], cache_kv[1]))
            new_kv = (write_kv(cache_k, k, write_slots), write_kv(cache_v, v, write_slots))
        out = constrain(out, (BATCH, LENGTH, HEADS, HEAD_DIM), opts.mesh)
        out = nn.DenseGeneral(
            cfg.d_model, axis=(-2, -1), use_bias=False, dtype=dtype, param_dtype=pdtype, name="o",
            kernel_init=_init(cfg.init_std / math.sqrt(2 * cfg.n_layers), (HEADS, HEAD_DIM, EMBED)),
        )(out)
        return out, new_kv


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: ModelConfig
    options: LayerOptions = LayerOptions()  # options.fused: one "gate_up" kernel [d, 2, ffn] (decode layout)

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dtype, pdtype = jnp_dtype(cfg.dtype), jnp_dtype(cfg.param_dtype)

        def dense(name, features, axes, std):
            return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=pdtype, name=name,
                            kernel_init=_init(std, axes))

        if self.options.fused:
            gate_up = nn.DenseGeneral((2, cfg.ffn_dim), use_bias=False, dtype=dtype, param_dtype=pdtype,
                                      name="gate_up", kernel_init=_init(cfg.init_std, (EMBED, None, MLP_HIDDEN)))(x)
            gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
        else:
            gate = dense("gate", cfg.ffn_dim, (EMBED, MLP_HIDDEN), cfg.init_std)(x)
            up = dense("up", cfg.ffn_dim, (EMBED, MLP_HIDDEN), cfg.init_std)(x)
        hidden = constrain(nn.silu(gate) * up, (BATCH, LENGTH, MLP_HIDDEN), self.options.mesh)
        return dense("down", cfg.d_model, (MLP_HIDDEN, EMBED), cfg.init_std / math.sqrt(2 * cfg.n_layers))(hidden)
