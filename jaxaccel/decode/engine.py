"""The decode engine: two jitted programs per cache length — chunked prefill
(`prefill_cache`) and one `lax.while_loop` (`generate_loop`, the cache donated to it).

The loop state is a typed NamedTuple (`DecodeState`); a decoding method is a pure
`step(state, ctx) -> state` plugged into the loop (t5x's `decoding.py` shape). Methods reach
the model only through `ctx.model`, a `ModelHandle` (params + config + forward +
init_cache): the engine never names a model, and a draft model is a second handle. The
autoregressive step lives in `autoregressive.py`; speculative and early-exit methods are
other step functions over the same state, the same cache and the same `commit`.

Cache discipline: `state.last_token` is the newest accepted token and is *not* yet in the
cache; it sits at position `state.cache_len`. A step writes it (and any draft tokens) into
slots starting at `cache_len`, picks the next tokens, and `commit` advances `cache_len` by the
number of tokens accepted. Committed entries always sit in slot == position, so nothing is
ever shifted or recomputed.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jaxaccel.config import ModelConfig
from jaxaccel.decode.sampling import SamplingMode, SamplingParams
from jaxaccel.model.options import DENSE, AttentionPolicy
from jaxaccel.model.transformer import ModelHandle


PREFILL_CHUNK = 128  # prompt tokens per prefill forward


class DecodeState(NamedTuple):
    cache: Any  # tuple[LayerKV, ...], each [batch, kv_heads, cache_len, head_dim]
    cache_len: jax.Array  # [batch] int32: committed entries = position of last_token
    last_token: jax.Array  # [batch] int32: newest accepted token, not yet in the cache
    out_tokens: jax.Array  # [batch, out_len] int32: generated tokens (prompt excluded)
    num_new: jax.Array  # [batch] int32
    done: jax.Array  # [batch] bool
    rng: jax.Array  # [batch] PRNG keys: a row's randomness does not depend on its batch
    step: jax.Array  # () int32: loop iterations
    forwards: jax.Array  # [batch] int32: target forwards run while the row was live
    method_state: Any  # whatever the method carries (e.g. a recycling matrix)


class StepContext(NamedTuple):
    """What every step function may read. Static fields are Python values; the rest traced."""

    model: ModelHandle  # the target model: params (traced) + config (static)
    mode: SamplingMode
    sampling: SamplingParams
    eos_ids: jax.Array  # [n_eos] int32 (may be empty)
    max_new: jax.Array  # () int32
    tree_attention: AttentionPolicy = DENSE  # static: what a tree-verification forward runs (decode.tuning)
    draft: ModelHandle | None = None  # a draft model's handle (draft-model speculation), else None
    cache_slots: int = 0  # static: slots of the target's KV cache (a draft's cache gets as many)
    method_params: Any = None  # traced: what the method measured for this call (`DecodeMethod.method_params`)

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def commit(state: DecodeState, new_tokens: jax.Array, n_new: jax.Array, ctx: StepContext) -> DecodeState:
    """Append up to n_new[b] of new_tokens[b, :] to each live row.

    Stops a row exactly where plain decoding would: at its first EOS (kept) or at
    max_new_tokens. Advances cache_len by the number appended: the previous last_token and
    every appended token but the last are then committed to the cache; the last appended
    token becomes `last_token`.
    """
    batch, k = new_tokens.shape
    idx = jnp.arange(k, dtype=jnp.int32)
    offered = idx[None, :] < n_new[:, None]
    is_eos = (new_tokens[:, :, None] == ctx.eos_ids[None, None, :]).any(-1) & offered
    has_eos = is_eos.any(axis=1)
    n = jnp.where(has_eos, jnp.argmax(is_eos, axis=1) + 1, n_new)
    n = jnp.minimum(n, ctx.max_new - state.num_new)
    n = jnp.where(state.done, 0, n).astype(jnp.int32)
    rows = jnp.arange(batch)[:, None]
    out_len = state.out_tokens.shape[1]
    cols = jnp.where(idx[None, :] < n[:, None], state.num_new[:, None] + idx[None, :], out_len)
    out_tokens = state.out_tokens.at[rows, cols].set(new_tokens, mode="drop")
    num_new = state.num_new + n
    ended_on_eos = (is_eos & (idx[None, :] < n[:, None])).any(axis=1)
    done = state.done | ended_on_eos | (num_new >= ctx.max_new)
    last = jnp.take_along_axis(new_tokens, jnp.maximum(n - 1, 0)[:, None], axis=1)[:, 0]
    return state._replace(
        out_tokens=out_tokens, num_new=num_new, done=done,
        last_token=jnp.where(n > 0, last, state.last_token),
        cache_len=state.cache_len + n,
    )


def split_row_keys(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row keys [batch] -> (carried keys, keys to use now)."""
    pairs = jax.vmap(jax.random.split)(rng)
    return pairs[:, 0], pairs[:, 1]


