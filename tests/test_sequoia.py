"""Sequoia tree DP: optimum against brute force, tree layout, closed forms, the value curve, input checks."""
import functools

import numpy as np
import pytest

from jaxaccel.decode.sequoia import expected_tokens, optimal_tree, tree_value_curve


@functools.lru_cache(maxsize=None)
def plane_trees(m, depth, fan_out):
    """All ordered trees of m nodes, depth <= depth, fan-out <= fan_out; a tree = tuple of child subtrees."""
    if m == 1:
        return ((),)
    if depth == 0:
        return ()

    def forests(nodes, slots):  # ordered sequences of <= slots subtrees with `nodes` nodes in all
        if nodes == 0:
            return [()]
        out = []
        if slots == 0:
            return out
        for s in range(1, nodes + 1):
            for first in plane_trees(s, depth - 1, fan_out):
                out.extend((first,) + rest for rest in forests(nodes - s, slots - 1))
        return out

    return tuple(forests(m - 1, fan_out))


def tree_value(p, tree):
    return 1.0 + sum(p[k] * tree_value(p, child) for k, child in enumerate(tree))


def to_parents(tree):
    """Nested tree -> breadth-first parents array."""
    parents, queue = [-1], [(tree, 0)]
    for node, idx in queue:
        for child in node:
            parents.append(idx)
            queue.append((child, len(parents) - 1))
    return np.array(parents, np.int32)


def random_acceptance(rng, k):
    p = rng.dirichlet(np.ones(k + 1))[:k]  # leftover mass: no child accepted
    return p if rng.random() < 0.5 else np.sort(p)[::-1]  # sometimes non-monotone in rank


REALISTIC = 0.9 * (lambda w: w / w.sum())(1.0 / np.arange(1, 17) ** 1.6)


def check_layout(tree, budget):
    par, dep = tree.parents, tree.depth
    assert par.shape == dep.shape == (budget + 1,) and par.dtype == dep.dtype == np.int32
    assert par[0] == -1 and dep[0] == 0
    idx = np.arange(1, budget + 1)
    assert np.all((par[1:] >= 0) & (par[1:] < idx))
    assert np.all(dep[1:] == dep[par[1:]] + 1)
    assert np.all(np.diff(dep) >= 0)  # breadth-first
    assert np.all(np.diff(par[1:]) >= 0)  # children of one node contiguous, parents in order


@pytest.mark.parametrize("fan_out", [1, 2, 3])
@pytest.mark.parametrize("max_depth", [1, 2, 3])
def test_optimum_matches_brute_force(fan_out, max_depth):
    rng = np.random.default_rng(10 * fan_out + max_depth)
    for _ in range(4):
        p = random_acceptance(rng, fan_out)
        for nodes in range(1, 8):
            trees = plane_trees(nodes, max_depth, fan_out)
            if not trees:
                with pytest.raises(ValueError):
                    optimal_tree(p, nodes - 1, max_depth)
                continue
            best = max(tree_value(p, t) for t in trees)
            tree = optimal_tree(p, nodes - 1, max_depth)
            assert tree.expected == pytest.approx(best, rel=1e-12)
            assert expected_tokens(p, tree.parents) == pytest.approx(tree.expected, rel=1e-12)
            assert tree.depth.max() <= max_depth
            assert np.bincount(tree.parents[1:], minlength=1).max(initial=0) <= fan_out
            check_layout(tree, nodes - 1)


def test_expected_tokens_matches_recursive_value():
    rng = np.random.default_rng(0)
    p = random_acceptance(rng, 3)
    for tree in plane_trees(6, 3, 3):
        assert expected_tokens(p, to_parents(tree)) == pytest.approx(tree_value(p, tree), rel=1e-12)


@pytest.mark.parametrize("budget", [0, 1, 5, 40, 128])
def test_realistic_tree_layout_and_value(budget):
    tree = optimal_tree(REALISTIC, budget, 16)
    check_layout(tree, budget)
    assert expected_tokens(REALISTIC, tree.parents) == pytest.approx(tree.expected, rel=1e-12)
    if budget:  # the rank-1 chain is always worth at least as much as its first node
        assert tree.expected >= 1 + REALISTIC[0]


@pytest.mark.parametrize("a", [0.0, 0.3, 0.8, 1.0])
def test_single_rank_gives_chain(a):
    n = 6
    tree = optimal_tree([a], n, n)
    np.testing.assert_array_equal(tree.parents, np.arange(-1, n))
    np.testing.assert_array_equal(tree.depth, np.arange(n + 1))
    assert tree.expected == pytest.approx(sum(a ** d for d in range(n + 1)))
    with pytest.raises(ValueError):
        optimal_tree([a], n, n - 1)


