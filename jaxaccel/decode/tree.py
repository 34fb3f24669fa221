"""Tree speculative decoding: a padded static-shape token tree, verified by one target forward.

A drafter proposes, per row, a tree of at most N nodes (`Tree`): node 0 is the root (the
newest accepted token, `state.last_token`, not yet in the cache); every other node is a
drafted token whose parent has a smaller index. The target model scores all N nodes in one
call of the model's forward: RoPE position = prefix length + depth, cache slot = prefix
length + node index, key visibility = the committed prefix plus the node's ancestors (the
[N, N] ancestor mask built here on device). The verifier then picks the accepted path:

* greedy — the deepest node whose every drafted token equals the target's argmax at its
  parent; the bonus token is the argmax at that node. The output is exactly plain greedy's.
* sampling — multi-candidate speculative sampling, node by node from the root: the children
  of the current node are tried in order; child x is accepted with probability
  min(1, p(x)/q(x)) and on rejection p becomes norm(max(p - q, 0)) and q loses x
  (drafts sampled without replacement, e.g. DySpec). For deterministic drafts (no `draft_q`:
  q is one-hot, e.g. Token Recycling, prompt lookup) this is: accept x with probability p(x),
  else zero p(x) and renormalise — a duplicate sibling then has p(x) = 0 and is skipped. If
  every child is rejected, the bonus token is drawn from what is left of p. Each emitted token
  is therefore distributed exactly as plain sampling's (temperature, top-k, top-p included:
  p is `sampling.target_probs`).

The accepted path's K/V are then moved to contiguous slots (prefix length + depth) and
`engine.commit` appends the path's tokens plus the bonus; slots past the new prefix length
are invisible to later steps, so rejected nodes need no cleanup.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.decode.autoregressive import next_token
from jaxaccel.decode.engine import DecodeMethod, DecodeState, StepContext, commit, split_row_keys
from jaxaccel.decode.sampling import SamplingMode, SamplingParams, target_probs
from jaxaccel.errors import InvalidArgumentError
from jaxaccel.sharding import batch_ways
from jaxaccel.model.transformer import LayerKV

MAX_TREE_NODES = 512  # drafted nodes per step, any tree method (its tables are [nodes, nodes] and more)


class Tree(NamedTuple):
    """A padded token tree per row; N (node budget) is static."""

    tokens: jax.Array  # [batch, N] int32; node 0 = root
    parents: jax.Array  # [batch, N] int32; -1 for the root (and for padding)
    depth: jax.Array  # [batch, N] int32; 0 for the root
    valid: jax.Array  # [batch, N] bool; padded nodes are False
    draft_q: jax.Array | None = None  # [batch, N, vocab]: distribution node i's children were drawn from
    mask: jax.Array | None = None  # [batch, N, N] ancestor-or-self mask, when the drafter already has it


class Verdict(NamedTuple):
    """What `TreeMethod.verify` returns."""

    state: Any  # DecodeState: cache compacted, PRNG advanced (not yet committed)
    tokens: jax.Array  # [b, D + 1]: the accepted path's drafted tokens, then the bonus
    count: jax.Array  # [b]: how many of `tokens` to commit (depth of the accepted node + 1)
    observed: jax.Array  # [b, N]: nodes whose logits the drafter may learn from
    logits: jax.Array  # [b, N, vocab]: the target's logits at the nodes
    hit: jax.Array  # [b]: a drafted token was accepted
    path: jax.Array  # [b, D + 1]: the accepted root-to-node path (node indices, -1 padded)


class TreeShape(NamedTuple):
    """Static bounds of a drafter's trees (shape the compiled verifier)."""

    nodes: int  # N, root included
    max_depth: int  # D: deepest node's depth
    max_children: int  # C: most children of any node


# ----------------------------------------------------------------------------- structure


def _gather(a: jax.Array, idx: jax.Array) -> jax.Array:
    """a [b, N], idx [b, M] (-1 allowed) -> a[b, idx] with -1 where idx < 0."""
    out = jnp.take_along_axis(a, jnp.maximum(idx, 0), axis=1)
    return jnp.where(idx >= 0, out, -1)


