"""Decisions of a multi-host run that only process 0 can make and every process must take.

Hosts may have their own disks: a folder check, a lock or a move in the run's folder is made
by process 0 alone (the one that writes the run's files). If process 0 then refused alone,
the other processes would wait for it in their next collective until JAX's distributed
service aborted them all (its heartbeat timeout, minutes later, in a C++ log line naming no
cause). `decided_by_process_0` broadcasts process 0's verdict first; every process then stops
together, or goes on together. `check_same_settings` likewise refuses, on every process, a
run whose processes were started with different settings.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
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


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little", signed=True)


def check_same_settings(settings: Mapping[str, Any], error: Callable[[str], Exception]) -> None:
    """Raise `error(why)` on every process when the processes of a multi-host run were given
    different `settings` ({"dotted.key": value}), naming the first setting that differs.

    Each process reads its own config file and overrides; one started with another seed or
    learning rate would train its rows of every batch into the same model, silently, and one
    with another step count would wait forever in a collective the others never reach. Two
    gathers of int32 digests: one of the key list (the same on every process unless they run
    different versions), then one digest per setting."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    keys = sorted(settings)
    values = [json.dumps(settings[k], sort_keys=True, default=repr) for k in keys]
    mine = np.array([_digest("\n".join(keys)), _digest("\n".join(values))], np.int32)
    every = np.asarray(multihost_utils.process_allgather(mine))  # [processes, 2]
    if (every == mine).all():
        return
    me = jax.process_index()
    if (every[:, 0] != every[0, 0]).any():
        others = [i for i in range(len(every)) if every[i, 0] != mine[0]]
        raise error(f"process {me} has other settings than process(es) {others} (not the same keys: are they running "
                    f"different versions of jaxaccel?)")
    per_key = np.asarray(multihost_utils.process_allgather(np.array([_digest(v) for v in values], np.int32)))
    column = int(np.flatnonzero((per_key != per_key[0]).any(axis=0))[0])
    others = [i for i in range(len(per_key)) if per_key[i, column] != per_key[me, column]]
    raise error(f"the processes were started with different settings: {keys[column]} is {values[column]} on "
                f"process {me} but not on process(es) {others}; give every process the same config file and "
                f"overrides")
