"""Shared command-line plumbing: one-line errors, exit status 2, never a traceback for bad input."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from jaxaccel.errors import JaxaccelError

EXIT_BAD_INPUT = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (`error: ...`) and exit 2, without the usage dump."""

    def error(self, message: str):  # noqa: D401 - argparse API
        sys.stderr.write(f"error: {message} (see --help)\n")
        raise SystemExit(EXIT_BAD_INPUT)


def fail(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(EXIT_BAD_INPUT)


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run `main`, turning jaxaccel's typed errors into `error: <message>` + exit 2."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        return main(argv)
    except JaxaccelError as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    return 0
