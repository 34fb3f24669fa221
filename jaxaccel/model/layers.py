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
from jaxaccel.model.options import (FlashAttention, LayerOptions, Segments, SelectionState, TokenSelectAttention,
                                    TreeKernelAttention)
from jaxaccel.sharding import constrain
from jaxaccel.pallas_kernels.ops import MASKED_SCORE, attend, rope_frequencies, rotate_half  # noqa: F401

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
    inv = rope_frequencies(head_dim, theta)
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
    return rotate_half(x, *rope)


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
    def __call__(self, x, rope, visibility: Visibility, cache_kv=None, write_slots=None,
                 select_state: SelectionState | None = None):
        """x [b, t, d] -> ([b, t, d], updated (k, v) cache, or None when uncached). How the
        scores are computed is `options.attention` (see `jaxaccel.model.options`). With
        `select_state` (TokenSelect's selection cache) a third result: its update."""
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
        q_raw, k_raw = q, k  # before RoPE: what TokenSelect scores with and caches
        q = apply_rope(q, rope) * jnp.asarray(hd ** -0.5, dtype)
        k = apply_rope(k, rope)
        q = constrain(q, (BATCH, LENGTH, HEADS, HEAD_DIM), opts.mesh)
        k = constrain(k, (BATCH, LENGTH, KV_HEADS, HEAD_DIM), opts.mesh)
        v = constrain(v, (BATCH, LENGTH, KV_HEADS, HEAD_DIM), opts.mesh)
        policy = opts.attention
        if isinstance(policy, TokenSelectAttention) and cache_kv is not None:
            out, new_kv, select_state = token_select_attention(policy, cfg, q_raw, k_raw, v, q, k, visibility,
                                                               cache_kv, write_slots, select_state)
        elif cache_kv is None:
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
        if select_state is not None:
            return out, new_kv, select_state
        return out, new_kv


# ----------------------------------------------------------------------------- TokenSelect


