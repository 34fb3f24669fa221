"""Benchmark helpers: robust timing, machine description, memory read bandwidth."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxaccel.config import ModelConfig
from jaxaccel.errors import JaxaccelError


def median_time(fn: Callable[[], Any], runs: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


class BandwidthProbe:
    """Streaming read bandwidth (bytes/s): a jitted max over a float32 array 8x the L3 cache
    of a typical server core complex. Shared machines drift by tens of percent from minute to
    minute, so benchmarks call `sample()` between their own runs and use the median."""

    def __init__(self, mbytes: int = 256):
        self.nbytes = mbytes * 1024 * 1024
        self._x = jnp.ones((self.nbytes // 4,), jnp.float32)
        self._f = jax.jit(jnp.max)
        self._f(self._x).block_until_ready()
        self.samples: list[float] = []

    def sample(self, repeats: int = 3) -> float:
        t, _ = median_time(lambda: self._f(self._x), repeats)
        self.samples.append(self.nbytes / t)
        return self.samples[-1]

    def median(self) -> float:
        return statistics.median(self.samples)


def read_bandwidth(mbytes: int = 256, runs: int = 7) -> float:
    probe = BandwidthProbe(mbytes)
    for _ in range(runs):
        probe.sample(1)
    return probe.median()


def machine_line(m: dict[str, Any]) -> str:
    """A `machine()` record as report text: "CPU, N cores, backend, jax V, date"."""
    return f"{m['cpu']}, {m['cores']} cores, {m['backend']}, jax {m['jax']}, {m['date']}"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def write_json(path: str | Path, data: Any) -> None:
    """A benchmark's results, whole (and its `write_partial` sidecar removed)."""
    from jaxaccel.files import write_atomically

    write_atomically(Path(path), json.dumps(data, indent=2))
    partial_path(path).unlink(missing_ok=True)


def partial_path(path: str | Path) -> Path:
    return Path(f"{path}.partial")


def write_partial(path: str | Path, data: Any) -> None:
    """The results so far of a benchmark still running, beside `path` (PATH.partial, marked
    "complete": false), so that a failure or a kill later keeps them without replacing an
    earlier complete file at `path` with a part of one."""
    from jaxaccel.files import write_atomically

    write_atomically(partial_path(path), json.dumps({**data, "complete": False}, indent=2))


def figure(value: float | None, fmt: str, scale: float = 1.0, unit: str = "") -> str:
    """A figure for a table, or "—" where it was not measured (None)."""
    return "—" if value is None else format(scale * value, fmt) + unit


class SubprocessFailed(JaxaccelError):
    """A benchmark's child process (a fresh interpreter it times, or the multi-device run)
    exited non-zero: reported in one line with the child's last error line."""


def subprocess_failure(proc: subprocess.CompletedProcess, what: str) -> SubprocessFailed:
    """The one-line error for a finished child process that failed: its last non-empty
    stderr line (its own `error: ...` or an exception's last line), else its exit status."""
    lines = [line.strip() for line in (proc.stderr or "").splitlines() if line.strip()]
    last = lines[-1] if lines else f"exit status {proc.returncode}, nothing on stderr"
    if last.startswith("error: "):
        last = last[len("error: "):]
    return SubprocessFailed(f"{what} failed: {last}")


def model_config(path: str) -> ModelConfig | None:
    """The config of the model `path` names, without its parameters (`decode.lm.model_config`),
    for checks before any work; None for a remote path (left to the load)."""
    from jaxaccel.decode.lm import model_config as config_of

    return None if "://" in path else config_of(path)
