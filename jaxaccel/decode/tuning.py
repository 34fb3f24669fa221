"""Backend tuning of the decode side, in one place: every choice here was measured on a
backend (the reference CPU: 2 cores, docs/BENCHMARKS.md) and is a lookup keyed by
`jax.default_backend()`, so model code and the methods never branch on the backend.

* XLA compiler options for the decode loop;
* forward defaults a `ModelHandle` carries (the tied-embedding logits layout);
* Token Recycling's `"auto"` template and its fallback cost table;
* the step-cost model draft-model methods pick `budget="auto"` from;
* which tree-attention implementation verification runs, and whether TokenSelect runs its
  Pallas kernels: on TPU/GPU the kernels after a self-check against their references on first
  use per shape, the references otherwise (`pallas_kernels.checks` are those self-checks, also what
  `python -m jaxaccel.bench kernels` runs).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from jaxaccel.model.options import DENSE, AttentionPolicy, TokenSelectAttention, TreeKernelAttention
from jaxaccel.pallas_kernels.checks import warn_once as _warn_once

# ----------------------------------------------------------------------------- XLA options


def compiler_options(backend: str | None = None) -> dict:
    """XLA options for the decode loop. CPU: region-based copy insertion lets the KV cache be
    updated in place inside the while loop; the default inserts two full copies of every
    layer's cache per step (measured: 32 copies/step on the 40M model)."""
    if (backend or jax.default_backend()) == "cpu":
        return {"xla_cpu_copy_insertion_use_region_analysis": True}
    return {}


# ----------------------------------------------------------------------------- forward defaults


def forward_defaults(backend: str | None = None) -> dict:
    """Keyword arguments every decode-time forward of a model gets on this backend. CPU:
    tied-embedding logits of T > 1 calls (tree verification) as table @ x.T kept in
    [vocab, b*T] layout — faster than x @ table.T for 3-16 rows on XLA's CPU dot
    (microbenchmark)."""
    if (backend or jax.default_backend()) == "cpu":
        return {"vocab_major_logits": True}
    return {}


# ----------------------------------------------------------------------------- Token Recycling

PAPER_WIDTHS = (8, 21, 25, 15, 8, 3)

# Recycling's "auto" template per backend. CPU: one of the two fastest templates on the
# default model in two runs of the template sweep ([1, 1, 1] and [2, 1, 1], within noise of
# each other; the chain is the cheaper to verify). Accelerators verify a tree at about the
# cost of one token (memory-bound), so they take the paper's tree.
RECYCLING_WIDTHS = {"cpu": (1, 1, 1), "gpu": PAPER_WIDTHS, "tpu": PAPER_WIDTHS}
# A tree step's time over a plain step's for the auto template, per batch size, measured
# alongside it; with "auto", a batch whose expected tokens per tree step fall below this
# steps autoregressively (tree.TreeMethod.fallback_cost). Accelerators: not measured yet.
RECYCLING_COST = {"cpu": {1: 1.5, 4: 2.05}}


def recycling_widths(backend: str | None = None) -> tuple[int, ...]:
    return RECYCLING_WIDTHS.get(backend or jax.default_backend(), PAPER_WIDTHS)


def recycling_cost(backend: str | None = None) -> dict[int, float] | None:
    return RECYCLING_COST.get(backend or jax.default_backend())


# ----------------------------------------------------------------------------- draft-model cost model

# A verification forward over n tokens (batch x nodes) relative to a one-token step, batch 1.
# CPU: measured on the default model with a 512-token prefix (docs/BENCHMARKS.md,
# "Verification forward cost"): XLA's CPU dot turns compute-bound after a handful of rows.
# Accelerators: not measured here (no GPU/TPU lent); a memory-bound forward of an LLM costs
# about the same for up to a few hundred tokens, which this curve assumes — a prediction.
VERIFY_COST = {"cpu": {1: 1.0, 4: 1.16, 8: 1.45, 16: 2.23, 32: 3.68, 64: 6.51, 81: 8.02}}
ACCELERATOR_VERIFY_COST = {1: 1.0, 64: 1.05, 128: 1.15, 256: 1.4, 512: 2.0}
# A draft forward's time over a target step when the draft's FLOPs are negligible: fixed
# per-call costs. CPU: inside the decode step a draft forward of builtin:draft (0.9M) costs
# ~0.33 of a builtin:default (8M) step (sps with budget 3 against a 4-node chain with no
# drafting, same process; standalone the draft decodes at 0.12x the target's step time —
# inside the step its forwards cost more).
DRAFT_COST_FLOOR = {"cpu": 0.33}
# A tree step's fixed cost beyond its verification forward (verification logic, KV
# compaction, commit), relative to a plain step. CPU: a 4-node chain step costs 1.76x a
# plain step where its forward alone costs 1.16x.
TREE_STEP_OVERHEAD = {"cpu": 0.6}


