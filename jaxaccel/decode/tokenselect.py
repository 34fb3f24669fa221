"""TokenSelect (arXiv 2411.02886): long-context decoding over a per-head soft-vote selection
of the KV cache.

Each decode step and layer scores every cached key with the current query, lets the heads
vote (sum over heads of each head's softmax over the candidate keys), keeps the top `k` plus
the first `n_init` and the last `n_local` keys, and attends over only those; RoPE is applied
to the selected keys at their rank in the selection ("compact", the default: a decode step
never sees a position past n_init + k + n_local, a prefill chunk none past that + chunk - 1,
which is why it extrapolates past its trained length when that covers budget + chunk) or at
their true positions ("original"). The model does the work: this method puts
the attention policy `TokenSelectAttention` on the handle, so every forward of the
generation — the chunked prefill (each chunk of `chunk` prompt tokens selects with its mean
query, so a prompt of n tokens costs O(n·k), not O(n²)) and the steps — caches keys before
RoPE and attends through the selection. Selection is per row, so ragged batches work.

Selection cache: per layer and row, a step reuses the last selected top-k while the cosine
between its query (flattened over heads) and the query that chose them is >= `cache_threshold`
(None: never) and the selection is at most `n_local` steps old (so no key written since it
was chosen falls out of the local window unseen); the steps' per-layer `SelectionState`s
are the method state, passed through the forward like the KV cache. `stats` reports the hit
rate over the steps that needed a selection (rows longer than the budget).

    lm.generate(prompts, method="tokenselect", k=2048, n_init=128, n_local=512)
    lm.generate(prompts, method="tokenselect", k=64, n_init=4, n_local=32, pool=3, cache_threshold=None)
    lm.generate(prompts, method="tokenselect", selection="recent")   # StreamingLLM at the same budget

Baselines at the same budget (`selection`): "recent" spends the k slots on the keys right
before the local window (StreamingLLM: init + a local window of k + n_local), "random" on k
candidates drawn uniformly; the default "topk" is TokenSelect's soft vote. The baselines have
no selection cache (they select afresh at every step; a `cache_threshold` with them is refused).

The official code (an SGLang patch) pairs query head h with KV head h % n_kv_heads; here it
is the standard GQA map h // (n_heads // n_kv_heads).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxaccel.config import ModelConfig
from jaxaccel.decode.autoregressive import choose
from jaxaccel.decode.engine import DecodeMethod, DecodeState, StepContext, commit
from jaxaccel.decode.tree import positive_int
from jaxaccel.errors import InvalidArgumentError
from jaxaccel.model.options import SelectionState, TokenSelectAttention

POSITIONS = ("compact", "original")
SELECTIONS = ("topk", "recent", "random")


class TokenSelectState(NamedTuple):
    layers: tuple[SelectionState, ...]  # one selection cache per layer


def _non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InvalidArgumentError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


class TokenSelect(DecodeMethod):
    name = "tokenselect"
    options: dict = {"k": 2048, "n_init": 128, "n_local": 512, "chunk": 512, "pool": None, "cache_threshold": 0.9,
                     "positions": "compact", "selection": "topk"}
    prefill_reads_whole_cache = False  # each chunk attends over its selection (O(n k), not O(n^2))
    THRESHOLD_RANGE = (-1.0, 1.0)  # a cosine

    def __init__(self, **opts: Any):
        super().__init__(**opts)
        o = self.opts
        positive_int("k", o["k"])
        positive_int("chunk", o["chunk"])
        _non_negative_int("n_init", o["n_init"])
        _non_negative_int("n_local", o["n_local"])
        pool = o["pool"]
        if pool is not None and (isinstance(pool, bool) or not isinstance(pool, (int, np.integer)) or pool < 1
                                 or pool % 2 == 0):
            raise InvalidArgumentError(f"pool must be an odd integer >= 1 or None, got {pool!r}")
        threshold = o["cache_threshold"]
        lo, hi = self.THRESHOLD_RANGE
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number))
                                      or not lo <= threshold <= hi):
            raise InvalidArgumentError(f"cache_threshold must be a number in [{lo:g}, {hi:g}] or None, "
                                       f"got {threshold!r}")
        if o["positions"] not in POSITIONS:
            raise InvalidArgumentError(f"positions must be 'compact' or 'original', got {o['positions']!r}")
        if o["selection"] not in SELECTIONS:
            raise InvalidArgumentError(f"selection must be 'topk', 'recent' or 'random', got {o['selection']!r}")
        if o["selection"] != "topk":  # a baseline selects afresh at every step, as its method does
            if opts.get("cache_threshold") is not None:
                raise InvalidArgumentError(f"cache_threshold is for selection='topk' only; selection="
                                           f"{o['selection']!r} selects afresh at every step (leave it unset)")
            o["cache_threshold"] = None
            if opts.get("pool") is not None:
                raise InvalidArgumentError(f"pool is for selection='topk' only; selection={o['selection']!r} "
                                           f"does not score keys (leave it unset)")

    def policy(self) -> TokenSelectAttention:
        o = self.opts
        threshold = None if o["cache_threshold"] is None else float(o["cache_threshold"])
        return TokenSelectAttention(k=int(o["k"]), n_init=int(o["n_init"]), n_local=int(o["n_local"]),
                                    pool=None if o["pool"] is None else int(o["pool"]), positions=o["positions"],
                                    cache_threshold=threshold, selection=o["selection"])

    def forward_defaults(self) -> dict[str, Any]:
        return {"attention": self.policy()}

    def prefill_defaults(self) -> dict[str, Any]:
        # Prefill carries no selection state, so it never reads the cache threshold.
        return {"attention": dataclasses.replace(self.policy(), cache_threshold=None)}

    def positions_seen(self, positions: int, config: ModelConfig) -> int:
        """Compact positions reach at most the budget + a prefill chunk: a decode step's query
        sits right after its <= n_init + k + n_local selected keys, a prefill chunk's tokens
        after the keys they select (so the model's trained length must cover budget + chunk
        for the method to stay within it). Original positions, and a sliding-window model
        (nothing is selected), see every position."""
        if self.opts["positions"] == "original" or config.sliding_window is not None:
            return positions
        return min(positions, self.policy().budget + int(self.opts["chunk"]))

    def prefill_chunk(self) -> int:
        return int(self.opts["chunk"])

    def check(self, config: ModelConfig) -> None:
        if config.resolved_head_dim % 2:
            raise InvalidArgumentError(f"tokenselect needs an even head_dim (RoPE), got {config.resolved_head_dim}")
        if config.sliding_window is not None:
            warnings.warn(f"tokenselect: this model attends over a sliding window of {config.sliding_window} tokens, "
                          f"so no key is selected: every step attends over the window at its true positions, as "
                          f"autoregressive does", stacklevel=2)

    def init_state(self, ctx: StepContext, batch: int, method_input: Any, prompt_tokens=None,
                   prompt_lens=None) -> TokenSelectState:
        cfg = ctx.config
        # A k past the cache's slots selects nothing (the whole cache fits the budget, and the
        # forward attends over all of it, passing the state through): no [batch, k] state then.
        k = min(int(self.opts["k"]), max(ctx.cache_slots, 1))
        layer = SelectionState.empty(batch, k, cfg.n_heads * cfg.resolved_head_dim)
        return TokenSelectState(layers=(layer,) * cfg.n_layers)

    def step(self, state: DecodeState, ctx: StepContext) -> DecodeState:
        ms: TokenSelectState = state.method_state
        positions = state.cache_len[:, None]
        logits, cache, layers = ctx.model.forward(state.last_token[:, None], positions, cache=state.cache,
                                                  write_slots=positions, prefix_len=state.cache_len,
                                                  attention_state=ms.layers)
        # Finished rows still run (static shapes) but no longer count towards the hit rate.
        live = ~state.done
        layers = tuple(new._replace(hits=jnp.where(live, new.hits, old.hits),
                                    lookups=jnp.where(live, new.lookups, old.lookups))
                       for new, old in zip(layers, ms.layers))
        state, token = choose(state._replace(cache=cache, method_state=TokenSelectState(layers)), logits[:, 0], ctx)
        return commit(state, token[:, None], jnp.ones_like(token), ctx)

    def final_state(self, method_state: TokenSelectState) -> Any:
        """(hits, lookups), each [n_layers, batch] int32."""
        return (jnp.stack([layer.hits for layer in method_state.layers]),
                jnp.stack([layer.lookups for layer in method_state.layers]))

    def stats(self, method_output: Any, batch: int) -> dict[str, Any]:
        hits, lookups = (np.asarray(x)[:, :batch] for x in method_output)
        n_hits, n_lookups = int(hits.sum()), int(lookups.sum())
        cached = self.policy().cache_threshold is not None  # (no selection cache: no hit rate, not 0)
        return {"selection_budget": self.policy().budget, "selection_lookups": n_lookups,
                "selection_cache_hits": n_hits,
                "selection_cache_hit_rate": n_hits / n_lookups if n_lookups and cached else None,
                "selection_cache_hit_rate_per_layer": [int(h) / int(n) if n and cached else None
                                                       for h, n in zip(hits.sum(1), lookups.sum(1))]}
