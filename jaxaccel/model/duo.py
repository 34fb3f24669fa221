"""Duo-LLM's FFN (arXiv 2410.10846): per token and layer, a big FFN, a small one, or neither.

Each layer of a Duo model (`config.duo.enabled`) keeps its attention and has two SwiGLU FFNs
under params[...]["duo"]: "big" (`ffn_dim`) and "small" (`ffn_dim / duo.small_ratio`), each
exactly the dense model's `MLP` (same parameter names, logical axes, fused decode layout).
A route per token and layer picks the FFN branch of the pre-norm block:

    y = x + attn(norm(x));  y + FFN_r(norm(y)),  FFN_BIG, FFN_SMALL, or 0 for SKIP

so SKIP is the identity on the FFN branch (the residual passes through; attention still runs).
Routes come from the forward's execution plan (`ExecutionPlan.routes`, [batch, T, n_layers]
in {0: big, 1: small, 2: skip}); without routes every token takes the big FFN.

How the routes are executed is chosen per call from static facts (`dispatch_mode`), never by
a flag:

* "masked" — uncached calls (training, scoring, the oracles): both FFNs on every token, then a
  per-token select. Simple, shards like the dense MLP, and the reference the others are tested
  against. Costs the big FFN plus 1/small_ratio of it.
* "switch" — a cached call with one token (batch-1 decoding): `lax.switch` on the route runs
  only the chosen FFN (or nothing).
* "dispatch" — cached calls with several tokens (batched decode steps, prefill): the call's
  batch * T tokens form one group; per FFN, the tokens routed to it are gathered (in token
  order) into a buffer of static capacity, the FFN runs on the buffer, and its rows are
  scattered back. Capacity rule: the smallest rung of the ladder ceil(k * N / 8), k = 0..8
  (N tokens in the call), that holds every routed token, chosen at run time by `lax.switch`
  over the rungs — so nothing is ever dropped (the result equals the masked reference) and an
  FFN that half the tokens take runs on at most 5/8 of them (exactly half at decode batch 8;
  rung 0: not at all). Gather/scatter rather than MoE's one-hot dispatch einsums: those cost
  O(N * capacity * d_model), more than the small FFN itself at prefill lengths.

Routers (stage 2, `config.duo.router`): each layer has a linear router on its FFN input,
params[...]["duo"]["router"] {"kernel" [d_model, 2], "bias" [2]} (float32, zero at init:
p_big = 1/2), giving logits for (big, small). Without forced routes the router decides: hard,
the larger logit's FFN (executed by the mode above); or, with `ExecutionPlan.soft_routes`,
the mixture p_big * big(h) + p_small * small(h) with p = softmax(logits) (both FFNs run).
A temperature tau is a scale of the router's parameters by 1 / tau (`scale_router`), so
annealing needs no recompile; as tau -> 0 the soft mixture tends to the hard routes. Every
mode sows the layer's mean P(big) (soft) or fraction of big routes ("duo_p_big"), which
`forward(..., return_aux=True)` returns per layer (the budget loss of router training), and
with a router its logits per token ("duo_router_logits" [n_layers, batch, T, 2]; computed
under forced routes too, so a router can learn to imitate given routes).

Dtype policy: the FFNs follow `layers.MLP` (parameters in param_dtype, matmuls in dtype);
routes are int32 after `check_routes`.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.config import DuoConfig, ModelConfig
from jaxaccel.errors import InvalidArgumentError
from jaxaccel.model.layers import EMBED, MLP
from jaxaccel.model.options import LayerOptions

BIG, SMALL, SKIP = 0, 1, 2
ROUTE_NAMES = ("big", "small", "skip")
MODES = ("masked", "switch", "dispatch")
DISPATCH_RUNGS = 8  # capacity ladder: multiples of N / 8 tokens (see the module docstring)


@functools.lru_cache(maxsize=None)
def ffn_config(config: ModelConfig, which: str) -> ModelConfig:
    """The config of a plain dense model whose `MLP` is this Duo model's big or small FFN
    (same everything, ffn_dim = the branch's width, duo off)."""
    width = config.ffn_dim if which == "big" else config.small_ffn_dim
    return dataclasses.replace(config, ffn_dim=width, duo=DuoConfig())


def dispatch_mode(n_tokens: int, cached: bool) -> str:
    """How a call executes its routes (static): "masked" without a cache, "switch" for one
    cached token, "dispatch" for several."""
    if not cached:
        return "masked"
    return "switch" if n_tokens == 1 else "dispatch"


def capacity_ladder(n_tokens: int, rungs: int = DISPATCH_RUNGS) -> tuple[int, ...]:
    """Static buffer sizes a dispatched FFN may run at: ceil(k * N / rungs), k = 0..rungs
    (deduplicated, ascending; starts at 0, ends at N)."""
    return tuple(sorted({math.ceil(k * n_tokens / rungs) for k in range(rungs + 1)}))


def check_routes(routes, tokens_shape: tuple[int, int], n_layers: int) -> jax.Array:
    """Routes as the forward takes them -> [batch, T, n_layers] int32. Accepts [batch, T,
    n_layers], [batch, n_layers] (one route per row and layer) or [n_layers]; a wrong shape or
    (for concrete arrays) a value outside {0, 1, 2} is an `InvalidArgumentError`. Traced routes
    are not value-checked: every path (masked, switch, dispatch) treats other values as skip."""
    batch, t = tokens_shape
    # Under jit a plan's routes (a pytree: a tuple of ints too) arrive as tracers.
    traced = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(routes))
    if traced and isinstance(routes, (list, tuple)):
        routes = jnp.asarray(routes, jnp.int32)
    shape = tuple(np.shape(routes))
    if shape not in ((batch, t, n_layers), (batch, n_layers), (n_layers,)):
        raise InvalidArgumentError(f"plan.routes has shape {list(shape)}; expected [batch, T, n_layers] = "
                                   f"[{batch}, {t}, {n_layers}] (or [{batch}, {n_layers}] or [{n_layers}])")
    if not traced:
        values = np.asarray(routes)
        if not np.issubdtype(values.dtype, np.integer):
            raise InvalidArgumentError(f"plan.routes must hold integers (0 big, 1 small, 2 skip), got {values.dtype}")
        outside = values[(values < BIG) | (values > SKIP)]
        if outside.size:
            raise InvalidArgumentError(
                f"plan.routes values must be 0 (big), 1 (small) or 2 (skip), got {outside.flat[0]}")
    routes = jnp.asarray(routes, jnp.int32)
    if routes.ndim == 1:
        routes = routes[None, None, :]
    elif routes.ndim == 2:
        routes = routes[:, None, :]
    return jnp.broadcast_to(routes, (batch, t, n_layers))


