"""Startup and compile cost, measured as whole processes (DESIGN decision 14).

* `decode_wall`: wall seconds of `python -m jaxaccel.decode --max-new-tokens 64`, first with
  an empty persistent compilation cache (cold), then again on the filled cache (warm).
* `first_calls`: total compile seconds of the first `generate` calls over 16 prompts of
  different lengths (5 to 250 tokens), one fresh process per method, cache off — what a
  method costs before its first token when nothing is cached.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

PROMPT_LENGTHS = (5, 9, 14, 20, 27, 33, 41, 50, 62, 75, 90, 110, 130, 160, 200, 250)

_FIRST_CALLS = """
import json, sys
import jaxaccel
lm = jaxaccel.load(sys.argv[1])
lm.eos_token_ids = ()
total, lengths = 0.0, json.loads(sys.argv[3])
for n in lengths:
    ids = [lm.bos_token_id or 1] + [100 + i % 50 for i in range(n - 1)]
    total += lm.generate([ids], max_new_tokens=64, method=sys.argv[2]).stats["compile_s"]
print(json.dumps({"compile_s": total, "programs": len(lm._compiled)}))
"""


# A cache folder set for JAX itself wins over JAXACCEL_COMPILE_CACHE (`compile_cache.enable`):
# left in the children's environment, the "cache off" and "cold" runs would read it.
_JAX_CACHE_VARIABLES = ("JAX_COMPILATION_CACHE_DIR", "JAX_ENABLE_COMPILATION_CACHE")


def _env(cache: str) -> dict:
    """The measured processes' environment: this one's (so the backend they pick is the one
    the report's machine names; no backend is started here, which on a GPU would take its
    memory from them), jaxaccel's cache at `cache` ("off": none) and no cache of JAX's own."""
    env = {k: v for k, v in os.environ.items() if k not in _JAX_CACHE_VARIABLES}
    return {**env, "JAXACCEL_COMPILE_CACHE": cache}


def decode_wall(model: str, runs: int, cache_dir: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "jaxaccel.decode", "--model", model, "--max-new-tokens", "64"]

    def once() -> float:
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=_env(cache_dir))
        if out.returncode:
            from jaxaccel.bench.common import subprocess_failure

            raise subprocess_failure(out, "python -m jaxaccel.decode")
        return time.perf_counter() - t0

    cold = once()
    warm = [once() for _ in range(runs)]
    return {"cold_s": cold, "warm_s": statistics.median(warm), "warm_runs_s": warm}


def first_calls(model: str, methods: Sequence[str], lengths: Sequence[int] = PROMPT_LENGTHS) -> dict[str, Any]:
    out = {}
    for method in methods:
        proc = subprocess.run([sys.executable, "-c", _FIRST_CALLS, model, method, json.dumps(list(lengths))],
                              capture_output=True, text=True, env=_env("off"))
        if proc.returncode:
            from jaxaccel.bench.common import subprocess_failure

            raise subprocess_failure(proc, f"the first-calls process of method {method!r}")
        out[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def run(model: str = "builtin:default", runs: int = 5, methods: Sequence[str] = ("autoregressive", "recycling"),
        repeats: int = 3, progress: Callable[[str], None] = print,
        lengths: Sequence[int] = PROMPT_LENGTHS) -> dict[str, Any]:
    from jaxaccel.bench.common import machine

    with tempfile.TemporaryDirectory() as cache_dir:
        progress("decode CLI, cold then warm compilation cache ...")
        wall = decode_wall(model, runs, cache_dir)
    calls: dict[str, list[float]] = {m: [] for m in methods}
    programs: dict[str, int] = {}
    for r in range(repeats):  # alternate the methods so drift hits both alike
        progress(f"first calls over {len(lengths)} prompt lengths, round {r + 1}/{repeats} ...")
        for method, res in first_calls(model, methods, lengths).items():
            calls[method].append(res["compile_s"])
            programs[method] = res["programs"]
    first = {m: {"compile_s": statistics.median(v), "runs_s": v, "programs": programs[m]} for m, v in calls.items()}
    base = first[methods[0]]["compile_s"]
    for m in methods:
        first[m]["relative"] = first[m]["compile_s"] / base
    return {"benchmark": "startup", "machine": machine(), "model": model, "decode_wall": wall, "first_calls": first,
            "prompt_lengths": list(lengths)}


def markdown(result: dict[str, Any]) -> str:
    w = result["decode_wall"]
    lines = [f"`python -m jaxaccel.decode --max-new-tokens 64` ({result['model']}): cold cache "
             f"{w['cold_s']:.2f} s, warm {w['warm_s']:.2f} s (median of {len(w['warm_runs_s'])}: "
             f"{', '.join(f'{x:.2f}' for x in w['warm_runs_s'])})", "",
             f"| method | compile s, {len(result['prompt_lengths'])} first calls | programs | "
             f"vs {next(iter(result['first_calls']))} |", "|---|---|---|---|"]
    for m, r in result["first_calls"].items():
        lines.append(f"| {m} | {r['compile_s']:.2f} ({', '.join(f'{x:.1f}' for x in r['runs_s'])}) | "
                     f"{r['programs']} | {r['relative']:.2f}x |")
    return "\n".join(lines)
