"""Memory-efficient (flash) self-attention for training: packed segments, no KV cache.

`flash_attention(q, k, v, segment_ids, bidirectional)` computes the same attention as the
model's reference (`attend` over the [batch, T, T] mask of `data.objectives.attention_mask`)
without ever building a [T, T] array: query i sees key j iff

    (seg[i] == seg[j] and seg[i] != 0 and (j <= i or (bid[i] and bid[j])))  or  i == j

so packed documents never see each other, a bidirectional prefix (prefix-LM) sees itself
both ways, and a padding row (segment 0) sees only itself, which keeps it finite.

Shapes: q [batch, T, heads, head_dim], already scaled by 1/sqrt(head_dim); k, v
[batch, T, kv_heads, head_dim] with heads a multiple of kv_heads (query head h reads KV head
h // (heads // kv_heads)); segment_ids [batch, T] int, >= 0, 0 = padding; bidirectional
[batch, T] bool or None (None = causal within segments). Returns [batch, T, heads, head_dim].

Dtype policy: matmul operands stay in the input dtype (bf16 allowed), every score, softmax
statistic and accumulator is float32 (`preferred_element_type`), probabilities are cast to
v's dtype before the P @ V product (as `attend` does), and the output is v's dtype. Gradients
are accumulated in float32 and returned in the dtypes of q, k and v.

Memory: the jnp path is a `jax.custom_vjp`. The forward runs an online (flash) softmax over
[block_q, block_k] tiles and saves only q, k, v, the output and a float32 logsumexp per query
row (O(T) extra); the backward is the FlashAttention-2 one (Dao 2023, Alg. 2): it recomputes
each tile's probabilities from the logsumexp and accumulates dq, dk, dv tile by tile. Peak
temporary memory of forward and backward therefore grows linearly in T (one tile of scores
per step plus O(T) state) where the dense reference grows quadratically.

Work skipping: without `bidirectional`, key tiles entirely above the causal diagonal are never
visited (static loop bounds), and any tile whose mask is empty for every row of the batch (a
tile between two packed documents) is skipped with `lax.cond` at run time.

Backends (checked against the installed jax 0.10.2):
* TPU: `implementation="splash"` (the default on TPU when `bidirectional` is None) runs
  `jax.experimental.pallas.ops.tpu.splash_attention` with a causal `MultiHeadMask` and
  `SegmentIds`, vmapped over the batch, GQA native. Splash's segment rule has no notion of
  padding, so each padding token (and each token added to reach a multiple of the block
  size) gets its own negative segment id: it then sees only itself, exactly our rule. Block
  sizes must be multiples of 128 (splash's lane width). With `bidirectional` the mask
  depends on data, which splash's static masks cannot express, so the jnp path is used.
  The kernel is a custom call that GSPMD cannot partition: on a multi-device mesh, call
  `flash_attention` inside `shard_map` over the batch axes (not done here).
  The splash path lowers from a CPU host (`lowering_platforms=('tpu',)`, see the tests) and
  matches the jnp path in Pallas interpret mode, but it has not been compiled by libtpu or
  run on a TPU.
* GPU: the jnp path (XLA fuses it reasonably). No fused path in jax 0.10.2 fits:
  `jax.nn.dot_product_attention` (XLA or cuDNN) takes causal masks and per-row sequence
  lengths but no segment ids, so packed documents would see each other;
  `pallas.ops.gpu.attention.mha` has segment ids but is an example op on the Triton lowering
  the Pallas docs mark deprecated, and `attention_mgpu` (Mosaic GPU) has no segment ids.
* CPU: the jnp path.
"""
from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from jaxaccel.pallas_kernels.ops import MASKED_SCORE, segment_visible

# Splash attention tiles the key axis in lanes of 128.
_SPLASH_LANES = 128

Implementation = Literal["jnp", "splash"]


