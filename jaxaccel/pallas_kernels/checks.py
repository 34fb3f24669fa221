"""Self-checks of the Pallas kernels against their pure-jnp references, on random inputs of a
given shape: what the decode engine runs on first use of a kernel per shape on TPU/GPU
(`jaxaccel.decode.tuning`: a kernel that fails to compile or differs from its reference is
not used) and the trainer on first use of the splash kernel per shape on one TPU
(`jaxaccel.train.step.training_attention`), and what `python -m jaxaccel.bench kernels` runs and times over a grid of shapes.

A `KernelCase` is one kernel call and its reference on the same arguments (both jitted, so
they can also be timed); `compare` runs both at full float32 matmul precision (Triton's
default for float32 dots is TF32, ~1e-3 relative: precision, not a bug) and says whether
they agree: |kernel - reference| <= atol + rtol * max|reference|. Float32 outputs (the
scores, whatever the inputs): 1e-5 + 1e-4 relative; bfloat16 / float16 outputs: one rounding
step of the output or so (2^-6 / 2^-8 relative, 1e-4 absolute). The scale is the output's own
(attention outputs over thousands of keys are ~0.1, not ~1), so a kernel that drops a few
keys or ignores a mask fails.

A leaf of the kernels package like the kernels themselves: no model or decode imports.
"""
from __future__ import annotations

import functools
import sys
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.errors import first_line

# (atol, rtol) by the dtype of the compared output
TOLERANCE = {"float32": (1e-5, 1e-4), "bfloat16": (1e-4, 2.0 ** -6), "float16": (1e-4, 2.0 ** -8)}


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    """One `warning: ...` line on stderr per distinct message: what a caller that falls back
    from a kernel (the decode engine's tuning, the trainer) says, once per process."""
    print(f"warning: {message}", file=sys.stderr)


def tolerance(output_dtype: str) -> tuple[float, float]:
    return TOLERANCE.get(output_dtype, TOLERANCE["bfloat16"])


class KernelCase(NamedTuple):
    kernel_name: str  # "tree_attention", "score_keys", "sparse_attention", "splash_attention(_grad)"
    shape: dict[str, Any]  # what the report shows: the sizes that define the case
    dtype: str  # of the inputs
    kernel: Callable  # jitted: kernel(*args)
    reference: Callable  # jitted: reference(*args)
    args: tuple
    tolerance: tuple[float, float]  # (atol, rtol) of the output's dtype, see the module docstring


class Comparison(NamedTuple):
    error: float | None  # max |kernel - reference| (None when the kernel did not run)
    problem: str | None  # None when they agree, else one line saying why not
    allowed: float | None = None  # the largest difference accepted for this output


def compare(case: KernelCase) -> Comparison:
    """Run kernel and reference on the case's arguments at full float32 matmul precision ->
    the largest absolute difference and None, or the reason they disagree (a kernel that
    fails to lower, compile or run included: that is what an untested backend does first;
    a crash of the process itself, e.g. a compiler abort, cannot be caught here)."""
    with jax.default_matmul_precision("highest"):
        try:
            got = np.asarray(jax.block_until_ready(case.kernel(*case.args)), np.float32)
        except Exception as e:  # noqa: BLE001 - any failure of the kernel is the finding
            return Comparison(None, f"the kernel failed to compile or run ({type(e).__name__}: {first_line(e, 200)})")
        try:
            want = np.asarray(jax.block_until_ready(case.reference(*case.args)), np.float32)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at a size the kernel handles
            return Comparison(None, f"the reference failed ({type(e).__name__}: {first_line(e, 200)})")
    if got.shape != want.shape:
        return Comparison(None, f"the kernel returned shape {got.shape}, the reference {want.shape}")
    atol, rtol = case.tolerance
    allowed = atol + rtol * (float(np.max(np.abs(want))) if want.size else 0.0)
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    if not np.isfinite(err) or err > allowed:
        return Comparison(err, f"the kernel differs from the reference by {err:.3g} (allowed {allowed:.3g})", allowed)
    return Comparison(err, None, allowed)


class _Normals:
    """Standard normal arrays drawn on the device (a 128K-slot cache is ~10^9 numbers: too
    slow to draw on the host), a fresh key per array."""

    def __init__(self, seed: int):
        self._key = jax.random.key(seed)

    def __call__(self, shape, dtype: str, scale: float = 1.0) -> jax.Array:
        self._key, key = jax.random.split(self._key)
        return (scale * jax.random.normal(key, shape, jnp.float32)).astype(jnp.dtype(dtype))


