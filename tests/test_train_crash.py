"""The trainer under crashes and bad input: a damaged newest checkpoint or metrics file, a
rerun with other settings or fewer steps than the folder holds, and writes that fail on a full
disk (a checkpoint, the model, a resume's rewrite of config.yaml and metrics.jsonl). Each is a
one-line error that loses nothing, or an exact resume whose metrics.jsonl and TensorBoard
points are the uninterrupted run's. (SIGKILL at random moments: tests/test_train.py.)"""
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TRAIN_CLI, with_default_sigint
from jaxaccel.cli import run_cli
from jaxaccel.data.errors import DataError
from jaxaccel.config import from_dict
from jaxaccel.errors import CheckpointError, ConfigError
from jaxaccel.train.config import CheckpointConfig, RunConfig
from jaxaccel.train.loop import train

ROOT = Path(__file__).resolve().parent.parent
MODEL = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 64}


def run_cfg(folder, steps=8, model=None, train_kw=None, optim=None, data=None):
    return from_dict(RunConfig, {
        "model": {**MODEL, **(model or {})}, "data": {"corpus": "synthetic", **(data or {})},
        "train": {"steps": steps, "batch_size": 8, "seq_len": 32, "log_every": 4, "eval_every": 4,
                  "progress": False, "peak_flops": 1e11, **(train_kw or {})},
        "optim": {"lr": 1e-2, "warmup_steps": 2, **(optim or {})}, "checkpoint": {"every_steps": 4, "keep": 5},
        "mesh": {"data": 1}, "output_dir": str(folder), "tensorboard": True})


def curve(folder):
    """metrics.jsonl without the timing fields."""
    return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "mfu")}
            for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def tensorboard_steps(folder, tag):
    """The steps of `tag` that TensorBoard shows: event files in order, each SessionLog START
    (a resumed run's purge) dropping the points at and after its step."""
    import struct

    from tensorboardX.proto.event_pb2 import Event, SessionLog

    points = []
    for file in sorted((Path(folder) / "tensorboard").glob("events.out.tfevents.*")):
        data, i = file.read_bytes(), 0
        while i < len(data):  # TFRecord framing: length, its CRC, the record, its CRC
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                points = [p for p in points if p < event.step]
            points += [event.step for v in event.summary.value if v.tag == tag]
    return points


def snapshot(folder):
    names = ("config.yaml", "metrics.jsonl", "model/jaxaccel.json")
    return {name: (Path(folder) / name).read_bytes() for name in names}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An 8-step run: checkpoints 4 and 8, evaluations at 4 and 8, model/ exported."""
    folder = tmp_path_factory.mktemp("finished")
    train(run_cfg(folder))
    return folder


def copy_run(src, dst):
    shutil.copytree(src, dst / "run")
    return dst / "run"


def test_fewer_steps_than_the_latest_checkpoint_are_refused_and_more_resume(finished, tmp_path):
    """A rerun with train.steps below the folder's latest checkpoint used to export the step-8
    weights as a 4-step model (no evaluation, final loss NaN); now it is refused, nothing
    rewritten. More steps continue the run: every step once in metrics.jsonl."""
    run = copy_run(finished, tmp_path)
    before = snapshot(run)
    with pytest.raises(ConfigError, match=r"holds checkpoint step 8, past train.steps \(4\): raise train.steps"):
        train(run_cfg(run, steps=4))
    assert snapshot(run) == before
    assert json.loads(before["model/jaxaccel.json"])["info"]["trained_steps"] == 8

    summary = train(run_cfg(run, steps=10, train_kw={"log_every": 1, "eval_every": 5}))
    assert summary["resumed_from"] == 8 and summary["steps"] == 10
    records = curve(run)
    assert records[:len(curve(finished))] == curve(finished)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 11))
    assert [r["step"] for r in records if "eval_loss" in r] == [4, 8, 10]
    assert json.loads((run / "model" / "jaxaccel.json").read_text())["info"]["trained_steps"] == 10


@pytest.mark.parametrize("change,key", [
    (dict(optim={"lr": 2e-2}), "optim.lr is 0.01 in its config.yaml, 0.02 now"),
    (dict(train_kw={"batch_size": 16}), "train.batch_size is 8 in its config.yaml, 16 now"),
    (dict(train_kw={"seq_len": 16}), "train.seq_len is 32 in its config.yaml, 16 now"),
    (dict(data={"seed": 1}), "data.seed is 0 in its config.yaml, 1 now"),
    (dict(model={"rope_theta": 500.0}), "model.rope_theta is 10000.0 in its config.yaml, 500.0 now"),  # same shapes
])
def test_resuming_with_other_settings_is_refused(finished, tmp_path, capsys, change, key):
    """A rerun with another optimizer, batch, data or model used to continue the checkpoints
    silently and overwrite config.yaml with settings they were not trained with."""
    run = copy_run(finished, tmp_path)
    before = snapshot(run)
    cfg = run_cfg(run, steps=12, **change)
    with pytest.raises(ConfigError, match=rf"holds a run with other settings \({key}\)"):
        train(cfg)
    assert snapshot(run) == before

    code = None
    try:
        code = run_cli(lambda argv: train(cfg), [])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and key in errors[0] and "Traceback" not in err, err
    assert f"train.init_from={run}" in errors[0]


def test_an_moe_run_from_before_moe_priority_resumes_only_as_rank():
    """Its stored settings lack moe.priority and it was trained in rank order: resuming it under
    today's default (token order) continued it silently as another run."""
    from jaxaccel.config import to_dict
    from jaxaccel.train.loop import resumed_config_differences

    def cfg(priority):
        return from_dict(RunConfig, {"model": {"moe": {"n_experts": 4, "top_k": 2, "priority": priority}}})

    old = to_dict(cfg("rank"))
    del old["model"]["moe"]["priority"]
    assert resumed_config_differences(old, cfg("token")) == [("model.moe.priority", "rank", "token")]
    assert resumed_config_differences(old, cfg("rank")) == []
    dense = to_dict(RunConfig())
    del dense["model"]["moe"]["priority"]  # a dense run from before it resumes as it is
    assert resumed_config_differences(dense, RunConfig()) == []


