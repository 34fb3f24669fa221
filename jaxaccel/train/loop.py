"""The trainer: one loop for every model, mesh and objective.

    summary = train(run_config)            # or: python -m jaxaccel.train CONFIG.yaml key=value ...

Output folder: `config.yaml` (the resolved config), `metrics.jsonl`, `tensorboard/`,
`checkpoints/<step>/` (Orbax: state + data position), `tokenizer.model`, `train.lock`, and at
the end `model/` — a jaxaccel model checkpoint that `jaxaccel.load` and `python -m jaxaccel.decode`
take directly. Rerunning the same command on the same folder resumes from the latest
readable checkpoint and reproduces the uninterrupted loss curve exactly (CPU, float32). A
rerun may change how the run executes, logs and checkpoints, and how long it trains (see
RESUME_MAY_CHANGE); any other changed setting, or a train.steps below the latest checkpoint,
is refused with a one-line ConfigError before anything in the folder is rewritten.
A second run on a folder that a live run is using is refused (`train.lock`, an OS lock that
dies with its process, so a killed run's folder resumes at once).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from jaxaccel import sharding as shd
from jaxaccel.config import dump_yaml, flatten, flatten_stored, to_dict
from jaxaccel.data.errors import DataError
from jaxaccel.errors import CheckpointError, ConfigError, Interrupted, JaxaccelError, Preempted
from jaxaccel.model.checkpoint import (MARKER, RUN_CHECKPOINTS, RUN_CONFIG, SET_ASIDE, STAGING,  # run layout names
                                       holds_earlier_save)
from jaxaccel.train.checkpoint import Checkpoints
from jaxaccel.train.config import MAX_STEPS, RunConfig
from jaxaccel.train.hosts import check_same_settings, decided_by_process_0, is_main
from jaxaccel.train.lock import LOCK_FILE, OutputDirInUseError, OutputDirLock
from jaxaccel.train.metrics import MetricsWriter, devices_peak_flops, flops_per_token
from jaxaccel.train.state import batch_sharding, create_state, global_batch, state_shardings
from jaxaccel.train import step as step_module
from jaxaccel.train.step import eval_step, lr_schedule, make_optimizer, train_step


class TrainingDiverged(JaxaccelError):
    """The loss or the gradients became NaN/Inf."""


def divergence(metrics: dict) -> str:
    """What went non-finite in a step's metrics: the loss, else the objective (label smoothing,
    MoE auxiliary losses), else the gradient norm (an overflow with a finite loss)."""
    loss, objective, norm = float(metrics["loss"]), float(metrics["objective"]), float(metrics["grad_norm"])
    if not math.isfinite(loss):
        return f"loss became {loss}"
    if not math.isfinite(objective):
        return f"training objective became {objective} (loss {loss:.4g})"
    return f"gradient norm became {norm} (loss {loss:.4g})"


@contextlib.contextmanager
def preemption_notice():
    """Yields `noticed(step) -> str | None`: why the run must stop ("SIGTERM" or "Ctrl-C"), once
    that is known at a step where every process stops; None otherwise. A TPU pod's spot slice
    gets SIGTERM shortly before it is reclaimed: on a multi-host run JAX's preemption service
    catches it and the processes agree on the step
    (`multihost_utils.reached_preemption_sync_point`). On one process, handlers installed for
    the run (the previous ones restored after) note SIGTERM and a first Ctrl-C (SIGINT), read
    after each step: the step is checkpointed and the run stops. A second Ctrl-C stops at
    once (KeyboardInterrupt), keeping only the checkpoints already saved."""
    import signal
    import threading

    from jax._src import distributed
    from jax.experimental import multihost_utils

    if distributed.global_state.client is not None:  # multi-host: JAX's service owns SIGTERM
        if distributed.global_state.preemption_sync_manager is None:  # jax_enable_preemption_service off
            yield lambda step: None
        else:
            yield lambda step: "SIGTERM" if multihost_utils.reached_preemption_sync_point(step) else None
        return
    if threading.current_thread() is not threading.main_thread():
        yield lambda step: None
        return
    reason: list[str] = []

    def on_term(signum, frame):
        reason.append("SIGTERM")

    def on_int(signum, frame):
        if "Ctrl-C" in reason:  # the second: what Ctrl-C did before the run (a command ends soon)
            before = previous.get(signal.SIGINT)
            if callable(before) and before is not signal.default_int_handler:
                before(signum, frame)
            raise KeyboardInterrupt
        reason.append("Ctrl-C")
        os.write(2, b"\ninterrupt: the run stops after this step and saves a checkpoint of it "
                    b"(Ctrl-C again stops at once, without)\n")  # (not sys.stderr: no reentrant write)

    handlers = [(signal.SIGTERM, on_term)]
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a background job of a script ignores it
        handlers.append((signal.SIGINT, on_int))
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers}
    try:
        yield lambda step: reason[0] if reason else None
    finally:
        for sig, handler in previous.items():
            # None: the previous handler was not installed from Python; the default is the nearest
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def build_mesh(cfg: RunConfig):
    sizes = cfg.mesh.sizes(jax.device_count())
    cfg.check_mesh(sizes)
    if math.prod(sizes.values()) != jax.device_count() and jax.process_count() > 1:
        raise ConfigError(f"a multi-host run must use all {jax.device_count()} devices; the mesh uses "
                          f"{math.prod(sizes.values())}")
    batch_shards = shd.batch_ways(sizes)
    if jax.process_count() > 1 and batch_shards % jax.process_count():
        # Each host feeds whole rows of the global batch; a batch shard spread over two hosts
        # would need both to feed identical rows.
        raise ConfigError(f"mesh {shd.BATCH_AXES_NAME} = {batch_shards} must be a multiple of the "
                          f"{jax.process_count()} hosts (move devices from tensor to data or fsdp)")
    mesh = shd.make_mesh(sizes)
    if jax.process_count() > 1:
        shd.check_batch_shards_on_one_host(mesh)
    return mesh


@contextlib.contextmanager
def output_dir_lock(output_dir: str):
    """Hold the output folder for the run: a second live run on it is refused with
    `OutputDirInUseError` (see `jaxaccel.train.lock`; a killed run's lock dies with it).

    Only process 0 locks: it is the one that writes the run's files. On a multi-host run
    every process learns process 0's outcome, so a refused run stops on all hosts at once
    instead of leaving the others waiting in their first collective."""
    def acquire():
        # gs:// and other object stores have no flock (nor any atomic lock primitive this
        # could use without a separate service), so those runs are unguarded: give every run
        # its own bucket prefix.
        if "://" in output_dir:
            return None, False
        new = not Path(output_dir).exists()
        return OutputDirLock(output_dir).acquire(), new

    lock, new_folder = decided_by_process_0(acquire, lambda: OutputDirInUseError(
        f"output_dir {output_dir!r} could not be locked by process 0 (another training run holds it, or it is not "
        f"writable: its error is in process 0's output)")) or (None, False)
    try:
        yield
    except BaseException:
        # a new run refused before it wrote anything (its data, a budget): no folder holding
        # only train.lock is left behind
        if lock is not None and new_folder:
            try:  # (never in the way of the run's own error)
                if [p.name for p in Path(output_dir).iterdir()] == [LOCK_FILE]:
                    (Path(output_dir) / LOCK_FILE).unlink()
                    lock.release()
                    lock = None
                    Path(output_dir).rmdir()
            except OSError:
                pass
        raise
    finally:
        if lock is not None:
            lock.release()


def check_output_dir(output_dir: str) -> None:
    """Refuse an output_dir that is not a place for a run: a file, or a folder holding a model
    (a jaxaccel or Hugging Face model folder, whose tokenizer and files a run would overwrite)."""
    if "://" in output_dir:
        return
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"output_dir {output_dir!r} is a file, not a folder")
    for marker in ("jaxaccel.json", "config.json"):
        if (folder / marker).is_file():
            raise ConfigError(f"output_dir {output_dir!r} holds a model ({marker}); a run there would overwrite its "
                              f"files: choose another output_dir (train.init_from={output_dir} starts from it)")
    inside = next((p for p in folder.absolute().parents if (p / "jaxaccel.json").is_file()), None)
    if inside is not None:  # e.g. MODEL/params/run: checkpoints written among a model's parameters
        raise ConfigError(f"output_dir {output_dir!r} is inside a model folder ({inside}): choose another "
                          f"output_dir")
    # The run writes config.yaml, tokenizer.model and metrics.jsonl. Beside a run's checkpoints
    # or a run's config.yaml they are a run's (older trainers could leave config.yaml cut short
    # by a kill: its checkpoints still say whose it is); anywhere else, someone else's files. An
    # empty checkpoints/ folder says nothing: a project's own layout may have one.
    run = _holds_checkpoints(folder) or _is_run_config(folder / RUN_CONFIG)
    own = [name for name in (RUN_CONFIG, "tokenizer.model", "metrics.jsonl") if (folder / name).exists()]
    if own and not run:
        raise ConfigError(f"output_dir {output_dir!r} holds {own[0]} but neither a run's checkpoints nor a run's "
                          f"{RUN_CONFIG}: not a training run's folder, and a run there would overwrite it; choose "
                          f"another output_dir")
    # The run exports its model to model/, replacing what a model there holds: only a run's own
    # export (a jaxaccel model, or a save killed half-way) may be there.
    model = folder / "model"
    if model.is_dir() and any(model.iterdir()):
        export = holds_earlier_save(model) or all(p.name in (STAGING, SET_ASIDE) for p in model.iterdir())
        if not (run and export):
            what = "files that are not a jaxaccel model" if not export else "a model that this folder's run did not write"
            raise ConfigError(f"output_dir {output_dir!r}: its model/ folder holds {what}, and a run exports its model "
                              f"there: choose another output_dir")
    elif model.exists() and not model.is_dir():
        raise ConfigError(f"output_dir {output_dir!r}: model is a file, and a run exports its model there: choose "
                          f"another output_dir")


def _holds_checkpoints(folder: Path) -> bool:
    """Whether `folder` has a run's checkpoints: a checkpoints/ folder with a step in it (a
    finished step, or one a kill left half-written)."""
    steps = folder / RUN_CHECKPOINTS
    return steps.is_dir() and any(p.name[:1].isdigit() for p in steps.iterdir())


def _is_run_config(path: Path) -> bool:
    """Whether `path` is a training run's config.yaml (a mapping with its model and train sections)."""
    from jaxaccel.config import parse_yaml

    try:
        stored = parse_yaml(path.read_bytes(), str(path))
    except (OSError, ConfigError):
        return False
    return isinstance(stored.get("model"), Mapping) and "train" in stored


