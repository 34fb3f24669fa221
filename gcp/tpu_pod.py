#!/usr/bin/env python3
"""Run one jaxaccel command on every host of a Cloud TPU VM (single host or pod slice).

    python gcp/tpu_pod.py all --name my-pod --zone us-central2-b --accelerator-type v4-32 \\
        --command "python -m jaxaccel.bench decode --no-hf"
    python gcp/tpu_pod.py sweep --name my-pod --zone us-central2-b --accelerator-type v4-64 --spot \\
        --config configs/experiments/repetition-pod.yaml --sweep-args "output_dir=gs://BUCKET/sweeps/repetition"
    python gcp/tpu_pod.py create|setup|run|delete ... [--dry-run]

`setup` copies this checkout (git archive of HEAD) to every worker and installs it; `run`
starts the same command on all workers at once (`--worker=all`), which is what JAX's
multi-host runtime expects; `all` = create, setup, run, and delete (unless --keep), deleting
even when the run fails. `sweep` is `all` with the command
`python -m jaxaccel.experiments sweep CONFIG --distributed SWEEP_ARGS`.

Spot / preemptible slices (`--spot`): when the command fails, the launcher asks for the
slice's state (`tpu-vm describe`); if it was preempted (PREEMPTED, TERMINATED, or gone) it
deletes what is left, creates the slice again, sets it up and reruns the same command, up to
`--max-restarts` times. A sweep resumes exactly: finished runs are skipped and the killed run
restarts from its last checkpoint — provided its output_dir is in a bucket (gs://), since a
recreated slice starts with empty disks. jaxaccel's own commands catch the preemption
notice (SIGTERM), save a checkpoint of the step in flight and exit 143 while the slice is
still READY: the launcher then polls its state for up to 3 minutes and recovers as above once
it is reclaimed, or reruns the command on the same slice if it never is. Any other failure
on a healthy slice is the command's own and is returned, not retried.

--dry-run prints the gcloud commands instead of running them (a dry-run `describe` reports
READY); `--simulate-preemption N` makes the first N runs of the dry run fail on a PREEMPTED
slice, to show the recovery. Needs the gcloud CLI, authenticated, with TPU quota in the zone.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARCHIVE = "/tmp/jaxaccel-src.tar.gz"
PREEMPTED_STATES = ("PREEMPTED", "TERMINATED", "NOT_FOUND")  # the slice (or what is left of it) must be rebuilt
# jaxaccel's trainer and sweep runner exit 143 after a preemption notice (SIGTERM), having saved
# a checkpoint; the slice is then still READY for up to ~30 s before it is reclaimed.
NOTICE_EXIT = 143
NOTICE_WAIT_S, NOTICE_POLL_S = 180, 15


def gcloud(args: argparse.Namespace, *words: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", *words, f"--zone={args.zone}"]
    if args.project:
        cmd.append(f"--project={args.project}")
    return cmd


def sweep_command(args: argparse.Namespace) -> str:
    extra = shlex.split(args.sweep_args or "")
    return shlex.join(["python", "-m", "jaxaccel.experiments", "sweep", args.config, "--distributed", *extra])


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
    if step == "describe":
        return [gcloud(args, "describe", name) + ["--format=value(state)"]]
    raise ValueError(step)


class Executor:
    """Runs (or, in a dry run, prints) commands. A dry run's slice is READY, except that the
    first `simulate_preemptions` runs fail and leave it PREEMPTED."""

    def __init__(self, dry_run: bool, simulate_preemptions: int = 0):
        self.dry_run = dry_run
        self.preemptions_left = simulate_preemptions
        self.preempted = False

    def execute(self, cmds: list[list[str]]) -> int:
        for cmd in cmds:
            print("+ " + shlex.join(cmd), flush=True)
            if self.dry_run:
                code = self._simulated(cmd)
            else:
                code = subprocess.call(cmd)
            if code:
                return code
        return 0

    def _simulated(self, cmd: list[str]) -> int:
        if "ssh" in cmd and any(c.startswith("--command=cd ~/jaxaccel && ") for c in cmd) and self.preemptions_left:
            self.preemptions_left -= 1
            self.preempted = True
            print("# (dry run) simulated preemption: the slice went away during the run", flush=True)
            return 255  # what gcloud ssh returns when the connection drops
        if "create" in cmd:
            self.preempted = False
        return 0

    def sleep(self, seconds: float) -> None:
        if not self.dry_run:
            time.sleep(seconds)

    def state(self, args: argparse.Namespace) -> str:
        """The slice's state: READY, PREEMPTED, ..., or NOT_FOUND when describe fails."""
        cmd = plan(args, "describe")[0]
        print("+ " + shlex.join(cmd), flush=True)
        if self.dry_run:
            return "PREEMPTED" if self.preempted else "READY"
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            return "NOT_FOUND"
        return proc.stdout.strip().upper() or "UNKNOWN"


