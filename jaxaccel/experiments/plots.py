"""PNG plots of a sweep's results file (matplotlib, Agg backend: no display needed).

Plot specs come from the sweep file's `plots:` (copied into the results), each one PNG:
    kind final        y (default final_eval_loss) against x (a config key or a figure), one
                      line per value of `lines` (a key or list of keys)
    (every kind)      runs of `groups` only, and only those whose settings match `where`
    kind curves       validation loss (y: eval_loss | eval_accuracy | train_loss) against
                      x: tokens (default) or step, one line per run
    kind bar          one bar per run of y
    kind scaling_fit  final loss against epochs, with the R_D* fitted to the runs
                      (Muennighoff et al.) and the no-decay prediction (every token unique)
Without `plots:`, each group gets `<group>-curves.png` and, when it varies something,
`<group>-final.png` (x: its first numeric varied key); a sweep of single runs gets `summary.png`.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from jaxaccel import files
from jaxaccel.experiments.results import FINISHED, metric

CURVE_KEYS = {"eval_loss": ("eval_step", "eval_loss"), "eval_accuracy": ("eval_step", "eval_accuracy"),
              "train_loss": ("train_step", "train_loss")}
LABELS = {"final_eval_loss": "final validation loss", "best_eval_loss": "best validation loss",
          "final_eval_accuracy": "final validation accuracy", "best_eval_accuracy": "best validation accuracy",
          "final_train_loss": "final training loss", "eval_loss": "validation loss",
          "eval_accuracy": "validation accuracy", "train_loss": "training loss", "tokens": "training tokens",
          "step": "step", "wall_s": "wall time (s)"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(key: str) -> str:
    return LABELS.get(key, key)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _finished(doc: dict, spec: dict) -> list[dict]:
    """The finished runs a plot shows: of its `groups`, matching its `where` {key: value}."""
    groups, where = spec.get("groups"), spec.get("where") or {}
    return [r for r in doc["runs"] if r.get("status") in FINISHED and (not groups or r.get("group") in groups)
            and all(metric(r, k) == v for k, v in where.items())]


def default_specs(doc: dict) -> list[dict]:
    specs = []
    for group in doc.get("groups", []):
        name = group["name"] or "sweep"
        varied = [*group.get("zip", {}), *group.get("axes", {})]
        runs = [r for r in doc["runs"] if r.get("group") == group["name"]]
        numeric = [k for k in varied if all(_is_number(r["settings"].get(k)) for r in runs)]
        only = [group["name"]] if group["name"] else None
        if numeric:
            x = numeric[0]
            # keys zipped with x change with it: a line per value of one would hold one point
            together = group.get("zip", {}) if x in group.get("zip", {}) else {x: None}
            specs.append({"name": f"{name}-final", "kind": "final", "x": x, "y": "final_eval_loss",
                          "lines": [k for k in varied if k not in together] or None, "groups": only,
                          "logx": 2 if _spans_octaves([r["settings"][x] for r in runs]) else None})
        specs.append({"name": f"{name}-curves", "kind": "curves", "groups": only})
    if all(not [*g.get("zip", {}), *g.get("axes", {})] for g in doc.get("groups", [])) and len(doc["runs"]) > 1:
        specs = [{"name": "summary", "kind": "bar", "y": "final_eval_loss"}]
    return specs


def _spans_octaves(values: list) -> bool:
    positive = [v for v in values if _is_number(v) and v > 0]
    return len(positive) >= 3 and max(positive) / min(positive) >= 8


def plot_results(doc: dict, out_dir: str | Path) -> list[Path]:
    """Write every plot of the results document into `out_dir`; returns the files."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rendered = []  # every figure is drawn before any file is written: a failing one replaces none
    for spec in doc.get("plots") or default_specs(doc):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        try:
            drawn = {"final": _final, "curves": _curves, "bar": _bar, "scaling_fit": _scaling_fit}[spec.get("kind", "final")](
                ax, doc, spec)
            if not drawn:
                ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(spec.get("title") or f"{doc['sweep']}: {spec['name']}", fontsize=10)
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
            fig.tight_layout()
            png = io.BytesIO()
            fig.savefig(png, format="png", dpi=110)
            rendered.append((out / f"{spec['name']}.png", png.getvalue()))
        finally:
            plt.close(fig)
    for path, data in rendered:
        files.write_atomically(path, data)
    return [path for path, _ in rendered]


def _log(ax, spec: dict) -> None:
    for axis, setter in (("logx", ax.set_xscale), ("logy", ax.set_yscale)):
        base = spec.get(axis)
        if base:
            setter("log", base=2 if base is True else base)


