"""Shared command-line plumbing: one-line errors, exit status 2, never a traceback for bad input."""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import warnings
from typing import Callable, Sequence

from jaxaccel.errors import Interrupted, JaxaccelError, Preempted, first_line

EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 143  # 128 + SIGTERM: stopped by a preemption notice, a checkpoint saved
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C (a training run saved a checkpoint first)
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: stdout's reader closed it (`| head`)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (`error: ...`) and exit 2, without the usage dump."""

    def error(self, message: str):  # noqa: D401 - argparse API
        sys.stderr.write(f"error: {message} (see --help)\n")
        raise SystemExit(EXIT_BAD_INPUT)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help with each option's default, unless it is None/False or the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default  # (by identity: 0 == False, and a default of 0 is worth showing)
        if (action.option_strings and default is not None and default is not False and default != []
                and default != "" and default is not argparse.SUPPRESS and "default" not in text.lower()):
            text += " (default: %(default)s)"
        return text


def csv_list(text: str, cast: Callable = str, what: str = "", allow_empty: bool = False) -> tuple:
    """A comma-separated option value as a tuple: an empty item ("8,,16", "", ","), an item
    `cast` refuses, or one given twice (the work would run twice) is a one-line error, exit 2;
    an empty text is () when `allow_empty`."""
    where = f"{what} " if what else ""
    if allow_empty and not text.strip():
        return ()
    items = [x.strip() for x in text.split(",")]
    if not all(items):
        fail(f"{where}{text!r}: expected a comma-separated list without empty items")
    try:
        values = tuple(cast(x) for x in items)
    except ValueError:
        kind = {int: "integers", float: "numbers"}.get(cast, "values")
        fail(f"{where}{text!r}: expected a comma-separated list of {kind}")
    twice = next((items[i] for i, v in enumerate(values) if v in values[:i]), None)
    if twice is not None:
        fail(f"{where}{text!r}: {twice} is given twice")
    return values


def explain_options(parser: argparse.ArgumentParser, common: dict[str, str]) -> None:
    """Every subcommand of `parser` shows its defaults, and options without help take the
    `common` text of their dest (the --json, --runs, --batches every benchmark has)."""
    for choice in parser._subparsers._group_actions[0].choices.values() if parser._subparsers else ():
        choice.formatter_class = DefaultsHelpFormatter
        for action in choice._actions:
            if action.help is None and action.dest in common:
                action.help = common[action.dest]