def verify_cost(tokens: float, curve: dict[int, float] | None = None, backend: str | None = None) -> float:
    """A forward over `tokens` new tokens relative to a one-token forward (interpolated in
    log2 of the width; extrapolated linearly past the last point)."""
    curve = curve or VERIFY_COST.get(backend or jax.default_backend(), ACCELERATOR_VERIFY_COST)
    xs, ys = zip(*sorted(curve.items()))
    if tokens >= xs[-1]:
        return ys[-1] * tokens / xs[-1] if len(xs) > 1 and ys[-1] > 1.5 else ys[-1]
    return float(np.interp(np.log2(max(tokens, 1)), np.log2(xs), ys))


def draft_cost_ratio(draft_params: int, target_params: int, backend: str | None = None) -> float:
    """A draft forward's time over a target forward of the same width: the parameter ratio
    (FLOPs and bytes) with the backend's per-call floor."""
    return max(DRAFT_COST_FLOOR.get(backend or jax.default_backend(), 0.0), draft_params / max(target_params, 1))


class DraftPlan(NamedTuple):
    budget: int
    pops_per_round: int
    expected_tokens: float  # per step (tree value from the acceptance vector)
    step_cost: float  # relative to a plain autoregressive step
    speedup: float  # predicted: expected_tokens / step_cost