def test_micro_batching_may_change_on_resume_only_where_it_changes_nothing_but_rounding():
    """With dropout, MoE or Duo-LLM each micro-batch draws its own masks/routes and has its own
    capacity and balance loss: another train.grad_accum continued the run as another run."""
    from jaxaccel.config import to_dict
    from jaxaccel.train.loop import resumed_config_differences

    def cfg(accum, **model):
        return from_dict(RunConfig, {"model": model, "train": {"batch_size": 8, "grad_accum": accum}})

    for model in ({"dropout": {"mlp": 0.1}}, {"dropout": {"path": 0.1}}, {"moe": {"n_experts": 4}},
                  {"duo": {"enabled": True}}):
        assert resumed_config_differences(to_dict(cfg(1, **model)), cfg(2, **model)) == [("train.grad_accum", 1, 2)]
    assert resumed_config_differences(to_dict(cfg(1)), cfg(4)) == []  # dense, no dropout: rounding only


def test_a_run_without_its_config_yaml_is_checked_against_its_checkpoints(finished, tmp_path, capsys):
    """With config.yaml deleted, a resume with another batch used to continue (or fail deep in
    the data pipeline) after rewriting config.yaml with the wrong settings, so that the right
    command was then refused. Every checkpoint now holds a copy of the settings."""
    run = copy_run(finished, tmp_path)
    (run / "config.yaml").unlink()
    with pytest.raises(ConfigError, match=r"other settings \(train.batch_size is 8 in its checkpoint 8, 16 now\)"):
        train(run_cfg(run, steps=12, train_kw={"batch_size": 16}))
    assert not (run / "config.yaml").exists()
    logged = []
    summary = train(run_cfg(run, steps=12), log=logged.append)  # the run's own settings still resume it
    assert summary["resumed_from"] == 8 and (run / "config.yaml").is_file()
    assert "the run now trains 12 steps, 8 before: the learning rate decays over the new length from here" in logged[0]
    assert not any("steps, " in line for line in logged[1:])
    logged.clear()
    summary = train(run_cfg(run, steps=12), log=logged.append)  # finished: the same length, nothing said
    assert summary["resumed_from"] == 12 and not any("before:" in line for line in logged)


def test_damaged_newest_step_and_metrics_lines_resume_to_the_uninterrupted_curve(finished, tmp_path, capfd):
    """A newest step whose state metadata is gone used to stop the run as "written by a
    different model: it has no step"; it is now set aside like any unreadable step. Lines of
    metrics.jsonl that are not records (not JSON objects, not UTF-8) no longer crash the resume,
    and TensorBoard no longer shows the steps after the checkpoint twice."""
    run = copy_run(finished, tmp_path)
    (run / "checkpoints" / "8" / "state" / "_METADATA").unlink()
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'[1, 2]\n"text"\n\xff\xfe\n{"step": 9, "lo')  # the last one cut by a kill
    summary = train(run_cfg(run))
    assert summary["resumed_from"] == 4
    assert "checkpoint step 8 is unreadable" in capfd.readouterr().err
    assert curve(run) == curve(finished)
    # TensorBoard, too, shows each step once (the resumed run's event file purges 5..8)
    assert tensorboard_steps(run, "loss") == list(range(1, 9)) and tensorboard_steps(run, "eval_loss") == [4, 8]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["4", "8"]
    assert len(list((run / "unreadable-checkpoints").iterdir())) == 1


def test_loading_a_run_past_its_unreadable_newest_step_says_so(finished, tmp_path):
    """`jaxaccel.load` (and `convert import`) of a run without model/ whose newest checkpoint
    is damaged silently read the step before it; now it warns, naming both."""
    import jaxaccel

    run = copy_run(finished, tmp_path)
    shutil.rmtree(run / "model")  # a killed run: read from its checkpoints
    for data in (run / "checkpoints" / "8" / "state" / "ocdbt.process_0" / "d").iterdir():
        data.write_bytes(b"")  # every data file emptied: which file (and where in it) holds the parameters,
        # not the Adam moments load skips, varies from run to run: cutting the largest in half sometimes missed them
    with pytest.warns(UserWarning, match=r"the newest checkpoint is unreadable \(step 8: .*\); read step 4 instead"):
        lm = jaxaccel.load(run)
    assert lm.info["trained_steps"] == 4


def test_no_readable_checkpoint_is_refused_not_a_restart_from_scratch(finished, tmp_path):
    """Every step unreadable (damaged, or a file system that is failing for a while) used to
    set them all aside and start over from step 0, rewriting metrics.jsonl and config.yaml;
    now nothing is touched and the error says what to do."""
    run = copy_run(finished, tmp_path)
    for step in ("4", "8"):
        (run / "checkpoints" / step / "state" / "_METADATA").unlink()
    before = snapshot(run)
    with pytest.raises(CheckpointError, match=r"none of the 2 checkpoint\(s\) in .* can be read \(step 8: .*nothing "
                                              r"was changed: rerun once they are reachable, or move that folder away"):
        train(run_cfg(run))
    assert snapshot(run) == before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["4", "8"]
    assert not (run / "unreadable-checkpoints").exists()


def test_a_resumed_metrics_writer_keeps_each_step_once(tmp_path):
    """What a run killed after its step-4 checkpoint leaves (steps to 6, a cut line, and lines
    that are not records), resumed at step 4: the JSON lines and TensorBoard's points are the
    uninterrupted run's."""
    from jaxaccel.train.metrics import MetricsWriter

    first = MetricsWriter(tmp_path, True, 0)
    for step in range(1, 7):
        first.write({"step": step, "loss": 1.0 / step})
    first.close()
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'[1, 2]\n7\n\xff\xfe\n{"step": 7, "lo')
    resumed = MetricsWriter(tmp_path, True, 4)
    for step in range(5, 9):
        resumed.write({"step": step, "loss": 1.0 / step})
    resumed.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": step, "loss": 1.0 / step} for step in range(1, 9)]
    assert tensorboard_steps(tmp_path, "loss") == list(range(1, 9))