def ancestor_chain(parents: jax.Array, max_depth: int) -> jax.Array:
    """[b, N, D + 1]: chain[..., s] = the node's ancestor s steps up (0: itself), -1 past the root."""
    cur = jnp.broadcast_to(jnp.arange(parents.shape[1], dtype=jnp.int32), parents.shape)
    chain = [cur]
    for _ in range(max_depth):
        cur = _gather(parents, cur)
        chain.append(cur)
    return jnp.stack(chain, axis=-1)


def ancestor_mask(parents: jax.Array, max_depth: int) -> jax.Array:
    """[b, N, N] bool: mask[b, i, j] = node j is node i or one of its ancestors."""
    n = parents.shape[1]
    chain = ancestor_chain(parents, max_depth)
    return (chain[..., :, None] == jnp.arange(n, dtype=jnp.int32)).any(axis=-2)


def tree_paths(parents: jax.Array, depth: jax.Array, max_depth: int) -> jax.Array:
    """[b, N, D + 1]: the root-to-node path of every node (path[..., d] = its ancestor at depth
    d), padded with -1 past the node's depth. The paths of the leaves are the tree's root-to-leaf paths."""
    chain = ancestor_chain(parents, max_depth)
    d = jnp.arange(max_depth + 1, dtype=jnp.int32)
    steps_up = depth[..., None] - d  # ancestor at depth d is (depth - d) steps up
    path = jnp.take_along_axis(chain, jnp.clip(steps_up, 0, max_depth), axis=-1)
    return jnp.where(steps_up >= 0, path, -1)


def children_table(parents: jax.Array, valid: jax.Array, max_children: int) -> jax.Array:
    """[b, N, C]: the valid children of each node in node order, -1 padded."""
    b, n = parents.shape
    idx = jnp.arange(n)
    sibling_before = (parents[:, :, None] == parents[:, None, :]) & (idx[None, None, :] < idx[None, :, None])
    rank = jnp.sum(sibling_before & valid[:, None, :], axis=-1)  # among valid earlier siblings
    ok = valid & (parents >= 0) & (rank < max_children)
    rows = jnp.arange(b)[:, None]
    target_parent = jnp.where(ok, parents, n)  # out of range: dropped
    table = jnp.full((b, n, max_children), -1, jnp.int32)
    return table.at[rows, target_parent, jnp.where(ok, rank, 0)].set(
        jnp.broadcast_to(idx.astype(jnp.int32), (b, n)), mode="drop")


