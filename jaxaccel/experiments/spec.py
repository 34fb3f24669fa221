"""Sweep files: a base training config plus axes and named groups, expanded into runs.

    name: repetition                  # the sweep's name (results files carry it)
    description: ...
    base: ../tiny.yaml                # optional trainer preset (relative to this file)
    config:                           # the trainer's YAML format, over `base`
      output_dir: runs/experiments/repetition     # runs go in OUTPUT_DIR/<run name>/
      train: {seq_len: 128}
    results: repetition.json          # relative to output_dir; default results.json
    axes: {model.d_model: [64, 128]}  # every combination (applies to every group)
    zip: {...}                        # lists of one length, varied together
    groups:                           # named groups, in order
      repeated:
        set: {optim.weight_decay: 0.0}          # fixed settings of the group
        zip: {data.epochs: [1, 4], data.unique_tokens: [4096, 1024]}
        axes: {data.seed: [0, 1]}
    plots: [{name: loss-vs-epochs, x: data.epochs, y: final_eval_loss, lines: model.d_model}]
                                      # (also: kind, groups, where {key: value}, logx, logy, title)
    report: {reference: unique, baseline: repeated/epochs=16, scaling_fit: true}

A run's settings are its group's `set`, then one row of the zip lists, then one combination
of the axes (the last axis varying fastest). Its name is `GROUP/k=v,k=v` over the zip and axis
keys (a key is shortened to its shortest dotted suffix that no other config key ends with),
`GROUP` alone for a group without varied keys, and without the `GROUP/` part when the file
has no groups. The name is also its folder under output_dir.

Keys and values are checked by the trainer's own config machinery (`jaxaccel.config`): every
run's config is built with `from_dict(RunConfig, ...)` before anything runs; an unknown
dotted key is an error naming the closest valid ones.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import itertools
import json
import re
from pathlib import Path
from typing import Any, Mapping

from jaxaccel.config import check_dotted_key, dotted_keys, from_dict, load_yaml, with_overrides
from jaxaccel.errors import ConfigError
from jaxaccel.experiments.plots import CURVE_KEYS
from jaxaccel.experiments.results import METRICS, SweepError, join
from jaxaccel.train.config import RunConfig

SWEEP_KEYS = ("name", "description", "base", "config", "results", "axes", "zip", "groups", "plots", "report")
GROUP_KEYS = ("description", "set", "zip", "axes")
PLOT_KEYS = ("name", "kind", "x", "y", "lines", "groups", "where", "logx", "logy", "title")
PLOT_KINDS = ("final", "curves", "bar", "scaling_fit")
REPORT_KEYS = ("title", "reference", "baseline", "scaling_fit")
RUNNER_KEYS = ("output_dir",)  # set per run by the runner, never by an axis
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclasses.dataclass(frozen=True)
class Group:
    name: str  # "" for a sweep file without groups
    description: str
    settings: dict[str, Any]  # `set`
    zip: dict[str, list]
    axes: dict[str, list]


@dataclasses.dataclass(frozen=True)
class Run:
    name: str  # also the folder under the sweep's output_dir
    group: str
    settings: dict[str, Any]  # every dotted setting over the base: set, zip row, axes
    varied: dict[str, Any]  # the zip and axis part (what the name spells)
    config: RunConfig  # resolved; config.output_dir is the run's folder


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    description: str
    source: str
    base: dict[str, Any]  # the training config every run starts from (nested, overrides applied)
    output_dir: str
    results_path: str
    groups: tuple[Group, ...]
    runs: tuple[Run, ...]
    plots: tuple[dict, ...]
    report: dict[str, Any]

    def run(self, name: str) -> Run:
        for r in self.runs:
            if r.name == name:
                return r
        raise SweepError(f"no run {name!r} in sweep {self.name!r}{_close(name, [r.name for r in self.runs])}")

    def select(self, only: list[str] | tuple[str, ...] = ()) -> list[Run]:
        """The runs named by `only` (run names, group names or shell-style patterns); all when empty."""
        if not only:
            return list(self.runs)
        chosen = []
        for pattern in only:
            hits = [r for r in self.runs if r.group == pattern or fnmatch.fnmatchcase(r.name, pattern)]
            if not hits:
                names = [r.name for r in self.runs] + sorted({r.group for r in self.runs if r.group})
                raise SweepError(f"--only {pattern!r} matches no run of sweep {self.name!r}{_close(pattern, names)}")
            chosen.extend(h for h in hits if h not in chosen)
        return [r for r in self.runs if r in chosen]


def _close(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.5)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _check_keys(mapping: Mapping, allowed: tuple[str, ...], where: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise ConfigError(f"unknown key {key!r} {where}{_close(str(key), list(allowed))} (valid: "
                              f"{', '.join(allowed)})")


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {value!r}")
    return dict(value)


def _deep_merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def value_label(value: Any) -> str:
    """A setting's value as it appears in a run name: YAML-like, filesystem-safe."""
    if value is None or isinstance(value, bool):
        text = json.dumps(value)
    elif isinstance(value, float):
        text = repr(value)
    elif isinstance(value, (int, str)):
        text = str(value)
    else:
        text = json.dumps(value, separators=(",", ":"), sort_keys=True)
    return re.sub(r"[^A-Za-z0-9._+-]", "-", text) or "-"