def test_tensorboard_logging_does_not_import_torch(tmp_path):
    """tensorboardX imports PyTorch, when installed, at its own import (3-4 s of a run's start on
    a 2-core CPU) only to accept torch tensors: the trainer hides torch from it, writes its
    scalars, and leaves torch importable afterwards; a process that imported torch keeps it."""
    pytest.importorskip("torch")
    code = ("import sys\n"
            "from jaxaccel.train.metrics import MetricsWriter, summary_writer_class\n"
            "w = MetricsWriter(sys.argv[1], True, 0)\n"
            "w.write({'step': 1, 'loss': 2.5}); w.close()\n"
            "assert 'torch' not in sys.modules, 'tensorboardX imported torch'\n"
            "import torch\n"
            "assert summary_writer_class() is not None and sys.modules['torch'] is torch\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert tensorboard_steps(tmp_path, "loss") == [1]


@contextlib.contextmanager
def file_size_limit(nbytes):
    """Writes past `nbytes` fail with EFBIG (Python ignores SIGXFSZ), as on a full disk."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_full_disk_when_resuming_loses_nothing(finished, tmp_path):
    """A resume rewrites config.yaml and cuts metrics.jsonl back to its checkpoint; both were
    rewritten in place, so a write that failed half-way (or a kill) left a truncated file:
    the run's record of its settings, or every metrics line before the checkpoint, lost."""
    from jaxaccel.train.metrics import MetricsWriter

    run = copy_run(finished, tmp_path)
    before = snapshot(run)
    with file_size_limit(1000), pytest.raises(OSError, match="File too large"):
        train(run_cfg(run, steps=12))  # config.yaml is ~2 KB
    assert snapshot(run) == before

    lines = "".join(json.dumps({"step": step, "loss": 1.0 / step}) + "\n" for step in range(1, 3001))
    (tmp_path / "metrics.jsonl").write_text(lines)
    with file_size_limit(20_000), pytest.raises(OSError, match="File too large"):
        MetricsWriter(tmp_path, False, 2000)
    assert (tmp_path / "metrics.jsonl").read_text() == lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "run"]


def test_a_failed_save_is_a_checkpoint_error_and_keeps_the_committed_steps(tmp_path):
    """A write that fails inside TensorStore used to surface as a ValueError from Orbax's
    background thread: a traceback from the CLI."""
    import jax.numpy as jnp

    from jaxaccel.train.checkpoint import Checkpoints

    ckpts = Checkpoints(tmp_path / "checkpoints", CheckpointConfig(keep=5))
    state = {"w": jnp.arange(256 * 256, dtype=jnp.float32).reshape(256, 256)}
    ckpts.save(1, state, {"step": 1})
    ckpts.wait()
    with file_size_limit(50_000):
        with pytest.raises(CheckpointError, match=r"saving a checkpoint in .*checkpoints failed \(File too large\); "
                                                  r"the checkpoints saved before it are intact"):
            ckpts.save(2, {"w": state["w"] + 1}, {"step": 2})
            ckpts.wait()
    try:
        ckpts.close()
    except CheckpointError:
        pass  # Orbax may report the failed save again (wrapped too: next test)
    again = Checkpoints(tmp_path / "checkpoints", CheckpointConfig(keep=5))
    try:
        assert again.steps() == [1]
        restored = again.restore_latest({"w": jnp.zeros((256, 256), jnp.float32)})
        assert restored.step == 1 and np.array_equal(np.asarray(restored.state["w"]), np.asarray(state["w"]))
    finally:
        again.close()


def test_a_failed_save_reported_again_when_closing_is_a_checkpoint_error(tmp_path, monkeypatch):
    """Orbax's CheckpointManager.close waits for the pending save again and may raise its
    error anew; that too is the one-line CheckpointError, not a raw error (a traceback)."""
    from jaxaccel.train.checkpoint import Checkpoints

    ckpts = Checkpoints(tmp_path / "checkpoints", CheckpointConfig(keep=5))
    real_close = ckpts.manager.close

    def close_again():
        real_close()
        raise ValueError("Error writing local file \"/x/ocdbt.process_0/d/1f\": [os_error_code='27']")

    monkeypatch.setattr(ckpts.manager, "close", close_again)
    with pytest.raises(CheckpointError, match=r"saving a checkpoint in .* failed \(File too large"):
        ckpts.close()


def test_an_object_store_read_is_retried_before_its_step_is_skipped(tmp_path, monkeypatch, capsys):
    """On gs:// (a str folder) a step whose read fails is tried REMOTE_READ_ATTEMPTS times
    (an object store's error may pass); one that keeps failing is skipped for the step before."""
    import jax
    import jax.numpy as jnp

    from jaxaccel.train import checkpoint as checkpoint_mod

    ckpts = checkpoint_mod.Checkpoints(tmp_path / "checkpoints", CheckpointConfig(keep=5))
    for step in (1, 2):
        ckpts.save(step, {"w": jnp.full((4, 4), float(step))}, {"step": step})
    ckpts.wait()
    ckpts.directory = str(ckpts.directory)  # read as a remote folder
    real, calls, failing = ckpts._state_handler.restore, [], {"left": 2}
    monkeypatch.setattr(checkpoint_mod, "_sleep", lambda seconds: None)

    def flaky(folder, args):
        calls.append(int(Path(str(folder)).parent.name))
        if failing["left"]:
            failing["left"] -= 1
            raise OSError("503 Service Unavailable\nretry later")
        return real(folder, args=args)

    monkeypatch.setattr(ckpts._state_handler, "restore", flaky)
    abstract = {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32)}
    try:
        restored = ckpts.restore_latest(abstract)
        assert restored.step == 2 and calls == [2, 2, 2] and not restored.skipped
        failing["left"], calls[:] = checkpoint_mod.REMOTE_READ_ATTEMPTS, []
        restored = ckpts.restore_latest(abstract)
        assert calls == [2, 2, 2, 1] and restored.step == 1 and float(restored.state["w"][0, 0]) == 1.0
        assert restored.skipped == [(2, "503 Service Unavailable")]
        err = capsys.readouterr().err
        assert "checkpoint step 2 is unreadable (503 Service Unavailable); resuming from step 1" in err
        # kept, not deleted (it was deleted on gs://): a read that failed for a passing reason loses nothing
        kept = next((tmp_path / "unreadable-checkpoints").iterdir())
        assert kept.name.startswith("2-") and f"(the bad one is kept in {kept})" in err
        assert not (tmp_path / "checkpoints" / "2").exists() and ckpts.steps() == [1]
        import orbax.checkpoint as ocp

        assert float(real(kept / checkpoint_mod.STATE, args=ocp.args.StandardRestore(abstract))["w"][0, 0]) == 2.0
    finally:
        ckpts.close()


def test_an_unreadable_remote_step_that_cannot_be_copied_aside_is_not_deleted(tmp_path, monkeypatch):
    import jax.numpy as jnp
    from etils import epath

    from jaxaccel.train import checkpoint as checkpoint_mod

    ckpts = checkpoint_mod.Checkpoints(tmp_path / "checkpoints", CheckpointConfig(keep=5))
    try:
        ckpts.save(1, {"w": jnp.ones((2,))}, {"step": 1})
        ckpts.wait()
        ckpts.directory = str(ckpts.directory)
        monkeypatch.setattr(type(epath.Path(str(tmp_path))), "copy",
                            lambda *a, **kw: (_ for _ in ()).throw(OSError("403 Forbidden")))
        with pytest.raises(CheckpointError, match=r"could not be copied aside .*403 Forbidden.*nothing was deleted"):
            ckpts._set_aside(1)
        assert (tmp_path / "checkpoints" / "1").is_dir()
        # copied, but the delete fails part-way: said so (not "nothing was deleted"), the copy kept
        monkeypatch.undo()
        monkeypatch.setattr(type(epath.Path(str(tmp_path))), "rmtree",
                            lambda *a, **kw: (_ for _ in ()).throw(OSError("503 Service Unavailable")))
        with pytest.raises(CheckpointError, match=r"was copied to .* but deleting it failed part-way .*copy is kept"):
            ckpts._set_aside(1)
        assert any((tmp_path / "unreadable-checkpoints").iterdir())
    finally:
        ckpts.close()