def test_depth_one_gives_star_of_top_ranks():
    p = np.array([0.4, 0.25, 0.1, 0.05, 0.02])
    for n in range(len(p) + 1):
        tree = optimal_tree(p, n, 1)
        np.testing.assert_array_equal(tree.parents, [-1] + [0] * n)
        np.testing.assert_array_equal(tree.depth, [0] + [1] * n)
        assert tree.expected == pytest.approx(1 + p[:n].sum())
    with pytest.raises(ValueError):
        optimal_tree(p, len(p) + 1, 1)


def test_value_curve():
    curve = tree_value_curve(REALISTIC, 128, 16)
    assert curve.shape == (129,) and curve[0] == 1.0
    assert np.all(np.diff(curve) >= -1e-12)
    for n in [0, 1, 2, 7, 33, 128]:
        assert curve[n] == pytest.approx(optimal_tree(REALISTIC, n, 16).expected, rel=1e-12)
    small = tree_value_curve([0.5, 0.2], 6, 2)  # capacity 1 + 2 + 4 = 7 nodes
    for n in range(7):
        assert small[n] == pytest.approx(optimal_tree([0.5, 0.2], n, 2).expected, rel=1e-12)
    with pytest.raises(ValueError):
        tree_value_curve([0.5, 0.2], 7, 2)


@pytest.mark.parametrize("acceptance", [[], [[0.5]], [0.5, -0.1], [0.5, np.nan], [np.inf], [0.7, 0.4], "x"])
def test_bad_acceptance(acceptance):
    with pytest.raises(ValueError):
        optimal_tree(acceptance, 4, 2)
    with pytest.raises(ValueError):
        tree_value_curve(acceptance, 4, 2)
    with pytest.raises(ValueError):
        expected_tokens(acceptance, [-1, 0])


@pytest.mark.parametrize("budget,max_depth", [(-1, 2), (2.0, 2), (True, 2), (3, 0), (3, -1), (3, 1.5)])
def test_bad_budget_or_depth(budget, max_depth):
    with pytest.raises(ValueError):
        optimal_tree([0.5, 0.2], budget, max_depth)
    with pytest.raises(ValueError):
        tree_value_curve([0.5, 0.2], budget, max_depth)


@pytest.mark.parametrize("parents", [[], [0], [-1, 1], [-1, 0, 2], [-1, -1], [[-1, 0]], [-1.0, 0.0], [-1, 0, 0, 0]])
def test_bad_parents(parents):
    with pytest.raises(ValueError):
        expected_tokens([0.5, 0.2], parents)  # the last case: 3 children, only 2 ranks


def test_errors_are_one_line():
    for call in [lambda: optimal_tree([0.9, 0.9], 3, 2), lambda: optimal_tree([0.5], 5, 2),
                 lambda: optimal_tree([0.5], -1, 2), lambda: expected_tokens([0.5], [-1, 0, 0])]:
        with pytest.raises(ValueError) as info:
            call()
        assert "\n" not in str(info.value)


def test_specinfer_default_tree_has_exactly_its_budget_in_binary_levels():
    """SpecInfer without `widths` drafts exactly `budget` nodes (and says so in its stats):
    full binary levels, then a partial last level that gives each parent its first-ranked
    child before any its second; breadth-first with each parent's children contiguous."""
    from jaxaccel.decode.draft import SpecInfer, binary_parents, make_template

    for budget in range(1, 131):
        parents = binary_parents(budget)
        t = make_template(parents)  # validates breadth-first order and contiguous children
        assert t.nodes - 1 == budget == SpecInfer(budget=budget).budget
        assert SpecInfer(budget=budget).template().nodes == budget + 1
        assert t.max_children <= 2 and t.max_depth == int(np.log2(budget + 1))  # full levels first: the shallowest
        full = 2 ** (t.max_depth + 1) - 2  # nodes in full levels up to the deepest, were it full
        last = t.depth == t.max_depth
        if budget < full:  # partial last level: first-ranked children before second-ranked ones
            assert (t.rank[last] == 1).sum() == max(0, last.sum() - (1 << (t.max_depth - 1)))
        assert (parents[1:] >= 0).all() and (np.diff(parents[1:]) >= 0).all()
    assert SpecInfer(budget=64).stats(None, 1)["budget"] == 64


