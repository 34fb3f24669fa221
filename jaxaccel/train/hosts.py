"""Decisions of a multi-host run that only process 0 can make and every process must take.

Hosts may have their own disks: a folder check, a lock or a move in the run's folder is made
by process 0 alone (the one that writes the run's files). If process 0 then refused alone,
the other processes would wait for it in their next collective until the distributed
service aborted them all (5 minutes). `decided_by_process_0` broadcasts process 0's verdict
first; every process then stops together, or goes on together.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np


def is_main() -> bool:
    return jax.process_index() == 0


def decided_by_process_0(check: Callable[[], Any], refusal: Callable[[], Exception]) -> Any:
    """Run `check` on process 0 only and give every process its verdict: the check's value
    on process 0 (None elsewhere), or an error on every process when it raised — its own
    error on process 0 (a refusal, an OSError of an unwritable mount), `refusal()` elsewhere."""
    error = value = None
    if is_main():
        try:
            value = check()
        except Exception as e:  # noqa: BLE001 - whatever it is, every host is told before it is raised
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if not int(multihost_utils.broadcast_one_to_all(np.int32(error is None))) and error is None:
            error = refusal()
    if error is not None:
        raise error
    return value