def python_value(x: Any) -> Any:
    """numpy / jax / torch values read as the Python values they hold: a 0-d array or scalar
    (np.float32(0.7), jnp.int32(5)) -> its number, an array (np.array([2, 2])) -> a list;
    anything else (str, list, a model...) as it is."""
    if isinstance(x, (str, bytes, list, tuple, dict)) or not hasattr(x, "__array__"):
        return x
    return np.asarray(x).item() if np.ndim(x) == 0 else np.asarray(x).tolist()


# `LanguageModel.generate`'s own keyword arguments (every other keyword is a method option).
GENERATE_ARGUMENTS = ("max_new_tokens", "method", "temperature", "top_k", "top_p", "seed", "progress",
                      "method_input", "routes")


class DecodeMethod:
    """A decoding method: a step function for the engine's loop plus its options.

    Subclasses set `name`, `options` (name -> default) and implement `step`; they may carry
    state in `state.method_state` (created by `init_state`) and reserve `cache_headroom`
    extra cache slots (e.g. a tree's nodes beyond the committed tokens).
    """

    name: str = ""
    options: dict[str, Any] = {}

    def __init__(self, **opts: Any):
        from jaxaccel.errors import InvalidArgumentError

        unknown = sorted(set(opts) - set(self.options))
        if unknown:
            import difflib

            valid = ", ".join(sorted(self.options)) or "none"
            known = [*self.options, *GENERATE_ARGUMENTS]
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            if unknown[0] in GENERATE_ARGUMENTS:  # it said "did you mean temperature?" for temperature
                flag = "" if unknown[0] in ("method_input", "progress") else f": --{unknown[0].replace('_', '-')}"
                hint = f" ({unknown[0]} is an argument of generate itself, not a method option{flag})"
            raise InvalidArgumentError(
                f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for method "
                f"{self.name!r}{hint}; valid options: {valid}; generate's own arguments: "
                f"{', '.join(GENERATE_ARGUMENTS)}")
        opts = {k: python_value(v) for k, v in opts.items()}
        self.opts = {**self.options, **opts}

    def key(self) -> tuple:
        return (self.name, tuple(sorted((k, repr(v)) for k, v in self.opts.items())))

    def cache_headroom(self) -> int:
        """Cache slots a step needs past the committed tokens (a tree method's nodes)."""
        return 0

    def position_headroom(self) -> int:
        """Positions a step reaches past the committed tokens (a tree's depth: its nodes sit at
        the root's position + their depth), an upper bound; 0 for one token per step."""
        return 0

    def positions_seen(self, positions: int, config: ModelConfig) -> int:
        """How many RoPE positions (0 .. n - 1) the model sees in a generation that spans
        `positions` sequence positions; `generate` warns when it is past the model's trained
        max_seq_len. A method that re-positions keys (TokenSelect's compact positions: the
        selection's ranks) sees fewer."""
        return positions

    def forward_defaults(self) -> dict[str, Any]:
        """Forward keyword arguments for every call of the target in a generation with this
        method — the prefill included, so they go on the handle (TokenSelect: its attention
        policy, which changes what the cache holds)."""
        return {}

    def prefill_defaults(self) -> dict[str, Any]:
        """`forward_defaults` for the prefill program; a method narrows them to what prefill
        reads, so options only the steps read do not key (and recompile) the prefill."""
        return self.forward_defaults()

    def prefill_chunk(self) -> int | None:
        """Prompt tokens per prefill forward, or None for the model's default."""
        return None

    def use_model_info(self, info: dict[str, Any]) -> None:
        """Called before `check` with the model's provenance (`LanguageModel.info`): a method
        may take defaults from it (SkipDecode: the schedule the model was fine-tuned with)."""

    def check(self, config: ModelConfig) -> None:
        """Raise InvalidArgumentError when the options do not fit this model."""

    def check_request(self, prompt_lens: list[int], max_new_tokens: int) -> None:
        """Raise InvalidArgumentError when the options do not fit this request's prompts."""

    def stats(self, method_output: Any, batch: int) -> dict[str, Any]:
        """Method-specific figures for `GenerationResult.stats`, from `final_state`'s output."""
        return {}

    # True: `generate(method_input=...)` is an array this method starts from (recycling's matrix)
    takes_input: bool = False
    # False: the prefill never attends over the whole cache (TokenSelect selects): the memory
    # pre-check then counts the KV cache alone
    prefill_reads_whole_cache: bool = True

    @property
    def carries_memory(self) -> bool:
        """True: `final_state` is kept by the LanguageModel and fed back as `method_input`."""
        return False

    def init_state(self, ctx: StepContext, batch: int, method_input: Any, prompt_tokens: jax.Array | None = None,
                   prompt_lens: jax.Array | None = None) -> Any:
        return None

    def final_state(self, method_state: Any) -> Any:
        """What generate returns to the caller of the method state (e.g. for hot start)."""
        return None

    def tree_nodes(self) -> int:
        """Nodes per tree-verification forward (0: the method verifies no trees)."""
        return 0

    def method_params(self) -> Any:
        """Arrays this call's step reads as `ctx.method_params` (None: none): arguments of the
        compiled loop, not constants in it, so `key()` holds their shapes, not their values."""
        return None

    def step(self, state: DecodeState, ctx: StepContext) -> DecodeState:
        raise NotImplementedError


