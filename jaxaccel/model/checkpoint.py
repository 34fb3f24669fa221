"""jaxaccel model checkpoints: a folder with `jaxaccel.json` (model config, token ids, layout),
`params/` (an Orbax checkpoint) and optionally the tokenizer.

Parameters are restored straight into their target sharding and dtype: the restore target is
a tree of `jax.ShapeDtypeStruct`s carrying the shardings, so no host ever holds the whole
model unsharded.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

import jax

from jaxaccel.cli import abandoned_async_work
from jaxaccel.config import ModelConfig, from_dict, parse_yaml, to_dict
from jaxaccel.errors import CheckpointError, ConfigError, first_line
from jaxaccel.files import unsupported_location
from jaxaccel.tokenizer import SIDE_FILES

MARKER = "jaxaccel.json"
FORMAT = "jaxaccel-model"
VERSION = 1

# The shipped models, by the names `builtin:NAME` that every command takes for a model path.
ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_MODELS = {
    "default": ASSETS / "default_model",  # configs/default.yaml, trained ~30 min on a 2-core CPU
    "draft": ASSETS / "draft_model",  # configs/draft.yaml: same vocabulary, ~9x smaller
    "skipdecode": ASSETS / "skipdecode_model",  # configs/deep.yaml + configs/skipdecode-2x.yaml: 12 layers
    "duo": ASSETS / "duo_model",  # configs/duo.yaml (random routes) + a router for 4 of 8 big layers
    "longctx": ASSETS / "longctx_model",  # configs/longctx.yaml: trained at 256 tokens to retrieve (TokenSelect)
}


def builtin_folder(path: Any) -> Path | None:
    """The folder of a `builtin:NAME` model path (None for any other path); an unknown or
    uninstalled name is a one-line CheckpointError listing the names."""
    if not isinstance(path, str) or not path.startswith("builtin:"):
        return None
    name = path.split(":", 1)[1]
    if name not in BUILTIN_MODELS:
        raise CheckpointError(f"unknown built-in model {name!r}; built-in models: "
                              f"{', '.join('builtin:' + n for n in BUILTIN_MODELS)}")
    if not (BUILTIN_MODELS[name] / MARKER).is_file():
        raise CheckpointError(f"the built-in {name} model is not installed in {BUILTIN_MODELS[name]}")
    return BUILTIN_MODELS[name]


def as_path(folder):
    """A local Path (absolute), or an etils epath for gs:// (Orbax and tensorstore take both);
    any other URL is a CheckpointError (pathlib would make "s3://b" a local folder "s3:/b")."""
    if problem := unsupported_location(folder):
        raise CheckpointError(f"model folder {problem}")
    if str(folder).startswith("gs://"):
        from etils import epath

        return epath.Path(str(folder))
    return Path(folder).absolute()


def outcomes(outcome: int) -> list[int]:
    """Every process's outcome of reading a checkpoint step (this one's `outcome` included;
    0 = read). Every process calls it once per step it tried, so that all of them take the
    same step: on a pod, one host that cannot read its shards of the newest step (a damaged
    file, an object store that keeps failing) must send every host back to the step before,
    not leave the others restored and waiting for it in the next collective. One process:
    no collective."""
    if jax.process_count() == 1:
        return [int(outcome)]
    import numpy as np
    from jax.experimental import multihost_utils

    return [int(x) for x in np.asarray(multihost_utils.process_allgather(np.array(outcome, np.int32))).reshape(-1)]


def agreed_steps(steps: list[int], where) -> list[int]:
    """`steps` (a folder's checkpoint steps, as this process lists them), checked to be the
    same on every process before they try them one by one (`outcomes` pairs the processes'
    reads by position): a host that sees another list (a folder that is not shared storage,
    a stale listing) is a one-line CheckpointError on every host, not a hang."""
    if jax.process_count() == 1:
        return steps
    import zlib

    import numpy as np
    from jax.experimental import multihost_utils

    mine = np.array([len(steps), max(steps, default=-1), zlib.crc32(repr(sorted(steps)).encode()) & 0x7FFFFFFF],
                    np.int32)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 3)
    differs = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
    if differs:
        i = differs[0]
        raise CheckpointError(
            f"the processes list different checkpoint steps in {where} (process 0: {every[0][0]} up to step "
            f"{every[0][1]}; process {i}: {every[i][0]} up to step {every[i][1]}): every host must see the same "
            f"folder (shared storage)")
    return steps


_ABANDONED_READS = "_read_array_index_and_device_put"  # Orbax's per-array read coroutine
_ABANDONED_TASKS = ("async_deserialize", _ABANDONED_READS)  # the tasks asyncio reports, by coroutine name


def quiet_abandoned_reads() -> None:
    """When one array of an Orbax restore fails, Orbax abandons the reads of the others; Python
    reports each abandoned coroutine's exception at garbage collection ("Exception ignored
    in: <coroutine ...>" and a page of TensorStore spec per array) after the one-line
    CheckpointError has been said, and TensorStore's threads finishing them raise "Event loop
    is closed" (`cli.abandoned_async_work`). A `sys.unraisablehook` that drops exactly those,
    passing everything else on, installed once."""
    import sys
    import types

    previous = sys.unraisablehook
    if getattr(previous, "_jaxaccel_quiet", False):
        return

    def hook(unraisable):
        obj = unraisable.object
        if isinstance(obj, types.CoroutineType) and obj.cr_code.co_name == _ABANDONED_READS and \
                "orbax" in obj.cr_code.co_filename:
            return
        if abandoned_async_work(unraisable):  # their callbacks into Orbax's closed loop
            return
        previous(unraisable)

    hook._jaxaccel_quiet = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_QUIET_ASYNCIO)  # one instance: added once


class _AbandonedMetadataReads(logging.Filter):
    """Reading a folder's array metadata (the shape check) from a damaged OCDBT store fails
    one array's read and abandons the others' tasks, which asyncio reports at garbage
    collection ("Task exception was never retrieved" and a page of TensorStore spec) after the
    one-line error: exactly those records (TensorStore's async reads) are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        task = (message.startswith("Task exception was never retrieved") and
                any(f"coro=<{name}()" in message for name in _ABANDONED_TASKS))
        # the same abandoned read surfacing as its bare future (when it fails before its task is
        # awaited): TensorStore's own error, naming its spec
        future = message.startswith("Future exception was never retrieved") and "tensorstore_spec" in message
        # or wrapped in a task of its own (asyncio's _wrap_awaitable), naming TensorStore's spec
        wrapped = message.startswith("Task exception was never retrieved") and "tensorstore_spec" in message
        return not (task or future or wrapped)


_QUIET_ASYNCIO = _AbandonedMetadataReads()


def agreed_read(read, what: str) -> tuple[Any, str | None]:
    """`read()` on this process, then agreed with every other (`outcomes`): (its value, None)
    when every process read its part; (None, why, as this process saw it) when any could not.
    A CheckpointError from `read` (another model: the same on every process) is raised on
    every process after the agreement, `what` naming the step for those that did not see it."""
    quiet_abandoned_reads()
    value = error = mismatch = None
    try:
        value = read()
    except CheckpointError as e:
        mismatch = e
    except Exception as e:  # Orbax/TensorStore raise many types: a damaged or unreachable step
        error = first_line(e, 200)
    got = outcomes(0 if value is not None else 2 if mismatch is not None else 1)
    if mismatch is not None:
        raise mismatch
    if 2 in got:
        raise CheckpointError(f"{what} was written by a different model (process {got.index(2)} found the mismatch)")
    if not any(got):
        return value, None
    if error is not None:
        return None, error
    failed = [i for i, x in enumerate(got) if x]
    return None, f"process {failed[0]} could not read its part" + (
        f" (and {len(failed) - 1} more)" if len(failed) > 1 else "")


# Orbax saves a replicated array by slicing it across its replicas so they write in
# parallel. Each slice is an eager op compiled per shape and sharding (~30 ms each on CPU):
# for the many small arrays of a model (norm scales, biases, optimizer scalars) that costs
# more than the write it parallelises. Where a replica's slice would be smaller than this,
# one replica writes the whole array.
REPLICA_PARALLEL_MIN_BYTES = 1 << 20


def use_array_handler() -> None:
    """Register Orbax's jax.Array handler with the threshold above (idempotent). It is
    Orbax's process-wide registry: the handler registered there (Orbax's default, or one a
    user registered) is copied with every setting kept (its metadata store, primary host,
    replica id, ...) and only a threshold it does not set filled in; a handler of another
    class, or one that already sets a threshold, is left alone."""
    import orbax.checkpoint as ocp

    ArrayHandler = ocp.type_handlers.ArrayHandler
    current = ocp.type_handlers.get_type_handler(jax.Array)
    if type(current) is not ArrayHandler or getattr(current, "_min_slice_bytes_for_replica_parallel", 1) is not None:
        return
    kept = {"primary_host": "_primary_host", "replica_id": "_replica_id", "use_replica_parallel": "_use_replica_parallel",
            "max_replicas_for_replica_parallel": "_max_replicas_for_replica_parallel",
            "enable_write_sharding_file": "_enable_write_sharding_file",
            "array_metadata_store": "_array_metadata_store",
            "enable_replica_parallel_separate_folder": "_enable_replica_parallel_separate_folder",
            "dispatcher": "_dispatcher"}
    if not all(hasattr(current, attr) for attr in kept.values()):  # another Orbax version: leave it be
        return
    handler = ArrayHandler(**{arg: getattr(current, attr) for arg, attr in kept.items()},
                           min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES)
    absl_logger = logging.getLogger("absl")  # Orbax warns on every override; this one is deliberate
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl_logger.setLevel(level)


def _name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _stored_tree(item) -> Any:
    """The stored tree of shapes of an Orbax item (None: unreadable, which the restore that
    follows reports), through a handler of its own that is closed at once."""
    import orbax.checkpoint as ocp

    handler = ocp.StandardCheckpointHandler()
    try:
        return handler.metadata(item)
    except Exception:  # noqa: BLE001 - missing files, tensorstore errors of many types
        return None
    finally:
        handler.close()


def shape_difference(stored: Any, expected: Any) -> str | None:
    """How a stored parameter tree (Orbax metadata) differs from the expected one (a tree of
    ShapeDtypeStructs), named by the first parameter in the tree's order — the same one on
    every run, where Orbax's own error names whichever of its concurrent reads failed first.
    None: the same names and shapes."""
    if stored is None:
        return None
    stored = getattr(stored, "tree", stored)
    got = {_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
    want = {_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    extra = sorted(set(got) - set(want))
    if extra:
        return f"it has {extra[0]}, which this config does not"
    for name in want:  # the tree's own order, the same on every run
        if name not in got:
            return f"it has no {name}"
        have = tuple(getattr(got[name], "shape", ()))
        if have != tuple(want[name].shape):
            return f"{name} has shape {have}, this config expects {tuple(want[name].shape)}"
    return None


def is_jaxaccel_checkpoint(folder) -> bool:
    return (as_path(folder) / MARKER).is_file()


# A training run's folder, as the trainer writes it (jaxaccel.train.loop): the resolved
# config, and Orbax steps under checkpoints/<step>/ whose "state" item is the TrainState
# (step, params, opt_state, rng). Readers of a run use only these names, never the trainer.
RUN_CONFIG = "config.yaml"
RUN_CHECKPOINTS = "checkpoints"
RUN_STATE_ITEM = "state"
RUN_META_ITEM = "meta"


def is_run_dir(folder) -> bool:
    folder = as_path(folder)
    return (folder / RUN_CONFIG).is_file() and (folder / RUN_CHECKPOINTS).is_dir()


def run_export(folder) -> Path | None:
    """A training run's model/ when it is the run's latest state, else None: a run folder whose
    model/ holds a model, unless the run holds a checkpoint newer than that model's trained
    steps (the run was resumed past its export, and still goes or was killed: its checkpoints
    are the newer model)."""
    folder = as_path(folder)
    model = folder / "model"
    if is_jaxaccel_checkpoint(folder) or not is_jaxaccel_checkpoint(model):
        return None
    try:
        trained = (read_meta(model).get("info") or {}).get("trained_steps")
        steps = [int(p.name) for p in (folder / RUN_CHECKPOINTS).iterdir() if p.name.isdigit()] \
            if (folder / RUN_CHECKPOINTS).is_dir() else []
    except (CheckpointError, OSError, AttributeError):
        return model  # (an unreadable model says so when it is loaded)
    if isinstance(trained, int) and steps and max(steps) > trained and is_run_dir(folder):
        return None
    return model


def load_run_params(folder, dtype: str | None = None, shardings_fn=None) -> tuple[ModelConfig, Any, dict]:
    """(model config, scanned params, meta) from the latest readable checkpoint of a training
    run (still going, killed or finished). Only the parameters are read — never the optimizer
    moments — each straight into its target sharding (`shardings_fn(config, "scanned")`) and
    dtype; the run's files are only read (read-only manager: a live run is not disturbed)."""
    import orbax.checkpoint as ocp

    folder = as_path(folder)
    try:
        run = parse_yaml((folder / RUN_CONFIG).read_bytes(), RUN_CONFIG)
        config = from_dict(ModelConfig, run.get("model") or {}, prefix="model")
    except (OSError, ConfigError) as e:
        raise CheckpointError(f"{folder}/{RUN_CONFIG}: not a readable training config: "
                              f"{first_line(e)}") from None
    if dtype is not None:
        config = from_dict(ModelConfig, {**to_dict(config), "param_dtype": dtype, "dtype": dtype})
    target = restore_target(config, "scanned", shardings_fn)
    restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, dtype=t.dtype), target)
    options = ocp.CheckpointManagerOptions(create=False, read_only=True, cleanup_tmp_directories=False)
    manager = ocp.CheckpointManager(folder / RUN_CHECKPOINTS, options=options,
                                    item_handlers={RUN_STATE_ITEM: ocp.PyTreeCheckpointHandler()})
    # The step is read through its handler, not manager.restore: that ends in a barrier of all
    # processes, where the others would wait forever for one whose read failed. (Its folder is
    # the step number, the manager's default name format, which no run changes.)
    handler = ocp.PyTreeCheckpointHandler()
    errors = []
    try:
        for step in agreed_steps(sorted(manager.all_steps(), reverse=True), folder / RUN_CHECKPOINTS):
            def read(step=step):  # a step being written or corrupted: the one before
                item = folder / RUN_CHECKPOINTS / str(step) / RUN_STATE_ITEM
                stored = _stored_tree(item)  # unreadable metadata: a damaged step, which the restore sets aside
                stored = getattr(stored, "tree", stored)
                difference = shape_difference(stored["params"], target) if isinstance(stored, dict) and \
                    "params" in stored else None
                if difference is not None:  # config.yaml edited after the run, or another run's checkpoints
                    raise CheckpointError(f"checkpoint step {step} of {folder} does not match the model in "
                                          f"{RUN_CONFIG}: {difference}")
                return handler.restore(item, args=ocp.args.PyTreeRestore(
                    item={"params": target}, restore_args={"params": restore_args}, partial_restore=True))

            out, reason = agreed_read(read, f"checkpoint step {step} of {folder}")
            if reason is not None:
                errors.append(f"step {step}: {reason}")
                continue
            if errors:  # the trainer resuming here says so too: a conversion or a decode of the run must
                import warnings

                warnings.warn(f"training run {folder}: the newest checkpoint is unreadable ({errors[0]}); "
                              f"read step {step} instead", stacklevel=2)
            return config, out["params"], {"step": int(step), "layout": "scanned",
                                           "info": _run_step_info(folder / RUN_CHECKPOINTS / str(step))}
    finally:
        handler.close()
        manager.close()
    detail = f" ({'; '.join(errors)})" if errors else ""
    raise CheckpointError(f"training run {folder} has no readable checkpoint yet{detail}")


def _run_step_info(step_folder) -> dict:
    """The `info` a training step saved in its meta item (what an export would carry, e.g. the
    SkipDecode schedule the run fine-tunes under); {} when the step has none or it is
    unreadable (older trainers saved none)."""
    try:
        meta = json.loads((step_folder / RUN_META_ITEM / "metadata").read_bytes())
    except (OSError, ValueError):
        return {}
    info = meta.get("info") if isinstance(meta, dict) else None
    return dict(info) if isinstance(info, dict) else {}


# What a model folder holds besides MARKER: replaced by a new save, together with the marker.
# A folder's tokenizer is one unit: a write that has a tokenizer replaces all of these, one that
# has none leaves them (a model loaded from the folder then reads that tokenizer, as it reads
# one copied beside it; a vocabulary that does not fit is warned about).
TOKENIZER_ENTRIES = ("tokenizer.model", "tokenizer.json", *SIDE_FILES)
MODEL_ENTRIES = ("params", *TOKENIZER_ENTRIES)
# Inside a local model folder while a save is under way: the new model being written, then
# the old one's entries set aside until the new ones are in.
STAGING, SET_ASIDE = ".jaxaccel-saving", ".jaxaccel-replaced"


def holds_earlier_save(folder: Path, marker: str = MARKER) -> bool:
    """Whether a local folder holds what a save wrote: its `marker` file. (A killed local save
    leaves its params in the staging folder, never a bare params/: an Orbax checkpoint there
    is someone else's.)"""
    return (folder / marker).is_file()


def save_model(folder: str | Path, config: ModelConfig, params: Any, *, tokenizer=None,
               eos_token_ids: tuple[int, ...] = (), bos_token_id: int | None = None, extra: dict | None = None) -> Path:
    """Write a model folder. The marker file is written last, so a folder without it (a save
    that was killed) is never taken for a checkpoint.

    A local save is written whole into a staging folder inside `folder` first (the same file
    system, whatever links lead there) and moved in by renames only when complete: a save
    that fails (a full disk) leaves an earlier model in `folder` as it was, and a new save
    replaces every file of the old model (a tokenizer the new model does not have included);
    other files in `folder` are kept. On gs:// (no renames) the old model's files are deleted
    first and the new ones written in place."""
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils

    check_savable(tokenizer, extra)
    folder = as_path(folder)
    local = not str(folder).startswith("gs://")
    target = folder / STAGING if local else folder
    main = jax.process_index() == 0  # the array save is collective; plain files come from process 0
    if main:
        try:
            if local:
                recover_move(folder)  # a save killed while moving in: the earlier model back first
                if target.exists():  # a killed save's
                    shutil.rmtree(target)
                target.mkdir(parents=True, exist_ok=True)
            else:
                folder.mkdir(parents=True, exist_ok=True)
                earlier = (folder / MARKER).is_file()  # else other files (an HF model's tokenizer) stay
                (folder / MARKER).unlink(missing_ok=True)
                for name in MODEL_ENTRIES if earlier or tokenizer is not None else ("params",):
                    if (folder / name).is_dir():
                        (folder / name).rmtree()
                    elif (folder / name).exists():
                        (folder / name).unlink()
        except OSError as e:
            raise CheckpointError(f"cannot write the model to {folder} ({write_error_reason(e)})") from None
    multihost_utils.sync_global_devices("jaxaccel_save_model_start")
    use_array_handler()
    ckptr = ocp.StandardCheckpointer()
    try:
        ckptr.save(target / "params", params)
        ckptr.wait_until_finished()
    except Exception as e:  # a full disk: TensorStore's ValueError or an OSError, from Orbax's threads
        if local and main:
            shutil.rmtree(target, ignore_errors=True)
        kept = "any model already there is left as it was" if local else \
            f"the folder is left without {MARKER}, so it is not taken for a model (retry with overwrite=True)"
        raise CheckpointError(f"saving the model to {folder} failed ({write_error_reason(e)}); {kept}") from e
    finally:
        ckptr.close()
    if main:
        try:
            _write_meta(target, config, params, tokenizer, eos_token_ids, bos_token_id, extra)
        except Exception as e:  # a full disk; a tokenizer that cannot save itself, checked up front too
            if local:
                shutil.rmtree(target, ignore_errors=True)
            raise CheckpointError(f"saving the model to {folder} failed ({write_error_reason(e)})") from None
        if local:
            _move_in(target, folder)
    multihost_utils.sync_global_devices("jaxaccel_save_model_end")
    return folder


def check_savable(tokenizer, extra: dict | None) -> None:
    """A one-line CheckpointError, before anything is written, for what a model folder cannot
    hold: a tokenizer without `save(folder)` (from_params takes any encode/decode object) and
    `info` that is not JSON."""
    if tokenizer is not None and not callable(getattr(tokenizer, "save", None)):
        raise CheckpointError(f"the model's tokenizer ({type(tokenizer).__name__}) has no save(folder) method, so a "
                              f"model folder cannot hold it; save without it (tokenizer=None) and keep it yourself")
    try:
        json.dumps(extra or {})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the model's info cannot be saved as JSON ({e}); use plain numbers, strings, "
                              f"lists and dicts") from None


