"""The decoder: one forward for training, prefill, single-token steps and tree verification.

    logits, cache = forward(params, config, tokens, positions,
                            cache=..., write_slots=..., prefix_len=..., new_mask=...,
                            layer_active=...)

* tokens, positions, write_slots: [batch, T] int32. `positions` feed RoPE; `write_slots` say
  where each new token's K/V go in the cache (-1: nowhere, e.g. padding).
* Key visibility: cache slots [0, prefix_len[b]) are visible to every new token of row b;
  among the new tokens, `new_mask` [batch or 1, T, T] (default causal) says which new token
  sees which. A token tree passes its ancestor mask here; training passes nothing.
* Committed cache entries sit in slot == position (rows are right-padded, never shifted), so
  a slot index is also the key's RoPE position (used by sliding-window attention).
* layer_active [batch, n_layers] bool: a row whose flag is off for a layer passes its hidden
  state through unchanged (SkipDecode).

Two parameter layouts, same modules: "scanned" stacks layers under params["layers"] with a
leading [n_layers] axis (nn.scan: small graphs, fast compiles, for training); "unrolled" keeps
one subtree per layer, params["layer_{i}"] (for decoding: on XLA's CPU backend, slicing a
stacked weight inside a jitted loop copies it on every step). `stack_layers` /
`unstack_layers` convert; `forward` infers the layout from the params.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.config import ModelConfig
from jaxaccel.model.layers import (EMBED, LAYERS, VOCAB, Attention, MLP, RMSNorm,
                                   _init, jnp_dtype)

Params = Any


class LayerKV(NamedTuple):
    """One layer's cache: k, v [batch, kv_heads, max_len, head_dim] (stacked: leading [layers])."""

    k: jax.Array
    v: jax.Array


KVCache = tuple  # tuple[LayerKV, ...] for the unrolled layout; one stacked LayerKV for scanned


def causal_mask(t: int) -> jax.Array:
    return jnp.tril(jnp.ones((1, t, t), dtype=bool))


def build_visibility(positions, *, new_mask=None, cache_len=None, write_slots=None, prefix_len=None,
                     sliding_window=None):
    """Boolean [batch, T, keys] mask: which keys each new token may attend to.

    Without a cache the keys are the T new tokens themselves; with one, the keys are the
    `cache_len` cache slots after the new tokens have been written into them.
    """
    b, t = positions.shape
    among_new = causal_mask(t) if new_mask is None else new_mask.astype(bool)
    among_new = jnp.broadcast_to(among_new, (b, t, t))
    if cache_len is None:
        visible, key_pos = among_new, positions
    else:
        slots = jnp.arange(cache_len, dtype=jnp.int32)
        visible = jnp.broadcast_to(slots[None, None, :] < prefix_len[:, None, None], (b, t, cache_len))
        rows = jnp.arange(b)[:, None]
        safe_slots = jnp.where(write_slots < 0, cache_len, write_slots)
        # Column j of `among_new` lands in the cache column of new token j's slot.
        new_cols = jnp.zeros((b, t, cache_len), bool).at[rows, :, safe_slots].set(
            among_new.transpose(0, 2, 1), mode="drop")
        visible = visible | new_cols
        key_pos = jnp.broadcast_to(slots, (b, cache_len)).at[rows, safe_slots].set(positions, mode="drop")
    if sliding_window is not None:
        visible = visible & (positions[:, :, None] - key_pos[:, None, :] < sliding_window)
    return visible


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)). Signature is nn.scan-ready:
    (carry, per_layer_inputs, *broadcast_inputs) -> (carry, per_layer_outputs)."""

    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, layer_inputs, positions, visible, write_slots):
        cache_kv, active = layer_inputs
        cfg = self.config
        dtype, pdtype = jnp_dtype(cfg.dtype), jnp_dtype(cfg.param_dtype)
        h = RMSNorm(cfg.norm_eps, dtype, pdtype, name="attn_norm")(x)
        a, new_kv = Attention(cfg, name="attn")(h, positions, visible, cache_kv, write_slots)
        y = x + nn.Dropout(cfg.dropout.attention)(a, deterministic=self.deterministic)
        h = RMSNorm(cfg.norm_eps, dtype, pdtype, name="mlp_norm")(y)
        m = MLP(cfg, name="mlp")(h)
        y = y + nn.Dropout(cfg.dropout.mlp)(m, deterministic=self.deterministic)
        if active is not None:  # SkipDecode: inactive rows pass through this layer
            y = jnp.where(active[:, None, None], y, x)
        if cache_kv is None:
            return y, None
        return y, LayerKV(*new_kv)


class Transformer(nn.Module):
    config: ModelConfig
    scanned: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, tokens, positions, cache=None, write_slots=None, prefix_len=None, new_mask=None,
                 layer_active=None, compute_logits=True):
        cfg = self.config
        dtype, pdtype = jnp_dtype(cfg.dtype), jnp_dtype(cfg.param_dtype)
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=pdtype, name="embed",
                         embedding_init=_init(cfg.init_std, (VOCAB, EMBED)))
        x = embed(tokens)
        x = nn.Dropout(cfg.dropout.embed)(x, deterministic=self.deterministic)

        if cache is None:
            visible = build_visibility(positions, new_mask=new_mask, sliding_window=cfg.sliding_window)
        else:
            cache_len = (cache.k if self.scanned else cache[0].k).shape[-2]
            visible = build_visibility(positions, new_mask=new_mask, cache_len=cache_len,
                                       write_slots=write_slots, prefix_len=prefix_len,
                                       sliding_window=cfg.sliding_window)

        if self.scanned:
            active = None if layer_active is None else jnp.asarray(layer_active).T  # [layers, batch]
            stack = nn.scan(
                DecoderLayer,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: LAYERS},
            )(cfg, self.deterministic, name="layers")
            x, new_cache = stack(x, (cache, active), positions, visible, write_slots)
        else:
            new_layers = []
            for i in range(cfg.n_layers):
                layer_cache = None if cache is None else cache[i]
                active = None if layer_active is None else layer_active[:, i]
                x, kv = DecoderLayer(cfg, self.deterministic, name=f"layer_{i}")(
                    x, (layer_cache, active), positions, visible, write_slots)
                new_layers.append(kv)
            new_cache = None if cache is None else tuple(new_layers)

        x = RMSNorm(cfg.norm_eps, dtype, pdtype, name="final_norm")(x)
        if not compute_logits:
            return x, new_cache
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=pdtype, name="lm_head",
                              kernel_init=_init(cfg.init_std, (EMBED, VOCAB)))(x)
        return logits.astype(jnp.float32), new_cache


# ----------------------------------------------------------------------------- functional API


def is_scanned(params: Params) -> bool:
    return "layers" in params


def forward(params: Params, config: ModelConfig, tokens, positions=None, *, cache=None, write_slots=None,
            prefix_len=None, new_mask=None, layer_active=None, deterministic=True, dropout_rng=None,
            compute_logits=True):
    """Run the decoder. Returns (logits [batch, T, vocab] float32 — or the final hidden
    states [batch, T, d_model] when compute_logits=False — and the updated cache or None)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    if cache is not None:
        if write_slots is None or prefix_len is None:
            raise ValueError("a cached forward needs write_slots and prefix_len")
    if layer_active is not None:
        layer_active = jnp.broadcast_to(jnp.asarray(layer_active, bool), (tokens.shape[0], config.n_layers))
    model = Transformer(config, scanned=is_scanned(params), deterministic=deterministic)
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
    return model.apply({"params": params}, tokens, positions, cache, write_slots, prefix_len, new_mask,
                       layer_active, compute_logits, rngs=rngs)