def test_hosts_that_list_different_steps_are_one_error_on_every_host(monkeypatch):
    """Several processes read a run's steps in lockstep (one all-gather per step tried), so
    they first check that they list the same steps; here process 1's listing lacks step 9
    (a folder that is not shared storage): a CheckpointError naming both, not a hang. The
    all-gather is faked: what each process would contribute, stacked."""
    import jax
    from jax.experimental import multihost_utils

    from jaxaccel.model.checkpoint import agreed_steps, outcomes

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    other = {"row": None}
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack([x, other["row"](x)]))
    other["row"] = lambda x: x  # the same listing everywhere: the steps come back as they are
    assert agreed_steps([3, 6, 9], "gs://b/run/checkpoints") == [3, 6, 9]
    assert outcomes(0) == [0, 0]
    other["row"] = lambda x: np.array([2, 6, 123], np.int32)
    with pytest.raises(CheckpointError, match=r"the processes list different checkpoint steps in gs://b/run/checkpoints "
                                              r"\(process 0: 3 up to step 9; process 1: 2 up to step 6\)"):
        agreed_steps([3, 6, 9], "gs://b/run/checkpoints")
    other["row"] = lambda x: np.ones_like(x)
    assert outcomes(0) == [0, 1]


def test_a_failed_model_export_is_a_checkpoint_error(tmp_path):
    import jax.numpy as jnp

    from jaxaccel.config import ModelConfig
    from jaxaccel.model.checkpoint import is_jaxaccel_checkpoint, save_model

    with file_size_limit(50_000):
        with pytest.raises(CheckpointError, match=r"saving the model to .*model failed \(File too large\); any "
                                                  r"model already there is left as it was"):
            save_model(tmp_path / "model", ModelConfig(**MODEL), {"w": jnp.arange(256 * 256, dtype=jnp.float32)})
    assert not is_jaxaccel_checkpoint(tmp_path / "model") and not any((tmp_path / "model").iterdir())


def test_the_cli_reports_a_full_disk_in_one_line(tmp_path):
    """`python -m jaxaccel.train` whose first checkpoint cannot be written: one `error:` line,
    exit 2, and no traceback (Orbax logs the failure with one; the trainer drops it)."""
    pytest.importorskip("resource")
    # the limit is set in the child (Python ignores SIGXFSZ there: writes past it fail with EFBIG)
    limited = ("import resource\n"
               "resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
               + TRAIN_CLI)
    args = [sys.executable, "-c", limited, str(ROOT / "configs" / "tiny.yaml"), "data.corpus=synthetic",
            *(f"model.{k}={v}" for k, v in MODEL.items()), "train.steps=4", "train.batch_size=8", "train.seq_len=32",
            "train.eval_every=0", "train.peak_flops=1e11", "checkpoint.every_steps=2", "tensorboard=false",
            f"output_dir={tmp_path / 'run'}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("JAXACCEL_TRACEBACK", None)
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "saving a checkpoint in" in errors[0] and "File too large" in errors[0], errors[0]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]


def _training_cli(run: Path, steps: int, every_steps: int, until_lines: int):
    """The trainer's CLI on a tiny synthetic run in a child process (its training step at the
    tests' -O1, as in this process), once metrics.jsonl holds `until_lines` records: (process,
    its argv, its environment) — to signal it, then rerun it."""
    import time

    args = [sys.executable, "-c", TRAIN_CLI, str(ROOT / "configs" / "tiny.yaml"), "data.corpus=synthetic",
            *(f"model.{k}={v}" for k, v in MODEL.items()), f"train.steps={steps}", "train.batch_size=8",
            "train.seq_len=32", "train.eval_every=0", "train.log_every=1", "train.peak_flops=1e11",
            f"checkpoint.every_steps={every_steps}", "tensorboard=false", f"output_dir={run}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(with_default_sigint(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    deadline, metrics = time.time() + 300, run / "metrics.jsonl"
    while proc.poll() is None and time.time() < deadline and not (
            metrics.exists() and metrics.read_text().count("\n") >= until_lines):
        time.sleep(0.05)
    return proc, args, env


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_of_that_step_and_the_rerun_resumes_from_it(tmp_path):
    """A spot TPU slice gets SIGTERM before it is reclaimed: the run used to die at once,
    losing every step since its last periodic checkpoint. Now it finishes the step, saves a
    checkpoint of it, says so in one line and exits 143; the rerun resumes from that step and
    metrics.jsonl holds each step once."""
    import re
    import signal

    run = tmp_path / "run"
    proc, args, env = _training_cli(run, steps=300, every_steps=1000, until_lines=5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    (line,) = [x for x in err.splitlines() if x.startswith("stopped: ")]
    step = int(re.search(r"after step (\d+) of 300; checkpoint (\d+) is saved", line).group(1))
    assert 5 <= step < 300 and "rerun the same command to resume" in line
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()] == [str(step)]
    assert not (run / "model").exists()

    again = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and f"resuming from checkpoint step {step}" in again.stderr, again.stderr[-3000:]
    assert [r["step"] for r in curve(run) if "loss" in r] == list(range(1, 301))


def test_ctrl_c_checkpoints_the_step_then_a_second_stops_at_once(finished, tmp_path, monkeypatch, capfd,
                                                                default_sigint):
    """Ctrl-C used to end a training run at once (KeyboardInterrupt), losing every step since
    its last periodic checkpoint. A first Ctrl-C now ends the step, checkpoints it and stops
    (`stopped:`, exit 130); the rerun resumes to the uninterrupted curve. A second Ctrl-C stops
    at once with the checkpoints already saved. The previous SIGINT handler is back after."""
    import signal

    import jaxaccel.train.loop as loop

    real, calls = loop.global_batch, []

    def pressing_ctrl_c(call, times):
        def batch(*args):  # a step's (or an evaluation's) batch: the first evaluation is at step 4
            calls.append(1)
            if len(calls) == call:
                for _ in range(times):
                    signal.raise_signal(signal.SIGINT)
            return real(*args)
        return batch

    before = signal.getsignal(signal.SIGINT)
    run = tmp_path / "run"
    monkeypatch.setattr(loop, "global_batch", pressing_ctrl_c(3, 1))
    code = run_cli(lambda argv: train(run_cfg(run)), [])
    err = capfd.readouterr().err
    assert code == 130, err
    assert "interrupt: the run stops after this step and saves a checkpoint of it" in err
    (line,) = [x for x in err.splitlines() if x.startswith("stopped: ")]
    assert "Ctrl-C stopped the run after step 3 of 8; checkpoint 3 is saved" in line, line
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]
    assert not (run / "model").exists() and signal.getsignal(signal.SIGINT) is before

    calls.clear()
    monkeypatch.setattr(loop, "global_batch", pressing_ctrl_c(1, 2))  # twice, in the resumed run's first step
    with pytest.raises(KeyboardInterrupt):
        train(run_cfg(run))
    assert "interrupt: the run stops after this step" in capfd.readouterr().err
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]
    assert signal.getsignal(signal.SIGINT) is before

    monkeypatch.setattr(loop, "global_batch", real)
    assert train(run_cfg(run))["resumed_from"] == 3
    assert curve(run) == curve(finished)


