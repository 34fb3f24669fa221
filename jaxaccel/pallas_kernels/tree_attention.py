"""Tree attention: T tree-node queries over a committed cache prefix plus the tree itself.

Every query of batch row b sees the cache slots [0, prefix_len[b]) and the tree nodes its row
of `tree_mask` allows (its ancestors and itself). This is the attention of one tree-speculative
decoding step; `tree_attention_reference` defines it (via `jaxaccel.pallas_kernels.ops.attend`,
the project's single attention reference) and `tree_attention_kernel` is a Pallas kernel for it.

Kernel design: grid (batch, kv_head). One program holds the q rows of one KV group
([g*T, d], g = heads // kv_heads, so grouped query heads share every K/V load), runs a float32
online (flash) softmax over the cache in blocks of `block_k` keys -- only the
ceil(prefix_len[b] / block_k) blocks that hold visible slots are visited, the last one masked
per slot -- then folds in the T tree keys under the tree mask, and normalises once. Masked
scores are MASKED_SCORE (finite) and the running max starts at MASKED_SCORE, so a query row
that sees nothing (a padded node with an empty mask row and prefix 0) gets a finite uniform
average over the keys the kernel visited (the reference averages over all S + T keys; only
such rows differ).

Backends (checked against the installed jax 0.10.2 and the current Pallas docs):
* TPU: `pallas_call` lowers through Mosaic TPU. prefix_len is placed in SMEM; the q / K / V
  blocks cover whole trailing dims (rows padded to a power of two >= 16) so they satisfy the
  (8, 128) tiling rule. The whole [S, d] cache row of a (batch, kv_head) is one VMEM block, so
  very long caches need a smaller S or a grid axis over S (not done here).
* GPU: the docs now describe Mosaic GPU (Hopper+) as the Pallas GPU backend, and in jax 0.10
  `pallas_call` defaults to it (flag `jax_pallas_use_mosaic_gpu`, with `pl.pallas_call` for
  Mosaic GPU deprecated in favour of `plgpu.kernel`); Triton remains as a best-effort backend
  (Ampere+). This kernel is written in the portable Ref/BlockSpec style, not Mosaic GPU's
  warpgroup style, so on GPU it passes Triton compiler params to select the Triton lowering.
  Triton needs power-of-two array sizes: rows and T are padded to powers of two here, while
  head_dim and block_k must be powers of two (>= 16 for tl.dot) by the caller.
* CPU: no compiled Pallas path. `use_kernel=None` runs the reference; `interpret=True` runs
  the kernel through the Pallas interpreter (that is what the tests exercise).
Both hardware lowerings are produced from a CPU host (`jax.jit(...).trace(...).lower(
lowering_platforms=('tpu',))` resp. `('cuda',)` succeed for small and 512-slot caches), but
neither has been compiled by libtpu / Triton or run on hardware; the tests are CPU-only.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxaccel.pallas_kernels.ops import MASKED_SCORE, attend


def tree_attention_reference(q, k_new, v_new, tree_mask, k_cache, v_cache, prefix_len) -> jax.Array:
    """Pure-jnp tree attention: `attend` with cache_visible[b, t, s] = s < prefix_len[b].

    Shapes as in `tree_attention`; returns [b, T, heads, d] in v_new.dtype."""
    b, t = q.shape[:2]
    s = k_cache.shape[2]
    new_visible = jnp.broadcast_to(tree_mask, (b, t, t))
    cache_visible = jnp.broadcast_to(
        jnp.arange(s, dtype=jnp.int32)[None, None, :] < prefix_len.astype(jnp.int32)[:, None, None], (b, t, s))
    return attend(q, k_new, v_new, new_visible, k_cache, v_cache, cache_visible)


def _online_update(carry, q, k, v, visible, v_dtype):
    """Fold one block of keys (k, v [n, d]; visible [rows, n]) into the running softmax."""
    m, l, acc = carry
    s = lax.dot_general(q, k.astype(q.dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    s = jnp.where(visible, s, MASKED_SCORE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new)
    l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    pv = lax.dot_general(p.astype(v_dtype), v.astype(v_dtype), (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)
    return m_new, l, alpha * acc + pv


def _kernel(plen_ref, q_ref, kc_ref, vc_ref, kn_ref, vn_ref, mask_ref, o_ref, *, block_k: int):
    q = q_ref[...]  # [rows, d]: the g query heads x T queries of this KV group
    rows, d = q.shape
    v_dtype = o_ref.dtype
    plen = plen_ref[pl.program_id(0)]
    carry = (jnp.full((rows, 1), MASKED_SCORE, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
             jnp.zeros((rows, d), jnp.float32))

    def cache_block(i, carry):
        start = pl.multiple_of(i * block_k, block_k)
        k = kc_ref[pl.ds(start, block_k), :]
        v = vc_ref[pl.ds(start, block_k), :]
        slot = start + lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
        return _online_update(carry, q, k, v, slot < plen, v_dtype)

    # Only blocks holding visible slots; blocks at or beyond prefix_len are never touched.
    carry = lax.fori_loop(0, lax.div(plen + (block_k - 1), block_k), cache_block, carry)  # plen >= 0
    _, l, acc = _online_update(carry, q, kn_ref[...], vn_ref[...], mask_ref[...] != 0, v_dtype)
    o_ref[...] = (acc / l).astype(o_ref.dtype)


def default_block_k(cache_len: int) -> int:
    """The largest of 128, 64, ..., 8 dividing the cache length (else the whole cache)."""
    return next(bk for bk in (128, 64, 32, 16, 8, cache_len) if cache_len % bk == 0)


def _pow2_at_least(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def _pad_axis(x, axis: int, size: int):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


@functools.partial(jax.jit, static_argnames=("block_k", "interpret"))
def tree_attention_kernel(q, k_new, v_new, tree_mask, k_cache, v_cache, prefix_len, *, block_k: int = 128,
                          interpret: bool = False) -> jax.Array:
    """Pallas tree attention (see the module docstring); shapes as in `tree_attention`.

    S is zero-padded to a multiple of `block_k` here (a copy of the cache: prefer S % block_k
    == 0). prefix_len is clamped to [0, S]."""
    b, t, h, d = q.shape
    kvh = k_new.shape[2]
    if h % kvh:
        raise ValueError(f"heads ({h}) must be a multiple of kv_heads ({kvh})")
    if block_k <= 0 or block_k % 8:
        raise ValueError(f"block_k must be a positive multiple of 8, got {block_k}")
    g = h // kvh
    s = k_cache.shape[2]
    rows = g * t
    rows_p = _pow2_at_least(rows, 16)
    t_p = _pow2_at_least(t, 16)
    s_p = max(1, pl.cdiv(s, block_k)) * block_k
    bm = tree_mask.shape[0]

    # Query heads of one KV group become rows: [b, kvh, g*T, d], row = head_in_group * T + t.
    qg = _pad_axis(q.reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, rows, d), 2, rows_p)
    kn = _pad_axis(k_new.transpose(0, 2, 1, 3), 2, t_p)
    vn = _pad_axis(v_new.transpose(0, 2, 1, 3), 2, t_p)
    kc = _pad_axis(k_cache, 2, s_p)
    vc = _pad_axis(v_cache, 2, s_p)
    mask = jnp.tile(tree_mask.astype(jnp.int32), (1, g, 1))  # [bm, g*T, T], int32: no i1 memrefs
    mask = _pad_axis(_pad_axis(mask, 1, rows_p), 2, t_p)
    plen = jnp.clip(prefix_len.astype(jnp.int32), 0, s)

    platform = "interpret" if interpret else jax.default_backend()
    compiler_params = None
    plen_spec = pl.BlockSpec()  # the whole [b] vector; the kernel indexes it by program_id(0)
    if platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        plen_spec = pl.BlockSpec(memory_space=pltpu.SMEM)
        compiler_params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
    elif platform == "gpu":
        from jax.experimental.pallas import triton as pltriton

        compiler_params = pltriton.CompilerParams()

    def row_block(n):
        return pl.BlockSpec((None, None, n, d), lambda bi, hi: (bi, hi, 0, 0))

    mask_spec = pl.BlockSpec((None, rows_p, t_p),
                             (lambda bi, hi: (bi, 0, 0)) if bm > 1 else (lambda bi, hi: (0, 0, 0)))
    out = pl.pallas_call(
        functools.partial(_kernel, block_k=block_k),
        out_shape=jax.ShapeDtypeStruct((b, kvh, rows_p, d), v_new.dtype),
        grid=(b, kvh),
        in_specs=[plen_spec, row_block(rows_p), row_block(s_p), row_block(s_p), row_block(t_p), row_block(t_p),
                  mask_spec],
        out_specs=row_block(rows_p),
        interpret=interpret,
        compiler_params=compiler_params,
        name="tree_attention",
    )(plen, qg, kc, vc, kn, vn, mask)
    out = out[:, :, :rows].reshape(b, kvh, g, t, d)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def tree_attention(q, k_new, v_new, tree_mask, k_cache, v_cache, prefix_len, *, block_k: int = 128,
                   interpret: bool = False, use_kernel: bool | None = None) -> jax.Array:
    """q [b, T, heads, d] (already scaled by 1/sqrt(d)); k_new, v_new [b, T, kv_heads, d] (the tree
    nodes' own keys/values); tree_mask [b or 1, T, T] bool (query i sees new key j: the ancestor
    mask); k_cache, v_cache [b, kv_heads, S, d]; prefix_len [b] int32: cache slots [0, prefix_len)
    are visible to every query. Returns [b, T, heads, d] in v_new.dtype.
    use_kernel None -> kernel on TPU/GPU, reference on CPU; interpret=True runs the Pallas kernel
    in interpret mode (any backend, used by tests on CPU)."""
    if use_kernel is None:
        use_kernel = interpret or jax.default_backend() in ("tpu", "gpu")
    if not use_kernel:
        return tree_attention_reference(q, k_new, v_new, tree_mask, k_cache, v_cache, prefix_len)
    return tree_attention_kernel(q, k_new, v_new, tree_mask, k_cache, v_cache, prefix_len, block_k=block_k,
                                 interpret=interpret)