def rotate_cache_keys(cache_k: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Keys cached before RoPE [batch, kv_heads, S, head_dim], rotated at their slots (slot ==
    position): what the dense policy would have cached."""
    angles = jnp.arange(cache_k.shape[2], dtype=jnp.int32).astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)
    return apply_rope(cache_k, (jnp.cos(angles)[None, None], jnp.sin(angles)[None, None]))


def assemble_selection(top: jax.Array, lengths: jax.Array, policy: TokenSelectAttention, cache_len: int
                       ) -> tuple[jax.Array, jax.Array]:
    """init + `top` [batch, k] + local as `token_select.select_indices` lays them out
    (indices, valid [batch, budget]): a row longer than the budget gets [0, n_init), top,
    [lengths - n_local, lengths); a shorter row every slot [0, lengths) (masked entries hold
    max(lengths - 1, 0)). How a reused top-k becomes this step's selection."""
    b = top.shape[0]
    every = jnp.arange(policy.budget, dtype=jnp.int32)[None, :]
    full = jnp.concatenate([jnp.broadcast_to(jnp.arange(policy.n_init, dtype=jnp.int32), (b, policy.n_init)), top,
                            lengths[:, None] - policy.n_local + jnp.arange(policy.n_local, dtype=jnp.int32)], axis=1)
    short = (lengths <= policy.budget)[:, None]
    valid = jnp.where(short, every < lengths[:, None], True)
    indices = jnp.where(valid, jnp.where(short, every, full), jnp.maximum(lengths - 1, 0)[:, None])
    return jnp.clip(indices, 0, cache_len - 1), valid


def _fresh_top(policy: TokenSelectAttention, query, cache_k, lengths) -> jax.Array:
    """Soft-vote scores of the committed keys for `query` [batch, heads, head_dim] (before
    RoPE), then the top-k candidates [batch, k] (ascending) of each long row. The baseline
    selections rank the candidates without scoring: by slot ("recent") or at random."""
    from jaxaccel.pallas_kernels import token_select as ts

    b, s = cache_k.shape[0], cache_k.shape[2]
    pool = None
    if policy.selection == "recent":
        scores = jnp.broadcast_to(jnp.arange(s, dtype=jnp.float32), (b, s))
    elif policy.selection == "random":
        # A fresh draw per row, step, layer and example: keyed by the row's length and a hash
        # of its query's bits (which differ between layers and between examples; a key by
        # length alone gave every layer and every example of that length the same subset).
        bits = jax.lax.bitcast_convert_type(query.astype(jnp.float32), jnp.uint32).reshape(b, -1)
        mix = jnp.uint32(2654435761) * (2 * jnp.arange(bits.shape[1], dtype=jnp.uint32) + 1)
        digest = jnp.sum(bits * mix, axis=1, dtype=jnp.uint32)  # wraps mod 2^32
        row_keys = jax.vmap(lambda n, d: jax.random.fold_in(jax.random.fold_in(jax.random.key(0), n), d))(
            lengths, digest)
        scores = jax.vmap(lambda key: jax.random.uniform(key, (s,)))(row_keys)
    else:
        candidates = ts.selection_candidates(lengths, s, n_init=policy.n_init, n_local=policy.n_local)
        scores = ts.score_keys(query, cache_k, lengths, candidate_mask=candidates, use_kernel=policy.use_kernel,
                               interpret=policy.interpret)
        pool = policy.pool
    indices, _ = ts.select_indices(scores, lengths, k=policy.k, n_init=policy.n_init, n_local=policy.n_local,
                                   pool=pool)
    return indices[:, policy.n_init:policy.n_init + policy.k]


def query_cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """cos(a, b) over the last axis, clipped to [-1, 1] (float32 rounding can put the cosine of
    q and -q below -1, and a threshold of -1 must always reuse); 0 for a zero vector."""
    norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return jnp.clip(jnp.sum(a * b, axis=-1) / jnp.where(norms > 0, norms, 1.0), -1.0, 1.0)


def token_select_attention(policy: TokenSelectAttention, cfg: ModelConfig, q_raw, k_raw, v, q_rot, k_rot,
                           visibility: Visibility, cache_kv, write_slots, state: SelectionState | None):
    """Cached attention under `TokenSelectAttention` (see there for the rule).

    q_raw [b, t, heads, hd], k_raw / v [b, t, kv_heads, hd]: the new tokens before RoPE (q
    unscaled); q_rot / k_rot: the same rotated at their positions (q scaled). The cache keys
    are before RoPE and so are the keys written. Returns (out [b, t, heads, hd], (k, v) cache
    updated, the selection state updated or None)."""
    from jaxaccel.pallas_kernels import token_select as ts

    cache_k, cache_v = cache_kv
    b, t, h, hd = q_raw.shape
    s = cache_k.shape[2]
    lengths = visibility.prefix_len
    inv_freq = rope_inv_freq(hd, cfg.rope_theta, cfg.rope_scaling)
    if s <= policy.budget or lengths is None:
        # Everything fits (or the visibility is more than a prefix: a sliding window, an extra
        # cache mask): plain attention over the cache's keys rotated at their positions.
        out = attend(q_rot, k_rot, v, visibility.new, rotate_cache_keys(cache_k, inv_freq), cache_v,
                     visibility.cache)
    elif t == 1:  # a decode step: one query per row selects for itself
        lengths = lengths.astype(jnp.int32)
        query = q_raw[:, 0]
        long = lengths > policy.budget
        hit = jnp.zeros((b,), bool)
        flat = query.reshape(b, h * hd).astype(jnp.float32)
        if state is None or policy.cache_threshold is None:
            top = _fresh_top(policy, query, cache_k, lengths)
        else:
            hit = query_cosine(flat, state.query) >= policy.cache_threshold
            if policy.cache_threshold <= 1.0:  # float32 puts cos(q, q) at 1 - 6e-8 about one time in
                hit |= jnp.all(flat == state.query, axis=-1)  # four: an identical query is a hit
            # ... and only while every key written since that selection is in the local window
            # (a top-k chosen at length L0 covers no slot >= L0 - n_local)
            hit = state.filled & long & hit & (lengths - state.length <= policy.n_local)
            # Score the keys only when some long row misses (batch 1: a hit skips the scoring).
            top = jax.lax.cond(jnp.all(hit | ~long), lambda: state.top, lambda: jnp.where(
                hit[:, None], state.top, _fresh_top(policy, query, cache_k, lengths)))
        indices, valid = assemble_selection(top, lengths, policy, s)
        scaled = query * jnp.asarray(hd ** -0.5, query.dtype)
        out = ts.sparse_attention(scaled, cache_k, cache_v, indices, valid, lengths, k_new=k_raw[:, 0],
                                  v_new=v[:, 0], rope_inv_freq=inv_freq, positions=policy.positions,
                                  use_kernel=policy.use_kernel, interpret=policy.interpret,
                                  gather=policy.gather)[:, None]
        if state is not None:
            fresh = long & ~hit
            state = SelectionState(top=jnp.where(fresh[:, None], top, state.top),
                                   query=jnp.where(fresh[:, None], flat, state.query), filled=state.filled | long,
                                   hits=state.hits + hit, lookups=state.lookups + long,
                                   length=jnp.where(fresh, lengths, state.length))
    else:  # a prefill chunk: its mean query (over the tokens being written) selects for all of them
        lengths = lengths.astype(jnp.int32)
        real = (write_slots >= 0).astype(jnp.float32)[:, :, None, None]  # padding tokens do not vote
        mean = jnp.sum(q_raw.astype(jnp.float32) * real, axis=1) / jnp.maximum(jnp.sum(real, axis=1), 1.0)
        mean = mean.astype(q_raw.dtype)
        indices, valid = assemble_selection(_fresh_top(policy, mean, cache_k, lengths), lengths, policy, s)
        key_pos, n_selected = ts.rope_positions(indices, valid, lengths, policy.positions)
        if policy.positions == "compact":
            # The chunk's tokens continue the compacted sequence: token i (slot lengths + i) at
            # n_selected + i, rotated here rather than keeping their true positions and moving
            # the selected keys by lengths - n_selected (the same distances, but float32
            # angles at ~128K positions are off by ~1e-2 rad).
            offset = jnp.where(write_slots >= 0, write_slots - lengths[:, None], jnp.arange(t)[None, :])
            pos = (n_selected[:, None] + offset)[:, :, None]
            q_rot = ts.apply_rope(q_raw, pos, inv_freq) * jnp.asarray(hd ** -0.5, q_raw.dtype)
            k_rot = ts.apply_rope(k_raw, pos, inv_freq)
        slots = indices[:, None, :, None]
        k_sel = ts.apply_rope(jnp.take_along_axis(cache_k, slots, axis=2), key_pos[:, None, :], inv_freq)
        v_sel = jnp.take_along_axis(cache_v, slots, axis=2)
        selected_visible = jnp.broadcast_to(valid[:, None, :], (b, t, valid.shape[1]))
        out = attend(q_rot, k_rot, v, visibility.new, k_sel, v_sel, selected_visible)
    # Order the write after the read (see the dense path): the cache is updated in place.
    out, cache_k, cache_v = jax.lax.optimization_barrier((out, cache_k, cache_v))
    return out, (write_kv(cache_k, k_raw, write_slots), write_kv(cache_v, v, write_slots)), state


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
