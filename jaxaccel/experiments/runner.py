"""Run a sweep: skip finished runs, resume killed ones, train the rest, keep the results file
current after every run.

A run's folder is the trainer's output folder. Its state is read from what the trainer and
this runner leave there: `sweep_result.json` (finished; written last), else `config.yaml`
(started: the trainer resumes from its latest checkpoint, reproducing the uninterrupted
curve), else nothing (new). A folder whose config differs from the run's planned config
(ignoring `IGNORED_KEYS`, which do not change what is trained) belongs to another run: the
sweep stops before training anything rather than resume or overwrite it.

Before any training every run's budget is checked against its corpus (unique tokens at most
the training split; train.steps within the budget), so a sweep does not fail hours in.

On a pod every host runs the same sweep command (`--distributed`): each run is one
multi-host training; process 0 decides which runs are finished and writes the files.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import sys
import time
from typing import Any, Callable

import yaml

from jaxaccel.config import flatten, flatten_stored, to_dict
from jaxaccel.errors import ConfigError, first_line
from jaxaccel.experiments.results import (FINISHED, FORMAT, RESULT_FILE, VERSION, SweepError, as_path,
                                          check_results_target, figures, join, read_json, read_metrics,
                                          write_json)
from jaxaccel.experiments.spec import Run, Sweep
from jaxaccel.train.config import RunConfig

RUN_CONFIG = "config.yaml"  # the trainer's copy of the resolved config (jaxaccel.model.checkpoint.RUN_CONFIG)
# Keys that may differ between a run folder and the plan without it being another run:
# display, logging, where the data cache lives, how and how often it checkpoints, the mesh
# (checkpoints restore onto any mesh), recomputation and the attention implementation (float
# rounding at most: the trainer resumes across them, `train.loop.RESUME_MAY_CHANGE`), and the
# folder itself (a sweep may be moved). Not the length or the evaluation: they change the
# recorded figures.
IGNORED_KEYS = ("output_dir", "tensorboard", "train.progress", "train.peak_flops", "train.log_every",
                "checkpoint", "train.remat", "train.attention", "data.cache_dir", "mesh")
ASSUMED_MFU = 0.3  # of the measured matmul peak, for the time estimate when no --flops-per-s is given
STARTUP_S = 15.0  # per run started: compilation, first checkpoint, export (CPU, small models)


@dataclasses.dataclass
class RunState:
    status: str  # "done" | "diverged" (finished) | "partial" (has a config, maybe checkpoints) | "new"
    checkpoint_step: int = 0
    record: dict | None = None


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in IGNORED_KEYS)


def config_differences(stored: dict, planned: dict) -> list[tuple[str, Any, Any]]:
    """(key, stored value, planned value) for every setting that makes them different runs.
    A key the stored config lacks (a setting added to jaxaccel after that run was written)
    differs only if the plan gives it a value other than its default: a run folder from an
    older version still resumes."""
    a = flatten_stored(stored)  # an MoE run from before moe.priority reads as rank: it is that run only for rank
    b = flatten(json.loads(json.dumps(planned)))
    defaults = flatten(json.loads(json.dumps(to_dict(RunConfig()))))
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if not _ignored(k) and a.get(k) != b.get(k) and not (k not in a and k in defaults and b.get(k) == defaults[k])]


def _difference(run: Run, stored: dict) -> str | None:
    """How a stored run config differs from `run`'s, as an error shows it (None: the same run)."""
    diff = config_differences(stored, to_dict(run.config))
    if not diff:
        return None
    key, have, want = diff[0]
    return f"{key} is {have!r} there, {want!r} in this sweep" + (f" and {len(diff) - 1} more" if len(diff) > 1 else "")


def _check_same_run(run: Run, stored: Any, where: str) -> None:
    if not isinstance(stored, dict):
        raise SweepError(f"run {run.name!r}: {where} is not a jaxaccel run config; move the folder away")
    if differs := _difference(run, stored):
        raise SweepError(f"run {run.name!r}: {where} belongs to a different run ({differs}); move it away or give "
                         f"the sweep another output_dir — nothing was changed")


