"""A sweep's results: one JSON file holding every run (config, final and best validation
figures, curves, wall time), and the per-run record each finished run leaves in its folder.

    {"format": "jaxaccel.sweep-results", "version": 1, "sweep": NAME, "source": SWEEP_YAML,
     "output_dir": ..., "updated": ISO time, "groups": [...], "plots": [...], "report": {...},
     "runs": [RECORD, ...]}       # in the sweep's order; unfinished runs carry only their plan

A RECORD (also `<run folder>/sweep_result.json` once the run has finished) is
    name, group, settings {dotted key: value}, folder, status ("done" | "diverged" |
    "partial" | "new"), error, config (the full training config), steps, resumed_from,
    wall_s, finished_at, tokens_per_step, stream_tokens_per_step, total_tokens, unique_tokens, epochs,
    corpus_tokens, params, active_params, train_flops,
    final {step, eval_loss, eval_accuracy, train_loss},
    best {eval_loss, eval_loss_step, eval_accuracy, eval_accuracy_step},
    curve {train_step, train_loss, eval_step, eval_loss, eval_accuracy}, data {stats}.

`wall_s` is the time of the attempt that finished the run: an attempt that was killed
leaves no record of its time (`resumed_from` > 0 says there was one).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from jaxaccel.errors import JaxaccelError
from jaxaccel.files import write_atomically

FORMAT = "jaxaccel.sweep-results"
VERSION = 1
RESULT_FILE = "sweep_result.json"  # in a run's folder once it has finished
METRICS_FILE = "metrics.jsonl"  # written by the trainer
MAX_TRAIN_POINTS = 500  # the train-loss curve is thinned to about this many points
FINISHED = ("done", "diverged")

# Figures of a record that plots and reports can name (besides dotted config keys).
METRICS = {
    "final_eval_loss": ("final", "eval_loss"), "final_eval_accuracy": ("final", "eval_accuracy"),
    "final_train_loss": ("final", "train_loss"), "best_eval_loss": ("best", "eval_loss"),
    "best_eval_accuracy": ("best", "eval_accuracy"), "wall_s": ("wall_s",), "steps": ("steps",),
    "total_tokens": ("total_tokens",), "unique_tokens": ("unique_tokens",), "epochs": ("epochs",),
    "params": ("params",), "active_params": ("active_params",), "train_flops": ("train_flops",),
}


class SweepError(JaxaccelError):
    """A sweep that cannot run as asked: a folder or results file that belongs to something
    else, a budget the corpus cannot meet, a run name that is not in the sweep."""


def as_path(path: str | Path):
    """A local Path, or an etils epath for gs:// (sweeps on pods keep their runs in a bucket)."""
    if str(path).startswith("gs://"):
        from etils import epath

        return epath.Path(str(path))
    return Path(path)


def join(folder: str, *parts: str) -> str:
    return "/".join([str(folder).rstrip("/"), *parts])