def run_with_recovery(args: argparse.Namespace, ex: Executor) -> int:
    """Run the command; on a preempted slice recreate it and run the same command again."""
    restarts = 0
    while True:
        code = ex.execute(plan(args, "run"))
        if code == 0 or not args.spot:
            return code
        state = ex.state(args)
        waited = 0
        while code == NOTICE_EXIT and state not in PREEMPTED_STATES and waited < NOTICE_WAIT_S:
            ex.sleep(NOTICE_POLL_S)  # stopped by a preemption notice: the reclaim is on its way
            waited += NOTICE_POLL_S
            state = ex.state(args)
        if state not in PREEMPTED_STATES and code != NOTICE_EXIT:
            print(f"# the command failed (exit {code}) on a {state} slice: not a preemption, not retrying", flush=True)
            return code
        if restarts >= args.max_restarts:
            print(f"# the slice was preempted again ({state}) and --max-restarts={args.max_restarts} is used up",
                  flush=True)
            return code
        restarts += 1
        if state not in PREEMPTED_STATES:  # a notice without a reclaim (e.g. maintenance): the slice is fine
            print(f"# stopped by a preemption notice, and slice {args.name} is still {state}: rerunning the same "
                  f"command (restart {restarts} of at most {args.max_restarts})", flush=True)
            continue
        print(f"# slice {args.name} is {state}: recreating it and rerunning the same command "
              f"(restart {restarts} of at most {args.max_restarts})", flush=True)
        if state != "NOT_FOUND":
            ex.execute(plan(args, "delete"))  # a preempted TPU VM still holds its name until deleted
        code = ex.execute(plan(args, "create")) or ex.execute(plan(args, "setup"))
        if code:
            return code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("step", choices=["create", "setup", "run", "delete", "all", "sweep"])
    p.add_argument("--name", required=True)
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default=None)
    p.add_argument("--accelerator-type", default="v4-8", help="e.g. v4-8, v4-32, v5litepod-16, v5p-64")
    p.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU VM runtime image")
    p.add_argument("--spot", action="store_true", help="spot capacity; a preempted slice is recreated and the "
                                                       "command rerun")
    p.add_argument("--max-restarts", type=int, default=20, help="with --spot: most recreations after preemption")
    p.add_argument("--command", default="python -m jaxaccel.bench decode --no-hf")
    p.add_argument("--config", help="with 'sweep': the sweep file (configs/experiments/*-pod.yaml)")
    p.add_argument("--sweep-args", default="", help="with 'sweep': more arguments, e.g. output_dir=gs://B/x --only G")
    p.add_argument("--keep", action="store_true", help="with 'all'/'sweep': do not delete the TPU VM afterwards")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--simulate-preemption", type=int, default=0, metavar="N",
                   help="with --dry-run: the first N runs fail on a preempted slice")
    args = p.parse_args(argv)
    if args.simulate_preemption and not args.dry_run:
        p.error("--simulate-preemption needs --dry-run")
    if args.step == "sweep":
        if not args.config:
            p.error("sweep needs --config (a sweep file)")
        args.command = sweep_command(args)
    ex = Executor(args.dry_run, args.simulate_preemption)
    if args.step == "run":
        return run_with_recovery(args, ex)
    if args.step not in ("all", "sweep"):
        return ex.execute(plan(args, args.step))
    code = ex.execute(plan(args, "create"))
    if code:
        return code
    code = ex.execute(plan(args, "setup")) or run_with_recovery(args, ex)
    if not args.keep:
        code = ex.execute(plan(args, "delete")) or code
    return code


if __name__ == "__main__":
    sys.exit(main())
