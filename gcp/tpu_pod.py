#!/usr/bin/env python3
"""Run one jaxaccel command on every host of a Cloud TPU VM (single host or pod slice).

    python gcp/tpu_pod.py all --name my-pod --zone us-central2-b --accelerator-type v4-32 \\
        --command "python -m jaxaccel.bench decode --no-hf"
    python gcp/tpu_pod.py sweep --name my-pod --zone us-central2-b --accelerator-type v4-64 --spot \\
        --config configs/experiments/repetition-pod.yaml --sweep-args "output_dir=gs://BUCKET/sweeps/repetition"
    python gcp/tpu_pod.py create|setup|run|delete ... [--dry-run]

`create` takes the runtime image (--version) from the accelerator type unless given: v2/v3/v4
tpu-ubuntu2204-base, v5litepod (v5e) v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e
v2-alpha-tpuv6e. `setup` ships this checkout's HEAD commit (git archive; uncommitted changes
are not shipped, and a warning says so) to every worker, makes a Python 3.11 virtual
environment there (~/jaxaccel-venv: the images' own python3 is Ubuntu 22.04's 3.10, older than
jaxaccel needs) and installs jaxaccel and jax[tpu] into it; `run` starts the command in that
environment (`python` is its interpreter) on all workers at once (`--worker=all`), which is
what JAX's multi-host runtime expects; `all` = create, setup, run, and delete (unless --keep),
deleting even when the run fails or the launcher is interrupted (Ctrl-C, SIGTERM or a closed
terminal's SIGHUP: it says
`interrupted` and exits 130). `sweep` is `all` with the command
`python -m jaxaccel.experiments sweep CONFIG --distributed SWEEP_ARGS`; CONFIG and its base
config must be committed at HEAD (checked before anything is created).

Multislice (`--num-slices N`, N > 1): N slices of --accelerator-type, joined by the data-center
network, made as one queued resource (`gcloud compute tpus queued-resources create --node-count N`;
nodes NAME-0 ... NAME-(N-1)): the launcher waits until it is ACTIVE (polling every minute, up to
--queue-hours), ships and runs on every worker of every slice (`--node=all --worker=all`), and
deletes it with its slices (`--force`). jaxaccel lays a mesh over the slices along data/fsdp
(jaxaccel.sharding). A spot queued resource that is SUSPENDED or FAILED is rebuilt like a
preempted slice. (Written from the gcloud reference; not yet run on a Multislice job.)

A create that fails because the zone has no capacity (gcloud's "There is no more capacity in
the zone", ZONE_RESOURCE_POOL_EXHAUSTED, STOCKOUT) is tried again after a wait that doubles
from 1 to 16 minutes, up to --capacity-retries times (default 6, about 47 minutes in all;
0 turns it off); any other failure of a create (quota, permissions, a name in use) is not.

Spot / preemptible slices (`--spot`): when the command fails, the launcher asks for the
slice's state (`tpu-vm describe`); if it was preempted (PREEMPTED, TERMINATED, or gone) it
deletes what is left, creates the slice again (`run --spot` first reads the slice's accelerator
type and runtime version with `tpu-vm describe`, unless given, so it recreates the same slice),
sets it up and reruns the same command, up to `--max-restarts` times. A recreation that fails
(e.g. no spot capacity, or preempted again during setup) is retried after a wait that doubles
from 1 to 16 minutes, each try counting as a restart; a setup failing on a READY slice is not
retried. A setup of `all`/`sweep` that fails on a preempted slice is recovered the same way.
A sweep resumes exactly: finished runs are skipped and the killed run
restarts from its last checkpoint — provided its output_dir is in a bucket (gs://), since a
recreated slice starts with empty disks. jaxaccel's own commands catch the preemption
notice (SIGTERM), save a checkpoint of the step in flight and exit 143 while the slice is
still READY: the launcher then polls its state for up to 3 minutes and recovers as above once
it is reclaimed, or reruns the command on the same slice if it never is. Any other failure
on a healthy slice is the command's own and is returned, not retried.

--dry-run prints the gcloud commands instead of running them (a dry-run `describe` reports
READY; the git checks still run); `--simulate-preemption N` makes the first N runs of the dry
run fail on a PREEMPTED slice, and `--simulate-stockout N` the first N creates after a
preemption fail for want of capacity, to show the recovery. Needs the gcloud CLI,
authenticated, with TPU quota in the zone.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import posixpath
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REMOTE_ARCHIVE = "jaxaccel-src.tar.gz"  # on each worker, in the home folder (scp takes relative paths from there)
# Every remote command runs this environment's interpreter. It is made by uv (pip-installed for
# the user with the image's own python3) with a uv-managed CPython 3.11 when the image has none:
# the same on every image and accelerator, no sudo, no apt (a fresh TPU VM's unattended-upgrades
# holds the dpkg lock) and no PPA (deadsnakes) to reach; only PyPI and uv's Python download.
PYTHON_VERSION = "3.11"
VENV = "~/jaxaccel-venv"
VENV_PYTHON = f"{VENV}/bin/python"
# Unpacks the archive into ~/jaxaccel, first removing the files the previous archive put there and
# this one lacks (a module deleted since would still import; a removed config would still load),
# and nothing else: a kept slice's local run folders under ~/jaxaccel stay. POSIX sh.
_FILES = ".jaxaccel-archive-files"  # the files of the last archive unpacked, one per line, sorted
# (The listing is not piped: a damaged archive must stop the chain before anything is removed.)
UNPACK = (f"mkdir -p ~/jaxaccel && cd ~/jaxaccel && "
          f"tar --quoting-style=literal -tzf ~/{REMOTE_ARCHIVE} > {_FILES}.all && "
          f"grep -v '/$' {_FILES}.all | LC_ALL=C sort > {_FILES}.new && rm -f {_FILES}.all && "
          f"{{ [ ! -f {_FILES} ] || LC_ALL=C comm -23 {_FILES} {_FILES}.new | "
          f"while IFS= read -r f; do rm -f -- \"$f\"; done; }} && "
          f"tar -xzf ~/{REMOTE_ARCHIVE} && mv {_FILES}.new {_FILES} && rm -f ~/{REMOTE_ARCHIVE}")
DEFAULT_ACCELERATOR = "v4-8"
# Cloud TPU runtime images by accelerator-type prefix (v5litepod-* is v5e).
RUNTIME_VERSIONS = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base", "v4": "tpu-ubuntu2204-base",
                    "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
PREEMPTED_STATES = ("PREEMPTED", "TERMINATED", "NOT_FOUND")  # the slice (or what is left of it) must be rebuilt
# A queued resource's states in those terms: ACTIVE is a ready one; SUSPENDED (its spot slices
# were reclaimed) and FAILED must be rebuilt; ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING,
# CREATING are on their way (QUEUED).
QUEUED_STATES = {"ACTIVE": "READY", "SUSPENDING": "PREEMPTED", "SUSPENDED": "PREEMPTED", "FAILED": "TERMINATED",
                 "ACCEPTED": "QUEUED", "WAITING_FOR_RESOURCES": "QUEUED", "PROVISIONING": "QUEUED",
                 "CREATING": "QUEUED"}
QUEUE_POLL_S = 60
# gcloud's answer for a slice or queued resource that does not exist (HTTP 404)
NOT_FOUND = re.compile(r"NOT_FOUND|was not found|\b404\b")
DESCRIBE_TRIES, DESCRIBE_RETRY_S = 3, 10
# jaxaccel's trainer and sweep runner exit 143 after a preemption notice (SIGTERM), having saved
# a checkpoint; the slice is then still READY for up to ~30 s before it is reclaimed.
NOTICE_EXIT = 143
NOTICE_WAIT_S, NOTICE_POLL_S = 180, 15
RETRY_WAIT_S, RETRY_WAIT_MAX_S = 60, 960  # between failed recreations (spot stock-outs last minutes to hours)
CAPACITY_RETRIES = 6  # a first create's stock-out is retried after waits of 1, 2, 4, 8, 16, 16 minutes
# What gcloud says when the zone has no TPUs to give: the TPU API's "There is no more capacity in
# the zone ..." (error code 8) or Compute's ZONE_RESOURCE_POOL_EXHAUSTED / STOCKOUT. A wait may
# cure that; a quota, permission, name or reservation error would not, and is not retried.
# Matched in gcloud's error text with the slice's name taken out (a name is free text).
STOCKOUT = re.compile(r"no more capacity in the zone|ZONE_RESOURCE_POOL_EXHAUSTED|state:\s*STOCKOUT|"
                      r"does not have enough resources available", re.IGNORECASE)
EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 130
MISSING_TOOL = {"gcloud": "install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)",
                "git": "install git"}


class LauncherError(Exception):
    """A one-line `error: ...` and exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse API: one line, exit 2, no usage dump
        sys.stderr.write(f"error: {message} (see --help)\n")
        raise SystemExit(EXIT_BAD_INPUT)