def write_json(path: str | Path, obj: Any) -> None:
    """Write atomically where the file system allows (rename), so a reader never sees half a file."""
    write_atomically(as_path(path), json.dumps(obj, indent=1, allow_nan=True) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(as_path(path).read_bytes())


def read_results(path: str | Path) -> dict:
    """The results document at `path`; SweepError (one line) if it is missing or not one."""
    target = as_path(path)
    if not target.exists():
        raise SweepError(f"results file {str(path)!r} does not exist")
    try:
        doc = json.loads(target.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SweepError(f"{path} is not a jaxaccel sweep results file (not JSON)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SweepError(f"{path} is not a jaxaccel sweep results file (no \"format\": \"{FORMAT}\")")
    if doc.get("version") != VERSION:
        raise SweepError(f"{path}: results format version {doc.get('version')!r}; this jaxaccel reads {VERSION}")
    # The shape report and plot read (a hand-edited or truncated-then-fixed file fails here,
    # in one line, not in the middle of a figure).
    problems = [name for name, ok in (
        ("sweep (a name)", isinstance(doc.get("sweep"), str)),
        ("runs (a list of run records)", isinstance(doc.get("runs"), list)
         and all(isinstance(r, dict) and isinstance(r.get("name"), str) for r in doc["runs"])),
        ("groups (a list of objects)", isinstance(doc.get("groups", []), list)
         and all(isinstance(g, dict) and isinstance(g.get("name"), str) for g in doc.get("groups", []))),
        ("plots (a list)", isinstance(doc.get("plots", []), list)),
        ("report (an object)", isinstance(doc.get("report") or {}, dict))) if not ok]
    if problems:
        raise SweepError(f"{path}: not a readable sweep results file: {problems[0]} is missing or malformed")
    for i, run in enumerate(doc["runs"]):
        problem = _malformed_record(run)
        if problem:
            raise SweepError(f"{path}: not a readable sweep results file: runs[{i}] ({run['name']}): {problem}")
        for section in _RECORD_SECTIONS:  # null or missing: empty, as report and plot read them
            run[section] = run.get(section) or {}
    for g in doc.get("groups", []):
        for field in ("set", "zip", "axes"):
            if not isinstance(g.get(field) or {}, dict):
                raise SweepError(f"{path}: not a readable sweep results file: group {g['name']!r}: {field} is not an "
                                 f"object")
            g[field] = g.get(field) or {}
    from jaxaccel.errors import ConfigError
    from jaxaccel.experiments.spec import _parse_plots

    try:  # the sweep file's own rules: kinds, axes, file-safe names (a plot is written as NAME.png)
        doc["plots"] = list(_parse_plots(json.loads(json.dumps(doc.get("plots", []))),
                                         [g["name"] for g in doc.get("groups", [])]))
    except ConfigError as e:
        raise SweepError(f"{path}: not a readable sweep results file: {e}") from None
    return doc


# Figures of a run record that are numbers (or null) when present.
_RECORD_NUMBERS = ("steps", "resumed_from", "wall_s", "tokens_per_step", "stream_tokens_per_step", "total_tokens",
                   "unique_tokens", "epochs", "corpus_tokens", "params", "active_params", "train_flops")


# The object-valued sections of a record ("curve" last: an object of lists).
_RECORD_SECTIONS = ("final", "best", "settings", "data", "config", "curve")


def _malformed_record(run: dict) -> str | None:
    """What is wrong with a run record's shape, or None."""
    def number(v):
        return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))

    for field in _RECORD_NUMBERS:
        if not number(run.get(field)):
            return f"{field} is not a number"
    for section in _RECORD_SECTIONS[:-1]:
        if not isinstance(run.get(section) or {}, dict):
            return f"{section} is not an object"
    for section in ("final", "best"):
        bad = [k for k, v in (run.get(section) or {}).items() if not number(v)]
        if bad:
            return f"{section}.{bad[0]} is not a number"
    curve = run.get("curve") or {}
    if not isinstance(curve, dict) or not all(
            isinstance(v, list) and all(number(x) for x in v) for v in curve.values()):
        return "curve is not an object of number lists"
    for key, values in curve.items():  # a figure may be missing at a step (null); the step itself may not
        if key.endswith("_step") and None in values:
            return f"curve.{key} holds a null step"
    return None


def check_results_target(path: str | Path, sweep_name: str) -> None:
    """Refuse to write `sweep_name`'s results over a file that is someone else's."""
    if not as_path(path).exists():
        return
    try:
        doc = read_results(path)
    except SweepError as e:
        raise SweepError(f"{e}; refusing to overwrite it (set results: in the sweep file, or --results)") from None
    if doc.get("sweep") != sweep_name:
        raise SweepError(f"{path} holds the results of sweep {doc.get('sweep')!r}, not {sweep_name!r}; refusing to "
                         f"overwrite it (set results: in the sweep file, or --results)")


def check_results_of(doc: dict, sweep_name: str, path: str | Path) -> None:
    if doc.get("sweep") != sweep_name:
        raise SweepError(f"{path} holds the results of sweep {doc.get('sweep')!r}, not {sweep_name!r}")


# ----------------------------------------------------------------------------- a run's figures


def read_metrics(folder: str) -> list[dict]:
    """The trainer's metrics.jsonl of a run folder (a line cut by a kill is skipped)."""
    path = as_path(join(folder, METRICS_FILE))
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def figures(metrics: list[dict]) -> dict[str, Any]:
    """final / best / curve of a run from its metrics records."""
    train = [(r["step"], r["loss"]) for r in metrics if "loss" in r]
    evals = [(r["step"], r["eval_loss"], r.get("eval_accuracy")) for r in metrics if "eval_loss" in r]
    stride = max(1, -(-len(train) // MAX_TRAIN_POINTS))
    thinned = train[::stride] + ([train[-1]] if train and (len(train) - 1) % stride else [])
    curve = {"train_step": [s for s, _ in thinned], "train_loss": [_finite(v) for _, v in thinned],
             "eval_step": [s for s, _, _ in evals], "eval_loss": [_finite(v) for _, v, _ in evals],
             "eval_accuracy": [_finite(a) for _, _, a in evals]}
    final = {"step": evals[-1][0] if evals else (train[-1][0] if train else None),
             "eval_loss": _finite(evals[-1][1]) if evals else None,
             "eval_accuracy": _finite(evals[-1][2]) if evals else None,
             "train_loss": _finite(train[-1][1]) if train else None}
    best: dict[str, Any] = {"eval_loss": None, "eval_loss_step": None, "eval_accuracy": None,
                            "eval_accuracy_step": None}
    losses = [(v, s) for s, v, _ in evals if _finite(v) is not None]
    accs = [(a, s) for s, _, a in evals if _finite(a) is not None]
    if losses:
        best["eval_loss"], best["eval_loss_step"] = min(losses, key=lambda t: (t[0], t[1]))
    if accs:
        best["eval_accuracy"], best["eval_accuracy_step"] = max(accs, key=lambda t: (t[0], -t[1]))
    return {"final": final, "best": best, "curve": curve}


def metric(record: dict, key: str) -> Any:
    """A figure of a record by name (`METRICS`), or any dotted key of its training config."""
    if key in METRICS:
        value: Any = record
        for part in METRICS[key]:
            value = value.get(part) if isinstance(value, dict) else None
        return value
    value = record.get("config", {})
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value
