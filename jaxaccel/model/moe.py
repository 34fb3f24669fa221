"""Top-k routed Mixture-of-Experts FFN (Switch / GShard style), in place of the SwiGLU MLP.

Per group of tokens (one batch row), a float32 router picks `top_k` experts per token; each
expert takes at most `capacity = ceil(capacity_factor * tokens * top_k / n_experts)` tokens
and drops the rest — a dropped assignment contributes nothing and the token keeps its
residual. First come, first served, in `moe.priority` order: "token" (the default) serves a
token's k choices before the next token's, so a token's output depends on earlier tokens
only (causal, as a language model's forward must be); "rank" (GShard) serves every token's
first choice before any second choice, so a later token's first choice can take an earlier
token's slot (the output of a causal LM then depends on the future when capacity binds).
Decoding (a forward with a KV cache) is dropless: capacity = tokens per group, so a row's
output never depends on what else is in the batch.

Losses, sown into the "intermediates" collection as sums over MoE layers:
    load_balance  Switch Transformer eq. (4): n_experts * sum_e f_e * P_e, where f_e is the
                  fraction of routing assignments (all k) sent to expert e and P_e the mean
                  router probability of e.
    router_z      ST-MoE eq. (5): mean over tokens of logsumexp(router logits)^2.
    dropped       fraction of assignments dropped for capacity (a metric, not a loss).
    expert_load   [n_experts] fraction of assignments per expert (for load-balance metrics).

Shapes: x [batch, seq, d] -> [batch, seq, d]; expert kernels [n_experts, d, ffn] and
[n_experts, ffn, d] with logical axes ("expert", "embed", "mlp").
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaccel.config import ModelConfig
from jaxaccel.model.layers import BATCH, EMBED, MLP_HIDDEN, _init, jnp_dtype
from jaxaccel.sharding import constrain

EXPERT = "expert"
EXPERT_GROUP = "expert_group"  # the groups (batch rows) inside an expert layer: split as the batch, less `expert`


def expert_capacity(tokens: int, n_experts: int, top_k: int, capacity_factor: float | None) -> int:
    if capacity_factor is None:  # dropless
        return tokens
    return max(1, min(tokens, math.ceil(capacity_factor * tokens * top_k / n_experts)))


def top_k_by_argmax(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k` over the last axis as k argmaxes: the same values and indices (a tie
    goes to the lower index first), gradients through the values alike. For the few experts
    a token picks this is cheap, and XLA's SPMD partitioner splits it over the batch axes,
    where it gathers a top_k's whole input onto every device."""
    values, indices, rest = [], [], x
    for _ in range(k):
        i = jnp.argmax(rest, axis=-1)
        values.append(jnp.take_along_axis(x, i[..., None], axis=-1)[..., 0])
        indices.append(i)
        rest = jnp.where(jax.nn.one_hot(i, x.shape[-1], dtype=bool), -jnp.inf, rest)
    return jnp.stack(values, axis=-1), jnp.stack(indices, axis=-1).astype(jnp.int32)


def route(logits: jax.Array, top_k: int, capacity: int, normalize: bool, token_mask: jax.Array | None = None,
          priority: str = "token"):
    """logits [g, s, e] float32 -> (dispatch [g, s, e, c] bool, combine [g, s, e, c] float32, stats).

    Priority "token": token position first, then choice rank (causal). "rank": choice rank
    first, then token position — every token's first choice is served before any token's
    second choice (GShard). Tokens with token_mask False (padding) get no assignment and are
    left out of every statistic."""
    g, s, e = logits.shape
    valid = jnp.ones((g, s), bool) if token_mask is None else token_mask.astype(bool)
    probs = jax.nn.softmax(logits, axis=-1)
    gates, experts = top_k_by_argmax(probs, top_k)  # [g, s, k]
    if normalize and top_k > 1:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    onehot = jax.nn.one_hot(experts, e, dtype=jnp.int32) * valid[:, :, None, None]  # [g, s, k, e]
    # Position of each assignment in its expert's queue, in priority order.
    if priority == "token":
        position = (jnp.cumsum(onehot.reshape(g, s * top_k, e), axis=1) - 1).reshape(g, s, top_k, e)
    elif priority == "rank":
        rank_major = onehot.transpose(0, 2, 1, 3).reshape(g, top_k * s, e)
        position = (jnp.cumsum(rank_major, axis=1) - 1).reshape(g, top_k, s, e).transpose(0, 2, 1, 3)
    else:
        raise ValueError(f"priority must be 'token' or 'rank', got {priority!r}")
    position = jnp.sum(position * onehot, axis=-1)  # [g, s, k]
    kept = (position < capacity) & valid[:, :, None]
    slot = jax.nn.one_hot(jnp.where(kept, position, capacity), capacity, dtype=jnp.float32)  # [g, s, k, c]
    dispatch_k = onehot.astype(jnp.float32)[..., None] * slot[:, :, :, None, :]  # [g, s, k, e, c]
    dispatch = jnp.sum(dispatch_k, axis=2)
    combine = jnp.sum(dispatch_k * gates[..., None, None], axis=2)
    n_valid = jnp.maximum(jnp.sum(valid), 1)
    assignments = onehot.astype(jnp.float32).sum(axis=2)  # [g, s, e]
    load = jnp.sum(assignments, axis=(0, 1)) / (n_valid * top_k)
    importance = jnp.sum(probs * valid[..., None], axis=(0, 1)) / n_valid
    stats = {
        "load_balance": e * jnp.sum(load * importance),
        "router_z": jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2 * valid) / n_valid,
        "dropped": 1.0 - jnp.sum(kept) / (n_valid * top_k),
        "expert_load": load,
    }
    return dispatch, combine, stats


