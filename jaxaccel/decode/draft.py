"""Draft-model speculation: a small model with the target's vocabulary drafts the token tree.

The draft is a second `ModelHandle` (`ctx.draft`, its params traced arguments of the jitted
generate). It keeps its own KV cache in the method state, with the target's discipline
(slot == position, committed entries never moved or recomputed):

* prefill: inside the generate program, chunked, over every prompt token but the last;
* each step begins with a *catch-up* forward of width 2 over the committed tokens the draft
  has not run yet: always the root (`last_token`), and the accepted path's deepest drafted
  node when the drafter never ran it (a leaf of the tree) — at most those two, because every
  other node on an accepted path has a child on it, and a node gets children only after the
  draft has run it;
* tree nodes are run with the same forward as everything else: node i writes its K/V to
  draft slot `cache_len + i` (the target's scratch layout) and sees the committed prefix plus
  its ancestors already in the cache (`cache_mask`), so a tree grows over several forwards;
* after verification the accepted path's K/V are moved to contiguous slots (`tree.move_kv`,
  the target's compaction) and the draft's length becomes the committed length, less the
  path's nodes the draft never ran.

Subclasses implement `grow(state, ctx, cache, root_q, key) -> Grown`; the verifier is the
one in `tree.py` (greedy at temperature 0, multi-candidate speculative sampling with the
draft distributions `draft_q` otherwise, children sampled without replacement).

Draft distributions: at temperature 0 the draft's softmax (temperature 1: it ranks candidates
and values trees; the tokens are its top-k); when sampling, the distribution the target
samples from (`sampling.target_probs`: temperature, top-k, top-p) applied to the draft's logits.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.decode.engine import PREFILL_CHUNK, DecodeState, StepContext, commit, prefill, split_row_keys
from jaxaccel.decode.sampling import target_probs
from jaxaccel.decode.tree import MAX_TREE_NODES, Tree, TreeMethod, TreeShape, move_kv, positive_int
from jaxaccel.errors import InvalidArgumentError


class DraftState(NamedTuple):
    cache: Any  # the draft's KV cache (tuple[LayerKV, ...]), as many slots as the target's
    length: jax.Array  # [b] int32: positions the draft cache holds (slot == position); <= target cache_len


class Grown(NamedTuple):
    tree: Tree  # with draft_q (sampling) and mask (ancestor-or-self) filled in
    run: jax.Array  # [b, N] bool: the draft ran the node (its K/V sit at draft slot cache_len + i)
    cache: Any  # the draft cache after the tree's forwards


def draft_probs(logits: jax.Array, ctx: StepContext, greedy_temperature: float = 1.0) -> jax.Array:
    """The draft's distribution at a node (see the module docstring); at temperature 0 the
    softmax at `greedy_temperature` (a calibration: it only changes values, not rankings)."""
    if ctx.mode.greedy:
        return jax.nn.softmax(logits.astype(jnp.float32) / greedy_temperature, axis=-1)
    return target_probs(logits, ctx.mode, ctx.sampling)


def forward_nodes(ctx: StepContext, cache, cache_len: jax.Array, tokens: jax.Array, depth: jax.Array,
                  ancestors: jax.Array, idx: jax.Array):
    """Run the draft over tree nodes idx [b, W] (-1: none) -> (logits [b, W, vocab], cache).

    tokens/depth [b, N] describe the tree, ancestors [b or 1, N, N] its ancestor-or-self mask.
    Node i goes to slot cache_len + i and sees the committed prefix and its ancestors in the
    cache (none of the W nodes may be an ancestor of another)."""
    b, w = idx.shape
    n = tokens.shape[1]
    ok = idx >= 0
    i = jnp.maximum(idx, 0)
    node_tokens = jnp.take_along_axis(tokens, i, axis=1)
    positions = cache_len[:, None] + jnp.take_along_axis(depth, i, axis=1)
    slots = jnp.where(ok, cache_len[:, None] + i, -1)
    rows = jnp.take_along_axis(jnp.broadcast_to(ancestors, (b, n, n)), i[:, :, None], axis=1)  # [b, W, N]
    j = jnp.arange(ctx.cache_slots, dtype=jnp.int32)[None, None, :] - cache_len[:, None, None]  # slot -> node
    in_tree = (j >= 0) & (j < n) & (j != i[:, :, None])  # its own slot is written by this call
    node_of_slot = jnp.broadcast_to(jnp.clip(j, 0, n - 1), (b, w, ctx.cache_slots))
    seen = jnp.take_along_axis(rows, node_of_slot, axis=2)
    window = ctx.draft.config.sliding_window
    if window is not None:  # the forward measures a cached key's distance by its slot, which for a tree
        # node (slot cache_len + i, position cache_len + depth <= slot) understates it: the true rule here
        key_pos = cache_len[:, None, None] + jnp.take_along_axis(jnp.broadcast_to(depth[:, None, :], (b, w, n)),
                                                                 node_of_slot, axis=2)
        seen = seen & (positions[:, :, None] - key_pos < window)
    logits, cache = ctx.draft.forward(node_tokens, positions, cache=cache, write_slots=slots, prefix_len=cache_len,
                                      new_mask=jnp.eye(w, dtype=bool)[None], cache_mask=in_tree & seen)
    return logits, cache


class DraftModelMethod(TreeMethod):
    """Base of the draft-model methods: the draft's cache, catch-up and compaction (see the
    module docstring); subclasses grow the tree."""

    options: dict[str, Any] = {"draft": None, "budget": 16}
    uses_draft = True
    MAX_BUDGET = MAX_TREE_NODES
    greedy_temperature = 1.0  # see draft_probs
    auto_budget = False  # accepts budget="auto" (chosen in prepare())

    def probs(self, logits: jax.Array, ctx: StepContext) -> jax.Array:
        return draft_probs(logits, ctx, self.greedy_temperature)

    def __init__(self, **opts: Any):
        super().__init__(**opts)
        if self.opts["budget"] != "auto" or not self.auto_budget:
            self.budget = positive_int("budget", self.opts["budget"], self.MAX_BUDGET)

    def stats(self, method_output: Any, batch: int) -> dict[str, Any]:
        """The draft nodes of each step's tree (root excluded)."""
        return {**super().stats(method_output, batch), "budget": self.budget}

    def init_state(self, ctx: StepContext, batch: int, method_input: Any, prompt_tokens=None, prompt_lens=None):
        if ctx.draft is None:
            raise ValueError(f"method {self.name!r} needs a draft model handle (StepContext.draft)")
        cache = ctx.draft.init_cache(batch, ctx.cache_slots)
        cache = prefill(ctx.draft, cache, prompt_tokens, prompt_lens, min(PREFILL_CHUNK, ctx.cache_slots))
        return DraftState(cache, (prompt_lens - 1).astype(jnp.int32))

    def catch_up(self, state: DecodeState, ctx: StepContext, ds: DraftState) -> tuple[Any, jax.Array]:
        """Run the committed tokens the draft has not seen (1 or 2, the last = the root) ->
        (cache, the draft's logits at the root [b, vocab])."""
        c = state.cache_len
        two = ds.length < c
        prev = jnp.take_along_axis(state.out_tokens, jnp.maximum(state.num_new - 2, 0)[:, None], axis=1)[:, 0]
        tokens = jnp.stack([jnp.where(two, prev, 0), state.last_token], axis=1)
        positions = jnp.stack([jnp.maximum(c - 1, 0), c], axis=1)
        slots = jnp.stack([jnp.where(two, c - 1, -1), c], axis=1)
        first = jnp.broadcast_to(jnp.array([True, False]), two.shape + (2,))
        new_mask = jnp.stack([first, jnp.stack([two, jnp.ones_like(two)], axis=1)], axis=1)  # the root sees token 0 if real
        logits, cache = ctx.draft.forward(tokens, positions, cache=ds.cache, write_slots=slots,
                                          prefix_len=jnp.minimum(ds.length, c), new_mask=new_mask)
        return cache, logits[:, 1]

    def grow(self, state: DecodeState, ctx: StepContext, cache, root_q: jax.Array, keys: jax.Array) -> Grown:
        raise NotImplementedError

    def draft(self, state: DecodeState, ctx: StepContext) -> Tree:  # the tree base's hook, unused here
        raise NotImplementedError("draft-model methods grow their tree in step()")

    def step(self, state: DecodeState, ctx: StepContext) -> DecodeState:
        ds: DraftState = state.method_state
        cache, root_logits = self.catch_up(state, ctx, ds)
        rng, keys = split_row_keys(state.rng)
        grown = self.grow(state._replace(rng=rng), ctx, cache, self.probs(root_logits, ctx), keys)
        v = self.verify(state._replace(rng=rng), grown.tree, ctx)
        # The draft's copy of the accepted path, compacted like the target's; the path's nodes
        # the draft ran form a prefix of it (a node's children come from its forward).
        ran = jnp.take_along_axis(grown.run, jnp.maximum(v.path, 0), axis=1) & (v.path >= 0)
        kept = state.cache_len + jnp.sum(ran, axis=1).astype(jnp.int32)
        draft_cache = move_kv(grown.cache, state.cache_len, v.path)
        out = commit(v.state, v.tokens, v.count, ctx)
        length = jnp.minimum(kept, out.cache_len)
        return out._replace(method_state=DraftState(draft_cache, length))

    def prepare(self, target, draft, temperature: float, top_k: int | None, top_p: float | None,
                batch: int = 1) -> None:
        """Host-side set-up that needs both models (e.g. Sequoia's measured acceptance), run by
        `LanguageModel.generate` before compiling."""

    def check_draft(self, draft_config, target_config) -> None:
        """Raise InvalidArgumentError when the draft cannot draft for the target."""
        if draft_config.vocab_size != target_config.vocab_size:
            raise InvalidArgumentError(
                f"the draft's vocabulary ({draft_config.vocab_size} tokens) differs from the target's "
                f"({target_config.vocab_size}); a draft must share the target's tokenizer")