# Settings a resumed run may change: where and how it runs (mesh, remat, the attention
# implementation), what it logs and evaluates, how it checkpoints and how long it trains.
# Anything else (model, data, batch, sequence length, optimizer, seed, dropout) would continue
# the checkpoints as another run under the first one's name. The micro-batching
# (train.grad_accum) too, unless it changes only float rounding (`micro_batching_is_exact`).
RESUME_MAY_CHANGE = ("output_dir", "tensorboard", "mesh", "checkpoint", "data.cache_dir", "data.max_eval_tokens",
                     "train.steps", "train.progress", "train.peak_flops", "train.log_every", "train.eval_every",
                     "train.eval_batches", "train.init_from", "train.remat", "train.attention")


def micro_batching_is_exact(cfg: RunConfig) -> bool:
    """Whether `train.grad_accum` changes nothing but float rounding. Not with dropout (each
    micro-batch draws its masks from its own key), MoE (the balance loss is per micro-batch)
    or Duo-LLM (routes drawn per micro-batch)."""
    m = cfg.model
    rates = (m.dropout.embed, m.dropout.attention, m.dropout.mlp, m.dropout.path)
    return not any(rates) and not m.moe.n_experts and not m.duo.enabled


def resumed_config_differences(stored: Mapping, cfg: RunConfig) -> list[tuple[str, Any, Any]]:
    """(key, stored value, this run's value) for each setting outside RESUME_MAY_CHANGE that
    differs. A key the stored config lacks (a setting newer than that run) differs only when
    this run gives it a value other than its default; a key only the stored config has (a
    setting since removed) does not differ."""
    a = flatten_stored(stored)  # e.g. an MoE run from before moe.priority reads as rank, not today's token
    b = flatten(json.loads(json.dumps(to_dict(cfg))))
    defaults = flatten(json.loads(json.dumps(to_dict(RunConfig()))))
    may_change = RESUME_MAY_CHANGE + (("train.grad_accum",) if micro_batching_is_exact(cfg) else ())
    free = lambda key: any(key == k or key.startswith(k + ".") for k in may_change)  # noqa: E731
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if not free(k) and k in b and a.get(k) != b.get(k)
            and not (k not in a and k in defaults and b.get(k) == defaults[k])]


