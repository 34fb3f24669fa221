"""Markdown tables of a sweep's results file: one table per group, every figure read from the
JSON (nothing recomputed but the optional gap and R_D* columns, whose inputs are in it too).

The sweep file's `report:` adds
    reference: RUN    the loss to close the gap to (e.g. the unique-data run)
    baseline: RUN     the run whose gap to the reference the others recover (the repeated run):
                      gap recovered = (L_baseline - L) / (L_baseline - L_reference)
    scaling_fit: true R_D* (Muennighoff et al.) fitted to the finished runs, with each run's
                      observed and fitted loss; or a list of groups: fitted to those groups'
                      runs alone (one law: runs that change the recipe, e.g. dropout, are
                      not points of it)
"""
from __future__ import annotations

import math
from typing import Any

from jaxaccel.experiments.results import FINISHED
from jaxaccel.experiments.spec import resolve_one


def _num(value: Any, fmt: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value, fmt)


def _count(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:g}"
    return f"{int(value):,}"


def _wall(seconds: Any) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def repetition_fit(doc: dict, groups: list[str] | None = None):
    """(runs used, RepetitionFit or None, why not) over the finished runs of `groups`."""
    from jaxaccel.experiments.scaling import fit_rd_star

    runs = [r for r in doc["runs"] if r.get("status") == "done" and (not groups or r.get("group") in groups)
            and _fit_exclusion(r) is None]
    try:
        fit = fit_rd_star([r["params"] for r in runs], [r["total_tokens"] for r in runs],
                          [r["unique_tokens"] for r in runs], [r["final"]["eval_loss"] for r in runs])
    except ValueError as e:
        return runs, None, str(e)
    return runs, fit, ""