def random_routes(duo: DuoConfig, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Stage-1 training routes: independently per entry of `shape` (e.g. [batch, T, n_layers]),
    big with probability p_big, skip with p_skip, small otherwise. int32."""
    u = jax.random.uniform(key, shape)
    return jnp.where(u < duo.p_big, BIG, jnp.where(u < 1.0 - duo.p_skip, SMALL, SKIP)).astype(jnp.int32)


LETTERS = "BS-"  # a route pattern as text: B big, S small, - skip, one letter per layer
# "_" reads as skip too: on a command line a pattern that starts with "-" looks like an option.
SKIP_ALIAS = "_"


def pattern_string(pattern) -> str:
    """[n_layers] routes -> e.g. "BSSB-SBB"."""
    return "".join(LETTERS[int(r)] for r in pattern)


def parse_routes(routes, n_layers: int) -> tuple[int, ...]:
    """A route pattern for every token -> n_layers Python ints (static `ExecutionPlan.routes`):
    "big" / "small" / "skip", a string of B/S/- (one letter per layer; _ also means skip), or a
    sequence of ints in {0, 1, 2} (a list, tuple, numpy or jax array). Anything else is a
    one-line `InvalidArgumentError`."""
    if isinstance(routes, str):
        named = {"big": "B" * n_layers, "small": "S" * n_layers, "skip": "-" * n_layers}
        text = named.get(routes.lower(), routes.upper().replace(SKIP_ALIAS, "-"))
        if len(text) != n_layers or set(text) - set(LETTERS):
            raise InvalidArgumentError(f"routes must be big, small, skip or one of B/S/- (or _ for skip) per layer "
                                       f"({n_layers} letters), got {routes!r}")
        return tuple(LETTERS.index(c) for c in text)
    if isinstance(routes, jax.Array) and not isinstance(routes, jax.core.Tracer):
        routes = np.asarray(routes)
    values = None
    if isinstance(routes, (list, tuple)) or (isinstance(routes, np.ndarray) and routes.ndim == 1):
        values = list(routes)
    if (values is None or len(values) != n_layers
            or not all(isinstance(r, (int, np.integer)) and not isinstance(r, bool) and r in (BIG, SMALL, SKIP)
                       for r in values)):
        got = (f"an array of shape {list(routes.shape)} and dtype {routes.dtype}"
               if isinstance(routes, (np.ndarray, jax.Array)) else " ".join(repr(routes).split()))
        raise InvalidArgumentError(f"routes must be {n_layers} integers in 0 (big), 1 (small), 2 (skip), or a "
                                   f"B/S/- string, got {got}")
    return tuple(int(r) for r in values)


def hard_routes(logits: jax.Array) -> jax.Array:
    """A router's hard decision: big where its big logit is at least its small one. logits
    [..., 2] -> routes [...] int32 (ties go big)."""
    return jnp.where(logits[..., BIG] >= logits[..., SMALL], BIG, SMALL).astype(jnp.int32)


def map_routers(params, fn):
    """The params with every router's {"kernel", "bias"} replaced by fn(router) (either layout)."""
    def visit(tree):
        if isinstance(tree, dict):
            return {k: (fn(v) if k == "router" else visit(v)) for k, v in tree.items()}
        return tree
    return visit(params)


def scale_router(params, scale):
    """The params with every router's kernel and bias multiplied by `scale` (1 / temperature):
    softmax(scale * logits) is the router at temperature 1 / scale. Other leaves unchanged."""
    return map_routers(params, lambda r: jax.tree.map(lambda a: a * scale, r))


def shift_router(params, delta):
    """The params with every router's big logit raised by `delta` (its bias)."""
    shift = jnp.zeros((2,), jnp.float32).at[BIG].set(delta)
    return map_routers(params, lambda r: {**r, "bias": r["bias"] + shift})


def init_router(params, config: ModelConfig, rng=None):
    """Add zero-initialised routers (p_big = 1/2 everywhere) to a Duo model's params (unrolled
    or scanned layout) -> (params, config with duo.router on). `rng` is unused (zeros), kept
    for a future random init."""
    if not config.duo.enabled:
        raise InvalidArgumentError("a router needs a Duo-LLM model (model.duo.enabled)")
    d = config.d_model

    def add(tree):
        if isinstance(tree, dict):
            out = {k: add(v) for k, v in tree.items()}
            if "big" in tree and "small" in tree and "router" not in tree:
                lead = jax.tree.leaves(tree["big"])[0].shape[:-2]  # scanned: [n_layers] in front
                out["router"] = {"kernel": jnp.zeros(lead + (d, 2), jnp.float32), "bias": jnp.zeros(lead + (2,), jnp.float32)}
            return out
        return tree
    return add(params), dataclasses.replace(config, duo=dataclasses.replace(config.duo, router=True))


def route_fractions(routes: jax.Array) -> jax.Array:
    """[3] float32: the fraction of routes that are big, small and skip."""
    return jnp.mean(jax.nn.one_hot(routes, 3, dtype=jnp.float32), axis=tuple(range(routes.ndim)))


class DuoFFN(nn.Module):
    """The FFN branch of a Duo layer. x [batch, T, d_model], routes [batch, T] int (this layer's
    slice of `ExecutionPlan.routes`), a Python int (static: every token takes that route; only
    that FFN is traced) or None (all big, or the router's) -> [batch, T, d_model]. `mode`: one of
    MODES (see the module docstring; the decoder picks it with `dispatch_mode`)."""

    config: ModelConfig
    options: LayerOptions = LayerOptions()
    mode: str = "masked"

    def setup(self):
        self.big = MLP(ffn_config(self.config, "big"), self.options)
        self.small = MLP(ffn_config(self.config, "small"), self.options)
        if self.config.duo.router:
            self.router = nn.Dense(2, dtype=jnp.float32, param_dtype=jnp.float32, name="router",
                                   kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, (EMBED, None)),
                                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))

    def __call__(self, x, routes=None):
        if self.mode not in MODES:
            raise ValueError(f"DuoFFN.mode must be one of {MODES}, got {self.mode!r}")
        if self.config.duo.router:
            logits = self.router(x.astype(jnp.float32))  # [batch, T, 2]: (big, small)
            self.sow("intermediates", "duo_router_logits", logits)  # also under forced routes (imitation)
        if routes is None and self.config.duo.router:
            if self.options.soft_routes:
                p = jax.nn.softmax(logits, axis=-1)
                self.sow("intermediates", "duo_p_big", jnp.mean(p[..., 0]))
                mix = p[..., 0:1] * self.big(x).astype(jnp.float32) + p[..., 1:2] * self.small(x).astype(jnp.float32)
                return mix.astype(jnp.dtype(self.config.dtype))
            routes = hard_routes(logits)
        if isinstance(routes, int):  # a static route for every token (ExecutionPlan.routes as a tuple)
            if self.is_initializing():
                self.big(x), self.small(x)
            self.sow("intermediates", "duo_p_big", jnp.asarray(float(routes == BIG), jnp.float32))
            if routes == BIG:
                return self.big(x)
            if routes == SMALL:
                return self.small(x)
            return jnp.zeros(x.shape[:-1] + (self.config.d_model,), jnp.dtype(self.config.dtype))
        if routes is None:  # the default plan: every token takes the big FFN
            if self.is_initializing():
                self.small(x)  # both FFNs exist from init on, whatever the first call routes
            self.sow("intermediates", "duo_p_big", jnp.ones((), jnp.float32))
            return self.big(x)
        # Traced routes are not value-checked: a value outside {0, 1, 2} is a skip on every path.
        routes = jnp.where((routes >= BIG) & (routes <= SKIP), routes, SKIP)
        self.sow("intermediates", "duo_p_big", jnp.mean((routes == BIG).astype(jnp.float32)))
        if self.mode == "masked" or self.is_initializing():
            big, small = self.big(x), self.small(x)
            return jnp.where((routes == BIG)[..., None], big,
                             jnp.where((routes == SMALL)[..., None], small, jnp.zeros_like(big)))
        if self.mode == "switch":
            if routes.size != 1:
                raise ValueError(f"DuoFFN mode 'switch' takes one token, got routes of shape {routes.shape}")
            branches = [lambda mdl, h: mdl.big(h), lambda mdl, h: mdl.small(h),
                        lambda mdl, h: jnp.zeros(h.shape[:-1] + (self.config.d_model,), jnp.dtype(self.config.dtype))]
            return nn.switch(routes.reshape(()), branches, self, x)
        return self._dispatch(x, routes)

    def _dispatch(self, x, routes):
        b, t, d = x.shape
        n = b * t
        flat = x.reshape(n, d)
        flat_routes = routes.reshape(n)
        out = jnp.zeros((n, self.config.d_model), jnp.dtype(self.config.dtype))
        ladder = capacity_ladder(n)
        for which, route in (("big", BIG), ("small", SMALL)):
            member = flat_routes == route
            count = jnp.sum(member, dtype=jnp.int32)
            # Queue position of each routed token (token order: MoE's cumsum rule), inverted to
            # order[i] = the i-th routed token (n past the last one).
            position = jnp.cumsum(member, dtype=jnp.int32) - 1
            order = jnp.full((n,), n, jnp.int32).at[jnp.where(member, position, n)].set(
                jnp.arange(n, dtype=jnp.int32), mode="drop")
            rung = jnp.searchsorted(jnp.asarray(ladder, jnp.int32), count, side="left")
            branches = [functools.partial(_run_capacity, which=which, capacity=c) for c in ladder]
            out = out + nn.switch(rung, branches, self, flat, order, count)
        return out.reshape(b, t, self.config.d_model)


def _run_capacity(mdl: DuoFFN, flat, order, count, *, which: str, capacity: int):
    """One rung of the dispatch ladder: `which` FFN on the first `capacity` of its tokens
    (`order`), scattered back to [N, d_model] (zeros elsewhere; unused buffer rows dropped)."""
    n = flat.shape[0]
    out = jnp.zeros((n, mdl.config.d_model), jnp.dtype(mdl.config.dtype))
    if capacity == 0:
        return out
    index = order[:capacity]
    used = jnp.arange(capacity, dtype=jnp.int32) < count
    ffn = mdl.big if which == "big" else mdl.small
    y = ffn(jnp.take(flat, index, axis=0, mode="clip")[None])[0]  # [1, capacity, d]: the MLP's [batch, length, ...]
    return out.at[jnp.where(used, index, n)].set(y.astype(out.dtype), mode="drop")
