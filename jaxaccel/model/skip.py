"""SkipDecode's layer schedule (Del Corro et al. 2023, arXiv 2307.02628): one place for the
rule both the decoder (`jaxaccel.decode.skipdecode`) and the trainer's schedule fine-tune use.

The i-th generated token (i = 0, 1, ...; prompt tokens always run every layer) runs

    h(i) = round((1 - tau) * max_layers + tau * min_layers),  tau = clip(i / span, 0, 1),
    span = max_length - prompt_length

layers: the first `warmup_layers`, then the top h(i) - warmup_layers. h never increases, so
the layers a token runs are a subset of the layers every earlier token ran: every K/V a later
token attends to was computed, and nothing is ever recomputed. Decoding is batch-uniform:
the step index (not a row's position) drives h, with the batch's longest prompt in `span`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxaccel.errors import InvalidArgumentError


MAX_LENGTH = 2 ** 24  # tokens; far beyond any context, and h(i) stays exact in int32 below it


def max_length_limit(max_layers: int) -> int:
    """The largest max_length a schedule from `max_layers` takes: at most MAX_LENGTH, and small
    enough that `_rule`'s int32 numerator, (2 * max_layers + 1) * span, cannot overflow."""
    return min(MAX_LENGTH, (2 ** 31 - 1) // (2 * int(max_layers) + 1))


@dataclasses.dataclass(frozen=True)
class SkipSchedule:
    n_layers: int
    min_layers: int
    max_layers: int
    max_length: int
    warmup_layers: int = 1

    @staticmethod
    def _check_warmup(n: int, w: Any) -> None:
        if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 0:
            raise InvalidArgumentError(f"warmup_layers must be an integer >= 0, got {w!r}")
        if w >= n:
            raise InvalidArgumentError(f"warmup_layers ({w}) must be below n_layers ({n}): the schedule needs at "
                                       f"least one layer after the warm-up")

    def __post_init__(self):
        n, w = self.n_layers, self.warmup_layers
        self._check_warmup(n, w)
        # max_layers first: min_layers defaults to max_layers (`build`), so a bad max_layers
        # alone must be named as itself.
        for name in ("max_layers", "min_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not w + 1 <= v <= n:
                raise InvalidArgumentError(
                    f"{name} must be an integer in [warmup_layers + 1, n_layers] = [{w + 1}, {n}], got {v!r}")
        if self.min_layers > self.max_layers:
            raise InvalidArgumentError(f"min_layers ({self.min_layers}) > max_layers ({self.max_layers})")
        limit = max_length_limit(self.max_layers)
        m = self.max_length
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 2 <= m <= limit:
            raise InvalidArgumentError(f"max_length must be an integer >= 2 and <= {limit}, got {m!r}")
        # h(i) falls from max_layers (i = 0) to min_layers (i >= span) by construction (see
        # `_rule`); check that on a bounded sample of i, never O(span) memory.
        for span in (1, 2, 3, 7, int(m)):
            i = np.unique(np.concatenate([np.arange(min(2 * span + 2, 64)),
                                          np.linspace(0, 2 * span + 1, 65).round().astype(np.int64)]))
            h = self.layers_np(i, span)
            if np.any(np.diff(h) > 0) or h[0] != self.max_layers or h[-1] != self.min_layers:
                raise AssertionError("the SkipDecode schedule must fall from max_layers to min_layers")

    @classmethod
    def build(cls, n_layers: int, *, warmup_layers: int = 1, min_layers: int | None = None,
              max_layers: int | None = None, max_length: int | None = None, speedup: float | None = None,
              default_max_length: int | None = None) -> "SkipSchedule":
        """From the method's / trainer's options: explicit min/max layers, or `speedup` (the
        mean layer count over a generation = n_layers / speedup; see `for_speedup`)."""
        max_length = default_max_length if max_length is None else max_length
        if max_length is None:
            raise InvalidArgumentError("max_length is required (the length at which the schedule reaches min_layers)")
        if speedup is not None:
            if min_layers is not None or max_layers is not None:
                raise InvalidArgumentError("give either speedup or min_layers/max_layers, not both")
            return cls.for_speedup(n_layers, speedup, warmup_layers=warmup_layers, max_length=max_length)
        max_layers = n_layers if max_layers is None else max_layers
        min_layers = max_layers if min_layers is None else min_layers
        return cls(n_layers, min_layers, max_layers, max_length, warmup_layers)

    @classmethod
    def for_speedup(cls, n_layers: int, speedup: float, *, warmup_layers: int = 1,
                    max_length: int = 1024) -> "SkipSchedule":
        """The schedule whose mean layer count over a generation, (max + min) / 2, is closest
        to n_layers / speedup, preferring max_layers near 1.5x that mean (the top of the
        schedule keeps early tokens accurate; the paper's schedules decay by 2-3x)."""
        if not isinstance(speedup, (int, float, np.integer, np.floating)) or isinstance(speedup, bool) \
                or not speedup >= 1:
            raise InvalidArgumentError(f"speedup must be a number >= 1, got {speedup!r}")
        cls._check_warmup(n_layers, warmup_layers)  # before it is used below
        target = n_layers / speedup
        lowest = warmup_layers + 1
        if target < lowest - 1e-9:
            raise InvalidArgumentError(
                f"speedup {speedup} is unreachable: it needs a mean of {target:.2f} layers per token, but at least "
                f"warmup_layers + 1 = {lowest} run (largest speedup for {n_layers} layers: {n_layers / lowest:.2f})")
        best = None
        for hi in range(lowest, n_layers + 1):
            for lo in range(lowest, hi + 1):
                cost = (abs((hi + lo) / 2 - target), abs(hi - 1.5 * target))
                if best is None or cost < best[0]:
                    best = (cost, lo, hi)
        _, lo, hi = best  # the means reachable are every half-integer in [lowest, n]: within 0.25
        return cls(n_layers, lo, hi, max_length, warmup_layers)

    # ------------------------------------------------------------------ the rule

    def _rule(self, xp, i, span):
        # round((1 - tau) max + tau min), tau = i / span, in integers: floor((2X + span) / 2span)
        # with X = max*span - (max - min)*i. Exact, so the trainer's [batch, T] masks, the
        # decoder's per-step scalar and every plot agree even at .5 ties (floats did not).
        span = xp.maximum(xp.asarray(span, xp.int32), 1)
        i = xp.clip(xp.asarray(i, xp.int32), 0, span)
        hi, lo = self.max_layers, self.min_layers
        return ((2 * hi * span - 2 * (hi - lo) * i + span) // (2 * span)).astype(xp.int32)

    def layers_np(self, i, span) -> np.ndarray:
        """h(i) in numpy (plots, means, checks): the same integers as `layers`."""
        return self._rule(np, i, span)

    def layers(self, i, span):
        """h(i) as int32 (jnp; i and span may be traced and broadcast)."""
        return self._rule(jnp, i, span)

    def active(self, h):
        """[..., n_layers] bool: which layers a token with h layers runs (warm-up, then the top)."""
        layer = jnp.arange(self.n_layers, dtype=jnp.int32)
        h = jnp.asarray(h, jnp.int32)[..., None]
        return (layer < self.warmup_layers) | (layer >= self.n_layers - (h - self.warmup_layers))

    def static_active(self, h: int) -> tuple[bool, ...]:
        """`active` for a Python int h, as a static tuple (`ExecutionPlan.layer_on`)."""
        return tuple(i < self.warmup_layers or i >= self.n_layers - (h - self.warmup_layers)
                     for i in range(self.n_layers))

    def token_active(self, positions, boundary):
        """Per-token layer flags for teacher-forced training / evaluation under the schedule:
        positions [batch, T] (a token's position in its sequence), boundary [batch] (the
        prompt length). Tokens before the boundary run every layer; token at position q >= b
        is generated token i = q - b. -> [batch, T, n_layers] bool."""
        boundary = jnp.asarray(boundary, jnp.int32)[:, None]
        i = positions - boundary
        h = jnp.where(i < 0, self.n_layers, self.layers(jnp.maximum(i, 0), self.max_length - boundary))
        return self.active(h)

    def mean_layers(self, span: int | None = None, n_tokens: int | None = None) -> float:
        """Mean layers per generated token over the first `n_tokens` (default: `span`) of a
        generation whose schedule spans `span` tokens (default: max_length / 2)."""
        span = self.max_length // 2 if span is None else span
        return float(np.mean(self.layers_np(np.arange(span if n_tokens is None else n_tokens), span)))

    @property
    def nominal_speedup(self) -> float:
        return self.n_layers / ((self.max_layers + self.min_layers) / 2)

    def describe(self) -> str:
        return (f"{self.max_layers} -> {self.min_layers} of {self.n_layers} layers (warm-up {self.warmup_layers}) "
                f"by length {self.max_length}; nominal speedup {self.nominal_speedup:.2f}x")


def check_span(schedule: SkipSchedule, longest_prompt: int) -> None:
    if schedule.max_length <= longest_prompt:
        raise InvalidArgumentError(f"max_length ({schedule.max_length}) must exceed the longest prompt "
                                   f"({longest_prompt} tokens)")

