#!/usr/bin/env python3
"""Run one jaxaccel command on every host of a Cloud TPU VM (single host or pod slice).

    python gcp/tpu_pod.py all --name my-pod --zone us-central2-b --accelerator-type v4-32 \\
        --command "python -m jaxaccel.bench decode --no-hf"
    python gcp/tpu_pod.py create|setup|run|delete ... [--dry-run]

`setup` copies this checkout (git archive of HEAD) to every worker and installs it; `run`
starts the same command on all workers at once (`--worker=all`), which is what JAX's
multi-host runtime expects; `all` = create, setup, run, and delete (unless --keep), deleting
even when the run fails. --dry-run prints the gcloud commands instead of running them.
Needs the gcloud CLI, authenticated, with TPU quota in the zone.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARCHIVE = "/tmp/jaxaccel-src.tar.gz"


def gcloud(args: argparse.Namespace, *words: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", *words, f"--zone={args.zone}"]
    if args.project:
        cmd.append(f"--project={args.project}")
    return cmd


def plan(args: argparse.Namespace, step: str) -> list[list[str]]:
    name = args.name
    if step == "create":
        cmd = gcloud(args, "create", name) + [f"--accelerator-type={args.accelerator_type}", f"--version={args.version}"]
        if args.spot:
            cmd.append("--spot")
        return [cmd]
    if step == "setup":
        install = (f"mkdir -p ~/jaxaccel && tar -xzf {ARCHIVE} -C ~/jaxaccel && cd ~/jaxaccel && "
                   f"python3 -m pip install -q -U pip && python3 -m pip install -q -e . 'jax[tpu]'")
        return [["git", "-C", str(REPO), "archive", "--format=tar.gz", "-o", ARCHIVE, "HEAD"],
                gcloud(args, "scp", ARCHIVE, f"{name}:{ARCHIVE}") + ["--worker=all"],
                gcloud(args, "ssh", name) + ["--worker=all", f"--command={install}"]]
    if step == "run":
        return [gcloud(args, "ssh", name) + ["--worker=all", f"--command=cd ~/jaxaccel && {args.command}"]]
    if step == "delete":
        return [gcloud(args, "delete", name) + ["--quiet"]]
    raise ValueError(step)


def execute(cmds: list[list[str]], dry_run: bool) -> int:
    for cmd in cmds:
        print("+ " + shlex.join(cmd), flush=True)
        if not dry_run:
            code = subprocess.call(cmd)
            if code:
                return code
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("step", choices=["create", "setup", "run", "delete", "all"])
    p.add_argument("--name", required=True)
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default=None)
    p.add_argument("--accelerator-type", default="v4-8", help="e.g. v4-8, v4-32, v5litepod-16, v5p-64")
    p.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU VM runtime image")
    p.add_argument("--spot", action="store_true")
    p.add_argument("--command", default="python -m jaxaccel.bench decode --no-hf")
    p.add_argument("--keep", action="store_true", help="with 'all': do not delete the TPU VM afterwards")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    if args.step != "all":
        return execute(plan(args, args.step), args.dry_run)
    code = execute(plan(args, "create"), args.dry_run)
    if code:
        return code
    code = execute(plan(args, "setup"), args.dry_run) or execute(plan(args, "run"), args.dry_run)
    if not args.keep:
        code = execute(plan(args, "delete"), args.dry_run) or code
    return code


if __name__ == "__main__":
    sys.exit(main())
