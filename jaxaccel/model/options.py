"""What varies per call of the one forward, as typed arguments (DESIGN decision 11).

* An **attention policy** says how the attention of every layer is computed:
  `DenseAttention` (the jnp reference over explicit masks: every call shape),
  `FlashAttention` (training: blockwise with an online softmax, memory linear in the
  sequence; needs `Segments` instead of a mask), `TreeKernelAttention` (cached calls
  through the Pallas tree-attention op) and `TokenSelectAttention` (cached calls attend to a
  per-row selection of the cache; its per-layer selection cache, `SelectionState`, is a
  forward argument and result like the KV cache). A policy that does not apply to a call (the tree
  kernel without a cache or with a sliding window, flash attention with a cache or an
  explicit mask) falls back to `DenseAttention` for that call, so a caller can set one
  policy for a whole decode loop.
* An **execution plan** says which layers run for which row (SkipDecode's active layers)
  and which FFN each token takes in each layer (Duo-LLM's routes).
* `LayerOptions` is the one frozen object the decoder's modules share: everything static
  about a call that is not the model config.

Backend-specific choices are made by the caller (the decode side keeps its CPU tuning in
`jaxaccel.decode.tuning`); nothing here looks at `jax.default_backend()`.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Union

import jax
import jax.numpy as jnp
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


@dataclasses.dataclass(frozen=True)
class TokenSelectAttention:
    """TokenSelect (arXiv 2411.02886): cached calls attend to a few selected cache keys.

    The cache holds keys *before* RoPE (every cached call under this policy writes them so;
    the whole generation, prefill included, must run it). Per layer and row:
    * a decode step (one new token) scores the committed keys with its query,
      s[h, j] = q_h . k_j (q unscaled and un-rotated, query head h reading KV head h // group —
      the official code reads KV head h % n_kv_heads), lets the heads vote (sum over h of
      softmax_j s[h, :], over the candidate keys between the first `n_init` and the last
      `n_local`), optionally max-pools the votes over `pool` neighbours, keeps the top `k`,
      and attends over init + top-k + local + itself;
    * a prefill chunk (several new tokens) selects the same way with the mean of its queries,
      then each token attends over that selection plus the chunk's earlier tokens;
    * RoPE is applied to the selected keys at their rank in the selection ("compact") or at
      their slot ("original"); the query sits right after them.
    A row whose committed length fits in n_init + k + n_local selects every key (compact
    rank == slot): plain attention. When the whole cache fits (or a sliding window or an extra
    cache mask decides visibility), plain attention over the cache's keys rotated at their
    slots: the same result as the dense policy over a rotated cache.
    Selection cache: a step reuses the row's last top-k while the cosine between its query
    (flattened over heads) and the query that chose them is >= `cache_threshold` (None:
    never) and the selection is at most `n_local` steps old (every key written since it was
    chosen is still in the local window). `use_kernel` None: `generate` decides per request
    (`decode.tuning.token_select_policy`: the Pallas kernels on TPU/GPU once they matched
    their jnp references on that shape, the references on CPU or a mesh); a forward called directly
    with None runs the kernels on TPU/GPU unchecked. `interpret` runs the kernels in the
    Pallas interpreter (tests). `gather`: how the sparse attention kernel reads the selected
    keys ("kernel", "dma", "xla"; None: the backend's default, TPU's "dma", which `generate`
    replaces by "xla" when the DMA kernel fails its first-use check and the XLA one passes).
    `selection` picks the k candidates: "topk" (the soft votes above), or a baseline at the
    same budget that scores no key — "recent" (the k candidates right before the local
    window: StreamingLLM's init + local window) or "random" (k candidates uniformly at
    random, a fresh draw per row, step, layer and example: seeded by the row's length and
    query — whose float bits, so the draw, differ with the batch and the backend; `pool` and
    the selection cache apply to "topk" only:
    `decode.tokenselect` gives the baselines `cache_threshold=None`)."""

    k: int = 2048
    n_init: int = 128
    n_local: int = 512
    pool: int | None = None
    positions: str = "compact"  # "compact" | "original"
    cache_threshold: float | None = 0.9
    use_kernel: bool | None = None
    interpret: bool = False
    selection: str = "topk"  # "topk" | "recent" | "random"
    gather: str | None = None  # the sparse attention kernel's gather; None: the backend's (see above)

    @property
    def budget(self) -> int:
        """Keys a long row attends to (besides the new tokens themselves)."""
        return self.n_init + self.k + self.n_local


class SelectionState(NamedTuple):
    """One layer's TokenSelect selection cache, per row (the forward's `attention_state` is a
    tuple of these, one per layer; decode steps read and update it).

    top [batch, k] int32: the top-k candidate slots of the last fresh selection (ascending);
    query [batch, n_heads * head_dim] float32: the query that chose them; filled [batch] bool:
    `top` holds a selection; hits / lookups [batch] int32: steps that reused `top` / steps of
    a row longer than the budget (which needed a selection); length [batch] int32: the row's
    committed length when `top` was chosen (a selection more than n_local steps old is not
    reused: the keys written since would have left the local window unseen)."""

    top: jax.Array
    query: jax.Array
    filled: jax.Array
    hits: jax.Array
    lookups: jax.Array
    length: jax.Array

    @classmethod
    def empty(cls, batch: int, k: int, query_dim: int) -> "SelectionState":
        zeros = lambda dtype, *shape: jnp.zeros((batch, *shape), dtype)  # noqa: E731
        return cls(zeros(jnp.int32, k), zeros(jnp.float32, query_dim), zeros(bool), zeros(jnp.int32),
                   zeros(jnp.int32), zeros(jnp.int32))


AttentionPolicy = Union[DenseAttention, FlashAttention, TreeKernelAttention, TokenSelectAttention]
DENSE = DenseAttention()


class ExecutionPlan(NamedTuple):
    """Which layers run, for which tokens.

    * `active` [batch, n_layers] or [batch, T, n_layers] bool: a row (token) whose flag is off
      for a layer passes its hidden state through that layer unchanged. The layer is still
      computed for the batch (teacher-forced SkipDecode training, per-row masks); in an MoE
      layer such a token is routed like padding: it takes no expert slot.
    * `layer_on` [n_layers] bool, the same for the whole batch: a layer whose flag is off is
      not computed at all (`lax.cond`: it costs nothing and writes no K/V) — SkipDecode's
      decode steps. A tuple of Python bools is static instead: the skipped layers are not
      traced at all (one program per layer set). Unrolled parameter layout only (what
      decoding uses).
    * `routes` [batch, T, n_layers] int (also [batch, n_layers]: one route per row and layer,
      or [n_layers]: for the whole batch; a tuple of n_layers Python ints is static: each
      layer traces only its FFN — decoding with a fixed pattern), Duo-LLM models only: which FFN each token takes in
      each layer — 0 big, 1 small, 2 skip (`jaxaccel.model.duo`). None: every token takes the
      big FFN. How the routes are executed follows from the call (`duo.dispatch_mode`):
      uncached calls compute both FFNs and select (training; the reference), cached calls
      group the tokens by route (several tokens) or switch on it (one token). A Duo model with
      a router (`config.duo.router`) and no routes here takes its router's routes.
    * `soft_routes` (static Python bool, None = False; build the plan inside a jitted function,
      as for a tuple `layer_on`): a router mixes the two FFNs by its probabilities,
      p_big * big + (1 - p_big) * small, instead of picking one (stage-2 router training; the
      temperature is a scale of the router's parameters, `duo.scale_router`).
    """

    active: jax.Array | None = None
    layer_on: jax.Array | None = None
    routes: jax.Array | None = None
    soft_routes: bool | None = None


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
    soft_routes: bool = False  # Duo-LLM router: mix the FFNs by its probabilities (ExecutionPlan.soft_routes)
