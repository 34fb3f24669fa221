"""Plain autoregressive decoding: one target forward, one token per row per step."""
from __future__ import annotations

import jax.numpy as jnp

from jaxaccel.decode.engine import DecodeMethod, DecodeState, StepContext, commit, split_row_keys
from jaxaccel.decode.sampling import sample
from jaxaccel.model.transformer import forward


class Autoregressive(DecodeMethod):
    name = "autoregressive"
    options: dict = {}

    def step(self, params, state: DecodeState, ctx: StepContext) -> DecodeState:
        positions = state.cache_len[:, None]
        logits, cache = forward(params, ctx.config, state.last_token[:, None], positions, cache=state.cache,
                                write_slots=positions, prefix_len=state.cache_len)
        if ctx.mode.greedy:  # no randomness to draw
            token = sample(None, logits[:, 0], ctx.mode, ctx.sampling)
            state = state._replace(cache=cache)
        else:
            rng, keys = split_row_keys(state.rng)
            token = sample(keys, logits[:, 0], ctx.mode, ctx.sampling)
            state = state._replace(cache=cache, rng=rng)
        return commit(state, token[:, None], jnp.ones_like(token), ctx)