# Whether a command is being started, and whether a SIGTERM came meanwhile. A signal raised
# inside subprocess.Popen() after the child exists leaves no Popen object to stop it with: the
# child (the remote run, say) would outlive the launcher. So it is raised once Popen returns.
_STARTING = {"now": False, "terminated": False}


DEFAULT_COMMAND = "python -m jaxaccel.bench decode --no-hf"
MAX_RESTARTS = 20
NODE_NAME = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?\Z")
GCLOUD_WORD = re.compile(r"[a-z0-9][-a-z0-9.:]*\Z")  # zones (us-central2-b), projects (my-proj, example.com:p)
ACCELERATOR = re.compile(r"v\d+[a-z]*-\d+\Z")


def _terminated(signum, frame):
    if signum == signal.SIGHUP:  # the terminal is gone: writing to it fails (EIO) before the slice is deleted
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.dup2(devnull, sys.stderr.fileno())
    if _STARTING["now"]:
        _STARTING["terminated"] = True
        return
    raise KeyboardInterrupt  # SIGTERM is handled as Ctrl-C: delete the slice, exit 130


def default_version(accelerator_type: str) -> str | None:
    return RUNTIME_VERSIONS.get(accelerator_type.lower().split("-")[0])


def multislice(args: argparse.Namespace) -> bool:
    return getattr(args, "num_slices", 1) > 1


