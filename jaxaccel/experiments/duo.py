"""python -m jaxaccel.experiments duo — Duo-LLM's oracles, baselines and routers.

On a random-routing Duo model (configs/duo.yaml: every token took the big FFN with p = 0.5 in
every layer during training) and held-out (validation-split) windows of the corpus:

* **Per-token losses of route patterns.** A pattern assigns big / small (or skip) to every
  layer and is applied to all tokens of a sequence; `pattern_losses` scores every token under
  every pattern with the one forward (patterns ride as batch rows: `ExecutionPlan.routes`).
* **Oracles.** A token's oracle loss at budget b is the minimum of its loss over the patterns
  with at most b big layers ("at most", the issue's definition: non-increasing in b) or with
  exactly b ("exact": the paper's curve, which may peak before b = L). Exhaustive over all
  2^L patterns (3^L with skip, on fewer tokens), and a beam oracle that scales to deep models
  (`beam_oracle`: extend the `width` patterns that win the most tokens at budget b - 1 by one
  more big layer), validated against the exhaustive one. An oracle is a per-token minimum over
  window-wide patterns: each token's figure assumes every earlier token took its pattern too.
  It is neither a loss any routing reaches nor a bound on one: run together, tokens taking
  different routes change each other's attention context. `oracle_run` reports that loss
  (the at-most-b oracle's per-token routes run as routes).
* **Baselines per budget:** the best fixed pattern (one pattern for every token, chosen on the
  fit half), the best of 100 random routings (each token draws its own b big layers; a draw
  is tied to its tokens, so the best is chosen on the test half itself: an optimistic
  baseline), all big, all small.
* **Routers (stage 2, base frozen):** a linear router per layer on the FFN input, a soft
  mixture at a temperature annealed from `tau_start` to `tau_end` (a scale of the router's
  parameters), loss = CE + alpha * (mean P(big) - b / L)^2; evaluated with hard routes. And,
  beyond the paper, routers trained to imitate the oracle's routes (binary cross entropy on
  each token's oracle pattern at budget b, under those routes), to measure how much of the
  router-to-oracle gap imitation closes. Made hard, a router lands near, not on, its budget:
  each is calibrated (one shift of every layer's big logit, bisected on the fit half) to take
  b big layers per token on average there; on the test half it realises a budget close to b
  (reported, and compared with the other curves at that budget).
  Routers are fitted on one half of the held-out windows ("fit") and everything is reported
  on the other half ("test").
* **Findings** (each marked reproduced / not at this scale in `summary`): perplexity vs big
  layers for every method; the oracle with one big layer vs all big; where the oracle puts
  the big layers at budgets 1, 2, 4 (heatmap); token difficulty — the gain the big FFN could
  give a token (all-small loss minus its best loss) vs its loss, with examples.
"""
from __future__ import annotations

import functools
import itertools
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.errors import ConfigError, InvalidArgumentError
from jaxaccel.model.duo import (BIG, SKIP, SMALL, hard_routes, init_router, pattern_string, scale_router,
                                shift_router)
from jaxaccel.model.options import ExecutionPlan

MAX_PATTERNS = 20_000  # exhaustive oracles evaluate at most this many patterns (3^9 = 19,683)


# ----------------------------------------------------------------------------- patterns


def all_patterns(n_layers: int, with_skip: bool = False, limit: int = MAX_PATTERNS) -> np.ndarray:
    """[2^L or 3^L, L] int32: every route pattern (0 big, 1 small, 2 skip), in product order.
    More than `limit` patterns is an `InvalidArgumentError` that suggests the beam oracle."""
    choices = (BIG, SMALL, SKIP) if with_skip else (BIG, SMALL)
    count = len(choices) ** n_layers
    if count > limit:
        raise InvalidArgumentError(
            f"an exhaustive oracle over {len(choices)}^{n_layers} = {count:,} patterns exceeds the limit of "
            f"{limit:,}; use the beam oracle (--oracle beam) for {n_layers} layers")
    return np.asarray(list(itertools.product(choices, repeat=n_layers)), np.int32).reshape(count, n_layers)


def oracle_plan(oracle_mode: str, n_layers: int, skip_rows: int) -> tuple[bool, bool]:
    """(exhaustive oracle?, with the 3^L big/small/skip part?) of `--oracle`, its limits
    checked before any work: "exhaustive" refuses what does not fit, "auto" falls back to the
    beam oracle past 2^L patterns and leaves out the 3^L part past 3^L."""
    if oracle_mode not in ("auto", "exhaustive", "beam"):
        raise InvalidArgumentError(f"oracle must be auto, exhaustive or beam, got {oracle_mode!r}")
    fits = lambda k: k ** n_layers <= MAX_PATTERNS  # noqa: E731
    exhaustive = oracle_mode == "exhaustive" or (oracle_mode == "auto" and fits(2))
    if oracle_mode == "exhaustive":
        all_patterns(n_layers)
        if skip_rows:
            all_patterns(n_layers, with_skip=True)
    return exhaustive, skip_rows > 0 and exhaustive and fits(3)


