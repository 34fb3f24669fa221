"""Orbax checkpoints of the whole training state (params, optimizer state, step, RNG) plus
the data position, saved asynchronously every N steps, keeping the last K.

Orbax writes each step into a temporary folder and renames it when complete, so a save that
was killed is never listed. A listed step that cannot be read (corrupted files) is reported
and skipped for the previous one; when no listed step can be read, the run refuses to start
over (one line) and changes nothing. A step written by a different model shape is an error
that names the first mismatching parameter. Several processes (a pod) agree on each step
they try, so one that cannot read its part sends every process back to the previous step. A
save that fails (a full disk) is a one-line CheckpointError; the steps committed before it
stay as they were.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import jax

from jaxaccel.errors import CheckpointError, first_line
from jaxaccel.model.checkpoint import RUN_META_ITEM as META  # what run readers expect
from jaxaccel.model.checkpoint import RUN_STATE_ITEM as STATE
from jaxaccel.model.checkpoint import shape_difference, write_error_reason
from jaxaccel.train.config import CheckpointConfig
from jaxaccel.train.hosts import decided_by_process_0

REMOTE_READ_ATTEMPTS = 3  # reads of a step on gs:// before it counts as unreadable
_sleep = time.sleep  # between those reads (tests replace it)


@dataclass
class Restored:
    step: int
    state: Any
    meta: dict
    skipped: list[tuple[int, str]]


class Checkpoints:
    def __init__(self, directory: str | Path, cfg: CheckpointConfig, read_only: bool = False):
        """read_only: for readers of a run that may still be training — nothing is created,
        cleaned up or set aside."""
        import orbax.checkpoint as ocp

        from jaxaccel.model.checkpoint import use_array_handler

        use_array_handler()
        self._ocp = ocp
        self.read_only = read_only
        self.directory = directory if str(directory).startswith("gs://") else Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save,
                                               create=not read_only, cleanup_tmp_directories=not read_only,
                                               read_only=read_only)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={STATE: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler()})
        self._state_handler, self._meta_handler = ocp.StandardCheckpointHandler(), ocp.JsonCheckpointHandler()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def agreed_steps(self) -> list[int]:
        """`steps()`, checked to be the same list on every process (a collective: all call it)."""
        from jaxaccel.model.checkpoint import agreed_steps

        return agreed_steps(self.steps(), self.directory)

    def save(self, step: int, state: Any, meta: dict) -> None:
        ocp = self._ocp
        with self._save_errors():  # also reports a failed previous save (asynchronous: it ends here)
            self.manager.save(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                                               META: ocp.args.JsonSave(meta)}), force=True)

    @contextlib.contextmanager
    def _save_errors(self):
        """A save that failed (a full disk, a folder that became read-only) is a one-line
        CheckpointError naming the folder. Orbax's half-written step stays a temporary folder,
        never listed, and is cleaned up when the run is resumed."""
        try:
            yield
        except Exception as e:
            raise CheckpointError(f"saving a checkpoint in {self.directory} failed ({write_error_reason(e)}); the "
                                  f"checkpoints saved before it are intact: once that is fixed, rerun the command to "
                                  f"resume") from e

    def check_shapes(self, step: int, abstract_state: Any) -> None:
        """Raise CheckpointError naming the first parameter whose stored shape differs."""
        stored = self.manager.item_metadata(step)[STATE]
        # the step's metadata file is missing or empty: a damaged step, not another model
        if not jax.tree_util.tree_leaves(getattr(stored, "tree", stored)):
            raise _Unreadable(f"checkpoint step {step} has no readable state metadata")
        difference = shape_difference(stored, abstract_state)
        if difference is not None:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} was written by a different model: "
                                  f"{difference}")

    def meta(self, step: int) -> dict | None:
        """`step`'s meta item alone (small: no arrays are read); None when unreadable (a
        damaged step: the restore sets it aside and the caller checks the one it reads)."""
        from jaxaccel.model.checkpoint import as_path

        try:
            meta = self._meta_handler.restore(as_path(f"{self.directory}/{step}") / META, args=self._ocp.args.JsonRestore())
        except Exception:
            return None
        return dict(meta) if isinstance(meta, Mapping) else None

    def settings(self, step: int) -> dict | None:
        """The run's settings saved in `step`'s meta (None: unreadable, or a step older than
        the copy)."""
        config = (self.meta(step) or {}).get("config")
        return config if isinstance(config, dict) else None

    def restore_latest(self, abstract_state: Any, steps: list[int] | None = None, *,
                       check_step: Callable[[int], None] | None = None) -> Restored | None:
        """The newest step every process can read (None when there is none yet). An
        unreadable step is set aside for the one before it; on gs:// a failed read is retried
        first (an object store's error may be transient). With several processes they agree on each step (`agreed_read`): one that
        cannot read its part sends all of them back a step. When steps exist but none can be
        read, nothing is set aside and the run refuses to start over: its metrics and config
        would be rewritten from step 0 over a problem that may be passing. `steps`: the
        `agreed_steps()` the caller already has (every process passes them, or none does).
        `check_step(step)` may refuse (raise) the newest readable step before any unreadable
        one is set aside (nothing is changed)."""
        from jaxaccel.model.checkpoint import agreed_read

        skipped: list[tuple[int, str]] = []
        for step in reversed(self.agreed_steps() if steps is None else steps):
            out, reason = agreed_read(lambda: self._read(step, abstract_state),
                                      f"checkpoint step {step} in {self.directory}")
            if reason is not None:
                skipped.append((step, reason))
                continue
            if check_step is not None:
                check_step(step)
            for bad, reason in skipped:
                moved = self._set_aside(bad)
                print(f"warning: checkpoint step {bad} is unreadable ({reason}); resuming from step {step}"
                      f"{f' (the bad one is kept in {moved})' if moved else ''}", file=sys.stderr)
            return Restored(step=step, state=out[STATE], meta=dict(out[META]), skipped=skipped)
        if skipped:
            step, reason = skipped[0]
            raise CheckpointError(
                f"none of the {len(skipped)} checkpoint(s) in {self.directory} can be read (step {step}: {reason}); "
                f"nothing was changed: rerun once they are reachable, or move that folder away to start the run over")
        return None

    def _read(self, step: int, abstract_state: Any) -> dict:
        """This process's part of `step`, through the item handlers: manager.restore ends in a
        barrier of all processes, which the others would wait at forever for one whose read
        failed. On gs:// a failed read is tried REMOTE_READ_ATTEMPTS times."""
        from jaxaccel.model.checkpoint import as_path

        ocp = self._ocp
        folder = as_path(f"{self.directory}/{step}")  # the manager's default step name format

        def read():
            self.check_shapes(step, abstract_state)
            return {STATE: self._state_handler.restore(folder / STATE, args=ocp.args.StandardRestore(abstract_state)),
                    META: self._meta_handler.restore(folder / META, args=ocp.args.JsonRestore())}

        for attempt in range(REMOTE_READ_ATTEMPTS - 1 if isinstance(self.directory, str) else 0):
            try:
                return read()
            except CheckpointError:
                raise
            except Exception:
                _sleep(2.0 * (attempt + 1))
        return read()

    def _set_aside(self, step: int) -> str | None:
        """Move an unreadable step out of the manager's folder (the run will write it anew) to
        `unreadable-checkpoints/` beside it. Process 0 moves it (on gs://, where there is no
        rename, each object is copied — a server-side copy — and the step then deleted; a copy
        that fails is a CheckpointError and nothing is deleted); every process learns process
        0's outcome, then re-reads the step list."""
        from jax.experimental import multihost_utils

        if self.read_only:
            return None

        def move():
            try:
                return self._move_aside(step)
            except CheckpointError:  # (an OSError too: ModelLoadError is a FileNotFoundError) already says it all
                raise
            except OSError as e:  # a local move (a full or read-only disk)
                raise CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable and could not be "
                                      f"moved aside ({e})") from None

        moved = decided_by_process_0(move, lambda: CheckpointError(
            f"checkpoint step {step} could not be set aside by process 0 (its error is in its output)"))
        multihost_utils.sync_global_devices(f"jaxaccel_set_aside_{step}")
        self.manager.reload()
        return moved

    def _move_aside(self, step: int) -> str:
        """Process 0's part of `_set_aside`: the step moved (copied, then deleted, on gs://) to
        unreadable-checkpoints/; returns where it is now."""
        stamp = f"{step}-{int(time.time())}"
        if not isinstance(self.directory, str):
            import shutil

            dst = self.directory.parent / "unreadable-checkpoints" / stamp
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(dst))
            return str(dst)
        from etils import epath

        src = epath.Path(self.directory, str(step))
        dst = epath.Path(self.directory).parent / "unreadable-checkpoints" / stamp
        try:
            for folder, _, files in src.walk():  # (epath refuses rglob on GCS)
                for name in files:
                    target = dst / (epath.Path(folder) / name).relative_to(src)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    (epath.Path(folder) / name).copy(target)
        except Exception as e:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable and could not be copied "
                                  f"aside to {dst} ({first_line(e)}); nothing was deleted: rerun once the bucket is "
                                  f"reachable") from None
        try:
            src.rmtree()
        except Exception as e:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable; it was copied to {dst} "
                                  f"but deleting it failed part-way ({first_line(e)}): rerun once the bucket is "
                                  f"reachable (the copy is kept)") from None
        return str(dst)

    def wait(self) -> None:
        with self._save_errors():
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            if not self.read_only:
                self.wait()
        finally:
            try:
                self._state_handler.close()
                self._meta_handler.close()
            finally:
                with self._save_errors():  # Orbax's close waits again and may raise a failed save anew
                    self.manager.close()


class _Unreadable(Exception):
    """A step whose files are damaged (restore_latest skips it for the previous one)."""