@functools.lru_cache(maxsize=64)
def static_tables(parents: tuple[int, ...], depth: tuple[int, ...], max_depth: int, max_children: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ancestor mask [1, N, N], paths [1, N, D + 1], children [1, N, C]) of one static tree
    structure, in numpy: the same tables as `ancestor_mask`, `tree_paths` and
    `children_table`, computed once per template on the host (as jnp ops under
    `ensure_compile_time_eval` they were ~50 tiny eager compiles, ~1 s per trace; as one
    jitted call of those functions, a ~0.4 s compile per process that moved recycling's
    first-call compile from 1.56x to 1.70x autoregressive). `test_static_tables_equal_the_
    device_tables` keeps the two implementations in agreement."""
    par = np.asarray(parents, np.int32)
    dep = np.asarray(depth, np.int32)
    n = len(par)
    chain = [np.arange(n, dtype=np.int32)]
    for _ in range(max_depth):
        cur = chain[-1]
        chain.append(np.where(cur >= 0, par[np.maximum(cur, 0)], -1).astype(np.int32))
    chain = np.stack(chain, axis=-1)  # [N, D + 1]: ancestor s steps up
    mask = (chain[:, :, None] == np.arange(n)[None, None, :]).any(axis=1)
    steps_up = dep[:, None] - np.arange(max_depth + 1)[None, :]
    paths = np.where(steps_up >= 0, np.take_along_axis(chain, np.clip(steps_up, 0, max_depth), axis=1), -1)
    children = np.full((n, max_children), -1, np.int32)
    filled = np.zeros(n, np.int64)
    for i in range(n):  # parents precede children: node order is sibling order
        p = par[i]
        if p >= 0 and filled[p] < max_children:
            children[p, filled[p]] = i
            filled[p] += 1
    return mask[None], paths[None].astype(np.int32), children[None]


# ----------------------------------------------------------------------------- verification


def verify_greedy(tree: Tree, logits: jax.Array, max_depth: int, paths: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
    """-> (accepted node [b], bonus token [b]): the deepest node whose path matches the
    target's argmax at every step (the lowest index among equally deep ones). `paths` (from
    `tree_paths`) may be passed when already known."""
    pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [b, N]
    b, n = tree.tokens.shape
    if paths is None:
        paths = tree_paths(tree.parents, tree.depth, max_depth)
    ok = tree.valid & (tree.tokens == _gather(pred, tree.parents))
    ok = ok.at[:, 0].set(True)
    # a node is accepted when it and all its ancestors are: AND over its root-to-node path
    on_path = jnp.take_along_axis(ok[:, :, None], jnp.broadcast_to(jnp.maximum(paths, 0), (b,) + paths.shape[1:]),
                                  axis=1) | (paths < 0)
    accepted = on_path.all(axis=-1)
    score = jnp.where(accepted, tree.depth * (n + 1) + (n - jnp.arange(n)), -1)
    best = jnp.argmax(score, axis=1).astype(jnp.int32)
    bonus = jnp.take_along_axis(pred, best[:, None], axis=1)[:, 0]
    return best, bonus


def _normalise(p: jax.Array) -> jax.Array:
    total = jnp.sum(p)
    return jnp.where(total > 0, p / jnp.where(total > 0, total, 1.0), p)


def verify_sample(tree: Tree, logits: jax.Array, keys: jax.Array, mode: SamplingMode, sampling: SamplingParams,
                  shape: TreeShape, children: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Multi-candidate speculative sampling (see the module docstring) -> (node [b], bonus [b]).
    `children` [b or 1, N, C] (from `children_table`) may be passed when already known;
    padded children in it are skipped."""
    probs = target_probs(logits, mode, sampling)  # [b, N, V]
    if children is None:
        children = children_table(tree.parents, tree.valid, shape.max_children)
    children = jnp.broadcast_to(children, tree.tokens.shape + (shape.max_children,))
    stochastic = tree.draft_q is not None
    draft_q = tree.draft_q if stochastic else jnp.zeros(tree.tokens.shape[:1], jnp.float32)

    n_children = shape.max_children
    vocab = probs.shape[-1]

    def row(tokens, valid, children, probs, draft_q, key):
        uniforms = jax.random.uniform(jax.random.fold_in(key, 0), (shape.max_depth + 1, n_children))

        def level(lvl, carry):
            u, stopped, residual = carry
            p = probs[u]
            accepted = jnp.int32(-1)
            if stochastic:  # residuals are distributions: p <- norm(max(p - q, 0)), q loses x
                q = draft_q[u]
                for c in range(n_children):
                    j = children[u, c]
                    x = tokens[jnp.maximum(j, 0)]
                    active = (j >= 0) & valid[jnp.maximum(j, 0)] & (accepted < 0) & ~stopped
                    take = active & (uniforms[lvl, c] * q[x] < p[x])  # r < p/q without dividing by 0
                    rejected = active & ~take
                    p = jnp.where(rejected, _normalise(jnp.maximum(p - q, 0.0)), p)
                    q = jnp.where(rejected, _normalise(q.at[x].set(0.0)), q)
                    accepted = jnp.where(take, j, accepted)
                ends_here = ~stopped & (accepted < 0)
                residual = jnp.where(ends_here, p, residual)
            else:  # deterministic drafts: the residual is p without the rejected tokens, O(1) per child
                rejected_tokens = jnp.full((n_children,), -1, jnp.int32)
                mass = jnp.float32(1.0)
                for c in range(n_children):
                    j = children[u, c]
                    x = tokens[jnp.maximum(j, 0)]
                    active = (j >= 0) & valid[jnp.maximum(j, 0)] & (accepted < 0) & ~stopped
                    px = jnp.where((rejected_tokens == x).any(), 0.0, p[x])  # a duplicate sibling: p(x) = 0
                    take = active & (uniforms[lvl, c] * mass < px)
                    rejected = active & ~take & (px > 0)
                    rejected_tokens = rejected_tokens.at[c].set(jnp.where(rejected, x, -1))
                    mass = jnp.where(rejected, mass - px, mass)
                    accepted = jnp.where(take, j, accepted)
                ends_here = ~stopped & (accepted < 0)
                residual = (jnp.where(ends_here, u, residual[0]), jnp.where(ends_here, rejected_tokens, residual[1]))
            u = jnp.where(~stopped & (accepted >= 0), accepted, u)
            return u, stopped | ends_here, residual

        if stochastic:
            init = jnp.zeros((vocab,), jnp.float32)
        else:
            init = (jnp.int32(0), jnp.full((n_children,), -1, jnp.int32))
        u, _, residual = jax.lax.fori_loop(0, shape.max_depth + 1, level, (jnp.int32(0), jnp.bool_(False), init))
        if stochastic:
            final = residual
        else:
            stop_node, rejected_tokens = residual
            hit = (jnp.arange(vocab, dtype=jnp.int32)[:, None] == rejected_tokens[None, :]).any(-1)
            final = jnp.where(hit, 0.0, probs[stop_node])
        bonus = jax.random.categorical(jax.random.fold_in(key, 1), jnp.log(final)).astype(jnp.int32)
        return u, bonus

    return jax.vmap(row)(tree.tokens, tree.valid, children, probs, draft_q, keys)