@pytest.mark.parametrize("during", ["step", "evaluation"])
def test_ctrl_c_at_the_last_step_stops_before_the_export(tmp_path, monkeypatch, finished, during,
                                                         default_sigint):
    """A first Ctrl-C during the last step (or its evaluation) was noted, then ignored: the run
    evaluated, exported and exited 0 (a long evaluation or a large export kept the user
    waiting). It now stops with that step's checkpoint — during the step, before evaluating —
    and the rerun evaluates and exports, to the uninterrupted run's curve."""
    import signal

    import jaxaccel.train.loop as loop

    real, calls = loop.global_batch, []
    # the batches: steps 1-4, the evaluation at 4 (2 batches), steps 5-8, the evaluation at 8
    press_at = {"step": 10, "evaluation": 11}[during]

    def batch(*args):
        calls.append(1)
        if len(calls) == press_at:
            signal.raise_signal(signal.SIGINT)
        return real(*args)

    run = tmp_path / "run"
    monkeypatch.setattr(loop, "global_batch", batch)
    with pytest.raises(loop.Interrupted, match="after step 8 of 8; checkpoint 8 is saved"):
        train(run_cfg(run))
    assert not (run / "model").exists()
    evaluated = [r["step"] for r in curve(run) if "eval_loss" in r]
    assert evaluated == ([4] if during == "step" else [4, 8]) and len(calls) == press_at + (during != "step")
    monkeypatch.setattr(loop, "global_batch", real)
    if during == "step":  # a rerun that trains on (more train.steps) makes up the evaluation at 8 (it was lost)
        longer = copy_run(run, tmp_path / "longer")
        assert train(run_cfg(longer, steps=10))["resumed_from"] == 8
        evals = {r["step"]: r["eval_loss"] for r in curve(longer) if "eval_loss" in r}
        assert sorted(evals) == [4, 8, 10]
        assert evals[8] == {r["step"]: r["eval_loss"] for r in curve(finished) if "eval_loss" in r}[8]
    summary = train(run_cfg(run))
    assert summary["resumed_from"] == 8 and (run / "model" / "jaxaccel.json").is_file()
    assert curve(run) == curve(finished)


@pytest.mark.slow
def test_two_quick_ctrl_c_end_the_trainer_at_once_without_a_hang(tmp_path):
    """A second Ctrl-C while the stop's checkpoint was being written raised KeyboardInterrupt
    inside Orbax's save; the process printed `interrupted`, then waited forever in Python's
    shutdown behind Orbax's threads. A command now stops at once (exit 130, one line); the
    rerun resumes from a complete checkpoint and the curve has every step once."""
    import signal
    import time

    run = tmp_path / "run"
    proc, args, env = _training_cli(run, steps=200, every_steps=4, until_lines=6)
    proc.send_signal(signal.SIGINT)  # the step ends, then its checkpoint is written: press again then
    saving = lambda: any(".orbax-checkpoint-tmp" in p.name for p in (run / "checkpoints").iterdir())  # noqa: E731
    until = time.time() + 20
    while proc.poll() is None and time.time() < until and not saving():
        time.sleep(0.001)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)  # a hang fails here
    assert proc.returncode == 130, err[-3000:]
    last = err.rstrip().splitlines()[-1]  # (a save quicker than the second Ctrl-C: the first's stop)
    assert (last == "interrupted" or last.startswith("stopped: Ctrl-C")) and "Traceback" not in err, err[-3000:]
    # the rerun resumes from the newest complete step (one step more is enough to show it)
    last = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    args = [a if a != "train.steps=200" else f"train.steps={last + 1}" for a in args]
    again = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and f"resuming from checkpoint step {last}" in again.stderr, again.stderr[-3000:]
    assert [r["step"] for r in curve(run) if "loss" in r] == list(range(1, last + 2))


def test_no_validation_data_is_no_figure_not_a_perfect_loss(tmp_path):
    """With no held-out data (validation_fraction 0) the trainer used to log eval_loss 0.0 over
    0 tokens and export it as the model's validation loss: a perfect model on paper."""
    import json as json_

    pkg = Path(json_.__file__).parent
    data = {"corpus": f"{pkg}/*.py", "vocab_size": 400, "num_sentinels": 8, "validation_fraction": 0.0,
            "unique_tokens": None, "cache_dir": str(tmp_path / "cache")}
    summary = train(run_cfg(tmp_path / "run", steps=4, model={"vocab_size": 400}, data=data))
    assert "eval_loss" not in summary
    assert not [r for r in curve(tmp_path / "run") if "eval_loss" in r]
    info = json.loads((tmp_path / "run" / "model" / "jaxaccel.json").read_text())["info"]
    assert info["validation_loss"] is None and info["trained_steps"] == 4


