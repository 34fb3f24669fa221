"""The decoder: one forward for training, prefill, single-token steps and tree verification.

    logits, cache = forward(params, config, tokens, positions,
                            cache=..., write_slots=..., prefix_len=..., new_mask=...,
                            plan=ExecutionPlan(active=...), attention=TreeKernelAttention())
    handle = ModelHandle(params, config); handle.forward(tokens, positions, ...)

* tokens, positions, write_slots: [batch, T] int32. `positions` feed RoPE; `write_slots` say
  where each new token's K/V go in the cache (-1: nowhere, e.g. padding).
* Key visibility: cache slots [0, prefix_len[b]) are visible to every new token of row b
  (plus any slot `cache_mask` [batch, T, cache_len] adds: a tree grown over several forwards);
  among the new tokens, `new_mask` [batch or 1, T, T] (default causal) says which new token
  sees which. A token tree passes its ancestor mask here; training passes `segments`. New
  tokens attend to the cache as it was *before* this call plus to each other; their own K/V
  are written at `write_slots` on the way out (slots >= prefix_len, so nothing visible moves).
* Committed cache entries sit in slot == position (rows are right-padded, never shifted), so
  a slot index is also the key's RoPE position (used by sliding-window attention).
* What varies per call is typed (`jaxaccel.model.options`): the attention policy, the
  execution plan (plan.active [batch, (T,) n_layers] bool: a row or token whose flag is off
  for a layer passes its hidden state through unchanged; plan.layer_on [n_layers] bool: a
  layer off for the whole batch is not computed at all — SkipDecode; plan.routes [batch, T,
  n_layers] in {0 big, 1 small, 2 skip}: a Duo-LLM model's FFN per token and layer, default
  all big — `jaxaccel.model.duo`) and the static `LayerOptions` every module shares.
* Decoding reaches the model only through a `ModelHandle` (params + config + forward +
  init_cache, a pytree whose leaves are the params): a draft model is a second handle.

Two parameter layouts, same modules: "scanned" stacks layers under params["layers"] with a
leading [n_layers] axis (nn.scan: small graphs, fast compiles, for training); "unrolled" keeps
one subtree per layer, params["layer_{i}"] (for decoding: on XLA's CPU backend, slicing a
stacked weight inside a jitted loop copies it on every step). `stack_layers` /
`unstack_layers` convert; `forward` infers the layout from the params.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.config import ModelConfig
from jaxaccel.errors import InvalidArgumentError
from jaxaccel.model.layers import (BATCH, EMBED, LAYERS, LENGTH, VOCAB, MLP, Attention, RMSNorm, Visibility, _init,
                                   jnp_dtype, rope_inv_freq, rope_tables)
from jaxaccel.model.duo import DuoFFN, check_routes, dispatch_mode, parse_routes
from jaxaccel.model.moe import MoE
from jaxaccel.model.options import (DENSE, AttentionPolicy, ExecutionPlan, FlashAttention, LayerOptions,
                                    Segments)
from jaxaccel.pallas_kernels.ops import segment_visible
from jaxaccel.sharding import constrain

Params = Any


class LayerKV(NamedTuple):
    """One layer's cache: k, v [batch, kv_heads, max_len, head_dim] (stacked: leading [layers])."""

    k: jax.Array
    v: jax.Array


KVCache = tuple  # tuple[LayerKV, ...] for the unrolled layout; one stacked LayerKV for scanned


def causal_mask(t: int) -> jax.Array:
    return jnp.tril(jnp.ones((1, t, t), dtype=bool))


