"""Draft-model speculation: autoregressive vs SpS vs SpecInfer vs Sequoia vs DySpec, one engine.

For each batch size and temperature the same prompts (held-out corpus files + natural-language
prompts, as `bench spec`) are decoded by every method at every budget; reported per row: MAT
(new tokens per target forward, bonus included: hardware-independent), tokens/s (median over
runs) and speedup over autoregressive measured in the same run; DySpec also with
`budget="auto"`. Each row also carries the speedup the cost model *predicts* for an
accelerator-like setting (draft/target cost 1:50, verification cost flat in tree size):
measured MAT over the modelled step cost — a prediction, not a measurement.

Also DySpec's Figure 2: draft probability q(x) of drafted tokens against the probability the
target accepts them, min(1, p(x)/q(x)), on teacher-forced calibration text -> a PNG and the
correlation coefficient.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from jaxaccel.bench.common import machine
from jaxaccel.bench.spec import NATURAL_PROMPTS, check_prompts, decoded_note, heldout_prompts, run_method

DEFAULT_METHODS = ("sps", "specinfer", "sequoia", "dyspec")  # decode methods, as registered
METHODS = DEFAULT_METHODS + ("specinfer-chains",)  # + bench-only configurations (`method_options`)
CHAIN_DEPTH = 8
ACCELERATOR_RATIO = 1 / 50


def chains_widths(budget: int) -> list[int]:
    """`specinfer-chains`: SpecInfer as the Sequoia and DySpec papers run it, k independent
    chains of depth 8 ("k×8": the root's top-k children, each continued by the draft's top
    token), k = budget // 8: the largest such tree within the budget; a single chain below
    8 nodes."""
    if budget < CHAIN_DEPTH:
        return [1] * budget
    return [budget // CHAIN_DEPTH] + [1] * (CHAIN_DEPTH - 1)


def method_options(method: str, budget, draft: str) -> tuple[str, dict[str, Any]]:
    """The decode method and options behind a bench method name."""
    if method == "specinfer-chains":
        return "specinfer", {"draft": draft, "widths": chains_widths(budget)}  # its nodes: the row's "nodes"
    return method, {"budget": budget, "draft": draft}


def draft_widths(method) -> list[int]:
    """Widths of the draft forwards of one step after the catch-up (for the cost model)."""
    from jaxaccel.decode.dyspec import DySpec

    if isinstance(method, DySpec):
        return [method.pops] * (method.rounds() - 1)
    t = method.template()
    return [int((t.level_nodes[d] >= 0).sum()) for d in range(1, t.max_depth)]


def predicted_speedup(method, mat: float, batch: int, ratio: float = ACCELERATOR_RATIO) -> float:
    from jaxaccel.decode import tuning

    if method.tree_nodes() == 0:  # dyspec's plain-step plan
        return 1.0
    curve = tuning.ACCELERATOR_VERIFY_COST
    cost = lambda width: tuning.verify_cost(width * batch, curve) / tuning.verify_cost(batch, curve)  # noqa: E731
    step = cost(method.tree_nodes()) + ratio * (cost(2) + sum(cost(w) for w in draft_widths(method)))
    return mat / step


def figure_path(figure: str, temperature: float) -> str:
    """`--figure` for one temperature: NAME-T0.6.png beside it (a PNG unless it names a suffix)."""
    from pathlib import Path

    p = Path(figure)
    return str(p.with_name(f"{p.stem}-T{temperature}{p.suffix or '.png'}"))


def figure2(lm, draft, temperature: float, path: str | None) -> dict[str, Any]:
    from jaxaccel.decode.acceptance import calibration, probability_vs_acceptance, teacher_forced

    prompts, new_tokens = calibration(lm, draft)
    p, q = teacher_forced(lm, draft, prompts, temperature, None, None, new_tokens, 0)
    res = probability_vs_acceptance(p, q)
    if path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 4))
        ax.scatter(res["q"], res["acceptance"], s=3, alpha=0.15, label="drafted tokens")
        mids = [(c["q_lo"] + c["q_hi"]) / 2 for c in res["curve"] if c["acceptance"] is not None]
        ax.plot(mids, [c["acceptance"] for c in res["curve"] if c["acceptance"] is not None], "o-", color="C3",
                label="binned mean")
        ax.plot([0, 1], [0, 1], ":", color="gray")
        ax.set_xlabel("draft probability q(x)")
        ax.set_ylabel("acceptance probability min(1, p(x)/q(x))")
        ax.set_title(f"draft vs acceptance, T={temperature} (r = {res['correlation']:.2f})")
        ax.legend(loc="lower right")
        fig.tight_layout()
        from pathlib import Path

        Path(path).parent.mkdir(parents=True, exist_ok=True)  # checked writable before the run
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return {"temperature": temperature, "correlation": res["correlation"], "points": res["points"],
            "curve": res["curve"], "png": path}


def check_draft_config(draft_config, target_config) -> None:
    """The check every draft-model method makes (`DraftMethod.check_draft`: the same
    vocabulary), on configs alone: before any model is loaded or anything timed."""
    from jaxaccel.decode.methods import get_method

    get_method("sequoia").check_draft(draft_config, target_config)  # every draft method makes the same check


def check_pair(lm, draft_lm) -> None:
    """What `generate` checks of a draft when a draft method first runs (`lm.check_draft_model`),
    on two loaded models: InvalidArgumentError before anything is timed."""
    from jaxaccel.decode.lm import check_draft_model
    from jaxaccel.decode.methods import get_method

    check_draft_model(lm, draft_lm, get_method("sequoia"))  # every draft method makes the same check


def check_draft_length(draft_lm, positions: int, budgets: Sequence[int], methods: Sequence[str], draft: str) -> None:
    """What `generate` checks of the draft's maximum length, for the deepest tree any row of the
    run may grow (a tree of n nodes is at most n deep; DySpec's also at most max_depth), before
    the first baseline is timed (it used to fail after it, losing the figures)."""
    from jaxaccel.decode.dyspec import AUTO_MAX_BUDGET
    from jaxaccel.decode.methods import get_method
    from jaxaccel.errors import InvalidArgumentError

    depth = 0
    configs = [(m, b) for b in budgets for m in methods] + ([("dyspec", "auto")] if "dyspec" in methods else [])
    for name, budget in configs:
        method, opts = method_options(name, budget, draft)
        bound = AUTO_MAX_BUDGET if budget == "auto" else int(budget)
        depth = max(depth, min(bound, getattr(get_method(method, **opts), "max_depth", bound)))
    if draft_lm.config.max_seq_len < positions + depth:
        raise InvalidArgumentError(f"the draft's maximum length ({draft_lm.config.max_seq_len}) is shorter than the "
                                   f"{positions + depth} positions a row may need (longest prompt + --new-tokens + the "
                                   f"deepest tree, {depth})")


def _release(lm) -> None:
    """Drop the programs of a finished row: a sweep of ~90 configurations otherwise exhausts
    the CPU backend's code memory (LLVM "Cannot allocate memory")."""
    import jax

    lm._compiled.clear()
    jax.clear_caches()


def run(model: str = "builtin:default", draft: str = "builtin:draft", batches: Sequence[int] = (1, 4),
        temperatures: Sequence[float] = (0.0, 0.6), budgets: Sequence[int] = (8, 16, 32, 64, 128),
        methods: Sequence[str] = DEFAULT_METHODS, new_tokens: int = 128, runs: int = 3, n_files: int = 8,
        prompt_tokens: int = 256, figure: str | None = None,
        progress: Callable[[str], None] = print, partial: Callable[[dict], None] | None = None) -> dict[str, Any]:
    import jaxaccel
    from jaxaccel.decode.lm import draft_folder
    from jaxaccel.decode.methods import get_method

    lm = jaxaccel.load(model, dtype="float32")
    lm.eos_token_ids = ()  # every row decodes exactly new_tokens
    # The draft in its stored dtype, as generate loads a draft named by path (builtin:draft:
    # bfloat16), and that very object is the one the methods run with: generate would
    # otherwise load its own copy (until 2026-12-04 this one was float32 and only checked).
    draft_lm = lm._drafts[draft_folder(draft)] = jaxaccel.load(draft)
    check_pair(lm, draft_lm)
    code = heldout_prompts(lm, n_files, prompt_tokens)
    prompts = code + [lm.encode(p) for p in NATURAL_PROMPTS]
    check_prompts(prompts, len(code), prompt_tokens, batches)
    check_draft_length(draft_lm, max(len(p) for p in prompts) + new_tokens, budgets, methods, draft)
    result: dict[str, Any] = {
        "benchmark": "draft", "machine": machine(), "model": model, "draft": draft,
        "params_m": round(lm.num_params() / 1e6, 2), "draft_params_m": round(draft_lm.num_params() / 1e6, 2),
        "dtype": lm.config.dtype, "draft_dtype": draft_lm.config.dtype,
        "new_tokens": new_tokens, "runs": runs, "prompts": len(prompts), "heldout_files": len(code),
        "accelerator_ratio": ACCELERATOR_RATIO}
    rows = []
    for batch in batches:
        for temperature in temperatures:
            base = run_method(lm, prompts, batch, new_tokens, runs, "autoregressive", temperature)
            rows.append({"batch": batch, "temperature": temperature, "method": "autoregressive", "budget": None,
                         **base, "speedup": 1.0, "predicted_accelerator_speedup": 1.0})
            progress(f"batch {batch}, T={temperature}: autoregressive {base['tokens_per_s']:.0f} tok/s")
            configs = [(m, b) for b in budgets for m in methods] + ([("dyspec", "auto")] if "dyspec" in methods else [])
            for name, budget in configs:
                method, opts = method_options(name, budget, draft)
                baseline = base
                if budget == "auto":  # its claim is "never slower": against a baseline timed right before it
                    baseline = run_method(lm, prompts, batch, new_tokens, runs, "autoregressive", temperature)
                res = run_method(lm, prompts, batch, new_tokens, runs, method, temperature, **opts)
                decoder = get_method(method, **opts)
                if budget == "auto" or method == "sequoia":  # resolve what the run planned
                    decoder.prepare(lm, draft_lm, temperature, None, None, batch=batch)
                row = {"batch": batch, "temperature": temperature, "method": name, "budget": budget,
                       "nodes": max(decoder.tree_nodes() - 1, 0), **res,
                       "speedup": res["tokens_per_s"] / baseline["tokens_per_s"],
                       "baseline_tokens_per_s": baseline["tokens_per_s"],
                       "predicted_accelerator_speedup": predicted_speedup(decoder, res["mat"], batch)}
                if budget == "auto":  # what this CPU's cost model chose, and what it picks at 1:50
                    from jaxaccel.decode import tuning
                    from jaxaccel.decode.dyspec import plan_budget

                    row["auto_plan"] = decoder.plan._asdict()
                    row["accelerator_plan"] = plan_budget(lm, draft_lm, temperature, None, None, batch,
                                                          curve=tuning.ACCELERATOR_VERIFY_COST,
                                                          draft_ratio=ACCELERATOR_RATIO)._asdict()
                rows.append(row)
                _release(lm)
                if partial is not None:  # the rows so far, in case a long run dies
                    partial({**result, "rows": rows})
                progress(f"batch {batch}, T={temperature}: {name} budget {budget} ({row['nodes']} nodes): MAT "
                         f"{row['mat']:.2f}, {row['tokens_per_s']:.0f} tok/s, {row['speedup']:.2f}x autoregressive, "
                         f"predicted 1:50 {row['predicted_accelerator_speedup']:.2f}x")
    result["rows"] = rows
    result["figure2"] = [figure2(lm, draft_lm, t, figure and figure_path(figure, t)) for t in temperatures]
    for f in result["figure2"]:
        progress(f"figure 2, T={f['temperature']}: correlation {f['correlation']:.3f} over {f['points']} drafted tokens")
    return result


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    out = [f"Target `{result['model']}` ({result['params_m']}M params), draft `{result['draft']}` "
           f"({result['draft_params_m']}M), {result.get('dtype', 'float32')} target, "
           f"{result.get('draft_dtype', 'bfloat16')} draft, {m['cpu']} ({m['cores']} cores), {m['backend']}, "
           f"jax {m['jax']}, "
           f"{m['date']}; {result['prompts']} prompts, {result['new_tokens']} new tokens each, median of "
           f"{result['runs']} runs. *Predicted 1:50* = measured MAT / modelled step cost with a draft 50x cheaper "
           f"than the target and flat verification cost (an accelerator-like setting): a prediction.", "",
           *([note, ""] if (note := decoded_note(result["rows"], result.get("heldout_files"))) else []),
           "| batch | T | method | budget (nodes) | MAT | tok/s | vs autoregressive | predicted 1:50 |",
           "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        auto = f"auto → {r['nodes']}" if r.get("nodes", 0) > 0 else "auto → plain steps"
        budget = "" if r["budget"] is None else (auto if r["budget"] == "auto" else f"{r['budget']} ({r['nodes']})")
        vs = f"{r['speedup']:.2f}x"
        if r["budget"] == "auto":  # timed against its own baseline, run right before it
            vs += f" (vs {r['baseline_tokens_per_s']:.0f} tok/s timed just before)"
        out.append(f"| {r['batch']} | {r['temperature']} | {r['method']} | {budget} | {r['mat']:.2f} | "
                   f"{r['tokens_per_s']:.0f} | {vs} | {r['predicted_accelerator_speedup']:.2f}x |")
    out += ["", "`budget=\"auto\"`: the plan of this backend's cost model, and the plan (predicted) at 1:50:", "",
            "| batch | T | plan here: budget, pops, predicted | plan at 1:50: budget, pops, predicted |",
            "|---|---|---|---|"]
    for r in result["rows"]:
        if r.get("auto_plan"):
            a, b = r["auto_plan"], r["accelerator_plan"]
            out.append(f"| {r['batch']} | {r['temperature']} | {a['budget']}, {a['pops_per_round']}, "
                       f"{a['speedup']:.2f}x | {b['budget']}, {b['pops_per_round']}, {b['speedup']:.2f}x |")
    out += ["", "| temperature | correlation of q(x) and acceptance | drafted tokens |", "|---|---|---|"]
    for f in result["figure2"]:
        out.append(f"| {f['temperature']} | {f['correlation']:.3f} | {f['points']} |")
    return "\n".join(out)


PREDICTED_BUDGETS = (8, 16, 32, 64, 128)
PREDICTED_SHAPES = ("sps", "specinfer", "specinfer-chains", "sequoia")


def with_top1(acceptance: Sequence[float], top1: float):
    """The acceptance vector of a hypothetical draft whose top token is accepted with
    probability `top1`, in [0, 1), the other ranks behaving as measured once it is not: each
    p_k (k > 1) scaled by (1 - top1) / (1 - p_1), so the conditional distribution of the
    accepted rank given that the top token was rejected is unchanged."""
    import numpy as np

    vec = np.asarray(acceptance, np.float64)
    if not 0.0 <= top1 < 1.0:
        raise ValueError(f"top1 must be in [0, 1), got {top1}")
    rest = vec[1:] * ((1.0 - top1) / (1.0 - vec[0]) if vec[0] < 1.0 else 0.0)
    return np.concatenate([[top1], rest])


def shape_parents(shape: str, budget: int, acceptance, max_depth: int = 8):
    """parents of the static tree `shape` drafts with `budget` nodes: `sps` a chain,
    `specinfer` its default (a binary tree of exactly `budget` nodes),
    `specinfer-chains` budget // 8 chains of depth 8, `sequoia` the optimal tree for
    `acceptance` (the method's default max_depth 8)."""
    from jaxaccel.decode.draft import binary_parents, widths_template
    from jaxaccel.decode.sequoia import optimal_tree, padded_acceptance

    if shape == "sps":
        return widths_template((1,) * budget).parents
    if shape == "specinfer":
        return binary_parents(budget)
    if shape == "specinfer-chains":
        return widths_template(tuple(chains_widths(budget))).parents
    if shape == "sequoia":
        return optimal_tree(padded_acceptance(acceptance, budget, max_depth), budget, max_depth).parents
    raise ValueError(f"unknown tree shape {shape!r}")


def predicted_mat(acceptance, budgets: Sequence[int] = PREDICTED_BUDGETS) -> list[dict[str, Any]]:
    """Sequoia's model of each static tree shape's tokens per target forward (bonus included:
    the root counts 1): the sum over nodes of the product of p_rank along the path, ranks
    treated as independent from one step to the next. A prediction: acceptance at
    consecutive positions is correlated in real text, and the model overestimates the
    measured MAT (see docs/BENCHMARKS.md)."""
    import numpy as np

    from jaxaccel.decode.sequoia import expected_tokens

    rows = []
    for budget in budgets:
        row: dict[str, Any] = {"budget": int(budget)}
        for shape in PREDICTED_SHAPES:
            parents = np.asarray(shape_parents(shape, int(budget), acceptance))
            fan_out = int(np.bincount(parents[1:], minlength=1).max()) if len(parents) > 1 else 1
            vec = np.pad(np.asarray(acceptance, np.float64), (0, max(0, fan_out - len(acceptance))))
            row[shape] = expected_tokens(vec, parents)
            row[f"{shape}_nodes"] = len(parents) - 1
        rows.append(row)
    return rows


def acceptance(target: str, draft: str, temperature: float, top_k: int | None, top_p: float | None,
               max_rank: int, what_if_top1: Sequence[float] = (), dtype: str = "float32") -> dict[str, Any]:
    """`bench acceptance`: Sequoia's positional acceptance vector, also stored where
    `method="sequoia"` looks for it (`decode.acceptance.cached_acceptance`), and the tokens
    per step Sequoia's model predicts from it for each static tree shape (`predicted_mat`),
    also for hypothetical drafts with another top-1 acceptance (`with_top1`)."""
    import jaxaccel
    from jaxaccel.decode.acceptance import _as_decoded, cache_path, cached_acceptance

    # The dtypes `bench dyspec` decodes in (a float32 target, the draft as stored), so the
    # vector measured and cached here is the one its Sequoia rows plan with (the cache key
    # holds both dtypes; until 2026-12-04 it did not, and this measured a bfloat16 target).
    lm = jaxaccel.load(target, dtype=dtype)
    d = jaxaccel.load(draft)
    check_pair(lm, d)  # else an all-zero vector (or a token-id error) would be measured and cached
    temperature, top_k, top_p = _as_decoded(temperature, top_k, top_p, lm.config.vocab_size)  # as measured
    vec = cached_acceptance(lm, d, temperature=temperature, top_k=top_k, top_p=top_p, max_rank=max_rank)
    predicted = [{"top1": float(vec[0]), "measured": True, "rows": predicted_mat(vec)}]
    predicted += [{"top1": float(t), "measured": False, "rows": predicted_mat(with_top1(vec, t))} for t in what_if_top1]
    return {"acceptance": [float(x) for x in vec], "target": target, "draft": draft, "temperature": temperature,
            "top_k": top_k, "top_p": top_p, "dtype": lm.config.dtype, "draft_dtype": d.config.dtype,
            "sum": float(vec.sum()), "predicted": predicted, "machine": machine(),
            "cached_at": str(cache_path(lm, d, {})).rsplit("/", 1)[0]}


def acceptance_markdown(result: dict[str, Any]) -> str:
    """The predicted tokens per step of `acceptance`'s result, one table per top-1 value."""
    out = []
    for block in result["predicted"]:
        label = "measured" if block["measured"] else "hypothetical draft"
        out += ["", f"Predicted tokens per step, top-1 acceptance {block['top1']:.3f} ({label}):", "",
                "| budget | SpS | SpecInfer (binary) | SpecInfer (chains) | Sequoia | Sequoia / SpecInfer |",
                "|---|---|---|---|---|---|"]
        for r in block["rows"]:
            out.append(f"| {r['budget']} | {r['sps']:.2f} | {r['specinfer']:.2f} ({r['specinfer_nodes']}) | "
                       f"{r['specinfer-chains']:.2f} ({r['specinfer-chains_nodes']}) | {r['sequoia']:.2f} | "
                       f"{r['sequoia'] / r['specinfer']:.2f}x |")
    return "\n".join(out)