# ----------------------------------------------------------------------------- static trees


class StaticTemplate(NamedTuple):
    """A fixed tree shape drafted level by level: node 0 the root, breadth-first, each node's
    children contiguous in rank order (numpy; constants of the compiled step)."""

    parents: np.ndarray  # [N]
    depth: np.ndarray  # [N]
    rank: np.ndarray  # [N]: order among its siblings (0 = first drawn)
    level_nodes: np.ndarray  # [D + 1, W]: the nodes at each depth, -1 padded
    ancestors: np.ndarray  # [1, N, N]: ancestor-or-self mask

    @property
    def nodes(self) -> int:
        return len(self.parents)

    @property
    def max_depth(self) -> int:
        return int(self.depth.max())

    @property
    def max_children(self) -> int:
        return int(np.bincount(self.parents[1:], minlength=1).max()) if self.nodes > 1 else 1


def make_template(parents) -> StaticTemplate:
    """parents [N] (breadth-first, children contiguous) -> the template's tables."""
    parents = np.asarray(parents, np.int32)
    n = len(parents)
    if n == 0 or parents[0] != -1 or np.any(parents[1:] < 0) or np.any(parents[1:] >= np.arange(1, n)):
        raise InvalidArgumentError("a tree template needs node 0 as root and every parent before its child")
    depth = np.zeros(n, np.int32)
    rank = np.zeros(n, np.int32)
    seen = np.zeros(n, np.int32)
    anc = np.eye(n, dtype=bool)
    for i in range(1, n):
        p = parents[i]
        depth[i] = depth[p] + 1
        rank[i] = seen[p]
        seen[p] += 1
        anc[i] |= anc[p]
    if np.any(np.diff(depth) < 0):
        raise InvalidArgumentError("a tree template must be breadth-first (nodes by non-decreasing depth)")
    d_max = int(depth.max())
    width = max(int(np.sum(depth == d)) for d in range(d_max + 1))
    levels = np.full((d_max + 1, width), -1, np.int32)
    for d in range(d_max + 1):
        nodes = np.flatnonzero(depth == d)
        levels[d, :len(nodes)] = nodes
    return StaticTemplate(parents, depth, rank, levels, anc[None])


