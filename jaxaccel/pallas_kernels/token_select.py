"""TokenSelect kernels (arXiv 2411.02886): score every cached key, pick a few, attend to those.

One decode step of one layer, per batch row with `lengths[b]` committed cache slots:

1. `score_keys`: for query head h and cached key j (keys cached *before* RoPE),
   s[h, j] = q_h . k_j, with query head h reading KV head h // (n_heads // n_kv_heads) (the
   standard GQA map; the official code uses h % n_kv_heads, which pairs heads with the wrong
   KV group). Each head's scores go through a softmax over the candidate keys and the heads
   vote: score[j] = sum_h softmax_j(s[h, :]) (the paper's per-head soft voting).
2. `select_indices`: an optional max-pool over the scores, then the top-k candidates, plus
   always the first `n_init` and the last `n_local` keys (the candidates are the keys
   between those two windows). Rows too short for the budget select every valid key.
3. `sparse_attention`: attention of the query over the selected keys only, RoPE applied to
   the query and the selected keys inside the kernel, at "compact" positions (a selected
   key's rank among the selected keys) or at their original positions.

Cache convention (the project's "two key blocks, one softmax", docs/ARCHITECTURE.md): the
cache holds the tokens *before* the query, slot == position, so `lengths[b]` is the query's
own position. The query's own key / value are not in the cache; `sparse_attention` takes them
as `k_new` / `v_new` and always attends to them, at the query's position. The official code
writes the token into the cache first and lets flashinfer put the query at kv_len - 1: the
same attention shifted by one slot.

Dtype policy: scores, softmaxes, RoPE angles and rotations are float32; matmul operands stay
in the input dtype (bf16 allowed) with float32 accumulation; attention probabilities are cast
to v's dtype before the P @ V product (as `ops.attend` does). Scores come back float32,
attention in v's dtype.

Backends (checked against the installed jax 0.10.2; see each kernel's docstring):
* TPU: Mosaic. `score_keys` pipelines [block_k, head_dim] key blocks through VMEM;
  `sparse_attention` (Mosaic has no vector-gather load) takes each row's indices as an SMEM
  block and copies each block's selected rows from HBM by DMA into double-buffered VMEM
  scratch. Run in Pallas's TPU interpreter and lowered from a CPU host only.
* GPU: the Triton lowering (selected with `pltriton.CompilerParams`, as the tree kernel
  does; jax 0.10 otherwise defaults `pallas_call` to Mosaic GPU, whose warpgroup style this
  portable Ref/BlockSpec code is not written in). `sparse_attention` gathers the selected
  rows inside the kernel (a Ref indexed by an index vector is a Triton pointer gather).
  Lowered from a CPU host only; never compiled by Triton or run on a GPU.
* CPU: no compiled Pallas; the public ops run the references, `interpret=True` runs the
  kernels in the Pallas interpreter (what the tests do).
"""
from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxaccel.pallas_kernels.ops import MASKED_SCORE, rope_frequencies, rotate_half

Positions = Literal["compact", "original"]
Gather = Literal["kernel", "dma", "xla"]

# Triton's tl.dot needs every dimension >= 16; rows of a KV group are padded to at least this.
_MIN_ROWS = 16
# TPU vregs are 128 lanes wide: a block along the lane axis must be a multiple of it.
_TPU_LANES = 128


# ----------------------------------------------------------------------------- small helpers


def _platform(interpret: bool) -> str:
    return "interpret" if interpret else jax.default_backend()


def _pow2_at_least(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def default_block_k(n: int, platform: str | None = None) -> int:
    """Key-block size for `n` keys: 128 once n >= 128, else the power of two >= n (>= 16);
    on TPU always a multiple of 128 (the lane width)."""
    platform = platform or jax.default_backend()
    if platform == "tpu":
        return _TPU_LANES
    return 128 if n >= 128 else _pow2_at_least(n, 16)


def _compiler_params(platform: str, n_grid_axes: int):
    """Backend compiler params: Mosaic TPU (all grid axes parallel) or Triton on GPU."""
    if platform == "tpu":
        return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_grid_axes)
    if platform == "gpu":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams()
    return None


def _scalar_spec(platform: str) -> pl.BlockSpec:
    """A whole per-row int vector [batch], indexed in the kernel by program_id(0); SMEM on TPU."""
    if platform == "tpu":
        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec()


