"""Token selection: greedy, temperature, top-k, top-p — as one distribution per row.

Which filters run is static (`SamplingMode`, part of the compiled function's key); their
values are traced (`SamplingParams`), so changing temperature or top_p does not recompile
(a draft method's program may hold what it measured at that setting: docs/ARCHITECTURE.md).
The order follows Hugging Face's logits processors: temperature, then top-k, then top-p.
Speculative verifiers use `target_probs` so that acceptance is computed against exactly the
distribution plain sampling draws from.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxaccel.errors import InvalidArgumentError


class SamplingMode(NamedTuple):
    """Static: which code paths are compiled."""

    greedy: bool
    use_top_k: bool
    use_top_p: bool


class SamplingParams(NamedTuple):
    """Traced scalars."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array


# Temperatures below this sample greedily (vLLM's rule): logits / T overflows float32 for T
# below ~1e-37, and well before that the distribution is the argmax up to exact ties.
GREEDY_BELOW = 1e-5


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < float("inf"):
        raise InvalidArgumentError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise InvalidArgumentError(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise InvalidArgumentError(f"top_p must be in (0, 1], got {top_p!r}")


def effective_filters(top_k: int | None, top_p: float | None, vocab_size: int) -> tuple[int | None, float | None]:
    """(top_k, top_p) with the filters that keep every token dropped (None): a top_k of the
    vocabulary's size or more, a top_p of 1. The same distribution, so the same compiled
    program and the same cached measurements (draft acceptance)."""
    return (None if top_k is not None and top_k >= vocab_size else top_k,
            None if top_p is not None and top_p >= 1.0 else top_p)


def make_sampling(temperature: float, top_k: int | None, top_p: float | None) -> tuple[SamplingMode, SamplingParams]:
    check_sampling_args(temperature, top_k, top_p)
    greedy = temperature < GREEDY_BELOW  # 0, or so close to it that sampling is the argmax
    mode = SamplingMode(greedy=greedy, use_top_k=not greedy and top_k is not None,
                        use_top_p=not greedy and top_p is not None and top_p < 1.0)
    # top_k beyond the vocabulary keeps every token (the filter clips it); int32 must hold it
    # Temperatures past 1e30 are 1e30: every finite logit / T is ~0 there already (uniform), and
    # XLA divides as x * (1 / T), whose factor is 0 in float32 (flushed) past ~8.5e37: -inf
    # logits became NaN (-inf * 0), as they did for a T of inf (past float32's range).
    temperature = min(temperature, 1e30) if not greedy else 1.0
    params = SamplingParams(jnp.float32(temperature), jnp.int32(min(top_k or 0, 2**31 - 1)),
                            jnp.float32(top_p if top_p is not None else 1.0))
    return mode, params


def filtered_logits(logits: jax.Array, mode: SamplingMode, params: SamplingParams) -> jax.Array:
    """logits [..., vocab] float32 -> temperature-scaled logits with filtered tokens at -inf.
    Top-k ranks the unscaled logits (a huge temperature flushes the scaled ones to ties, and
    the rank does not depend on it); top-p measures the scaled distribution that top-k left,
    every token tied with the k-th included."""
    raw = logits.astype(jnp.float32)
    logits = raw / params.temperature
    if not (mode.use_top_k or mode.use_top_p):
        return logits
    sorted_raw = -jnp.sort(-raw, axis=-1)
    sorted_desc = sorted_raw / params.temperature  # the same order: the temperature is > 0
    if mode.use_top_k:
        k = jnp.clip(params.top_k, 1, logits.shape[-1])
        kth = jnp.take_along_axis(sorted_raw, jnp.broadcast_to(k - 1, logits.shape[:-1])[..., None], axis=-1)
        logits = jnp.where(raw < kth, -jnp.inf, logits)
        sorted_desc = jnp.where(sorted_raw < kth, -jnp.inf, sorted_desc)  # ties with the k-th stay, as in logits
    if mode.use_top_p:
        # Keep the smallest prefix of the sorted distribution whose mass reaches top_p
        # (the token that crosses the threshold is kept; at least one token always is).
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # (the first token explicitly: a top_p below float32's normal range is 0 here)
        keep_sorted = (mass_before < params.top_p) | (jnp.arange(logits.shape[-1]) == 0)
        threshold = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def target_probs(logits: jax.Array, mode: SamplingMode, params: SamplingParams) -> jax.Array:
    """The distribution a token is drawn from: one-hot argmax when greedy."""
    if mode.greedy:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(filtered_logits(logits, mode, params), axis=-1)


def sample(keys: jax.Array, logits: jax.Array, mode: SamplingMode, params: SamplingParams) -> jax.Array:
    """keys [batch] (one PRNG key per row), logits [batch, vocab] -> tokens [batch] int32."""
    if mode.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filtered_logits(logits, mode, params)
    return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
