"""python -m jaxaccel.train CONFIG.yaml [key.sub=value ...] — train (or resume) a model.

    python -m jaxaccel.train configs/tiny.yaml output_dir=runs/tiny train.steps=200 checkpoint.every_steps=50
    python -m jaxaccel.train configs/pod-1b.yaml --distributed     # on every host of a TPU pod

Rerunning the same command on the same output_dir resumes from its latest checkpoint. A
SIGTERM (a spot slice's preemption notice) saves a checkpoint of the current step and exits 143;
so does a first Ctrl-C, exiting 130 (a second Ctrl-C stops at once, without).
Metrics: OUTPUT_DIR/metrics.jsonl (one JSON object per line), OUTPUT_DIR/tensorboard/.
"""
from __future__ import annotations

import json
from typing import Sequence

from jaxaccel.cli import (ArgumentParser, DefaultsHelpFormatter, add_distributed_arguments, init_distributed,
                          log_without_tracebacks, run_cli)


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m jaxaccel.train", description=__doc__.split("\n")[0],
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("config", help="YAML preset (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=100")
    add_distributed_arguments(p)
    args = p.parse_intermixed_args(argv)  # overrides may follow options: `CONFIG --distributed key=value`
    if not args.config.strip():
        p.error("the config must be a path to a YAML file, got an empty string")

    import jax

    log_without_tracebacks()
    init_distributed(args, p)

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
