"""Benchmark helpers: robust timing, machine description, memory read bandwidth."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp


def median_time(fn: Callable[[], Any], runs: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def read_bandwidth(mbytes: int = 512, runs: int = 7) -> float:
    """Streaming read bandwidth in bytes/s: a jitted max over a `mbytes` float32 array
    (large enough to defeat the caches), median of `runs`."""
    x = jnp.ones((mbytes * 1024 * 1024 // 4,), jnp.float32)
    f = jax.jit(jnp.max)
    f(x).block_until_ready()
    t, _ = median_time(lambda: f(x), runs)
    del x
    return mbytes * 1024 * 1024 / t


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
