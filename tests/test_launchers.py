"""gcp/ and colab/ are shipped, so they are tested: the pod launcher's dry run, and the
notebook's code cells (minus shell lines) executed top to bottom."""
import contextlib
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "gcp" / "tpu_pod.py"


@contextlib.contextmanager
def hangup_by_default():
    """SIGHUP as a terminal session has it, for the processes started meanwhile: under `nohup
    pytest` it is ignored, children inherit that (through exec too), and the launcher then
    rightly lets its run outlive the session."""
    import signal

    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, previous)


def launch(*argv, env=None, cwd=None, launcher=LAUNCHER) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(launcher), *map(str, argv)], check=False, capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=120)


def fake_gcloud(tmp_path: Path, cases: str = "") -> dict:
    """An environment whose `gcloud` logs each call (a line of tmp_path/gcloud.log) and does what
    the bash `case "$*"` branches in `cases` say (else exits 0); `$(nth KIND)` counts calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "gcloud"
    script.write_text(f"""#!/bin/bash
echo "$*" >> "{tmp_path}/gcloud.log"
nth() {{ n=$(( $(cat "{tmp_path}/$1.count" 2>/dev/null || echo 0) + 1 )); echo $n > "{tmp_path}/$1.count"; echo $n; }}
case "$*" in
{cases}
esac
exit 0
""")
    script.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def gcloud_calls(tmp_path: Path) -> list[str]:
    """The fake gcloud's calls as steps: create, scp, install, run, describe, spec, delete."""
    steps = []
    for line in (tmp_path / "gcloud.log").read_text().splitlines():
        verb = line.split()[3]  # compute tpus tpu-vm VERB
        if verb == "ssh":
            verb = "run" if "--command=cd ~/jaxaccel" in line else "install"
        elif verb == "describe" and "acceleratorType" in line:
            verb = "spec"
        steps.append(verb)
    return steps