# ----------------------------------------------------------------------------- public op


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                    bidirectional: jax.Array | None = None, *, block_q: int = 128, block_k: int = 128,
                    implementation: Implementation | None = None, interpret: bool = False) -> jax.Array:
    """Segment-masked causal (optionally prefix-bidirectional) GQA self-attention, O(T) memory.

    q: [batch, T, heads, head_dim], already scaled by 1/sqrt(head_dim).
    k, v: [batch, T, kv_heads, head_dim]; heads % kv_heads == 0.
    segment_ids: [batch, T] int, >= 0; 0 marks padding (sees only itself).
    bidirectional: [batch, T] bool or None; tokens i, j of one segment with both flags set see
      each other regardless of order (prefix-LM). None = causal within segments.
    block_q, block_k: tile sizes; T need not be a multiple (inputs are padded, masked).
    implementation: "jnp" (custom-VJP flash reference, any backend), "splash" (TPU kernel;
      causal only, blocks multiples of 128) or None = "splash" on TPU when it applies, else
      "jnp".
    interpret: run the splash kernel in the Pallas interpreter (any backend, slow; for tests).
      With implementation=None it selects splash wherever splash applies.
    Returns [batch, T, heads, head_dim] in v's dtype.
    """
    _check_inputs(q, k, v, segment_ids, bidirectional, block_q, block_k)
    splash_problem = _splash_problem(bidirectional, block_q, block_k)
    if implementation is None:
        kernel_wanted = interpret or jax.default_backend() == "tpu"
        implementation = "splash" if kernel_wanted and splash_problem is None else "jnp"
    if implementation == "splash":
        if splash_problem is not None:
            raise ValueError(f"implementation='splash' does not apply: {splash_problem}")
        return _splash_attention(q, k, v, segment_ids, block_q, block_k, interpret=interpret)
    if implementation != "jnp":
        raise ValueError(f"implementation must be 'jnp', 'splash' or None, got {implementation!r}")
    if bidirectional is not None:
        bidirectional = bidirectional.astype(jnp.bool_)
    return _flash_jnp(q, k, v, segment_ids.astype(jnp.int32), bidirectional, block_q, block_k)


def _check_inputs(q, k, v, segment_ids, bidirectional, block_q: int, block_k: int) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [batch, T, heads, head_dim]; got {q.shape}, {k.shape}, {v.shape}")
    b, t, h, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != d:
        raise ValueError(f"k and v must be [{b}, {t}, kv_heads, {d}]; got {k.shape} and {v.shape}")
    if h % k.shape[2]:
        raise ValueError(f"heads ({h}) must be a multiple of kv_heads ({k.shape[2]})")
    if segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must be [{b}, {t}]; got {segment_ids.shape}")
    if bidirectional is not None and bidirectional.shape != (b, t):
        raise ValueError(f"bidirectional must be [{b}, {t}] or None; got {bidirectional.shape}")
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be positive; got block_q={block_q}, block_k={block_k}")


# ----------------------------------------------------------------------------- jnp flash path
#
# Internal layout: the query heads of one KV group sit next to each other, so one K/V tile
# serves all of them: q tiles [batch, kv_heads, group, block_q, head_dim], K/V tiles
# [batch, kv_heads, block_k, head_dim]. Tiles are stacked on a leading block axis so loops
# index them with a scalar.