class GenerateOutput(NamedTuple):
    tokens: jax.Array  # [batch, out_len]
    num_new: jax.Array  # [batch]
    steps: jax.Array  # ()
    forwards: jax.Array  # [batch]
    method_output: Any
    cache: Any = None  # the final cache: returned so the donated input cache is updated in place
    carry: Any = None  # the final DecodeState less its cache: to go on (`generate_loop`'s carry)


def prefill(model: ModelHandle, cache, prompt_tokens, prompt_lens, chunk: int):
    """Write K/V of every prompt token but the last into the cache, `chunk` tokens at a time.

    Only as many chunks run as the longest prompt needs; padding never reaches the cache.
    The prompt is padded to a multiple of `chunk` first, so the last chunk's slice never
    runs past the end (`dynamic_slice` would clamp its start and rewrite earlier slots).
    """
    batch, padded_len = prompt_tokens.shape
    pad = -padded_len % chunk
    if pad:
        prompt_tokens = jnp.pad(prompt_tokens, ((0, 0), (0, pad)))
    to_write = prompt_lens - 1  # the last prompt token is the first step's input
    n_chunks = (jnp.max(to_write) + chunk - 1) // chunk

    def body(c, cache):
        start = c * chunk
        tokens = jax.lax.dynamic_slice_in_dim(prompt_tokens, start, chunk, axis=1)
        positions = jnp.broadcast_to(start + jnp.arange(chunk, dtype=jnp.int32), (batch, chunk))
        slots = jnp.where(positions < to_write[:, None], positions, -1)
        _, cache = model.forward(tokens, positions, cache=cache, write_slots=slots,
                                 prefix_len=jnp.minimum(start, to_write), compute_logits=False)
        return cache

    return jax.lax.fori_loop(0, n_chunks, body, cache)