def fail(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(EXIT_BAD_INPUT)


def os_error_message(e: OSError) -> str:
    """`[Errno 13] Permission denied: 'x'` -> `x: permission denied` (one line)."""
    if e.filename is None or not e.strerror:
        return first_line(e)
    target = f" -> {e.filename2}" if e.filename2 else ""
    return f"{e.filename}{target}: {e.strerror[0].lower()}{e.strerror[1:]}"


def writable_output(path: str | os.PathLike, *, folder: bool = False, what: str = "output",
                    remote: bool = False) -> None:
    """Check before any work that `path` (a file, or with folder=True a directory) can be
    written, creating nothing: an existing file must be writable; otherwise the nearest
    existing folder above it must take a new file (a probe file is written there and
    removed). Raises InvalidArgumentError with one line otherwise, so a long run never ends
    in a failed write. A gs:// path is left to the writer where it takes one (`remote`) and
    refused where it does not (pathlib would write the local folder "gs:/b/x", exit 0)."""
    import tempfile

    from jaxaccel.errors import InvalidArgumentError
    from jaxaccel.files import unsupported_location

    path = os.fspath(path)
    if problem := unsupported_location(path, remote=remote):
        raise InvalidArgumentError(f"{what} {problem}")
    if "://" in path:
        return
    if os.path.isdir(path) and not folder:
        raise InvalidArgumentError(f"{what} {path!r} is a folder; give a file name")
    if os.path.exists(path) and not os.path.isdir(path):
        if folder:
            raise InvalidArgumentError(f"{what} {path!r} is a file, not a folder")
        if not os.access(path, os.W_OK):
            raise InvalidArgumentError(f"cannot write the {what} {path!r}: it is read-only")
        return
    probe_in = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    while not os.path.exists(probe_in):
        probe_in = os.path.dirname(probe_in)
    if not os.path.isdir(probe_in):
        raise InvalidArgumentError(f"cannot write the {what} {path!r}: {probe_in} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=probe_in, prefix=".jaxaccel-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise InvalidArgumentError(f"cannot write the {what} {path!r}: {probe_in} is not writable "
                                   f"({(e.strerror or str(e)).lower()})") from None


TRACEBACK_ENV = "JAXACCEL_TRACEBACK"  # set to 1: errors keep their traceback (debugging jaxaccel itself)


# After a Ctrl-C, the seconds the command has to unwind (its `finally` blocks and `with`
# exits remove temporary folders) before it is ended anyway.
UNWIND_S = 10.0


def _stop_now(signum=None, frame=None) -> None:
    """`interrupted` and exit 130 at once. Every file jaxaccel writes survives a kill at any
    moment (atomic writes, journaled moves, checkpoints committed last), so this loses nothing
    but temporary folders that are not yet removed."""
    try:
        os.write(2, b"\ninterrupted\n")
        sys.stdout.flush()
    except (OSError, ValueError):  # a closed pipe
        pass
    finally:
        os._exit(EXIT_INTERRUPTED)


_ctrl_c_pressed = False


def _on_ctrl_c(signum, frame) -> None:
    """A command's Ctrl-C: KeyboardInterrupt, so the command unwinds and cleans up, then
    `run_cli` ends the process with `_stop_now` — returning through Python's shutdown instead
    waited forever behind background work cut off mid-way (Orbax's save threads) or crashed in
    it (an XLA compile). A KeyboardInterrupt raised inside a garbage-collector callback is
    swallowed and the command goes on: after UNWIND_S seconds, or at a second Ctrl-C, it ends
    at once."""
    global _ctrl_c_pressed
    if _ctrl_c_pressed:
        _stop_now()
    _ctrl_c_pressed = True
    import threading

    timer = threading.Timer(UNWIND_S, _stop_now)
    timer.daemon = True
    timer.start()
    raise KeyboardInterrupt


def install_ctrl_c_handler(unwind: bool = True) -> None:
    """Install this command process's Ctrl-C handling: `_on_ctrl_c` (unwind, then end), or
    with unwind=False `_stop_now` (while jaxaccel itself imports: nothing to clean up yet).
    Left alone: a process that ignores SIGINT (a background job of a shell script), one not in
    its main thread, and $JAXACCEL_TRACEBACK (Ctrl-C shows where the command was). A training
    run installs its own handler for its loop: a first Ctrl-C checkpoints the step, a second
    one comes back here."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or _traceback_wanted():
        return
    if signal.getsignal(signal.SIGINT) in (signal.default_int_handler, _stop_now, _on_ctrl_c):
        signal.signal(signal.SIGINT, _on_ctrl_c if unwind else _stop_now)


def _traceback_wanted() -> bool:
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def is_command_process() -> bool:
    """Whether this process was started as a jaxaccel command: `python -m jaxaccel.X` or a
    `jaxaccel-X` console script (not a program or notebook that imports jaxaccel)."""
    argv = list(getattr(sys, "orig_argv", ()))
    i = 1
    while i < len(argv):  # the interpreter's own options, up to the program
        word = argv[i]
        if word == "-m":
            return i + 1 < len(argv) and argv[i + 1].split(".")[0] == "jaxaccel"
        if word == "-c":
            return False
        if word in ("-X", "-W"):  # an option with its value in the next word
            i += 2
            continue
        if word.startswith("-"):
            i += 1
            continue
        name = os.path.basename(word)  # a script: a console script of ours, not any jaxaccel-*.py
        return name.startswith("jaxaccel-") and not name.endswith(".py")
    return False


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run `main`, turning jaxaccel's typed errors into `error: <message>` + exit 2."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # Warnings are one line too (`warning: ...`), not a source location and a code excerpt.
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    if _traceback_wanted():
        return main(argv)
    if argv is None:  # the command's own process
        install_ctrl_c_handler()
        # Text the terminal's encoding cannot show (generated text under a cp1252 console or
        # PYTHONIOENCODING) prints as "?" rather than ending the command in a traceback after
        # its work; `--output json` (ASCII escapes) is the lossless form.
        with contextlib.suppress(AttributeError, ValueError):
            sys.stdout.reconfigure(errors="replace")
    previous = sys.unraisablehook
    sys.unraisablehook = lambda u: None if abandoned_async_work(u) else previous(u)
    failed = False
    try:
        return main(argv)
    except JaxaccelError as e:
        failed = True
        fail(first_line(e))
    except BrokenPipeError:  # the reader went away (`... | head`): stop quietly, as a SIGPIPE'd tool does
        if argv is None:  # the interpreter's flush of stdout at exit would raise it again
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as e:  # a path the user gave that cannot be read or written, a full disk...
        failed = True
        fail(os_error_message(e))
    except Preempted as e:
        sys.stderr.write(f"stopped: {e}\n")
        return EXIT_INTERRUPTED if isinstance(e, Interrupted) else EXIT_PREEMPTED
    except KeyboardInterrupt:
        if argv is None:
            _stop_now()
        sys.stderr.write("interrupted\n")
        return EXIT_INTERRUPTED
    except Exception as e:
        if not is_storage_error(e):
            raise
        failed = True
        fail(f"{first_line(e)} (check the bucket, the network and the credentials)")
    finally:
        # A command-line process (argv None: sys.argv) that failed exits next: the exceptions
        # of work it abandoned (pending restore coroutines collected at exit, each printing a
        # multi-line TensorStore spec) must not follow its one-line error. Called with argv
        # (tests, scripts) the process goes on, and so does its own hook.
        sys.unraisablehook = (lambda u: None) if failed and argv is None else previous
    return 0


# TensorFlow's file-system errors (gs:// through tf.io.gfile, which Orbax and etils use):
# neither OSError nor ours. By name, so that TensorFlow is never imported for the check.
_STORAGE_ERRORS = ("NotFoundError", "PermissionDeniedError", "FailedPreconditionError", "UnavailableError",
                   "UnauthenticatedError", "DeadlineExceededError", "AbortedError", "ResourceExhaustedError")


def is_storage_error(e: BaseException) -> bool:
    """A TensorFlow file-system error (an unreachable bucket, no credentials, no network)."""
    return any(c.__module__.startswith("tensorflow") and c.__name__ in _STORAGE_ERRORS for c in type(e).__mro__)


def abandoned_async_work(u) -> bool:
    """An Orbax / TensorStore read that finishes after its asyncio loop was closed (a restore
    that failed on another array): its callback raises 'Event loop is closed' in a
    TensorStore thread, which Python would print as a traceback per pending read (dropped by
    the CLI's hook and by `model.checkpoint.quiet_abandoned_reads` for API loads)."""
    return isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value)


def add_distributed_arguments(p: argparse.ArgumentParser) -> None:
    """The multi-host flags of every command that trains (`jaxaccel.train`, `jaxaccel.experiments`)."""
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: jax.distributed.initialize() with the platform's auto-detection (TPU pods)")
    p.add_argument("--coordinator", help="multi-host on other platforms: HOST:PORT of process 0")
    p.add_argument("--num-processes", type=int, default=None, help="with --coordinator: how many processes")
    p.add_argument("--process-id", type=int, default=None, help="with --coordinator: this process's index, from 0")
    p.add_argument("--cpu-devices", type=int, default=None, help="local CPU devices to emulate (testing sharding)")


def init_distributed(args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    """Apply `add_distributed_arguments`' flags: before anything else touches a JAX backend."""
    import jax

    if args.cpu_devices is not None:
        if args.cpu_devices < 1:
            p.error(f"--cpu-devices must be >= 1, got {args.cpu_devices}")
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if not args.coordinator and (args.num_processes is not None or args.process_id is not None):
        p.error("--num-processes and --process-id go with --coordinator HOST:PORT (on a TPU pod: --distributed "
                "alone); without it the run would train as one process")
    if args.coordinator:
        if args.num_processes is None or args.process_id is None:
            p.error("--coordinator needs --num-processes and --process-id")
        if not (re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):\d{1,5}", args.coordinator)
                and 0 < int(args.coordinator.rsplit(":", 1)[1]) < 65536):
            p.error(f"--coordinator must be HOST:PORT (e.g. 10.0.0.2:1234), got {args.coordinator!r}")
        if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        _initialize(jax, args.coordinator, args.num_processes, args.process_id)
    elif args.distributed:
        _initialize(jax)


JOIN_TIMEOUT_S = 300  # jax.distributed.initialize's own default


def _initialize(jax, *args) -> None:
    """jax.distributed.initialize, its refusals (bad process ids, no coordinator found) one line.

    A process that never joins, or dies later, is not an error Python sees: JAX's C++ client
    aborts every other process (after `JOIN_TIMEOUT_S`, or its heartbeat timeout) with a log
    line and a stack trace. So each process first says, in one line, what it waits for."""
    who = f"process {args[2]} of {args[1]}, coordinator {args[0]}" if args else "auto-detected hosts"
    print(f"multi-host: joining ({who}); if a process does not join within {JOIN_TIMEOUT_S} s or dies later, JAX "
          f"stops every process with 'Terminating process because the JAX distributed service detected fatal "
          f"errors': the cause is in the missing process's own output", file=sys.stderr, flush=True)
    try:
        jax.distributed.initialize(*args, initialization_timeout=JOIN_TIMEOUT_S)
    except (ValueError, RuntimeError) as e:
        fail(f"multi-host setup failed: {first_line(e)}")


def _drop_traceback(record) -> bool:
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


def log_without_tracebacks() -> None:
    """Orbax logs a failed background save (a full disk) with its traceback, through absl,
    before the trainer reports it as a one-line error: keep those log lines, not their
    tracebacks (JAXACCEL_TRACEBACK=1 keeps them). For every command that trains (train, the
    experiments' sweeps and fine-tunes)."""
    import logging

    if os.environ.get(TRACEBACK_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return
    # absl: Orbax's own log lines; asyncio: its "exception was never retrieved" for the
    # failed writes' futures, whenever they are collected
    for logger in (logging.getLogger("absl"), logging.getLogger("asyncio")):
        if _drop_traceback not in logger.filters:
            logger.addFilter(_drop_traceback)