def gcloud(args: argparse.Namespace, *words: str) -> list[str]:
    """A gcloud TPU command: `tpu-vm` for one slice, `queued-resources` for several (Multislice
    needs a queued resource: its slices are provisioned together, on one data-center network)."""
    group = "queued-resources" if multislice(args) else "tpu-vm"
    cmd = ["gcloud", "compute", "tpus", group, *words, f"--zone={args.zone}"]
    if args.project:
        cmd.append(f"--project={args.project}")
    return cmd


def sweep_command(args: argparse.Namespace, extra: list[str]) -> str:
    return shlex.join(["python", "-m", "jaxaccel.experiments", "sweep", args.config, "--distributed", *extra])


def plan(args: argparse.Namespace, step: str) -> list[list[str]]:
    name = args.name
    # queued-resources ssh/scp run 64 workers at a time by default: past 64 hosts in all, the first
    # 64 would wait in jax.distributed.initialize for the rest forever. One batch of every host
    # (4096 per slice bounds any TPU slice's hosts); tpu-vm ssh has no batches.
    every = (["--worker=all", "--node=all", f"--batch-size={4096 * args.num_slices}"] if multislice(args)
             else ["--worker=all"])
    if step == "create":
        if multislice(args):  # nodes NAME-0 ... NAME-(N-1), one slice each
            cmd = gcloud(args, "create", name) + [f"--node-count={args.num_slices}", f"--node-prefix={name}",
                                                  f"--accelerator-type={args.accelerator_type}",
                                                  f"--runtime-version={args.version}"]
        else:
            cmd = gcloud(args, "create", name) + [f"--accelerator-type={args.accelerator_type}",
                                                  f"--version={args.version}"]
        if args.spot:
            cmd.append("--spot")
        return [cmd]
    if step == "setup":
        install = (f"python3 -m pip install -q --user -U uv && "
                   f"python3 -m uv venv -q --seed --allow-existing --python {PYTHON_VERSION} {VENV} && "
                   f"{UNPACK} && "
                   f"cd ~/jaxaccel && {VENV_PYTHON} -m pip install -q -U pip && "
                   f"{VENV_PYTHON} -m pip install -q -e '.[train]' 'jax[tpu]'")  # train: seqio, for corpora
        # The commit is pinned when the launcher starts, so every (re)created slice gets the same code;
        # the archive (in this invocation's temporary folder) is rebuilt from it for each setup rather
        # than kept, as a weeks-long sweep may outlive a file in /tmp.
        return [["git", "-C", str(REPO), "archive", "--format=tar.gz", "-o", args.archive, args.commit],
                gcloud(args, "scp", args.archive, f"{name}:{REMOTE_ARCHIVE}") + every,
                gcloud(args, "ssh", name) + [*every, f"--command={install}"]]
    if step == "run":
        return [gcloud(args, "ssh", name) + [*every,
                                             f"--command=cd ~/jaxaccel && . {VENV}/bin/activate && {args.command}"]]
    if step == "delete":  # a queued resource's --force deletes its slices with it
        return [gcloud(args, "delete", name) + (["--force", "--quiet"] if multislice(args) else ["--quiet"])]
    if step == "describe":
        return [gcloud(args, "describe", name) + [f"--format=value({'state.state' if multislice(args) else 'state'})"]]
    if step == "spec":
        return [gcloud(args, "describe", name) + ["--format=value(acceleratorType,runtimeVersion)"]]
    raise ValueError(step)


def _not_started(cmd: list[str], e: OSError) -> LauncherError:
    if isinstance(e, FileNotFoundError) and cmd[0] in MISSING_TOOL:
        return LauncherError(f"{cmd[0]} not found: {MISSING_TOOL[cmd[0]]}")
    return LauncherError(f"cannot run {cmd[0]}: {e.strerror or e}")