def test_a_missing_init_from_is_refused_before_the_data_is_built(tmp_path, finished, monkeypatch):
    """train.init_from naming nothing used to be reported only after the data was built (minutes
    on a large corpus), and as "neither a model nor a run"; a run resuming from its own
    checkpoints does not read it, so a source moved away since does not stop the resume."""
    import jaxaccel.data

    def no_data(*args, **kwargs):
        raise AssertionError("the data was built before init_from was checked")

    monkeypatch.setattr(jaxaccel.data, "build_data", no_data)
    data = {"corpus": "/nonexistent/*.py"}  # a real corpus: build_data would run
    with pytest.raises(ConfigError, match=r"train.init_from: '.*/nope' does not exist"):
        train(run_cfg(tmp_path / "new", data=data, train_kw={"init_from": str(tmp_path / "nope")}))
    with pytest.raises(ConfigError, match="neither a jaxaccel model nor a training run folder"):
        train(run_cfg(tmp_path / "new", data=data, train_kw={"init_from": str(tmp_path)}))
    assert not (tmp_path / "new").exists()
    run = copy_run(finished, tmp_path)  # resuming: init_from is not read
    summary = train(run_cfg(run, steps=10, train_kw={"init_from": str(tmp_path / "moved-away")}))
    assert summary["resumed_from"] == 8


@pytest.mark.parametrize("signal_name", ["SIGTERM", "Ctrl-C"])
def test_a_preempted_train_benchmark_does_not_offer_a_resume(monkeypatch, signal_name):
    """`bench train` trains in a temporary folder: a SIGTERM (or Ctrl-C) there leaves nothing
    to resume, so its `stopped:` line must not say "rerun the same command to resume"; a
    Ctrl-C still exits 130 (the error keeps its type)."""
    from jaxaccel.bench import train as bench_train
    from jaxaccel.errors import Interrupted, Preempted
    import jaxaccel.train.loop as loop

    error = Interrupted if signal_name == "Ctrl-C" else Preempted

    def preempted(cfg, log=None):
        raise error(f"{signal_name} stopped the run after step 1 of 2; checkpoint 1 is saved in "
                    f"{cfg.output_dir}: rerun the same command to resume")

    monkeypatch.setattr(loop, "train", preempted)
    with pytest.raises(Preempted) as e:
        bench_train.measure(str(ROOT / "configs" / "tiny.yaml"), [], peak=1e11)
    assert "resume" not in str(e.value) and "rerun it" in str(e.value)
    assert type(e.value) is error and signal_name.replace("SIGTERM", "a SIGTERM") in str(e.value)


def test_a_run_refused_after_its_checkpoints_opened_closes_them(finished, tmp_path, monkeypatch):
    """train.init_from naming a model of another width fails after the checkpoint manager and
    before the loop: the manager is closed all the same (a notebook that retries the call must
    not pile up Orbax's threads)."""
    from jaxaccel.train import checkpoint

    closed = []
    close = checkpoint.Checkpoints.close
    monkeypatch.setattr(checkpoint.Checkpoints, "close", lambda self: (closed.append(self), close(self))[1])
    wider = run_cfg(tmp_path / "wider", model={"d_model": 2 * MODEL["d_model"]}, train_kw={"init_from": str(finished)})
    with pytest.raises(ConfigError, match="init_from"):
        train(wider)
    assert len(closed) == 1


def test_init_from_a_model_of_another_vocabulary_is_refused(finished, tmp_path):
    """A source trained with another SentencePiece vocabulary than the run's data builds (a
    fine-tune on another corpus) used to be accepted: its embedding rows were then read as
    other tokens, and the export paired them with the new tokenizer."""
    from jaxaccel.train.loop import initial_params

    run = copy_run(finished, tmp_path)
    (run / "model" / "tokenizer.model").write_bytes(b"the source's vocabulary")
    mine = tmp_path / "mine.model"
    mine.write_bytes(b"this run's vocabulary")
    cfg = run_cfg(tmp_path / "new", train_kw={"init_from": str(run)})
    with pytest.raises(ConfigError, match="was trained with another vocabulary than the one this run's data builds"):
        initial_params(cfg, None, mine)
    mine.write_bytes(b"the source's vocabulary")
    params = initial_params(cfg, None, mine)
    assert params["embed"]["embedding"].shape == (MODEL["vocab_size"], MODEL["d_model"])


def test_vocabularies_compare_by_their_pieces(tmp_path):
    """The same pieces in files that differ only in SentencePiece's training record (another
    version or thread count) are the same vocabulary; one piece changed is not."""
    import sentencepiece.sentencepiece_model_pb2 as pb

    from jaxaccel.train.loop import _same_pieces

    shipped = ROOT / "jaxaccel" / "assets" / "default_model" / "tokenizer.model"
    proto = pb.ModelProto()
    proto.ParseFromString(shipped.read_bytes())
    proto.trainer_spec.num_threads += 5
    other_record = tmp_path / "record.model"
    other_record.write_bytes(proto.SerializeToString())
    proto.pieces[300].piece = "\u2581jaxaccel"
    other_piece = tmp_path / "piece.model"
    other_piece.write_bytes(proto.SerializeToString())
    assert other_record.read_bytes() != shipped.read_bytes() and _same_pieces(shipped, other_record)
    assert not _same_pieces(shipped, other_piece)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    assert not _same_pieces(shipped, garbage)


def test_more_steps_than_the_data_budget_are_refused_before_training(tmp_path):
    """train.steps past the data budget used to train until the data ran out (checkpoints
    written, no model exported), then stop with exit 2; now it is refused up front."""
    from jaxaccel.train.synthetic import SyntheticData

    data = SyntheticData(MODEL["vocab_size"], 32, 8, total_steps=5)
    with pytest.raises(ConfigError, match=r"train.steps \(8\) exceeds the data budget: 5 steps of 8 sequences"):
        train(run_cfg(tmp_path / "run"), data)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_rerunning_a_finished_run_without_validation_keeps_the_exported_figures(finished, tmp_path):
    """A finished run rerun with no validation data this time (data.max_eval_tokens=0, a
    resume may change it) used to re-export its model with the validation figures set to
    null."""
    from jaxaccel.train.synthetic import SyntheticData

    class NoValidation(SyntheticData):
        def eval_batches(self):
            return iter(())

    run = copy_run(finished, tmp_path)
    before = json.loads((run / "model" / "jaxaccel.json").read_text())["info"]
    assert before["validation_loss"] is not None
    summary = train(run_cfg(run), NoValidation(MODEL["vocab_size"], 32, 8, total_steps=8))
    after = json.loads((run / "model" / "jaxaccel.json").read_text())["info"]
    assert summary["resumed_from"] == 8 and summary["eval_loss"] == before["validation_loss"]
    assert summary["eval_perplexity"] == pytest.approx(np.exp(before["validation_loss"]))
    assert summary["final_loss"] is None  # no step trained (was NaN: not JSON)
    assert {k: after[k] for k in ("validation_loss", "validation_accuracy", "validation_tokens", "trained_steps")} == \
        {k: before[k] for k in ("validation_loss", "validation_accuracy", "validation_tokens", "trained_steps")}