def build_visibility(positions, *, new_mask=None, cache_len=None, prefix_len=None, sliding_window=None,
                     segments: Segments | None = None, flash: bool = False, token_mask=None,
                     cache_mask=None) -> Visibility:
    """Which keys each new token may attend to (`layers.Visibility`).

    Among the new tokens: `new_mask` (default causal); with `flash` and `segments` (training
    through flash attention) no [T, T] mask is built at all — the kernel applies the segment
    rule tile by tile. Over the cache: committed slots [0, prefix_len), plus the slots
    `cache_mask` [batch, T, cache_len] adds (a tree grown over several forwards: a node's
    ancestors already in the cache); `prefix_len` is passed on alone when that is the whole
    rule (no sliding window, no cache_mask), for the tree kernel.
    With a sliding window a key is visible only if q_pos - k_pos < window (a committed
    cache slot's position is its index).
    """
    b, t = positions.shape
    if flash and segments is not None and new_mask is None and cache_len is None and sliding_window is None:
        return Visibility(None, segments=segments, token_mask=token_mask)
    if new_mask is None and segments is not None:
        new_mask = segment_mask(segments)
    among_new = causal_mask(t) if new_mask is None else new_mask.astype(bool)
    new_visible = jnp.broadcast_to(among_new, (b, t, t))
    if sliding_window is not None:
        new_visible = new_visible & (positions[:, :, None] - positions[:, None, :] < sliding_window)
    if cache_len is None:
        return Visibility(new_visible, token_mask=token_mask)
    slots = jnp.arange(cache_len, dtype=jnp.int32)
    cache_visible = jnp.broadcast_to(slots[None, None, :] < prefix_len[:, None, None], (b, t, cache_len))
    if cache_mask is not None:
        cache_visible = cache_visible | cache_mask.astype(bool)
    if sliding_window is not None:
        cache_visible = cache_visible & (positions[:, :, None] - slots[None, None, :] < sliding_window)
        return Visibility(new_visible, cache_visible, token_mask=token_mask)
    if cache_mask is not None:
        return Visibility(new_visible, cache_visible, token_mask=token_mask)
    return Visibility(new_visible, cache_visible, prefix_len, token_mask=token_mask)