@contextlib.contextmanager
def _child(cmd: list[str], **kwargs):
    """subprocess.Popen for a with block: a missing program is a LauncherError instead of a
    traceback, and the child is killed when the block is left by an exception (Ctrl-C, or a
    SIGTERM, even one that came while the child was starting)."""
    _STARTING.update(now=True, terminated=False)
    try:
        proc = subprocess.Popen(cmd, **kwargs)
    except OSError as e:
        raise _not_started(cmd, e) from None
    finally:
        _STARTING["now"] = False
    try:
        if _STARTING["terminated"]:
            raise KeyboardInterrupt
        yield proc
    except BaseException:
        _kill_tree(proc)
        raise
    finally:
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill `proc` and every process under it: gcloud starts ssh (one per worker) as its own
    children, which killing gcloud alone would leave running."""
    try:
        pids = [proc.pid, *_descendants(proc.pid)]  # found first: once gcloud dies they belong to init
    except BaseException:  # a second Ctrl-C / SIGTERM while ps runs: still stop gcloud itself
        pids = [proc.pid]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def _descendants(pid: int) -> list[int]:
    """The processes under `pid` (`ps`, on Linux and macOS alike); [] if ps cannot be run."""
    try:
        table = subprocess.run(["ps", "-A", "-o", "pid=", "-o", "ppid="], capture_output=True, text=True,
                               timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    children: dict[int, list[int]] = {}
    for line in table.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
            children.setdefault(int(fields[1]), []).append(int(fields[0]))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _call(cmd: list[str], capture_output: bool = False, text: bool = False) -> subprocess.CompletedProcess:
    """subprocess.run(check=False), through `_child`."""
    pipe = subprocess.PIPE if capture_output else None
    with _child(cmd, stdout=pipe, stderr=pipe, text=text) as proc:
        out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _call_keeping_stderr(cmd: list[str]) -> tuple[int, str]:
    """Run `cmd` with its stderr shown as it comes — in whatever pieces it is written, so a
    question without a newline (gcloud's "enable the API? (y/N)") is seen before it is
    answered — and kept, to tell a stock-out from other failures."""
    import codecs

    decoder, kept = codecs.getincrementaldecoder("utf-8")(errors="replace"), []
    with _child(cmd, stderr=subprocess.PIPE) as proc:
        while True:
            chunk = os.read(proc.stderr.fileno(), 4096)
            text = decoder.decode(chunk, final=not chunk)
            if text:
                sys.stderr.write(text)
                sys.stderr.flush()
                kept.append(text)
            if not chunk:
                break
        return proc.wait(), "".join(kept)


class Executor:
    """Runs (or, in a dry run, prints) commands. A dry run's slice is READY, except that the
    first `simulate_preemptions` runs fail and leave it PREEMPTED, and the first
    `simulate_stockouts` creates after that fail and leave nothing."""

    def __init__(self, dry_run: bool, simulate_preemptions: int = 0, simulate_stockouts: int = 0):
        self.dry_run = dry_run
        self.preemptions_left = simulate_preemptions
        self.stockouts_left = simulate_stockouts
        self.slice_state = "READY"
        self.restarts = 0  # recreations and reruns after preemptions, all together (--max-restarts)
        self.stockout = False  # whether the last failed create said the zone had no capacity
        self.queued = False  # whether a queued resource was requested (it exists even if it never became ACTIVE)

    def execute(self, cmds: list[list[str]]) -> int:
        for cmd in cmds:
            print("+ " + shlex.join(cmd), flush=True)
            self.stockout = False
            if self.dry_run:
                code = self._simulated(cmd)
            elif cmd[4:5] == ["create"]:  # gcloud compute tpus tpu-vm|queued-resources create NAME
                code, err = _call_keeping_stderr(cmd)
                self.stockout = code != 0 and bool(STOCKOUT.search(err.replace(cmd[5], "")))  # cmd[5]: the name
            else:
                code = _call(cmd).returncode
            if code:
                return code
        return 0

    def _simulated(self, cmd: list[str]) -> int:
        if "ssh" in cmd and any(c.startswith("--command=cd ~/jaxaccel && ") for c in cmd) and self.preemptions_left:
            self.preemptions_left -= 1
            self.slice_state = "PREEMPTED"
            print("# (dry run) simulated preemption: the slice went away during the run", flush=True)
            return 255  # what gcloud ssh returns when the connection drops
        if "create" in cmd:
            if self.slice_state != "READY" and self.stockouts_left:
                self.stockouts_left -= 1
                self.slice_state = "NOT_FOUND"
                self.stockout = True
                print("# (dry run) simulated stock-out: no spot capacity in the zone", flush=True)
                return 1
            self.slice_state = "READY"
        elif "delete" in cmd:
            self.slice_state = "NOT_FOUND"
        return 0

    def sleep(self, seconds: float) -> None:
        if not self.dry_run:
            time.sleep(seconds)

    def state(self, args: argparse.Namespace) -> str:
        """The slice's state: READY, PREEMPTED, ..., NOT_FOUND when gcloud says there is no
        such slice, or UNKNOWN when describe keeps failing for another reason (an expired
        login, the network): that is never taken for a slice that is gone, which would be
        deleted and recreated under a healthy one."""
        cmd = plan(args, "describe")[0]
        for attempt in range(DESCRIBE_TRIES):
            print("+ " + shlex.join(cmd), flush=True)
            if self.dry_run:
                return self.slice_state
            proc = _call(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                state = proc.stdout.strip().upper() or "UNKNOWN"
                return QUEUED_STATES.get(state, state) if multislice(args) else state
            if NOT_FOUND.search(proc.stderr or ""):
                return "NOT_FOUND"
            why = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            print(f"# describe failed ({why[0]}){'; trying again' if attempt + 1 < DESCRIBE_TRIES else ''}",
                  flush=True)
            if attempt + 1 < DESCRIBE_TRIES:
                self.sleep(DESCRIBE_RETRY_S)
        return "UNKNOWN"


def read_slice_spec(args: argparse.Namespace, ex: Executor) -> None:
    """For `run --spot`: the accelerator type and runtime version a preempted slice is recreated
    with are the slice's own (tpu-vm describe), unless given."""
    if args.accelerator_type and args.version:
        return
    cmd = plan(args, "spec")[0]
    if ex.dry_run:  # parse() made sure of --accelerator-type, and of --version or a default for it
        print("+ " + shlex.join(cmd), flush=True)
        args.version = args.version or default_version(args.accelerator_type)
        print(f"# (dry run) taking the slice to be a {args.accelerator_type} with runtime {args.version}", flush=True)
        return
    print("+ " + shlex.join(cmd), flush=True)
    proc = _call(cmd, capture_output=True, text=True)
    fields = proc.stdout.split()
    if proc.returncode or len(fields) != 2:
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1] if proc.returncode else \
            f"unexpected output {proc.stdout.strip()!r}"
        raise LauncherError(f"cannot read slice {args.name}'s accelerator type and runtime version to recreate it "
                            f"after a preemption ({why}): pass --accelerator-type and --version")
    args.accelerator_type = args.accelerator_type or fields[0]
    args.version = args.version or fields[1]
    print(f"# slice {args.name}: {args.accelerator_type}, runtime {args.version} (how a preempted slice is "
          f"recreated)", flush=True)