def _other_settings(cfg: RunConfig, stored: Mapping, where: str, weights: bool = True) -> str | None:
    """The one-line refusal to resume a run whose settings (`stored`, read from `where`)
    differ from `cfg` outside RESUME_MAY_CHANGE, or None. weights False: the folder holds no
    checkpoint nor model (a run killed before its first checkpoint)."""
    diff = resumed_config_differences(stored, cfg)
    if not diff:
        return None
    key, have, want = diff[0]
    more = f" and {len(diff) - 1} more" if len(diff) > 1 else ""
    hint = (f"train.init_from={cfg.output_dir} starts a new run from its weights" if weights else
            f"it has no checkpoint yet: delete its {RUN_CONFIG} to start this run there")
    return (f"output_dir {cfg.output_dir!r} holds a run with other settings ({key} is {have!r} in its {where}, "
            f"{want!r} now{more}): rerun with the run's settings to resume it, or choose another output_dir "
            f"({hint})")


def check_resumed_config(cfg: RunConfig, ckpts: Checkpoints | None = None, step: int | None = None) -> Mapping | None:
    """Refuse to resume a run folder whose settings differ from `cfg` (see RESUME_MAY_CHANGE),
    before anything is read or rewritten: its `config.yaml`, or when that is missing or
    unreadable (deleted; a run killed while writing it) the copy in checkpoint `step`'s meta.
    Returns the settings read (None: neither could be read, or not process 0). Process 0
    reads them; on a multi-host run every process learns its verdict."""

    def check() -> Mapping | None:
        from jaxaccel.config import parse_yaml
        from jaxaccel.model.checkpoint import as_path, is_jaxaccel_checkpoint

        try:
            stored, where = parse_yaml((as_path(cfg.output_dir) / RUN_CONFIG).read_bytes(), RUN_CONFIG), RUN_CONFIG
        except Exception:  # missing, half-written, or an object store's error: the checkpoint's copy
            stored, where = (ckpts.settings(step) if ckpts is not None and step is not None else None), \
                f"checkpoint {step}"
        weights = step is not None or is_jaxaccel_checkpoint(as_path(cfg.output_dir) / "model")
        error = None if stored is None else _other_settings(cfg, stored, where, weights)
        if error is not None:
            raise ConfigError(error)
        return stored

    return _decided_by_process_0(check, f"output_dir {cfg.output_dir!r} holds a run with other settings (process 0 "
                                        f"refused to resume it)")


# What the run's token ids and data order rest on, kept in every checkpoint: a resume after
# any of them changed (files added to the corpus, `corpus: stdlib` under another Python, a
# relative glob from another folder) would go on training the model on other ids.
_DATA_FINGERPRINT = {"manifest_sha256": "the corpus files", "vocab_sha256": "the vocabulary",
                     "unique_stream_sha256": "the unique-token stream"}


def data_fingerprint(data: Any) -> dict[str, str]:
    """The run data's fingerprint (`_DATA_FINGERPRINT`; empty for synthetic data)."""
    import hashlib

    stats = getattr(data, "stats", None) or {}
    out = {k: stats[k] for k in ("manifest_sha256", "unique_stream_sha256") if isinstance(stats.get(k), str)}
    if getattr(data, "vocab_path", None) is not None:  # its pieces, not the file: SentencePiece also
        # keeps its training record there, which a retrain under another version may change
        pieces = _pieces(Path(data.vocab_path))
        if pieces is None:  # (its raw bytes were hashed: a run trained to the end, then failed to export)
            raise DataError(f"{data.vocab_path}: the vocabulary is not a readable SentencePiece model; delete it "
                            f"(it is trained again from the corpus)")
        out["vocab_sha256"] = hashlib.sha256(repr(pieces).encode()).hexdigest()
    return out


