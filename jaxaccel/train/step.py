"""The train and eval steps: loss (masked next-token cross entropy + MoE auxiliary losses),
gradient accumulation over micro-batches, AdamW update — one jitted function each.

A batch is a dict of [batch, seq] arrays (see `jaxaccel.data`): inputs, targets, loss_mask,
segment_ids (0 = padding), positions (restart per packed segment), bidirectional (prefix /
denoiser-input tokens that see each other both ways).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxaccel.config import ModelConfig
from jaxaccel.model.duo import random_routes
from jaxaccel.model.layers import BATCH, LAYERS, LENGTH
from jaxaccel.model.options import DENSE, ExecutionPlan, FlashAttention, Segments
from jaxaccel.model.transformer import forward, unstack_layers
from jaxaccel.sharding import constrain
from jaxaccel.train.config import OptimConfig


class TrainState(NamedTuple):
    step: jax.Array  # () int32
    params: Any
    opt_state: Any
    rng: jax.Array  # PRNG key for dropout


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 over `warmup_steps` (optax's convention: the first step's rate is
    0), then constant or cosine decay to `min_lr_ratio * lr` at `total_steps`. With no warm-up
    the first step trains at the full rate."""
    warmup = cfg.warmup_steps
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    else:
        after = optax.cosine_decay_schedule(cfg.lr, max(total_steps - warmup, 1), alpha=cfg.min_lr_ratio)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW; no weight decay on norm scales and biases (chosen by name: in the scanned layout
    a norm scale is [layers, d], so its rank says nothing)."""

    def decay_mask(params):
        def decays(path, _):
            name = str(getattr(path[-1], "key", path[-1]))
            return name not in ("scale", "bias")

        return jax.tree_util.tree_map_with_path(decays, params)

    chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    chain.append(optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*chain)


# Stacks this shallow run unrolled (one subtree per layer, sliced from the stacked parameters
# inside the step): on XLA's CPU backend the scanned loop's residual stacking and layout copies
# cost ~10% of the default config's step; deeper models keep the scan (compile time, memory).
UNROLL_LAYERS_UP_TO = 4


def loss_and_metrics(params, model_cfg: ModelConfig, batch: dict, rng, *, dropout: bool, remat: bool,
                     normalizer=None, aux_scale: float = 1.0, training: bool = True, attention: str = "flash",
                     bidirectional: bool = True, mesh=None, label_smoothing: float = 0.0, skip=None):
    """Objective = sum of masked token cross entropy / `normalizer` (default: this batch's
    target count) + aux_scale * MoE auxiliary losses; the MoE statistics in `metrics` are
    scaled by aux_scale too. With normalizer = the global batch's target count and aux_scale
    = this micro-batch's share of the step's routed (non-padding) tokens (`train_step`),
    summed micro-batches give the global cross entropy exactly and the step's routing
    statistics (expert load, dropped share, z-loss) as token-weighted means; the balance loss
    becomes the token-weighted mean of each micro-batch's f·P.

    Attention sees the batch's packed segments (the data package's visibility rule):
    `attention` "flash" applies it tile by tile, "dense" as a [B, T, T] mask. bidirectional
    False (a causal objective: no token is bidirectional) lets flash skip the tiles above the
    diagonal. `mesh` pins activations to their logical-axis layout.

    label_smoothing eps > 0 optimizes the cross entropy against (1 - eps) one-hot + eps
    uniform, i.e. (1 - eps) CE + eps (logsumexp - mean logit) per token (no [.., vocab]
    target array); `ce_sum` (the logged loss) stays the plain cross entropy.

    skip = (SkipSchedule, prompt_min, prompt_max, generated_only) runs the batch under
    SkipDecode's schedule from each row's prompt boundary (`with_skip_boundary`: drawn by
    `train_step`; a fixed key in evaluation).

    A Duo-LLM model (model.duo.enabled) runs every token of every layer on a random route
    (`duo_plan`: big with p_big, skip with p_skip, else small), drawn from `rng`."""
    if model_cfg.n_layers <= UNROLL_LAYERS_UP_TO:
        params = unstack_layers(params, model_cfg)  # slices of the stacked arrays; grads flow back stacked
    segments = Segments(batch["segment_ids"], batch["bidirectional"] if bidirectional else None)
    plan = None
    if skip is not None:
        if "skip_boundary" not in batch:  # evaluation: a fixed key, so every evaluation scores the same split
            batch = with_skip_boundary(skip, batch, jax.random.key(17))
        plan = ExecutionPlan(active=skip[0].token_active(batch["positions"], batch["skip_boundary"]))
    weights = batch["loss_mask"].astype(jnp.float32)
    if model_cfg.duo.enabled:  # the routes follow the batch's layout on the mesh
        routes = constrain(duo_plan(model_cfg, batch["inputs"].shape, rng).routes, (BATCH, LENGTH, LAYERS), mesh)
        plan = (ExecutionPlan() if plan is None else plan)._replace(routes=routes)
    logits, _, aux = forward(params, model_cfg, batch["inputs"], batch["positions"], segments=segments, plan=plan,
                             attention=training_attention(attention, mesh, model_cfg, batch["inputs"].shape[1]),
                             deterministic=not dropout, dropout_rng=rng if dropout else None, return_aux=True,
                             remat=remat, moe_training=training, token_mask=batch["segment_ids"] > 0, mesh=mesh)
    token_ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    ce_sum = jnp.sum(token_ce * weights)
    objective_sum = ce_sum
    if label_smoothing:  # static: eps = 0 traces exactly the unsmoothed step
        uniform_ce = jax.nn.logsumexp(logits, axis=-1) - jnp.mean(logits, axis=-1)
        objective_sum = jnp.sum(((1.0 - label_smoothing) * token_ce + label_smoothing * uniform_ce) * weights)
    n_tokens = jnp.sum(weights)
    if training:  # the training log's accuracy: the target's logit reaching the row maximum, a max
        # shared with the softmax, where an argmax is a separate variadic reduce (measured ~3% of
        # a CPU step); a tie counts, which only a collapsed model's flat logits make common
        target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
        hit = target_logit >= jnp.max(logits, axis=-1)
    else:  # evaluation, the figure reports quote: the argmax (first index on a tie), so flat logits
        # score the share of targets that are token 0, not 1
        hit = jnp.argmax(logits, axis=-1) == batch["targets"]
    correct = jnp.sum(hit * weights)
    moe = model_cfg.moe
    aux_loss = moe.load_balance_weight * aux["load_balance"] + moe.router_z_weight * aux["router_z"]
    normalizer = jnp.maximum(n_tokens if normalizer is None else normalizer, 1.0)
    metrics = {"ce_sum": ce_sum, "tokens": n_tokens, "correct": correct, "aux_loss": aux_scale * aux_loss,
               **{f"moe_{k}": aux_scale * aux[k] for k in ("load_balance", "router_z", "dropped", "expert_load")}}
    return objective_sum / normalizer + aux_scale * aux_loss, metrics


def with_skip_boundary(skip, batch: dict, key) -> dict:
    """SkipDecode fine-tuning: a random prompt boundary b per row, uniform in [prompt_min,
    prompt_max], as batch["skip_boundary"] [batch] (`SkipSchedule.token_active` turns it into
    per-token layer flags; within a packed row each segment's positions restart, so every
    segment gets its own prompt part). With generated_only the loss mask keeps only the
    tokens that predict a generated one (position >= b - 1) — applied to the batch before
    the step counts its targets, so the loss is a mean over exactly the tokens it sums."""
    _, lo, hi, generated_only = skip
    positions = batch["positions"]
    boundary = jax.random.randint(key, (positions.shape[0],), lo, hi + 1, dtype=jnp.int32)
    out = dict(batch, skip_boundary=boundary)
    if generated_only:
        mask = batch["loss_mask"]
        out["loss_mask"] = jnp.where(positions >= boundary[:, None] - 1, mask, jnp.zeros_like(mask))
    return out


def duo_plan(model_cfg: ModelConfig, tokens_shape: tuple[int, int], rng) -> ExecutionPlan:
    """Duo-LLM stage-1 training: an independent random route per token and layer ([batch, T,
    n_layers], `duo.random_routes`) from `rng` — the step's key, so a resumed run draws the
    same routes — or, when None (evaluation), from a fixed key: every evaluation scores the
    same routes, drawn as in training."""
    key = jax.random.key(29) if rng is None else jax.random.fold_in(rng, 29)
    return ExecutionPlan(routes=random_routes(model_cfg.duo, key, (*tokens_shape, model_cfg.n_layers)))


def training_attention(name: str, mesh=None, model_cfg: ModelConfig | None = None, seq_len: int | None = None, *,
                       backend: str | None = None, interpret: bool = False):
    """The attention policy of train.attention. The splash kernel is a custom call GSPMD cannot
    split, so over a multi-device mesh flash attention runs its jnp path (partitioned like
    any jnp code); a shard_map-wrapped splash is the way to bring the kernel to pods.

    On one TPU (or with `interpret`), where flash attention would pick the splash kernel, the
    kernel is first checked once per shape (given `model_cfg` and `seq_len`) against the jnp
    path, forward and backward, on random packed inputs (`pallas_kernels.checks`): a
    mismatch or a failed compile falls back to the jnp path with a one-line warning, as the
    decode kernels do, instead of training on a wrong result or crashing the step."""
    if name == "dense":
        return DENSE
    if mesh is not None and mesh.size > 1:
        return FlashAttention(implementation="jnp")
    policy = FlashAttention()
    if model_cfg is not None and seq_len is not None and (interpret or (backend or jax.default_backend()) == "tpu"):
        # This runs while the train step is being traced; JAX's trace state is per thread, so the
        # check (concrete arrays, its own jitted calls) runs in a thread of its own.
        from concurrent.futures import ThreadPoolExecutor

        from jaxaccel.pallas_kernels import checks

        with ThreadPoolExecutor(1) as pool:
            reason = pool.submit(_splash_checked, seq_len, model_cfg.n_heads, model_cfg.n_kv_heads,
                                 model_cfg.resolved_head_dim, model_cfg.dtype, policy.block_q, policy.block_k,
                                 interpret).result()
        if reason is not None:
            checks.warn_once(f"flash attention: the splash kernel check failed ({reason}); training with the jnp "
                       f"flash path")
            return FlashAttention(implementation="jnp")
    return policy


@functools.lru_cache(maxsize=None)
def _splash_checked(seq_len: int, heads: int, kv_heads: int, head_dim: int, dtype: str, block_q: int, block_k: int,
                    interpret: bool) -> str | None:
    """None when the splash kernel matches the jnp flash path on this shape (outputs, then
    gradients), else why not; also None where splash does not apply (unequal blocks)."""
    from jaxaccel.pallas_kernels import checks

    if block_q != block_k:
        return None  # flash_attention's own rule picks the jnp path then
    for grad in (False, True):
        case = checks.splash_attention_case(seq_len=seq_len, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                            dtype=dtype, block=block_q, interpret=interpret, grad=grad)
        problem = checks.compare(case).problem
        if problem is not None:
            return ("(backward) " if grad else "") + problem
    return None


def split_micro(batch: dict, n: int) -> dict:
    """[batch, ...] -> [n, batch // n, ...]: micro-batch i takes rows i, i+n, i+2n, ... so each
    micro-batch is spread over every batch-sharded device (contiguous rows would idle most)."""
    return jax.tree.map(lambda x: x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1), batch)


def compiler_options() -> dict:
    """XLA options the trainer compiles `train_step` with: none, XLA's defaults. The one place
    to change them (as `decode.tuning.compiler_options` is for the decode loop): the test
    suite compiles everything else at LLVM -O0 and patches this function to keep the program
    it runs hundreds of times at -O1 (tests/conftest.py)."""
    return {}


def train_step(state: TrainState, batch: dict, *, model_cfg: ModelConfig, optimizer: optax.GradientTransformation,
               schedule: optax.Schedule, grad_accum: int, dropout: bool, remat: bool, attention: str = "flash",
               bidirectional: bool = True, mesh=None, label_smoothing: float = 0.0, skip=None):
    """One optimizer step over the global batch, accumulating gradients over `grad_accum`
    micro-batches. Skips the update (`metrics["finite"]` False) when the loss or gradient norm
    is not finite, so the state stays the last good one."""
    rng, step_rng = jax.random.split(state.rng)
    keys = jax.random.split(step_rng, grad_accum)
    if skip is not None:
        batch = with_skip_boundary(skip, batch, jax.random.fold_in(step_rng, 17))
    n_total = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    # MoE terms and statistics weigh each forward by its share of the step's routed tokens: a
    # micro-batch of padding (the last batch's filler rows) counts for nothing
    routed = lambda b: jnp.sum(b["segment_ids"] > 0).astype(jnp.float32)  # noqa: E731
    n_routed = jnp.maximum(routed(batch), 1.0)
    grad_fn = jax.value_and_grad(loss_and_metrics, has_aux=True)
    kwargs = dict(dropout=dropout, remat=remat, normalizer=n_total, attention=attention,
                  bidirectional=bidirectional, mesh=mesh, label_smoothing=label_smoothing, skip=skip)

    if grad_accum == 1:
        (objective, metrics), grads = grad_fn(state.params, model_cfg, batch, keys[0],
                                              aux_scale=routed(batch) / n_routed, **kwargs)
    else:
        def micro(carry, xs):
            mb, key = xs
            (obj, m), g = grad_fn(state.params, model_cfg, mb, key, aux_scale=routed(mb) / n_routed, **kwargs)
            acc_obj, acc_m, acc_g = carry
            return (acc_obj + obj, jax.tree.map(jnp.add, acc_m, m), jax.tree.map(jnp.add, acc_g, g)), None

        micro_batches = split_micro(batch, grad_accum)
        first = jax.tree.map(lambda x: x[0], micro_batches)
        shapes = jax.eval_shape(lambda: grad_fn(state.params, model_cfg, first, keys[0], **kwargs)[0][1])
        zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)  # noqa: E731
        init = (jnp.float32(0), zeros(shapes), jax.tree.map(jnp.zeros_like, state.params))
        (objective, metrics, grads), _ = jax.lax.scan(micro, init, (micro_batches, keys))
    loss = metrics["ce_sum"] / n_total
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(objective) & jnp.isfinite(grad_norm)
    updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    new_state = TrainState(step=state.step + finite.astype(jnp.int32), params=keep(new_params, state.params),
                           opt_state=keep(new_opt, state.opt_state), rng=rng)
    out = {"loss": loss, "objective": objective, "accuracy": metrics["correct"] / n_total, "tokens": metrics["tokens"],
           "grad_norm": grad_norm, "lr": schedule(state.step), "finite": finite,
           **{k: metrics[k] for k in ("aux_loss", "moe_load_balance", "moe_router_z", "moe_dropped",
                                      "moe_expert_load")}}
    return new_state, out


def eval_step(params, batch: dict, *, model_cfg: ModelConfig, attention: str = "flash", bidirectional: bool = True,
              mesh=None, skip=None):
    _, metrics = loss_and_metrics(params, model_cfg, batch, None, dropout=False, remat=False, training=False,
                                  attention=attention, bidirectional=bidirectional, mesh=mesh, skip=skip)
    return {"ce_sum": metrics["ce_sum"], "tokens": metrics["tokens"], "correct": metrics["correct"]}