def step_cost(budget: int, pops: int, batch: int, draft_ratio: float, curve: dict[int, float] | None = None,
              backend: str | None = None, overhead: float | None = None) -> float:
    """A DySpec step (catch-up, ceil(budget / pops) - 1 draft forwards of `pops` nodes, one
    verification of budget + 1 nodes, the tree step's fixed `overhead`) relative to a plain
    step, per the cost curve. Budget 0 is a plain step."""
    if budget == 0:
        return 1.0
    if overhead is None:
        overhead = TREE_STEP_OVERHEAD.get(backend or jax.default_backend(), 0.0) if curve is None else 0.0
    cost = lambda width: verify_cost(width * batch, curve, backend) / verify_cost(batch, curve, backend)  # noqa: E731
    rounds = -(-budget // pops)
    return cost(budget + 1) + overhead + draft_ratio * (cost(2) + (rounds - 1) * cost(pops))


def plan_draft_budget(value: Callable[[int, int], float], batch: int, draft_ratio: float,
                      curve: dict[int, float] | None = None, backend: str | None = None, max_budget: int = 128,
                      pops_choices: Sequence[int] | None = None, overhead: float | None = None,
                      max_pops: int | None = None) -> DraftPlan:
    """The (budget, pops_per_round) with the best predicted speedup. value(n, depth): expected
    tokens per step of the best tree of n drafted nodes no deeper than `depth` (a tree grown
    in r rounds is at most r deep; `sequoia.tree_value_curve`). Budget 0 (no drafting: plain
    steps, speedup 1) wins when no tree is predicted to pay. max_pops: the most pops a round
    may make (a heap's max_children: its first round grows the root's children only)."""
    best = DraftPlan(0, 0, 1.0, 1.0, 1.0)
    for budget in range(1, max_budget + 1):
        for pops in sorted(set(pops_choices or (1, 2, 4, 8, 16, budget))):
            if pops > budget or (max_pops is not None and pops > max_pops):
                continue
            c = step_cost(budget, pops, batch, draft_ratio, curve, backend, overhead)
            tokens = value(budget, -(-budget // pops))
            plan = DraftPlan(budget, pops, tokens, c, tokens / c)
            if plan.speedup > best.speedup:
                best = plan
    return best


# ----------------------------------------------------------------------------- tree attention


def kernel_constraints(head_dim: int, block_k: int, backend: str, cache_len: int | None = None) -> str | None:
    """Why the tree kernel cannot run with these sizes on `backend`, or None (as the kernel's
    own checks: block_k a multiple of 8, or the whole cache of at least 8 slots)."""
    pow2 = lambda n: n > 0 and n & (n - 1) == 0  # noqa: E731
    if block_k % 8 and (block_k != cache_len or block_k < 8):
        return f"block_k={block_k} is not a multiple of 8" + (" nor the whole cache of >= 8 slots"
                                                             if cache_len is not None else "")
    if backend == "gpu":  # Triton: power-of-two sizes, >= 16 for tl.dot
        if not pow2(head_dim) or head_dim < 16:
            return f"head_dim={head_dim} is not a power of two >= 16 (Triton)"
        if not pow2(block_k) or block_k < 16:
            return f"block_k={block_k} is not a power of two >= 16 (Triton)"
    return None


@functools.lru_cache(maxsize=None)
def _kernel_checked(backend: str, nodes: int, heads: int, kv_heads: int, head_dim: int, dtype: str,
                    block_k: int, interpret: bool, cache_len: int) -> str | None:
    """Run the tree kernel once on random inputs of this shape and compare it with the
    reference (`pallas_kernels.checks`) -> None when they agree, else the reason (a failed
    compile included). `backend` only keys the cache."""
    from jaxaccel.pallas_kernels import checks

    case = checks.tree_attention_case(nodes=nodes, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                      cache_len=cache_len, dtype=dtype, block_k=block_k, interpret=interpret)
    return checks.compare(case).problem


def tree_attention_policy(config, nodes: int, cache_len: int, *, sharded: bool, backend: str | None = None,
                          interpret: bool = False) -> AttentionPolicy:
    """The attention a tree-verification forward runs. TPU/GPU (or `interpret`): the Pallas
    kernel, once it has matched the reference on this shape (checked on first use; a
    mismatch, a failed compile or an unsupported size falls back to the reference with a
    one-line warning). CPU or a device mesh (Pallas calls are not auto-partitioned): the
    reference."""
    backend = backend or jax.default_backend()
    if sharded or not (interpret or backend in ("tpu", "gpu")):
        return DENSE
    from jaxaccel.pallas_kernels.tree_attention import default_block_k

    block_k = default_block_k(cache_len)
    reason = kernel_constraints(config.resolved_head_dim, block_k, "interpret" if interpret else backend, cache_len)
    if reason is None:
        reason = _kernel_checked(backend, nodes, config.n_heads, config.n_kv_heads, config.resolved_head_dim,
                                 config.dtype, block_k, interpret, cache_len)
    if reason is not None:
        _warn_once(f"tree attention: {reason}; using the jnp reference for {nodes}-node trees")
        return DENSE
    return TreeKernelAttention(interpret=interpret, block_k=block_k)


@functools.lru_cache(maxsize=None)
def _token_select_checked(backend: str, heads: int, kv_heads: int, head_dim: int, dtype: str, cache_len: int,
                          selected: int, positions: str, interpret: bool, rope_theta: float = 10000.0,
                          rope_scaling=None, gather: str | None = None) -> str | None:
    """Run TokenSelect's two kernels (scoring, sparse attention with the model's RoPE) once on
    random inputs of this shape and compare them with their references -> None when both
    agree, else the reason. The backend's block-size and head_dim constraints fail here
    too, as a reason."""
    from jaxaccel.model.layers import rope_inv_freq
    from jaxaccel.pallas_kernels import checks
    from jaxaccel.pallas_kernels import token_select as ts

    platform = "interpret" if interpret else backend
    try:
        ts._check_block("block_k", ts.default_block_k(cache_len, platform), platform, head_dim, 16)
        ts._check_block("block_k", ts.default_block_k(selected, platform), platform, head_dim, 32)
    except ValueError as e:
        return str(e)
    shape = dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, cache_len=cache_len, dtype=dtype,
                 interpret=interpret)
    inv_freq = tuple(rope_inv_freq(head_dim, rope_theta, rope_scaling).tolist())
    for case in (checks.score_keys_case(**shape),
                 checks.sparse_attention_case(selected=min(selected, cache_len), positions=positions,
                                              rope_inv_freq=inv_freq, gather=gather, **shape)):
        problem = checks.compare(case).problem
        if problem is not None:
            return f"{case.kernel_name}: {problem}"
    return None


def token_select_policy(policy: TokenSelectAttention, config, cache_len: int, *, sharded: bool,
                        backend: str | None = None) -> TokenSelectAttention:
    """`policy` with `use_kernel` decided when the caller left it None: TokenSelect's Pallas
    kernels on TPU/GPU (or `interpret`) once they matched their references on this shape
    (checked on first use; a mismatch, a failed compile or an unsupported size falls back to
    the references with a one-line warning — on TPU, a DMA-gather kernel that fails falls
    back to the XLA-gather kernel first, if that one passes), the references on CPU or a
    device mesh (Pallas calls are not auto-partitioned)."""
    if policy.use_kernel is not None:
        return policy
    backend = backend or jax.default_backend()
    if sharded or not (policy.interpret or backend in ("tpu", "gpu")) or cache_len <= policy.budget:
        # (a cache within the budget is attended in full: the kernels would never run)
        return dataclasses.replace(policy, use_kernel=False)
    def problem(gather):
        return _token_select_checked(backend, config.n_heads, config.n_kv_heads, config.resolved_head_dim,
                                     config.dtype, cache_len, policy.budget, policy.positions, policy.interpret,
                                     config.rope_theta, config.rope_scaling, gather)

    from jaxaccel.pallas_kernels.token_select import default_gather

    gather = policy.gather or default_gather("interpret" if policy.interpret else backend)
    reason = problem(gather)
    if reason is not None and gather == "dma" and problem("xla") is None:
        # the DMA gather has never run on a TPU: the XLA gather's kernel is the next best
        _warn_once(f"tokenselect: {reason}; using the kernels with gather='xla'")
        return dataclasses.replace(policy, use_kernel=True, gather="xla")
    if reason is not None:
        _warn_once(f"tokenselect: {reason}; using the jnp references")
        return dataclasses.replace(policy, use_kernel=False)
    return dataclasses.replace(policy, use_kernel=True, gather=gather)


def resolve_forward_defaults(defaults: dict[str, Any], config, cache_len: int, *, sharded: bool) -> dict[str, Any]:
    """A method's forward defaults with backend choices left open made (`token_select_policy`)."""
    policy = defaults.get("attention")
    if isinstance(policy, TokenSelectAttention):
        return {**defaults, "attention": token_select_policy(policy, config, cache_len, sharded=sharded)}
    return defaults


