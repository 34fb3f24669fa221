"""Plain autoregressive decoding: one target forward, one token per row per step."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxaccel.decode.engine import DecodeMethod, DecodeState, StepContext, commit, split_row_keys
from jaxaccel.decode.sampling import sample
from jaxaccel.model.options import ExecutionPlan


def next_token(state: DecodeState, ctx: StepContext, plan: ExecutionPlan | None = None
               ) -> tuple[DecodeState, jax.Array, jax.Array]:
    """Run `last_token` through the model (under `plan`: e.g. SkipDecode's layers) and pick
    the next token, without committing it.
    -> (state with the cache written and the PRNG advanced, logits [b, 1, vocab], token [b])."""
    positions = state.cache_len[:, None]
    default = dict(ctx.model.defaults).get("plan")  # a call-wide plan on the handle (Duo-LLM routes)
    if plan is not None and default is not None and plan.routes is None:
        plan = plan._replace(routes=default.routes)  # a method's plan (SkipDecode's layers) keeps the routes
    planned = {} if plan is None else {"plan": plan}  # none given: the handle's default applies
    logits, cache = ctx.model.forward(state.last_token[:, None], positions, cache=state.cache,
                                      write_slots=positions, prefix_len=state.cache_len, **planned)
    state, token = choose(state._replace(cache=cache), logits[:, 0], ctx)
    return state, logits, token


def choose(state: DecodeState, logits: jax.Array, ctx: StepContext) -> tuple[DecodeState, jax.Array]:
    """The next token of each row from its logits [b, vocab] under the call's sampling
    (greedy draws no randomness; otherwise each row's key is split). -> (state, token [b])."""
    if ctx.mode.greedy:
        return state, sample(None, logits, ctx.mode, ctx.sampling)
    rng, keys = split_row_keys(state.rng)
    return state._replace(rng=rng), sample(keys, logits, ctx.mode, ctx.sampling)


class Autoregressive(DecodeMethod):
    name = "autoregressive"
    options: dict = {}

    def step(self, state: DecodeState, ctx: StepContext) -> DecodeState:
        state, _, token = next_token(state, ctx)
        return commit(state, token[:, None], jnp.ones_like(token), ctx)