@functools.lru_cache(maxsize=64)
def widths_template(widths: tuple[int, ...]) -> StaticTemplate:
    """Per-depth fan-out [w1, w2, ...]: every node at depth d - 1 gets w_d children."""
    parents = [-1]
    level = [0]
    for w in widths:
        nxt = []
        for p in level:
            for _ in range(w):
                nxt.append(len(parents))
                parents.append(p)
        level = nxt
    return make_template(parents)


UNROLL_LEVELS = 4


class StaticDraftMethod(DraftModelMethod):
    """A static tree drafted level by level: one draft forward per depth over that level's
    nodes (padded to the widest level, so the forward compiles once); node of rank r under a
    parent takes the parent's r-th token drawn without replacement (Gumbel top-k: the same
    noise for all of a parent's children; greedy: the draft's top-k). A node whose parent's
    distribution has fewer tokens than ranks is padding."""

    def template(self) -> StaticTemplate:
        raise NotImplementedError

    def tree_shape(self) -> TreeShape:
        t = self.template()
        return TreeShape(nodes=t.nodes, max_depth=t.max_depth, max_children=t.max_children)

    def static_structure(self):
        t = self.template()
        return t.parents, t.depth

    def grow(self, state: DecodeState, ctx: StepContext, cache, root_q: jax.Array, keys: jax.Array) -> Grown:
        t = self.template()
        b, vocab = root_q.shape
        n, d_max, c_max = t.nodes, t.max_depth, t.max_children
        levels = jnp.asarray(t.level_nodes)
        parents = jnp.asarray(t.parents)
        rank = jnp.asarray(t.rank)
        depth = jnp.broadcast_to(jnp.asarray(t.depth), (b, n))
        c = state.cache_len
        greedy = ctx.mode.greedy

        def draw(d, carry):  # the tokens of level d from their parents' distributions
            q, tokens, valid = carry
            nodes = levels[d]  # [W]
            real = nodes >= 0
            node = jnp.maximum(nodes, 0)
            par = parents[node]
            q_par = q[:, jnp.maximum(par, 0)]  # [b, W, V]
            scores = jnp.log(q_par)
            if not greedy:
                noise = jax.vmap(lambda k: jax.vmap(
                    lambda p: jax.random.gumbel(jax.random.fold_in(k, p), (vocab,)))(par))(keys)
                scores = scores + noise
            if c_max > vocab:  # more ranks than tokens: the ranks past the vocabulary are padding
                scores = jnp.pad(scores, ((0, 0), (0, 0), (0, c_max - vocab)), constant_values=-jnp.inf)
            top_scores, top_tokens = jax.lax.top_k(scores, c_max)  # [b, W, C]
            top_tokens = jnp.minimum(top_tokens, vocab - 1)  # (a padding rank's token is never valid)
            r = rank[node][None, :, None]
            tok = jnp.take_along_axis(top_tokens, jnp.broadcast_to(r, (b, nodes.shape[0], 1)), axis=2)[..., 0]
            ok = jnp.take_along_axis(top_scores, jnp.broadcast_to(r, (b, nodes.shape[0], 1)), axis=2)[..., 0]
            ok = jnp.isfinite(ok) & real[None] & valid[:, jnp.maximum(par, 0)]
            dest = jnp.where(real, node, n)  # padding: dropped
            tokens = tokens.at[:, dest].set(tok.astype(jnp.int32), mode="drop")
            valid = valid.at[:, dest].set(ok, mode="drop")
            return q, tokens, valid

        def level(d, carry):  # draw level d, then run it through the draft for its children's distribution
            q, tokens, valid, cache = carry
            q, tokens, valid = draw(d, (q, tokens, valid))
            idx = jnp.broadcast_to(levels[d], (b, levels.shape[1]))
            logits, cache = forward_nodes(ctx, cache, c, tokens, depth, jnp.asarray(t.ancestors), idx)
            dest = jnp.where(levels[d] >= 0, levels[d], n)
            q = q.at[:, dest].set(self.probs(logits, ctx), mode="drop")
            return q, tokens, valid, cache

        q = jnp.zeros((b, n, vocab), jnp.float32).at[:, 0].set(root_q)
        tokens = jnp.zeros((b, n), jnp.int32).at[:, 0].set(state.last_token)
        valid = jnp.zeros((b, n), bool).at[:, 0].set(True)
        carry = (q, tokens, valid, cache)
        if d_max <= UNROLL_LEVELS:  # a loop inside the decode loop copies the draft cache every iteration on CPU
            for d in range(1, d_max):
                carry = level(d, carry)
        else:
            carry = jax.lax.fori_loop(1, d_max, level, carry)
        q, tokens, valid, cache = carry
        q, tokens, valid = draw(d_max, (q, tokens, valid))
        run = jnp.broadcast_to(jnp.asarray(t.depth < d_max), (b, n))
        tree = Tree(tokens=tokens, parents=jnp.broadcast_to(parents, (b, n)), depth=depth, valid=valid,
                    draft_q=None if greedy else q)
        return Grown(tree, run, cache)