def _num_blocks(length: int, block: int) -> int:
    return -(-length // block)


def _pad_axis1(x: jax.Array, length: int) -> jax.Array:
    """Pads axis 1 (time) with zeros (segment 0 / False / 0.0) up to `length`."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, length - x.shape[1])
    return jnp.pad(x, pad)


def _query_blocks(x: jax.Array, kv_heads: int, block: int) -> jax.Array:
    """[b, T, heads, d] -> [n_blocks, b, kv_heads, group, block, d] (T padded)."""
    b, t, h, d = x.shape
    n = _num_blocks(t, block)
    x = _pad_axis1(x, n * block).reshape(b, n, block, kv_heads, h // kv_heads, d)
    return x.transpose(1, 0, 3, 4, 2, 5)


def _unquery_blocks(x: jax.Array, t: int) -> jax.Array:
    """Inverse of `_query_blocks`: [n, b, kvh, g, block, d] -> [b, T, kvh * g, d]."""
    n, b, kvh, g, block, d = x.shape
    return x.transpose(1, 0, 4, 2, 3, 5).reshape(b, n * block, kvh * g, d)[:, :t]


def _key_blocks(x: jax.Array, block: int) -> jax.Array:
    """[b, T, kv_heads, d] -> [n_blocks, b, kv_heads, block, d] (T padded)."""
    b, t, kvh, d = x.shape
    n = _num_blocks(t, block)
    return _pad_axis1(x, n * block).reshape(b, n, block, kvh, d).transpose(1, 0, 3, 2, 4)


def _unkey_blocks(x: jax.Array, t: int) -> jax.Array:
    """Inverse of `_key_blocks`: [n, b, kvh, block, d] -> [b, T, kvh, d]."""
    n, b, kvh, block, d = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(b, n * block, kvh, d)[:, :t]


def _token_blocks(x: jax.Array, block: int) -> jax.Array:
    """[b, T] -> [n_blocks, b, block] (T padded with 0 / False)."""
    b, t = x.shape
    n = _num_blocks(t, block)
    return _pad_axis1(x, n * block).reshape(b, n, block).transpose(1, 0, 2)


def _row_blocks(x: jax.Array, kv_heads: int, block: int) -> jax.Array:
    """Per-row statistic [b, T, heads] -> [n_blocks, b, kv_heads, group, block]."""
    return _query_blocks(x[..., None], kv_heads, block)[..., 0]


def _causal_key_blocks_end(q_block: jax.Array, block_q: int, block_k: int, n_k: int) -> jax.Array:
    """Key blocks [0, end) hold every key a causal query block can see (its last row's)."""
    return jnp.minimum(n_k, ((q_block + 1) * block_q - 1) // block_k + 1)


def _causal_query_blocks_start(k_block: jax.Array, block_q: int, block_k: int) -> jax.Array:
    """Query blocks before this one lie entirely above the causal diagonal of the key block."""
    return (k_block * block_k) // block_q


def _flash_forward(q, k, v, segment_ids, bidirectional, block_q: int, block_k: int):
    """Online-softmax forward. Returns (out [b, T, h, d] v.dtype, lse [n_q, b, kvh, g, bq] f32)."""
    b, t, h, d = q.shape
    kvh = k.shape[2]
    n_k = _num_blocks(t, block_k)
    q_blocks = _query_blocks(q, kvh, block_q)
    k_blocks, v_blocks = _key_blocks(k, block_k), _key_blocks(v, block_k)
    seg_q_blocks, seg_k_blocks = _token_blocks(segment_ids, block_q), _token_blocks(segment_ids, block_k)
    causal_only = bidirectional is None
    bid_q_blocks = None if causal_only else _token_blocks(bidirectional, block_q)
    bid_k_blocks = None if causal_only else _token_blocks(bidirectional, block_k)

    def one_query_block(i, xs):
        q_tile, seg_q, bid_q = xs
        row_shape = q_tile.shape[:-1]  # [b, kvh, g, bq]

        def one_key_block(j, carry):
            seg_k = seg_k_blocks[j]
            bid_k = None if causal_only else bid_k_blocks[j]
            visible = segment_visible(seg_q, seg_k, bid_q, bid_k, i * block_q, j * block_k)

            def update(carry):
                row_max, row_sum, acc = carry
                k_tile, v_tile = k_blocks[j], v_blocks[j]
                scores = jnp.einsum("bkgqd,bktd->bkgqt", q_tile, k_tile, preferred_element_type=jnp.float32)
                visible_ = visible[:, None, None]
                scores = jnp.where(visible_, scores, MASKED_SCORE)
                new_max = jnp.maximum(row_max, jnp.max(scores, axis=-1))
                # The where() keeps masked keys at exactly 0 even while a row has seen only
                # masked scores (new_max == MASKED_SCORE would otherwise give them weight 1).
                probs = jnp.where(visible_, jnp.exp(scores - new_max[..., None]), 0.0)
                rescale = jnp.exp(row_max - new_max)
                row_sum = rescale * row_sum + jnp.sum(probs, axis=-1)
                acc = rescale[..., None] * acc + jnp.einsum(
                    "bkgqt,bktd->bkgqd", probs.astype(v_tile.dtype), v_tile, preferred_element_type=jnp.float32)
                return new_max, row_sum, acc

            # A tile that no row of the batch may see (between packed documents) costs no matmul.
            return lax.cond(jnp.any(visible), update, lambda c: c, carry)

        init = (jnp.full(row_shape, MASKED_SCORE, jnp.float32), jnp.zeros(row_shape, jnp.float32),
                jnp.zeros((*row_shape, d), jnp.float32))
        end = _causal_key_blocks_end(i, block_q, block_k, n_k) if causal_only else n_k
        row_max, row_sum, acc = lax.fori_loop(0, end, one_key_block, init)
        # Real rows always see their own key (row_sum > 0); only rows added by padding T up to
        # a multiple of block_q can see nothing, and they are sliced off.
        row_sum = jnp.where(row_sum > 0, row_sum, 1.0)
        out_tile = (acc / row_sum[..., None]).astype(v.dtype)
        return i + 1, (out_tile, row_max + jnp.log(row_sum))

    xs = (q_blocks, seg_q_blocks, bid_q_blocks)
    _, (out_blocks, lse_blocks) = lax.scan(one_query_block, jnp.int32(0), xs)
    return _unquery_blocks(out_blocks, t), lse_blocks


def _flash_backward(q, k, v, segment_ids, bidirectional, out, lse_blocks, d_out, block_q: int, block_k: int):
    """FlashAttention-2 backward: returns (dq, dk, dv) in the dtypes of q, k, v."""
    b, t, h, d = q.shape
    kvh = k.shape[2]
    n_q = _num_blocks(t, block_q)
    d_out = d_out.astype(v.dtype)
    # delta_i = sum_j P_ij dP_ij = dO_i . O_i: the softmax Jacobian's row term, O(T).
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    q_blocks, d_out_blocks = _query_blocks(q, kvh, block_q), _query_blocks(d_out, kvh, block_q)
    delta_blocks = _row_blocks(delta, kvh, block_q)
    seg_q_blocks = _token_blocks(segment_ids, block_q)
    causal_only = bidirectional is None
    bid_q_blocks = None if causal_only else _token_blocks(bidirectional, block_q)
    xs = (_key_blocks(k, block_k), _key_blocks(v, block_k), _token_blocks(segment_ids, block_k),
          None if causal_only else _token_blocks(bidirectional, block_k))

    # Outer loop over key blocks keeps dk, dv of one block in the carry; dq of every query
    # block is a float32 O(T) buffer that each key block adds its share to.
    def one_key_block(carry, xs):
        j, dq_blocks = carry
        k_tile, v_tile, seg_k, bid_k = xs

        def one_query_block(i, inner):
            bid_q = None if causal_only else bid_q_blocks[i]
            visible = segment_visible(seg_q_blocks[i], seg_k, bid_q, bid_k, i * block_q, j * block_k)

            def update(inner):
                dq_blocks, dk_acc, dv_acc = inner
                q_tile, d_out_tile = q_blocks[i], d_out_blocks[i]
                visible_ = visible[:, None, None]
                scores = jnp.einsum("bkgqd,bktd->bkgqt", q_tile, k_tile, preferred_element_type=jnp.float32)
                probs = jnp.where(visible_, jnp.exp(jnp.where(visible_, scores, MASKED_SCORE)
                                                    - lse_blocks[i][..., None]), 0.0)
                dv_acc = dv_acc + jnp.einsum("bkgqt,bkgqd->bktd", probs.astype(v.dtype), d_out_tile,
                                             preferred_element_type=jnp.float32)
                d_probs = jnp.einsum("bkgqd,bktd->bkgqt", d_out_tile, v_tile, preferred_element_type=jnp.float32)
                d_scores = probs * (d_probs - delta_blocks[i][..., None])
                # q is pre-scaled, so dS maps to dq and dk with no softmax-scale factor; the
                # sums over the group axis g add the query heads of a KV group into dk.
                dq_tile = jnp.einsum("bkgqt,bktd->bkgqd", d_scores.astype(k.dtype), k_tile,
                                     preferred_element_type=jnp.float32)
                dk_acc = dk_acc + jnp.einsum("bkgqt,bkgqd->bktd", d_scores.astype(q.dtype), q_tile,
                                             preferred_element_type=jnp.float32)
                return dq_blocks.at[i].add(dq_tile), dk_acc, dv_acc

            return lax.cond(jnp.any(visible), update, lambda c: c, inner)

        start = _causal_query_blocks_start(j, block_q, block_k) if causal_only else 0
        zeros_kv = jnp.zeros(k_tile.shape, jnp.float32)
        dq_blocks, dk_tile, dv_tile = lax.fori_loop(start, n_q, one_query_block, (dq_blocks, zeros_kv, zeros_kv))
        return (j + 1, dq_blocks), (dk_tile, dv_tile)

    dq_init = jnp.zeros(q_blocks.shape, jnp.float32)
    (_, dq_blocks), (dk_blocks, dv_blocks) = lax.scan(one_key_block, (jnp.int32(0), dq_init), xs)
    dq = _unquery_blocks(dq_blocks, t).astype(q.dtype)
    return dq, _unkey_blocks(dk_blocks, t).astype(k.dtype), _unkey_blocks(dv_blocks, t).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash_jnp(q, k, v, segment_ids, bidirectional, block_q: int, block_k: int) -> jax.Array:
    out, _ = _flash_forward(q, k, v, segment_ids, bidirectional, block_q, block_k)
    return out


def _flash_jnp_fwd(q, k, v, segment_ids, bidirectional, block_q: int, block_k: int):
    out, lse_blocks = _flash_forward(q, k, v, segment_ids, bidirectional, block_q, block_k)
    return out, (q, k, v, segment_ids, bidirectional, out, lse_blocks)


def _flash_jnp_bwd(block_q: int, block_k: int, residuals, d_out):
    q, k, v, segment_ids, bidirectional, out, lse_blocks = residuals
    dq, dk, dv = _flash_backward(q, k, v, segment_ids, bidirectional, out, lse_blocks, d_out, block_q, block_k)
    # Segment ids and flags are integer / bool inputs: no cotangent.
    return dq, dk, dv, None, None


_flash_jnp.defvjp(_flash_jnp_fwd, _flash_jnp_bwd)


# ----------------------------------------------------------------------------- TPU splash path


def _splash_problem(bidirectional, block_q: int, block_k: int) -> str | None:
    """Why splash attention cannot run this call, or None when it can."""
    if bidirectional is not None:
        return "bidirectional prefixes make the mask data-dependent; splash masks are static"
    if block_q % _SPLASH_LANES or block_k % _SPLASH_LANES:
        return f"block_q and block_k must be multiples of {_SPLASH_LANES}; got {block_q}, {block_k}"
    return None


def _splash_attention(q, k, v, segment_ids, block_q: int, block_k: int, *, interpret: bool) -> jax.Array:
    """Causal + segment attention through TPU splash attention (see the module docstring)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, t, h, d = q.shape
    t_pad = _num_blocks(t, math.lcm(block_q, block_k)) * math.lcm(block_q, block_k)
    # Every padding token (given or added) becomes its own segment, -1 - position: splash then
    # lets it see only itself and no real token sees it -- our rule, which splash lacks.
    positions = jnp.arange(t_pad, dtype=jnp.int32)[None]
    segments = _pad_axis1(segment_ids.astype(jnp.int32), t_pad)
    segments = jnp.where(segments == 0, -1 - positions, segments)
    q, k, v = (_pad_axis1(x, t_pad).transpose(0, 2, 1, 3) for x in (q, k, v))  # [b, heads, T, d]

    block_sizes = splash.BlockSizes(block_q=block_q, block_kv=block_k, block_kv_compute=block_k,
                                    block_q_dkv=block_q, block_kv_dkv=block_k, block_kv_dkv_compute=block_k,
                                    block_q_dq=block_q, block_kv_dq=block_k)
    mask = splash.MultiHeadMask([splash.CausalMask((t_pad, t_pad)) for _ in range(h)])
    kernel = splash.make_splash_mha_single_device(mask, block_sizes=block_sizes, interpret=interpret)
    out = jax.vmap(lambda q_, k_, v_, s_: kernel(q_, k_, v_, splash.SegmentIds(q=s_, kv=s_)))(q, k, v, segments)
    return out.transpose(0, 2, 1, 3)[:, :t].astype(v.dtype)