def short_keys(keys: list[str], universe: list[str] = ()) -> dict[str, str]:
    """Each dotted key's shortest suffix (whole components) that no other key of `keys` or
    `universe` ends with: `data.epochs` -> `epochs`, but `model.dropout.attention` ->
    `dropout.attention` (there is a `train.attention`) and `data.seed` -> `data.seed`."""
    others_of = set(keys) | set(universe)
    out = {}
    for key in keys:
        parts = key.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(other != key and (other == suffix or other.endswith("." + suffix)) for other in others_of):
                out[key] = suffix
                break
        else:
            out[key] = key
    return out


def _check_setting_key(key: Any, where: str) -> str:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{where}: keys must be dotted config keys, got {key!r}")
    if key in RUNNER_KEYS:
        raise ConfigError(f"{key!r} {where}: the runner sets it (each run's folder under the sweep's output_dir)")
    check_dotted_key(RunConfig, key, where)
    return key


def _no_section_value(key: str, values: list, where: str) -> None:
    """A mapping given for a section (`set: {data: {epochs: 2}}`) replaced the whole section:
    the base file's other settings of it (corpus, vocabulary, budget) were silently dropped."""
    subkeys = [k for k in dotted_keys(RunConfig) if k.startswith(key + ".")]
    if subkeys and any(isinstance(v, Mapping) for v in values):
        raise ConfigError(f"{key!r} {where} is given a whole section, which would drop the base config's other "
                          f"{key}.* settings: set its keys one by one, e.g. {subkeys[0]!r}")


def _axes(raw: Any, where: str) -> dict[str, list]:
    axes = {}
    for key, values in _mapping(raw, where).items():
        key = _check_setting_key(key, f"in {where}")
        if not isinstance(values, list):
            raise ConfigError(f"axis {key!r} in {where} must be a list of values, got {values!r}")
        if not values:
            raise ConfigError(f"axis {key!r} in {where} is empty: give it at least one value")
        _no_section_value(key, values, f"in {where}")
        axes[key] = values
    return axes


def _parse_group(name: str, raw: Any, top_zip: dict, top_axes: dict) -> Group:
    where = f"group {name!r}" if name else "the sweep"
    spec = _mapping(raw, where)
    _check_keys(spec, GROUP_KEYS, f"in {where}")
    settings = {_check_setting_key(k, f"in {where} set"): v for k, v in _mapping(spec.get("set"), f"{where} set").items()}
    for key, value in settings.items():
        _no_section_value(key, [value], f"in {where} set")
    own = {"zip": _axes(spec.get("zip"), f"{where} zip"), "axes": _axes(spec.get("axes"), f"{where} axes")} \
        if name else {"zip": {}, "axes": {}}
    for part, keys in own.items():  # the sweep's zip and axes apply to every group: not replaced by one
        for key in keys:
            if key in top_zip or key in top_axes:
                raise ConfigError(f"{key!r} is given twice: in the sweep's {'zip' if key in top_zip else 'axes'} "
                                  f"(every group's) and in {where} {part}")
    zipped = {**top_zip, **own["zip"]}
    axes = {**top_axes, **own["axes"]}
    seen: dict[str, str] = {}
    for part, keys in (("set", settings), ("zip", zipped), ("axes", axes)):
        for key in keys:
            if key in seen:
                raise ConfigError(f"{key!r} is given twice in {where} ({seen[key]} and {part})")
            seen[key] = part
    lengths = {len(v) for v in zipped.values()}
    if len(lengths) > 1:
        raise ConfigError(f"the zip lists of {where} differ in length ({', '.join(f'{k}: {len(v)}' for k, v in zipped.items())})")
    return Group(name, _text(spec.get("description"), f"{where} description"), settings, zipped, axes)


