"""What varies per call of the one forward, as typed arguments (DESIGN decision 11).

* An **attention policy** says how the attention of every layer is computed:
  `DenseAttention` (the jnp reference over explicit masks: every call shape),
  `FlashAttention` (training: blockwise with an online softmax, memory linear in the
  sequence; needs `Segments` instead of a mask) and `TreeKernelAttention` (cached calls
  through the Pallas tree-attention op). A policy that does not apply to a call (the tree
  kernel without a cache or with a sliding window, flash attention with a cache or an
  explicit mask) falls back to `DenseAttention` for that call, so a caller can set one
  policy for a whole decode loop.
* An **execution plan** says which layers run for which row (SkipDecode's active layers;
  Duo-LLM's FFN routes join it).
* `LayerOptions` is the one frozen object the decoder's modules share: everything static
  about a call that is not the model config.

Backend-specific choices are made by the caller (the decode side keeps its CPU tuning in
`jaxaccel.decode.tuning`); nothing here looks at `jax.default_backend()`.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Union

import jax
from jax.sharding import Mesh


@dataclasses.dataclass(frozen=True)
class DenseAttention:
    """`jaxaccel.pallas_kernels.ops.attend`: scores against every visible key, one softmax."""


@dataclasses.dataclass(frozen=True)
class FlashAttention:
    """Uncached attention over packed segments, blockwise with an online softmax and a
    recomputing backward (`jaxaccel.pallas_kernels.flash_attention`): temporary memory grows
    linearly with the sequence. `implementation` None picks the best path for the backend."""

    block_q: int = 128  # 128 x 128 tiles ran fastest on the reference CPU (fwd + bwd, T = 512..2048)
    block_k: int = 128
    implementation: str | None = None


@dataclasses.dataclass(frozen=True)
class TreeKernelAttention:
    """Cached attention through the Pallas tree-attention kernel (committed prefix + an
    ancestor mask among the new tokens). `interpret` runs the kernel in Pallas interpret mode
    (CPU tests); `block_k` None picks the largest of 128..8 dividing the cache length."""

    interpret: bool = False
    block_k: int | None = None


AttentionPolicy = Union[DenseAttention, FlashAttention, TreeKernelAttention]
DENSE = DenseAttention()


class ExecutionPlan(NamedTuple):
    """Which layers run, for which tokens.

    * `active` [batch, n_layers] or [batch, T, n_layers] bool: a row (token) whose flag is off
      for a layer passes its hidden state through that layer unchanged. The layer is still
      computed for the batch (teacher-forced SkipDecode training, per-row masks).
    * `layer_on` [n_layers] bool, the same for the whole batch: a layer whose flag is off is
      not computed at all (`lax.cond`: it costs nothing and writes no K/V) — SkipDecode's
      decode steps. A tuple of Python bools is static instead: the skipped layers are not
      traced at all (one program per layer set). Unrolled parameter layout only (what
      decoding uses).
    """

    active: jax.Array | None = None
    layer_on: jax.Array | None = None


class Segments(NamedTuple):
    """Packed training rows: `ids` [batch, T] int32 (0 = padding); `bidirectional` [batch, T]
    bool or None: tokens of a segment that all see each other (prefix-LM / denoiser inputs).
    Key j is visible to query i when both are in the same non-padding segment and j <= i or
    both are bidirectional; every token sees itself."""

    ids: jax.Array
    bidirectional: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class LayerOptions:
    """Static per-call options shared by Transformer, DecoderBlock and DecoderLayer."""

    deterministic: bool = True  # no dropout
    fused: bool = False  # decode layout: q/k/v and gate/up kernels fused
    dropless: bool = False  # MoE: serve every routing assignment (decoding)
    moe_training: bool = False  # MoE: the training capacity factor
    attention: AttentionPolicy = DENSE
    mesh: Mesh | None = None  # set: activations carry sharding constraints on this mesh
