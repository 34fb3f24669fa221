"""Backend tuning of the decode side, in one place: every choice here was measured on a
backend (the reference CPU: 2 cores, docs/BENCHMARKS.md) and is a lookup keyed by
`jax.default_backend()`, so model code and the methods never branch on the backend.

* XLA compiler options for the decode loop;
* forward defaults a `ModelHandle` carries (the tied-embedding logits layout);
* Token Recycling's `"auto"` template and its fallback cost table;
* which tree-attention implementation verification runs: the Pallas kernel on TPU/GPU after
  a self-check against the reference on first use per shape, the reference otherwise.
"""
from __future__ import annotations

import functools
import sys

import jax
import numpy as np

from jaxaccel.model.options import DENSE, AttentionPolicy, TreeKernelAttention

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


# ----------------------------------------------------------------------------- tree attention


def kernel_constraints(head_dim: int, block_k: int, backend: str) -> str | None:
    """Why the tree kernel cannot run with these sizes on `backend`, or None."""
    pow2 = lambda n: n > 0 and n & (n - 1) == 0  # noqa: E731
    if block_k % 8:
        return f"block_k={block_k} is not a multiple of 8"
    if backend == "gpu":  # Triton: power-of-two sizes, >= 16 for tl.dot
        if not pow2(head_dim) or head_dim < 16:
            return f"head_dim={head_dim} is not a power of two >= 16 (Triton)"
        if not pow2(block_k) or block_k < 16:
            return f"block_k={block_k} is not a power of two >= 16 (Triton)"
    return None


@functools.lru_cache(maxsize=None)
def _kernel_checked(backend: str, nodes: int, heads: int, kv_heads: int, head_dim: int, dtype: str,
                    block_k: int, interpret: bool, cache_len: int) -> str | None:
    """Run the kernel once on random inputs of this shape (one batch row: the kernel's grid
    runs rows independently) and compare it with the reference -> None when they agree,
    else the reason (a failed compile included)."""
    from jaxaccel.pallas_kernels.tree_attention import tree_attention_kernel, tree_attention_reference

    rng = np.random.default_rng(0)
    np_dtype = jax.numpy.dtype(dtype)  # bfloat16 through ml_dtypes
    q = rng.standard_normal((1, nodes, heads, head_dim)).astype(np_dtype) * head_dim ** -0.5
    kn, vn = (rng.standard_normal((1, nodes, kv_heads, head_dim)).astype(np_dtype) for _ in range(2))
    kc, vc = (rng.standard_normal((1, kv_heads, cache_len, head_dim)).astype(np_dtype) for _ in range(2))
    mask = np.tril(np.ones((1, nodes, nodes), bool))
    plen = np.asarray([max(0, cache_len - nodes - 3)], np.int32)  # a prefix ending inside a block
    try:
        got = np.asarray(tree_attention_kernel(q, kn, vn, mask, kc, vc, plen, block_k=block_k, interpret=interpret),
                         np.float32)
    except Exception as e:  # a kernel that fails to lower/compile on this hardware
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"the kernel failed to compile or run ({type(e).__name__}: {first[:200]})"
    want = np.asarray(tree_attention_reference(q, kn, vn, mask, kc, vc, plen), np.float32)
    tol = 1e-4 if dtype == "float32" else 3e-2
    err = float(np.max(np.abs(got - want)))
    if not np.isfinite(err) or err > tol:
        return f"the kernel differs from the reference by {err:.3g} (tolerance {tol})"
    return None


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
    reason = kernel_constraints(config.resolved_head_dim, block_k, "interpret" if interpret else backend)
    if reason is None:
        reason = _kernel_checked(backend, nodes, config.n_heads, config.n_kv_heads, config.resolved_head_dim,
                                 config.dtype, block_k, interpret, cache_len)
    if reason is not None:
        _warn_once(f"tree attention: {reason}; using the jnp reference for {nodes}-node trees")
        return DENSE
    return TreeKernelAttention(interpret=interpret, block_k=block_k)


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
