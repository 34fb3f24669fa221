"""Training throughput and MFU of config presets, measured through the real training loop
(data loading, host work and logging included), against the matmul peak measured in the
same run; and the same config on 8 emulated CPU devices relative to 1.

MFU = tokens/s x training FLOPs per token (6 N + 12 L H D T, PaLM appendix B) / peak, where
the peak is a jitted float32 [2048, 2048] matmul on this machine.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from jaxaccel.bench.common import machine, subprocess_failure

TIMED_INTERVALS = 6  # log intervals timed after the first (which includes compilation)
# What `measure` sets itself: an --override of one of these is refused, not silently replaced.
BENCH_KEYS = ("output_dir", "train.steps", "train.eval_every", "train.log_every", "checkpoint.every_steps",
              "train.progress", "tensorboard", "train.peak_flops", "mesh.data")


def check_overrides(config_paths, overrides, compare_devices: int = 1) -> None:
    """Before any measurement: every override parses and applies to every config, and none is
    one the bench sets itself; with compare_devices > 1, the last config (the one the
    multi-device row runs) fits a mesh of data=compare_devices (its batch splits over it).
    ConfigError otherwise."""
    from jaxaccel.config import build, parse_override
    from jaxaccel.errors import ConfigError
    from jaxaccel.train.config import RunConfig

    if compare_devices < 1:
        raise ConfigError(f"--compare-devices must be >= 1 (1: skip the multi-device row), got {compare_devices}")
    for o in overrides:
        key = ".".join(parse_override(o)[0])
        if key in BENCH_KEYS:
            raise ConfigError(f"--override {o}: the bench sets {key} itself ({', '.join(BENCH_KEYS)})")
    for path in config_paths:
        build(RunConfig, path, list(overrides))
    if compare_devices > 1 and config_paths:
        cfg = build(RunConfig, config_paths[-1], [*overrides, f"mesh.data={compare_devices}"])
        try:
            cfg.check_mesh(cfg.mesh.sizes(compare_devices))
        except ConfigError as e:
            raise ConfigError(f"--compare-devices {compare_devices} with {config_paths[-1]}: {e}") from None


def measure(config_path: str, overrides: list[str], peak: float, log_every: int = 5) -> dict[str, Any]:
    from jaxaccel.config import build
    from jaxaccel.errors import Interrupted, Preempted
    from jaxaccel.train.config import RunConfig
    from jaxaccel.train.loop import train
    from jaxaccel.train.metrics import flops_per_token

    with tempfile.TemporaryDirectory(prefix="jaxaccel-bench-train-") as out:
        steps = log_every * (TIMED_INTERVALS + 1)
        cfg = build(RunConfig, config_path, [*overrides, f"output_dir={out}", f"train.steps={steps}",
                                             "train.eval_every=0", f"train.log_every={log_every}",
                                             "checkpoint.every_steps=1000000", "train.progress=false",
                                             "tensorboard=false", f"train.peak_flops={peak}"])
        try:
            train(cfg, log=lambda msg: None)
        except Preempted as e:  # its checkpoint was in the temporary folder: there is nothing to resume
            cause = "Ctrl-C" if isinstance(e, Interrupted) else "a SIGTERM"
            raise type(e)(f"{cause} stopped the benchmark; it keeps no checkpoint: rerun it to measure") from None
        records = [json.loads(line) for line in open(Path(out) / "metrics.jsonl") if "tokens_per_s" in line]
    rates = [r["tokens_per_s"] for r in records[1:]]
    tok_s = statistics.median(rates)
    fpt = flops_per_token(cfg.model, cfg.train.seq_len)
    return {"config": config_path, "params_m": round(cfg.model.num_params() / 1e6, 2),
            "batch": cfg.train.batch_size, "seq_len": cfg.train.seq_len, "tokens_per_s": tok_s, "runs": rates,
            "flops_per_token": fpt, "mfu": tok_s * fpt / peak}


def run(configs=("configs/tiny.yaml", "configs/default.yaml"), compare_devices: int = 8,
        overrides: tuple[str, ...] = (), progress=print) -> dict[str, Any]:
    from jaxaccel.train.metrics import measure_peak_flops

    peak = statistics.median([measure_peak_flops() for _ in range(3)])
    progress(f"matmul peak: {peak / 1e9:.0f} GFLOP/s")
    rows = []
    for path in configs:
        row = measure(path, [*overrides, "mesh.data=1"], peak)
        progress(f"{path}: {row['tokens_per_s']:.0f} tok/s, MFU {100 * row['mfu']:.1f}%")
        rows.append(row)
    result = {"benchmark": "train", "machine": machine(), "peak_flops": peak, "rows": rows}
    if compare_devices > 1 and configs:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, "-m", "jaxaccel.bench", "train", "--configs", configs[-1], "--devices-only",
                   "--cpu-devices", str(compare_devices), "--peak", str(peak), "--json", f.name,
                   *[f"--override={o}" for o in overrides]]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
            if proc.returncode != 0:
                raise subprocess_failure(proc, f"the {compare_devices}-device run of {configs[-1]}")
            multi = json.loads(Path(f.name).read_bytes())["rows"][0]
        multi["devices"] = compare_devices
        multi["relative_to_1_device"] = multi["tokens_per_s"] / rows[-1]["tokens_per_s"]
        result["multi_device"] = multi
        progress(f"{configs[-1]} on {compare_devices} CPU devices (mesh data={compare_devices}): "
                 f"{multi['tokens_per_s']:.0f} tok/s = {multi['relative_to_1_device']:.2f}x one device")
    return result


def run_devices_only(config: str, peak: float, devices: int, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"rows": [measure(config, [*overrides, f"mesh.data={devices}"], peak)], "peak_flops": peak}


def markdown(result: dict[str, Any]) -> str:
    lines = ["| config | params | batch x seq | tokens/s | MFU |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['config']} | {r['params_m']}M | {r['batch']} x {r['seq_len']} | {r['tokens_per_s']:.0f} | "
                     f"{100 * r['mfu']:.1f}% |")
    m = result["machine"]
    lines.append("")
    lines.append(f"Matmul peak {result['peak_flops'] / 1e9:.0f} GFLOP/s (float32 2048x2048, same run); {m['cpu']}, "
                 f"{m['cores']} cores, JAX {m['jax']}; median of {TIMED_INTERVALS} log intervals after compilation; "
                 f"{m['date']}.")
    if "multi_device" in result:
        md = result["multi_device"]
        lines.append(f"{md['config']} on {md['devices']} emulated CPU devices (mesh data={md['devices']}): "
                     f"{md['tokens_per_s']:.0f} tokens/s = {md['relative_to_1_device']:.2f}x one device.")
    return "\n".join(lines)