def replaced_names(folder: Path, new: Sequence[str], earlier: Sequence[str] | None) -> list[str]:
    """The names in `folder` that a save or export writing `new` replaces (those present, in
    order): all of `earlier` (the entries of a model of its kind there, replaced whole), or
    with none there only what it writes — and with a tokenizer among that every tokenizer
    file, a folder holding one tokenizer (another model's tokenizer stays when it brings none)."""
    if earlier is None:
        earlier = [*new, *(TOKENIZER_ENTRIES if set(new) & set(TOKENIZER_ENTRIES) else ())]
    return [n for n in dict.fromkeys(earlier) if (folder / n).exists() or (folder / n).is_symlink()]


def _move_in(staging: Path, folder: Path) -> None:
    """Replace the model in `folder` by the complete one in `staging`, the marker out first
    and in last (`move_in`). Over an earlier save every entry of that model goes (a tokenizer
    the new model lacks included); in any other folder (an HF model's, with overwrite) only what
    the new save writes is replaced (with a tokenizer: every tokenizer file) — a tokenizer there
    stays when the new model has none."""
    new = [n for n in MODEL_ENTRIES if (staging / n).exists()] + [MARKER]
    old = replaced_names(folder, new, [MARKER, *MODEL_ENTRIES] if holds_earlier_save(folder) else None)
    move_in(staging, folder, old, new, "the saved model")


