"""DySpec (Xiong et al. 2024, arXiv 2410.11744): a token tree grown greedily from the draft's
probabilities, verified losslessly by the shared tree verifier.

Every node carries a *candidate*: its next child, valued by the product of the draft
probabilities along its path times the draft mass its not-yet-sampled children still hold
(an estimate of the probability the target accepts that child). The root's candidate is
worth 1.

* `expand="heap"` (the paper's Algorithm 1): repeatedly take the best candidate, sample a
  token from its node's residual draft distribution (greedy: the residual's argmax), and add
  it as a child; the node's candidate is then worth value × (1 − p) (the residual loses the
  token) and the new child's own candidate value × p. A child's candidate needs the draft's
  distribution at the child, i.e. a draft forward over it: `pops_per_round=M` takes M
  candidates per draft forward (M = 1 is the paper; children added in a round wait for the
  next one), until `budget` nodes.
* `expand="threshold"` (the paper's Algorithm 2): one draft forward per depth; each round
  takes every candidate whose value exceeds `threshold` (at most M per round), so the tree
  grows layer by layer, capped at `budget` nodes.

Static shapes: the tree is a fixed [budget + 1] array per row (rows grow their own trees,
padded), the "heap" an argmax over the nodes' candidate values; each node keeps its draft
distribution (for the verifier's `draft_q`) and its residual. `max_depth` and `max_children`
bound the tree (they size the verifier's compiled loops). The heap's ceil(budget / M) rounds
are fixed, so a heap refuses what it could never fill: M > max_children (the first round grows
the root's children only) and a budget past the nodes max_depth x max_children hold. Within
those limits a tree can still come out a few nodes short of the budget (the rest verified as
padding: a cost, never a wrong token) when, with the budget near the tree's room, a round
finds fewer nodes ready to grow than M (a round's new children wait for the next one);
`stats["budget"]` is the size verified.

Values at temperature 0: the verifier accepts a child iff it is the target's argmax, so a
value should estimate P(argmax = token). The draft's softmax is a poorly calibrated
estimate of that (a small draft is under-confident: its top token holds ~0.3 of the mass yet
matches the target's argmax ~0.6 of the time on the shipped pair), which makes the heap
prefer siblings over depth. `greedy_temperature="auto"` fits the softmax temperature that
makes the draft's distribution the best predictor (maximum likelihood) of the target's
argmax on calibration text (`decode.acceptance.greedy_temperature`, measured once per
target/draft pair and cached); only values change — tokens are still the draft's top-k.
When sampling, the paper values a child by the residual draft probability q'(x) it was
drawn with (`values="draft"`). How well q'(x) predicts acceptance depends on the pair: for the
shipped 0.9M draft at temperature 0.6 the correlation is only 0.35 (DySpec's Figure 2,
docs/BENCHMARKS.md), and tokens the draft thinks unlikely are accepted about half the time.
`values="calibrated"` (the default) keeps the heap and the draws, and replaces q'(x) by the
measured probability that a child drawn at that rank with that q'(x) is accepted
(`decode.acceptance.conditional_acceptance`: the verifier simulated on calibration text,
once per target/draft pair and sampling settings, cached). A node's next candidate is worth
the probability of reaching it times the expectation of that table over the node's residual
distribution. The tree's tokens, the verifier and so losslessness are unchanged: only which
node grows next. On the shipped pair at temperature 0.6 this lifts DySpec's MAT at budget 64,
batch 1, from 3.05 to 4.06 (Sequoia: 3.86; docs/BENCHMARKS.md). At temperature 0 the calibration is
`greedy_temperature`: the same table built for greedy verification measured lower there
(MAT 3.59-3.66 against 3.72 at budget 64), so greedy decoding does not use it.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.decode import tuning
from jaxaccel.decode.autoregressive import Autoregressive
from jaxaccel.decode.draft import DraftModelMethod, Grown, forward_nodes
from jaxaccel.decode.engine import DecodeState, StepContext
from jaxaccel.decode.tree import Tree, TreeShape, positive_int
from jaxaccel.errors import InvalidArgumentError


AUTO_MAX_BUDGET = 128  # budget="auto" plans trees of at most this many nodes


class DySpec(DraftModelMethod):
    name = "dyspec"
    auto_budget = True
    options = {"draft": None, "budget": 32, "expand": "heap", "pops_per_round": None, "threshold": 0.05,
               "max_depth": 16, "max_children": 16, "greedy_temperature": "auto", "values": "calibrated"}
    value_table: np.ndarray | None = None  # [max_children, bins] acceptance by rank and q'(x): see `values`

    def __init__(self, **opts: Any):
        super().__init__(**opts)
        o = self.opts
        if o["expand"] not in ("heap", "threshold"):
            raise InvalidArgumentError(f'expand must be "heap" or "threshold", got {o["expand"]!r}')
        t = o["threshold"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t < 1.0:
            raise InvalidArgumentError(f"threshold must be in (0, 1), got {t!r}")
        self.threshold = float(t)
        if "threshold" in opts and o["expand"] != "threshold":
            raise InvalidArgumentError(f'threshold applies to expand="threshold" only; this tree is grown with '
                                       f'expand={o["expand"]!r}')
        self.max_depth = positive_int("max_depth", o["max_depth"], 64)
        self.max_children = positive_int("max_children", o["max_children"], 64)
        g = o["greedy_temperature"]
        if g != "auto" and (isinstance(g, bool) or not isinstance(g, (int, float)) or not 0.0 < g <= 10.0):
            raise InvalidArgumentError(f'greedy_temperature must be "auto" or in (0, 10], got {g!r}')
        if g != "auto":
            self.greedy_temperature = float(g)
        if o["values"] not in ("calibrated", "draft"):
            raise InvalidArgumentError(f'values must be "calibrated" or "draft", got {o["values"]!r}')
        if o["pops_per_round"] is not None:
            self.pops = positive_int("pops_per_round", o["pops_per_round"], self.MAX_BUDGET)
        if o["budget"] == "auto":
            if o["expand"] != "heap":
                raise InvalidArgumentError('budget="auto" plans a heap-grown tree; give a budget with expand="threshold"')
            if o["pops_per_round"] is not None and self.pops > AUTO_MAX_BUDGET:
                raise InvalidArgumentError(f'pops_per_round ({self.pops}) must not exceed the largest budget '
                                           f'budget="auto" plans ({AUTO_MAX_BUDGET})')
            if o["pops_per_round"] is not None:
                self._check_fan_out()
            return  # set by prepare()
        if o["pops_per_round"] is None:  # the heap: 4 candidates per draft forward; threshold: a whole layer
            self.pops = min(4, self.budget, self.max_children) if o["expand"] == "heap" else self.budget
        self._check_pops()

    def _check_pops(self) -> None:
        if self.pops > self.budget:
            raise InvalidArgumentError(f"pops_per_round ({self.pops}) must not exceed budget ({self.budget})")
        if self.opts["expand"] != "heap":
            return
        self._check_fan_out()
        room = tree_room(self.max_depth, self.max_children)
        if self.budget > room:
            raise InvalidArgumentError(f"budget ({self.budget}) must not exceed the {room} nodes a tree of max_depth "
                                       f"{self.max_depth} and max_children {self.max_children} holds")

    def _check_fan_out(self) -> None:
        # The heap's rounds are fixed (ceil(budget / pops)): a pop with no node to grow is lost,
        # and the verification would pay for budget + 1 nodes the tree never holds.
        if self.pops > self.max_children:  # round 0 can only grow the root's children
            raise InvalidArgumentError(f"pops_per_round ({self.pops}) must not exceed max_children "
                                       f"({self.max_children}): the first round grows the root's children only")

    def prepare(self, target, draft, temperature, top_k, top_p, batch: int = 1) -> None:
        if temperature == 0 and self.opts["greedy_temperature"] == "auto":
            from jaxaccel.decode.acceptance import cached_greedy_temperature

            self.greedy_temperature = cached_greedy_temperature(target, draft)
            self.opts["greedy_temperature"] = self.greedy_temperature  # a constant of the compiled step
        if self.opts["budget"] == "auto":
            self.plan = plan_budget(target, draft, temperature, top_k, top_p, batch,
                                    None if self.opts["pops_per_round"] is None else [self.pops],
                                    max_depth=self.max_depth, max_children=self.max_children)
            self.budget, self.pops = self.plan.budget, self.plan.pops_per_round
            self.opts["budget"], self.opts["pops_per_round"] = self.budget, self.pops  # the compiled step's key
        self.value_table = None
        if self.opts["values"] == "calibrated" and temperature > 0 and self.budget > 0:
            from jaxaccel.decode.acceptance import cached_conditional_acceptance

            self.value_table = cached_conditional_acceptance(target, draft, temperature=temperature, top_k=top_k,
                                                             top_p=top_p, max_rank=self.max_children)[0]

    def stats(self, method_output: Any, batch: int) -> dict[str, Any]:
        """The tree budget this call ran (budget="auto": the one its cost model chose; 0 = plain
        steps, no tree) and the candidates popped per draft forward."""
        return {**super().stats(method_output, batch), "pops_per_round": self.pops if self.budget else 0}

    # Budget 0 (only from budget="auto", when no tree is predicted to pay): plain
    # autoregressive steps; the draft is not run at all.

    def key(self) -> tuple:  # the table is an argument of the program: its values key nothing
        return super().key() + (None if self.value_table is None else self.value_table.shape,)

    def method_params(self) -> jax.Array | None:
        return None if self.value_table is None else jnp.asarray(self.value_table, jnp.float32)

    def init_state(self, ctx, batch, method_input, prompt_tokens=None, prompt_lens=None):
        return None if self.budget == 0 else super().init_state(ctx, batch, method_input, prompt_tokens, prompt_lens)

    def step(self, state, ctx):
        if self.budget == 0:
            return Autoregressive().step(state, ctx)
        return super().step(state, ctx)

    def cache_headroom(self) -> int:
        return 0 if self.budget == 0 else super().cache_headroom()

    def tree_nodes(self) -> int:
        return 0 if self.budget == 0 else super().tree_nodes()

    def tree_shape(self) -> TreeShape:
        return TreeShape(nodes=self.budget + 1, max_depth=max(1, min(self.max_depth, self.budget)),
                         max_children=max(1, min(self.max_children, self.budget)))

    def rounds(self) -> int:
        if self.opts["expand"] == "heap":
            return -(-self.budget // self.pops)
        return self.tree_shape().max_depth

    def grow(self, state: DecodeState, ctx: StepContext, cache, root_q: jax.Array, keys: jax.Array) -> Grown:
        shape = self.tree_shape()
        b, vocab = root_q.shape
        n, m = shape.nodes, self.pops
        rows = jnp.arange(b)
        c = state.cache_len
        greedy = ctx.mode.greedy
        use_threshold = self.opts["expand"] == "threshold"

        calibrated = self.value_table is not None and not greedy  # sampling only (see `values`)
        if calibrated:
            from jaxaccel.decode.acceptance import VALUE_BINS

            table = ctx.method_params  # [max_children, bins]: `method_params`
            inner_edges = jnp.asarray(VALUE_BINS[1:-1], jnp.float32)

        def accept_prob(rank, prob):
            """What a child drawn at `rank` with residual probability `prob` is worth (broadcasting)."""
            return table[jnp.minimum(rank, shape.max_children - 1), jnp.searchsorted(inner_edges, prob, side="right")]

        def next_worth(rank, resid):
            """The acceptance probability of a node's next child, drawn at `rank` [...] from the
            residual `resid` [..., V]: the expectation over the draw."""
            mass = jnp.sum(resid, axis=-1, keepdims=True)
            r = resid / jnp.where(mass > 0, mass, 1.0)
            return jnp.sum(r * accept_prob(jnp.asarray(rank)[..., None], r), axis=-1)

        def worth(t):  # what a node's next child is expected to add: the heap's key
            return t["worth"] if calibrated else t["value"]

        def pop(j, t):
            """Add one child to every row whose best candidate qualifies. A node's `value` is
            the probability the verifier reaches its next child (the paper: the path's draft
            probabilities times the residual mass); `worth`, what that child is expected to
            add (the paper: the same; calibrated: times its acceptance probability)."""
            avail = (t["valid"] & t["ready"] & (t["value"] > 0) & (t["nchild"] < shape.max_children)
                     & (t["depth"] < shape.max_depth))
            if use_threshold:
                avail = avail & (worth(t) > self.threshold)
            score = jnp.where(avail, worth(t), -1.0)
            i = jnp.argmax(score, axis=1).astype(jnp.int32)
            has = (jnp.max(score, axis=1) >= 0) & (t["count"] < n)
            resid = t["resid"][rows, i]  # [b, V]
            mass = jnp.sum(resid, axis=1)
            if greedy:
                y = jnp.argmax(resid, axis=1).astype(jnp.int32)
            else:
                ks = jax.vmap(jax.random.fold_in)(keys, jnp.full((b,), t["round"] * m + j, jnp.int32))
                y = jax.vmap(jax.random.categorical)(ks, jnp.log(resid)).astype(jnp.int32)
            p = resid[rows, y] / jnp.where(mass > 0, mass, 1.0)
            has = has & (p > 0)
            v = t["value"][rows, i]
            rank = t["nchild"][rows, i]
            if calibrated:
                p = accept_prob(rank, p)
            new = jnp.where(has, t["count"], n)  # out of range when nothing is added: dropped
            at = jnp.where(has, i, n)
            t = dict(t)
            t["tokens"] = t["tokens"].at[rows, new].set(y, mode="drop")
            t["parents"] = t["parents"].at[rows, new].set(i, mode="drop")
            t["depth"] = t["depth"].at[rows, new].set(t["depth"][rows, i] + 1, mode="drop")
            t["valid"] = t["valid"].at[rows, new].set(True, mode="drop")
            anc_row = t["anc"][rows, i] | (jnp.arange(n)[None, :] == new[:, None])
            t["anc"] = t["anc"].at[rows, new].set(anc_row, mode="drop")
            t["value"] = t["value"].at[rows, new].set(v * p, mode="drop").at[rows, at].set(v * (1 - p), mode="drop")
            t["resid"] = t["resid"].at[rows, at, y].set(0.0, mode="drop")
            if calibrated:  # the popped node's next child; the new child's waits for its distribution
                left = v * (1 - p) * next_worth(rank + 1, resid.at[rows, y].set(0.0))
                t["worth"] = t["worth"].at[rows, at].set(left, mode="drop").at[rows, new].set(0.0, mode="drop")
            t["nchild"] = t["nchild"].at[rows, at].add(1, mode="drop")
            t["count"] = t["count"] + has.astype(jnp.int32)
            return t

        def pops(t):
            start = t["count"]
            t = jax.lax.fori_loop(0, m, pop, t)
            return t, start

        def round_(r, carry):
            t, cache = carry
            t, start = pops(dict(t, round=r))
            idx = start[:, None] + jnp.arange(m, dtype=jnp.int32)[None, :]
            idx = jnp.where(idx < t["count"][:, None], idx, -1)
            logits, cache = forward_nodes(ctx, cache, c, t["tokens"], t["depth"], t["anc"], idx)
            dest = jnp.where(idx >= 0, idx, n)
            q = self.probs(logits, ctx)
            r_ = rows[:, None]
            t = dict(t)
            t["q"] = t["q"].at[r_, dest].set(q, mode="drop")
            t["resid"] = t["resid"].at[r_, dest].set(q, mode="drop")
            t["ready"] = t["ready"].at[r_, dest].set(True, mode="drop")
            if calibrated:
                opened = jnp.take_along_axis(t["value"], jnp.maximum(idx, 0), axis=1)
                t["worth"] = t["worth"].at[r_, dest].set(opened * next_worth(jnp.zeros_like(idx), q), mode="drop")
            return t, cache

        zeros = jnp.zeros((b, n), jnp.int32)
        root_q = root_q.astype(jnp.float32)
        t = dict(
            tokens=zeros.at[:, 0].set(state.last_token), parents=jnp.full((b, n), -1, jnp.int32), depth=zeros,
            valid=jnp.zeros((b, n), bool).at[:, 0].set(True), ready=jnp.zeros((b, n), bool).at[:, 0].set(True),
            value=jnp.zeros((b, n), jnp.float32).at[:, 0].set(1.0), nchild=zeros,
            anc=jnp.broadcast_to(jnp.eye(n, dtype=bool), (b, n, n)),
            q=jnp.zeros((b, n, vocab), jnp.float32).at[:, 0].set(root_q),
            resid=jnp.zeros((b, n, vocab), jnp.float32).at[:, 0].set(root_q),
            count=jnp.ones((b,), jnp.int32), round=jnp.int32(0))
        if calibrated:  # (the paper's heap key is `value` itself)
            t["worth"] = jnp.zeros((b, n), jnp.float32).at[:, 0].set(next_worth(jnp.zeros((b,), jnp.int32), root_q))
        t, cache = jax.lax.fori_loop(0, self.rounds() - 1, round_, (t, cache))
        t, _ = pops(dict(t, round=jnp.int32(self.rounds() - 1)))
        tree = Tree(tokens=t["tokens"], parents=t["parents"], depth=t["depth"], valid=t["valid"],
                    draft_q=None if greedy else t["q"], mask=t["anc"])
        return Grown(tree, t["ready"], cache)


def tree_room(max_depth: int, max_children: int) -> int:
    """The most drafted nodes a tree of this depth and fan-out holds."""
    return sum(max_children ** d for d in range(1, max_depth + 1))


def plan_budget(target, draft, temperature: float, top_k, top_p, batch: int, pops_choices=None, curve=None,
                draft_ratio: float | None = None, max_depth: int = 16, max_children: int | None = None
                ) -> tuning.DraftPlan:
    """`budget="auto"`: the budget and pops per round with the best predicted speedup over
    autoregressive (`tuning.plan_draft_budget`): expected tokens per step from the draft's
    measured acceptance vector (the best static tree's value: DySpec's dynamic tree does at
    least as well on average), step cost from the backend's verification-cost curve and the
    draft/target cost ratio. Trees keep the method's `max_depth` and `max_children`: a budget
    no such tree can hold is never planned."""
    from jaxaccel.decode.acceptance import cached_acceptance

    acceptance = cached_acceptance(target, draft, temperature=temperature, top_k=top_k, top_p=top_p)
    if draft_ratio is None:
        count = lambda lm: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lm.params))  # noqa: E731
        draft_ratio = tuning.draft_cost_ratio(count(draft), count(target))
    # The backend's cost tables are part of the key (tests change them).
    costs = repr((jax.default_backend(), tuning.VERIFY_COST, tuning.TREE_STEP_OVERHEAD, tuning.DRAFT_COST_FLOOR))
    return _plan(tuple(float(a) for a in acceptance), batch, float(draft_ratio),
                 None if curve is None else tuple(sorted(curve.items())),
                 None if pops_choices is None else tuple(pops_choices), costs, int(max_depth),
                 None if max_children is None else int(max_children))


@functools.lru_cache(maxsize=64)
def _plan(acceptance: tuple[float, ...], batch: int, draft_ratio: float, curve, pops_choices,
          costs: str, max_depth: int = 16, max_children: int | None = None) -> tuning.DraftPlan:
    """`plan_budget` from hashable inputs, kept: the DP over tree sizes and the search over
    budgets take ~0.15 s, longer than a short generation (every `generate` call plans)."""
    from jaxaccel.decode.sequoia import padded_acceptance, tree_value_curve

    acceptance = np.maximum(np.asarray(acceptance), 1e-9)  # every rank possible: trees of any size fit
    if max_children is not None:  # a node's children: the first max_children ranks at most
        acceptance = np.concatenate([acceptance[:max_children], np.full(max(max_children - len(acceptance), 0), 1e-9)])
    curves = {}

    def value(n: int, depth: int) -> float:
        depth = min(depth, 16, max_depth)
        if depth not in curves:
            top = AUTO_MAX_BUDGET  # the most nodes a tree of this depth and fan-out holds
            if max_children is not None:
                top = min(top, tree_room(depth, max_children))
            vec = acceptance if max_children is not None else padded_acceptance(acceptance, AUTO_MAX_BUDGET, depth)
            curves[depth] = tree_value_curve(vec, top, depth)
        curve_d = curves[depth]
        return float(curve_d[n]) if n < len(curve_d) else 0.0  # a budget no such tree holds: never planned

    return tuning.plan_draft_budget(value, batch, draft_ratio, curve=None if curve is None else dict(curve),
                                    max_budget=AUTO_MAX_BUDGET,
                                    pops_choices=None if pops_choices is None else list(pops_choices),
                                    max_pops=max_children)
