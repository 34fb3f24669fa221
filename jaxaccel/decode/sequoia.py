"""Sequoia (Chen et al., 2024, arXiv 2402.12374): the best static token tree for a node budget.

Input is a positional acceptance vector p = [p_1, ..., p_K]: p_k is the probability that the
k-th child drafted under a node (children drawn from the draft without replacement, tried in
order) is the first one the verifier accepts, so sum p_k <= 1. A node reached from the root
through child ranks (k_1, ..., k_d) is then accepted with probability p_{k_1} ... p_{k_d}, and
the expected number of tokens one verification yields is the sum of that product over all
nodes, the root counting 1 (it stands for the bonus token). Children past rank K never occur.

The tree maximising it among trees of exactly m nodes (root included), depth <= l and fan-out
<= K comes from a dynamic programme over (m, l, b), b = the root's number of children, which
occupy ranks 1..b:

    T(1, l, 0) = 1,   T(m > 1, l, 0) = -inf
    T(m, l, b) = max_s  T(m - s, l, b - 1) + p_b V(s, l - 1)     (s = size of child b's subtree)
    V(m, l)    = max_b  T(m, l, b),    V(1, 0) = 1,   V(m > 1, 0) = -inf (infeasible)

where s runs over 1..m-b (the root and children 1..b-1 need b nodes; T is -inf below that).
Each (l, b) step is a max-plus convolution over m, done as one [m, s] numpy array; the argmax s
per (l, b, m) and b per (l, m) are kept to rebuild the tree top-down. Cost O(L K M^2): budget
128, depth 16, K 16 runs in a few tens of ms. Because p >= 0, V is nondecreasing in m while a
tree of m nodes fits (a K-ary tree of depth L has sum_{d<=L} K^d nodes), so `tree_value_curve`
(V(n + 1, L) for every budget n, a free by-product of the table) is what a cost model trades
against the verifier's per-node cost to pick a budget.

Trees are returned as (parents, depth) arrays in breadth-first order with the children of a
node contiguous and in rank order — the layout `jaxaccel.decode.tree` templates use, where a
node's rank is its order among its siblings.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from jaxaccel.errors import InvalidArgumentError


class SequoiaTree(NamedTuple):
    """An optimal static tree: node 0 is the root; parents precede their children."""

    parents: np.ndarray  # [budget + 1] int32; -1 for the root
    depth: np.ndarray  # [budget + 1] int32; 0 for the root
    expected: float  # expected tokens per verification step (root/bonus token included)


class _Table(NamedTuple):
    value: np.ndarray  # [L + 1, M + 1] float64: V(m, l); -inf where no tree fits; m = 0 unused
    best_b: np.ndarray  # [L + 1, M + 1] int: argmax_b of T(m, l, b)
    child_size: np.ndarray  # [L + 1, K + 1, M + 1] int: argmax_s of T(m, l, b)


# ----------------------------------------------------------------------------- validation


def _acceptance(acceptance: Any) -> np.ndarray:
    try:
        p = np.asarray(acceptance, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"acceptance must be a 1-D array of probabilities, got {acceptance!r}") from None
    if p.ndim != 1 or p.size == 0:
        raise InvalidArgumentError(f"acceptance must be a non-empty 1-D array, got shape {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise InvalidArgumentError(f"acceptance entries must be finite and nonnegative, got {p.tolist()}")
    if p.sum() > 1 + 1e-6:
        raise InvalidArgumentError(f"acceptance must sum to at most 1 (first-accepted-rank probabilities), "
                                   f"got sum {p.sum():.6g}")
    return p


def _int(value: Any, name: str, low: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
        raise InvalidArgumentError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_fits(budget: int, max_depth: int, fan_out: int) -> None:
    capacity, level = 1, 1  # nodes of a full fan_out-ary tree of depth max_depth, capped past budget
    for _ in range(max_depth):
        level *= fan_out
        capacity += level
        if capacity > budget:
            return
    if capacity <= budget:
        raise InvalidArgumentError(f"budget {budget} does not fit a tree of depth <= {max_depth} and fan-out "
                                   f"<= {fan_out} (at most {capacity - 1} nodes besides the root)")


# ----------------------------------------------------------------------------- dynamic programme


def _solve(p: np.ndarray, nodes: int, max_depth: int) -> _Table:
    """V(m, l) for m = 1..nodes, l = 0..max_depth, with the argmax tables."""
    k = min(len(p), nodes - 1)  # a root of m nodes has < m children
    depth = min(max_depth, nodes - 1)  # and its tree has depth < m
    m_idx = np.arange(nodes + 1)
    rest = m_idx[:, None] - m_idx[None, :]  # [m, s]: nodes left for the root and children 1..b-1
    ok = (m_idx[None, :] >= 1) & (rest >= 1)
    rest = np.where(ok, rest, 0)
    value = np.full((depth + 1, nodes + 1), -np.inf)
    value[0, 1] = 1.0
    best_b = np.zeros((depth + 1, nodes + 1), np.int64)
    child_size = np.zeros((depth + 1, k + 1, nodes + 1), np.int64)
    for level in range(1, depth + 1):
        sub = value[level - 1]  # V(s, l - 1)
        feasible = np.isfinite(sub)
        t = np.full(nodes + 1, -np.inf)  # T(m, l, 0)
        t[1] = 1.0
        best = t.copy()
        for b in range(1, k + 1):
            gain = np.where(feasible, p[b - 1] * np.where(feasible, sub, 0.0), -np.inf)  # p_b V(s, l-1)
            cand = np.where(ok, t[rest] + gain[None, :], -np.inf)  # [m, s]
            s = np.argmax(cand, axis=1)
            t = cand[m_idx, s]
            child_size[level, b] = s
            better = t > best  # ties keep fewer children
            best_b[level] = np.where(better, b, best_b[level])
            best = np.where(better, t, best)
        value[level] = best
    if depth < max_depth:  # deeper limits change nothing: pad so value[max_depth] exists
        pad = max_depth - depth
        value = np.concatenate([value, np.repeat(value[-1:], pad, 0)])
        best_b = np.concatenate([best_b, np.repeat(best_b[-1:], pad, 0)])
        child_size = np.concatenate([child_size, np.repeat(child_size[-1:], pad, 0)])
    return _Table(value, best_b, child_size)


def _children_lists(table: _Table, nodes: int, max_depth: int) -> list[list[int]]:
    """Rebuild the optimal tree of `nodes` nodes: children[i] = node ids (creation order) in rank order."""
    children: list[list[int]] = []

    def build(m: int, level: int) -> int:
        node = len(children)
        children.append([])
        b = int(table.best_b[level, m])
        sizes = []
        for rank in range(b, 0, -1):  # peel the last child off, as in the recurrence
            s = int(table.child_size[level, rank, m])
            sizes.append(s)
            m -= s
        children[node] = [build(s, level - 1) for s in reversed(sizes)]
        return node

    build(nodes, max_depth)
    return children


def _breadth_first(children: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    n = len(children)
    parents = np.full(n, -1, np.int32)
    depth = np.zeros(n, np.int32)
    order, new_id = [0], {0: 0}
    for old in order:  # grows while iterated: a FIFO queue
        for child in children[old]:
            new_id[child] = len(order)
            parents[len(order)] = new_id[old]
            depth[len(order)] = depth[new_id[old]] + 1
            order.append(child)
    return parents, depth


# ----------------------------------------------------------------------------- public API


def padded_acceptance(acceptance, budget: int, max_depth: int) -> np.ndarray:
    """The vector with ranks past the measured ones at a tiny probability (1e-9), as many as
    a tree of `budget` drafted nodes and depth <= `max_depth` needs to fit."""
    vec = np.asarray(acceptance, np.float64)
    fan_out = len(vec)
    while sum(fan_out ** d for d in range(max_depth + 1)) < budget + 1:
        fan_out += 1
    return np.concatenate([vec, np.full(fan_out - len(vec), 1e-9)])


def optimal_tree(acceptance: Any, budget: int, max_depth: int) -> SequoiaTree:
    """The tree of `budget` drafted nodes (plus the root), depth <= max_depth and fan-out <=
    len(acceptance), maximising the expected tokens per step. Breadth-first order, siblings
    contiguous and in rank order. Raises InvalidArgumentError (a ValueError) on bad input or
    if `budget` nodes cannot be placed within the depth and fan-out limits."""
    p = _acceptance(acceptance)
    budget = _int(budget, "budget", 0)
    max_depth = _int(max_depth, "max_depth", 1)
    _check_fits(budget, max_depth, len(p))
    table = _solve(p, budget + 1, max_depth)
    parents, depth = _breadth_first(_children_lists(table, budget + 1, max_depth))
    return SequoiaTree(parents, depth, float(table.value[max_depth, budget + 1]))


def tree_value_curve(acceptance: Any, max_budget: int, max_depth: int) -> np.ndarray:
    """[max_budget + 1] float64: entry n = expected tokens per step of the best tree with n drafted
    nodes (`optimal_tree(acceptance, n, max_depth).expected`); nondecreasing in n."""
    p = _acceptance(acceptance)
    max_budget = _int(max_budget, "max_budget", 0)
    max_depth = _int(max_depth, "max_depth", 1)
    _check_fits(max_budget, max_depth, len(p))
    return _solve(p, max_budget + 1, max_depth).value[max_depth, 1:].copy()


def expected_tokens(acceptance: Any, parents: Any) -> float:
    """Expected tokens per step of any tree: sum over nodes of the product of p_rank along the
    root-to-node path (root = 1). `parents[0]` = -1 and every other parent precedes its child;
    a node's rank is its order among its siblings (first = rank 1). A node of rank > len(acceptance)
    raises: pad the vector with zeros to score such trees."""
    p = _acceptance(acceptance)
    par = np.asarray(parents)
    if par.ndim != 1 or par.size == 0 or not np.issubdtype(par.dtype, np.integer) or par[0] != -1:
        raise InvalidArgumentError(f"parents must be a non-empty 1-D int array with parents[0] = -1, got {parents!r}")
    n = len(par)
    if np.any((par[1:] < 0) | (par[1:] >= np.arange(1, n))):
        raise InvalidArgumentError("every node but the root must have a parent with a smaller index")
    prob = np.zeros(n)
    prob[0] = 1.0
    n_children = np.zeros(n, np.int64)
    for i in range(1, n):
        parent = par[i]
        rank = n_children[parent]
        if rank >= len(p):
            raise InvalidArgumentError(f"node {parent} has more than {len(p)} children (the acceptance vector's length)")
        n_children[parent] += 1
        prob[i] = prob[parent] * p[rank]
    return float(prob.sum())