def git(*words: str) -> subprocess.CompletedProcess:
    return _call(["git", "-C", str(REPO), *words], capture_output=True, text=True)


def sweep_base(text: str) -> str | None:
    """A sweep file's `base:` (a path beside the file, else from the repository root, as the
    sweep runner reads it); None when it has none. Read with PyYAML (jaxaccel's dependency);
    without it, from the top-level `base:` line."""
    try:
        import yaml
    except ImportError:
        match = re.search(r"""^base:[ \t]*(?:"([^"]*)"|'([^']*)'|([^\s#]+))""", text, re.MULTILINE)
        value = None if match is None else next(g for g in match.groups() if g is not None)
        return None if value in (None, "null", "~", "Null", "NULL") else value
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return None  # the sweep runner reports a broken file in one line on the hosts
    base = doc.get("base") if isinstance(doc, dict) else None
    return None if base is None else str(base)


def sweep_results(extra: list[str]) -> str | None:
    """The last --results of --sweep-args (--results PATH or --results=PATH), else None."""
    found = None
    for i, arg in enumerate(extra):
        if arg == "--results" and i + 1 < len(extra):
            found = extra[i + 1]
        elif arg.startswith("--results="):
            found = arg.split("=", 1)[1]
    return found


def sweep_output_dir(extra: list[str], text: str, base_text: str) -> str | None:
    """Where a sweep's runs go: the last `output_dir=` of --sweep-args, else the sweep file's
    `config: output_dir`, else its base config's `output_dir` (None when it cannot be told:
    no PyYAML, a broken file, which the sweep runner reports on the hosts)."""
    given = [a.split("=", 1)[1] for a in extra if a.startswith("output_dir=")]
    if given:
        return given[-1]
    try:
        import yaml
    except ImportError:
        return None
    try:
        sweep, base = yaml.safe_load(text), yaml.safe_load(base_text) if base_text else None
    except yaml.YAMLError:
        return None
    config = sweep.get("config") if isinstance(sweep, dict) else None
    for source in (config, base):
        if isinstance(source, dict) and source.get("output_dir") is not None:
            return str(source["output_dir"])
    return None


def check_source(args: argparse.Namespace) -> None:
    """Before anything is created (also in a dry run): pin the commit that setup ships, check that
    a sweep's config is in it (as a path from the repository root), and warn about uncommitted
    changes, which are not shipped."""
    proc = git("rev-parse", "--verify", "HEAD^{commit}")
    if proc.returncode:
        raise LauncherError(f"{REPO} is not a git checkout with a commit: setup ships its HEAD (git archive)")
    args.commit = proc.stdout.strip()
    short = args.commit[:12]
    if args.step == "sweep":
        given = Path(args.config)
        if not given.is_absolute() and not given.exists():
            given = REPO / given  # the remote command runs in the repository root
        local = Path(os.path.realpath(given.parent)) / given.name
        try:
            rel = local.relative_to(REPO).as_posix()
        except ValueError:
            raise LauncherError(f"--config {args.config}: not in the repository {REPO}, so not shipped") from None
        if git("cat-file", "-e", f"{args.commit}:{rel}").returncode:
            if not local.is_file():
                raise LauncherError(f"--config {args.config}: no such file")
            raise LauncherError(f"--config {rel} is not committed: setup ships HEAD ({short}); commit it first")
        text = git("show", f"{args.commit}:{rel}").stdout
        base, base_text = sweep_base(text), ""
        if base is not None:  # the sweep's base config must be shipped too
            beside = posixpath.normpath(posixpath.join(posixpath.dirname(rel), base))
            shipped = [p for p in (beside, base) if git("cat-file", "-e", f"{args.commit}:{p}").returncode == 0]
            if not shipped:
                raise LauncherError(f"--config {rel}: its base config {base} ({beside}) is not committed: setup "
                                    f"ships HEAD ({short}); commit it first")
            base_text = git("show", f"{args.commit}:{shipped[0]}").stdout
        results = sweep_results(args.sweep_extra)  # by default under output_dir
        for what, where in (("output_dir", sweep_output_dir(args.sweep_extra, text, base_text)),
                            ("--results", results)):
            if where is not None and not where.startswith("gs://") and (args.spot or not args.keep):
                keep = "" if args.spot else " (or --keep)"
                raise LauncherError(f"--config {rel}: the sweep's {what} {where!r} is on the slice's own disk, which "
                                    f"is deleted with the slice and emptied by a preemption: give it as gs://BUCKET/... "
                                    f"in --sweep-args{keep}")
        args.config = rel
    dirty = git("status", "--porcelain", "--untracked-files=no")
    if dirty.returncode == 0 and dirty.stdout.strip():
        sys.stderr.write(f"warning: {REPO} has uncommitted changes; setup ships HEAD ({short}) without them\n")
        sys.stderr.flush()