def _model_init(config: ModelConfig, scanned: bool, rng):
    model = Transformer(config, scanned=scanned)
    tokens = jnp.zeros((1, 1), jnp.int32)
    return model.init({"params": rng}, tokens, jnp.zeros((1, 1), jnp.int32))["params"]


def init_params(config: ModelConfig, rng, layout: str = "scanned") -> Params:
    """Random parameters (plain pytree). layout: "scanned" (training) or "unrolled" (decoding)."""
    if layout not in ("scanned", "unrolled"):
        raise ValueError(f"layout must be 'scanned' or 'unrolled', got {layout!r}")
    boxed = jax.jit(_model_init, static_argnums=(0, 1))(config, layout == "scanned", rng)
    return nn.unbox(boxed)


def logical_axes(config: ModelConfig, layout: str = "unrolled") -> Params:
    """Pytree (like the params) of logical axis-name tuples, without materialising anything."""
    boxed = jax.eval_shape(lambda r: _model_init(config, layout == "scanned", r), jax.random.key(0))
    return nn.get_partition_spec(boxed)


def param_shapes(config: ModelConfig, layout: str = "unrolled") -> Params:
    boxed = jax.eval_shape(lambda r: _model_init(config, layout == "scanned", r), jax.random.key(0))
    return nn.unbox(boxed)


def stack_layers(params: Params, n_layers: int) -> Params:
    """Unrolled -> scanned layout."""
    if is_scanned(params):
        return params
    layers = [params[f"layer_{i}"] for i in range(n_layers)]
    out = {k: v for k, v in params.items() if not k.startswith("layer_")}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return out


def unstack_layers(params: Params, n_layers: int) -> Params:
    """Scanned -> unrolled layout (one array per layer: what decoding wants)."""
    if not is_scanned(params):
        return params
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(n_layers):
        out[f"layer_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
    return out


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """Zeroed unrolled cache: one LayerKV of [batch, kv_heads, max_len, head_dim] per layer."""
    dtype = jnp_dtype(config.dtype) if dtype is None else dtype
    shape = (batch, config.n_kv_heads, max_len, config.resolved_head_dim)
    return tuple(LayerKV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.n_layers))


def count_params(params: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
