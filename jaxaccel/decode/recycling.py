"""Token Recycling (Luo et al., 2024): draft trees from recycled candidate tokens.

An adjacency matrix M [vocab, k] holds, for every token, the top-k tokens the target model
most recently predicted after it. After every verification, each tree node's top-k (from the
verification logits, accepted node or not) overwrites its token's row. The next draft tree is
read off M with a static breadth-first template: a template node is (parent, rank), and its
token is M[token of parent, rank] — gathered level by level on device, so drafting costs a
few gathers and no model call. M lives in the decode state (one per row, so rows of a batch
learn independently) and can be carried from one `generate` call to the next (`hot_start`).

Templates: `"paper"` has the paper's shape — 80 nodes + root over 6 levels of widths
8, 21, 25, 15, 8, 3; explicit per-level widths (e.g. `[4, 4, 2]`) build a template of that
shape; `"auto"` picks the template measured fastest for the backend (`jaxaccel.decode.tuning`).
A template of widths w is built best-first: each level takes the w (parent, rank) pairs of
highest prior path probability, with a candidate of rank r accepted with prior
probability ~ 0.6 / (r + 1)^1.5 — deep along top-ranked candidates, bushy near the root.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.decode import tuning
from jaxaccel.decode.engine import DecodeState, StepContext
from jaxaccel.decode.tuning import PAPER_WIDTHS
from jaxaccel.decode.tree import (MAX_TREE_NODES, Tree, TreeMethod, TreeShape, check_k_fits_vocab, positive_int,
                                  static_tree)
from jaxaccel.errors import InvalidArgumentError


def _rank_prior(rank: int) -> float:
    return 0.6 / (rank + 1) ** 1.5


@functools.lru_cache(maxsize=64)
def build_template(widths: tuple[int, ...], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-level widths -> (parents, ranks, depth) numpy arrays over N = 1 + sum(widths) nodes,
    node 0 the root, nodes in breadth-first order (a parent precedes its children)."""
    parents, ranks, depth, score = [-1], [-1], [0], [1.0]
    level = [0]
    for d, width in enumerate(widths, start=1):
        # A parent's rank r scores below its ranks < r, so only r < width can be chosen (and a
        # huge k costs nothing before `check` compares it with the vocabulary).
        candidates = [(score[p] * _rank_prior(r), p, r) for p in level for r in range(min(k, width))]
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
        chosen = sorted(candidates[:width], key=lambda c: (c[1], c[2]))
        level = []
        for s, p, r in chosen:
            level.append(len(parents))
            parents.append(p)
            ranks.append(r)
            depth.append(d)
            score.append(s)
    return np.asarray(parents, np.int32), np.asarray(ranks, np.int32), np.asarray(depth, np.int32)


def template_widths(template: Any, k: int) -> tuple[int, ...]:
    """Validate a `template` option -> per-level widths."""
    if isinstance(template, str):
        if template == "paper":
            widths = PAPER_WIDTHS
        elif template == "auto":
            widths, prev = [], 1
            for w in tuning.recycling_widths():  # fit the table's template to k
                prev = min(w, prev * k)
                widths.append(prev)
            widths = tuple(widths)
        else:
            raise InvalidArgumentError(f'template must be "auto", "paper" or a list of per-level widths, got {template!r}')
    elif isinstance(template, Sequence) and template and all(
            isinstance(w, (int, np.integer)) and not isinstance(w, bool) for w in template):
        widths = tuple(int(w) for w in template)
    else:
        raise InvalidArgumentError(f'template must be "auto", "paper" or a list of per-level widths, got {template!r}')
    if sum(widths) > MAX_TREE_NODES:  # the step's tables are [nodes, nodes] and more
        raise InvalidArgumentError(f"template has {sum(widths)} nodes; at most {MAX_TREE_NODES} are allowed")
    prev = 1
    for i, w in enumerate(widths):
        if w < 1 or w > prev * k:
            raise InvalidArgumentError(f"template level {i + 1} has width {w}; it must be between 1 and "
                                       f"{prev * k} (previous level's width {prev} x k={k})")
        prev = w
    return widths