def checkpoint_steps(folder: str) -> list[int]:
    """Committed checkpoint steps of a run folder (Orbax renames a step's folder to its number
    only once the save is complete)."""
    ckpt = as_path(join(folder, "checkpoints"))
    if not ckpt.exists():
        return []
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())


def inspect_run(run: Run) -> RunState:
    folder = run.config.output_dir
    result = as_path(join(folder, RESULT_FILE))
    if result.exists():
        record = read_json(result)
        _check_same_run(run, record.get("config") if isinstance(record, dict) else None, str(result))
        return RunState(record["status"], record.get("steps") or 0, record)
    config = as_path(join(folder, RUN_CONFIG))
    if config.exists():
        _check_same_run(run, yaml.safe_load(config.read_text(encoding="utf-8")), str(config))
        steps = checkpoint_steps(folder)
        return RunState("partial", steps[-1] if steps else 0)
    if checkpoint_steps(folder) or any(as_path(join(folder, f)).exists() for f in ("metrics.jsonl", "model")):
        raise SweepError(f"run {run.name!r}: {folder} holds training files but no {RUN_CONFIG}: not a run of this "
                         f"sweep; move it away — nothing was changed")
    return RunState("new")


# ----------------------------------------------------------------------------- budgets and cost


def corpus_batch_size(cfg: RunConfig) -> int:
    """Corpus rows per global batch: train.batch_size less the rows that data.retrieval's
    synthetic tasks take from every batch (they read nothing of the budget)."""
    if not cfg.data.retrieval.enabled:
        return cfg.train.batch_size
    from jaxaccel.data.longctx import task_rows_per_batch

    return cfg.train.batch_size - task_rows_per_batch(cfg.data.retrieval, cfg.train.batch_size)


def _data_key(d) -> tuple:
    return (d.corpus, d.text_field, d.cache_dir, d.vocab_size, d.num_sentinels, d.vocab_max_chars,
            d.validation_fraction)


def check_same_corpora(runs: list[Run], states: dict, results_path: str | None = None) -> None:
    """Refuse to train beside finished runs whose corpus has changed since (a file edited,
    `corpus: stdlib` under another Python): their losses were measured with another
    vocabulary and validation set, and one results file and report would mix them without a
    word. Compared by the manifest sha256 each record keeps."""
    from jaxaccel.data.corpus import open_corpus

    current: dict[tuple, str | None] = {}
    for run in runs:
        state = states.get(run.name)
        d = run.config.data
        record = (state.record or {}) if state is not None and state.status in FINISHED else {}
        had = (record.get("data") or {}).get("manifest_sha256") if isinstance(record.get("data"), dict) else None
        if d.corpus == "synthetic" or not isinstance(had, str):
            continue
        key = (d.corpus, d.text_field)
        if key not in current:
            current[key] = None if d.corpus.strip().startswith("tfds:") else open_corpus(d.corpus, d.text_field).sha256
        now = current[key]
        if now is not None and now != had:
            # a run whose folder is gone is kept from the results file (recorded_elsewhere)
            away = ("remove its record from the results file" + (f" {results_path}" if results_path else "")
                    if not as_path(run.config.output_dir).exists() else "move the run's folder away")
            raise SweepError(f"run {run.name!r} was trained on another version of corpus {d.corpus!r} (manifest "
                             f"{had[:12]}, now {now[:12]}): its results would not compare with the runs still to "
                             f"train; restore that corpus, or {away} to retrain it — nothing was changed")