def prefill_cache(model: ModelHandle, prompt_tokens, prompt_lens, *, cache_len: int, chunk: int,
                  cache_sharding: NamedSharding | None = None):
    """A new cache of `cache_len` slots holding the K/V of every prompt token but the last:
    the first of the two programs of a generation (one per cache length; small: no logits)."""
    cache = model.init_cache(prompt_tokens.shape[0], cache_len)
    if cache_sharding is not None:
        cache = jax.lax.with_sharding_constraint(cache, jax.tree.map(lambda _: cache_sharding, cache))
    return prefill(model, cache, prompt_tokens, prompt_lens, chunk)


def generate_loop(model: ModelHandle, cache, prompt_tokens, prompt_lens, live, max_new, sampling: SamplingParams,
                  rng, method_input, draft: ModelHandle | None = None, method_params: Any = None,
                  carry: DecodeState | None = None, stop_at=None, *, method: DecodeMethod, mode: SamplingMode,
                  eos_ids: tuple[int, ...],
                  out_len: int, cache_sharding: NamedSharding | None = None,
                  tree_attention: AttentionPolicy = DENSE) -> GenerateOutput:
    """The decode loop over a prefilled cache (`prefill_cache`), meant to be jitted with
    everything after `*` static and the cache donated. Its shapes do not depend on the
    prompt bucket — only on the cache length — so prompts of many lengths share one program.

    model: the target's handle (its params are traced arguments, its config static);
    prompt_tokens [batch, W] (right-padded, any width >= the longest prompt), prompt_lens
    [batch] (>= 1), live [batch] bool (False for bucket padding rows), max_new () int32,
    rng: one key per row [batch]; draft: a draft model's handle (its params traced arguments
    too, so reusing a loaded draft never recompiles), for the methods that use one;
    method_params: the method's `method_params()` (traced too: a new measurement, such as
    DySpec's value table at another temperature, runs the same program).

    In parts (a progress display): `stop_at` () int32 ends the loop after that many steps,
    and a call with the output's `carry` (and `cache`) goes on where it stopped — the same
    steps as one call, so the same tokens. (A host callback in the loop would keep the
    program out of the persistent compilation cache.)
    """
    batch = prompt_tokens.shape[0]
    if cache_sharding is not None:
        cache = jax.lax.with_sharding_constraint(cache, jax.tree.map(lambda _: cache_sharding, cache))
    ctx = StepContext(model=model, mode=mode, sampling=sampling, eos_ids=jnp.asarray(eos_ids, jnp.int32).reshape(-1),
                      max_new=max_new, tree_attention=tree_attention, draft=draft,
                      cache_slots=jax.tree.leaves(cache)[0].shape[2], method_params=method_params)
    if carry is not None:
        state = carry._replace(cache=cache)
    else:
        last = jnp.take_along_axis(prompt_tokens, (prompt_lens - 1)[:, None], axis=1)[:, 0]
        state = DecodeState(
            cache=cache, cache_len=(prompt_lens - 1).astype(jnp.int32), last_token=last.astype(jnp.int32),
            out_tokens=jnp.zeros((batch, out_len), jnp.int32), num_new=jnp.zeros((batch,), jnp.int32),
            done=~live, rng=rng, step=jnp.int32(0), forwards=jnp.zeros((batch,), jnp.int32),
            method_state=method.init_state(ctx, batch, method_input, prompt_tokens, prompt_lens),
        )
    limit = max_new if stop_at is None else jnp.minimum(max_new, stop_at)

    def cond(s: DecodeState):
        return (~jnp.all(s.done)) & (s.step < limit)

    def body(s: DecodeState):
        live_before = ~s.done
        s = method.step(s, ctx)
        return s._replace(step=s.step + 1, forwards=s.forwards + live_before.astype(jnp.int32))

    state = jax.lax.while_loop(cond, body, state)
    return GenerateOutput(state.out_tokens, state.num_new, state.step, state.forwards,
                          method_output=method.final_state(state.method_state), cache=state.cache,
                          carry=state._replace(cache=None))