def render_report(doc: dict) -> str:
    spec = doc.get("report") or {}
    lines = [f"# {spec.get('title') or 'Sweep ' + repr(doc['sweep'])[1:-1]}", ""]
    if doc.get("description"):
        lines += [doc["description"], ""]
    lines += [f"Sweep `{doc['sweep']}` from `{doc.get('source')}`; runs in `{doc.get('output_dir')}`; results "
              f"updated {doc.get('updated')}.", "",
              f"Command: `{doc.get('command') or 'python -m jaxaccel.experiments sweep ' + str(doc.get('source'))}`", ""]
    corpora = {(r.get("data") or {}).get("manifest_sha256") for r in doc["runs"]
               if r.get("status") in FINISHED and isinstance(r.get("data"), dict)} - {None}
    if len(corpora) > 1:
        lines += [f"**Warning: the finished runs were trained on {len(corpora)} different versions of their corpora "
                  f"(manifests {', '.join(sorted(c[:12] for c in corpora))}): their losses do not compare.**", ""]
    reference = baseline = None
    gap_note = ""
    try:
        if spec.get("reference") and spec.get("baseline"):
            reference = resolve_one(doc["runs"], spec["reference"], "report.reference")
            baseline = resolve_one(doc["runs"], spec["baseline"], "report.baseline")
    except Exception as e:  # noqa: BLE001 - an old results file: report without the column
        gap_note = f"(gap column left out: {e})"
    ref_loss = (reference or {}).get("final", {}).get("eval_loss")
    base_loss = (baseline or {}).get("final", {}).get("eval_loss")
    with_gap = ref_loss is not None and base_loss is not None and base_loss != ref_loss
    if reference is not None and baseline is not None and not with_gap:
        missing = [r["name"] for r, loss in ((reference, ref_loss), (baseline, base_loss)) if loss is None]
        gap_note = (f"(gap column left out: no final validation loss for {', '.join(missing)})" if missing else
                    f"(gap column left out: {baseline['name']} and {reference['name']} have the same final "
                    f"validation loss, {ref_loss:.4f})")

    header = ["run", "final val loss", "best val loss (step)", "final val acc", "final train loss", "steps",
              "unique tokens", "epochs", "tokens", "params", "wall"]
    if with_gap:
        header.append("gap recovered")
    pending = []
    for group in doc.get("groups") or [{"name": ""}]:
        runs = [r for r in doc["runs"] if r.get("group", "") == group["name"]]
        if group["name"]:
            lines += [f"## {group['name']}", ""]
            if group.get("description"):
                lines += [group["description"], ""]
        if group.get("set"):
            lines += ["Settings: " + ", ".join(f"`{k}={v}`" for k, v in group["set"].items()), ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for run in runs:
            if run.get("status") not in FINISHED:
                pending.append(run)
                continue
            final, best = run.get("final") or {}, run.get("best") or {}
            status = "" if run["status"] == "done" else f" ({run['status']})"
            row = [f"`{run['name']}`{status}", _num(final.get("eval_loss")),
                   f"{_num(best.get('eval_loss'))} ({_count(best.get('eval_loss_step'))})",
                   _num(final.get("eval_accuracy")), _num(final.get("train_loss")), _count(run.get("steps")),
                   _count(run.get("unique_tokens")), _num(run.get("epochs"), "g"), _count(run.get("total_tokens")),
                   _count(run.get("params")), _wall(run.get("wall_s"))]
            if with_gap:
                loss = final.get("eval_loss")
                row.append("–" if loss is None else f"{(base_loss - loss) / (base_loss - ref_loss):.0%}")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if with_gap:
        lines += [f"Gap recovered = (L({baseline['name']}) − L) / (L({baseline['name']}) − L({reference['name']})), "
                  f"final validation losses.", ""]
    elif gap_note:
        lines += [gap_note, ""]
    if spec.get("scaling_fit"):
        lines += _fit_section(doc, spec["scaling_fit"] if isinstance(spec["scaling_fit"], list) else None)
    if pending:
        lines += ["## Not finished", ""] + [f"- `{r['name']}`: {r.get('status')}"
                                             + (f" (checkpoint step {r['checkpoint_step']})"
                                                if r.get("checkpoint_step") else "") for r in pending] + [""]
    return "\n".join(lines).rstrip() + "\n"


def _fit_section(doc: dict, groups: list[str] | None = None) -> list[str]:
    from jaxaccel.experiments.scaling import PUBLISHED

    runs, fit, why = repetition_fit(doc, groups)
    used = {id(r) for r in runs}
    left_out = [r for r in doc["runs"] if r.get("status") in FINISHED and id(r) not in used
                and (not groups or r.get("group") in groups)]
    lines = ["## Data-constrained scaling law (Muennighoff et al. 2023)", "",
             "D' = U + U·R_D*·(1 − exp(−R_D/R_D*)), R_D = D/U − 1; each run's final validation loss fitted as "
             "E_N + B / D'^β (one E per model size). The paper's fit on C4: "
             f"R_D* = {PUBLISHED.rd_star:.2f}, β = {PUBLISHED.beta:.3f}.", ""]
    if left_out:
        lines += ["Left out of the fit: " + "; ".join(f"`{r['name']}` ({_fit_exclusion(r)})" for r in left_out)
                  + ".", ""]
    if fit is None:
        return lines + [f"No fit: {why}.", ""]
    bound = " (at the end of the search range: only a bound)" if fit.rd_star_at_bound else ""
    beta_bound = " (at the end of its search range)" if fit.beta_at_bound else ""
    lines += [(f"Fitted to the groups {', '.join(groups)}. " if groups else "")
              + f"Fitted on {fit.points} runs ({fit.repeated_points} with repeated data): **R_D* = {fit.rd_star:.3g}**"
              f"{bound}, β = {fit.beta:.3f}{beta_bound}, B = {fit.B:.4g}, "
              + ", ".join(f"E({_count(n)} params) = {e:.4f}" for n, e in fit.offsets.items())
              + f"; RMSE {fit.rmse:.4f}.", "",
              "| run | params | unique tokens | tokens | epochs | observed loss | fitted loss |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        fitted = fit.predict(r["params"], r["total_tokens"], r["unique_tokens"])
        lines.append(f"| `{r['name']}` | {_count(r['params'])} | {_count(r['unique_tokens'])} | "
                     f"{_count(r['total_tokens'])} | {r['total_tokens'] / r['unique_tokens']:.3g} | "
                     f"{r['final']['eval_loss']:.4f} | {fitted:.4f} |")
    return lines + [""]


def _fit_exclusion(run: dict) -> str | None:
    """Why a finished run is not a point of the scaling fit (repetition_fit's filter, in words),
    or None when it is one."""
    if run.get("status") != "done":
        return run.get("status") or "not done"
    if not _number((run.get("final") or {}).get("eval_loss")):
        return "no final validation loss"
    if not all(_number(run.get(k)) and run[k] > 0 for k in ("unique_tokens", "total_tokens")):
        return "no token counts"
    if not (_number(run.get("params")) and run["params"] > 0):
        return "no parameter count"
    return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