def test_tpu_pod_dry_run_creates_runs_everywhere_and_deletes():
    proc = subprocess.run([sys.executable, str(ROOT / "gcp" / "tpu_pod.py"), "all", "--name", "pod", "--zone",
                           "us-central2-b", "--accelerator-type", "v4-32", "--command", "python -m jaxaccel.decode",
                           "--dry-run"], capture_output=True, text=True, check=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert "tpu-vm create pod" in lines[0] and "--accelerator-type=v4-32" in lines[0]
    assert lines[1].startswith("+ git -C") and "archive" in lines[1]
    assert all("--worker=all" in line for line in lines[2:5])
    assert "cd ~/jaxaccel && . ~/jaxaccel-venv/bin/activate && python -m jaxaccel.decode" in lines[4]
    assert "tpu-vm delete pod" in lines[-1] and "--quiet" in lines[-1]
    keep = subprocess.run([sys.executable, str(ROOT / "gcp" / "tpu_pod.py"), "all", "--name", "pod", "--zone", "z",
                           "--keep", "--dry-run"], capture_output=True, text=True, check=True)
    assert "delete" not in keep.stdout


def test_tpu_pod_setup_and_run_use_the_same_python_3_11_venv():
    """TPU images are Ubuntu 22.04 (python3 is 3.10, no `python`): setup makes a 3.11 venv, installs
    into it with its interpreter, and the run activates that venv."""
    proc = launch("all", "--name", "pod", "--zone", "z", "--command", "python -m jaxaccel.decode", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    install = next(line for line in proc.stdout.splitlines() if "pip install" in line)
    run = next(line for line in proc.stdout.splitlines() if "--command=cd ~/jaxaccel" in line)
    python = re.search(r"(\S+)/bin/python -m pip install -q -e \S*\.\[train\]", install)  # train: pods train
    assert python, install
    venv = python.group(1)
    assert f"uv venv -q --seed --allow-existing --python 3.11 {venv} " in install
    assert "python3 -m pip install -q -e" not in install and "python3 -m pip install -q -U pip" not in install
    assert f"--command=cd ~/jaxaccel && . {venv}/bin/activate && python -m jaxaccel.decode" in run


def test_tpu_pod_setup_unpacks_over_the_last_code_without_its_stale_files_or_touching_runs(tmp_path, launcher_module):
    """A second setup on a kept slice (another commit) removes the files the first archive put in
    ~/jaxaccel and the second lacks, and keeps everything else there (a local run's folder)."""
    import io
    import tarfile

    home = tmp_path / "home"
    home.mkdir()

    def unpack(files: dict[str, str], cut: bool = False) -> None:
        archive = home / launcher_module.REMOTE_ARCHIVE
        with tarfile.open(archive, "w:gz") as tar:
            for name, text in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(text.encode())
                tar.addfile(info, io.BytesIO(text.encode()))
        if cut:  # a damaged copy: the listing breaks off
            archive.write_bytes(archive.read_bytes()[:len(archive.read_bytes()) // 3])
        proc = subprocess.run(["sh", "-c", launcher_module.UNPACK], env={**os.environ, "HOME": str(home)},
                              capture_output=True, text=True, timeout=60)
        assert (proc.returncode != 0) == cut, proc.stderr

    code = home / "jaxaccel"
    unpack({"jaxaccel/old.py": "old", "jaxaccel/kept.py": "v1", "configs/gone it.yaml": "x"})
    (code / "runs" / "r1").mkdir(parents=True)
    (code / "runs" / "r1" / "metrics.jsonl").write_text("{}")
    assert (code / "jaxaccel" / "old.py").exists() and (code / "configs" / "gone it.yaml").exists()
    unpack({"jaxaccel/kept.py": "v2", "jaxaccel/new.py": "new"})
    assert not (code / "jaxaccel" / "old.py").exists() and not (code / "configs" / "gone it.yaml").exists()
    assert (code / "jaxaccel" / "kept.py").read_text() == "v2" and (code / "jaxaccel" / "new.py").read_text() == "new"
    assert (code / "runs" / "r1" / "metrics.jsonl").read_text() == "{}"
    assert not (home / launcher_module.REMOTE_ARCHIVE).exists()
    # a damaged archive fails the setup before anything is removed (a piped listing's partial
    # output once named every file past the break as stale)
    unpack({"jaxaccel/kept.py": "v3", **{f"jaxaccel/m{i:03d}.py": "x" * 4000 for i in range(60)}}, cut=True)
    assert (code / "jaxaccel" / "kept.py").read_text() == "v2" and (code / "jaxaccel" / "new.py").exists()
    args = launcher_module.parse(["setup", "--name", "p", "--zone", "z"])
    args.archive, args.commit = "a.tar.gz", "HEAD"
    assert launcher_module.UNPACK in launcher_module.plan(args, "setup")[-1][-1]


def test_tpu_pod_default_runtime_version_follows_the_accelerator_type():
    for accelerator, version in [("v4-32", "tpu-ubuntu2204-base"), ("v3-8", "tpu-ubuntu2204-base"),
                                 ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-64", "v2-alpha-tpuv5"),
                                 ("v6e-8", "v2-alpha-tpuv6e")]:
        proc = launch("create", "--name", "p", "--zone", "z", "--accelerator-type", accelerator, "--dry-run")
        assert proc.returncode == 0, proc.stderr
        assert f"--accelerator-type={accelerator} --version={version}" in proc.stdout
    given = launch("create", "--name", "p", "--zone", "z", "--accelerator-type", "v6e-8", "--version", "my-image",
                   "--dry-run")
    assert given.returncode == 0 and "--version=my-image" in given.stdout
    unknown = launch("create", "--name", "p", "--zone", "z", "--accelerator-type", "v9x-8", "--dry-run")
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert unknown.stderr.startswith("error: no default --version for accelerator type 'v9x-8'")
    assert len(unknown.stderr.splitlines()) == 1


def test_tpu_pod_spot_run_recreates_the_slice_with_its_own_type_and_version(tmp_path):
    """`run` takes no --accelerator-type: a preempted slice is recreated as `tpu-vm describe` reports it,
    not as the default v4-8."""
    env = fake_gcloud(tmp_path, """
*"describe"*"acceleratorType"*) printf 'v5litepod-16\tv2-alpha-tpuv5-lite\n' ;;
*"describe"*) [ "$(nth describe)" = 1 ] && echo PREEMPTED || echo READY ;;
*"--command=cd ~/jaxaccel"*) [ "$(nth run)" = 1 ] && exit 255 ;;
""")
    proc = launch("run", "--name", "pod", "--zone", "z", "--spot", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert gcloud_calls(tmp_path) == ["spec", "run", "describe", "delete", "create", "scp", "install", "run"]
    create = next(line for line in (tmp_path / "gcloud.log").read_text().splitlines() if " create " in line)
    assert "--accelerator-type=v5litepod-16" in create and "--version=v2-alpha-tpuv5-lite" in create
    assert "--spot" in create
    dry = launch("run", "--name", "pod", "--zone", "z", "--spot", "--dry-run", "--simulate-preemption", "1")
    assert dry.returncode == 2 and "+ gcloud" not in dry.stdout
    assert dry.stderr.startswith("error: run --spot --dry-run needs --accelerator-type")
    given = launch("run", "--name", "pod", "--zone", "z", "--spot", "--accelerator-type", "v6e-8", "--dry-run",
                   "--simulate-preemption", "1")
    assert given.returncode == 0, given.stderr
    assert "tpu-vm create pod --zone=z --accelerator-type=v6e-8 --version=v2-alpha-tpuv6e --spot" in given.stdout


def test_tpu_pod_sigterm_deletes_the_slice_and_exits_130(tmp_path):
    env = fake_gcloud(tmp_path, """*"--command=cd ~/jaxaccel"*) kill -TERM $PPID; exec sleep 30 ;;""")
    proc = launch("all", "--name", "pod", "--zone", "z", env=env)
    assert proc.returncode == 130, proc.stdout + proc.stderr
    assert proc.stderr.splitlines()[-1] == "interrupted" and "Traceback" not in proc.stderr
    assert gcloud_calls(tmp_path) == ["create", "scp", "install", "run", "delete"]
    (tmp_path / "gcloud.log").unlink()
    keep = launch("all", "--name", "pod", "--zone", "z", "--keep", env=env)
    assert keep.returncode == 130 and "Traceback" not in keep.stderr
    assert gcloud_calls(tmp_path) == ["create", "scp", "install", "run"]


def test_tpu_pod_sigterm_stops_the_processes_gcloud_started(tmp_path):
    """gcloud runs ssh as its own child: killing gcloud alone left that child running after the
    launcher exited."""
    env = fake_gcloud(tmp_path, f"""*"--command=cd ~/jaxaccel"*) sleep 300 >/dev/null 2>&1 & echo $! > \
"{tmp_path}/child.pid"; kill -TERM $PPID; wait ;;""")
    proc = launch("run", "--name", "pod", "--zone", "z", "--command", "python -m x", env=env)
    assert proc.returncode == 130, proc.stdout + proc.stderr
    child = int((tmp_path / "child.pid").read_text())
    time.sleep(0.5)
    assert not os.path.exists(f"/proc/{child}") or "zombie" in open(f"/proc/{child}/status").read().lower(), \
        "gcloud's child outlived the launcher"


def test_tpu_pod_a_transient_describe_failure_is_not_a_gone_slice(tmp_path, launcher_module, monkeypatch, capfd):
    """run --spot: the command fails for its own reasons and one describe fails (an expired
    login): that was read as NOT_FOUND, so the launcher recreated the slice, the create met the
    healthy slice (ALREADY_EXISTS) and it was deleted. Now describe is asked again, and only
    gcloud's NOT_FOUND means gone."""
    env = fake_gcloud(tmp_path, """
*"--command=cd ~/jaxaccel"*) exit 1 ;;
*" describe "*) [ "$(nth describe)" = 1 ] && { echo "ERROR: (gcloud.compute.tpus.tpu-vm.describe) There was a \
problem refreshing your current auth tokens" >&2; exit 1; }; echo READY ;;
*" create "*) echo "ERROR: ALREADY_EXISTS: Resource already exists" >&2; exit 1 ;;
""")
    monkeypatch.setenv("PATH", env["PATH"])
    argv = ["run", "--name", "pod", "--zone", "z", "--spot", "--accelerator-type", "v4-8", "--version", "v",
            "--command", "python -m x"]
    code = launcher_module.main(argv)
    out, err = capfd.readouterr()
    assert code == 1 and "not a preemption, not retrying" in out, out + err
    assert gcloud_calls(tmp_path) == ["run", "describe", "describe"] and launcher_module.slept == [10]
    # describe failing every time: UNKNOWN, still not a slice to delete
    (tmp_path / "always").mkdir()
    env = fake_gcloud(tmp_path / "always", """
*"--command=cd ~/jaxaccel"*) exit 1 ;;
*" describe "*) echo "ERROR: network unreachable" >&2; exit 1 ;;
""")
    monkeypatch.setenv("PATH", env["PATH"])
    code = launcher_module.main(argv)
    out, err = capfd.readouterr()
    assert code == 1 and "on a UNKNOWN slice: not a preemption" in out
    assert gcloud_calls(tmp_path / "always") == ["run", "describe", "describe", "describe"]
    assert "delete" not in gcloud_calls(tmp_path / "always")


def test_tpu_pod_a_describe_outage_neither_deletes_after_a_stockout_nor_ends_a_queue_wait(tmp_path, launcher_module,
                                                                                         monkeypatch, capfd):
    """UNKNOWN (describe failing for another reason than NOT_FOUND) is not a slice to delete
    after a stock-out, and a Multislice request keeps waiting through it."""
    env = fake_gcloud(tmp_path, f"""
*" create "*) [ "$(nth create)" -le 1 ] && {{ echo '{STOCKOUT_ERROR}' >&2; exit 1; }} ;;
*" describe "*) echo "ERROR: (gcloud) There was a problem refreshing your current auth tokens" >&2; exit 1 ;;
""")
    monkeypatch.setenv("PATH", env["PATH"])
    code = launcher_module.main(["all", "--name", "pod", "--zone", "z", "--command", "true", "--keep"])
    out, _ = capfd.readouterr()
    assert code == 1 and "is in an unknown state (describe keeps failing): not creating it again" in out
    assert gcloud_calls(tmp_path) == ["create", "describe", "describe", "describe"]
    (tmp_path / "queue").mkdir()
    env = fake_gcloud(tmp_path / "queue", """
*" describe "*) case "$(nth describe)" in 1) echo WAITING_FOR_RESOURCES ;; 2|3|4) echo "ERROR: (gcloud) Network is \
unreachable" >&2; exit 1 ;; *) echo ACTIVE ;; esac ;;
""")
    monkeypatch.setenv("PATH", env["PATH"])
    code = launcher_module.main(["all", "--name", "ms", "--zone", "z", "--accelerator-type", "v5litepod-16",
                                 "--num-slices", "2", "--command", "true"])
    out, err = capfd.readouterr()
    assert code == 0 and "run" in gcloud_calls(tmp_path / "queue"), out + err


@pytest.mark.parametrize("call", ["_call", "_call_keeping_stderr"])
def test_tpu_pod_a_sigterm_while_a_command_starts_stops_that_command(launcher_module, monkeypatch, call):
    """A SIGTERM that lands inside subprocess.Popen, after the child exists (the fake gcloud of
    the test above signals right as it starts, so it did about one run in three on a loaded
    machine), left that child running after the launcher exited."""
    import signal

    started, real_popen = [], subprocess.Popen

    def popen_then_sigterm(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        launcher_module._terminated(signal.SIGTERM, None)  # before Popen has returned
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", popen_then_sigterm)
    try:
        with pytest.raises(KeyboardInterrupt):
            getattr(launcher_module, call)(["sleep", "30"])
        assert started[0].poll() == -signal.SIGKILL  # stopped, not left running
    finally:
        if started[0].poll() is None:
            started[0].kill()
            started[0].wait()


def test_tpu_pod_missing_tools_and_bad_sweep_args_are_one_line_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = launch("run", "--name", "p", "--zone", "z", env={**os.environ, "PATH": str(empty)})
    assert proc.returncode == 2
    assert proc.stderr == ("error: gcloud not found: install the Google Cloud CLI "
                           "(https://cloud.google.com/sdk/docs/install)\n")
    env = fake_gcloud(tmp_path)
    env["PATH"] = str(tmp_path / "bin")  # gcloud only: no git
    proc = launch("setup", "--name", "p", "--zone", "z", env=env)
    assert proc.returncode == 2 and proc.stderr == "error: git not found: install git\n"
    assert not (tmp_path / "gcloud.log").exists()
    proc = launch("sweep", "--name", "p", "--zone", "z", "--config", "configs/experiments/repetition-pod.yaml",
                  "--sweep-args", "output_dir='gs://b/x", "--dry-run")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: --sweep-args") and len(proc.stderr.splitlines()) == 1


@pytest.mark.parametrize("args,message", [
    (["create", "--name=--help", "--zone", "z"], "--name '--help': a TPU name is lowercase"),  # gcloud's help, exit 0
    (["create", "--name", "p", "--zone="], "--zone '': not a Google Cloud zone name"),
    (["create", "--name", "p", "--zone", "z", "--accelerator-type", "v4"], "--accelerator-type 'v4': expected"),
    (["create", "--name", "p", "--zone", "z", "--num-slices", "2", "--queue-hours", "inf"], "finite number > 0"),
    # options of another step were dropped without a word: `all` ran the default bench
    (["all", "--name", "p", "--zone", "z", "--config", "configs/experiments/repetition-pod.yaml"],
     "--config is not used by 'all': it goes with 'sweep'"),
    (["all", "--name", "p", "--zone", "z", "--sweep-args", "output_dir=gs://b/x"], "--sweep-args is not used by 'all'"),
    (["run", "--name", "p", "--zone", "z", "--keep"], "--keep is not used by 'run': it goes with 'all' or 'sweep'"),
    (["all", "--name", "p", "--zone", "z", "--max-restarts", "3"], "--max-restarts goes with --spot"),
    (["sweep", "--name", "p", "--zone", "z", "--config", "configs/experiments/repetition-pod.yaml", "--command", "ls"],
     "--command is not used by 'sweep': it runs its sweep"),
    (["create", "--name", "p", "--zone", "z", "--command", "ls"], "--command is not used by 'create'"),
    (["all", "--name", "p", "--zone", "z", "--command", ""], "--command is empty"),  # ran the default bench
    (["sweep", "--name", "p", "--zone", "z", "--config", "configs/experiments/repetition-pod.yaml", "--sweep-args",
      "output_dir=gs://b/x --results /tmp/r.json"], "the sweep's --results '/tmp/r.json' is on the slice's own disk"),
    (["sweep", "--name", "p", "--zone", "z", "--config", "configs/experiments/repetition.yaml", "--spot", "--keep"],
     "emptied by a preemption: give it as gs://BUCKET/... in --sweep-args"),  # --keep does not survive a preemption
    # a sweep whose runs go on the slice's own disk: deleted with the slice, results and all
    (["sweep", "--name", "p", "--zone", "z", "--config", "configs/experiments/repetition.yaml"],
     "the sweep's output_dir 'runs/token_crisis' is on the slice's own disk"),
    (["sweep", "--name", "p", "--zone", "z", "--config", "configs/experiments/repetition.yaml"],
     "in --sweep-args (or --keep)"),
    (["sweep", "--name", "p", "--zone", "z", "--config", "configs/experiments/repetition-pod.yaml", "--sweep-args",
      "output_dir=/tmp/x"], "the sweep's output_dir '/tmp/x' is on the slice's own disk"),
])
def test_tpu_pod_refuses_what_gcloud_or_the_run_would_misread(tmp_path, args, message):
    proc = launch(*args, "--dry-run", env=fake_gcloud(tmp_path))
    assert proc.returncode == 2 and "+ " not in proc.stdout, proc.stdout + proc.stderr
    assert message in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr


def test_tpu_pod_a_sweep_to_a_bucket_or_kept_slice_plans(tmp_path):
    env = fake_gcloud(tmp_path)
    for extra in (["--sweep-args", "output_dir=gs://b/x"], ["--keep"]):
        proc = launch("sweep", "--name", "p", "--zone", "z", "--config", "configs/experiments/repetition.yaml",
                      *extra, "--dry-run", env=env)
        assert proc.returncode == 0 and "jaxaccel.experiments sweep configs/experiments/repetition.yaml" in proc.stdout


def test_tpu_pod_sighup_deletes_the_slice_and_exits_130(tmp_path):
    """A closed terminal or SSH session: only SIGTERM and Ctrl-C were handled, so SIGHUP left
    the slice running (and billing) and exited 129."""
    import pty
    import signal

    env = fake_gcloud(tmp_path, """*"--command=cd ~/jaxaccel"*) kill -HUP $PPID; exec sleep 30 ;;""")
    with hangup_by_default():
        proc = launch("all", "--name", "pod", "--zone", "z", env=env)
    assert proc.returncode == 130, proc.stdout + proc.stderr
    assert gcloud_calls(tmp_path) == ["create", "scp", "install", "run", "delete"]
    # under nohup (SIGHUP ignored) the run outlives the session, as it did
    (tmp_path / "nohup").mkdir()
    hung_up = fake_gcloud(tmp_path / "nohup", """*"--command=cd ~/jaxaccel"*) kill -HUP $PPID; sleep 1 ;;""")
    nohup = subprocess.run([sys.executable, str(LAUNCHER), "all", "--name", "pod", "--zone", "z"], env=hung_up,
                           capture_output=True, text=True, timeout=120,
                           preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert nohup.returncode == 0, nohup.stderr
    assert gcloud_calls(tmp_path / "nohup") == ["create", "scp", "install", "run", "delete"]
    # a terminal that really closes: writing to it fails (EIO), which stopped the launcher before the delete
    (tmp_path / "pty").mkdir()
    slow = fake_gcloud(tmp_path / "pty", """*"--command=cd ~/jaxaccel"*) trap "" HUP; exec sleep 30 ;;""")
    pid, master = pty.fork()
    if pid == 0:  # the launcher, on the pty as its terminal (SIGHUP as a terminal session has it)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        os.execve(sys.executable, [sys.executable, str(LAUNCHER), "all", "--name", "pod", "--zone", "z"], slow)
    log = tmp_path / "pty" / "gcloud.log"
    deadline = time.time() + 60
    while time.time() < deadline and not (log.exists() and "--command=cd ~/jaxaccel" in log.read_text()):
        with contextlib.suppress(OSError):
            if select.select([master], [], [], 0.1)[0]:
                os.read(master, 4096)
    os.close(master)  # the terminal goes away: the kernel sends SIGHUP
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 130 and gcloud_calls(tmp_path / "pty")[-1] == "delete"


def test_tpu_pod_sweep_config_must_be_committed_before_anything_is_created(tmp_path):
    repo = tmp_path / "repo"
    (repo / "gcp").mkdir(parents=True)
    (repo / "configs").mkdir()
    launcher = repo / "gcp" / "tpu_pod.py"
    shutil.copy(LAUNCHER, launcher)
    (repo / "configs" / "a.yaml").write_text("name: a\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "a"], check=True)
    (repo / "configs" / "b.yaml").write_text("name: b\n")  # not committed: setup would not ship it
    sweep = ["sweep", "--name", "p", "--zone", "z", "--dry-run", "--config"]
    proc = launch(*sweep, "configs/b.yaml", launcher=launcher, cwd=repo)
    assert proc.returncode == 2 and "+ " not in proc.stdout
    assert proc.stderr.startswith("error: --config configs/b.yaml is not committed")
    proc = launch(*sweep, "configs/missing.yaml", launcher=launcher, cwd=repo)
    assert proc.returncode == 2 and proc.stderr == "error: --config configs/missing.yaml: no such file\n"
    (repo / "configs" / "a.yaml").write_text("name: changed\n")  # committed, then changed: a warning
    proc = launch(*sweep, repo / "configs" / "a.yaml", launcher=launcher, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("warning: ") and "uncommitted changes" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    assert "python -m jaxaccel.experiments sweep configs/a.yaml --distributed" in proc.stdout
    # its base config is shipped too: beside it (as the sweep runner reads it first) or from the root
    (repo / "configs" / "experiments").mkdir()
    (repo / "configs" / "experiments" / "c.yaml").write_text("name: c\nbase: ../base.yaml  # the runs' base\n")
    (repo / "configs" / "experiments" / "d.yaml").write_text("name: d\nbase: 'configs/base.yaml'\n")
    (repo / "configs" / "base.yaml").write_text("output_dir: gs://bucket/runs\n")
    subprocess.run(git + ["add", "configs/experiments"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "c"], check=True)
    for name in ("c", "d"):
        proc = launch(*sweep, f"configs/experiments/{name}.yaml", launcher=launcher, cwd=repo)
        assert proc.returncode == 2 and "+ " not in proc.stdout, proc.stdout + proc.stderr
        assert proc.stderr.startswith(f"error: --config configs/experiments/{name}.yaml: its base config ")
        assert "configs/base.yaml) is not committed" in proc.stderr and len(proc.stderr.splitlines()) == 1
    subprocess.run(git + ["add", "configs/base.yaml"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "base"], check=True)
    for name in ("c", "d"):
        proc = launch(*sweep, f"configs/experiments/{name}.yaml", launcher=launcher, cwd=repo)
        assert proc.returncode == 0 and "is not committed" not in proc.stderr, proc.stderr


def test_tpu_pod_spot_recovery_retries_a_failed_recreate_with_backoff():
    base = ["all", "--name", "pod", "--zone", "z", "--spot", "--dry-run", "--simulate-preemption", "1"]
    proc = launch(*base, "--simulate-stockout", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    creates = [line for line in proc.stdout.splitlines() if "tpu-vm create" in line]
    assert len(creates) == 4
    assert "recreating it again in 60 s (restart 2 of at most 20)" in proc.stdout
    assert "recreating it again in 120 s (restart 3 of at most 20)" in proc.stdout
    runs = [line for line in proc.stdout.splitlines() if "--command=cd ~/jaxaccel" in line]
    assert len(runs) == 2 and proc.stdout.splitlines()[-1].startswith("+ gcloud compute tpus tpu-vm delete pod")
    archives = {line.split(" -o ")[1].split()[0] for line in proc.stdout.splitlines() if " archive " in line}
    assert len(archives) == 1  # one archive of this invocation, removed at exit
    archive = archives.pop()
    assert archive != "/tmp/jaxaccel-src.tar.gz" and not os.path.exists(os.path.dirname(archive))
    limited = launch(*base, "--simulate-stockout", "5", "--max-restarts", "2")
    assert limited.returncode != 0
    assert "--max-restarts=2 is used up" in limited.stdout
    assert len([line for line in limited.stdout.splitlines() if "tpu-vm create" in line]) == 3
    # given up with no slice left: nothing to delete (no "may still be running" warning), the failure's code kept
    assert "slice pod is gone: nothing to delete" in limited.stdout and "may still be running" not in limited.stderr
    assert limited.returncode == 1 and "tpu-vm delete" not in limited.stdout.splitlines()[-1]


STOCKOUT_ERROR = ('ERROR: (gcloud.compute.tpus.tpu-vm.create) There is no more capacity in the zone "z"; you can '
                  'try in another zone where Cloud TPU Nodes are offered (see https://cloud.google.com/tpu/docs/regions) '
                  '[EID: 0x9f48947a7d57c8d]')


@pytest.fixture
def launcher_module(monkeypatch):
    """gcp/tpu_pod.py imported, its waits recorded instead of slept."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("tpu_pod_under_test", LAUNCHER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.slept = []
    monkeypatch.setattr(module.Executor, "sleep", lambda self, seconds: module.slept.append(seconds))
    return module


def test_tpu_pod_first_create_waits_out_a_stockout_and_nothing_else(tmp_path, launcher_module, monkeypatch, capfd):
    # gcloud's own stock-out text (the TPU API's error code 8): the first two creates fail, the
    # third makes the slice; each retry asks whether the failed create left a slice to delete
    env = fake_gcloud(tmp_path, f"""
*" create "*) [ "$(nth create)" -le 2 ] && {{ echo '{STOCKOUT_ERROR}' >&2; exit 1; }} ;;
*" describe "*) [ "$(nth describe)" = 1 ] && {{ echo CREATING; exit 0; }}; echo "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Requested entity was not found." >&2; exit 1 ;;
""")
    monkeypatch.setenv("PATH", env["PATH"])
    code = launcher_module.main(["all", "--name", "pod", "--zone", "z", "--command", "true"])
    out, err = capfd.readouterr()
    assert code == 0, out + err
    assert gcloud_calls(tmp_path) == ["create", "describe", "delete", "create", "describe", "create", "scp",
                                      "install", "run", "delete"]
    assert launcher_module.slept == [60, 120]
    assert "no v4-8 capacity in zone z (a stock-out): creating slice pod again in 60 s (retry 1 of at most 6)" in out
    assert err.count("There is no more capacity") == 2  # gcloud's own message still reaches the user
    # --capacity-retries bounds the waiting; the slice was never made, so nothing is deleted
    (tmp_path / "gcloud.log").unlink()
    (tmp_path / "create.count").unlink()
    launcher_module.slept.clear()
    code = launcher_module.main(["create", "--name", "pod", "--zone", "z", "--capacity-retries", "1"])
    out, err = capfd.readouterr()
    assert code == 1 and launcher_module.slept == [60]
    assert gcloud_calls(tmp_path) == ["create", "describe", "create", "describe"]
    assert "--capacity-retries=1 is used up" in out
    # a quota error is not a stock-out: returned at once, not waited out
    (tmp_path / "quota").mkdir()
    env = fake_gcloud(tmp_path / "quota", """
*" create "*) echo "ERROR: (gcloud.compute.tpus.tpu-vm.create) Quota limit 'TPUV4PodPerProjectPerZone' has been \
exceeded" >&2; exit 1 ;;
""")
    monkeypatch.setenv("PATH", env["PATH"])
    launcher_module.slept.clear()
    code = launcher_module.main(["all", "--name", "pod", "--zone", "z", "--command", "true"])
    out, err = capfd.readouterr()
    assert code == 1 and launcher_module.slept == [] and "Quota limit" in err
    assert gcloud_calls(tmp_path / "quota") == ["create"]
    # a slice named like a stock-out whose name is taken: not a stock-out (it was waited out, and
    # the READY slice of that name deleted); a stock-out whose slice turns out READY is left alone
    for case, error, state in (("taken", "ALREADY_EXISTS: Resource 'projects/p/locations/z/nodes/stockout-repro' "
                                         "already exists", "READY"), ("ready", STOCKOUT_ERROR, "READY")):
        (tmp_path / case).mkdir()
        env = fake_gcloud(tmp_path / case, f"""
*" create "*) echo "{error}" >&2; exit 1 ;;
*" describe "*) echo {state} ;;
""")
        monkeypatch.setenv("PATH", env["PATH"])
        launcher_module.slept.clear()
        code = launcher_module.main(["all", "--name", "stockout-repro", "--zone", "z", "--command", "true"])
        out, err = capfd.readouterr()
        assert code == 1 and launcher_module.slept == []
        assert gcloud_calls(tmp_path / case) == (["create"] if case == "taken" else ["create", "describe"])


def test_tpu_pod_create_shows_a_question_before_it_is_answered(launcher_module, capfd):
    """gcloud asks without a newline ("... enable and retry? (y/N)?"): shown as it comes, not
    held back until the line ends, which only comes after the answer."""
    import threading
    import time

    result = []
    cmd = ["bash", "-c", "printf 'enable and retry? (y/N)? ' >&2; sleep 3; echo done >&2"]
    thread = threading.Thread(target=lambda: result.append(launcher_module._call_keeping_stderr(cmd)))
    thread.start()
    deadline = time.monotonic() + 2.5
    seen = ""
    while "(y/N)? " not in seen and time.monotonic() < deadline:
        time.sleep(0.1)
        seen += capfd.readouterr().err
    assert "(y/N)? " in seen and thread.is_alive()  # shown while the command still waits
    thread.join()
    assert result == [(0, "enable and retry? (y/N)? done\n")]


def test_tpu_pod_first_setup_on_a_preempted_spot_slice_is_recovered(tmp_path):
    env = fake_gcloud(tmp_path, """
*"--command=python3"*) [ "$(nth install)" = 1 ] && exit 255 ;;
*"describe"*) echo PREEMPTED ;;
""")
    proc = launch("all", "--name", "pod", "--zone", "z", "--spot", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert gcloud_calls(tmp_path) == ["create", "scp", "install", "describe", "delete", "create", "scp", "install",
                                      "run", "delete"]
    scps = [line.split()[4] for line in (tmp_path / "gcloud.log").read_text().splitlines() if " scp " in line]
    assert scps[0] == scps[1] and not os.path.exists(scps[0])  # the same archive, removed at exit


def run_notebook(name: str) -> dict:
    nb = json.loads((ROOT / "colab" / name).read_text())
    namespace: dict = {}
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        code = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("!", "%")))
        exec(compile(code, name, "exec"), namespace)
    return namespace


@pytest.mark.parametrize("path", sorted((ROOT / "colab").glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_valid_under_the_nbformat_they_declare(path):
    """nbformat 4.5 requires cell ids: without them validation warns now and fails in later versions."""
    import warnings

    import nbformat

    raw = json.loads(path.read_text())  # as written (nbformat's reader fills missing ids in)
    assert (raw["nbformat"], raw["nbformat_minor"]) >= (4, 5)  # the version that requires cell ids
    ids = [cell.get("id") for cell in raw["cells"]]
    assert all(ids) and len(set(ids)) == len(ids), f"cells without an id or with a repeated one: {ids}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nb = nbformat.reads(path.read_text(), as_version=nbformat.NO_CONVERT)
        errors = [e.message for e in nbformat.validator.iter_validate(nb)]
    assert errors == []
    assert not [w for w in caught if issubclass(w.category, nbformat.warnings.MissingIDFieldWarning)]


def test_colab_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_notebook("quickstart.ipynb")
    assert namespace["result"].stats["new_tokens"] > 0
    assert namespace["reloaded_tokens"] == namespace["result"].tokens


@pytest.mark.slow
def test_speculative_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_notebook("speculative.ipynb")  # asserts losslessness itself
    assert set(namespace["results"]) == set(namespace["runs"])
    assert namespace["results"]["dyspec, budget 16"]["mean_accepted"] > 1.5


@pytest.mark.slow
def test_skipdecode_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_notebook("skipdecode.ipynb")  # asserts the full schedule is exact itself
    assert namespace["skip"].stats["mean_layers_per_step"] < namespace["lm"].config.n_layers
    assert namespace["agreement"] > 0.2


@pytest.mark.slow
def test_duo_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_notebook("duo.ipynb")  # asserts all-big routes == the dense big model itself
    oracle, fixed = namespace["oracle"], namespace["fixed"]
    assert oracle[1] < fixed[1] and oracle[-1] <= namespace["all_big"] + 1e-6  # per-token choice beats one pattern


@pytest.mark.slow
def test_long_context_notebook_runs(tmp_path, monkeypatch):
    """With the shipped builtin:longctx (trained at 256 tokens), TokenSelect finds the passkeys
    at 16x the trained length and full attention loses them (the notebook also asserts that
    TokenSelect is full attention when everything fits)."""
    monkeypatch.chdir(tmp_path)
    namespace = run_notebook("long_context.ipynb")
    accuracy, lengths = namespace["accuracy"], namespace["LENGTHS"]
    assert lengths[-1] == 16 * namespace["TRAINED"] == 4096
    assert accuracy["TokenSelect"][-1] >= 0.75 and accuracy["full attention"][-1] <= 0.25
    assert accuracy["full attention"][0] >= 0.75  # at the trained length the model itself retrieves


def test_tpu_pod_multislice_is_one_queued_resource_waited_for_and_run_on_every_node(tmp_path, launcher_module,
                                                                                   monkeypatch, capfd):
    """--num-slices 2: a queued resource of two slices (Multislice needs one), waited for until
    ACTIVE, every command on every worker of every node, deleted with its slices; one that
    fails in the queue is deleted, not left queued."""
    env = fake_gcloud(tmp_path, """
*" describe "*) case "$(nth describe)" in 1|2) echo WAITING_FOR_RESOURCES ;; *) echo ACTIVE ;; esac ;;
""")
    monkeypatch.setenv("PATH", env["PATH"])
    code = launcher_module.main(["all", "--name", "ms", "--zone", "z", "--accelerator-type", "v5litepod-16",
                                 "--num-slices", "2", "--command", "true"])
    out, err = capfd.readouterr()
    assert code == 0, out + err
    assert gcloud_calls(tmp_path) == ["create", "describe", "describe", "describe", "scp", "install", "run", "delete"]
    assert launcher_module.slept == [60, 60]
    log = (tmp_path / "gcloud.log").read_text().splitlines()
    assert all(line.startswith("compute tpus queued-resources ") for line in log)
    assert "--node-count=2 --node-prefix=ms --accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite" \
        in log[0]
    assert all("--worker=all --node=all --batch-size=8192" in line for line in log[4:7])  # every host at once
    assert log[7].endswith("--force --quiet")
    (tmp_path / "failed").mkdir()
    env = fake_gcloud(tmp_path / "failed", """*" describe "*) echo FAILED ;;""")
    monkeypatch.setenv("PATH", env["PATH"])
    code = launcher_module.main(["all", "--name", "ms", "--zone", "z", "--num-slices", "2", "--command", "true"])
    out, err = capfd.readouterr()
    assert code == 1 and "queued resource ms is TERMINATED after 0 min, not ACTIVE" in out
    assert gcloud_calls(tmp_path / "failed")[:2] == ["create", "describe"]
    assert "delete" in gcloud_calls(tmp_path / "failed") and "run" not in gcloud_calls(tmp_path / "failed")
    for bad, message in ((["--num-slices", "0"], "--num-slices must be >= 1"),
                         (["--num-slices", "2", "--queue-hours", "0"], "--queue-hours must be a finite number > 0")):
        proc = launch("create", "--name", "ms", "--zone", "z", *bad, "--dry-run")
        assert proc.returncode == 2 and message in proc.stderr


def test_tpu_pod_all_deletes_the_slice_after_a_failed_command(tmp_path):
    """The command fails on a healthy slice: its exit code is returned and the slice deleted
    (it was left running, and billing: `code or delete` never called the delete)."""
    env = fake_gcloud(tmp_path, """*"--command=cd ~/jaxaccel"*) exit 3 ;;""")
    proc = launch("all", "--name", "pod", "--zone", "z", "--command", "false", env=env)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert gcloud_calls(tmp_path) == ["create", "scp", "install", "run", "describe", "delete"]