def plan_steps(runs: list[Run], *, build: bool,
               stream_tokens: dict[str, int | None] | None = None) -> tuple[dict[str, int | None], list[str]]:
    """Training steps of each run, checking its budget against the corpus first, and the
    corpora that could not be checked. build=False (dry run): corpora not tokenized yet are
    not built; their runs' budgets are unchecked and their steps may be unknown. A dict
    `stream_tokens` receives the corpus tokens each run will read (None where unknown): not
    steps x batch x seq_len, which counts UL2's task tokens and retrieval rows as corpus."""
    from jaxaccel.data import budget, corpus_token_count
    from jaxaccel.data.pipeline import check_retrieval_fits, check_vocab_fits, corpus_facts, tokens_read

    stream_tokens = {} if stream_tokens is None else stream_tokens

    earlier: set[str] = set()  # the output folders of the runs before this one (an init_from may name one)
    counts: dict[tuple, int | None] = {}
    vocab_sizes: dict[tuple, int] = {}  # built corpora only
    fits: set[tuple] = set()  # (corpus, retrieval, seq_len) checked: once per corpus, not per run
    steps: dict[str, int | None] = {}
    unchecked: list[str] = []
    for run in runs:
        cfg = run.config
        d = cfg.data
        if build:
            _check_run_starts(run, earlier)
        earlier.add(_local_path(cfg.output_dir))
        if d.corpus == "synthetic":
            from jaxaccel.train.synthetic import synthetic_budget

            try:
                _, budget_steps = synthetic_budget(d.unique_tokens, d.epochs, cfg.train.batch_size, cfg.train.seq_len,
                                                   cfg.train.steps)
            except ConfigError as e:
                raise ConfigError(f"run {run.name!r}: {e}") from None
            if cfg.train.steps is not None and cfg.train.steps > budget_steps:
                raise SweepError(f"run {run.name!r}: train.steps={cfg.train.steps} is more than its data budget of "
                                 f"{budget_steps} steps ({d.unique_tokens} unique tokens x {d.epochs} epochs)")
            steps[run.name] = cfg.train.steps or budget_steps
            stream_tokens[run.name] = steps[run.name] * cfg.train.batch_size * cfg.train.seq_len
            continue
        key = _data_key(d)
        try:
            if key not in counts and build:
                counts[key], vocab_sizes[key] = corpus_facts(d)
            elif key not in counts:
                counts[key] = corpus_token_count(d, build=False)
            if key in vocab_sizes:
                check_vocab_fits(vocab_sizes[key], cfg.model.vocab_size)
        except ConfigError as e:
            raise ConfigError(f"run {run.name!r}: {e}") from None
        corpus = counts[key]
        if corpus is None and d.corpus not in unchecked:
            unchecked.append(d.corpus)
        if corpus is not None and d.unique_tokens is not None and d.unique_tokens > corpus:
            raise SweepError(f"run {run.name!r}: data.unique_tokens={d.unique_tokens} is more than the {corpus} tokens "
                             f"of corpus {d.corpus!r}'s training split: the budget cannot be met")
        unique = d.unique_tokens if d.unique_tokens is not None else corpus
        budget_steps = None
        try:  # e.g. a seq_len the data cannot cut rows of, or retrieval tasks cannot fit: fail before any run trains
            if (key, d.retrieval, cfg.train.seq_len) not in fits:
                check_retrieval_fits(d, cfg.train.seq_len, build=build)
                fits.add((key, d.retrieval, cfg.train.seq_len))
            if unique is not None:
                budget_steps = budget(d, unique, seq_len=cfg.train.seq_len,
                                      batch_size=corpus_batch_size(cfg))["total_steps"]
        except ConfigError as e:
            raise ConfigError(f"run {run.name!r}: {e}") from None
        if cfg.train.steps is not None and budget_steps is not None and cfg.train.steps > budget_steps:
            raise SweepError(f"run {run.name!r}: train.steps={cfg.train.steps} is more than its data budget of "
                             f"{budget_steps} steps ({unique} unique tokens x {d.epochs} epochs)")
        steps[run.name] = cfg.train.steps or budget_steps
        stream_tokens[run.name] = None if unique is None else tokens_read(
            d, unique, seq_len=cfg.train.seq_len, batch_size=corpus_batch_size(cfg), steps=cfg.train.steps)[0]
    return steps, unchecked