def _text(value: Any, what: str) -> str:
    """An optional string field of the sweep file ('' when absent)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a string, got {value!r}")
    return value


def _expand(group: Group) -> list[dict[str, Any]]:
    rows = [dict(zip(group.zip, row)) for row in zip(*group.zip.values())] if group.zip else [{}]
    combos = [dict(zip(group.axes, c)) for c in itertools.product(*group.axes.values())] if group.axes else [{}]
    return [{**row, **combo} for row in rows for combo in combos]


def _parse_plots(raw: Any, groups: list[str]) -> tuple[dict, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"plots must be a list of plot specs, got {raw!r}")
    plots = []
    for i, spec in enumerate(raw):
        spec = _mapping(spec, f"plots[{i}]")
        _check_keys(spec, PLOT_KEYS, f"in plots[{i}]")
        name = spec.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"plots[{i}].name must be a file-name-safe string, got {name!r}")
        kind = spec.setdefault("kind", "final")
        if kind not in PLOT_KINDS:
            raise ConfigError(f"plots[{i}].kind must be one of {', '.join(PLOT_KINDS)}, got {kind!r}")
        for field in ("x", "y", "title"):
            if spec.get(field) is not None and not isinstance(spec[field], str):
                raise ConfigError(f"plots[{i}].{field} must be a string, got {spec[field]!r}")
        lines = spec.get("lines")
        lines = [lines] if isinstance(lines, str) else lines or []
        if not isinstance(lines, list) or not all(isinstance(k, str) for k in lines):
            raise ConfigError(f"plots[{i}].lines must be a config key or a list of them, got {spec.get('lines')!r}")
        if not isinstance(spec.get("groups") or [], list):
            raise ConfigError(f"plots[{i}].groups must be a list of group names, got {spec['groups']!r}")
        for field in ("logx", "logy"):
            base = spec.get(field)
            if not (base is None or isinstance(base, bool) or (isinstance(base, (int, float)) and base > 1)):
                raise ConfigError(f"plots[{i}].{field} must be true (base 2) or a log base > 1, got {base!r}")
        if kind == "curves":  # a curve of the run's log against its steps or tokens
            if spec.get("y") is not None and spec["y"] not in CURVE_KEYS:
                raise ConfigError(f"plots[{i}].y (kind curves) must be one of {', '.join(CURVE_KEYS)}, got "
                                  f"{spec['y']!r}")
            if spec.get("x") not in (None, "tokens", "step"):
                raise ConfigError(f"plots[{i}].x (kind curves) must be tokens or step, got {spec['x']!r}")
        keys = ([] if kind == "curves" else [(axis, spec.get(axis)) for axis in ("x", "y")]) + [
            ("lines", k) for k in lines] + [("where", k) for k in _mapping(spec.get("where"), f"plots[{i}].where")]
        for axis, key in keys:
            if key is not None and key not in METRICS:
                where = f"in plots[{i}].{axis} (nor is it one of {', '.join(METRICS)})"
                check_dotted_key(RunConfig, key, where)
                if any(k.startswith(key + ".") for k in dotted_keys(RunConfig)):
                    raise ConfigError(f"{key!r} {where} is a config section; name one of its settings")
        if kind == "final" and not spec.get("x"):
            raise ConfigError(f"plots[{i}] (kind final) needs x: a config key or a figure")
        for g in spec.get("groups") or []:
            if g not in groups:
                raise ConfigError(f"plots[{i}].groups: no group {g!r}{_close(str(g), groups)}")
        plots.append(spec)
    names = [p["name"] for p in plots]
    if len(set(names)) != len(names):
        raise ConfigError(f"plots: two plots are named {next(n for n in names if names.count(n) > 1)!r}")
    return tuple(plots)


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = (), results: str | None = None) -> Sweep:
    """Parse, check and expand a sweep file. `overrides` (`key=value`, as for the trainer)
    apply to the base config, e.g. `output_dir=gs://bucket/sweeps/x data.cache_dir=/tmp/c`."""
    raw = load_yaml(path)
    _check_keys(raw, SWEEP_KEYS, f"in sweep file {path}")
    name = raw.get("name", Path(path).stem)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{path}: name must be a file-name-safe string, got {name!r}")
    base: dict[str, Any] = {}
    if raw.get("base") is not None:
        # relative to the sweep file only: a fallback to the working directory loaded whatever
        # file of that name was there when the one beside the sweep was missing
        base_path = Path(path).parent / Path(str(raw["base"])).expanduser()
        if not base_path.is_file():
            raise ConfigError(f"{path}: base {str(raw['base'])!r} is not a file (a base is read relative to the "
                              f"sweep file: {base_path})")
        base = load_yaml(base_path)
    base = with_overrides(_deep_merge(base, _mapping(raw.get("config"), f"{path}: config")), overrides)
    base_cfg = from_dict(RunConfig, base)  # the base alone must be a valid training config
    if "output_dir" not in base:
        raise ConfigError(f"{path}: set config.output_dir (the folder the sweep's runs go in)")
    output_dir = base_cfg.output_dir.rstrip("/")

    top_zip = _axes(raw.get("zip"), "the sweep's zip")
    top_axes = _axes(raw.get("axes"), "the sweep's axes")
    raw_groups = _mapping(raw.get("groups"), f"{path}: groups")
    for g in raw_groups:
        if not isinstance(g, str) or not _NAME.match(g):
            raise ConfigError(f"group name {g!r} must be a file-name-safe string (letters, digits, . _ -)")
    groups = ([_parse_group(g, spec, top_zip, top_axes) for g, spec in raw_groups.items()] if raw_groups
              else [_parse_group("", {}, top_zip, top_axes)])

    for override in overrides:  # the runs' own settings come after the base: such an override would do nothing
        key = str(override).split("=", 1)[0].strip()
        for g in groups:  # the same key, a setting inside a section a run sets, or a section holding one
            clash = next(((p, k) for p, keys in (("set", g.settings), ("zip", g.zip), ("axes", g.axes)) for k in keys
                          if k == key or key.startswith(k + ".") or k.startswith(key + ".")), None)
            if clash is not None:
                part, k = clash
                where = f"group {g.name!r}'s {part}" if g.name else f"the sweep's {part}"
                raise ConfigError(f"override {override!r}: {k} is set by {where}, which wins over the base config; "
                                  f"change it in the sweep file (or pick runs with --only)")
    expanded = [(g, settings) for g in groups for settings in _expand(g)]
    varied_keys = list(dict.fromkeys(k for g in groups for k in [*g.zip, *g.axes]))
    short = short_keys(varied_keys, dotted_keys(RunConfig))
    runs, where_from = [], {}
    for group, varied in expanded:
        label = ",".join(f"{short[k]}={value_label(v)}" for k, v in varied.items())
        run_name = "/".join(p for p in (group.name, label) if p) or "base"
        if run_name in where_from:
            raise ConfigError(f"duplicate run name {run_name!r} in sweep {name!r} (from {where_from[run_name]} and "
                              f"{varied or group.settings}): make the values differ")
        where_from[run_name] = varied or group.settings
        settings = {**group.settings, **varied}
        data = with_overrides(base, settings={**settings, "output_dir": join(output_dir, run_name)})
        try:
            config = from_dict(RunConfig, data)
        except ConfigError as e:
            raise ConfigError(f"run {run_name!r}: {e}") from None
        runs.append(Run(run_name, group.name, settings, varied, config))

    group_names = [g.name for g in groups if g.name]
    report = _mapping(raw.get("report"), "report")
    _check_keys(report, REPORT_KEYS, "in report")
    fit_groups = report.get("scaling_fit")
    if isinstance(fit_groups, list):  # true, or the groups whose runs are the fit's points
        unknown = [g for g in fit_groups if g not in group_names]
        if unknown or not fit_groups:
            raise ConfigError(f"report.scaling_fit must be true or a list of this sweep's groups "
                              f"({', '.join(group_names) or 'it has none'}), got {fit_groups!r}")
    elif fit_groups is not None and not isinstance(fit_groups, bool):
        raise ConfigError(f"report.scaling_fit must be true or a list of group names, got {fit_groups!r}")
    results_path = results or _text(raw.get("results"), "results") or "results.json"
    if not results and not (results_path.startswith("/") or "://" in results_path):
        results_path = join(output_dir, results_path)  # relative to the runs: follows output_dir overrides
    from jaxaccel.files import unsupported_location

    if problem := unsupported_location(results_path):  # pathlib would write a local "s3:" or "gs:" folder
        raise ConfigError(f"results {problem}")
    sweep = Sweep(name=name, description=_text(raw.get("description"), "description").strip(), source=str(path), base=base,
                  output_dir=output_dir, results_path=results_path,
                  groups=tuple(groups), runs=tuple(runs), plots=_parse_plots(raw.get("plots"), group_names),
                  report=report)
    for role in ("reference", "baseline"):
        if report.get(role) is not None:
            resolve_one(sweep.runs, report[role], f"report.{role}")
    return sweep


def resolve_one(runs, name: str, where: str):
    """The run `name` names: a run name, or a group with exactly one run."""
    hits = [r for r in runs if _get(r, "name") == name] or [r for r in runs if _get(r, "group") == name]
    if len(hits) != 1:
        names = [_get(r, "name") for r in runs]
        what = "no run" if not hits else f"{len(hits)} runs"
        raise ConfigError(f"{where}: {name!r} names {what} (give one run's name){_close(str(name), names)}")
    return hits[0]


def _get(run, key: str):
    return run[key] if isinstance(run, dict) else getattr(run, key)