# ----------------------------------------------------------------------------- cache and commit


def move_kv(cache: tuple, cache_len: jax.Array, path: jax.Array) -> tuple:
    """Move the accepted path's K/V (node path[:, d] at slot cache_len + path[:, d]) to the
    contiguous slots cache_len + d. path [b, D + 1] (-1 padded; path[:, 0] is the root, already
    in place). Sources are never below destinations, so gathering first is safe."""
    b, steps = path.shape
    d = jnp.arange(1, steps, dtype=jnp.int32)
    src_node = path[:, 1:]
    moves = (src_node >= 0) & (src_node != d[None, :])
    src = cache_len[:, None] + jnp.maximum(src_node, 0)
    dst = jnp.where(moves, cache_len[:, None] + d[None, :], -1)
    rows = jnp.arange(b)[:, None]
    out = []
    for layer in cache:
        moved = []
        for a in (layer.k, layer.v):
            gathered = a[rows, :, src]  # [b, D, kv_heads, head_dim]
            slots = jnp.where(dst < 0, a.shape[2], dst)
            moved.append(a.at[rows, :, slots].set(gathered, mode="drop"))
        out.append(LayerKV(*moved))
    return tuple(out)


def accepted_tokens(tree: Tree, path: jax.Array, node: jax.Array, bonus: jax.Array) -> tuple[jax.Array, jax.Array]:
    """-> (tokens [b, D + 1]: the path's drafted tokens then the bonus, count [b] = depth + 1)."""
    depth = jnp.take_along_axis(tree.depth, node[:, None], axis=1)[:, 0]
    drafted = _gather(tree.tokens, path[:, 1:])  # [b, D]
    steps = path.shape[1]
    idx = jnp.arange(steps)
    padded = jnp.concatenate([drafted, jnp.zeros_like(drafted[:, :1])], axis=1)
    tokens = jnp.where(idx[None, :] == depth[:, None], bonus[:, None], jnp.maximum(padded, 0))
    return tokens.astype(jnp.int32), (depth + 1).astype(jnp.int32)


# ----------------------------------------------------------------------------- the method base