def _local_path(path: str) -> str:
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def _check_run_starts(run: Run, earlier: set[str]) -> None:
    """What `train()` refuses before it trains, checked for every run before the first one
    trains: the mesh on this machine's devices, and a train.init_from that names nothing
    (unless it is the folder of a run before it in the sweep, or one inside it)."""
    from jaxaccel.train.loop import build_mesh, check_init_from

    init_from = run.config.train.init_from
    try:
        build_mesh(run.config)
        source = None if init_from is None else _local_path(init_from)
        if source is not None and not any(source == o or source.startswith(o.rstrip("/") + "/") for o in earlier):
            check_init_from(init_from, run.config.output_dir)
    except ConfigError as e:
        raise ConfigError(f"run {run.name!r}: {e}") from None


def run_flops(run: Run, steps: int, start: int = 0) -> float:
    """Training FLOPs of steps `start` to `steps` (6N + attention per token, `train.metrics`)
    plus their evaluations (a forward: a third of that per token): one every eval_every steps
    and one at the last step (once where they coincide; a resumed run's make-up one aside)."""
    from jaxaccel.train.metrics import flops_per_token

    cfg = run.config
    per_token = flops_per_token(cfg.model, cfg.train.seq_len)
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    every = cfg.train.eval_every
    evals = (steps // every - start // every + (steps % every != 0) if every else 1) if steps > start else 0
    eval_tokens = cfg.data.max_eval_tokens
    if cfg.train.eval_batches is not None:
        eval_tokens = min(eval_tokens, cfg.train.eval_batches * tokens_per_step)
    return per_token * tokens_per_step * max(steps - start, 0) + evals * eval_tokens * per_token / 3


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _flops(value: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} FLOP"


def default_rate(dtype: str = "float32") -> tuple[float, str]:
    """The sweep's assumed training rate: ASSUMED_MFU of the measured matmul peak of every
    device (a run's mesh takes them all), as the trainer's MFU measures it."""
    import jax

    from jaxaccel.train.metrics import devices_peak_flops

    devices = 1 if jax.default_backend() == "cpu" else jax.device_count()
    peak = devices_peak_flops(devices, dtype)
    each = f", {devices} devices" if devices > 1 else ""
    return peak * ASSUMED_MFU, f"{ASSUMED_MFU:.0%} of this machine's measured matmul peak, {_flops(peak)}/s{each}"


# ----------------------------------------------------------------------------- the sweep


def check_flops_per_s(flops_per_s: float | None) -> None:
    """--flops-per-s, when given, must be a finite positive rate (it divides the plan's FLOPs)."""
    if flops_per_s is None:
        return
    try:
        ok = not isinstance(flops_per_s, bool) and math.isfinite(flops_per_s) and flops_per_s > 0
    except TypeError:
        ok = False
    if not ok:
        raise ConfigError(f"--flops-per-s must be a finite number > 0 (sustained training FLOP/s), got {flops_per_s}")


def check_distinct_runs(sweep: Sweep) -> None:
    """Two runs of one sweep must train different things. Their names come from the values as
    written (`1e-3` and `0.001` make two names); their configs hold the parsed values, so two
    runs whose configs agree in everything but their folder are one run written twice."""
    seen: dict[str, str] = {}
    for run in sweep.runs:
        planned = to_dict(run.config)
        planned.pop("output_dir", None)
        key = json.dumps(planned, sort_keys=True, default=repr)
        if key in seen:
            raise ConfigError(f"runs {seen[key]!r} and {run.name!r} of sweep {sweep.name!r} have the same config "
                              f"(settings {run.settings}): the values are equal once parsed; make them differ")
        seen[key] = run.name


def _record(run: Run, sweep: Sweep, state: RunState) -> dict:
    """The results entry of a run that has not finished: its plan and where it stands."""
    return {"name": run.name, "group": run.group, "settings": run.settings, "folder": run.config.output_dir,
            "status": state.status, "checkpoint_step": state.checkpoint_step, "config": to_dict(run.config)}


def _tokens_trained(run: Run, stats: dict, steps: int | None) -> tuple[Any, Any, Any]:
    """(total tokens, unique tokens, epochs) the run trained on. The data stats describe the whole
    budget; a run that train.steps stops before the budget's last step read less, and one
    stopped within its first epoch (by train.steps, or by data.epochs < 1) fewer distinct
    tokens than the budget's: count what its batches held (a scaling fit given the budget
    would credit the run with data it never saw)."""
    cfg = run.config
    total, unique, epochs = stats.get("total_tokens"), stats.get("unique_tokens"), stats.get("epochs", cfg.data.epochs)
    budget_steps = stats.get("total_steps")
    if cfg.data.corpus == "synthetic" or not isinstance(unique, int):
        return total, unique, epochs
    stopped = isinstance(steps, int) and isinstance(budget_steps, int) and steps < budget_steps
    within_first_epoch = isinstance(total, (int, float)) and total < unique
    if not (stopped or within_first_epoch):
        return total, unique, epochs
    from jaxaccel.data.pipeline import tokens_read

    total, unique = tokens_read(cfg.data, unique, seq_len=cfg.train.seq_len, batch_size=corpus_batch_size(cfg),
                                steps=steps if stopped else None)
    return total, unique, (total / unique if unique else 0.0)


def _stream_tokens_per_step(run: Run, stats: dict) -> float | None:
    """Stream tokens one step reads (a curve's x in tokens): the data stats' total over their
    steps, or — a diverged run has no stats — a row's stream tokens (shorter under UL2) times
    the corpus rows of a batch (retrieval task rows read none). None when it cannot be told."""
    total, steps = stats.get("total_tokens"), stats.get("total_steps")
    if isinstance(total, (int, float)) and isinstance(steps, int) and steps > 0:
        return total / steps
    cfg = run.config
    if cfg.data.corpus == "synthetic":
        return None
    try:
        from jaxaccel.data import budget, corpus_token_count

        unique = cfg.data.unique_tokens
        unique = unique if unique is not None else corpus_token_count(cfg.data, build=False)
        if unique is None:
            return None
        row = budget(cfg.data, unique, seq_len=cfg.train.seq_len, batch_size=corpus_batch_size(cfg))
        return float(row["raw_sequence_length"] * corpus_batch_size(cfg))
    except Exception:  # noqa: BLE001 - a figure for the plots only: never fails the record
        return None


def _evaluated(metrics: list[dict]) -> list[dict]:
    """The metrics records less evaluations that scored no token (no validation split, or
    data.max_eval_tokens 0): older trainers (before 901401a) logged those as loss 0.0, no
    figure at all (today's log no record), and their run folders are still read."""
    return [m for m in metrics if not ("eval_loss" in m and m.get("eval_tokens") == 0)]


def finished_record(run: Run, summary: dict | None, status: str, error: str | None, wall_s: float,
                    resumed_from: int) -> dict:
    cfg = run.config
    stats = (summary or {}).get("data") or {}
    total_tokens, unique_tokens, epochs = _tokens_trained(run, stats, (summary or {}).get("steps"))
    record = {"name": run.name, "group": run.group, "settings": run.settings, "folder": cfg.output_dir,
              "status": status, "error": error, "config": to_dict(cfg),
              "steps": (summary or {}).get("steps"), "resumed_from": resumed_from, "wall_s": round(wall_s, 3),
              "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "tokens_per_step": cfg.train.batch_size * cfg.train.seq_len,
              "stream_tokens_per_step": _stream_tokens_per_step(run, stats),
              "total_tokens": total_tokens, "unique_tokens": unique_tokens,
              "epochs": epochs, "corpus_tokens": stats.get("corpus_tokens"),
              "params": cfg.model.num_params(), "active_params": cfg.model.active_params(),
              **figures(_evaluated(read_metrics(cfg.output_dir))),
              "data": {k: v for k, v in stats.items() if isinstance(v, (int, float, str)) or v is None}}
    if record["steps"] is not None:
        record["train_flops"] = run_flops(run, record["steps"])
    return record


def recorded_elsewhere(sweep: Sweep, states: dict[str, RunState]) -> dict[str, RunState]:
    """Runs with no folder (pruned or moved away once finished: plots and reports need only
    the results file) whose finished record the results file still holds, for the same
    config: they stay finished, record and all, instead of being written over as "new" (and
    are not trained again; remove the record, or the file, to retrain one). A finished record
    whose run the sweep file has changed since is refused (SweepError), as a folder of another
    run is: training the new run would write over the only record of the old one."""
    from jaxaccel.experiments.results import read_results

    if not as_path(sweep.results_path).exists():
        return {}
    records = {r.get("name"): r for r in read_results(sweep.results_path).get("runs", [])}
    kept = {}
    for run in sweep.runs:
        record = records.get(run.name)
        if states[run.name].status != "new" or not isinstance(record, dict) or record.get("status") not in FINISHED:
            continue
        stored = record.get("config")
        differs = _difference(run, stored) if isinstance(stored, dict) else "its record holds no run config"
        if differs:
            raise SweepError(f"run {run.name!r}: {sweep.results_path} holds the only record of a finished run of "
                             f"another config ({differs}), whose folder is gone; remove that record to train the new "
                             f"run, or give the sweep another results file — nothing was changed")
        kept[run.name] = RunState(record["status"], record.get("steps") or 0, record)
    return kept


def results_document(sweep: Sweep, states: dict[str, RunState], command: str | None = None) -> dict:
    return {"format": FORMAT, "version": VERSION, "sweep": sweep.name, "description": sweep.description,
            "source": sweep.source, "output_dir": sweep.output_dir,
            "command": command or f"python -m jaxaccel.experiments sweep {sweep.source}",
            "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "groups": [{"name": g.name, "description": g.description, "set": g.settings, "zip": g.zip, "axes": g.axes}
                       for g in sweep.groups],
            "plots": list(sweep.plots), "report": sweep.report,
            "runs": [states[r.name].record if states[r.name].status in FINISHED else _record(r, sweep, states[r.name])
                     for r in sweep.runs]}