class MoE(nn.Module):
    config: ModelConfig
    dropless: bool = False  # decode: every assignment is served
    training: bool = False  # training capacity factor (else the eval one), independent of dropout
    mesh: Any = None  # expert parallelism: the batch-split tokens go to their experts' devices and back

    @nn.compact
    def __call__(self, x, token_mask=None):
        cfg = self.config
        moe = cfg.moe
        dtype, pdtype = jnp_dtype(cfg.dtype), jnp_dtype(cfg.param_dtype)
        e, f, d = moe.n_experts, cfg.ffn_dim, cfg.d_model
        router = self.param("router", _init(cfg.init_std, (EMBED, None)), (d, e), pdtype)
        logits = jnp.einsum("gsd,de->gse", x.astype(jnp.float32), router.astype(jnp.float32))
        factor = None if self.dropless else (moe.capacity_factor if self.training else moe.eval_capacity_factor)
        capacity = expert_capacity(x.shape[1], e, moe.top_k, factor)
        dispatch, combine, stats = route(logits, moe.top_k, capacity, moe.normalize_top_k, token_mask, moe.priority)
        for name, value in stats.items():
            self.sow("intermediates", f"moe_{name}", value, reduce_fn=lambda a, b: a + b,
                     init_fn=lambda: 0.0 if name != "expert_load" else jnp.zeros((e,), jnp.float32))

        axes_in = (EXPERT, EMBED, MLP_HIDDEN)
        wg = self.param("gate", _init(cfg.init_std, axes_in), (e, d, f), pdtype)
        wu = self.param("up", _init(cfg.init_std, axes_in), (e, d, f), pdtype)
        wd = self.param("down", _init(cfg.init_std / math.sqrt(2 * cfg.n_layers), (EXPERT, MLP_HIDDEN, EMBED)),
                        (e, f, d), pdtype)
        # Outside this layer the batch is split over data x fsdp x expert; the experts' inputs
        # are split over expert by expert and over data x fsdp by group: XLA moves the tokens
        # between the two layouts with an all-to-all each way (GShard).
        local = (None, BATCH, None, None)  # each device's own groups, every expert's slots
        expert_in = constrain(jnp.einsum("gsec,gsd->egcd", dispatch.astype(dtype), x.astype(dtype)), local, self.mesh)
        expert_in = constrain(expert_in, (EXPERT, EXPERT_GROUP, None, EMBED), self.mesh)
        h = nn.silu(jnp.einsum("egcd,edf->egcf", expert_in, wg.astype(dtype))) * jnp.einsum(
            "egcd,edf->egcf", expert_in, wu.astype(dtype))
        h = constrain(h, (EXPERT, EXPERT_GROUP, None, MLP_HIDDEN), self.mesh)
        expert_out = constrain(jnp.einsum("egcf,efd->egcd", h, wd.astype(dtype)),
                               (EXPERT, EXPERT_GROUP, None, EMBED), self.mesh)
        expert_out = constrain(expert_out, local, self.mesh)
        return jnp.einsum("gsec,egcd->gsd", combine.astype(dtype), expert_out)