def n_big(patterns: np.ndarray) -> np.ndarray:
    return np.sum(np.asarray(patterns) == BIG, axis=-1)


def check_budget(budget: float, n_layers: int) -> None:
    if not 0 <= budget <= n_layers:
        raise InvalidArgumentError(f"budget must be in [0, {n_layers}] big layers, got {budget:g}")


# ----------------------------------------------------------------------------- scoring


class Scorer:
    """Per-token cross entropy of held-out windows under given routes, through the one forward.
    rows [R, T + 1] token ids; tokens are flattened row-major: N = R * T."""

    def __init__(self, params, config, rows: np.ndarray, batch: int = 32):
        from jaxaccel.model.transformer import forward

        self.params, self.config, self.batch = params, config, batch
        self.rows = np.asarray(rows, np.int32)
        self.r, self.t = self.rows.shape[0], self.rows.shape[1] - 1

        def ce(params, config, rows, plan):
            logits, _ = forward(params, config, rows[:, :-1], plan=plan)
            logp = jax.nn.log_softmax(logits, -1)
            return -jnp.take_along_axis(logp, rows[:, 1:, None], -1)[..., 0]

        self._routed = jax.jit(lambda p, rows, routes: ce(p, config, rows, ExecutionPlan(routes=routes)))
        self._free = jax.jit(lambda p, c, rows: ce(p, c, rows, None), static_argnums=(1,))

    @property
    def n_tokens(self) -> int:
        return self.r * self.t

    def patterns(self, patterns: np.ndarray, rows: slice | None = None, log: Callable[[str], None] | None = None
                 ) -> np.ndarray:
        """[P, N'] float32: every (row, pattern) pair as one batch row; N' = the rows' tokens."""
        sel = self.rows if rows is None else self.rows[rows]
        patterns = np.asarray(patterns, np.int32)
        pairs = [(p, r) for p in range(len(patterns)) for r in range(len(sel))]
        out = np.zeros((len(patterns), len(sel), self.t), np.float32)
        start = time.perf_counter()
        for i in range(0, len(pairs), self.batch):
            chunk = pairs[i:i + self.batch]
            pad = self.batch - len(chunk)  # one program: the last batch is padded with repeats
            idx = chunk + [chunk[-1]] * pad
            routes = np.broadcast_to(patterns[[p for p, _ in idx]][:, None, :], (len(idx), self.t, patterns.shape[1]))
            losses = np.asarray(self._routed(self.params, jnp.asarray(sel[[r for _, r in idx]]), jnp.asarray(routes)))
            for (p, r), row in zip(chunk, losses[:len(chunk)]):
                out[p, r] = row
            if log is not None and (i // self.batch) % 50 == 49:
                done = (i + len(chunk)) / len(pairs)
                log(f"  {done:.0%} of {len(patterns)} patterns x {len(sel)} rows, "
                    f"{time.perf_counter() - start:.0f} s")
        return out.reshape(len(patterns), -1)

    def routed(self, routes: np.ndarray) -> np.ndarray:
        """[N] float32 under per-token routes [R, T, L]."""
        out = []
        for i in range(0, self.r, self.batch):
            out.append(np.asarray(self._routed(self.params, jnp.asarray(self.rows[i:i + self.batch]),
                                               jnp.asarray(routes[i:i + self.batch], jnp.int32))))
        return np.concatenate(out).reshape(-1)

    def free(self, params, config) -> np.ndarray:
        """[N] float32 with the model's own routes (its router's, hard; all big without one)."""
        out = [np.asarray(self._free(params, config, jnp.asarray(self.rows[i:i + self.batch])))
               for i in range(0, self.r, self.batch)]
        return np.concatenate(out).reshape(-1)


# ----------------------------------------------------------------------------- oracles and baselines


def oracle(losses: np.ndarray, patterns: np.ndarray, budget: int, exact: bool = False
           ) -> tuple[np.ndarray, np.ndarray]:
    """Per token, the lowest loss over the patterns with at most (exact: exactly) `budget`
    big layers -> (loss [N], index of the pattern achieving it [N])."""
    nb = n_big(patterns)
    allowed = np.flatnonzero(nb == budget if exact else nb <= budget)
    if not len(allowed):
        raise InvalidArgumentError(f"no evaluated pattern has {'exactly' if exact else 'at most'} {budget} big layers")
    sub = losses[allowed]
    best = np.argmin(sub, axis=0)
    return sub[best, np.arange(sub.shape[1])], allowed[best]


def best_fixed(losses: np.ndarray, patterns: np.ndarray, budget: int, exact: bool = False) -> int:
    """The index of the one pattern with the lowest mean loss among those with at most
    (exact: exactly) `budget` big layers."""
    nb = n_big(patterns)
    allowed = np.flatnonzero(nb == budget if exact else nb <= budget)
    return int(allowed[np.argmin(losses[allowed].mean(axis=1))])


def beam_oracle(evaluate: Callable[[np.ndarray], np.ndarray], n_layers: int, width: int,
                max_budget: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Greedy / beam search over big/small patterns that scales to deep models: start from all
    small; at budget b extend each of the `width` patterns kept at b - 1 by one more big layer,
    score the new ones (`evaluate`: patterns [P, L] -> losses [P, N]), and keep the `width`
    that are the best pattern for the most tokens (ties: lower mean loss). Evaluates at most
    1 + width * L per budget instead of C(L, b). -> (patterns [P, L], losses [P, N]) of every
    pattern evaluated; `oracle` over them is the beam oracle (an upper bound of the exact one)."""
    max_budget = n_layers if max_budget is None else max_budget
    start = np.full((1, n_layers), SMALL, np.int32)
    seen: dict[tuple, int] = {tuple(start[0]): 0}
    patterns, losses = [start[0]], [evaluate(start)[0]]
    frontier = [start[0]]
    for _ in range(max_budget):
        new = []
        for p in frontier:
            for layer in np.flatnonzero(p != BIG):
                q = p.copy()
                q[layer] = BIG
                if tuple(q) not in seen:
                    seen[tuple(q)] = len(patterns) + len(new)
                    new.append(q)
        if not new:
            break
        new_losses = evaluate(np.stack(new))
        patterns.extend(new)
        losses.extend(new_losses)
        wins = np.bincount(np.argmin(new_losses, axis=0), minlength=len(new))
        order = np.lexsort((new_losses.mean(axis=1), -wins))
        frontier = [new[i] for i in order[:width]]
    return np.stack(patterns), np.stack(losses)


def random_budget_routes(rng: np.random.Generator, shape: tuple[int, int], n_layers: int, budget: int) -> np.ndarray:
    """[R, T, L] int32: each token takes the big FFN in `budget` layers drawn uniformly at
    random (without replacement), the small one elsewhere."""
    keys = rng.random((*shape, n_layers))
    ranks = np.argsort(np.argsort(keys, axis=-1), axis=-1)
    return np.where(ranks < budget, BIG, SMALL).astype(np.int32)


# ----------------------------------------------------------------------------- routers


def split_router(params) -> tuple[dict, dict]:
    """(router params, the rest) of an unrolled Duo model with routers."""
    routers, rest = {}, {}
    for name, sub in params.items():
        if isinstance(sub, dict) and "duo" in sub and "router" in sub["duo"]:
            routers[name] = sub["duo"]["router"]
            rest[name] = {**sub, "duo": {k: v for k, v in sub["duo"].items() if k != "router"}}
        else:
            rest[name] = sub
    return routers, rest


def merge_router(routers: dict, rest: dict) -> dict:
    return {name: ({**sub, "duo": {**sub["duo"], "router": routers[name]}} if name in routers else sub)
            for name, sub in rest.items()}


def train_router(params, config, rows: np.ndarray, budget: float, *, steps: int = 150, batch: int = 8,
                 lr: float = 3e-2, alpha: float = 10.0, tau_start: float = 1.0, tau_end: float = 0.05,
                 targets: np.ndarray | None = None, seed: int = 0, log: Callable[[str], None] | None = None
                 ) -> tuple[dict, Any, list[float]]:
    """Stage 2: fit a linear router per layer with the base frozen -> (params with routers,
    config with duo.router on, loss curve). Without `targets`: the paper's objective, CE of the
    soft mixture at temperature tau (annealed geometrically tau_start -> tau_end) +
    alpha * (mean P(big) - budget / L)^2. With `targets` [R, T, L] (oracle routes, 0 big /
    1 small): imitation — binary cross entropy of each router's P(big) against the target,
    with the forward run under the target routes (the states the oracle's routes produce)."""
    check_budget(budget, config.n_layers)
    full, rconfig = init_router(params, config)
    routers, rest = split_router(full)
    # Always from zero (P(big) = 1/2), as documented: a model that already has routers
    # (builtin:duo ships one) must not hand every budget's training its own start.
    routers = jax.tree.map(jnp.zeros_like, routers)
    rows = np.asarray(rows, np.int32)
    step, opt = _router_step(rconfig, float(lr), float(alpha))
    state = opt.init(routers)
    rng = np.random.default_rng(seed)
    curve = []
    for i in range(steps):
        pick = rng.choice(len(rows), size=min(batch, len(rows)), replace=False)
        tau = tau_start * (tau_end / tau_start) ** (i / max(steps - 1, 1)) if targets is None else 1.0
        chunk = jnp.asarray(rows[pick])
        target = None if targets is None else jnp.asarray(targets[pick], jnp.int32)
        routers, state, loss = step(routers, state, rest, chunk[:, :-1], chunk[:, 1:], jnp.float32(tau),
                                    jnp.float32(budget / config.n_layers), target)
        curve.append(float(loss))
        if log is not None and (i + 1) % 50 == 0:
            log(f"  router step {i + 1}/{steps}: loss {curve[-1]:.4f} (tau {tau:.3f})")
    return merge_router(routers, rest), rconfig, curve


@functools.lru_cache(maxsize=None)
def _router_step(rconfig, lr: float, alpha: float):
    """(jitted step, optimizer) of router training for one model config: the frozen params,
    temperature and budget are arguments, so every budget and router shares one program
    (one more for imitation)."""
    import optax

    from jaxaccel.model.transformer import forward

    opt = optax.adam(lr)

    def loss_fn(routers, rest, x, y, tau, share, target):
        p = scale_router(merge_router(routers, rest), 1.0 / tau)  # (scale_router finds routers in a model)
        if target is None:
            logits, _, aux = forward(p, rconfig, x, plan=ExecutionPlan(soft_routes=True), return_aux=True)
            logp = jax.nn.log_softmax(logits, -1)
            ce = -jnp.mean(jnp.take_along_axis(logp, y[..., None], -1))
            return ce + alpha * (jnp.mean(aux["duo_p_big"]) - share) ** 2
        _, _, aux = forward(p, rconfig, x, plan=ExecutionPlan(routes=target), return_aux=True)
        logit = aux["duo_router_logits"][..., BIG] - aux["duo_router_logits"][..., SMALL]  # [L, B, T]
        label = (jnp.moveaxis(target, -1, 0) == BIG).astype(jnp.float32)
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logit, label))

    @jax.jit
    def step(routers, state, rest, x, y, tau, share, target):
        loss, grads = jax.value_and_grad(loss_fn)(routers, rest, x, y, tau, share, target)
        updates, state = opt.update(grads, state, routers)
        return optax.apply_updates(routers, updates), state, loss

    return step, opt


def _count_big(params, config, x):
    from jaxaccel.model.transformer import forward

    if not config.duo.router:
        raise InvalidArgumentError("counting a router's big layers needs a Duo model with a router "
                                   "(model.duo.router); this one has none")

    _, _, aux = forward(params, config, x, return_aux=True)
    return jnp.sum(hard_routes(aux["duo_router_logits"]) == BIG, axis=0)  # logits [L, B, T, 2]


_count_big_jit = jax.jit(_count_big, static_argnums=(1,))


def big_layer_counts(params, config, tokens) -> np.ndarray:
    """[B, T] int: in how many layers each token's (hard) router picks big (one compiled
    program per config and shape)."""
    return np.asarray(_count_big_jit(params, config, jnp.asarray(tokens, jnp.int32)))


def router_big_layers(params, config, rows: np.ndarray, batch: int = 32) -> np.ndarray:
    """[N] float32: the number of layers in which each token's (hard) router picks big."""
    out = [np.asarray(_count_big_jit(params, config, jnp.asarray(rows[i:i + batch, :-1])))
           for i in range(0, len(rows), batch)]
    return np.concatenate(out).reshape(-1).astype(np.float32)


def calibrate_router(params, config, rows: np.ndarray, budget: float, iters: int = 14, batch: int = 32
                     ) -> tuple[dict, float]:
    """Shift every router's big logit by one common delta (bisection) so that the hard routes
    take `budget` big layers per token on `rows` -> (params, delta). A router trained with a
    soft budget loss (or by imitation) lands near, not on, its budget when made hard; this
    puts every router at the budget it is compared at."""
    lo, hi = -30.0, 30.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if float(np.mean(router_big_layers(shift_router(params, mid), config, rows, batch))) < budget:
            lo = mid
        else:
            hi = mid
    delta = 0.5 * (lo + hi)
    return shift_router(params, delta), delta


# ----------------------------------------------------------------------------- the run


def _ppl(losses) -> float:
    return float(math.exp(float(np.mean(losses))))


def run(model: str = "runs/duo", config: str = "configs/duo.yaml", eval_rows: int = 32, seq_len: int = 256,
        skip_rows: int = 2, beam_width: int = 4, router_budgets: Sequence[int] = (1, 2, 4, 6),
        random_draws: int = 100, router_steps: int = 150, batch: int = 32, seed: int = 0,
        save_router: str | None = None, oracle_mode: str = "auto",
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole experiment -> the results dict (see the module docstring). `save_router`: a
    folder where the model with its CE + budget-loss router at the budget closest to half the
    layers is saved (a loadable model: decoding uses the router's routes). `oracle_mode`:
    "exhaustive" (all 2^L patterns, and 3^L with skip on `skip_rows` windows: an error past
    MAX_PATTERNS), "beam" (the beam oracle over every window; oracles and the best fixed
    pattern range over the patterns it evaluated; no 3^L part), or "auto" (exhaustive where
    2^L fits the limit, else beam; the 3^L part only where 3^L fits). skip_rows 0: no 3^L part."""
    import jaxaccel
    from jaxaccel.bench.common import machine
    from jaxaccel.config import build
    from jaxaccel.experiments.skipdecode import heldout_rows
    from jaxaccel.model.transformer import canonical_params
    from jaxaccel.train.config import RunConfig

    lm = jaxaccel.load(model, dtype="float32")
    cfg = lm.config
    if not cfg.duo.enabled:
        raise InvalidArgumentError(f"{model} is not a Duo-LLM model (model.duo.enabled is off)")
    n_layers = cfg.n_layers
    for b in router_budgets:
        check_budget(b, n_layers)
    exhaustive, with_skip_part = oracle_plan(oracle_mode, n_layers, skip_rows)
    params = canonical_params(lm.params, cfg)
    try:
        data = build(RunConfig, config).data
    except ConfigError as e:  # (its message, not one that blames --seq-len)
        raise e if str(config) in str(e) else ConfigError(f"--config {config}: {e}") from None
    try:
        rows = heldout_rows(data, seq_len, eval_rows, model=lm)
    except (ConfigError, InvalidArgumentError):
        raise
    except ValueError as e:  # no held-out document that long
        raise InvalidArgumentError(f"{e} (--seq-len {seq_len})") from None
    half = len(rows) // 2
    if half < 1:
        raise InvalidArgumentError(f"need at least 2 held-out rows of {seq_len + 1} tokens, got {len(rows)}")
    fit_rows, test_rows = rows[:half], rows[half:]
    scorer = Scorer(params, cfg, rows, batch)
    t = seq_len

    start = time.perf_counter()
    if exhaustive:
        patterns = all_patterns(n_layers)
        log(f"exhaustive: {len(patterns)} big/small patterns x {len(rows)} rows of {t} tokens")
        flat = scorer.patterns(patterns, log=log)
    else:
        log(f"beam oracle (width {beam_width}) over {len(rows)} rows of {t} tokens"
            + (f": 2^{n_layers} patterns exceed {MAX_PATTERNS:,}" if 2 ** n_layers > MAX_PATTERNS else ""))
        patterns, flat = beam_oracle(lambda ps: scorer.patterns(ps), n_layers, beam_width)
    losses_all = flat.reshape(len(patterns), len(rows), t)
    exhaustive_s = time.perf_counter() - start
    fit = losses_all[:, :half].reshape(len(patterns), -1)
    test = losses_all[:, half:].reshape(len(patterns), -1)
    all_big = int(np.flatnonzero(n_big(patterns) == n_layers)[0])
    all_small = int(np.flatnonzero(n_big(patterns) == 0)[0])
    index = {tuple(p): i for i, p in enumerate(patterns)}

    budgets = list(range(n_layers + 1))
    curves: dict[str, list] = {k: [] for k in ("oracle", "oracle_exact", "fixed", "fixed_exact", "beam_oracle")}
    for b in budgets:
        curves["oracle"].append(_ppl(oracle(test, patterns, b)[0]))
        curves["oracle_exact"].append(_ppl(oracle(test, patterns, b, exact=True)[0]))
        # the fixed pattern is chosen on the fit half (as the routers are fitted there), scored on test
        curves["fixed"].append(_ppl(test[best_fixed(fit, patterns, b)]))
        fixed_exact = best_fixed(fit, patterns, b, exact=True)
        curves["fixed_exact"].append({"perplexity": _ppl(test[fixed_exact]), "pattern": pattern_string(patterns[fixed_exact])})

    log("the oracle's per-token routes, run")
    test_scorer = Scorer(params, cfg, test_rows, batch)
    curves["oracle_run"] = [_ppl(test_scorer.routed(patterns[oracle(test, patterns, b)[1]].reshape(
        len(test_rows), t, n_layers))) for b in budgets]

    if exhaustive:
        log(f"beam oracle (width {beam_width}), validated against the exhaustive one")
        beam_patterns, beam_losses = beam_oracle(lambda ps: test[[index[tuple(p)] for p in ps]], n_layers,
                                                 beam_width)
        curves["beam_oracle"] = [_ppl(oracle(beam_losses, beam_patterns, b)[0]) for b in budgets]
    else:  # the oracle is the beam oracle
        beam_patterns, curves["beam_oracle"] = patterns, list(curves["oracle"])

    log(f"random routes: best of {random_draws} per budget")
    rng = np.random.default_rng(seed)
    random_best = [_ppl(test[all_small])]
    start = time.perf_counter()
    for b in budgets[1:-1]:
        draws = [_ppl(test_scorer.routed(random_budget_routes(rng, (len(test_rows), t), n_layers, b)))
                 for _ in range(random_draws)]
        random_best.append(min(draws))
        log(f"  budget {b}: best {min(draws):.2f}, median {float(np.median(draws)):.2f}")
    random_best.append(_ppl(test[all_big]))
    curves["random_best"] = random_best
    random_s = time.perf_counter() - start

    log("routers")
    routers = []
    keep_budget = min(router_budgets, key=lambda b: abs(b - n_layers / 2)) if router_budgets else None
    for b in router_budgets:
        for kind in ("budget_loss", "imitation"):
            targets = None
            if kind == "imitation":
                idx = oracle(fit, patterns, b)[1]
                targets = patterns[idx].reshape(half, t, n_layers)
            rparams, rcfg, curve = train_router(params, cfg, fit_rows, b, steps=router_steps, targets=targets,
                                                seed=seed, log=log)
            raw = float(np.mean(router_big_layers(rparams, rcfg, test_rows, batch)))
            raw_ppl = _ppl(test_scorer.free(rparams, rcfg))  # rcfg is static: one program for every router
            rparams, delta = calibrate_router(rparams, rcfg, fit_rows, b, batch=batch)
            losses = test_scorer.free(rparams, rcfg)
            realized = float(np.mean(router_big_layers(rparams, rcfg, test_rows, batch)))
            routers.append({"kind": kind, "budget": b, "big_layers": realized, "perplexity": _ppl(losses),
                            "calibration_shift": delta, "uncalibrated": {"big_layers": raw, "perplexity": raw_ppl},
                            "final_train_loss": float(np.mean(curve[-10:]))})
            log(f"  {kind} router, budget {b}: {realized:.2f} big layers, perplexity {routers[-1]['perplexity']:.2f}")
            if save_router and kind == "budget_loss" and b == keep_budget:
                info = {**lm.info, "duo_router": {"budget": b, "big_layers": realized, "test_perplexity": _ppl(losses),
                                                  "all_big_perplexity": _ppl(test[all_big]), "steps": router_steps}}
                jaxaccel.from_params(rcfg, rparams, tokenizer=lm.tokenizer, eos_token_ids=lm.eos_token_ids,
                                     bos_token_id=lm.bos_token_id, info=info).save(save_router)
                log(f"  saved the model with this router to {save_router}")

    with_skip, skip_s = None, None
    if skip_rows and not with_skip_part:
        log(f"with skip: left out (3^{n_layers} patterns exceed {MAX_PATTERNS:,}, or the beam oracle runs)")
    if with_skip_part:
        skip_n = min(skip_rows, scorer.r - half)  # the test half may hold fewer windows than asked
        log(f"with skip: 3^{n_layers} patterns x {skip_n} rows")
        skip_patterns = all_patterns(n_layers, with_skip=True)
        start = time.perf_counter()
        skip_losses = scorer.patterns(skip_patterns, rows=slice(half, half + skip_n), log=log)
        skip_s = time.perf_counter() - start
        two_way = np.isin(skip_patterns, (BIG, SMALL)).all(axis=1)
        with_skip = {"rows": skip_n, "tokens": int(skip_losses.shape[1]), "patterns": len(skip_patterns),
                     "seconds": skip_s, "oracle": [], "oracle_no_skip": [], "skipped_layers": []}
        for b in budgets:
            loss, idx = oracle(skip_losses, skip_patterns, b)
            with_skip["oracle"].append(_ppl(loss))
            with_skip["oracle_no_skip"].append(_ppl(oracle(skip_losses[two_way], skip_patterns[two_way], b)[0]))
            with_skip["skipped_layers"].append(float(np.mean(np.sum(skip_patterns[idx] == SKIP, axis=1))))

    heatmap = {}
    for b in (1, 2, 4):
        if b <= n_layers:
            idx = oracle(test, patterns, b, exact=True)[1]
            heatmap[str(b)] = np.mean(patterns[idx] == BIG, axis=0).tolist()

    difficulty = token_difficulty(test, patterns, all_big, all_small, test_rows, lm.tokenizer)
    return {
        "machine": machine(), "model": model, "oracle_mode": "exhaustive" if exhaustive else "beam",
        "n_layers": n_layers, "d_model": cfg.d_model,
        "ffn_dim": cfg.ffn_dim, "small_ffn_dim": cfg.small_ffn_dim, "seq_len": t,
        "rows": {"fit": half, "test": len(test_rows)}, "test_tokens": int(test.shape[1]),
        "budgets": budgets, "all_big": _ppl(test[all_big]), "all_small": _ppl(test[all_small]),
        "curves": curves, "routers": routers, "with_skip": with_skip, "heatmap_exact": heatmap,
        "difficulty": difficulty,
        "beam": {"width": beam_width, "patterns_evaluated": len(beam_patterns),
                 "exhaustive_patterns": 2 ** n_layers if exhaustive else None,
                 "max_gap_perplexity": (max(abs(a - b) for a, b in zip(curves["beam_oracle"], curves["oracle"]))
                                        if exhaustive else None)},
        "seconds": {"patterns": exhaustive_s, "random": random_s, "skip": skip_s},
        "random_draws": random_draws, "router_steps": router_steps,
    }


def token_difficulty(test: np.ndarray, patterns: np.ndarray, all_big: int, all_small: int, rows: np.ndarray,
                     tokenizer, examples: int = 12) -> dict[str, Any]:
    """A token's gain = its all-small loss minus its best loss over every pattern (what the big
    FFNs could give it), against its loss (all big): Spearman correlation, mean gain by kind
    of token, and the tokens that gain most, in context."""
    best = test.min(axis=0)
    gain = test[all_small] - best
    loss = test[all_big]
    rank = lambda a: np.argsort(np.argsort(a)).astype(np.float64)  # noqa: E731
    spearman = float(np.corrcoef(rank(gain), rank(loss))[0, 1])
    targets = rows[:, 1:].reshape(-1)
    inputs = rows[:, :-1]
    t = inputs.shape[1]
    kinds: dict[str, list[float]] = {}
    pieces = [tokenizer.piece(int(i)) if tokenizer is not None else str(int(i)) for i in targets]
    for piece, g in zip(pieces, gain):
        kinds.setdefault(_kind(piece), []).append(float(g))
    top = np.argsort(-gain)[:examples]
    shown = []
    for j in top:
        r, pos = divmod(int(j), t)
        context = rows[r, max(0, pos - 11):pos + 1].tolist()
        shown.append({"token": pieces[j], "context": tokenizer.decode(context) if tokenizer is not None else context,
                      "gain": float(gain[j]), "loss_all_big": float(loss[j]), "loss_all_small": float(test[all_small][j])})
    return {"spearman_gain_vs_loss": spearman, "mean_gain": float(gain.mean()),
            "gain_by_kind": {k: {"tokens": len(v), "mean_gain": float(np.mean(v))} for k, v in sorted(kinds.items())},
            "top": shown,
            "sample": {"gain": gain[::max(1, len(gain) // 2000)].tolist(), "loss": loss[::max(1, len(gain) // 2000)].tolist()}}


def _kind(piece: str) -> str:
    text = piece.replace("\u2581", " ").replace("\u0120", " ").replace("\u010a", "\n")
    if not text.strip():
        return "whitespace / newline"
    core = text.strip()
    if core.isdigit():
        return "digits"
    if all(not c.isalnum() and c != "_" for c in core):
        return "punctuation"
    return "word start" if text.startswith(" ") else "word piece"


# ----------------------------------------------------------------------------- report


def plot(results: dict[str, Any], out: str | Path) -> list[Path]:
    from jaxaccel.experiments.plots import _pyplot, save_figure

    plt = _pyplot()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    c, b, n = results["curves"], results["budgets"], results["n_layers"]
    paths = []
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.plot(b, c["oracle"], "o-", label="oracle (at most b big)")
    ax.plot(b, c["oracle_exact"], "o--", label="oracle (exactly b big)")
    ax.plot(b, c["beam_oracle"], "x:", label=f"beam oracle (width {results['beam']['width']})")
    if "oracle_run" in c:  # (results from before it was measured have none)
        ax.plot(b, c["oracle_run"], "o-.", label="oracle's per-token routes, run")
    ax.plot(b, c["fixed"], "s-", label="best fixed pattern")
    ax.plot(b, c["random_best"], "^-", label=f"best of {results['random_draws']} random routings")
    for kind, style in (("budget_loss", "D"), ("imitation", "P")):
        pts = [r for r in results["routers"] if r["kind"] == kind]
        if pts:
            ax.plot([r["big_layers"] for r in pts], [r["perplexity"] for r in pts], style,
                    ms=8, label=f"router ({'CE + budget loss' if kind == 'budget_loss' else 'imitating the oracle'})")
    ax.axhline(results["all_big"], color="k", lw=0.8, ls="--", label="all big")
    ax.axhline(results["all_small"], color="gray", lw=0.8, ls="--", label="all small")
    ax.set(xlabel="big layers per token (budget b)", ylabel="perplexity (held-out)", yscale="log",
           title=f"Duo-LLM, {n} layers: perplexity vs big layers")
    paths.append(save_figure(plt, fig, [ax], out / "perplexity-vs-budget.png"))

    heat = results["heatmap_exact"]
    fig, ax = plt.subplots(figsize=(7, 2.6))
    im = ax.imshow(np.asarray([heat[k] for k in heat]), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set(yticks=range(len(heat)), yticklabels=[f"b = {k}" for k in heat], xticks=range(n),
           xlabel="layer", title="share of tokens whose oracle pattern makes the layer big")
    fig.colorbar(im, ax=ax)
    paths.append(save_figure(plt, fig, [ax], out / "oracle-layers.png", grid=False))

    d = results["difficulty"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(d["sample"]["loss"], d["sample"]["gain"], s=4, alpha=0.4)
    ax.set(xlabel="token loss (all big)", ylabel="oracle gain (all-small loss - best loss)",
           title=f"token difficulty: Spearman {d['spearman_gain_vs_loss']:.2f}")
    paths.append(save_figure(plt, fig, [ax], out / "difficulty.png"))
    return paths


def markdown(results: dict[str, Any]) -> str:
    c = results["curves"]
    lines = ["| big layers b | oracle (≤ b) | oracle (= b) | beam oracle | best fixed (≤ b) | best fixed (= b) | "
             f"best of {results['random_draws']} random |", "|---|---|---|---|---|---|---|"]
    for i, b in enumerate(results["budgets"]):
        fe = c["fixed_exact"][i]
        lines.append(f"| {b} | {c['oracle'][i]:.2f} | {c['oracle_exact'][i]:.2f} | {c['beam_oracle'][i]:.2f} | "
                     f"{c['fixed'][i]:.2f} | {fe['perplexity']:.2f} (`{fe['pattern']}`) | {c['random_best'][i]:.2f} |")
    if "oracle_run" in c:
        lines += ["", "The at-most-b oracle's per-token routes, run (tokens taking different routes change each "
                  "other's context): " + ", ".join(f"b = {b}: {v:.2f}" for b, v in zip(results["budgets"],
                                                                                 c["oracle_run"])) + "."]
    lines += ["", f"All big: {results['all_big']:.2f}; all small: {results['all_small']:.2f}.", "",
              "| router | budget | big layers (realised) | perplexity | oracle (≤ realised, interpolated) |",
              "|---|---|---|---|---|"]
    for r in results["routers"]:
        lines.append(f"| {'CE + budget loss' if r['kind'] == 'budget_loss' else 'imitates the oracle'} | {r['budget']} | "
                     f"{r['big_layers']:.2f} | {r['perplexity']:.2f} | {_at(c['oracle'], r['big_layers']):.2f} |")
    ws = results["with_skip"]
    if ws is not None:
        lines += ["", f"With skip (3^{results['n_layers']} = {ws['patterns']:,} patterns, {ws['tokens']} tokens):", "",
                  "| b | oracle big/small/skip | oracle big/small | layers skipped (mean) |", "|---|---|---|---|"]
        for b in results["budgets"]:
            lines.append(f"| {b} | {ws['oracle'][b]:.2f} | {ws['oracle_no_skip'][b]:.2f} | "
                         f"{ws['skipped_layers'][b]:.2f} |")
    d = results["difficulty"]
    lines += ["", f"Token difficulty: Spearman(gain, loss) = {d['spearman_gain_vs_loss']:.2f}; mean gain "
              f"{d['mean_gain']:.3f} nats.", "", "| kind of token | tokens | mean gain (nats) |", "|---|---|---|"]
    for k, v in d["gain_by_kind"].items():
        lines.append(f"| {k} | {v['tokens']} | {v['mean_gain']:.3f} |")
    lines += ["", "| token | context | gain | loss (all big) | loss (all small) |", "|---|---|---|---|---|"]
    for e in d["top"]:
        ctx = str(e["context"]).replace("|", "\\|").replace("\n", "⏎")
        lines.append(f"| `{e['token']}` | `{ctx}` | {e['gain']:.2f} | {e['loss_all_big']:.2f} | {e['loss_all_small']:.2f} |")
    return "\n".join(lines)


def _at(curve: Sequence[float], x: float) -> float:
    """Linear interpolation of a per-budget curve at a fractional budget."""
    lo = int(math.floor(x))
    hi = min(lo + 1, len(curve) - 1)
    return float(curve[lo] + (curve[hi] - curve[lo]) * (x - lo))


def summary(results: dict[str, Any]) -> list[str]:
    """The paper's findings, each marked reproduced / not at this scale."""
    c, n = results["curves"], results["n_layers"]
    mark = lambda ok: "reproduced" if ok else "not reproduced at this scale"  # noqa: E731
    out = []
    one = c["oracle_exact"][1]
    out.append(f"oracle with 1 big layer {one:.2f} vs all big {results['all_big']:.2f}: {mark(one < results['all_big'])}")
    peak = int(np.argmin(c["oracle_exact"]))
    out.append(f"oracle (exactly b big) is best at b = {peak} of {n}: "
               f"{mark(n / 4 <= peak <= 3 * n / 4)} (the paper: around half the layers)")
    heat = results["heatmap_exact"].get("1")
    if heat is not None:
        centre = float(np.dot(heat, np.arange(n)) / max(sum(heat), 1e-9))
        out.append(f"at budget 1 the oracle's big layer sits at mean index {centre:.2f} (middle {(n - 1) / 2:.1f}): "
                   f"late layers preferred: {mark(centre > (n - 1) / 2)}")
    for r in (r for r in results["routers"] if r["kind"] == "budget_loss"):
        b = r["big_layers"]
        rand, orc = _at(c["random_best"], b), _at(c["oracle"], b)
        close = abs(r["perplexity"] - rand) <= 0.5 * abs(r["perplexity"] - orc)
        out.append(f"router at {b:.2f} big layers: {r['perplexity']:.2f} vs best random {rand:.2f}, oracle {orc:.2f}: "
                   f"about as good as random, far from the oracle: {mark(close and r['perplexity'] > orc)}")
    for r in (r for r in results["routers"] if r["kind"] == "imitation"):
        base = next((q for q in results["routers"] if q["kind"] == "budget_loss" and q["budget"] == r["budget"]), None)
        if base is not None:  # each router's gap to the oracle at its own realised budget
            gap = base["perplexity"] - _at(c["oracle"], base["big_layers"])
            own = r["perplexity"] - _at(c["oracle"], r["big_layers"])
            closed = 1.0 - own / gap if gap > 0 else float("nan")
            out.append(f"imitation router, budget {r['budget']}: {r['perplexity']:.2f} at {r['big_layers']:.2f} big "
                       f"layers (CE router: {base['perplexity']:.2f} at {base['big_layers']:.2f}); closes {closed:.0%} "
                       "of the CE router's gap to the oracle at its realised budget (beyond the paper)")
    s = results["difficulty"]["spearman_gain_vs_loss"]
    out.append(f"token difficulty: Spearman(gain, loss) = {s:.2f}; loss a weak proxy for what the big FFN "
               f"can gain: {mark(abs(s) < 0.5)}")
    return out