def test_folder_checks_run_on_process_0_alone(monkeypatch):
    """Hosts with their own disks may see different folders: the output_dir and init_from
    checks run on process 0, whose verdict every process takes (a process refusing alone
    would leave the others waiting in their first collective)."""
    import jaxaccel.train.loop as loop
    from jaxaccel.train import hosts

    def refuse():
        raise ConfigError("refused here")

    with pytest.raises(ConfigError, match="refused here"):
        loop._decided_by_process_0(refuse, "out")
    monkeypatch.setattr(hosts, "is_main", lambda: False)
    loop._decided_by_process_0(refuse, "out")  # not process 0: it waits for the verdict (one process: none)


def test_an_os_error_on_process_0_is_told_to_every_host(monkeypatch, tmp_path):
    """An OSError in process 0's folder checks or lock (an unwritable mount) used to skip the
    broadcast: the other hosts waited in it and the distributed service aborted them all
    after 5 minutes. Process 0 now reaches the broadcast with its refusal, then raises."""
    import jax
    from jax.experimental import multihost_utils

    import jaxaccel.train.loop as loop
    from jaxaccel.train import hosts

    told = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: told.append(int(x)) or x)

    def unwritable():
        raise PermissionError(13, "Permission denied", "/mnt/run")

    with pytest.raises(PermissionError):
        loop._decided_by_process_0(unwritable, "out")
    assert told == [0]
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OSError):
        with loop.output_dir_lock(str(tmp_path / "a-file" / "run")):
            pass
    assert told == [0, 0]
    # another host learns of it (process 0's 0) as a one-line refusal
    monkeypatch.setattr(hosts, "is_main", lambda: False)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: 0)
    with pytest.raises(ConfigError, match="refused by process 0"):
        loop._decided_by_process_0(unwritable, "output_dir was refused by process 0")
    with pytest.raises(loop.OutputDirInUseError, match="could not be locked by process 0"):
        with loop.output_dir_lock(str(tmp_path / "run")):
            pass


def test_an_empty_step_folder_past_the_run_is_set_aside_not_taken_for_its_end(finished, tmp_path, capfd):
    """An empty `checkpoints/12/` (never written) used to refuse the rerun of an 8-step run as
    "holds checkpoint step 12, past train.steps"; it is a damaged step: set aside, and the run
    resumes from step 8."""
    run = copy_run(finished, tmp_path)
    (run / "checkpoints" / "12").mkdir()
    summary = train(run_cfg(run))
    assert summary["resumed_from"] == 8
    assert not (run / "checkpoints" / "12").exists() and "checkpoint step 12 is unreadable" in capfd.readouterr().err
    readable = copy_run(finished, tmp_path / "b")  # a real step past train.steps is still refused
    with pytest.raises(ConfigError, match=r"holds checkpoint step 8, past train.steps \(4\)"):
        train(run_cfg(readable, steps=4))
    # ... also the one the restore falls back to past a damaged newest step: it resumed from 8
    # with train.steps 4, exited 0 and overwrote the finished model/ with the step-8 weights
    damaged = copy_run(finished, tmp_path / "c")
    (damaged / "checkpoints" / "12").mkdir()
    before = snapshot(damaged)
    with pytest.raises(ConfigError, match=r"holds checkpoint step 8, past train.steps \(4\)"):
        train(run_cfg(damaged, steps=4))
    assert snapshot(damaged) == before and (damaged / "checkpoints" / "12").is_dir()


def test_resuming_after_the_corpus_changed_is_refused(tmp_path, monkeypatch):
    """The checkpoints keep the data's fingerprint (corpus files, vocabulary, unique stream): a
    file added to the corpus retrains the vocabulary, whose ids the restored model would then
    go on training on. Refused before anything of the run is rewritten, and before the
    state is read (from the step's meta alone: a large model's restore takes minutes)."""
    from conftest import toy_corpus
    from jaxaccel.train.checkpoint import Checkpoints

    corpus = toy_corpus(tmp_path / "corpus")
    data = {"corpus": str(corpus / "*.py"), "vocab_size": 400, "num_sentinels": 8, "validation_fraction": 0.25,
            "cache_dir": str(tmp_path / "cache")}
    model = {**MODEL, "vocab_size": 400}
    train(run_cfg(tmp_path / "run", steps=2, model=model, data=data))
    vocab = (tmp_path / "run" / "tokenizer.model").read_bytes()
    train(run_cfg(tmp_path / "run", steps=4, model=model, data=data))  # the same data: resumes
    (corpus / "added.py").write_text("def added(x):\n    return [x] * 3\n" * 40)
    monkeypatch.setattr(Checkpoints, "restore_latest", lambda *a, **kw: pytest.fail("the state was read"))
    with pytest.raises(ConfigError, match=r"was trained up to step 4 on other data: the corpus files and the "
                                          r"vocabulary and the unique-token stream changed since"):
        train(run_cfg(tmp_path / "run", steps=6, model=model, data=data))
    assert (tmp_path / "run" / "tokenizer.model").read_bytes() == vocab


def test_the_data_fingerprint_checks_only_what_both_sides_have(tmp_path):
    """Checkpoints written before the fingerprint (no "data") and synthetic data (an empty one)
    resume; the vocabulary counts by its pieces, not the file's training record."""
    from types import SimpleNamespace

    from jaxaccel.train.loop import check_same_data, data_fingerprint

    cfg = run_cfg(tmp_path)
    now = {"manifest_sha256": "a" * 64, "vocab_sha256": "b" * 64}
    check_same_data(None, now, cfg, 4)  # an older checkpoint
    check_same_data({"manifest_sha256": "a" * 64}, now, cfg, 4)
    check_same_data({"manifest_sha256": "c" * 64}, {}, cfg, 4)  # synthetic data: nothing to compare
    with pytest.raises(ConfigError, match="the corpus files changed since"):
        check_same_data({"manifest_sha256": "c" * 64}, now, cfg, 4)
    model = Path(jaxaccel_assets()) / "default_model" / "tokenizer.model"
    import sentencepiece.sentencepiece_model_pb2 as pb

    proto = pb.ModelProto.FromString(model.read_bytes())
    proto.trainer_spec.input_sentence_size += 1  # another training record, the same pieces
    (tmp_path / "other.model").write_bytes(proto.SerializeToString())
    first = data_fingerprint(SimpleNamespace(stats={}, vocab_path=model))
    assert first == data_fingerprint(SimpleNamespace(stats={}, vocab_path=tmp_path / "other.model"))
    assert model.read_bytes() != (tmp_path / "other.model").read_bytes() and set(first) == {"vocab_sha256"}