def _agree(states: dict[str, RunState], runs: list[Run]) -> None:
    """Multi-host: every process takes process 0's view of which runs are finished."""
    import jax

    if jax.process_count() == 1:
        return
    import numpy as np
    from jax.experimental import multihost_utils

    flags = np.array([states[r.name].status in FINISHED for r in runs], np.int32)
    agreed = np.asarray(multihost_utils.broadcast_one_to_all(flags))
    for run, finished in zip(runs, agreed):
        if bool(finished) != (states[run.name].status in FINISHED):
            states[run.name] = RunState("done" if finished else "partial")


def run_sweep(sweep: Sweep, only: list[str] | tuple[str, ...] = (), *, dry_run: bool = False, collect: bool = False,
              flops_per_s: float | None = None, log: Callable[[str], None] | None = None,
              out: Callable[[str], None] | None = None, command: str | None = None) -> dict | None:
    """Train the selected runs that are not finished (all of them by default) and write the
    results file; `dry_run` prints the plan and its estimated cost instead; `collect` only
    rebuilds the results file from the run folders. `command` (the command line) is kept in
    the results. Returns the results document."""
    check_flops_per_s(flops_per_s)  # bad input before any work
    check_distinct_runs(sweep)
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = out or (lambda msg: print(msg, flush=True))
    selected = sweep.select(only)
    unreadable: list[str] = []

    def readable(what: str, fn, fallback):
        """Storage errors (an unreachable bucket) are one line; a dry run reports and goes on."""
        try:
            return fn()
        except SweepError:
            raise
        except Exception as e:  # noqa: BLE001 - gcsfs/tensorflow/OS errors of many types
            reason = first_line(e, 160)
            if not dry_run:
                raise SweepError(f"cannot read {what}: {reason}") from None
            unreadable.append(f"{what}: {reason}")
            return fallback

    readable(sweep.results_path, lambda: check_results_target(sweep.results_path, sweep.name), None)
    states = {run.name: readable(run.config.output_dir, lambda run=run: inspect_run(run), RunState("unknown"))
              for run in sweep.runs}
    states.update(readable(sweep.results_path, lambda: recorded_elsewhere(sweep, states), {}))
    stream_tokens: dict[str, int | None] = {}
    steps, unchecked = plan_steps(list(sweep.runs), build=not (dry_run or collect), stream_tokens=stream_tokens)
    if dry_run:
        _print_plan(sweep, selected, states, steps, stream_tokens, flops_per_s, out)
        if unchecked:
            out(f"not tokenized yet, so budgets against it unchecked: {', '.join(unchecked)} (the sweep checks them "
                f"before training)")
        if unreadable:
            out(f"could not read {len(unreadable)} location(s), status unknown; first: {unreadable[0]}")
        return None
    from jaxaccel.train.hosts import decided_by_process_0

    def write_results(finished: Run | None = None) -> dict:
        """Process 0 writes the record of the run just `finished` (if any) and the results file;
        first it looks at every unfinished run's folder again (another process sharing the
        folders, a second --only or a sweep that shares runs, may have finished some since; a
        folder it cannot read now keeps its state) and at the file's owner (another sweep may
        have taken the same file since: both would otherwise write it, the last one winning).
        Every process learns whether that worked (one failing alone would leave the others
        waiting in their next collective)."""
        def on_process_0() -> dict:
            if finished is not None:
                write_json(join(finished.config.output_dir, RESULT_FILE), states[finished.name].record)
            for r in sweep.runs:
                if states[r.name].status not in FINISHED:
                    try:
                        states[r.name] = inspect_run(r)
                    except Exception:  # noqa: BLE001 - a passing storage error: looked at again next time
                        pass
            readable(sweep.results_path, lambda: check_results_target(sweep.results_path, sweep.name), None)
            doc = results_document(sweep, states, command)
            try:
                write_json(sweep.results_path, doc)
            except OSError as e:
                raise SweepError(f"cannot write the results file {sweep.results_path} (`results:` in the sweep "
                                 f"file, or --results): {first_line(e, 160)}") from None
            return doc

        doc = decided_by_process_0(on_process_0, lambda: SweepError(f"process 0 could not write {sweep.results_path}"))
        return doc if doc is not None else results_document(sweep, states, command)  # None: not process 0

    if collect:
        doc = write_results()
        out(f"{sum(s.status in FINISHED for s in states.values())} of {len(states)} runs finished; results in "
            f"{sweep.results_path}")
        return doc
    # Written before any training: it claims the file for this sweep (another sweep started
    # later on the same file is refused at its start) and an unwritable path fails now, not
    # after the first run has trained.
    if any(states[r.name].status not in FINISHED for r in selected):  # new results beside the finished ones
        check_same_corpora(sweep.runs, states, sweep.results_path)
    write_results()
    _agree(states, list(sweep.runs))
    todo = [r for r in selected if states[r.name].status not in FINISHED]

    from jaxaccel.train.lock import OutputDirInUseError
    from jaxaccel.train.loop import TrainingDiverged, train

    remaining = {r.name: run_flops(r, steps[r.name] or 0, states[r.name].checkpoint_step) for r in todo}
    total_flops = sum(remaining.values())
    skipped = len(selected) - len(todo)
    log(f"sweep {sweep.name}: {len(selected)} run(s) selected, {skipped} finished already, {len(todo)} to train "
        f"(~{_flops(total_flops)}); results: {sweep.results_path}")
    started = time.perf_counter()
    flops_done = 0.0
    for i, run in enumerate(todo, 1):
        # Looked at again just before training: another sweep process sharing the run folders
        # (a second --only, a shipped sweep that shares runs) may have finished it meanwhile.
        states[run.name] = readable(run.config.output_dir, lambda run=run: inspect_run(run), states[run.name])
        _agree(states, [run])
        state = states[run.name]
        if state.status in FINISHED:
            log(f"[{i}/{len(todo)}] {run.name}: finished meanwhile by another process; kept")
            flops_done += remaining[run.name]
            continue
        where = f"resuming from step {state.checkpoint_step}" if state.checkpoint_step else "starting"
        log(f"[{i}/{len(todo)}] {run.name}: {where} ({steps[run.name] or '?'} steps)")
        t0 = time.perf_counter()
        try:
            summary = train(run.config, log=lambda msg, name=run.name: log(f"  [{name}] {msg}"))
            status, error = "done", None
        except TrainingDiverged as e:
            summary, status, error = None, "diverged", str(e)
        except OutputDirInUseError as e:
            log(f"[{i}/{len(todo)}] {run.name}: skipped, another process is training it ({e})")
            continue
        wall = time.perf_counter() - t0
        resumed_from = (summary or {}).get("resumed_from", state.checkpoint_step)  # the trainer's own word
        if summary is not None and resumed_from == summary.get("steps"):
            # Nothing left to train: another process finished the run between our look and our
            # lock, and writes its record as its lock is released. Its record (wall time, where
            # it resumed from) is the run's, not this call's.
            view = {run.name: readable(run.config.output_dir, lambda run=run: inspect_run(run), state)}
            _agree(view, [run])
            if view[run.name].status in FINISHED:
                states[run.name] = view[run.name]
                log(f"[{i}/{len(todo)}] {run.name}: finished meanwhile by another process; kept")
                flops_done += remaining[run.name]
                continue
        record = finished_record(run, summary, status, error, wall, resumed_from)
        states[run.name] = RunState(status, record["steps"] or 0, record)
        write_results(finished=run)
        flops_done += remaining[run.name]
        elapsed = time.perf_counter() - started
        left = total_flops - flops_done
        eta = elapsed / flops_done * left if flops_done > 0 else float("nan")
        final = record["final"]
        figures_text = (f"validation loss {final['eval_loss']:.4f} (best {record['best']['eval_loss']:.4f}), "
                        f"accuracy {final['eval_accuracy']:.3f}" if final["eval_loss"] is not None
                        else "no validation figures")
        log(f"[{i}/{len(todo)}] {run.name}: {status} in {_duration(wall)}; {figures_text}"
            + (f" | sweep {100 * flops_done / max(total_flops, 1.0):.0f}% done, ~{_duration(eta)} left"
               if i < len(todo) else "")
            + (f" | {error}" if error else ""))
    doc = write_results()
    finished = sum(s.status in FINISHED for s in states.values())
    log(f"sweep {sweep.name}: {finished} of {len(states)} runs finished; results in {sweep.results_path}")
    return doc