def test_bench_figure_names_one_file_per_temperature_beside_the_given_one():
    from jaxaccel.bench.draft import figure_path

    assert figure_path("docs/figures/dyspec.png", 0.6) == "docs/figures/dyspec-T0.6.png"
    assert figure_path("runs.png/fig.png", 0.0) == "runs.png/fig-T0.0.png"  # a folder's name is left alone


@pytest.mark.parametrize("budget,nodes", [(3, 3), (8, 8), (12, 8), (16, 16), (64, 64), (128, 128)])
def test_specinfer_chains_baseline_is_k_chains_of_depth_8(budget, nodes):
    """`bench dyspec --methods specinfer-chains`: the papers' k×8 SpecInfer trees, the
    largest within `budget`, every node below the root's children having one child."""
    from jaxaccel.bench.draft import method_options
    from jaxaccel.decode.draft import SpecInfer, widths_template

    method, opts = method_options("specinfer-chains", budget, "builtin:draft")
    parents = np.asarray(widths_template(tuple(opts["widths"])).parents)
    assert method == "specinfer" and len(parents) - 1 == nodes == SpecInfer(**opts).budget
    children = np.bincount(parents[parents >= 0], minlength=len(parents))
    roots = max(1, budget // 8)
    assert children[0] == roots and len(opts["widths"]) == min(budget, 8)
    assert set(children[1:]) <= {0, 1} and (children[1:] == 0).sum() == roots  # roots chains, one leaf each


def test_bench_acceptance_predictions_have_each_shapes_closed_form():
    """`bench acceptance`'s predicted tokens per step: a chain is sum p1^d, a full binary tree
    sum (p1 + p2)^d, k chains of 8 are 1 + (p1 + ... + pk)(1 + p1 + ... + p1^7); Sequoia's optimum
    is at least each shape of its depth; `with_top1` keeps the measured vector at its own top-1
    and the other ranks' proportions elsewhere."""
    from jaxaccel.bench.draft import predicted_mat, with_top1

    p = np.array([0.55, 0.2, 0.1, 0.05, 0.03, 0.02, 0.01, 0.01, 0.005])
    rows = {r["budget"]: r for r in predicted_mat(p, (6, 14, 16, 64))}
    geo = lambda x, n: sum(x ** d for d in range(n + 1))  # noqa: E731
    assert rows[16]["sps"] == pytest.approx(geo(p[0], 16)) and rows[16]["sps_nodes"] == 16
    assert rows[14]["specinfer"] == pytest.approx(geo(p[0] + p[1], 3)) and rows[14]["specinfer_nodes"] == 14
    # 16 and 64 nodes: full levels, then first-ranked children under the first two nodes of the last one
    assert rows[16]["specinfer"] == pytest.approx(geo(p[0] + p[1], 3) + p[0] ** 4 + p[0] ** 3 * p[1])
    assert rows[64]["specinfer"] == pytest.approx(geo(p[0] + p[1], 5) + p[0] ** 6 + p[0] ** 5 * p[1])
    assert rows[16]["specinfer_nodes"] == 16 and rows[64]["specinfer_nodes"] == 64
    assert rows[64]["specinfer-chains"] == pytest.approx(1 + p[:8].sum() * geo(p[0], 7))
    assert rows[6]["specinfer-chains"] == pytest.approx(geo(p[0], 6))  # below 8 nodes: one chain
    for r in rows.values():
        assert r["sequoia"] >= max(r["specinfer"], r["specinfer-chains"]) - 1e-12
    np.testing.assert_allclose(with_top1(p, p[0]), p)
    better = with_top1(p, 0.8)
    assert better[0] == 0.8
    np.testing.assert_allclose(better[1:] / better[1:].sum(), p[1:] / p[1:].sum())
    np.testing.assert_allclose(better[1:].sum() / (1 - 0.8), p[1:].sum() / (1 - p[0]))
    assert predicted_mat(better, (64,))[0]["sequoia"] > rows[64]["sequoia"]
    from jaxaccel.bench.draft import acceptance_markdown

    text = acceptance_markdown({"predicted": [{"top1": 0.55, "measured": True, "rows": predicted_mat(p, (64,))},
                                              {"top1": 0.8, "measured": False, "rows": predicted_mat(better, (64,))}]})
    r = rows[64]
    assert "top-1 acceptance 0.550 (measured)" in text and "top-1 acceptance 0.800 (hypothetical draft)" in text
    assert (f"| 64 | {r['sps']:.2f} | {r['specinfer']:.2f} (64) | {r['specinfer-chains']:.2f} (64) | "
            f"{r['sequoia']:.2f} | {r['sequoia'] / r['specinfer']:.2f}x |") in text
    with pytest.raises(ValueError, match="top1"):
        with_top1(p, 1.0)