class SpS(StaticDraftMethod):
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): a chain of `budget`
    tokens drawn from the draft, verified token by token."""

    name = "sps"
    options = {"draft": None, "budget": 4}

    def template(self) -> StaticTemplate:
        return widths_template((1,) * self.budget)


def binary_parents(budget: int) -> np.ndarray:
    """SpecInfer's default tree: exactly `budget` drafted nodes, binary, filled level by level
    (full levels of 2, 4, 8, ... nodes, then a partial last level). A partial level gives
    every parent its first-ranked child before any parent its second, parents taken in
    breadth-first order (the likelier paths first): parents [N = budget + 1], root -1."""
    parents, level, left = [-1], [0], budget
    while left > 0:
        slots = [(i, r) for r in (0, 1) for i in range(len(level))][:left]
        nxt = []
        for i, _ in sorted(slots):  # breadth-first, each parent's children contiguous in rank order
            nxt.append(len(parents))
            parents.append(level[i])
        level, left = nxt, left - len(slots)
    return np.asarray(parents, np.int32)


class SpecInfer(StaticDraftMethod):
    """SpecInfer (Miao et al. 2024): a static k-ary token tree, `widths=[w1, w2, ...]` children
    per node at each depth, drawn from the draft without replacement (greedy: its top-k).
    Without `widths`: a binary tree of exactly `budget` nodes (`binary_parents`)."""

    name = "specinfer"
    options = {"draft": None, "budget": 16, "widths": None}

    def __init__(self, **opts: Any):
        super().__init__(**opts)
        w = self.opts["widths"]
        self.widths = None
        if w is not None:
            if isinstance(w, (str, bytes)) or not hasattr(w, "__len__") or not w or not all(
                    isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 1 for x in w):
                raise InvalidArgumentError(f"widths must be a non-empty list of integers >= 1, got {w!r}")
            self.widths = tuple(int(x) for x in w)
            nodes, level = 0, 1  # counted before any template is built: [100, 100, 100] would be 1e6 nodes
            for width in self.widths:
                level *= width
                nodes += level
                if nodes > self.MAX_BUDGET:
                    break
            if nodes > self.MAX_BUDGET:
                raise InvalidArgumentError(f"widths {list(self.widths)} make more than {self.MAX_BUDGET} nodes, the "
                                           f"most allowed")
            if "budget" in opts and nodes != self.budget:
                raise InvalidArgumentError(f"widths {list(self.widths)} make {nodes} nodes but budget is {self.budget}; "
                                           f"give one or the other")
            self.budget = nodes

    def template(self) -> StaticTemplate:
        return widths_template(self.widths) if self.widths is not None else make_template(binary_parents(self.budget))


class Sequoia(StaticDraftMethod):
    """Sequoia (Chen et al. 2024): the static tree that maximises the expected accepted tokens
    for `budget` nodes and depth <= `max_depth`, from the draft's positional acceptance vector
    (`acceptance=`: a list of probabilities or a JSON file with an "acceptance" list, as
    `python -m jaxaccel.bench acceptance` writes; default: measured with the draft on
    calibration prompts at the call's sampling settings, once, and cached — see
    `decode.acceptance`). The tree comes from `decode.sequoia.optimal_tree`."""

    name = "sequoia"
    options = {"draft": None, "budget": 16, "max_depth": 8, "acceptance": None}

    def __init__(self, **opts: Any):
        super().__init__(**opts)
        self.max_depth = positive_int("max_depth", self.opts["max_depth"], 64)
        self.acceptance = None
        if self.opts["acceptance"] is not None:
            self.acceptance = self._read_acceptance(self.opts["acceptance"])

    @staticmethod
    def _read_acceptance(value: Any) -> np.ndarray:
        import json
        from pathlib import Path

        if isinstance(value, (str, Path)):
            try:
                value = json.loads(Path(value).read_bytes())["acceptance"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise InvalidArgumentError(f"acceptance: cannot read an acceptance vector from {str(value)!r} "
                                           f"({type(e).__name__})") from None
        try:
            vec = np.asarray(value, np.float64)
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"acceptance must be a list of probabilities, got {value!r}") from None
        if vec.ndim != 1 or len(vec) == 0 or not np.all(np.isfinite(vec)) or np.any(vec < 0) or vec.sum() > 1 + 1e-6:
            raise InvalidArgumentError("acceptance must be a non-empty list of probabilities summing to at most 1")
        return vec

    def prepare(self, target, draft, temperature, top_k, top_p, batch: int = 1) -> None:
        if self.acceptance is None:
            from jaxaccel.decode.acceptance import cached_acceptance

            self.acceptance = cached_acceptance(target, draft, temperature=temperature, top_k=top_k, top_p=top_p)
        self.opts["acceptance"] = list(_key_rounded(self.acceptance))  # the tree planned from it keys the step

    def key(self) -> tuple:
        """The tree, not the acceptance vector it was planned from: vectors (sampling settings,
        measurements) that plan the same tree share a compiled program."""
        name, opts = super().key()
        return name, tuple(kv for kv in opts if kv[0] != "acceptance"), tuple(self.template().parents.tolist())

    def template(self) -> StaticTemplate:
        if self.acceptance is None:
            raise InvalidArgumentError("sequoia: no acceptance vector (prepare() was not run)")
        return _sequoia_template(_key_rounded(self.acceptance), self.budget, self.max_depth)

    def cache_headroom(self) -> int:
        return self.budget + 1

    def position_headroom(self) -> int:  # the tree is planned in `prepare`; its depth is bounded before
        return min(self.max_depth, self.budget)

    def tree_nodes(self) -> int:
        return self.budget + 1



@functools.lru_cache(maxsize=32)
def _sequoia_template(acceptance: tuple[float, ...], budget: int, max_depth: int) -> StaticTemplate:
    from jaxaccel.decode.sequoia import optimal_tree, padded_acceptance

    vec = np.asarray(acceptance)
    if vec.sum() <= 0:
        vec = np.full(len(vec), 1e-6)
    tree = optimal_tree(padded_acceptance(vec, budget, max_depth), budget, max_depth)
    return make_template(tree.parents)


def _key_rounded(acceptance) -> tuple[float, ...]:
    """The acceptance vector rounded down to 6 decimals, a compile key that the DP accepts:
    rounding to nearest could lift a vector summing to exactly 1 (1/6 six times) past its
    check."""
    return tuple(math.floor(float(a) * 1e6) / 1e6 for a in acceptance)