def segment_mask(segments: Segments) -> jax.Array:
    """[batch, T, T] bool: the `Segments` visibility rule as an explicit mask (dense attention)."""
    bid = segments.bidirectional
    return segment_visible(segments.ids, segments.ids, bid, bid)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + ffn(norm(.)), the FFN a SwiGLU MLP, for
    sparse layers (`config.is_moe_layer(index)`) a routed MoE, or in a Duo-LLM model
    (`config.duo.enabled`) the big / small / skip FFN the token's route picks. Signature is
    nn.scan-ready: (carry, per_layer_inputs, *broadcast_inputs) -> (carry, per_layer_outputs);
    per_layer_inputs = (cache_kv, active [batch, T] or None, route [batch, T] or None)."""

    config: ModelConfig
    options: LayerOptions = LayerOptions()
    index: int = 0  # position in the stack (in its block when scanned): decides dense vs MoE

    @nn.compact
    def __call__(self, x, layer_inputs, rope, visibility: Visibility, write_slots, select_state=None):
        cache_kv, active, route = layer_inputs
        cfg, opts = self.config, self.options
        dtype, pdtype = jnp_dtype(cfg.dtype), jnp_dtype(cfg.param_dtype)
        h = RMSNorm(cfg.norm_eps, dtype, pdtype, name="attn_norm")(x)
        if select_state is None:
            a, new_kv = Attention(cfg, opts, name="attn")(h, rope, visibility, cache_kv, write_slots)
        else:  # the attention policy's per-layer state (TokenSelect's selection cache) in and out
            a, new_kv, select_state = Attention(cfg, opts, name="attn")(h, rope, visibility, cache_kv, write_slots,
                                                                         select_state)
        # DropPath (stochastic depth, Huang et al. 2016): each residual branch is dropped for
        # a whole example with probability dropout.path (the survivors scaled by 1 / (1 - p)).
        drop_path = nn.Dropout(cfg.dropout.path, broadcast_dims=(1, 2))
        a = nn.Dropout(cfg.dropout.attention)(a, deterministic=opts.deterministic)
        y = x + drop_path(a, deterministic=opts.deterministic)
        y = constrain(y, (BATCH, LENGTH, EMBED), opts.mesh)
        h = RMSNorm(cfg.norm_eps, dtype, pdtype, name="mlp_norm")(y)
        if cfg.duo.enabled:
            mode = dispatch_mode(h.shape[0] * h.shape[1], cached=cache_kv is not None)
            m = DuoFFN(cfg, opts, mode, name="duo")(h, route)
        elif cfg.is_moe_layer(self.index):
            routed = visibility.token_mask  # padding, and tokens the plan passes through, take no slot
            if active is not None:
                on = jnp.broadcast_to(active, h.shape[:2])
                routed = on if routed is None else routed.astype(bool) & on
            m = MoE(cfg, opts.dropless, opts.moe_training, opts.mesh, name="moe")(h, routed)
        else:
            m = MLP(cfg, opts, name="mlp")(h)
        m = nn.Dropout(cfg.dropout.mlp)(m, deterministic=opts.deterministic)
        y = y + drop_path(m, deterministic=opts.deterministic)
        y = constrain(y, (BATCH, LENGTH, EMBED), opts.mesh)
        if active is not None:  # execution plan: inactive rows / tokens pass through this layer
            y = jnp.where(active[..., None], y, x)  # active [batch, T or 1]
        if cache_kv is None:
            return y, None
        if select_state is not None:
            return y, (LayerKV(*new_kv), select_state)
        return y, LayerKV(*new_kv)


def _run_layer(layer, x, cache, active, route, rope, visibility, write_slots):
    return layer(x, (cache, active, route), rope, visibility, write_slots)


def _run_static_route(layer, x, cache, active, _, rope, visibility, write_slots, *, route: int):
    return layer(x, (cache, active, route), rope, visibility, write_slots)


def _skip_layer(layer, x, cache, active, route, rope, visibility, write_slots):
    return x, cache


class DecoderBlock(nn.Module):
    """`config.block_size` consecutive layers: the unit nn.scan repeats when only every N-th
    layer is sparse (its last layer is the MoE one)."""

    config: ModelConfig
    options: LayerOptions = LayerOptions()

    @nn.compact
    def __call__(self, x, block_inputs, rope, visibility, write_slots):
        cache, active, route = block_inputs  # leading [block_size] each, or None
        new = []
        for j in range(self.config.block_size):
            layer_cache = None if cache is None else LayerKV(cache.k[j], cache.v[j])
            x, kv = DecoderLayer(self.config, self.options, j, name=f"layer_{j}")(
                x, (layer_cache, None if active is None else active[j], None if route is None else route[j]), rope,
                visibility, write_slots)
            new.append(kv)
        if cache is None:
            return x, None
        return x, LayerKV(jnp.stack([kv.k for kv in new]), jnp.stack([kv.v for kv in new]))


class Transformer(nn.Module):
    config: ModelConfig
    options: LayerOptions = LayerOptions()
    scanned: bool = False
    remat: bool = False  # recompute each layer in the backward pass (training memory)
    vocab_major_logits: bool = False  # see `forward`

    @nn.compact
    def __call__(self, tokens, positions, cache=None, write_slots=None, prefix_len=None, new_mask=None,
                 plan: ExecutionPlan | None = None, compute_logits=True, token_mask=None,
                 segments: Segments | None = None, cache_mask=None, attention_state=None):
        cfg, opts = self.config, self.options
        dtype, pdtype = jnp_dtype(cfg.dtype), jnp_dtype(cfg.param_dtype)
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=pdtype, name="embed",
                         embedding_init=_init(cfg.init_std, (VOCAB, EMBED)))
        # Without a cache (training, whole-sequence scoring) the lookup reads the table with its
        # `embed` dim whole (FSDP gathers it, as for any weight): left to XLA, the lookup's
        # gradient (a scatter-add into the fsdp-split table) had the batch-split rows of a
        # data x fsdp or fsdp x expert mesh replicated on every device first ("Involuntary
        # full rematerialization"). Decoding (a cache) looks rows up where they lie: a gather
        # of the whole table per generated token would cost vocab x d_model bytes each step.
        table = jnp.asarray(embed.embedding, dtype)
        if cache is None:
            table = constrain(table, (VOCAB, None), opts.mesh)
        x = constrain(jnp.take(table, tokens, axis=0), (BATCH, LENGTH, EMBED), opts.mesh)
        x = nn.Dropout(cfg.dropout.embed)(x, deterministic=opts.deterministic)

        cache_len = None if cache is None else (cache.k if self.scanned else cache[0].k).shape[-2]
        visibility = build_visibility(positions, new_mask=new_mask, cache_len=cache_len, prefix_len=prefix_len,
                                      sliding_window=cfg.sliding_window, segments=segments,
                                      flash=isinstance(opts.attention, FlashAttention), token_mask=token_mask,
                                      cache_mask=cache_mask)
        rope = rope_tables(positions, rope_inv_freq(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling))
        layer_active = None if plan is None else plan.active
        layer_routes = None if plan is None else plan.routes  # [batch, T, layers] (checked by `forward`)

        if self.scanned:
            bs = cfg.block_size
            n_blocks = cfg.n_layers // bs
            active = None if layer_active is None else jnp.moveaxis(layer_active, -1, 0)  # [layers, batch, T|1]
            routes = None if layer_routes is None else jnp.moveaxis(layer_routes, -1, 0)  # [layers, batch, T]
            if bs == 1:
                body, args = DecoderLayer, (cfg, opts, 0)
                xs = (cache, active, routes)
            else:
                body, args = DecoderBlock, (cfg, opts)
                split = lambda a: a.reshape((n_blocks, bs) + a.shape[1:])  # noqa: E731
                xs = (None if cache is None else LayerKV(split(cache.k), split(cache.v)),
                      None if active is None else split(active), None if routes is None else split(routes))
            if self.remat:
                body = nn.remat(body, prevent_cse=False)
            stack = nn.scan(
                body,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                length=n_blocks,
                metadata_params={nn.PARTITION_NAME: LAYERS},
            )(*args, name="layers")
            x, new_cache = stack(x, xs, rope, visibility, write_slots)
            if new_cache is not None and bs > 1:
                merge = lambda a: a.reshape((cfg.n_layers,) + a.shape[2:])  # noqa: E731
                new_cache = LayerKV(merge(new_cache.k), merge(new_cache.v))
        else:
            layer_cls = nn.remat(DecoderLayer, prevent_cse=False) if self.remat else DecoderLayer
            layer_on = None if plan is None else plan.layer_on
            new_layers, new_states = [], []
            for i in range(cfg.n_layers):
                layer_cache = None if cache is None else cache[i]
                active = None if layer_active is None else layer_active[..., i]
                route = None if layer_routes is None else (
                    layer_routes[i] if isinstance(layer_routes, tuple) else layer_routes[..., i])
                layer = layer_cls(cfg, opts, i, name=f"layer_{i}")
                if attention_state is not None:  # checked by `forward`: cached, every layer runs
                    x, (kv, layer_state) = layer(x, (layer_cache, active, route), rope, visibility, write_slots,
                                                 attention_state[i])
                    new_states.append(layer_state)
                elif isinstance(layer_on, tuple) and not layer_on[i]:  # static: a skipped layer is not traced
                    kv = layer_cache
                elif layer_on is None or isinstance(layer_on, tuple):
                    x, kv = layer(x, (layer_cache, active, route), rope, visibility, write_slots)
                else:  # a skipped layer is not computed at all: no FLOPs, no K/V written
                    run = _run_layer
                    if isinstance(route, int):  # a static route stays static (not a traced cond operand)
                        run, route = functools.partial(_run_static_route, route=route), None
                    x, kv = nn.cond(layer_on[i], run, _skip_layer, layer, x, layer_cache, active, route,
                                    rope, visibility, write_slots)
                new_layers.append(kv)
            new_cache = None if cache is None else tuple(new_layers)
            if attention_state is not None:
                new_cache = (new_cache, tuple(new_states))

        x = RMSNorm(cfg.norm_eps, dtype, pdtype, name="final_norm")(x)
        if not compute_logits:
            return x, new_cache
        if cfg.tie_embeddings and self.vocab_major_logits and x.shape[1] > 1:
            # table [vocab, d] @ x.T with the [vocab, b*T] result kept in that layout (the
            # barrier stops XLA from folding the transpose back into the dot); chosen by the
            # caller where it measured faster (`jaxaccel.decode.tuning`).
            b, t = x.shape[:2]
            flat = jnp.einsum("vd,md->vm", jnp.asarray(embed.embedding, dtype), x.reshape(b * t, -1).astype(dtype))
            logits = jax.lax.optimization_barrier(flat).T.reshape(b, t, -1)
        elif cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=pdtype, name="lm_head",
                              kernel_init=_init(cfg.init_std, (EMBED, VOCAB)))(x)
        logits = constrain(logits, (BATCH, LENGTH, VOCAB), opts.mesh)
        return logits.astype(jnp.float32), new_cache


# ----------------------------------------------------------------------------- functional API


def is_scanned(params: Params) -> bool:
    return "layers" in params


def is_fused(params: Params) -> bool:
    layer = params["layers"] if is_scanned(params) else params["layer_0"]
    if "attn" not in layer:  # scanned blocks
        layer = layer["layer_0"]
    return "qkv" in layer["attn"]


def forward(params: Params, config: ModelConfig, tokens, positions=None, *, cache=None, write_slots=None,
            prefix_len=None, new_mask=None, cache_mask=None, segments: Segments | None = None,
            plan: ExecutionPlan | None = None,
            attention: AttentionPolicy = DENSE, deterministic=True, dropout_rng=None, compute_logits=True,
            return_aux=False, remat=False, moe_training=False, token_mask=None, mesh=None,
            vocab_major_logits=False, attention_state=None, dropless=None):
    """Run the decoder. Returns (logits [batch, T, vocab] float32 — or the final hidden
    states [batch, T, d_model] when compute_logits=False — and the updated cache or None);
    with return_aux=True a third element: the MoE statistics summed over layers (`moe_aux`).

    Typed per-call arguments (`jaxaccel.model.options`): `attention` (policy), `plan`
    (per-layer execution; Duo-LLM routes, default all big), `segments` (packed training rows: the visibility rule flash
    attention applies tile by tile; dense attention builds the mask from it).
    moe_training selects the MoE training capacity factor (independently of dropout);
    `dropless` serves every MoE routing assignment (default: a cached call is dropless, an
    uncached one uses the capacity factor; `LanguageModel.logits` asks for it so its logits are
    what decoding computes);
    token_mask [batch, T] (False on padding) keeps padding out of MoE routing; `mesh`
    pins activations to their logical-axis layout on it; `vocab_major_logits` computes
    tied-embedding logits of T > 1 cached calls as table @ x.T (a layout some backends run
    faster, chosen by the decode side). `attention_state`: the attention policy's per-layer
    state (a tuple with one entry per layer, e.g. TokenSelect's `SelectionState`; cached calls
    of the unrolled layout, every layer run): given, its update is returned after the cache
    (logits, cache, attention_state[, aux]).

    Cached calls: `positions` defaults to prefix_len + 0..T-1 per row; `write_slots` [batch, T]
    are the cache slots the new K/V go to (-1 writes nothing). Slots must lie below the cache
    length: the write happens inside the compiled program, where a slot past the end is
    dropped, not reported — the caller sizes the cache (the decode engine does from the
    request)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if cache is not None:
        if write_slots is None or prefix_len is None:
            raise ValueError("a cached forward needs write_slots and prefix_len")
    if positions is None:  # uncached: 0..T-1; cached: right after each row's committed prefix
        start = 0 if cache is None else jnp.asarray(prefix_len, jnp.int32)[:, None]
        positions = jnp.broadcast_to(start + jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    if plan is not None and plan.active is not None:
        active = jnp.asarray(plan.active, bool)
        if active.ndim < 3:  # per row: one flag for all of its tokens
            active = jnp.broadcast_to(active, (tokens.shape[0], config.n_layers))[:, None, :]
        plan = plan._replace(active=jnp.broadcast_to(active, (tokens.shape[0], active.shape[1], config.n_layers)))
    if plan is not None and plan.routes is not None:
        if not config.duo.enabled:
            raise InvalidArgumentError("plan.routes needs a Duo-LLM model (model.duo.enabled)")
        static = (isinstance(plan.routes, tuple) and not is_scanned(params)
                  and all(isinstance(r, (int, np.integer)) and not isinstance(r, bool) for r in plan.routes))
        if static:  # one Python int per layer: each layer runs only its FFN, nothing routed at run time
            plan = plan._replace(routes=parse_routes(plan.routes, config.n_layers))
        else:
            plan = plan._replace(routes=check_routes(plan.routes, tokens.shape, config.n_layers))
    if plan is not None and plan.layer_on is not None:
        if is_scanned(params):
            raise ValueError("plan.layer_on (skipping layers' compute) needs the unrolled parameter layout")
        if cache is not None and len(cache) != config.n_layers:
            raise ValueError("plan.layer_on needs an unrolled cache (one LayerKV per layer)")
        if return_aux and (config.duo.enabled or any(config.is_moe_layer(i) for i in range(config.n_layers))):
            raise ValueError("return_aux with plan.layer_on is not supported on an MoE or Duo model: the "
                             "per-layer statistics of skipped layers are undefined")
        if isinstance(plan.layer_on, (tuple, list)):
            if len(plan.layer_on) != config.n_layers:
                raise ValueError(f"plan.layer_on has {len(plan.layer_on)} flags for {config.n_layers} layers")
            plan = plan._replace(layer_on=tuple(bool(f) for f in plan.layer_on))
        else:
            plan = plan._replace(layer_on=jnp.broadcast_to(jnp.asarray(plan.layer_on, bool), (config.n_layers,)))
    if attention_state is not None:
        if cache is None or is_scanned(params) or (plan is not None and plan.layer_on is not None):
            raise ValueError("attention_state needs a cached call of the unrolled layout without plan.layer_on")
        if len(attention_state) != config.n_layers:
            raise ValueError(f"attention_state has {len(attention_state)} entries for {config.n_layers} layers")
    soft_routes = plan is not None and plan.soft_routes is not None and plan.soft_routes is not False
    if soft_routes and not isinstance(plan.soft_routes, bool):
        raise ValueError("plan.soft_routes must be a Python bool: build the plan inside the jitted function")
    if soft_routes and not (config.duo.enabled and config.duo.router):
        raise InvalidArgumentError("plan.soft_routes needs a Duo-LLM model with a router (model.duo.router)")
    dropless = cache is not None if dropless is None else bool(dropless)
    options = LayerOptions(deterministic=deterministic, fused=is_fused(params), dropless=dropless,
                           moe_training=moe_training, attention=attention, mesh=mesh, soft_routes=bool(soft_routes))
    model = Transformer(config, options, scanned=is_scanned(params), remat=remat,
                        vocab_major_logits=vocab_major_logits and cache is not None)
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
    args = (tokens, positions, cache, write_slots, prefix_len, new_mask, plan, compute_logits, token_mask, segments,
            cache_mask, attention_state)
    if not return_aux:
        out, new_cache = model.apply({"params": params}, *args, rngs=rngs)
        aux = ()
    else:
        (out, new_cache), state = model.apply({"params": params}, *args, rngs=rngs, mutable=["intermediates"])
        aux = (moe_aux(state.get("intermediates", {}), config),)
    if attention_state is not None:  # the Transformer returns (cache, states) in the cache's place
        return (out, *new_cache, *aux)
    return (out, new_cache, *aux)


def moe_aux(intermediates, config: ModelConfig) -> dict:
    """Sum the sown MoE statistics over layers (zeros for a dense model); `expert_load` and
    `dropped` are averaged over the sparse layers instead."""
    names = ("load_balance", "router_z", "dropped", "expert_load")
    totals = {n: jnp.zeros((config.moe.n_experts,) if n == "expert_load" else (), jnp.float32) for n in names}
    flat = jax.tree_util.tree_flatten_with_path(intermediates)[0]
    for path, value in flat:
        key = next((getattr(k, "key", None) for k in reversed(path) if str(getattr(k, "key", "")).startswith("moe_")),
                   None)
        if key is None:
            continue
        name = key[len("moe_"):]
        value = jnp.asarray(value)
        if name == "expert_load":  # [n_experts], or [n_blocks, n_experts] from a scan
            totals[name] = totals[name] + (value.sum(axis=0) if value.ndim == 2 else value)
        else:
            totals[name] = totals[name] + value.sum()
    n_sparse = max(1, sum(config.is_moe_layer(i) for i in range(config.n_layers)))
    totals["expert_load"] = totals["expert_load"] / n_sparse
    totals["dropped"] = totals["dropped"] / n_sparse
    if config.duo.enabled:  # [n_layers]: each layer's mean P(big) (router) or fraction of big routes
        totals["duo_p_big"] = _per_layer(flat, "duo_p_big", config.n_layers)
        if config.duo.router:  # [n_layers, batch, T, 2]: each layer's router logits (big, small)
            totals["duo_router_logits"] = _per_layer(flat, "duo_router_logits", config.n_layers)
    return totals


def _per_layer(flat, name: str, n_layers: int) -> jax.Array:
    """A statistic every layer sows once -> [n_layers, *its shape] in layer order: unrolled
    layers by their index ("layer_10" after "layer_9"); a scanned stack sows it with the
    stack's leading axis ([n_layers], or [n_blocks] per layer of a block)."""
    found, scanned = {}, False
    for path, value in flat:
        keys = [str(getattr(k, "key", "")) for k in path]
        if name in keys:
            scanned = keys[0] == "layers"
            index = next((int(k[6:]) for k in keys if k.startswith("layer_") and k[6:].isdigit()), 0)
            found[index] = jnp.asarray(value, jnp.float32)
    if not found:
        return jnp.zeros((n_layers,), jnp.float32)
    stacked = jnp.stack([found[i] for i in sorted(found)])  # unrolled [layers, ...]; scanned [block, stack, ...]
    if not scanned:
        return stacked
    return jnp.swapaxes(stacked, 0, 1).reshape((n_layers,) + stacked.shape[2:])


LAYOUTS = ("scanned", "unrolled", "fused")


def _model_init(config: ModelConfig, layout: str, rng):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    model = Transformer(config, LayerOptions(fused=layout == "fused"), scanned=layout == "scanned")
    tokens = jnp.zeros((1, 1), jnp.int32)
    return model.init({"params": rng}, tokens, jnp.zeros((1, 1), jnp.int32))["params"]


def init_params(config: ModelConfig, rng, layout: str = "scanned") -> Params:
    """Random parameters (plain pytree). layout: "scanned" (training), "unrolled" (one subtree
    per layer, Hugging Face's tensor split) or "fused" (unrolled, q/k/v and gate/up fused: decoding)."""
    boxed = jax.jit(_model_init, static_argnums=(0, 1))(config, layout, rng)
    return nn.unbox(boxed)


def logical_axes(config: ModelConfig, layout: str = "unrolled") -> Params:
    """Pytree (like the params) of logical axis-name tuples, without materialising anything."""
    boxed = jax.eval_shape(lambda r: _model_init(config, layout, r), jax.random.key(0))
    return nn.get_partition_spec(boxed)


def param_shapes(config: ModelConfig, layout: str = "unrolled") -> Params:
    boxed = jax.eval_shape(lambda r: _model_init(config, layout, r), jax.random.key(0))
    return nn.unbox(boxed)


def _n_layers(config_or_n) -> tuple[int, int]:
    if isinstance(config_or_n, ModelConfig):
        return config_or_n.n_layers, config_or_n.block_size
    return int(config_or_n), 1


def stack_layers(params: Params, config: ModelConfig | int) -> Params:
    """Unrolled -> scanned layout (blocks of `config.block_size` layers when MoE is every N)."""
    if is_scanned(params):
        return params
    n, bs = _n_layers(config)
    out = {k: v for k, v in params.items() if not k.startswith("layer_")}
    stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)  # noqa: E731
    if bs == 1:
        out["layers"] = stack([params[f"layer_{i}"] for i in range(n)])
    else:
        out["layers"] = {f"layer_{j}": stack([params[f"layer_{b * bs + j}"] for b in range(n // bs)])
                         for j in range(bs)}
    return out


def unstack_layers(params: Params, config: ModelConfig | int) -> Params:
    """Scanned -> unrolled layout (one array per layer: what decoding wants)."""
    if not is_scanned(params):
        return params
    n, bs = _n_layers(config)
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(n):
        b, j = divmod(i, bs)
        tree = params["layers"] if bs == 1 else params["layers"][f"layer_{j}"]
        out[f"layer_{i}"] = jax.tree.map(lambda x, b=b: x[b], tree)
    return out


def fuse_layer(layer: Params, config: ModelConfig, xp=jnp) -> Params:
    """One unrolled layer -> fused decode layout: q/k/v become one kernel [d, kv_heads,
    q_per_kv + 2, head_dim] grouped by KV head, gate/up one kernel [d, 2, ffn]. Fewer, larger
    GEMVs per step (on a 2-core CPU this moved the 40M model from ~138 to ~170 tok/s).
    `xp` is jnp for device arrays or np for host arrays."""
    k, g, hd = config.n_kv_heads, config.q_per_kv, config.resolved_head_dim
    attn = layer["attn"]
    d = attn["q"]["kernel"].shape[0]
    qkv = {"kernel": xp.concatenate([attn["q"]["kernel"].reshape(d, k, g, hd), attn["k"]["kernel"][:, :, None],
                                     attn["v"]["kernel"][:, :, None]], axis=2)}
    if "bias" in attn["q"]:
        qkv["bias"] = xp.concatenate([attn["q"]["bias"].reshape(k, g, hd), attn["k"]["bias"][:, None],
                                      attn["v"]["bias"][:, None]], axis=1)
    fused = {**layer, "attn": {"qkv": qkv, "o": attn["o"]}}
    if "mlp" in layer:  # MoE layers keep their experts as they are
        fused["mlp"] = _fuse_mlp(layer["mlp"], xp)
    if "duo" in layer:  # Duo-LLM: both FFNs fused the same way
        fused["duo"] = {name: (_fuse_mlp(sub, xp) if name in ("big", "small") else sub)  # the router as is
                        for name, sub in layer["duo"].items()}
    return fused


def _fuse_mlp(mlp: Params, xp=jnp) -> Params:
    gate_up = xp.stack([mlp["gate"]["kernel"], mlp["up"]["kernel"]], axis=1)
    return {"gate_up": {"kernel": gate_up}, "down": mlp["down"]}


def _unfuse_mlp(mlp: Params) -> Params:
    gate_up = mlp["gate_up"]["kernel"]
    return {"gate": {"kernel": gate_up[:, 0]}, "up": {"kernel": gate_up[:, 1]}, "down": mlp["down"]}


def unfuse_layer(layer: Params, config: ModelConfig) -> Params:
    g, hd = config.q_per_kv, config.resolved_head_dim
    qkv = layer["attn"]["qkv"]
    d = qkv["kernel"].shape[0]
    attn = {"q": {"kernel": qkv["kernel"][:, :, :g].reshape(d, config.n_heads, hd)},
            "k": {"kernel": qkv["kernel"][:, :, g]}, "v": {"kernel": qkv["kernel"][:, :, g + 1]},
            "o": layer["attn"]["o"]}
    if "bias" in qkv:
        attn["q"]["bias"] = qkv["bias"][:, :g].reshape(config.n_heads, hd)
        attn["k"]["bias"], attn["v"]["bias"] = qkv["bias"][:, g], qkv["bias"][:, g + 1]
    out = {**layer, "attn": attn}
    if "mlp" in layer:
        out["mlp"] = _unfuse_mlp(layer["mlp"])
    if "duo" in layer:
        out["duo"] = {name: (_unfuse_mlp(sub) if name in ("big", "small") else sub) for name, sub in layer["duo"].items()}
    return out


def fuse_layers(params: Params, config: ModelConfig, consume: bool = False) -> Params:
    """Any layout -> fused decode layout. consume=True empties `params` layer by layer, so
    a large model never holds two copies of more than one layer."""
    params = unstack_layers(params, config)
    if is_fused(params):
        return params
    out = {k: v for k, v in params.items() if not k.startswith("layer_")}
    for i in range(config.n_layers):
        layer = params.pop(f"layer_{i}") if consume else params[f"layer_{i}"]
        if _on_host(layer):  # numpy views of host buffers: no per-op compiles at load time
            out[f"layer_{i}"] = jax.tree.map(jnp.asarray, fuse_layer(jax.tree.map(np.asarray, layer), config, xp=np))
        else:
            out[f"layer_{i}"] = fuse_layer(layer, config)
        del layer
    return out


def _on_host(tree: Params) -> bool:
    """Every leaf a numpy array or a single-device CPU array (fusing it with numpy is free)."""
    def host(x):
        if isinstance(x, np.ndarray):
            return True
        devices = getattr(x, "devices", lambda: set())()
        return len(devices) == 1 and next(iter(devices)).platform == "cpu"
    return all(host(x) for x in jax.tree.leaves(tree))


def unfuse_layers(params: Params, config: ModelConfig) -> Params:
    """Fused decode layout -> unrolled (Hugging Face's tensor split)."""
    if is_scanned(params) or not is_fused(params):
        return params
    out = dict(params)
    for i in range(config.n_layers):
        out[f"layer_{i}"] = unfuse_layer(params[f"layer_{i}"], config)
    return out


def canonical_params(params: Params, config: ModelConfig) -> Params:
    """Any layout -> unrolled, unfused: the layout checkpoints and HF export use."""
    return unfuse_layers(unstack_layers(params, config), config)


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """Zeroed unrolled cache: one LayerKV of [batch, kv_heads, max_len, head_dim] per layer."""
    dtype = jnp_dtype(config.dtype) if dtype is None else dtype
    shape = (batch, config.n_kv_heads, max_len, config.resolved_head_dim)
    return tuple(LayerKV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.n_layers))


def count_params(params: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# ----------------------------------------------------------------------------- the handle


@jax.tree_util.register_pytree_node_class
class ModelHandle:
    """One model as the decode engine sees it: params + config + `forward` + `init_cache`
    (t5x hands its loop a `tokens_to_logits` callable for the same reason: the loop never
    imports a model, so a draft model is just a second handle).

    A pytree: the params are its leaves (traced arguments of a jitted function), the config
    and `defaults` (keyword arguments every `forward` call gets, e.g. a backend's logits
    layout) are static. Hashable static parts only: dicts become sorted tuples."""

    def __init__(self, params: Params, config: ModelConfig, defaults: tuple[tuple[str, Any], ...] | dict = ()):
        self.params = params
        self.config = config
        self.defaults = tuple(sorted(dict(defaults).items()))

    def forward(self, tokens, positions=None, **kwargs):
        """`transformer.forward` on this model's params (see there for the arguments)."""
        return forward(self.params, self.config, tokens, positions, **{**dict(self.defaults), **kwargs})

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        return init_cache(self.config, batch, max_len, dtype)

    def with_defaults(self, **kwargs) -> "ModelHandle":
        """This handle with more `forward` defaults (e.g. a decoding method's attention policy)."""
        if not kwargs:
            return self
        return ModelHandle(self.params, self.config, {**dict(self.defaults), **kwargs})

    def tree_flatten(self):
        return (self.params,), (self.config, self.defaults)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)

    def __repr__(self) -> str:
        return f"ModelHandle({self.config.n_layers} layers, d_model={self.config.d_model}, defaults={self.defaults})"