def _print_plan(sweep: Sweep, selected: list[Run], states: dict[str, RunState], steps: dict[str, int | None],
                stream_tokens: dict[str, int | None], flops_per_s: float | None, out: Callable[[str], None]) -> None:
    if flops_per_s is None:
        rate, how = default_rate(selected[0].config.model.dtype if selected else "float32")
    else:
        rate, how = flops_per_s, "--flops-per-s"
    out(f"sweep {sweep.name} ({sweep.source}): {len(sweep.runs)} runs, {len(selected)} selected; "
        f"runs in {sweep.output_dir}/, results in {sweep.results_path}")
    header = ("run", "status", "steps", "tokens", "params", "FLOPs to go", "time to go")
    rows = []
    total_flops, total_s, unknown = 0.0, 0.0, 0
    for run in selected:
        state, n = states[run.name], steps[run.name]
        cfg = run.config
        status = {"partial": f"partial (step {state.checkpoint_step})"}.get(state.status, state.status)
        if state.status in FINISHED:
            flops, seconds = 0.0, 0.0
        elif n is None:
            flops, seconds = float("nan"), float("nan")
            unknown += 1
        else:
            flops = run_flops(run, n, state.checkpoint_step)
            seconds = flops / rate + STARTUP_S
            total_flops += flops
            total_s += seconds
        tokens = "?" if stream_tokens.get(run.name) is None else f"{stream_tokens[run.name]:,}"
        rows.append((run.name, status, "?" if n is None else str(n), tokens, f"{cfg.model.num_params():,}",
                     "-" if flops == 0 else ("?" if math.isnan(flops) else _flops(flops)),
                     "-" if seconds == 0 else _duration(seconds)))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        out("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    note = f" ({unknown} run(s) of unknown length: corpus not tokenized yet)" if unknown else ""
    out(f"estimated cost: {_flops(total_flops)}, about {_duration(total_s)} at {_flops(rate)}/s ({how}), "
        f"counting ~{STARTUP_S:.0f} s start-up per run{note}")
