"""python -m jaxaccel.train CONFIG.yaml [key.sub=value ...] — train (or resume) a model.

    python -m jaxaccel.train configs/tiny.yaml output_dir=runs/tiny train.steps=200 checkpoint.every_steps=50
    python -m jaxaccel.train configs/pod-1b.yaml --distributed     # on every host of a TPU pod

Rerunning the same command on the same output_dir resumes from its latest checkpoint.
Metrics: OUTPUT_DIR/metrics.jsonl (one JSON object per line), OUTPUT_DIR/tensorboard/.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

from jaxaccel.cli import ArgumentParser, run_cli


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m jaxaccel.train", description=__doc__.split("\n")[0])
    p.add_argument("config", help="YAML preset (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=100")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: jax.distributed.initialize() with the platform's auto-detection (TPU pods)")
    p.add_argument("--coordinator", help="multi-host on other platforms: HOST:PORT of process 0")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--cpu-devices", type=int, default=None, help="local CPU devices to emulate (testing sharding)")
    args = p.parse_args(argv)

    import jax

    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if args.coordinator:
        if args.num_processes is None or args.process_id is None:
            p.error("--coordinator needs --num-processes and --process-id")
        if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif args.distributed:
        jax.distributed.initialize()

    from jaxaccel.config import build
    from jaxaccel.train.config import RunConfig
    from jaxaccel.train.loop import train

    cfg = build(RunConfig, args.config, args.overrides)
    summary = train(cfg)
    if jax.process_index() == 0:
        print(json.dumps(summary, default=str))
    return 0


def entry() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    entry()