def positive_int(name: str, value: Any, upper: int | None = None) -> int:
    """Validate an integer method option >= 1 (and <= upper)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidArgumentError(f"{name} must be an integer >= 1, got {value!r}")
    if upper is not None and value > upper:
        raise InvalidArgumentError(f"{name} must be at most {upper}, got {value}")
    return int(value)


def check_k_fits_vocab(k: int, config) -> None:
    if k > config.vocab_size:
        raise InvalidArgumentError(f"k={k} is larger than the vocabulary ({config.vocab_size} tokens)")


class TreeMethod(DecodeMethod):
    """A speculative method: `draft` proposes a `Tree` per row, the shared verifier accepts a
    path, `observe` lets the drafter learn from the verified logits (Token Recycling)."""

    def tree_shape(self) -> TreeShape:
        raise NotImplementedError

    def cache_headroom(self) -> int:
        return self.tree_shape().nodes

    def position_headroom(self) -> int:
        return self.tree_shape().max_depth if self.tree_nodes() else 0

    def tree_nodes(self) -> int:
        return self.tree_shape().nodes

    def draft(self, state: DecodeState, ctx: StepContext) -> Tree:
        raise NotImplementedError

    def observe(self, method_state: Any, tree: Tree, logits: jax.Array, state: DecodeState) -> Any:
        return method_state

    def static_structure(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(parents, depth) when every tree this method drafts has the same shape (only tokens
        and validity vary): masks and paths are then constants of the compiled step."""
        return None

    # Adaptive fallback. When set, the method state is (drafter state, hit rate): an
    # exponential average, over every step, of how often the target's token is among the
    # draft's depth-1 tokens (a tree step: at least one drafted token accepted; a plain step:
    # the sampled or argmax token is one of them). For deterministic drafts that is exactly
    # the acceptance probability at depth 1 (multi-candidate sampling accepts some child
    # with probability p(children)). A step uses the tree when the expected tokens of a tree
    # step, 1 + h + h^2 + ... + h^D, reach this cost (a tree step's time over a plain step's),
    # and otherwise a plain autoregressive step, so decoding is never much slower than
    # autoregressive when drafts stop paying.
    fallback_cost: dict[int, float] | None = None  # batch size -> cost (log-linear in between)
    HIT_DECAY = 0.25

    def init_gain(self) -> jax.Array:
        return jnp.float32(0.3)  # start with plain steps until the drafts prove themselves

    def cost_for_batch(self, batch: int) -> float:
        points = sorted(self.fallback_cost.items())
        x = np.log2(batch)
        xs = np.log2([b for b, _ in points])
        ys = [c for _, c in points]
        if len(points) == 1:
            return ys[0]
        if x >= xs[-1]:  # extrapolate with the last slope
            return float(ys[-1] + (x - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
        return float(np.interp(x, xs, ys))

    def expected_tokens(self, hit: jax.Array) -> jax.Array:
        return sum(hit ** d for d in range(self.tree_shape().max_depth + 1))

    def step(self, state: DecodeState, ctx: StepContext) -> DecodeState:
        if self.fallback_cost is None:
            return self.tree_step(state, ctx)[0]
        inner, hit_rate = state.method_state
        # the cost table is per device: a forward over the rows of the batch each device holds
        rows = state.last_token.shape[0] // batch_ways(dict(ctx.model.defaults).get("mesh"))
        use_tree = self.expected_tokens(hit_rate) >= self.cost_for_batch(rows)
        state = state._replace(method_state=inner)
        # Only the target forwards differ between the two kinds of step: drafting, the
        # drafter's update and the commit run once, outside the cond (one copy each in the
        # compiled loop instead of two — the fallback's compile cost is its second forward).
        tree = self.draft(state, ctx)
        v = jax.lax.cond(use_tree, lambda s: self.verify(s, tree, ctx), lambda s: self.plain_verify(s, tree, ctx),
                         state)
        out = v.state._replace(method_state=self.observe(inner, tree._replace(valid=v.observed), v.logits, v.state))
        out = commit(out, v.tokens, v.count, ctx)
        hit = v.hit
        live = ~state.done
        rate = jnp.sum(jnp.where(live, hit, False)) / jnp.maximum(jnp.sum(live), 1)
        hit_rate = jnp.where(jnp.any(live), (1 - self.HIT_DECAY) * hit_rate + self.HIT_DECAY * rate, hit_rate)
        return out._replace(method_state=(out.method_state, hit_rate.astype(jnp.float32)))

    def plain_verify(self, state: DecodeState, tree: Tree, ctx: StepContext):
        """A plain autoregressive step in `verify`'s output form: one token; the drafter
        observes the root's logits only (the other nodes were not run); hit = the chosen
        token was among the depth-1 drafts."""
        state, root_logits, token = next_token(state, ctx)
        b, n = tree.tokens.shape
        logits = jnp.zeros((b, n, root_logits.shape[-1]), root_logits.dtype).at[:, :1].set(root_logits)
        observed = jnp.zeros((b, n), bool).at[:, 0].set(True)
        tokens = jnp.zeros((b, self.tree_shape().max_depth + 1), jnp.int32).at[:, 0].set(token)
        hit = (tree.valid & (tree.depth == 1) & (tree.tokens == token[:, None])).any(axis=1)
        path = jnp.full((b, self.tree_shape().max_depth + 1), -1, jnp.int32).at[:, 0].set(0)
        return Verdict(state, tokens, jnp.ones_like(token), observed, logits, hit, path)

    def tree_step(self, state: DecodeState, ctx: StepContext) -> tuple[DecodeState, jax.Array]:
        """One draft-verify step -> (state, whether a drafted token was accepted, per row)."""
        tree = self.draft(state, ctx)
        v = self.verify(state, tree, ctx)
        out = v.state._replace(method_state=self.observe(state.method_state, tree, v.logits, v.state))
        return commit(out, v.tokens, v.count, ctx), v.hit

    def verify(self, state: DecodeState, tree: Tree, ctx: StepContext) -> Verdict:
        """Run the target over `tree` and accept a path (`Verdict`)."""
        shape = self.tree_shape()
        n = tree.tokens.shape[1]
        static = self.static_structure()
        if static is not None:  # constants of the compiled step
            mask, paths, children = static_tables(tuple(int(p) for p in static[0]), tuple(int(d) for d in static[1]),
                                                  shape.max_depth, shape.max_children)
        else:
            mask = tree.mask if tree.mask is not None else ancestor_mask(tree.parents, shape.max_depth)
            paths = tree_paths(tree.parents, tree.depth, shape.max_depth)
            children = None
        positions = state.cache_len[:, None] + tree.depth
        slots = jnp.where(tree.valid, state.cache_len[:, None] + jnp.arange(n, dtype=jnp.int32), -1)
        # A valid node sees its ancestors (all valid: a drafter never hangs a valid node under a
        # padded one); a padded node sees itself only (finite, never used).
        mask = (mask & tree.valid[:, None, :]) | jnp.eye(n, dtype=bool)[None]
        logits, cache = ctx.model.forward(tree.tokens, positions, cache=state.cache, write_slots=slots,
                                          prefix_len=state.cache_len, new_mask=mask, attention=ctx.tree_attention)
        if ctx.mode.greedy:
            node, bonus = verify_greedy(tree, logits, shape.max_depth, paths)
            rng = state.rng
        else:
            rng, keys = split_row_keys(state.rng)
            node, bonus = verify_sample(tree, logits, keys, ctx.mode, ctx.sampling, shape, children)
        path = jnp.take_along_axis(jnp.broadcast_to(paths, (tree.tokens.shape[0],) + paths.shape[1:]),
                                   node[:, None, None], axis=1)[:, 0]  # [b, D + 1]
        if not (static is not None and shape.max_children == 1):  # a chain's nodes are already in place
            cache = move_kv(cache, state.cache_len, path)
        tokens, count = accepted_tokens(tree, path, node, bonus)
        return Verdict(state._replace(cache=cache, rng=rng), tokens, count, tree.valid, logits, count > 1, path)


def chain_structure(length: int) -> tuple[np.ndarray, np.ndarray]:
    """(parents, depth) of a chain of `length` drafted tokens under the root."""
    idx = np.arange(length + 1, dtype=np.int32)
    return idx - 1, idx


def chain_tree(root: jax.Array, drafted: jax.Array, n_valid: jax.Array) -> Tree:
    """A chain: root [b], drafted [b, L] tokens of which the first n_valid [b] are real."""
    length = drafted.shape[1]
    tokens = jnp.concatenate([root[:, None], drafted], axis=1).astype(jnp.int32)
    valid = jnp.arange(length + 1)[None, :] <= n_valid[:, None]
    return static_tree(root, tokens, valid, *chain_structure(length))


def static_tree(root: jax.Array, tokens: jax.Array, valid: jax.Array, parents: np.ndarray, depth: np.ndarray) -> Tree:
    """A tree with a static template structure: tokens/valid [b, N] (node 0 = root)."""
    b = root.shape[0]
    tokens = tokens.at[:, 0].set(root)
    return Tree(tokens=jnp.where(valid, tokens, 0).astype(jnp.int32),
                parents=jnp.broadcast_to(jnp.asarray(parents, jnp.int32), (b, len(parents))),
                depth=jnp.broadcast_to(jnp.asarray(depth, jnp.int32), (b, len(depth))), valid=valid)