def move_in(staging: Path, folder: Path, old: list[str], new: list[str], what: str) -> None:
    """Replace the files `old` of `folder` by the files `new` of `staging` (both on one file
    system; a model's marker first in `old` and last in `new`, so the folder is never taken
    for a model in between): the old ones are renamed aside, the new ones in, then the old
    ones deleted. If a rename fails, the old model is put back (and the new one left in
    `staging`, named in the error). Also the Hugging Face export's move (config.json its
    marker)."""
    aside = folder / SET_ASIDE
    moved_out, moved_in = [], []
    try:
        aside.mkdir()
        # What is about to move, for `recover_move` after a kill part-way (written before any rename).
        journal = aside / (JOURNAL + ".tmp")
        journal.write_text(json.dumps({"old": old, "new": new, "staging": staging.name}))
        journal.rename(aside / JOURNAL)
        for name in old:
            (folder / name).rename(aside / name)
            moved_out.append(name)
        for name in new:
            (staging / name).rename(folder / name)
            moved_in.append(name)
    except OSError as e:
        _put_back(folder, staging, moved_in, moved_out)
        raise CheckpointError(f"moving {what} into {folder} failed ({write_error_reason(e)}); the earlier "
                              f"model is back in place, the new one is in {staging}") from None
    shutil.rmtree(aside, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def _put_back(folder: Path, staging: Path, moved_in: list[str], moved_out: list[str]) -> None:
    """Undo part of a `move_in`: the new files moved in go back to `staging`, the old ones set
    aside come back; SET_ASIDE is removed."""
    for name in reversed(moved_in):
        (folder / name).rename(staging / name)
    for name in reversed(moved_out):  # the marker (set aside first) back last: a kill part-way
        (folder / SET_ASIDE / name).rename(folder / name)  # never leaves it beside missing files
    shutil.rmtree(folder / SET_ASIDE, ignore_errors=True)


JOURNAL = ".moves.json"  # in SET_ASIDE: the names `move_in` is moving


def _there(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def recover_move(folder: Path) -> str | None:
    """Finish what a `move_in` killed part-way left in a local `folder` (SET_ASIDE is there).
    The new marker is moved in last: if it is in the folder, the move was complete (or had not
    begun: the old marker is still there) and the set-aside files are deleted; otherwise the
    new files moved in so far go back to the staging folder (deleted with it) and the old
    model is put back — the earlier model is never lost to a kill. The old files are all set
    aside before the first new one moves, so a new name in the folder is a moved-in file only
    once every old one is aside. Returns "restored", "finished" or None (nothing to recover).
    A SET_ASIDE without its journal was made by a kill before any rename: nothing in it."""
    aside = folder / SET_ASIDE
    if not aside.is_dir():
        return None
    try:
        journal = json.loads((aside / JOURNAL).read_bytes())
        old, new, staging = list(journal["old"]), list(journal["new"]), folder / str(journal["staging"])
    except (OSError, ValueError, KeyError, TypeError):
        shutil.rmtree(aside)
        return None
    if new and _there(folder / new[-1]):
        shutil.rmtree(aside)
        shutil.rmtree(staging, ignore_errors=True)
        return "finished"
    moved_out = [n for n in old if _there(aside / n)]
    moved_in = []
    if len(moved_out) == len(old):
        staging.mkdir(exist_ok=True)
        moved_in = [n for n in new if _there(folder / n) and not _there(staging / n)]
    _put_back(folder, staging, moved_in, moved_out)
    shutil.rmtree(staging, ignore_errors=True)
    return "restored"


def write_error_reason(e: Exception) -> str:
    """The operating system's reason for a failed write (`No space left on device`), also
    when TensorStore gives it inside a long message (`[os_error_code='28']`)."""
    import os
    import re

    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    code = re.search(r"os_error_code='(\d+)'", str(e))
    return os.strerror(int(code.group(1))) if code else first_line(e, 200)


def _write_meta(folder, config, params, tokenizer, eos_token_ids, bos_token_id, extra) -> None:
    from jaxaccel.model.transformer import is_scanned

    if tokenizer is not None:
        tokenizer.save(folder)
    meta = {"format": FORMAT, "version": VERSION, "model": to_dict(config),
            "layout": "scanned" if is_scanned(params) else "unrolled",
            "eos_token_ids": list(eos_token_ids), "bos_token_id": bos_token_id, **(extra or {})}
    if str(folder).startswith("gs://"):  # object writes are atomic; there is no rename
        (folder / MARKER).write_text(json.dumps(meta, indent=2))
        return
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(folder / MARKER)


def read_meta(folder) -> dict:
    try:
        meta = json.loads((as_path(folder) / MARKER).read_bytes())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise CheckpointError(f"{folder}/{MARKER} is unreadable: {first_line(e)}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{folder}/{MARKER}: not a jaxaccel model (not a JSON object)")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder}/{MARKER}: not a jaxaccel model (format {meta.get('format')!r})")
    if not isinstance(meta.get("info") or {}, dict):
        raise CheckpointError(f"{folder}/{MARKER}: info must be a JSON object, got {meta['info']!r:.60}")
    version = meta.get("version", VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= VERSION:
        raise CheckpointError(f"{folder}/{MARKER}: format version {version!r} is not one this jaxaccel reads "
                              f"(1 to {VERSION}): a newer jaxaccel wrote it")
    if not isinstance(meta.get("add_bos", False), bool):
        raise CheckpointError(f"{folder}/{MARKER}: add_bos must be true or false, got {meta['add_bos']!r:.60}")
    return meta


def restore_target(config: ModelConfig, layout: str, shardings_fn=None) -> Any:
    """ShapeDtypeStructs of the parameters carrying their target shardings: `shardings_fn(config,
    layout)`, or the first device when None — never the layout stored with the checkpoint (a
    run trained on a pod mesh must load on a workstation)."""
    from jaxaccel.model.transformer import param_shapes

    shapes = param_shapes(config, layout)
    if shardings_fn is not None:
        shardings = shardings_fn(config, layout)
    else:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def load_model(folder: str | Path, dtype: str | None = None, shardings_fn=None) -> tuple[ModelConfig, Any, dict]:
    """Restore (config, params, meta). `shardings_fn(config, layout)` gives a tree of
    shardings for the stored layout (None: default device). `dtype` overrides the stored one."""
    import orbax.checkpoint as ocp

    folder = as_path(folder)
    meta = read_meta(folder)
    try:
        config = from_dict(ModelConfig, meta["model"])
    except (ConfigError, KeyError) as e:
        raise CheckpointError(f"{folder}/{MARKER}: bad model config: {e}") from None
    if dtype is not None:
        config = from_dict(ModelConfig, {**to_dict(config), "param_dtype": dtype, "dtype": dtype})
    layout = meta.get("layout", "unrolled")
    from jaxaccel.model.transformer import LAYOUTS

    if layout not in LAYOUTS:
        raise CheckpointError(f"{folder}/{MARKER}: unknown parameter layout {layout!r} (one of {', '.join(LAYOUTS)})")
    target = restore_target(config, layout, shardings_fn)
    if not (folder / "params").is_dir():
        raise CheckpointError(f"{folder}: jaxaccel.json is present but params/ is missing")
    # Through the handler, not StandardCheckpointer.restore (which ends in a barrier of all
    # processes), and agreed on: a host that cannot read its shards makes every host raise.
    handler = ocp.StandardCheckpointHandler()

    def read():  # the shapes first, inside the agreed read: a host that cannot check them must not wait alone
        difference = shape_difference(_stored_tree(folder / "params"), target)
        if difference is not None:
            raise CheckpointError(f"{folder}/params does not match the model in {MARKER}: {difference}")
        return handler.restore(folder / "params", args=ocp.args.StandardRestore(target))

    try:
        params, reason = agreed_read(read, f"{folder}/params")
    finally:
        handler.close()
    if reason is not None:
        raise CheckpointError(f"{folder}/params could not be restored: {reason}")
    return config, params, meta