def retry_waits():
    """Seconds to wait before each retry of a create: doubling from RETRY_WAIT_S, capped."""
    wait = RETRY_WAIT_S
    while True:
        yield wait
        wait = min(2 * wait, RETRY_WAIT_MAX_S)


def recover(args: argparse.Namespace, ex: Executor, state: str, code: int) -> int:
    """Recreate and set up a preempted slice (`state` is one of PREEMPTED_STATES). A recreation that
    fails on a slice that is not READY (no spot capacity, preempted again) is retried after a
    doubling wait; every try counts against --max-restarts. Returns 0 once the slice is ready."""
    waits, stage = retry_waits(), ""
    while True:
        if ex.restarts >= args.max_restarts:
            print(f"# slice {args.name} is {state} and --max-restarts={args.max_restarts} is used up", flush=True)
            return code
        ex.restarts += 1
        if not stage:
            print(f"# slice {args.name} is {state}: recreating it and rerunning the same command "
                  f"(restart {ex.restarts} of at most {args.max_restarts})", flush=True)
        else:
            wait = next(waits)
            print(f"# the {stage} of the recreated slice failed (exit {code}; slice {args.name} is {state}): "
                  f"recreating it again in {wait} s (restart {ex.restarts} of at most {args.max_restarts})", flush=True)
            ex.sleep(wait)
        if state != "NOT_FOUND":
            ex.execute(plan(args, "delete"))  # a preempted TPU VM still holds its name until deleted
        stage, code = "create", create_once(args, ex)
        if code == 0:
            stage, code = "setup", ex.execute(plan(args, "setup"))
            if code == 0:
                return 0
        state = ex.state(args)
        if stage == "setup" and state not in PREEMPTED_STATES:
            print(f"# setup failed (exit {code}) on a {state} slice: not a preemption, not retrying", flush=True)
            return code
        if stage == "create" and state in ("READY", "UNKNOWN"):  # a slice that may be healthy (the name
            # taken, a describe that failed before) is never deleted to try again
            print(f"# the create failed (exit {code}) and slice {args.name} is {state}: not deleting it to try "
                  f"again; check it, then rerun", flush=True)
            return code


def run_with_recovery(args: argparse.Namespace, ex: Executor) -> int:
    """Run the command; on a preempted slice recreate it and run the same command again."""
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
        if state not in PREEMPTED_STATES:  # a notice without a reclaim (e.g. maintenance): the slice is fine
            if ex.restarts >= args.max_restarts:
                print(f"# stopped by a preemption notice again and --max-restarts={args.max_restarts} is used up",
                      flush=True)
                return code
            ex.restarts += 1
            print(f"# stopped by a preemption notice, and slice {args.name} is still {state}: rerunning the same "
                  f"command (restart {ex.restarts} of at most {args.max_restarts})", flush=True)
            continue
        code = recover(args, ex, state, code)
        if code:
            return code


def create_once(args: argparse.Namespace, ex: Executor) -> int:
    """One create. A queued resource (--num-slices > 1) is a request that waits in Cloud TPU's
    queue for capacity: wait until it is ACTIVE, up to --queue-hours; one that fails is 1."""
    code = ex.execute(plan(args, "create"))
    if code or not multislice(args):
        return code
    ex.queued = True  # the request exists from here on, ACTIVE or not: ours to delete
    waited, state = 0, ex.state(args)
    while state in ("QUEUED", "UNKNOWN") and waited < args.queue_hours * 3600:  # (a describe outage is waited out)
        ex.sleep(QUEUE_POLL_S)
        waited += QUEUE_POLL_S
        state = ex.state(args)
    if state == "READY":
        return 0
    print(f"# queued resource {args.name} is {state} after {waited // 60} min, not ACTIVE"
          + (f" (--queue-hours={args.queue_hours} is up)" if state == "QUEUED" else ""), flush=True)
    return 1


def create_slice(args: argparse.Namespace, ex: Executor) -> int:
    """The first create of the slice. A stock-out (the zone has no capacity now) is tried again
    after a doubling wait, up to --capacity-retries times; any other failure is returned."""
    waits = retry_waits()
    for retry in range(args.capacity_retries + 1):
        if retry:
            wait = next(waits)
            print(f"# no {args.accelerator_type} capacity in zone {args.zone} (a stock-out): creating slice "
                  f"{args.name} again in {wait} s (retry {retry} of at most {args.capacity_retries})", flush=True)
            ex.sleep(wait)
        code = create_once(args, ex)
        if code == 0 or not ex.stockout:
            return code
        state = ex.state(args)
        if state in ("READY", "UNKNOWN"):  # a slice of this name may work: never deleted
            print(f"# slice {args.name} " + ("exists and is READY" if state == "READY" else
                                            "is in an unknown state (describe keeps failing)")
                  + ": not creating it again", flush=True)
            return code
        if state != "NOT_FOUND":  # what the failed create left holds the name until deleted
            ex.execute(plan(args, "delete"))
    print(f"# still no capacity in zone {args.zone} and --capacity-retries={args.capacity_retries} is used up",
          flush=True)
    return code