def _final(ax, doc: dict, spec: dict) -> bool:
    x_key, y_key = spec["x"], spec.get("y") or "final_eval_loss"
    lines = spec.get("lines") or []
    lines = [lines] if isinstance(lines, str) else list(lines)
    series: dict[str, list[tuple[Any, float]]] = {}
    diverged: list[tuple[Any, float]] = []  # their last value before the loss became non-finite
    shown = _finished(doc, spec)
    # without `lines`, runs of two groups are two lines (with `lines`, its keys say what a line
    # is: a line may cross groups, e.g. an MoE's 1-epoch run and its 16-epoch run of another group)
    by_group = not lines and len({r.get("group") for r in shown}) > 1
    for run in shown:
        x, y = metric(run, x_key), metric(run, y_key)
        if y is None or x is None:
            continue
        if run.get("status") != "done":
            diverged.append((x, y))
            continue
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={metric(run, k)}" for k in lines)
        if by_group:
            label = run.get("group") or ""
        series.setdefault(label, []).append((x, y))
    categories = sorted({x for pts in [*series.values(), diverged] for x, _ in pts if not _is_number(x)}, key=str)
    for label, points in series.items():
        if categories:
            points = [(categories.index(x) if x in categories else x, y) for x, y in points]
        points.sort(key=lambda p: p[0])
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label or None)
    if diverged:  # not joined to the lines: a marker at the last value before divergence
        ax.scatter([categories.index(x) if x in categories else x for x, _ in diverged], [y for _, y in diverged],
                   marker="x", color="red", zorder=3, label="diverged (last value before)")
    if categories:
        ax.set_xticks(range(len(categories)), [str(c) for c in categories])
    else:
        _log(ax, spec)
    ax.set_xlabel(_label(x_key))
    ax.set_ylabel(_label(y_key))
    return bool(series or diverged)


def _curves(ax, doc: dict, spec: dict) -> bool:
    y_key = spec.get("y") or "eval_loss"
    x_key = spec.get("x") or "tokens"
    step_key, value_key = CURVE_KEYS.get(y_key, CURVE_KEYS["eval_loss"])
    drawn = False
    for run in _finished(doc, spec):
        curve = run.get("curve") or {}
        steps, values = curve.get(step_key) or [], curve.get(value_key) or []
        pairs = [(s, v) for s, v in zip(steps, values) if v is not None]
        if not pairs:
            continue
        scale = 1.0
        if x_key == "tokens":
            # stream tokens per step (UL2 rows are shorter; retrieval task rows read none): of
            # the steps trained, else (a diverged run) of the plan, else (older records) of a batch
            if run.get("steps") and run.get("total_tokens"):
                scale = run["total_tokens"] / run["steps"]
            else:
                scale = run.get("stream_tokens_per_step") or run.get("tokens_per_step")
                if not scale:
                    continue  # nothing says how many tokens its steps were
        done = run.get("status") == "done"
        ax.plot([s * scale for s, _ in pairs], [v for _, v in pairs], marker="." if len(pairs) < 30 else None,
                linestyle="-" if done else "--", label=run["name"] if done else f"{run['name']} ({run['status']})")
        drawn = True
    _log(ax, spec)
    ax.set_xlabel(_label(x_key))
    ax.set_ylabel(_label(y_key))
    return drawn


def _bar(ax, doc: dict, spec: dict) -> bool:
    y_key = spec.get("y") or "final_eval_loss"
    finished = [r for r in _finished(doc, spec) if metric(r, y_key) is not None]
    runs = [(r["name"] if r.get("status") == "done" else f"{r['name']} ({r['status']})", metric(r, y_key))
            for r in finished]
    # a diverged run's bar (its last value before divergence) hatched, its name saying so
    ax.bar(range(len(runs)), [v for _, v in runs], hatch=[None if r.get("status") == "done" else "xx" for r in finished])
    ax.set_xticks(range(len(runs)), [n for n, _ in runs], rotation=30, ha="right", fontsize=7)
    if runs:
        low, high = min(v for _, v in runs), max(v for _, v in runs)
        pad = (high - low) * 0.5 or abs(high) * 0.05 or 1.0
        ax.set_ylim(low - pad, high + pad)
    ax.set_ylabel(_label(y_key))
    return bool(runs)


def _scaling_fit(ax, doc: dict, spec: dict) -> bool:
    import numpy as np

    from jaxaccel.experiments.scaling import effective_data
    from jaxaccel.experiments.report import repetition_fit

    runs, fit, _ = repetition_fit(doc, spec.get("groups"))
    if fit is None:
        return False
    for size in sorted({r["params"] for r in runs}):
        # The runs at this size's largest token budget: loss against epochs at fixed compute
        # (the fit also used the others, e.g. single-epoch runs on less data).
        tokens = max(r["total_tokens"] for r in runs if r["params"] == size)
        mine = [r for r in runs if r["params"] == size and r["total_tokens"] == tokens]
        epochs = np.array([r["total_tokens"] / r["unique_tokens"] for r in mine])
        ax.scatter(epochs, [r["final"]["eval_loss"] for r in mine], label=f"observed, {size / 1e6:.2g}M params")
        grid = np.geomspace(1.0, max(epochs.max(), 2.0), 50)
        unique = tokens / grid
        offset = fit.offsets[float(size)]
        ax.plot(grid, offset + fit.B / effective_data(unique, tokens, fit.rd_star) ** fit.beta,
                label=f"fit, R_D* = {fit.rd_star:.3g}")
        ax.plot(grid, offset + fit.B / tokens ** fit.beta * np.ones_like(grid), linestyle=":",
                label="every token unique")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("epochs (at the largest token budget of each model size)")
    ax.set_ylabel("final validation loss")
    return True


def save_figure(plt, fig, axes, path: Path, grid: bool = True) -> Path:
    """Legends and (unless `grid` is off: images) a light grid on `axes`, tight layout, PNG at
    110 dpi; closes the figure."""
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        if grid:
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