def random_tree_mask(rng: np.random.Generator, nodes: int) -> np.ndarray:
    """[nodes, nodes] ancestor-or-self mask of a random tree rooted at node 0 (parents precede
    children, as the decode engine lays trees out)."""
    mask = np.eye(nodes, dtype=bool)
    for i in range(1, nodes):
        parent = int(rng.integers(0, i))
        mask[i] |= mask[parent]
    return mask


def tree_attention_case(*, nodes: int, heads: int, kv_heads: int, head_dim: int, cache_len: int, dtype: str,
                        batch: int = 2, block_k: int | None = None, interpret: bool = False,
                        seed: int = 0) -> KernelCase:
    """Tree verification: `nodes` new tokens with a random ancestor mask per row over a cache
    whose committed prefix ends inside a key block (row 0) and at a third of it (row 1...)."""
    from jaxaccel.pallas_kernels.tree_attention import tree_attention_kernel, tree_attention_reference

    rng, normal = np.random.default_rng(seed), _Normals(seed)
    q = normal((batch, nodes, heads, head_dim), dtype, head_dim ** -0.5)
    k_new, v_new = (normal((batch, nodes, kv_heads, head_dim), dtype) for _ in range(2))
    k_cache, v_cache = (normal((batch, kv_heads, cache_len, head_dim), dtype) for _ in range(2))
    mask = jnp.asarray(np.stack([random_tree_mask(rng, nodes) for _ in range(batch)]))
    prefix = [max(0, cache_len - nodes - 3)] + [cache_len // (3 + i) + 1 for i in range(batch - 1)]
    prefix_len = jnp.asarray(prefix[:batch], jnp.int32)
    kernel = jax.jit(functools.partial(tree_attention_kernel, block_k=block_k, interpret=interpret))
    return KernelCase("tree_attention", dict(batch=batch, nodes=nodes, heads=heads, kv_heads=kv_heads,
                                             head_dim=head_dim, cache_len=cache_len, block_k=block_k),
                      dtype, kernel, jax.jit(tree_attention_reference),
                      (q, k_new, v_new, mask, k_cache, v_cache, prefix_len), tolerance(dtype))


def _select_lengths(batch: int, cache_len: int) -> jax.Array:
    """Ragged scoring lengths: a row ending inside the last key block, then shorter ones."""
    return jnp.asarray([max(1, cache_len - 3)] + [max(1, cache_len // (2 + i) + 5) for i in range(batch - 1)],
                       jnp.int32)


def score_keys_case(*, heads: int, kv_heads: int, head_dim: int, cache_len: int, dtype: str, batch: int = 2,
                    n_init: int = 4, n_local: int = 16, block_k: int | None = None, interpret: bool = False,
                    seed: int = 0) -> KernelCase:
    """TokenSelect's soft-vote scoring of every cached key for one query per row, candidates
    between the init and local windows (as decoding calls it)."""
    from jaxaccel.pallas_kernels import token_select as ts

    normal = _Normals(seed)
    q = normal((batch, heads, head_dim), dtype)
    k = normal((batch, kv_heads, cache_len, head_dim), dtype)
    lengths = _select_lengths(batch, cache_len)
    candidates = ts.selection_candidates(lengths, cache_len, n_init=n_init, n_local=n_local)
    kernel = jax.jit(lambda q, k, lengths, mask: ts.score_keys_kernel(q, k, lengths, candidate_mask=mask,
                                                                       block_k=block_k, interpret=interpret))
    reference = jax.jit(lambda q, k, lengths, mask: ts.score_keys_reference(q, k, lengths, candidate_mask=mask))
    return KernelCase("score_keys", dict(batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                         cache_len=cache_len, block_k=block_k),
                      dtype, kernel, reference, (q, k, lengths, candidates), tolerance("float32"))


def sparse_attention_case(*, heads: int, kv_heads: int, head_dim: int, cache_len: int, selected: int, dtype: str,
                          positions: str = "compact", batch: int = 2, block_k: int | None = None,
                          gather: str | None = None, rope_theta: float = 10000.0,
                          rope_inv_freq: tuple[float, ...] | None = None, interpret: bool = False,
                          seed: int = 0) -> KernelCase:
    """TokenSelect's attention of one query per row over `selected` cache slots plus its own
    key, RoPE in the kernel. Row 0 is long (`selected` random slots, ascending); row 1 (with
    batch > 1) is shorter than the budget, so it selects every valid slot and masks the rest,
    as decoding does for a short row."""
    from jaxaccel.pallas_kernels import token_select as ts

    rng, normal = np.random.default_rng(seed), _Normals(seed)
    q = normal((batch, heads, head_dim), dtype, head_dim ** -0.5)
    k, v = (normal((batch, kv_heads, cache_len, head_dim), dtype) for _ in range(2))
    k_new, v_new = (normal((batch, kv_heads, head_dim), dtype) for _ in range(2))
    lengths = [max(1, cache_len - 3)] + [max(1, min(cache_len, selected // (2 + i))) for i in range(batch - 1)]
    indices, valid = [], []
    for length in lengths:
        n = min(selected, length)
        slots = np.sort(rng.choice(length, size=n, replace=False)) if n < length else np.arange(n)
        indices.append(np.concatenate([slots, np.full(selected - n, max(length - 1, 0))]))
        valid.append(np.arange(selected) < n)
    indices, valid = jnp.asarray(np.stack(indices), jnp.int32), jnp.asarray(np.stack(valid))
    lengths = jnp.asarray(lengths, jnp.int32)
    options = dict(positions=positions, rope_theta=rope_theta,
                   rope_inv_freq=None if rope_inv_freq is None else np.asarray(rope_inv_freq, np.float32))
    kernel = jax.jit(lambda *a: ts.sparse_attention_kernel(*a[:6], k_new=a[6], v_new=a[7], block_k=block_k,
                                                           gather=gather, interpret=interpret, **options))
    reference = jax.jit(lambda *a: ts.sparse_attention_reference(*a[:6], k_new=a[6], v_new=a[7], **options))
    return KernelCase("sparse_attention", dict(batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                               cache_len=cache_len, selected=selected, positions=positions,
                                               block_k=block_k, gather=gather),
                      dtype, kernel, reference, (q, k, v, indices, valid, lengths, k_new, v_new), tolerance(dtype))


def splash_attention_case(*, seq_len: int, heads: int, kv_heads: int, head_dim: int, dtype: str, batch: int = 2,
                          block: int = 128, interpret: bool = False, seed: int = 0, grad: bool = False) -> KernelCase:
    """Training attention over packed documents (two segments and trailing padding per row):
    the splash kernel (TPU) against the jnp flash path. grad=False: the outputs; grad=True:
    the gradients of a fixed random projection of the output with respect to q, k and v,
    joined into one flat vector (the backward pass is a kernel of its own)."""
    from jaxaccel.pallas_kernels.flash_attention import flash_attention

    normal = _Normals(seed)
    q = normal((batch, seq_len, heads, head_dim), dtype, head_dim ** -0.5)
    k, v = (normal((batch, seq_len, kv_heads, head_dim), dtype) for _ in range(2))
    cut, pad = seq_len // 3, seq_len - seq_len // 8
    segments = np.where(np.arange(seq_len) < cut, 1, np.where(np.arange(seq_len) < pad, 2, 0))
    segment_ids = jnp.asarray(np.broadcast_to(segments, (batch, seq_len)), jnp.int32)

    cotangent = normal((batch, seq_len, heads, head_dim), "float32")

    def run(implementation):
        def attend(q, k, v, s):
            return flash_attention(q, k, v, s, None, block_q=block, block_k=block, implementation=implementation,
                                   interpret=interpret)

        def grads(q, k, v, s):
            project = lambda q, k, v: jnp.sum(attend(q, k, v, s).astype(jnp.float32) * cotangent)  # noqa: E731
            return jnp.concatenate([g.astype(jnp.float32).ravel()
                                    for g in jax.grad(project, argnums=(0, 1, 2))(q, k, v)])

        return jax.jit(grads if grad else attend)

    return KernelCase("splash_attention_grad" if grad else "splash_attention",
                      dict(batch=batch, seq_len=seq_len, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                           block=block), dtype, run("splash"), run("jnp"), (q, k, v, segment_ids), tolerance(dtype))