class Recycling(TreeMethod):
    name = "recycling"
    options = {"template": "auto", "k": 8, "hot_start": False}

    def __init__(self, **opts: Any):
        super().__init__(**opts)
        self.k = positive_int("k", self.opts["k"])
        if not isinstance(self.opts["hot_start"], bool):
            raise InvalidArgumentError(f"hot_start must be true or false, got {self.opts['hot_start']!r}")
        self.widths = template_widths(self.opts["template"], self.k)
        if self.opts["template"] == "auto":
            self.fallback_cost = tuning.recycling_cost()
        self.parents, self.ranks, self.depth = build_template(self.widths, self.k)
        counts = np.bincount(self.parents[1:], minlength=len(self.parents))
        self._shape = TreeShape(nodes=len(self.parents), max_depth=len(self.widths), max_children=int(counts.max()))

    def key(self) -> tuple:
        return (self.name, self.widths, self.k, tuple(sorted((self.fallback_cost or {}).items())))

    def check(self, config) -> None:
        check_k_fits_vocab(self.k, config)

    def tree_shape(self) -> TreeShape:
        return self._shape

    def static_structure(self):
        return self.parents, self.depth

    takes_input = True  # the adjacency matrix to start from

    @property
    def carries_memory(self) -> bool:
        return self.opts["hot_start"]

    def init_state(self, ctx: StepContext, batch: int, method_input: Any, prompt_tokens=None, prompt_lens=None):
        vocab = ctx.config.vocab_size
        if method_input is None:
            matrix = jnp.full((batch, vocab, self.k), -1, jnp.int32)
        else:
            matrix = jnp.asarray(method_input, jnp.int32)
            if matrix.shape[-2:] != (vocab, self.k) or matrix.ndim not in (2, 3):
                raise InvalidArgumentError(f"the recycling matrix must be [{vocab}, {self.k}] (vocab, k) or "
                                           f"[batch, {vocab}, {self.k}], got {list(matrix.shape)}")
            if matrix.ndim == 2:
                matrix = jnp.broadcast_to(matrix, (batch,) + matrix.shape)
            elif matrix.shape[0] != batch:
                raise InvalidArgumentError(
                    f"the recycling matrix has {matrix.shape[0]} rows but this call decodes a batch of {batch} "
                    f"(prompts rounded up to a power of two); pass one row's [{vocab}, {self.k}] matrix to share it")
        return matrix if self.fallback_cost is None else (matrix, self.init_gain())

    def final_state(self, method_state: Any) -> Any:
        return method_state if self.fallback_cost is None else method_state[0]

    def draft(self, state: DecodeState, ctx: StepContext) -> Tree:
        matrix = state.method_state  # [b, V, k]
        b = matrix.shape[0]
        n = len(self.parents)
        rows = jnp.arange(b)
        tokens = jnp.zeros((b, n), jnp.int32).at[:, 0].set(state.last_token)
        valid = jnp.zeros((b, n), bool).at[:, 0].set(True)
        start = 1
        for width in self.widths:  # level by level: each level gathers from the one above
            nodes = np.arange(start, start + width)
            parent = self.parents[nodes]
            cand = matrix[rows[:, None], tokens[:, parent], self.ranks[nodes][None, :]]  # [b, width]
            ok = valid[:, parent] & (cand >= 0)
            tokens = tokens.at[:, nodes].set(jnp.maximum(cand, 0))
            valid = valid.at[:, nodes].set(ok)
            start += width
        return static_tree(state.last_token, tokens, valid, self.parents, self.depth)

    def observe(self, method_state: Any, tree: Tree, logits: jax.Array, state: DecodeState) -> Any:
        """Every valid node's top-k successors overwrite its token's row (finished rows keep theirs)."""
        matrix = method_state
        b, n = tree.tokens.shape
        top = jax.lax.top_k(logits, self.k)[1].astype(jnp.int32)  # [b, N, k]
        # Among nodes with the same token the last one writes (an explicit rule, so the
        # scatter has no duplicate indices and the result does not depend on the backend).
        idx = jnp.arange(n)
        later_same = ((tree.tokens[:, :, None] == tree.tokens[:, None, :]) & tree.valid[:, None, :]
                      & (idx[None, None, :] > idx[None, :, None])).any(-1)
        live = tree.valid & ~state.done[:, None] & ~later_same
        row_idx = jnp.where(live, tree.tokens, matrix.shape[1])  # out of range: dropped
        return matrix.at[jnp.arange(b)[:, None], row_idx].set(top, mode="drop")