def delete_slice(args: argparse.Namespace, ex: Executor) -> int:
    cmd = plan(args, "delete")
    left = (f"slice {args.name} may still be running (and billing): delete it with: {shlex.join(cmd[0])}")
    try:
        code = ex.execute(cmd)
    except KeyboardInterrupt:
        sys.stderr.write(f"warning: interrupted while deleting: {left}\n")
        raise
    except LauncherError as e:
        sys.stderr.write(f"error: {e}\n")
        code = 1
    if code:
        sys.stderr.write(f"warning: the delete failed (exit {code}): {left}\n")
    return code


def create_run_delete(args: argparse.Namespace, ex: Executor) -> int:
    """`all` and `sweep`: from the create on, the slice is deleted however the launcher ends
    (a failure, an error, Ctrl-C or SIGTERM), unless --keep."""
    owned = True  # an interrupted create goes on server-side: the slice may exist from here on
    try:
        try:
            code = create_slice(args, ex)
        except LauncherError:  # gcloud could not be started: nothing was created
            owned = False
            raise
        if code:  # a failed create made nothing of ours (the name may be someone else's slice), unless
            owned = ex.queued  # it was a queued request that never became ACTIVE: deleted, not left queued
        else:
            code = ex.execute(plan(args, "setup"))
            if code and args.spot:
                state = ex.state(args)
                if state in PREEMPTED_STATES:
                    code = recover(args, ex, state, code)
            if code == 0:
                code = run_with_recovery(args, ex)
    except BaseException:
        if owned and not args.keep:
            print(f"# deleting slice {args.name} before exiting", flush=True)
            delete_slice(args, ex)
        raise
    if owned and not args.keep:
        if code and ex.state(args) == "NOT_FOUND":  # a recreation that gave up: there is nothing to delete
            print(f"# slice {args.name} is gone: nothing to delete", flush=True)
        else:
            deleted = delete_slice(args, ex)  # also (above all) after a failure: a kept slice bills on
            code = code or deleted  # the command's own exit code first
    return code


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("step", choices=["create", "setup", "run", "delete", "all", "sweep"])
    p.add_argument("--name", required=True)
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default=None)
    p.add_argument("--accelerator-type", default=None,
                   help=f"e.g. v4-8, v4-32, v5litepod-16, v5p-64, v6e-8 (create: default {DEFAULT_ACCELERATOR}; "
                        f"run --spot: default the slice's own)")
    p.add_argument("--version", default=None, help="TPU VM runtime image (default: the accelerator type's: "
                   + ", ".join(f"{k} {v}" for k, v in RUNTIME_VERSIONS.items()) + ")")
    p.add_argument("--spot", action="store_true", help="spot capacity; a preempted slice is recreated and the "
                                                       "command rerun")
    p.add_argument("--max-restarts", type=int, default=None,
                   help=f"with --spot: most recreations after preemption (default {MAX_RESTARTS})")
    p.add_argument("--num-slices", type=int, default=1, metavar="N",
                   help="N > 1: a Multislice job, N slices of --accelerator-type joined by the data-center network, "
                        "made as one queued resource (nodes NAME-0 ... NAME-(N-1)); every command runs on every "
                        "worker of every slice")
    p.add_argument("--queue-hours", type=float, default=24.0,
                   help="with --num-slices > 1: how long to wait for the queued resource to become ACTIVE")
    p.add_argument("--capacity-retries", type=int, default=CAPACITY_RETRIES, metavar="N",
                   help="a first create that fails for want of capacity in the zone (a stock-out) is tried again "
                        "up to N times, after waits doubling from 1 to 16 minutes")
    p.add_argument("--command", default=None,
                   help=f"run in the repository root, with the slice's jaxaccel environment active (default: "
                        f"{DEFAULT_COMMAND}; 'sweep' runs its sweep instead)")
    p.add_argument("--config", help="with 'sweep': the sweep file (configs/experiments/*-pod.yaml), committed")
    p.add_argument("--sweep-args", default="", help="with 'sweep': more arguments, e.g. output_dir=gs://B/x --only G")
    p.add_argument("--keep", action="store_true", help="with 'all'/'sweep': do not delete the TPU VM afterwards")
    p.add_argument("--dry-run", action="store_true", help="print the gcloud commands instead of running them")
    p.add_argument("--simulate-preemption", type=int, default=0, metavar="N",
                   help="with --dry-run: the first N runs fail on a preempted slice")
    p.add_argument("--simulate-stockout", type=int, default=0, metavar="N",
                   help="with --dry-run: the first N creates after a preemption fail (no capacity)")
    args = p.parse_args(argv)
    # what gcloud would misread: "--name=--help" printed gcloud's help, exit 0, taken for a create
    if not NODE_NAME.match(args.name):
        p.error(f"--name {args.name!r}: a TPU name is lowercase letters, digits and hyphens, starting with a letter "
                f"(at most 63)")
    for flag, value in (("--zone", args.zone), ("--project", args.project)):
        if value is not None and not GCLOUD_WORD.match(value):
            p.error(f"{flag} {value!r}: not a Google Cloud {flag[2:]} name")
    if args.accelerator_type is not None and not ACCELERATOR.match(args.accelerator_type):
        p.error(f"--accelerator-type {args.accelerator_type!r}: expected a TPU type and its size, e.g. v4-8, "
                f"v5litepod-16, v6e-8")
    # options of other steps, which would be dropped without a word
    given = {"--config": args.config, "--sweep-args": args.sweep_args, "--keep": args.keep,
             "--command": args.command is not None}
    allowed = {"--config": ("sweep",), "--sweep-args": ("sweep",), "--keep": ("all", "sweep"),
               "--command": ("run", "all")}
    for flag, value in given.items():
        if value and args.step not in allowed[flag]:
            why = ": it runs its sweep (--config, --sweep-args)" if args.step == "sweep" else ""
            p.error(f"{flag} is not used by {args.step!r}{why}: it goes with {' or '.join(map(repr, allowed[flag]))}")
    if args.max_restarts is not None and not args.spot:
        p.error("--max-restarts goes with --spot (recreations after a preemption)")
    args.max_restarts = MAX_RESTARTS if args.max_restarts is None else args.max_restarts
    if args.command is not None and not args.command.strip():  # an unset $CMD: not the default bench
        p.error("--command is empty")
    args.command = DEFAULT_COMMAND if args.command is None else args.command
    if (args.simulate_preemption or args.simulate_stockout) and not args.dry_run:
        p.error("--simulate-preemption and --simulate-stockout need --dry-run")
    if min(args.max_restarts, args.capacity_retries, args.simulate_preemption, args.simulate_stockout) < 0:
        p.error("--max-restarts, --capacity-retries, --simulate-preemption and --simulate-stockout must be >= 0")
    if args.num_slices < 1:
        p.error(f"--num-slices must be >= 1, got {args.num_slices}")
    if not 0 < args.queue_hours < float("inf"):
        p.error(f"--queue-hours must be a finite number > 0, got {args.queue_hours}")
    if args.num_slices > 1 and args.step == "run" and args.spot and not (args.accelerator_type and args.version):
        p.error("run --spot --num-slices needs --accelerator-type and --version (to recreate the queued resource "
                "after a preemption)")
    if args.step == "sweep":
        if not args.config:
            p.error("sweep needs --config (a sweep file)")
        try:
            args.sweep_extra = shlex.split(args.sweep_args)
        except ValueError as e:
            p.error(f"--sweep-args {args.sweep_args!r}: {str(e).lower()}")
    creates = args.step in ("create", "all", "sweep")
    spot_dry_run = args.step == "run" and args.spot and args.dry_run
    if creates:
        args.accelerator_type = args.accelerator_type or DEFAULT_ACCELERATOR
    elif spot_dry_run and not args.accelerator_type:
        p.error("run --spot --dry-run needs --accelerator-type (a real run reads it from `tpu-vm describe`, "
                "to recreate the same slice after a preemption)")
    if (creates or spot_dry_run) and not (args.version or default_version(args.accelerator_type)):
        p.error(f"no default --version for accelerator type {args.accelerator_type!r} (known: "
                f"{', '.join(RUNTIME_VERSIONS)}): pass --version")
    if creates:
        args.version = args.version or default_version(args.accelerator_type)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    ex = Executor(args.dry_run, args.simulate_preemption, args.simulate_stockout)
    workdir = None
    # a closed terminal or SSH session (SIGHUP) too: the slice would be left running, billing
    # (not where SIGHUP is ignored, as under nohup: that caller wants the run to outlive the session)
    hup = [signal.SIGHUP] if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN else []
    previous = {s: signal.signal(s, _terminated) for s in (signal.SIGTERM, *hup)}
    try:
        if args.step in ("setup", "all", "sweep") or (args.step == "run" and args.spot):  # these may set up
            check_source(args)
            if args.step == "sweep":
                args.command = sweep_command(args, args.sweep_extra)
            workdir = tempfile.mkdtemp(prefix="jaxaccel-tpu-pod-")  # this invocation's archive, removed at exit
            args.archive = os.path.join(workdir, REMOTE_ARCHIVE)
        if args.step == "run":
            if args.spot:
                read_slice_spec(args, ex)
            return run_with_recovery(args, ex)
        if args.step in ("all", "sweep"):
            return create_run_delete(args, ex)
        if args.step == "create":
            return create_slice(args, ex)
        return ex.execute(plan(args, args.step))
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return EXIT_INTERRUPTED
    except LauncherError as e:
        sys.stderr.write(f"error: {e}\n")
        return EXIT_BAD_INPUT
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