_OTHER_DATA = "output_dir {!r} was trained on other data (process 0 refused to resume it)"


def check_same_data(saved: Any, now: Mapping[str, str], cfg: RunConfig, step: int) -> None:
    """A one-line ConfigError when checkpoint `step` was trained on other data than `now`
    (checkpoints older than the fingerprint carry none: not checked)."""
    if not isinstance(saved, Mapping):
        return
    changed = [k for k in _DATA_FINGERPRINT if isinstance(saved.get(k), str) and k in now and saved[k] != now[k]]
    if changed:
        what = " and ".join(_DATA_FINGERPRINT[k] for k in changed)
        raise ConfigError(f"output_dir {cfg.output_dir!r} was trained up to step {step} on other data: {what} "
                          f"changed since (data.corpus {cfg.data.corpus!r}; {changed[0]} {saved[changed[0]][:12]} then, "
                          f"{now[changed[0]][:12]} now) — resuming would train the model on other token ids or "
                          f"another data order; restore the corpus, or choose another output_dir")


def _check_run_config(cfg: Any) -> RunConfig:
    """`cfg` if it is a RunConfig fit to run, else a one-line ConfigError saying what to pass."""
    how = "build one with jaxaccel.config.build(RunConfig, 'configs/tiny.yaml', ['train.steps=100'])"
    if isinstance(cfg, (str, os.PathLike)):
        raise ConfigError(f"train() takes a RunConfig, not the path {os.fspath(cfg)!r}: load it with "
                          f"jaxaccel.config.build(RunConfig, {os.fspath(cfg)!r})")
    if isinstance(cfg, Mapping):
        raise ConfigError("train() takes a RunConfig, not a dict: convert it with "
                          f"jaxaccel.config.from_dict(RunConfig, d), or {how}")
    if not isinstance(cfg, RunConfig):
        raise ConfigError(f"train() takes a RunConfig, got {type(cfg).__name__} {cfg!r:.80}: {how}")
    # Field types (sections included) were checked when the RunConfig was made (check_types).
    if not cfg.output_dir.strip():
        raise ConfigError("output_dir must not be empty")
    return cfg


# Settings a host may have of its own: the progress bar, and a token cache on its own disk.
HOST_SETTINGS = ("train.progress", "data.cache_dir")


def train(cfg: RunConfig, data: Any = None, *, log=None) -> dict[str, Any]:
    cfg = _check_run_config(cfg)
    check_same_settings({k: v for k, v in flatten(to_dict(cfg)).items() if k not in HOST_SETTINGS}, ConfigError)
    mesh = build_mesh(cfg)  # config errors first, before the folder is touched
    cfg.skip_schedule()
    _decided_by_process_0(lambda: (check_output_dir(cfg.output_dir), check_init_from(cfg.train.init_from, cfg.output_dir)),
                          f"output_dir {cfg.output_dir!r} or train.init_from was refused by process 0 (its error is in "
                          f"process 0's output)")
    with output_dir_lock(cfg.output_dir):
        return _train(cfg, mesh, data, log=log)


def _decided_by_process_0(check: Callable[[], Any], refusal: str) -> Any:
    """`hosts.decided_by_process_0` for the run's folder checks: another process's error is a
    ConfigError saying `refusal`."""
    return decided_by_process_0(check, lambda: ConfigError(refusal))


def _no_export_without_checkpoints(output_dir: str) -> None:
    """A run with no checkpoint to resume starts over, and at its end replaces model/: refused
    when model/ holds a model (a finished run whose checkpoints were deleted)."""
    from jaxaccel.model.checkpoint import as_path, is_jaxaccel_checkpoint

    if is_jaxaccel_checkpoint(as_path(output_dir) / "model"):
        raise ConfigError(f"output_dir {output_dir!r} holds a finished run's model/ but no checkpoint to resume from: "
                          f"a run there would start over and replace that model; choose another output_dir "
                          f"(train.init_from={output_dir} starts from the model)")


