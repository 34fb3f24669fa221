"""Tree attention: T tree-node queries over a committed cache prefix plus the tree itself.

Every query of batch row b sees the cache slots [0, prefix_len[b]) and the tree nodes its row
of `tree_mask` allows (its ancestors and itself). This is the attention of one tree-speculative
decoding step; `tree_attention_reference` defines it (via `jaxaccel.pallas_kernels.ops.attend`,
the project's single attention reference) and `tree_attention_kernel` is a Pallas kernel for it.

Kernel design: one program works on one KV group of one batch row: the q rows of the group
([g*T, d], g = heads // kv_heads, so grouped query heads share every K/V load) run a float32
online (flash) softmax over the cache in key blocks of `block_k` slots -- only the
ceil(prefix_len[b] / block_k) blocks that hold visible slots do any work, the last one masked
per slot -- then fold in the T tree keys under the tree mask, and normalise once. How the
cache is tiled depends on the backend:
* "grid" tiling (TPU, and the Pallas interpreter): grid (batch, kv_head, key block), the key
  block axis innermost and sequential ("arbitrary"). The BlockSpecs of K and V cache index the
  cache by that axis, so each step's VMEM holds one [block_k, d] block of K and one of V
  (double-buffered by the Pallas pipeline), whatever the cache length S. The softmax state --
  running max and denominator [rows, 1], accumulator [rows, d], all float32 -- lives in VMEM
  scratch (`pltpu.VMEM` scratch_shapes): set at the first key block, updated by each block
  holding visible slots, and at the last block the tree keys are folded in and the output
  written. prefix_len is scalar-prefetched (SMEM); the K/V index maps clamp the block index to
  the row's last visible block, so blocks past prefix_len[b] are neither fetched again (the
  pipeline skips a copy whose block index did not change) nor computed on (`pl.when`).
* "loop" tiling (GPU, Triton): Triton has no scratch buffers and runs grid programs in
  parallel (no sequential grid axis to carry a softmax state), so the grid is (batch,
  kv_head, row block) and the program loops (`lax.fori_loop`) over the visible key blocks,
  loading one [block_k, d] tile of K and V per step straight from global memory (a Triton
  BlockSpec is a pointer, not a staged copy), then over the tree's keys in blocks of 64: a
  program holds at most 64 query rows, so registers and shared memory depend neither on S
  nor on the tree (a 129-node tree with 4 query heads per KV group is 516 rows).
Per-program memory is therefore O(rows * d + block_k * d + T * d) on TPU and O(64 * d +
block_k * d + 64 * d) on GPU; the cache is never copied or padded (block_k must divide S).

Masked scores are MASKED_SCORE (finite) and masked keys add nothing to the softmax, so a query
row that sees nothing at all (an empty tree-mask row with prefix_len 0; a real tree node
always sees itself) gets 0, as in the reference (`ops.attend`).

Constraints, checked up front (`jaxaccel.errors.InvalidArgumentError`, one line naming the
value and the rule): S >= 1; heads a multiple of kv_heads; 1 <= block_k, S % block_k == 0 and
block_k a multiple of 8 or equal to S (every backend: the TPU rule below, kept everywhere so
the interpreter checks what TPU runs). Per backend:
* TPU (Mosaic): the last two dims of every block must be multiples of (8, 128) or equal to the
  array's. Every block spans the whole head_dim, so any head_dim is legal (a multiple of 128
  fills the lanes; a smaller one pads them); the K/V blocks are [block_k, head_dim], hence the
  block_k rule; q rows are padded to a multiple of 16 and T to a power of two >= 16 here.
* GPU (Triton): array sizes must be powers of two and `tl.dot` needs every dim >= 16, so
  head_dim and block_k must be powers of two >= 16 (rows and T are padded here).

Backends (checked against the installed jax 0.10.2 and the current Pallas docs):
* TPU: `pallas_call` lowers through Mosaic TPU with `pltpu.PrefetchScalarGridSpec` and
  dimension semantics (parallel, parallel, arbitrary).
* GPU: the docs now describe Mosaic GPU (Hopper+) as the Pallas GPU backend, and in jax 0.10
  `pallas_call` defaults to it (flag `jax_pallas_use_mosaic_gpu`, with `pl.pallas_call` for
  Mosaic GPU deprecated in favour of `plgpu.kernel`); Triton remains as a best-effort backend
  (Ampere+). This kernel is written in the portable Ref/BlockSpec style, not Mosaic GPU's
  warpgroup style, so on GPU it passes Triton compiler params to select the Triton lowering.
* CPU: no compiled Pallas path. `use_kernel=None` runs the reference; `interpret=True` runs
  the kernel ("grid" tiling) through Pallas's TPU interpreter (`pltpu.InterpretParams`:
  scalar prefetch into SMEM, the block pipeline, uninitialized scratch read as NaN — what the
  tests exercise; they also run the "loop" body in the generic interpreter).
Both hardware lowerings are produced from a CPU host (`jax.jit(...).trace(...).lower(
lowering_platforms=('tpu',))` resp. `('cuda',)` succeed, a 4096-slot cache included), but
neither has been compiled by libtpu / Triton or run on hardware; the tests are CPU-only.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxaccel.errors import InvalidArgumentError
from jaxaccel.pallas_kernels.ops import MASKED_SCORE, attend

# Triton's tl.dot needs every dimension >= 16; q rows and T are padded to at least this.
_MIN_ROWS = 16
# The "loop" (GPU) tiling: query rows per program and tree keys per step. A 129-node tree with
# 4 query heads per KV group is 516 rows: held whole, its float32 accumulator alone (1,024
# padded rows x 128) is 512 KiB, more than a GPU core's registers and shared memory together.
_LOOP_ROW_BLOCK = 64
_LOOP_TREE_BLOCK = 64
# Mosaic TPU: the second-to-last dim of a block must be a multiple of 8 (or the whole dim).
_TPU_SUBLANES = 8


def tree_attention_reference(q, k_new, v_new, tree_mask, k_cache, v_cache, prefix_len) -> jax.Array:
    """Pure-jnp tree attention: `attend` with cache_visible[b, t, s] = s < prefix_len[b].

    Shapes as in `tree_attention`; returns [b, T, heads, d] in v_new.dtype."""
    b, t = q.shape[:2]
    s = k_cache.shape[2]
    new_visible = jnp.broadcast_to(tree_mask, (b, t, t))
    cache_visible = jnp.broadcast_to(
        jnp.arange(s, dtype=jnp.int32)[None, None, :] < prefix_len.astype(jnp.int32)[:, None, None], (b, t, s))
    return attend(q, k_new, v_new, new_visible, k_cache, v_cache, cache_visible)


# ----------------------------------------------------------------------------- kernel bodies


def _online_update(state, q, k, v, visible, v_dtype):
    """Fold one block of keys (k, v [n, d]; visible [rows, n]) into the running softmax
    state (max m [rows, 1], denominator l [rows, 1], accumulator acc [rows, d]; float32).
    Masked keys contribute nothing, also to a row that has seen no key yet."""
    m, l, acc = state
    s = lax.dot_general(q, k.astype(q.dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    s = jnp.where(visible, s, MASKED_SCORE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
    l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    pv = lax.dot_general(p.astype(v_dtype), v.astype(v_dtype), (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)
    return m_new, l, alpha * acc + pv


def _initial_state(rows: int, d: int):
    return (jnp.full((rows, 1), MASKED_SCORE, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, d), jnp.float32))


def _cache_block(state, q, k, v, start, plen, block_k: int, v_dtype):
    """Fold the cache block at slot `start` (slots >= plen masked)."""
    slot = start + lax.broadcasted_iota(jnp.int32, (q.shape[0], block_k), 1)  # full shape: no i1 broadcast
    return _online_update(state, q, k, v, slot < plen, v_dtype)


def _write(state, o_ref):
    """Normalise the softmax state (0 for a row that saw nothing) and write the output."""
    _, l, acc = state
    o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


def _finish(state, q, kn, vn, mask, o_ref):
    """Fold in the tree keys under the tree mask, normalise, write."""
    _write(_online_update(state, q, kn, vn, mask != 0, o_ref.dtype), o_ref)


def _grid_kernel(plen_ref, q_ref, kc_ref, vc_ref, kn_ref, vn_ref, mask_ref, o_ref, m_sc, l_sc, acc_sc, *,
                 block_k: int):
    """Grid (batch, kv_head, key block): one [block_k, d] block of K / V per step, the softmax
    state in scratch across the (sequential) key-block axis."""
    # program ids are read here, outside the pl.when bodies (the interpreter needs that)
    j, n_blocks = pl.program_id(2), pl.num_programs(2)
    plen = plen_ref[pl.program_id(0)]
    start = j * block_k

    @pl.when(j == 0)
    def _():
        m0, l0, acc0 = _initial_state(*acc_sc.shape)
        m_sc[...], l_sc[...], acc_sc[...] = m0, l0, acc0

    @pl.when(start < plen)  # blocks wholly at or past prefix_len do nothing
    def _():
        m, l, acc = _cache_block((m_sc[...], l_sc[...], acc_sc[...]), q_ref[...], kc_ref[...], vc_ref[...],
                                 start, plen, block_k, o_ref.dtype)
        m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

    @pl.when(j == n_blocks - 1)
    def _():
        _finish((m_sc[...], l_sc[...], acc_sc[...]), q_ref[...], kn_ref[...], vn_ref[...], mask_ref[...], o_ref)


def _loop_kernel(plen_ref, q_ref, kc_ref, vc_ref, kn_ref, vn_ref, mask_ref, o_ref, *, block_k: int, block_t: int):
    """Grid (batch, kv_head, row block): a loop over the visible key blocks, one [block_k, d]
    tile loaded per step, then one over the tree's keys in blocks of `block_t` (the Triton
    path: no scratch, no sequential grid axis there; a program holds one block of query rows,
    so a large tree does not outgrow a GPU core's registers and shared memory)."""
    q = q_ref[...]
    plen = plen_ref[pl.program_id(0)]

    def body(i, state):
        start = pl.multiple_of(i * block_k, block_k)
        k = kc_ref[pl.ds(start, block_k), :]
        v = vc_ref[pl.ds(start, block_k), :]
        return _cache_block(state, q, k, v, start, plen, block_k, o_ref.dtype)

    state = lax.fori_loop(0, lax.div(plen + (block_k - 1), block_k), body, _initial_state(*q.shape))  # plen >= 0

    def tree_body(j, state):
        start = pl.multiple_of(j * block_t, block_t)
        visible = mask_ref[:, pl.ds(start, block_t)] != 0
        return _online_update(state, q, kn_ref[pl.ds(start, block_t), :], vn_ref[pl.ds(start, block_t), :],
                              visible, o_ref.dtype)

    _write(lax.fori_loop(0, kn_ref.shape[0] // block_t, tree_body, state), o_ref)


# ----------------------------------------------------------------------------- sizes and checks


def default_block_k(cache_len: int) -> int:
    """The largest of 128, 64, ..., 8 dividing the cache length (else the whole cache)."""
    return next(bk for bk in (128, 64, 32, 16, 8, cache_len) if cache_len % bk == 0)


def _pow2_at_least(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _pad_axis(x, axis: int, size: int):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _check_args(q, k_new, v_new, tree_mask, k_cache, v_cache, prefix_len, block_k: int | None, platform: str) -> None:
    """Shape, head_dim and block constraints of the kernel on `platform` (module docstring);
    block_k None: the shapes only."""
    if q.ndim != 4:
        raise InvalidArgumentError(f"tree attention: q must be [batch, T, heads, head_dim], got shape {q.shape}")
    b, t, h, d = q.shape
    if k_new.ndim != 4 or k_new.shape[:2] != (b, t) or k_new.shape[3] != d or v_new.shape != k_new.shape:
        raise InvalidArgumentError(f"tree attention: k_new and v_new must be [{b}, {t}, kv_heads, {d}], got "
                                   f"{k_new.shape} and {v_new.shape}")
    kvh = k_new.shape[2]
    if kvh < 1 or h % kvh:
        raise InvalidArgumentError(f"tree attention: heads ({h}) must be a multiple of kv_heads ({kvh})")
    if k_cache.ndim != 4 or k_cache.shape[:2] != (b, kvh) or k_cache.shape[3] != d or v_cache.shape != k_cache.shape:
        raise InvalidArgumentError(f"tree attention: k_cache and v_cache must be [{b}, {kvh}, cache_len, {d}], got "
                                   f"{k_cache.shape} and {v_cache.shape}")
    if tree_mask.shape not in ((b, t, t), (1, t, t)):
        raise InvalidArgumentError(f"tree attention: tree_mask must be [{b} or 1, {t}, {t}], got {tree_mask.shape}")
    if prefix_len.shape != (b,):
        raise InvalidArgumentError(f"tree attention: prefix_len must be [{b}], got {prefix_len.shape}")
    problem = None if block_k is None else _size_problem(d, k_cache.shape[2], block_k, platform)
    if problem is not None:
        raise InvalidArgumentError(f"tree attention: {problem}")


def _size_problem(d: int, s: int, block_k: int, platform: str) -> str | None:
    """Why the kernel cannot take head_dim `d`, a cache of `s` slots and `block_k` on
    `platform`, or None."""
    if s < 1:
        return f"the cache length must be >= 1, got {s}"
    if block_k < 1 or s % block_k:
        return f"block_k={block_k} must be >= 1 and divide the cache length {s}"
    if block_k % _TPU_SUBLANES and block_k != s:
        return (f"block_k={block_k} must be a multiple of {_TPU_SUBLANES} or the whole cache length {s} (the "
                f"Pallas TPU (8, 128) block rule)")
    if platform == "tpu" and block_k < _TPU_SUBLANES:  # bf16 dots over fewer rows fail Mosaic's verifier
        return (f"block_k={block_k} (a cache of {s} slots) is below {_TPU_SUBLANES} on TPU: use the reference "
                f"(tree_attention does below {_TPU_SUBLANES} slots)")
    if platform == "gpu":
        if not _is_pow2(d) or d < 16:
            return f"head_dim={d} must be a power of two >= 16 on GPU (Triton)"
        if not _is_pow2(block_k) or block_k < 16:
            return f"block_k={block_k} must be a power of two >= 16 on GPU (Triton)"
    return None


# ----------------------------------------------------------------------------- pallas_call


@functools.partial(jax.jit, static_argnames=("block_k", "platform", "tiling"))
def _tree_attention_pallas(q, k_new, v_new, tree_mask, k_cache, v_cache, prefix_len, *, block_k: int,
                           platform: str, tiling: str) -> jax.Array:
    """The pallas_call; `platform` is "tpu", "gpu" or "interpret", `tiling` "grid" or "loop"."""
    b, t, h, d = q.shape
    kvh = k_new.shape[2]
    g = h // kvh
    s = k_cache.shape[2]
    rows = g * t
    t_p = _pow2_at_least(t, _MIN_ROWS)
    if tiling == "grid":
        # Mosaic: a whole [rows, d] block per program, any size; a multiple of 16 fills bf16's
        # packed sublanes. (Powers of two doubled a 129-node tree's 1,032 rows at 8 query heads
        # per KV head, and with them the VMEM of q, the output, the accumulator and the mask.)
        rows_p = block_rows = -(-rows // _MIN_ROWS) * _MIN_ROWS
    else:  # Triton: power-of-two blocks of at most _LOOP_ROW_BLOCK rows; rows padded to a multiple
        block_rows = min(_pow2_at_least(rows, _MIN_ROWS), _LOOP_ROW_BLOCK)
        rows_p = -(-rows // block_rows) * block_rows
    n_blocks = s // block_k
    bm = tree_mask.shape[0]
    interpret = platform == "interpret"

    # Query heads of one KV group become rows: [b, kvh, g*T, d], row = head_in_group * T + t.
    qg = _pad_axis(q.reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, rows, d), 2, rows_p)
    kn = _pad_axis(k_new.transpose(0, 2, 1, 3), 2, t_p)
    vn = _pad_axis(v_new.transpose(0, 2, 1, 3), 2, t_p)
    mask = jnp.tile(tree_mask.astype(jnp.int32), (1, g, 1))  # [bm, g*T, T], int32: no i1 memrefs
    mask = _pad_axis(_pad_axis(mask, 1, rows_p), 2, t_p)
    plen = jnp.clip(prefix_len.astype(jnp.int32), 0, s)
    out_shape = jax.ShapeDtypeStruct((b, kvh, rows_p, d), v_new.dtype)

    if tiling == "grid":
        from jax.experimental.pallas import tpu as pltpu

        def per_group(n):  # a block of one (batch, kv_head), the same for every key block
            return pl.BlockSpec((None, None, n, d), lambda bi, hi, ji, plen_ref: (bi, hi, 0, 0))

        def cache_index(bi, hi, ji, plen_ref):
            # Past the row's last visible block, keep the block index: no new copy is issued.
            last = jnp.maximum(lax.div(plen_ref[bi] + (block_k - 1), block_k) - 1, 0)
            return bi, hi, jnp.minimum(ji, last), 0

        cache_spec = pl.BlockSpec((None, None, block_k, d), cache_index)
        mask_spec = pl.BlockSpec((None, rows_p, t_p), (lambda bi, hi, ji, plen_ref: (bi, 0, 0)) if bm > 1
                                 else (lambda bi, hi, ji, plen_ref: (0, 0, 0)))
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, kvh, n_blocks),
            in_specs=[per_group(rows_p), cache_spec, cache_spec, per_group(t_p), per_group(t_p), mask_spec],
            out_specs=per_group(rows_p),
            scratch_shapes=[pltpu.VMEM((rows_p, 1), jnp.float32), pltpu.VMEM((rows_p, 1), jnp.float32),
                            pltpu.VMEM((rows_p, d), jnp.float32)],
        )
        compiler_params = (pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
                           if platform == "tpu" else None)
        out = pl.pallas_call(
            functools.partial(_grid_kernel, block_k=block_k),
            out_shape=out_shape,
            grid_spec=grid_spec,
            interpret=pltpu.InterpretParams() if interpret else False,
            compiler_params=compiler_params,
            name="tree_attention",
        )(plen, qg, k_cache, v_cache, kn, vn, mask)
    else:
        compiler_params = None
        if platform == "gpu":
            from jax.experimental.pallas import triton as pltriton

            compiler_params = pltriton.CompilerParams()

        def per_group(n):
            return pl.BlockSpec((None, None, n, d), lambda bi, hi, ri: (bi, hi, 0, 0))

        row_block = pl.BlockSpec((None, None, block_rows, d), lambda bi, hi, ri: (bi, hi, ri, 0))
        mask_spec = pl.BlockSpec((None, block_rows, t_p),
                                 (lambda bi, hi, ri: (bi, ri, 0)) if bm > 1 else (lambda bi, hi, ri: (0, ri, 0)))
        out = pl.pallas_call(
            functools.partial(_loop_kernel, block_k=block_k, block_t=min(t_p, _LOOP_TREE_BLOCK)),
            out_shape=out_shape,
            grid=(b, kvh, rows_p // block_rows),
            # plen: the whole [b] vector, indexed by program_id(0); the cache row is a pointer
            # that the loop reads one [block_k, d] tile at a time.
            in_specs=[pl.BlockSpec(), row_block, per_group(s), per_group(s), per_group(t_p), per_group(t_p),
                      mask_spec],
            out_specs=row_block,
            interpret=interpret,
            compiler_params=compiler_params,
            name="tree_attention",
        )(plen, qg, k_cache, v_cache, kn, vn, mask)
    out = out[:, :, :rows].reshape(b, kvh, g, t, d)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def tree_attention_kernel(q, k_new, v_new, tree_mask, k_cache, v_cache, prefix_len, *, block_k: int | None = None,
                          interpret: bool = False) -> jax.Array:
    """Pallas tree attention (see the module docstring); shapes as in `tree_attention`.

    block_k: cache slots per key block; None = `default_block_k(cache_len)`. It must divide
    the cache length (the cache is never padded or copied) and meet the backend's rules (module
    docstring); a violation raises InvalidArgumentError before anything is traced.
    prefix_len is clamped to [0, cache_len]. interpret=True runs the Pallas interpreter."""
    platform = "interpret" if interpret else jax.default_backend()
    block_k = default_block_k(k_cache.shape[2]) if block_k is None else int(block_k)
    _check_args(q, k_new, v_new, tree_mask, k_cache, v_cache, prefix_len, block_k, platform)
    return _tree_attention_pallas(q, k_new, v_new, tree_mask, k_cache, v_cache, prefix_len, block_k=block_k,
                                  platform=platform, tiling="loop" if platform == "gpu" else "grid")


def tree_attention(q, k_new, v_new, tree_mask, k_cache, v_cache, prefix_len, *, block_k: int | None = None,
                   interpret: bool = False, use_kernel: bool | None = None) -> jax.Array:
    """q [b, T, heads, d] (already scaled by 1/sqrt(d)); k_new, v_new [b, T, kv_heads, d] (the tree
    nodes' own keys/values); tree_mask [b or 1, T, T] bool (query i sees new key j: the ancestor
    mask); k_cache, v_cache [b, kv_heads, S, d]; prefix_len [b] int32: cache slots [0, prefix_len)
    are visible to every query. Returns [b, T, heads, d] in v_new.dtype.
    use_kernel None -> kernel on TPU/GPU, reference on CPU; interpret=True runs the Pallas kernel
    in interpret mode (any backend, used by tests on CPU); with None, sizes the backend's kernel
    cannot take (e.g. head_dim 96 on GPU) use the reference, where use_kernel=True or an
    explicit block_k raises.
    block_k: see `tree_attention_kernel` (None = `default_block_k(S)`; unused by the reference)."""
    if use_kernel is None:  # (a cache shorter than one TPU sublane block is not worth a kernel)
        backend = jax.default_backend()
        use_kernel = interpret or (backend in ("tpu", "gpu") and k_cache.shape[2] >= _TPU_SUBLANES)
        if use_kernel and not interpret and block_k is None:  # (a block_k given asks for the kernel)
            size = k_cache.shape[2] if k_cache.ndim == 4 else 0
            use_kernel = _size_problem(q.shape[-1], size, default_block_k(size), backend) is None
    if not use_kernel:  # (shapes checked all the same, and a block_k given against the rules of every backend)
        _check_args(q, k_new, v_new, tree_mask, k_cache, v_cache, prefix_len, block_k, "reference")
        return tree_attention_reference(q, k_new, v_new, tree_mask, k_cache, v_cache, prefix_len)
    return tree_attention_kernel(q, k_new, v_new, tree_mask, k_cache, v_cache, prefix_len, block_k=block_k,
                                 interpret=interpret)