def _group_rows(q: jax.Array, n_kv_heads: int, rows: int) -> jax.Array:
    """[batch, heads, d] -> [batch, kv_heads, rows, d]: the query heads of one KV group become
    rows of one matmul (head h -> group h // g, row h % g), zero-padded to `rows`."""
    b, h, d = q.shape
    return _pad_axis(q.reshape(b, n_kv_heads, h // n_kv_heads, d), 2, rows)


# ----------------------------------------------------------------------------- RoPE
# The model's rotate-half RoPE through the shared ops module (kernels never import model code,
# DESIGN decision 12): the same frequencies and the same rotation as `jaxaccel.model.layers`.


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """Unscaled RoPE inverse frequencies [head_dim // 2] float32 (as `model.layers.rope_inv_freq`
    with no scaling; pass that function's output as `rope_inv_freq=` for linear / Llama-3)."""
    return rope_frequencies(head_dim, theta).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq, table_size: int | None = None) -> jax.Array:
    """Rotate x [..., head_dim] (rotate-half layout) by `positions` (int, x.shape[:-1] or
    broadcastable to it). Angles and rotation in float32; returns x.dtype.

    table_size: positions are known to lie in [0, table_size). With concrete (numpy)
    frequencies, cos / sin then come from a constant table gathered by position: XLA's CPU
    backend otherwise fuses the trig into every element of the rotation and recomputes it
    per head and half (2,688 selected keys: 1.2 ms of trig per layer and step)."""
    if table_size is not None and isinstance(inv_freq, np.ndarray):
        cos_t, sin_t = _rope_table(table_size, tuple(float(f) for f in np.asarray(inv_freq, np.float32)))
        pos = jnp.clip(positions.astype(jnp.int32), 0, table_size - 1)
        return rotate_half(x, jnp.asarray(cos_t)[pos], jnp.asarray(sin_t)[pos])
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return rotate_half(x, jnp.cos(angles), jnp.sin(angles))


@functools.lru_cache(maxsize=32)
def _rope_table(size: int, inv_freq: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """cos / sin [size, head_dim // 2] of float32 angles position * inv_freq (as `apply_rope`
    computes them on device)."""
    angles = np.arange(size, dtype=np.float32)[:, None] * np.asarray(inv_freq, np.float32)[None, :]
    return np.cos(angles.astype(np.float64)).astype(np.float32), np.sin(angles.astype(np.float64)).astype(np.float32)


def _inv_freq_array(head_dim: int, rope_theta: float,
                    rope_inv_freq_: np.ndarray | jax.Array | None) -> np.ndarray | jax.Array:
    """The inverse frequencies, float32: numpy when given as numpy (or None), so they stay
    constants of the compiled program; a jax array as given otherwise."""
    inv = rope_inv_freq(head_dim, rope_theta) if rope_inv_freq_ is None else rope_inv_freq_
    inv = inv.astype(np.float32) if isinstance(inv, np.ndarray) else jnp.asarray(inv, jnp.float32)
    if inv.shape != (head_dim // 2,):
        raise ValueError(f"rope_inv_freq must be [head_dim // 2] = [{head_dim // 2}], got {inv.shape}")
    return inv


# ----------------------------------------------------------------------------- checks


def _check_group(n_heads: int, n_kv_heads: int) -> None:
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")


def _check_block(name: str, block: int, platform: str, head_dim: int, min_head_dim: int) -> None:
    """Block and head_dim constraints of the kernel on `platform` (one line each)."""
    problem = _block_problem(name, block, platform, head_dim, min_head_dim)
    if problem is not None:
        raise ValueError(problem)


def _block_problem(name: str, block: int, platform: str, head_dim: int, min_head_dim: int) -> str | None:
    if block < 8 or block % 8:
        return f"{name} must be a positive multiple of 8, got {block}"
    if platform == "gpu":
        if not _is_pow2(block) or block < 16:
            return f"on GPU (Triton) {name} must be a power of two >= 16, got {block}"
        if not _is_pow2(head_dim) or head_dim < min_head_dim:
            return f"on GPU (Triton) head_dim must be a power of two >= {min_head_dim}, got {head_dim}"
    if platform == "tpu" and block % _TPU_LANES:
        return f"on TPU {name} must be a multiple of {_TPU_LANES} (the lane width), got {block}"
    return None


def _kernel_by_default(interpret: bool, block: int | None, n: int, head_dim: int, min_head_dim: int) -> bool:
    """use_kernel=None: the kernel on TPU/GPU (or `interpret`) when it takes these sizes, else
    the reference. A block size given explicitly asks for the kernel: a bad one raises, as
    use_kernel=True does (on CPU the reference runs, but a block no backend takes raises)."""
    platform = jax.default_backend()
    if interpret or block is not None:
        if not (interpret or platform in ("tpu", "gpu")):
            _check_block("block_k", block, platform, head_dim, min_head_dim)
        return interpret or platform in ("tpu", "gpu")
    return platform in ("tpu", "gpu") and _block_problem(
        "block_k", default_block_k(n, platform), platform, head_dim, min_head_dim) is None


def _check_score_inputs(q, k, lengths, candidate_mask) -> None:
    if q.ndim != 3 or k.ndim != 4:
        raise ValueError(f"q must be [batch, n_heads, head_dim] and k [batch, n_kv_heads, cache_len, head_dim];"
                         f" got {q.shape} and {k.shape}")
    b, h, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k must be [{b}, n_kv_heads, cache_len, {d}], got {k.shape}")
    _check_group(h, k.shape[1])
    if lengths.shape != (b,):
        raise ValueError(f"lengths must be [{b}], got {lengths.shape}")
    if candidate_mask is not None and candidate_mask.shape != (b, k.shape[2]):
        raise ValueError(f"candidate_mask must be [{b}, {k.shape[2]}], got {candidate_mask.shape}")


def _check_sparse_inputs(q, k, v, indices, valid, lengths, k_new, v_new) -> None:
    if q.ndim != 3 or k.ndim != 4:
        raise ValueError(f"q must be [batch, n_heads, head_dim] and k, v [batch, n_kv_heads, cache_len, head_dim];"
                         f" got {q.shape} and {k.shape}")
    b, h, d = q.shape
    if d % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {d}")
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k and v must be [{b}, n_kv_heads, cache_len, {d}]; got {k.shape} and {v.shape}")
    _check_group(h, k.shape[1])
    if indices.ndim != 2 or indices.shape[0] != b or valid.shape != indices.shape:
        raise ValueError(f"indices and valid must be [{b}, n_selected]; got {indices.shape} and {valid.shape}")
    if lengths.shape != (b,):
        raise ValueError(f"lengths must be [{b}], got {lengths.shape}")
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must be given together")
    if k_new is not None and (k_new.shape != (b, k.shape[1], d) or v_new.shape != k_new.shape):
        raise ValueError(f"k_new and v_new must be [{b}, {k.shape[1]}, {d}]; got {k_new.shape} and {v_new.shape}")


# ----------------------------------------------------------------------------- 1. scoring


def key_visibility(lengths: jax.Array, cache_len: int, candidate_mask: jax.Array | None = None) -> jax.Array:
    """[batch, cache_len] bool: slot j is scored iff j < lengths[b] (and candidate_mask)."""
    visible = jnp.arange(cache_len, dtype=jnp.int32)[None, :] < lengths.astype(jnp.int32)[:, None]
    return visible if candidate_mask is None else visible & candidate_mask.astype(bool)


def selection_candidates(lengths: jax.Array, cache_len: int, *, n_init: int, n_local: int) -> jax.Array:
    """[batch, cache_len] bool: the keys top-k chooses among, slots [n_init, lengths - n_local)
    (the init and local windows are selected anyway). Pass as `candidate_mask` to
    `score_keys` so the per-head softmax runs over the candidates only, as in the paper."""
    slot = jnp.arange(cache_len, dtype=jnp.int32)[None, :]
    return (slot >= n_init) & (slot < lengths.astype(jnp.int32)[:, None] - n_local)


def score_keys_reference(q: jax.Array, k: jax.Array, lengths: jax.Array, *, candidate_mask: jax.Array | None = None,
                         block_k: int | None = None, interpret: bool = False) -> jax.Array:
    """Pure-jnp TokenSelect key scores (soft voting over heads).

    q: [batch, n_heads, head_dim], one decode query per row, used as given (the official code
      scores the unscaled, un-rotated q . k; scale q by 1/sqrt(head_dim) for the attention's
      own softmax temperature -- the scale sets how sharp each head's vote is).
    k: [batch, n_kv_heads, cache_len, head_dim], the cached keys before RoPE.
    lengths: [batch] int32, valid slots per row ([0, lengths)); 0 = a padding row.
    candidate_mask: [batch, cache_len] bool or None; keys outside it are neither normalised
      over nor scored (see `selection_candidates`).
    block_k, interpret: accepted so reference and kernel are interchangeable; unused.
    Returns [batch, cache_len] float32: sum over query heads of each head's softmax over the
    visible keys; 0 on invalid / non-candidate keys (a row with none is all 0).
    """
    _check_score_inputs(q, k, lengths, candidate_mask)
    b, h, d = q.shape
    kvh, s = k.shape[1], k.shape[2]
    qg = q.reshape(b, kvh, h // kvh, d)
    logits = jnp.einsum("bkgd,bksd->bkgs", qg, k.astype(q.dtype), preferred_element_type=jnp.float32)
    visible = key_visibility(lengths, s, candidate_mask)[:, None, None, :]
    logits = jnp.where(visible, logits, MASKED_SCORE).reshape(b, h, s)
    probs = jnp.where(visible[:, 0], jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)), 0.0)
    denom = jnp.sum(probs, axis=-1)
    # The head sum as a contraction with 1/denominator, not a sum over a non-minor axis:
    # XLA's CPU backend fuses the latter with the exp into a loop ~10x slower at 128K keys.
    inv = jnp.where(denom > 0, 1.0 / jnp.where(denom > 0, denom, 1.0), 0.0)
    return jnp.einsum("bh,bhs->bs", inv, probs, precision=lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32)


def _block_logits(q_ref, k_ref, cand_ref, start, length, block_k: int):
    """The key block at slot `start`: logits [rows, block_k] float32, visibility [1, block_k]."""
    logits = lax.dot_general(q_ref[...], k_ref[...].astype(q_ref.dtype), (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)
    slot = start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    visible = slot < length
    if cand_ref is not None:
        visible = visible & (cand_ref[...] != 0)
    return jnp.where(visible, logits, MASKED_SCORE), visible


def _stats_kernel(len_ref, q_ref, k_ref, *rest, block_k: int, has_mask: bool):
    """Pass 1: per head, this block's max logit m and sum of exp(logit - m) over visible keys."""
    cand_ref = rest[0] if has_mask else None
    m_ref, l_ref = rest[-2:]
    # program ids are read here, outside the pl.when bodies (the interpreter needs that)
    start, length = pl.program_id(2) * block_k, len_ref[pl.program_id(0)]
    in_row = start < length

    @pl.when(in_row)
    def _():
        logits, visible = _block_logits(q_ref, k_ref, cand_ref, start, length, block_k)
        m = jnp.max(logits, axis=1, keepdims=True)
        m_ref[...] = m
        l_ref[...] = jnp.sum(jnp.where(visible, jnp.exp(logits - m), 0.0), axis=1, keepdims=True)

    @pl.when(jnp.logical_not(in_row))  # a block wholly past the row's length: no matmul
    def _():
        m_ref[...] = jnp.full(m_ref.shape, MASKED_SCORE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)


def _score_kernel(len_ref, q_ref, k_ref, *rest, block_k: int, has_mask: bool, group: int):
    """Pass 2: sum over this KV group's heads of exp(logit - logsumexp_head) per key."""
    cand_ref = rest[0] if has_mask else None
    lse_ref, o_ref = rest[-2:]
    # program ids are read here, outside the pl.when bodies (the interpreter needs that)
    start, length = pl.program_id(2) * block_k, len_ref[pl.program_id(0)]
    in_row = start < length

    @pl.when(in_row)
    def _():
        logits, visible = _block_logits(q_ref, k_ref, cand_ref, start, length, block_k)
        real_head = lax.broadcasted_iota(jnp.int32, (logits.shape[0], 1), 0) < group  # padded rows vote 0
        probs = jnp.where(visible & real_head, jnp.exp(logits - lse_ref[...]), 0.0)
        o_ref[...] = jnp.sum(probs, axis=0, keepdims=True)

    @pl.when(jnp.logical_not(in_row))
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)


def last_block(length: jax.Array, block_k: int) -> jax.Array:
    """The last key block holding a slot of a row of `length` >= 0 slots (block 0 for an empty
    row). lax.div, not //: a floor division lowers to sign and remainder ops that Mosaic's
    index-map lowering asks the device about."""
    return jnp.maximum(lax.div(length + block_k - 1, block_k) - 1, 0)


@functools.partial(jax.jit, static_argnames=("block_k", "interpret", "clamp"))
def score_keys_kernel(q: jax.Array, k: jax.Array, lengths: jax.Array, *, candidate_mask: jax.Array | None = None,
                      block_k: int | None = None, interpret: bool = False, clamp: bool | None = None) -> jax.Array:
    """Pallas TokenSelect key scores; shapes and result as `score_keys_reference`.

    Grid (batch, kv_head, key block), every axis parallel (split-K, as flash-decoding): a
    decode step has few rows, so the key axis is what fills the chip. One program holds the g
    query heads of one KV group as rows ([rows, head_dim], rows = g padded to a power of two
    >= 16) and one [block_k, head_dim] key block, so grouped heads share each key load.
    Two passes over K, because each key's vote needs every head's normaliser first:
      1. per block and head, the max logit and the sum of exp(logit - max) over visible keys;
         jnp then folds the blocks into one logsumexp per head ([batch, heads]: tiny);
      2. per block, sum over the group's heads of exp(logit - logsumexp) -> [batch, kv_heads,
         cache_len]; jnp sums the KV groups.
    Per key that reads K twice, 2 * n_kv_heads * head_dim * itemsize bytes. One pass that
    writes raw float32 logits [batch, n_heads, cache_len] and normalises them in XLA moves
    n_kv_heads * head_dim * itemsize + 8 * n_heads bytes instead -- less for typical GQA
    shapes (bf16, 32 heads, 8 KV heads, head_dim 128: 2 KiB + 256 B against 4 KiB); worth
    measuring on hardware before choosing (not done: no device here).
    Blocks wholly past a row's length skip the matmul (`pl.when`). With `clamp` (the default
    on TPU) the lengths are scalar-prefetched and the key (and mask) block index is clamped
    to the row's last block (`last_block`): the pipeline skips a copy whose block index has
    not changed, so a short row in a batch of long ones reads only its own keys from HBM.
    Without it (GPU) every block is still fetched. With interpret=True, clamp runs in Pallas's
    TPU interpreter.
    cache_len is zero-padded to a multiple of block_k here (a copy: prefer cache_len %
    block_k == 0). block_k defaults to `default_block_k(cache_len)`.
    """
    _check_score_inputs(q, k, lengths, candidate_mask)
    platform = _platform(interpret)
    b, h, d = q.shape
    kvh, s = k.shape[1], k.shape[2]
    g = h // kvh
    block_k = block_k or default_block_k(s, platform)
    _check_block("block_k", block_k, platform, d, 16)
    rows = _pow2_at_least(g, _MIN_ROWS)
    n_blocks = pl.cdiv(s, block_k)
    s_p = n_blocks * block_k

    qg = _group_rows(q, kvh, rows)
    kp = _pad_axis(k, 2, s_p)
    lens = jnp.clip(lengths.astype(jnp.int32), 0, s)
    has_mask = candidate_mask is not None
    # [batch, 1, S]: the key axis is the lane axis, the 1 keeps TPU's (8, 128) block rule.
    masks = (_pad_axis(candidate_mask.astype(jnp.int32), 1, s_p)[:, None, :],) if has_mask else ()

    clamp = platform == "tpu" if clamp is None else clamp
    if clamp and platform not in ("tpu", "interpret"):
        raise ValueError(f"clamp scalar-prefetches the lengths, a TPU feature: not on {platform}")

    def key_block(bi, ji, *prefetched):  # (index maps get the scalar-prefetched lengths last, if any)
        return jnp.minimum(ji, last_block(prefetched[0][bi], block_k)) if prefetched else ji

    q_spec = pl.BlockSpec((None, None, rows, d), lambda bi, hi, ji, *_: (bi, hi, 0, 0))
    k_spec = pl.BlockSpec((None, None, block_k, d), lambda bi, hi, ji, *p: (bi, hi, key_block(bi, ji, *p), 0))
    mask_specs = [pl.BlockSpec((None, 1, block_k), lambda bi, hi, ji, *p: (bi, 0, key_block(bi, ji, *p)))] \
        if has_mask else []
    stat_spec = pl.BlockSpec((None, None, None, rows, 1), lambda bi, hi, ji, *_: (bi, hi, ji, 0, 0))
    in_specs = [q_spec, k_spec, *mask_specs] if clamp else [_scalar_spec(platform), q_spec, k_spec, *mask_specs]

    def call(kernel, name, out_shape, extra_specs, out_specs, *args):
        specs = [*in_specs, *extra_specs]
        if clamp:  # the lengths scalar-prefetched: the kernel still gets them first
            grid = dict(grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=(b, kvh, n_blocks),
                                                               in_specs=specs, out_specs=out_specs))
        else:
            grid = dict(grid=(b, kvh, n_blocks), in_specs=specs, out_specs=out_specs)
        return pl.pallas_call(kernel, out_shape=out_shape, name=name,
                              interpret=(pltpu.InterpretParams() if clamp else True) if interpret else False,
                              compiler_params=_compiler_params("tpu" if clamp else platform, 3), **grid)(
            lens, qg, kp, *masks, *args)

    stat_shape = jax.ShapeDtypeStruct((b, kvh, n_blocks, rows, 1), jnp.float32)
    m_blocks, l_blocks = call(functools.partial(_stats_kernel, block_k=block_k, has_mask=has_mask),
                              "token_select_stats", (stat_shape, stat_shape), [], (stat_spec, stat_spec))

    m = jnp.max(m_blocks, axis=2)  # [b, kvh, rows, 1]
    total = jnp.sum(l_blocks * jnp.exp(m_blocks - m[:, :, None]), axis=2)
    lse = jnp.where(total > 0, m + jnp.log(jnp.where(total > 0, total, 1.0)), 0.0)  # no visible key: any finite

    votes = call(functools.partial(_score_kernel, block_k=block_k, has_mask=has_mask, group=g),
                 "token_select_scores", jax.ShapeDtypeStruct((b, kvh, 1, s_p), jnp.float32),
                 [pl.BlockSpec((None, None, rows, 1), lambda bi, hi, ji, *_: (bi, hi, 0, 0))],
                 pl.BlockSpec((None, None, 1, block_k), lambda bi, hi, ji, *_: (bi, hi, 0, ji)), lse)
    return jnp.sum(votes[:, :, 0, :s], axis=1)


def score_keys(q: jax.Array, k: jax.Array, lengths: jax.Array, *, candidate_mask: jax.Array | None = None,
               block_k: int | None = None, interpret: bool = False, use_kernel: bool | None = None) -> jax.Array:
    """TokenSelect key scores [batch, cache_len] float32 (see `score_keys_reference` for the
    shapes). use_kernel None -> the Pallas kernel on TPU/GPU where it takes the sizes, else the
    reference;
    interpret=True runs the kernel in the Pallas interpreter (any backend). Input and block
    constraints are checked here, before anything is traced."""
    _check_score_inputs(q, k, lengths, candidate_mask)
    if use_kernel is None:
        use_kernel = _kernel_by_default(interpret, block_k, k.shape[2], q.shape[2], 16)
    if not use_kernel:
        return score_keys_reference(q, k, lengths, candidate_mask=candidate_mask)
    platform = _platform(interpret)
    _check_block("block_k", block_k or default_block_k(k.shape[2], platform), platform, q.shape[2], 16)
    return score_keys_kernel(q, k, lengths, candidate_mask=candidate_mask, block_k=block_k, interpret=interpret)


# ----------------------------------------------------------------------------- 2. selection


def select_indices(scores: jax.Array, lengths: jax.Array, *, k: int, n_init: int, n_local: int,
                   pool: int | None = None) -> tuple[jax.Array, jax.Array]:
    """The keys one TokenSelect step attends to (jnp; top-k through `lax.top_k`).

    scores: [batch, cache_len] (from `score_keys`); lengths: [batch] int32 (clipped to cache_len).
    k: how many candidates to pick by score; n_init / n_local: the first n_init and the last
      n_local valid keys of a row, always selected (attention sinks and the local window).
      The candidates are the slots [n_init, lengths - n_local).
    pool: odd max-pool width over the candidates' scores (the official code's kernel_size:
      a key also counts as high as its best neighbour, so spans are picked together), or None.
    Ties go to the lower slot (`lax.top_k`'s rule).
    Returns (indices [batch, n_init + k + n_local] int32, valid [same] bool). A row with
    lengths > n_init + k + n_local selects exactly that many keys: the init window, the
    top-k candidates, the local window, ascending, all valid. A shorter row selects every
    valid slot 0..lengths-1 and masks the rest; masked entries hold max(lengths - 1, 0) so
    indices stay ascending and in range.
    """
    if scores.ndim != 2 or lengths.shape != scores.shape[:1]:
        raise ValueError(f"scores must be [batch, cache_len] and lengths [batch]; got {scores.shape}, {lengths.shape}")
    if min(k, n_init, n_local) < 0:
        raise ValueError(f"k, n_init and n_local must be >= 0; got {k}, {n_init}, {n_local}")
    if pool is not None and (pool < 1 or pool % 2 == 0):
        raise ValueError(f"pool must be an odd width >= 1 or None, got {pool}")
    b, s = scores.shape
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, s)
    budget = n_init + k + n_local
    candidates = selection_candidates(lengths, s, n_init=n_init, n_local=n_local)
    ranked = jnp.where(candidates, scores.astype(jnp.float32), -jnp.inf)
    if pool is not None and pool > 1:
        # max-pool with -inf padding over the candidate span only, as F.max_pool1d on it
        ranked = lax.reduce_window(ranked, -jnp.inf, lax.max, (1, pool), (1, 1), ((0, 0), (pool // 2, pool // 2)))
        ranked = jnp.where(candidates, ranked, -jnp.inf)
    top = lax.top_k(ranked, min(k, s))[1].astype(jnp.int32) if k else jnp.zeros((b, 0), jnp.int32)
    top = _pad_axis(jnp.sort(top, axis=-1), 1, k)  # k > cache_len: every row is short anyway
    full = jnp.concatenate([jnp.broadcast_to(jnp.arange(n_init, dtype=jnp.int32), (b, n_init)), top,
                            lengths[:, None] - n_local + jnp.arange(n_local, dtype=jnp.int32)], axis=1)
    every = jnp.arange(budget, dtype=jnp.int32)[None, :]
    short = (lengths <= budget)[:, None]
    valid = jnp.where(short, every < lengths[:, None], True)
    indices = jnp.where(short, every, full)
    indices = jnp.where(valid, indices, jnp.maximum(lengths - 1, 0)[:, None])
    return jnp.clip(indices, 0, max(s - 1, 0)), valid


# ----------------------------------------------------------------------------- 3. attention


def rope_positions(indices: jax.Array, valid: jax.Array, lengths: jax.Array,
                   positions: Positions = "compact") -> tuple[jax.Array, jax.Array]:
    """RoPE positions of the selected keys [batch, n] and of the query [batch] (int32).

    "compact": the r-th valid selected key (its rank among the valid entries) gets position
      r and the query gets n_valid[b] (the selection read as a gap-free sequence).
    "original": a key gets its slot (slot == position in this cache), the query gets
      lengths[b] (its own position: the cache holds the tokens before it).
    Masked entries get a position too (never attended)."""
    valid = valid.astype(bool)
    if positions == "compact":
        rank = jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1
        return jnp.maximum(rank, 0), jnp.sum(valid, axis=1, dtype=jnp.int32)
    if positions == "original":
        return indices.astype(jnp.int32), lengths.astype(jnp.int32)
    raise ValueError(f"positions must be 'compact' or 'original', got {positions!r}")


def sparse_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, indices: jax.Array, valid: jax.Array,
                               lengths: jax.Array, *, k_new: jax.Array | None = None, v_new: jax.Array | None = None,
                               rope_theta: float = 10000.0, rope_inv_freq: np.ndarray | jax.Array | None = None,
                               positions: Positions = "compact", block_k: int | None = None,
                               gather: Gather | None = None, interpret: bool = False) -> jax.Array:
    """Pure-jnp attention of one decode query over selected cache keys, RoPE applied here.

    q: [batch, n_heads, head_dim], before RoPE, already scaled by 1/sqrt(head_dim) (RoPE is
      a rotation, so scaling before or after it is the same).
    k, v: [batch, n_kv_heads, cache_len, head_dim]; k before RoPE (TokenSelect caches keys
      unrotated so they can be placed at any position).
    indices: [batch, n] int32 cache slots to attend (clipped to [0, cache_len)); valid:
      [batch, n] bool, False entries are ignored (from `select_indices`).
    lengths: [batch] int32, the committed slots per row = the query's own position.
    k_new, v_new: [batch, n_kv_heads, head_dim] or None: the query token's own key (before
      RoPE) and value, attended at the query's position (see the module docstring).
    rope_theta / rope_inv_freq: RoPE base, or explicit inverse frequencies [head_dim // 2]
      (e.g. `model.layers.rope_inv_freq` with Llama-3 scaling), which then win.
    positions: "compact" or "original", see `rope_positions`.
    block_k, gather, interpret: accepted so reference and kernel are interchangeable; unused.
    Returns [batch, n_heads, head_dim] in v.dtype; a row that sees no key at all gives 0.
    """
    _check_sparse_inputs(q, k, v, indices, valid, lengths, k_new, v_new)
    b, h, d = q.shape
    kvh, s = k.shape[1], k.shape[2]
    inv_freq = _inv_freq_array(d, rope_theta, rope_inv_freq)
    key_pos, query_pos = rope_positions(indices, valid, lengths, positions)
    slots = jnp.clip(indices.astype(jnp.int32), 0, s - 1)[:, None, :, None]
    # Compact positions are ranks in the selection, so at most its size: a table (see apply_rope).
    table = indices.shape[1] + 1 if positions == "compact" else None
    k_sel = apply_rope(jnp.take_along_axis(k, slots, axis=2), key_pos[:, None, :], inv_freq, table)
    v_sel = jnp.take_along_axis(v, slots, axis=2)
    q_rot = apply_rope(q, query_pos[:, None], inv_freq, table).reshape(b, kvh, h // kvh, d)

    logits = jnp.einsum("bkgd,bknd->bkgn", q_rot, k_sel.astype(q.dtype), preferred_element_type=jnp.float32)
    visible = valid.astype(bool)[:, None, None, :]
    logits = jnp.where(visible, logits, MASKED_SCORE)
    row_max = jnp.max(logits, axis=-1, keepdims=True, initial=MASKED_SCORE)  # (initial: an empty selection)
    if k_new is not None:
        k_self = apply_rope(k_new, query_pos[:, None], inv_freq, table).astype(q.dtype)  # [b, kvh, d]
        self_logit = jnp.einsum("bkgd,bkd->bkg", q_rot, k_self, preferred_element_type=jnp.float32)[..., None]
        row_max = jnp.maximum(row_max, self_logit)
    probs = jnp.where(visible, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    out = jnp.einsum("bkgn,bknd->bkgd", probs.astype(v.dtype), v_sel, preferred_element_type=jnp.float32)
    if k_new is not None:
        self_prob = jnp.exp(self_logit - row_max)
        denom = denom + self_prob
        out = out + self_prob.astype(v.dtype).astype(jnp.float32) * v_new[:, :, None, :].astype(jnp.float32)
    out = out / jnp.where(denom > 0, denom, 1.0)
    return out.reshape(b, h, d).astype(v.dtype)


def _rotate(lo, hi, cos, sin, dtype):
    """Rotate-half RoPE on the two halves (float32 math, result in `dtype`)."""
    lo, hi = lo.astype(jnp.float32), hi.astype(jnp.float32)
    return (lo * cos - hi * sin).astype(dtype), (hi * cos + lo * sin).astype(dtype)


def _dot_t(a, b):
    """a [m, k] @ b[n, k].T -> [m, n] float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _sparse_kernel(qpos_ref, *refs, block: int, n_blocks: int, half: int, gather: Gather, has_self: bool):
    """One (row, KV group): online softmax over the selected keys, RoPE on the fly.

    The halves of q and k are loaded separately (ref slices) and the logit is
    q_lo . k_lo + q_hi . k_hi: rotate-half RoPE without slicing or concatenating values,
    which the Triton lowering cannot do. Where the selected rows come from (`gather`):
    "kernel": k_ref/v_ref are the whole [cache_len, d] rows, indexed by idx_ref's block;
    "xla": the compact [n, d] copies; "dma": the whole [b, kv_heads, cache_len, d] arrays in
    HBM, each block's rows copied into one of two VMEM buffers while the other is used."""
    if gather == "dma":  # this row's [n] indices in SMEM, then K/V in HBM
        q_ref, idx_ref, k_ref, v_ref, *rest = refs
        rest, (k_buf, v_buf, sems) = rest[:-3], rest[-3:]
    elif gather == "kernel":
        q_ref, k_ref, v_ref, idx_ref, *rest = refs
    else:
        q_ref, k_ref, v_ref, *rest = refs
    kpos_ref, valid_ref, inv_ref = rest[:3]
    knew_ref, vnew_ref = rest[3:5] if has_self else (None, None)
    o_ref = rest[-1]
    dtype, v_dtype = q_ref.dtype, v_ref.dtype
    rows, d = q_ref.shape
    inv_freq = inv_ref[...]  # [1, half]
    q_angle = qpos_ref[pl.program_id(0)].astype(jnp.float32) * inv_freq
    q_cos, q_sin = jnp.cos(q_angle), jnp.sin(q_angle)
    q_lo, q_hi = _rotate(q_ref[:, pl.ds(0, half)], q_ref[:, pl.ds(half, half)], q_cos, q_sin, dtype)

    if gather == "dma":
        copy_block = functools.partial(_copy_selected_rows, idx_ref, ((k_ref, k_buf), (v_ref, v_buf)), sems,
                                       block=block)
        copy_block(0, 0, "start")

    def key_block(i, carry):
        row_max, row_sum, acc = carry
        start = pl.multiple_of(i * block, block)
        k_rows, v_rows = k_ref, v_ref
        if gather == "dma":  # the next block's copies go while this one is used
            slot = i % 2

            @pl.when(i + 1 < n_blocks)
            def _():
                copy_block(i + 1, 1 - slot, "start")

            copy_block(i, slot, "wait")
            k_rows, v_rows, rows_at = k_buf.at[slot], v_buf.at[slot], pl.ds(0, block)
        elif gather == "kernel":  # GPU: an index vector into a [cache_len, d] row is a pointer gather
            rows_at = idx_ref[pl.ds(start, block)]
        else:  # gathered by XLA into a compact [n, d] copy
            rows_at = pl.ds(start, block)
        angle = kpos_ref[pl.ds(start, block), :].astype(jnp.float32) * inv_freq  # [block, half]
        k_lo, k_hi = _rotate(k_rows[rows_at, pl.ds(0, half)], k_rows[rows_at, pl.ds(half, half)],
                             jnp.cos(angle), jnp.sin(angle), dtype)
        visible = valid_ref[:, pl.ds(start, block)] != 0  # [1, block]
        logits = jnp.where(visible, _dot_t(q_lo, k_lo) + _dot_t(q_hi, k_hi), MASKED_SCORE)
        new_max = jnp.maximum(row_max, jnp.max(logits, axis=1, keepdims=True))
        # where(): masked keys stay exactly 0 even while a row has seen only masked ones
        probs = jnp.where(visible, jnp.exp(logits - new_max), 0.0)
        rescale = jnp.exp(row_max - new_max)
        pv = lax.dot_general(probs.astype(v_dtype), v_rows[rows_at, :], (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
        return new_max, rescale * row_sum + jnp.sum(probs, axis=1, keepdims=True), rescale * acc + pv

    carry = (jnp.full((rows, 1), MASKED_SCORE, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
             jnp.zeros((rows, d), jnp.float32))
    row_max, row_sum, acc = lax.fori_loop(0, n_blocks, key_block, carry)
    if has_self:
        # The query's own key, at the query's position: one key, so a row-wise product, no dot.
        k_lo, k_hi = _rotate(knew_ref[:, pl.ds(0, half)], knew_ref[:, pl.ds(half, half)], q_cos, q_sin, dtype)
        self_logit = (jnp.sum(q_lo.astype(jnp.float32) * k_lo.astype(jnp.float32), axis=1, keepdims=True)
                      + jnp.sum(q_hi.astype(jnp.float32) * k_hi.astype(jnp.float32), axis=1, keepdims=True))
        new_max = jnp.maximum(row_max, self_logit)
        rescale = jnp.exp(row_max - new_max)
        self_prob = jnp.exp(self_logit - new_max)
        row_sum = rescale * row_sum + self_prob
        acc = rescale * acc + self_prob.astype(v_dtype).astype(jnp.float32) * vnew_ref[...].astype(jnp.float32)
    o_ref[...] = (acc / jnp.where(row_sum > 0, row_sum, 1.0)).astype(o_ref.dtype)


def _copy_selected_rows(idx_ref, pairs, sems, i, slot, action: str, *, block: int) -> None:
    """Start (or wait for) the DMA copies of key block i's selected rows, for this program's
    (row, KV group), from each HBM array of `pairs` into slot `slot` of its VMEM buffer
    [2, block, d]: one row per copy, one semaphore per (array, slot). A wait needs only the
    copy's size and semaphore, so it names row 0."""
    bi, hi = pl.program_id(0), pl.program_id(1)

    def each_row(t, carry):
        row = idx_ref[0, i * block + t] if action == "start" else 0
        for j, (hbm, buf) in enumerate(pairs):
            copy = pltpu.make_async_copy(hbm.at[bi, hi, pl.ds(row, 1)], buf.at[slot, pl.ds(t, 1)], sems.at[j, slot])
            copy.start() if action == "start" else copy.wait()
        return carry

    lax.fori_loop(0, block, each_row, 0)


def default_gather(platform: str | None = None) -> Gather:
    """Where `sparse_attention_kernel` gathers: by DMA on TPU (Mosaic has no vector-gather
    load), else inside the kernel."""
    return "dma" if (platform or jax.default_backend()) == "tpu" else "kernel"


@functools.partial(jax.jit, static_argnames=("rope_theta", "positions", "block_k", "gather", "interpret"))
def sparse_attention_kernel(q: jax.Array, k: jax.Array, v: jax.Array, indices: jax.Array, valid: jax.Array,
                            lengths: jax.Array, *, k_new: jax.Array | None = None, v_new: jax.Array | None = None,
                            rope_theta: float = 10000.0, rope_inv_freq: np.ndarray | jax.Array | None = None,
                            positions: Positions = "compact", block_k: int | None = None,
                            gather: Gather | None = None, interpret: bool = False) -> jax.Array:
    """Pallas TokenSelect attention; shapes and result as `sparse_attention_reference`.

    Grid (batch, kv_head): one program holds the g query heads of one KV group as rows
    ([rows, head_dim], rows = g padded to a power of two >= 16), rotates them once at the
    query's position, then runs a float32 online softmax over the n selected keys in blocks
    of `block_k` (n is zero-padded to a multiple; padded entries are invalid), rotating each
    key block at its positions (computed by `rope_positions`, [n] int32 per row) as it
    arrives, and finally folds in the query's own key (k_new) if given.
    gather:
    * "kernel" (default off TPU): the program sees the whole [cache_len, head_dim] K/V row of
      its KV group -- on GPU a pointer into HBM, nothing copied -- and loads each block of
      selected rows with the index vector (`k_ref[idx, ...]`, a Triton gathered load; the
      Pallas interpreter runs it as a gather). Reads only the selected rows.
    * "dma" (default on TPU; Mosaic cannot lower a vector-indexed load, NotImplementedError
      in jax 0.10.2): each program's row of indices is an SMEM block (the query positions
      scalar-prefetched, `PrefetchScalarGridSpec`), K/V stay in HBM (`memory_space=pl.ANY`),
      and each block's selected rows are copied row by row with `pltpu.make_async_copy`
      into one of two VMEM buffers [2, block_k, head_dim] while the previous block is
      computed (ragged paged attention does the same with pages). Reads only the selected
      rows. SMEM holds one row's indices at a time (4 * n bytes, 10.5 KB for 2,688
      selected keys, whatever the batch; prefetching the whole [batch, n] table would grow
      with the batch, and SMEM is small). Interpret mode runs it in Pallas's TPU
      interpreter (`pltpu.InterpretParams`), which models the DMAs and semaphores.
    * "xla": jnp.take_along_axis gathers the selected rows into a compact [batch, kv_heads,
      n, head_dim] copy that the program holds in VMEM: one more write and read of the
      selected K/V per step (the TPU path before "dma").
    Decode rows are few, so (batch, kv_heads) programs may not fill a GPU; splitting the
    selected keys over a third grid axis (flash-decoding) is the next step (not done).
    """
    _check_sparse_inputs(q, k, v, indices, valid, lengths, k_new, v_new)
    platform = _platform(interpret)
    gather = gather or default_gather(platform)
    if gather not in ("kernel", "dma", "xla"):
        raise ValueError(f"gather must be 'kernel', 'dma' or 'xla', got {gather!r}")
    if gather == "dma" and platform not in ("tpu", "interpret"):
        raise ValueError(f"gather='dma' copies with TPU DMAs: it runs on TPU (or interpret=True), not {platform}")
    b, h, d = q.shape
    kvh, s = k.shape[1], k.shape[2]
    n = indices.shape[1]
    g = h // kvh
    half = d // 2
    block = block_k or default_block_k(n, platform)
    _check_block("block_k", block, platform, d, 32)
    rows = _pow2_at_least(g, _MIN_ROWS)
    n_blocks = max(1, pl.cdiv(n, block))
    n_p = n_blocks * block

    key_pos, query_pos = rope_positions(indices, valid, lengths, positions)
    idx = _pad_axis(jnp.clip(indices.astype(jnp.int32), 0, s - 1), 1, n_p)
    kpos = _pad_axis(key_pos, 1, n_p)[:, :, None]  # [b, n, 1]: a column, broadcast over half
    valid_row = _pad_axis(valid.astype(jnp.int32), 1, n_p)[:, None, :]  # [b, 1, n]: a lane row
    inv_freq = _inv_freq_array(d, rope_theta, rope_inv_freq)[None, :]
    qg = _group_rows(q, kvh, rows)

    def per_group(shape):  # (index maps also take the scalar-prefetched refs, if any)
        return pl.BlockSpec((None, None, *shape), lambda bi, hi, *_: (bi, hi, 0, 0))

    # the query positions: an SMEM input, or (dma) scalar-prefetched, which takes no spec
    scalar_specs = [] if gather == "dma" else [_scalar_spec(platform)]
    if gather == "dma":  # each program's row of indices: an SMEM block
        kv_args = (idx[:, None, :], k, v)  # [b, 1, n]: the block's last two dims equal the array's (Mosaic)
        kv_specs = [pl.BlockSpec((None, 1, n_p), lambda bi, hi, *_: (bi, 0, 0), memory_space=pltpu.SMEM),
                    pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)]
    elif gather == "kernel":
        kv_args, kv_specs = (k, v, idx), [per_group((s, d)), per_group((s, d)),
                                          pl.BlockSpec((None, n_p), lambda bi, hi: (bi, 0))]
    else:
        slots = idx[:, None, :, None]
        kv_args = (jnp.take_along_axis(k, slots, axis=2), jnp.take_along_axis(v, slots, axis=2))
        kv_specs = [per_group((n_p, d)), per_group((n_p, d))]
    has_self = k_new is not None
    self_args = (k_new[:, :, None, :], v_new[:, :, None, :]) if has_self else ()
    self_specs = [per_group((1, d)), per_group((1, d))] if has_self else []
    in_specs = [*scalar_specs, per_group((rows, d)), *kv_specs,
                pl.BlockSpec((None, n_p, 1), lambda bi, hi, *_: (bi, 0, 0)),
                pl.BlockSpec((None, 1, n_p), lambda bi, hi, *_: (bi, 0, 0)),
                pl.BlockSpec((1, half), lambda bi, hi, *_: (0, 0)), *self_specs]
    out_shape, out_spec = jax.ShapeDtypeStruct((b, kvh, rows, d), v.dtype), per_group((rows, d))
    if gather == "dma":
        grid = dict(grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b, kvh), in_specs=in_specs, out_specs=out_spec,
            scratch_shapes=[pltpu.VMEM((2, block, d), k.dtype), pltpu.VMEM((2, block, d), v.dtype),
                            pltpu.SemaphoreType.DMA((2, 2))]))
        # CPU: Pallas's TPU interpreter, which runs DMAs and semaphores (the generic one has none)
        interpret = pltpu.InterpretParams() if interpret else False
    else:
        grid = dict(grid=(b, kvh), in_specs=in_specs, out_specs=out_spec)
    out = pl.pallas_call(
        functools.partial(_sparse_kernel, block=block, n_blocks=n_blocks, half=half, gather=gather,
                          has_self=has_self),
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=_compiler_params("tpu" if gather == "dma" else platform, 2),
        name="token_select_attention",
        **grid,
    )(query_pos, qg, *kv_args, kpos, valid_row, inv_freq, *self_args)
    return out[:, :, :g].reshape(b, h, d)


def sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, indices: jax.Array, valid: jax.Array,
                     lengths: jax.Array, *, k_new: jax.Array | None = None, v_new: jax.Array | None = None,
                     rope_theta: float = 10000.0, rope_inv_freq: np.ndarray | jax.Array | None = None,
                     positions: Positions = "compact", block_k: int | None = None, gather: Gather | None = None,
                     interpret: bool = False, use_kernel: bool | None = None) -> jax.Array:
    """Attention of one decode query per row over the selected cache keys, RoPE in-kernel;
    shapes as `sparse_attention_reference`. use_kernel None -> the Pallas kernel on TPU/GPU
    where it takes the sizes, else the reference; interpret=True runs the kernel in the Pallas interpreter. Input
    and block constraints are checked here, before anything is traced."""
    _check_sparse_inputs(q, k, v, indices, valid, lengths, k_new, v_new)
    if positions not in ("compact", "original"):
        raise ValueError(f"positions must be 'compact' or 'original', got {positions!r}")
    kwargs = dict(k_new=k_new, v_new=v_new, rope_theta=rope_theta, rope_inv_freq=rope_inv_freq, positions=positions)
    if use_kernel is None:
        use_kernel = _kernel_by_default(interpret, block_k, indices.shape[1], q.shape[2], 32)
    if not use_kernel:
        return sparse_attention_reference(q, k, v, indices, valid, lengths, **kwargs)
    platform = _platform(interpret)
    _check_block("block_k", block_k or default_block_k(indices.shape[1], platform), platform, q.shape[2], 32)
    return sparse_attention_kernel(q, k, v, indices, valid, lengths, block_k=block_k, gather=gather,
                                   interpret=interpret, **kwargs)