def _train(cfg: RunConfig, mesh, data: Any = None, *, log=None) -> dict[str, Any]:
    log = log or (lambda msg: print(msg, file=sys.stderr) if is_main() else None)
    out = Path(cfg.output_dir) if not cfg.output_dir.startswith("gs://") else None
    if data is None and cfg.data.corpus == "synthetic":
        from jaxaccel.train.synthetic import SyntheticData, synthetic_budget

        if cfg.model.vocab_size < 3:  # ids 0 and 1 are reserved; documents count up from 2
            raise ConfigError(f"data.corpus: synthetic needs model.vocab_size >= 3, got {cfg.model.vocab_size}")

        unique, total = synthetic_budget(cfg.data.unique_tokens, cfg.data.epochs, cfg.train.batch_size,
                                         cfg.train.seq_len, cfg.train.steps)
        data = SyntheticData(cfg.model.vocab_size, cfg.train.seq_len, cfg.train.batch_size, total_steps=total,
                             unique_batches=unique, seed=cfg.data.seed, shard_index=jax.process_index(),
                             num_shards=jax.process_count())
    elif data is None:
        from jaxaccel.data import build_data

        data = build_data(cfg.data, seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size,
                          shard_index=jax.process_index(), num_shards=jax.process_count())
    from jaxaccel.data.pipeline import check_vocab_fits

    check_vocab_fits(data.vocab_size, cfg.model.vocab_size)
    budget = getattr(data, "total_steps", None)
    if cfg.train.steps is not None and budget is not None and cfg.train.steps > budget:
        raise ConfigError(f"train.steps ({cfg.train.steps}) exceeds the data budget: {budget} steps of "
                          f"{cfg.train.batch_size} sequences (data.epochs {cfg.data.epochs}); raise data.epochs, or "
                          f"lower train.steps (null: the budget's steps)")
    total_steps = cfg.train.steps or data.total_steps
    if total_steps >= MAX_STEPS:
        raise ConfigError(f"the data budget makes {total_steps:,} steps, more than optax's int32 step counter holds "
                          f"(2**31): fewer data.epochs or unique tokens, or a larger train.batch_size")
    optimizer = make_optimizer(cfg.optim, total_steps)
    schedule = lr_schedule(cfg.optim, total_steps)

    def refuse_past_the_end(step: int) -> None:
        if step > total_steps:
            raise ConfigError(f"output_dir {cfg.output_dir!r} holds checkpoint step {step}, past train.steps "
                              f"({total_steps}): raise train.steps to continue that run, or choose another "
                              f"output_dir")
    abstract, shardings = state_shardings(cfg.model, optimizer, mesh, cfg.train.seed)

    fingerprint = data_fingerprint(data)
    ckpt_dir = (out / RUN_CHECKPOINTS) if out is not None else cfg.output_dir.rstrip("/") + "/" + RUN_CHECKPOINTS
    ckpts = Checkpoints(ckpt_dir, cfg.checkpoint)
    # One `finally` from here on: an error anywhere (a model that does not fit init_from, an
    # unwritable folder, the loop itself) closes the checkpoint manager and the metrics writer,
    # so a notebook that retries does not pile up Orbax's threads and open event files.
    notice = contextlib.ExitStack()
    writer = bar = None
    try:
        listed = ckpts.agreed_steps()  # the same on every process, or a one-line error on all
        stored = None
        if listed:  # refused before the restore sets any unreadable step aside (on gs://: deletes it)
            readable = True
            try:  # another model first: its error names the parameter
                ckpts.check_shapes(listed[-1], abstract)
            except CheckpointError:
                raise
            except Exception:  # unreadable metadata: restore_latest reports it and falls back
                readable = False
            stored = check_resumed_config(cfg, ckpts, listed[-1])
            # other data: refused before the state is read (minutes for a large model), from the
            # step's small meta; checked again below on the step the restore reads
            _decided_by_process_0(lambda: check_same_data((ckpts.meta(listed[-1]) or {}).get("data"), fingerprint,
                                                          cfg, listed[-1]), _OTHER_DATA.format(cfg.output_dir))
            if readable:  # a damaged one (never written) is set aside instead
                refuse_past_the_end(listed[-1])
        else:  # a run that starts over: not over another run's settings, nor over a finished run's model
            stored = check_resumed_config(cfg)  # (killed before its first checkpoint: its config.yaml)
            _decided_by_process_0(lambda: _no_export_without_checkpoints(cfg.output_dir),
                                  f"output_dir {cfg.output_dir!r} holds a finished run's model/ (process 0 refused)")
        # the step it falls back to (past a damaged newest one) must not be past train.steps either:
        # refused before anything is set aside (it resumed, then overwrote the finished model/)
        restored = ckpts.restore_latest(abstract, listed, check_step=refuse_past_the_end)
        resumed_at_its_end = False  # at the last step of the run it resumes (which evaluated there)
        if restored is not None:
            if restored.step != listed[-1]:
                # The restore fell back past a damaged step: without config.yaml, the settings
                # of the step it read are the ones to check (a collective: every process takes
                # this branch, the restored step being agreed).
                stored = check_resumed_config(cfg, ckpts, restored.step)
            if stored is None:  # process 0 found neither config.yaml nor a copy in the step it resumes
                log(f"warning: {RUN_CONFIG} is missing in {cfg.output_dir} and checkpoint {restored.step} holds no "
                    f"readable copy of the run's settings: this resume's settings are not checked against the run's")
            before = restored.meta.get("total_steps")  # the length its schedule decayed over (train.steps
            if before is None:  # resolved); older checkpoints: an explicit train.steps of the run's settings
                train_settings = (stored or {}).get("train")
                before = train_settings.get("steps") if isinstance(train_settings, Mapping) else None
            # (from the step's meta alone, which every process reads: `stored` is process 0's)
            resumed_at_its_end = restored.meta.get("total_steps") == restored.step
            if isinstance(before, int) and before != total_steps and cfg.optim.schedule == "cosine":
                log(f"the run now trains {total_steps} steps, {before} before: the learning rate decays over the new "
                    f"length from here, so this run's curve is neither length's")
            # process 0's verdict for all (its data is the run's reference; one host refusing alone would hang)
            _decided_by_process_0(lambda: check_same_data(restored.meta.get("data"), fingerprint, cfg, restored.step),
                                  _OTHER_DATA.format(cfg.output_dir))
            state, start = restored.state, restored.step
            log(f"resuming from checkpoint step {start} in {ckpt_dir}")
        else:
            state, start = create_state(cfg.model, optimizer, shardings, cfg.train.seed), 0
            if cfg.train.init_from is not None:
                state = state._replace(params=initial_params(cfg, shardings.params, data.vocab_path))
                log(f"initialised from {cfg.train.init_from}")
        if is_main():
            from jaxaccel.files import write_atomically
            from jaxaccel.model.checkpoint import as_path

            run_dir = as_path(cfg.output_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            # whole or not at all: a resume compares its settings with config.yaml
            write_atomically(run_dir / RUN_CONFIG, dump_yaml(to_dict(cfg)).encode())
            if data.vocab_path is not None:
                write_atomically(run_dir / "tokenizer.model", Path(data.vocab_path).read_bytes())

        bsh = batch_sharding(mesh)
        # A causal objective has no bidirectional tokens: flash attention then skips the tiles
        # above the diagonal. Activations are pinned to the mesh by their logical axes.
        attention = dict(attention=cfg.train.attention, bidirectional=cfg.data.objective != "causal", mesh=mesh,
                         skip=cfg.skip_schedule())
        step_fn = {}
        for dropout in (False, True):
            fn = functools.partial(train_step, model_cfg=cfg.model, optimizer=optimizer, schedule=schedule,
                                   grad_accum=cfg.train.grad_accum, dropout=dropout, remat=cfg.train.remat,
                                   label_smoothing=cfg.train.label_smoothing, **attention)
            step_fn[dropout] = jax.jit(fn, in_shardings=(shardings, bsh), out_shardings=(shardings, None),
                                       donate_argnums=(0,), compiler_options=step_module.compiler_options() or None)
        eval_fn = jax.jit(functools.partial(eval_step, model_cfg=cfg.model, **attention),
                          in_shardings=(shardings.params, bsh))
        has_dropout = any(getattr(cfg.model.dropout, f.name) > 0 for f in dataclasses.fields(cfg.model.dropout))

        tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
        flops_step = flops_per_token(cfg.model, cfg.train.seq_len) * tokens_per_step
        # MFU against the devices the mesh uses (a mesh may take fewer than the machine has)
        peak = (devices_peak_flops(mesh.size, cfg.model.dtype) if cfg.train.peak_flops is None
                else cfg.train.peak_flops * mesh.size)
        writer = MetricsWriter(out or cfg.output_dir, cfg.tensorboard and out is not None, start) if is_main() else None
        unique = data.stats.get("unique_tokens")

        def evaluate(step: int, write: bool = True) -> dict[str, float]:
            ce, n, correct = 0.0, 0.0, 0.0
            for i, batch in enumerate(data.eval_batches()):
                if cfg.train.eval_batches is not None and i >= cfg.train.eval_batches:
                    break
                m = jax.device_get(eval_fn(state.params, global_batch(batch, bsh)))
                ce, n, correct = ce + float(m["ce_sum"]), n + float(m["tokens"]), correct + float(m["correct"])
            if n == 0:  # no validation split (validation_fraction 0, max_eval_tokens 0): no figure, not a 0.0
                return {}
            loss = ce / n
            record = {"step": step, "eval_loss": loss, "eval_accuracy": correct / n,
                      "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": n}
            if writer is not None and write:
                writer.write(record)
                writer.flush()
            log(f"step {step}: eval loss {loss:.4f}, accuracy {record['eval_accuracy']:.3f}, "
                f"perplexity {record['eval_perplexity']:.2f}")
            return record

        if cfg.train.progress and is_main() and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=total_steps, initial=start, unit="step", file=sys.stderr, dynamic_ncols=True)

        epoch_of = getattr(data, "epochs_read", lambda steps: steps / data.steps_per_epoch)
        pending: list[tuple[int, Any]] = []
        last = {"time": time.perf_counter(), "step": start}  # where the timing of tokens/s and MFU starts
        compiled: set[bool] = set()  # the step variants (dropout or not) called once in this process
        last_eval: dict[str, float] = {}
        last_loss = float("nan")

        def flush_metrics() -> None:
            nonlocal last_loss
            if not pending:
                return
            fetched = jax.device_get([m for _, m in pending])
            now = time.perf_counter()
            steps_done = pending[-1][0] + 1 - last["step"]
            tok_s = steps_done * tokens_per_step / max(now - last["time"], 1e-9)
            for (step, _), m in zip(pending, fetched):
                if not bool(m["finite"]):
                    good = ckpts.steps()
                    where = (f"the last good state is checkpoint step {good[-1]} in {ckpt_dir}" if good
                             else f"no checkpoint was written yet (nothing in {ckpt_dir})")
                    if writer is not None:
                        writer.flush()
                    raise TrainingDiverged(f"{divergence(m)} at step {step + 1}; training stopped, {where}")
                record = {"step": step + 1, "loss": float(m["loss"]), "accuracy": float(m["accuracy"]),
                          "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
                          "tokens_seen": (step + 1) * tokens_per_step, "unique_tokens": unique,
                          "epoch": epoch_of(step + 1)}
                if cfg.model.moe.n_experts:
                    record.update(aux_loss=float(m["aux_loss"]), moe_load_balance=float(m["moe_load_balance"]),
                                  moe_router_z=float(m["moe_router_z"]), moe_dropped=float(m["moe_dropped"]),
                                  moe_expert_load=np.asarray(m["moe_expert_load"]).round(4).tolist())
                if step == pending[-1][0] and steps_done > 0:
                    record.update(tokens_per_s=tok_s, mfu=tok_s * flops_step / tokens_per_step / peak)
                if writer is not None:
                    writer.write(record)
                last_loss = record["loss"]
            if writer is not None:
                writer.flush()
            if bar is not None:
                bar.set_postfix(loss=f"{last_loss:.3f}", **({"tok_s": f"{tok_s:.0f}"} if steps_done else {}))
                bar.update(len(pending))
            last.update(time=now, step=pending[-1][0] + 1)
            pending.clear()

        settings = json.loads(json.dumps(to_dict(cfg), default=str))  # a copy in every checkpoint
        noticed = notice.enter_context(preemption_notice())

        def stopped(reason: str, done: int) -> Preempted:
            """The error that ends a run stopped by `reason` once checkpoint `done` is written."""
            ckpts.wait()
            error, cause = (Interrupted, "Ctrl-C") if reason == "Ctrl-C" else (Preempted, "a preemption notice (SIGTERM)")
            return error(f"{cause} stopped the run after step {done} of {total_steps}; checkpoint {done} is saved in "
                         f"{ckpt_dir}: rerun the same command to resume")

        if resumed_at_its_end and start < total_steps:
            # Stopped during its last step, that run left the evaluation there to its rerun (see
            # `due_eval` below); a rerun that trains on (a larger train.steps) makes it up here,
            # recording it only if it is not yet.
            last_eval = evaluate(start, write=writer is not None and not writer.has(start, "eval_loss"))
            last["time"] = time.perf_counter()  # the first interval times its training steps only
        batches = data.train_batches(start)
        for step in range(start, total_steps):
            try:
                local = next(batches)
            except StopIteration:
                raise ConfigError(f"the data ran out at step {step}: train.steps ({total_steps}) exceeds the data "
                                  f"budget ({data.total_steps} steps)") from None
            dropout = has_dropout and step >= cfg.train.dropout_start_step
            state, metrics = step_fn[dropout](state, global_batch(local, bsh))
            pending.append((step, metrics))
            if dropout not in compiled:  # its first call compiled it: tokens/s and MFU time the steps after it
                compiled.add(dropout)
                jax.block_until_ready(metrics)
                last.update(time=time.perf_counter(), step=step + 1)
            done = step + 1
            due_ckpt = done % cfg.checkpoint.every_steps == 0 or done == total_steps
            due_eval = (cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == total_steps
            # every process asks at every step (the multi-host protocol's rule); a notice makes
            # this step's checkpoint the run's last act, after its metrics (a NaN is never saved),
            # also at the last step (the rerun evaluates and exports: they may take longer than
            # a preemption's grace period, or than the user who pressed Ctrl-C wants to wait)
            stop = noticed(done)
            due_eval = due_eval and not (stop and done == total_steps)  # the rerun evaluates, then exports
            if due_ckpt or due_eval or stop or len(pending) >= cfg.train.log_every:
                flush_metrics()
            # Evaluate before checkpointing: a run killed after a checkpoint has that step's
            # evaluation on record, so its resumed curve is the uninterrupted one.
            if due_eval:
                last_eval = evaluate(done)
            if due_ckpt or stop:
                ckpts.save(done, state, {"step": done, "data_position": done, "tokens_seen": done * tokens_per_step,
                                         "unique_tokens": unique, "total_steps": total_steps, "config": settings,
                                         "data": fingerprint, "info": skip_info(cfg)})  # decoding a run reads it
            if due_eval or due_ckpt:  # tokens/s and MFU time training steps only, not the evaluation or save
                last["time"] = time.perf_counter()
            if stop:
                raise stopped(stop, done)
        if start < total_steps and jax.process_count() == 1:  # a notice during the last step's evaluation
            late = noticed(total_steps)
            if late:
                raise stopped(late, total_steps)
        notice.close()  # the last step is checkpointed: from here a SIGTERM or Ctrl-C ends the process as usual
        flush_metrics()
        if start == total_steps:  # resumed after the last step: evaluate, recording it only if it is not yet
            last_eval = evaluate(total_steps, write=writer is not None and not writer.has(total_steps, "eval_loss"))
            if not last_eval:  # no validation this time (data.max_eval_tokens=0): the export keeps its figures
                last_eval = exported_evaluation(cfg.output_dir, total_steps)
        ckpts.wait()
        from jaxaccel.model.checkpoint import as_path

        export_model(cfg, state.params, as_path(cfg.output_dir) / "model", data, total_steps, last_eval)
    finally:
        notice.close()
        if bar is not None:
            bar.close()
        ckpts.close()
        if writer is not None:
            writer.close()
    # final_loss: None when this call trained no step (a finished run rerun): NaN is no JSON
    return {"steps": total_steps, "resumed_from": start, "final_loss": None if math.isnan(last_loss) else last_loss,
            **last_eval, "data": data.stats, "output_dir": cfg.output_dir}


def check_init_from(init_from: str | None, output_dir: str) -> None:
    """A train.init_from that names nothing loadable is a one-line error before the data is
    built (minutes on a large corpus); whether its model fits is checked when it is read. A
    run that will resume from its own checkpoints does not read it, so is not checked."""
    if init_from is None or "://" in init_from or "://" in output_dir:
        return
    from jaxaccel.model import checkpoint as ckpt

    steps = Path(output_dir) / ckpt.RUN_CHECKPOINTS
    if steps.is_dir() and any(p.name.isdigit() for p in steps.iterdir()):
        return

    if not init_from.startswith("builtin:") and not Path(init_from).exists():
        raise ConfigError(f"train.init_from: {init_from!r} does not exist")
    init_source(init_from)


def init_source(init_from: str) -> tuple[str, Any]:
    """("model" | "run", folder) that train.init_from names: a model folder, a run whose model/
    is exported, or a run's checkpoints; else a one-line ConfigError."""
    from jaxaccel.model import checkpoint as ckpt

    try:
        folder = ckpt.as_path(ckpt.builtin_folder(init_from) or init_from)  # builtin:NAME, a shipped model
    except CheckpointError as e:
        raise ConfigError(f"train.init_from: {e}") from None
    if ckpt.run_export(folder) is not None:  # a finished run (not one resumed past its export)
        folder = folder / "model"
    if ckpt.is_jaxaccel_checkpoint(folder):
        return "model", folder
    if ckpt.is_run_dir(folder):
        return "run", folder
    raise ConfigError(f"train.init_from: {str(folder)!r} is neither a jaxaccel model nor a training run folder")


def initial_params(cfg: RunConfig, shardings: Any, vocab_path: str | Path | None = None) -> Any:
    """`train.init_from`'s parameters in this run's (scanned) layout and shardings. The source
    must match the model config in everything but depth; a deeper source gives its first
    model.n_layers layers. With `vocab_path` (this run's SentencePiece model), a source with
    a tokenizer must have that one: its embeddings are rows of its own vocabulary."""
    from jaxaccel.model import checkpoint as ckpt
    from jaxaccel.model.layers import jnp_dtype
    from jaxaccel.model.transformer import canonical_params, stack_layers

    kind, folder = init_source(cfg.train.init_from)
    theirs_vocab = folder / "tokenizer.model"
    if vocab_path is not None and theirs_vocab.is_file() and not _same_pieces(theirs_vocab, Path(vocab_path)):
        raise ConfigError(f"train.init_from: {str(folder)!r} was trained with another vocabulary than the one this "
                          f"run's data builds ({cfg.data.corpus!r}, data.vocab_size {cfg.data.vocab_size}): its "
                          f"embeddings would be read as other tokens; train on the corpus and vocabulary settings "
                          f"it was trained with")
    src_cfg, params, _ = ckpt.load_model(folder) if kind == "model" else ckpt.load_run_params(folder)
    mine, theirs = to_dict(cfg.model), to_dict(src_cfg)
    differ = sorted(k for k in mine if k not in ("n_layers", "dropout", "max_seq_len", "dtype", "param_dtype") and mine[k] != theirs.get(k))
    if differ:
        raise ConfigError(f"train.init_from: the model differs from this run's in {', '.join(differ)} "
                          f"(e.g. {differ[0]} {theirs.get(differ[0])!r} vs {mine[differ[0]]!r})")
    if src_cfg.n_layers < cfg.model.n_layers:
        raise ConfigError(f"train.init_from has {src_cfg.n_layers} layers, fewer than model.n_layers "
                          f"({cfg.model.n_layers})")
    params = canonical_params(params, src_cfg)
    params = {k: v for k, v in params.items()
              if not k.startswith("layer_") or int(k.split("_")[1]) < cfg.model.n_layers}
    dtype = jnp_dtype(cfg.model.param_dtype)
    return jax.device_put(jax.tree.map(lambda x: x.astype(dtype), stack_layers(params, cfg.model)), shardings)


def _same_pieces(a: Path, b: Path) -> bool:
    """Two SentencePiece models with the same pieces, ids and types (the files may differ in
    the training record SentencePiece keeps in them); unreadable ones are not the same."""
    if a.read_bytes() == b.read_bytes():
        return True
    pieces = _pieces(a)
    return pieces is not None and pieces == _pieces(b)


def _pieces(path: Path) -> list | None:
    """A SentencePiece model's (piece, control, unknown, byte) per id; None: not one."""
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_proto=path.read_bytes())
    except Exception:  # not a SentencePiece model
        return None
    return [(sp.id_to_piece(i), sp.is_control(i), sp.is_unknown(i), sp.is_byte(i)) for i in range(sp.get_piece_size())]