def jaxaccel_assets() -> Path:
    import jaxaccel

    return Path(jaxaccel.__file__).resolve().parent / "assets"


def test_a_new_run_refused_before_it_writes_leaves_no_folder_behind(tmp_path):
    """A new run refused after it locked its folder (the corpus matches nothing) used to leave
    that folder holding only train.lock; a folder that existed before is left as it was."""
    data = {"corpus": str(tmp_path / "nothing" / "*.py"), "vocab_size": 400, "num_sentinels": 8}
    with pytest.raises(DataError, match="no files match"):
        train(run_cfg(tmp_path / "new" / "run", data=data))
    assert not (tmp_path / "new" / "run").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(DataError, match="no files match"):
        train(run_cfg(tmp_path / "mine", data=data))
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["train.lock"]


# ----------------------------------------------------------------------------- review of 2026-12-04


def test_a_finished_run_whose_checkpoints_are_gone_is_not_started_over(finished, tmp_path):
    """With checkpoints/ deleted (model/, config.yaml, metrics.jsonl kept), a rerun with other
    settings used to train from step 0 and replace the finished model and metrics. A rerun of
    a run killed before its first checkpoint is checked against its config.yaml too."""
    run = copy_run(finished, tmp_path)
    shutil.rmtree(run / "checkpoints")
    before = snapshot(run)
    with pytest.raises(ConfigError, match=r"other settings \(optim.lr is 0.01 in its config.yaml, 0.001 now.*"
                                          r"train.init_from=.* starts a new run from its weights\)$"):
        train(run_cfg(run, steps=2, optim={"lr": 1e-3}))
    with pytest.raises(ConfigError, match="holds a finished run's model/ but no checkpoint to resume from"):
        train(run_cfg(run, steps=2))  # the same settings, fewer steps: it would still replace the model
    assert snapshot(run) == before
    # killed before its first checkpoint: no weights to start from, so the refusal does not offer them
    shutil.rmtree(run / "model")
    with pytest.raises(ConfigError, match=r"other settings \(optim.lr is 0.01 in its config.yaml, 0.001 now.*"
                                          r"it has no checkpoint yet: delete its config.yaml to start this run "
                                          r"there\)$"):
        train(run_cfg(run, steps=2, optim={"lr": 1e-3}))


def test_a_run_resumed_past_its_export_loads_its_newest_checkpoint(finished, tmp_path):
    """A finished run extended (more steps) and killed part-way kept the first finish's model/,
    which jaxaccel.load and train.init_from took over the newer checkpoints."""
    import jaxaccel
    from jaxaccel.train.loop import init_source

    run = copy_run(finished, tmp_path)
    shutil.copytree(run / "checkpoints" / "8", run / "checkpoints" / "12")  # as if resumed to step 12
    assert jaxaccel.load(run).info == {"trained_steps": 12}
    assert init_source(str(run)) == ("run", run)
    shutil.rmtree(run / "checkpoints" / "12")
    assert jaxaccel.load(run).info["trained_steps"] == 8 and init_source(str(run)) == ("model", run / "model")


def test_a_resume_that_falls_back_past_a_damaged_step_checks_that_steps_settings(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    (run / "config.yaml").unlink()
    shutil.rmtree(run / "model")
    meta = next((run / "checkpoints" / "8" / "meta").glob("metadata"))
    meta.write_bytes(meta.read_bytes()[:10])
    with pytest.raises(ConfigError, match=r"other settings \(optim.lr is 0.01 in its checkpoint 4, 0.02 now"):
        train(run_cfg(run, optim={"lr": 2e-2}))


@pytest.mark.parametrize("section,key,value,message", [
    ("optim", "eps", -1.0, "optim.eps must be a finite number > 0, got -1.0"),
    ("optim", "eps", float("nan"), "optim.eps must be a finite number > 0"),
    ("optim", "warmup_steps", 2**31, "optim.warmup_steps must be < 2**31"),
    ("train", "steps", 2**31, "train.steps must be in [1, 2**31) or null"),
    ("train", "batch_size", 10**23, "train.batch_size must be in [1, 2**31)"),
])
def test_optimizer_and_loop_settings_out_of_range_are_refused(tmp_path, section, key, value, message):
    """optim.eps=-1 trained a broken model with exit 0; a warm-up past int32 was a traceback
    from optax; an absurd batch a traceback from numpy."""
    kwargs = {"optim": {key: value}} if section == "optim" else {"train_kw": {key: value}}
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_cfg(tmp_path, **kwargs)


def test_a_synthetic_corpus_needs_three_ids_and_says_so_before_the_folder_is_written(tmp_path):
    """vocab_size 2 was numpy's `low >= high` traceback after config.yaml was written, which
    then refused the corrected rerun."""
    with pytest.raises(ConfigError, match=r"synthetic needs model.vocab_size >= 3, got 2"):
        train(run_cfg(tmp_path / "run", model={"vocab_size": 2}))
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_lock_taken_on_a_file_unlinked_meanwhile_is_taken_again_on_the_file_at_the_path(tmp_path, monkeypatch):
    """A new run refused before it writes unlinks train.lock (then removes its folder): a second
    run that had opened the old file and locks it just then held a lock on a deleted file, and
    a third run could lock the new one beside it."""
    import os

    from jaxaccel.train import lock

    real, calls = lock.fcntl.flock, []

    def flock(fd, op):  # the refused run unlinks the file (and the folder) as this run locks it
        real(fd, op)
        calls.append(op)
        if len(calls) == 1:
            (tmp_path / "run" / lock.LOCK_FILE).unlink()
            (tmp_path / "run").rmdir()

    monkeypatch.setattr(lock.fcntl, "flock", flock)
    real_open, opens = lock.os.open, []

    def open_(path, *args):  # and the second time, it removes the folder between mkdir and open
        opens.append(path)
        if len(opens) == 2:
            raise FileNotFoundError(path)
        return real_open(path, *args)

    monkeypatch.setattr(lock.os, "open", open_)
    held = lock.OutputDirLock(tmp_path / "run").acquire()
    monkeypatch.setattr(lock.fcntl, "flock", real)
    monkeypatch.setattr(lock.os, "open", real_open)
    assert len(opens) == 3
    try:
        assert os.path.samestat(os.fstat(held._fd), os.stat(tmp_path / "run" / lock.LOCK_FILE))
        with pytest.raises(lock.OutputDirInUseError, match=r"is in use by pid \d+"):
            lock.OutputDirLock(tmp_path / "run").acquire()
    finally:
        held.release()