def skip_info(cfg: RunConfig) -> dict:
    """The schedule a SkipDecode fine-tune trained under: `method="skipdecode"` decodes the
    exported model with it by default."""
    skip = cfg.skip_schedule()
    if skip is None:
        return {}
    s = skip[0]
    return {"skip_schedule": {"warmup_layers": s.warmup_layers, "min_layers": s.min_layers,
                              "max_layers": s.max_layers, "max_length": s.max_length}}


def exported_evaluation(output_dir: str, steps: int) -> dict[str, float]:
    """The validation figures of the model a run exported after `steps` steps ({} if none)."""
    from jaxaccel.model.checkpoint import as_path

    try:
        info = json.loads((as_path(output_dir) / "model" / MARKER).read_bytes()).get("info") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    if info.get("trained_steps") != steps or info.get("validation_loss") is None:
        return {}
    loss = info["validation_loss"]
    return {"eval_loss": loss, "eval_accuracy": info.get("validation_accuracy"),
            "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": info.get("validation_tokens")}


def export_model(cfg: RunConfig, params: Any, folder: Path, data: Any, steps: int, evaluation: dict) -> Path:
    """The trained weights as a jaxaccel model folder, with the SentencePiece tokenizer and
    what produced them (steps, data statistics, final validation figures)."""
    from jaxaccel.model.checkpoint import save_model
    from jaxaccel.model.transformer import canonical_params
    from jaxaccel.tokenizer import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer(data.vocab_path) if data.vocab_path is not None else None
    eos = (data.eos_id,) if getattr(data, "eos_id", None) is not None else ()
    bos = getattr(data, "bos_id", None)  # every training document starts with it: so must prompts
    return save_model(folder, cfg.model, canonical_params(params, cfg.model), tokenizer=tokenizer, eos_token_ids=eos,
                      bos_token_id=bos, extra={"add_bos": bos is not None, "info": {
                          "trained_steps": steps, "validation_loss": evaluation.get("eval_loss"),
                          "validation_accuracy": evaluation.get("eval_accuracy"),
                          "validation_tokens": evaluation.get("eval_tokens"), **skip_info(cfg),
                          "data": {k: v for k, v in data.stats.items() if isinstance(v, (int, float, str))}}})
