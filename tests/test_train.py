"""The trainer on 8 fake CPU devices: every sharding gives the single-device loss, exact
resume, gradient accumulation, dropout switched on mid-run, and one-line errors."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from jaxaccel.config import from_dict, to_dict
from jaxaccel.errors import CheckpointError, ConfigError
from jaxaccel.train.config import RunConfig
from jaxaccel.cli import run_cli
from jaxaccel.train.__main__ import main as train_main
from jaxaccel.train.lock import OutputDirInUseError
from jaxaccel.train.loop import TrainingDiverged, train
from jaxaccel.train.step import UNROLL_LAYERS_UP_TO
from jaxaccel.train.synthetic import SyntheticData

ROOT = Path(__file__).resolve().parent.parent
MODEL = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 64}
MOE = {**MODEL, "moe": {"n_experts": 4, "top_k": 2}}
# The pod presets' path: more layers than UNROLL_LAYERS_UP_TO, so the step keeps the scanned
# stack, with every layer rematerialized in the backward pass.
DEEP = {**MODEL, "n_layers": UNROLL_LAYERS_UP_TO + 2}
CASES = {"dense": (MODEL, {}), "moe": (MOE, {}), "deep": (DEEP, {"remat": True})}


def run_cfg(tmp, model=MODEL, mesh=None, steps=8, **train_kw):
    return from_dict(RunConfig, {
        "model": model, "data": {"corpus": "synthetic"},
        "train": {"steps": steps, "batch_size": 8, "seq_len": 32, "log_every": 4, "eval_every": 0,
                  "progress": False, "peak_flops": 1e11, **train_kw},
        "optim": {"lr": 1e-2, "warmup_steps": 2}, "checkpoint": {"every_steps": 4, "keep": 5},
        "mesh": {"data": 1, **(mesh or {})}, "output_dir": str(tmp), "tensorboard": False})


def losses(folder):
    return [json.loads(line)["loss"] for line in open(Path(folder) / "metrics.jsonl") if '"loss"' in line]


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
    out = {}
    for name, (model, train_kw) in CASES.items():
        folder = tmp_path_factory.mktemp(f"single-{name}")
        train(run_cfg(folder, model, **train_kw))
        out[name] = losses(folder)
    return out


@pytest.mark.parametrize("name,mesh", [
    ("dense", {"data": 8}),
    ("dense", {"fsdp": 8}),
    ("dense", {"data": 2, "tensor": 4}),
    ("moe", {"data": 2, "expert": 4}),
    ("moe", {"fsdp": 2, "expert": 4}),
    ("deep", {"fsdp": 4, "tensor": 2}),
])
def test_each_sharding_gives_the_single_device_loss(tmp_path, single_device, name, mesh):
    model, train_kw = CASES[name]
    train(run_cfg(tmp_path, model, mesh, **train_kw))
    got = losses(tmp_path)
    assert len(got) == 8
    np.testing.assert_allclose(got, single_device[name], rtol=2e-5)
    assert got[-1] < got[0]  # it learns


@pytest.mark.parametrize("name,mesh,accum", [("dense", None, 4), ("deep", {"fsdp": 4, "tensor": 2}, 2)])
def test_gradient_accumulation_matches_the_full_batch(tmp_path, single_device, name, mesh, accum):
    model, train_kw = CASES[name]  # (a micro-batch must still split over data * fsdp)
    train(run_cfg(tmp_path, model, mesh, grad_accum=accum, **train_kw))
    np.testing.assert_allclose(losses(tmp_path), single_device[name], rtol=2e-5)


def test_deep_stack_remat_matches_no_remat(tmp_path, single_device):
    """Rematerialization recomputes the scanned layers; it must not change the numbers."""
    train(run_cfg(tmp_path, DEEP))
    np.testing.assert_allclose(losses(tmp_path), single_device["deep"], rtol=2e-5)


def test_moe_metrics_are_logged(tmp_path):
    # Training capacity factor 0.5 (dropout off): some assignments must drop.
    train(run_cfg(tmp_path, {**MOE, "moe": {**MOE["moe"], "capacity_factor": 0.5}}, steps=4))
    rec = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"loss"' in line][-1]
    assert rec["moe_load_balance"] >= 1.0 - 1e-6  # >= 1, equality only when perfectly balanced
    assert abs(sum(rec["moe_expert_load"]) - 1.0) < 1e-3 and 0.3 < rec["moe_dropped"] < 1
    assert rec["tokens_per_s"] > 0 and 0 < rec["mfu"] < 1


def test_throughput_times_training_steps_not_evaluations(tmp_path, monkeypatch):
    """The interval timer restarted at the metrics flush, before the evaluation and checkpoint
    of that step ran: the next record's tokens/s and MFU counted them (a 1 s validation set
    turned 23,520 tok/s into 340)."""
    import time

    from jaxaccel.train import synthetic

    real = synthetic.SyntheticData.eval_batches

    def slow(self):
        for batch in real(self):
            time.sleep(0.5)
            yield batch

    monkeypatch.setattr(synthetic.SyntheticData, "eval_batches", slow)
    train(run_cfg(tmp_path, steps=16, eval_every=8, eval_batches=1))
    rate = {r["step"]: r["tokens_per_s"] for r in map(json.loads, open(tmp_path / "metrics.jsonl"))
            if "tokens_per_s" in r}
    assert rate[12] > 0.2 * max(rate[8], rate[16]), rate  # steps 9-12 follow the step-8 evaluation


@pytest.mark.parametrize("mesh", [{"data": 1}, {"data": 2}])
def test_mfu_is_over_the_devices_the_mesh_uses(tmp_path, mesh):
    """train.peak_flops is per device; the loop multiplied it by every device of the machine (8
    here), so a mesh of 1 or 2 of them logged an MFU 8 or 4 times too low."""
    from jaxaccel.train.metrics import flops_per_token

    cfg = run_cfg(tmp_path, mesh=mesh, steps=4)
    train(cfg)
    rec = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if "mfu" in r][-1]
    expected = rec["tokens_per_s"] * flops_per_token(cfg.model, 32) / (1e11 * mesh["data"])
    assert rec["mfu"] == pytest.approx(expected, rel=1e-9)


def test_throughput_after_extending_a_finished_run_times_no_evaluation(tmp_path, monkeypatch):
    """A finished run trained on (a larger train.steps) makes up the evaluation its last step
    left; the first interval's timer ran across it (85 tok/s against ~30k with a 4 s one).
    Here the evaluation takes 1000 s of the loop's clock, without sleeping."""
    import types

    from jaxaccel.train import loop, synthetic

    train(run_cfg(tmp_path, steps=4, eval_batches=1))
    skipped = [0.0]
    clock = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + skipped[0])
    monkeypatch.setattr(loop, "time", clock)
    real = synthetic.SyntheticData.eval_batches

    def slow(self):
        for batch in real(self):
            skipped[0] += 1000.0
            yield batch

    monkeypatch.setattr(synthetic.SyntheticData, "eval_batches", slow)
    train(run_cfg(tmp_path, steps=12, eval_batches=1))
    rate = {r["step"]: r["tokens_per_s"] for r in map(json.loads, open(tmp_path / "metrics.jsonl"))
            if "tokens_per_s" in r}
    assert rate[8] > 4 * 256 / 100, rate  # steps 5-8 (a compilation, 4 steps) in well under 100 s


def test_a_restart_from_step_0_purges_the_earlier_tensorboard_points(tmp_path, monkeypatch):
    """A run killed before its first checkpoint and started again: metrics.jsonl was cut back
    to nothing, but TensorBoard kept the killed attempt's points beside the new ones."""
    from jaxaccel.train import metrics

    made = []
    monkeypatch.setattr(metrics, "summary_writer_class", lambda: lambda folder, **kw: made.append(kw) or None)
    metrics.MetricsWriter(tmp_path, tensorboard=True, resume_step=0)
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"earlier attempt")
    metrics.MetricsWriter(tmp_path, tensorboard=True, resume_step=0)
    metrics.MetricsWriter(tmp_path, tensorboard=True, resume_step=4)
    assert made == [{}, {"purge_step": 1, "filename_suffix": ".resumed-0"},
                    {"purge_step": 5, "filename_suffix": ".resumed-4"}]


def test_resume_reproduces_the_uninterrupted_curve_and_restores_onto_another_mesh(tmp_path, single_device):
    cfg = run_cfg(tmp_path)
    train(cfg)
    full = (tmp_path / "metrics.jsonl").read_text()
    import shutil

    for step in ("8",):  # as if the run had been killed after the step-4 checkpoint
        shutil.rmtree(tmp_path / "checkpoints" / step)
    summary = train(cfg)
    assert summary["resumed_from"] == 4
    assert (tmp_path / "metrics.jsonl").read_text().count('"loss"') == 8
    strip = lambda text: [{k: v for k, v in json.loads(l).items() if k not in ("tokens_per_s", "mfu")}  # noqa: E731
                          for l in text.splitlines()]
    assert strip((tmp_path / "metrics.jsonl").read_text()) == strip(full)
    # Checkpoints written on 8 devices restore onto 1 (and the curve continues).
    eight = tmp_path / "eight"
    train(run_cfg(eight, mesh={"data": 8}))
    shutil.rmtree(eight / "checkpoints" / "8")
    summary = train(run_cfg(eight, mesh={"data": 1}))
    assert summary["resumed_from"] == 4
    np.testing.assert_allclose(losses(eight), single_device["dense"], rtol=2e-5)


def test_weight_decay_skips_norm_scales():
    import jax
    import jax.numpy as jnp

    from jaxaccel.config import ModelConfig
    from jaxaccel.model.transformer import init_params
    from jaxaccel.train.config import OptimConfig
    from jaxaccel.train.step import make_optimizer

    params = init_params(ModelConfig(**{k: v for k, v in MODEL.items()}), jax.random.key(0), "scanned")
    opt = make_optimizer(OptimConfig(lr=1e-3, weight_decay=0.5, warmup_steps=0), 10)
    zero = jax.tree.map(jnp.zeros_like, params)
    _, state = opt.update(zero, opt.init(params), params)  # step 0 of the warmup has lr 0
    updates, _ = opt.update(zero, state, params)  # zero gradient: only decay moves things
    assert float(jnp.abs(updates["layers"]["attn_norm"]["scale"]).max()) == 0.0
    assert float(jnp.abs(updates["layers"]["mlp"]["up"]["kernel"]).max()) > 0.0


def test_learning_rate_schedules_without_warmup_start_at_the_full_rate():
    """optim.warmup_steps=0: the first step trains at lr (it used to warm up over one step from
    0, so train.steps=1 trained nothing, and crashed with the cosine schedule)."""
    from jaxaccel.train.config import OptimConfig
    from jaxaccel.train.step import lr_schedule

    for schedule in ("cosine", "constant"):
        one = lr_schedule(OptimConfig(lr=1e-3, warmup_steps=0, schedule=schedule), 1)
        assert float(one(0)) == pytest.approx(1e-3)
    cosine = lr_schedule(OptimConfig(lr=1e-3, warmup_steps=0, min_lr_ratio=0.1), 10)
    rates = [float(cosine(i)) for i in range(11)]
    assert rates[0] == pytest.approx(1e-3) and rates[10] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    warm = lr_schedule(OptimConfig(lr=1e-3, warmup_steps=4, min_lr_ratio=0.1), 20)  # unchanged with a warm-up
    assert [float(warm(i)) for i in range(5)] == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert float(warm(20)) == pytest.approx(1e-4)


def test_dropout_switches_on_at_its_step(tmp_path, single_device):
    model = {**MODEL, "dropout": {"attention": 0.2, "mlp": 0.2}}
    train(run_cfg(tmp_path, model, dropout_start_step=4, log_every=1))
    got = losses(tmp_path)
    np.testing.assert_allclose(got[:4], single_device["dense"][:4], rtol=1e-6)
    assert abs(got[5] - single_device["dense"][5]) > 1e-4
    # Tokens/s and MFU time training, not compiling: the first call of each step variant (the
    # plain step at step 1, the dropout step at step 5) compiles it, and its record has neither.
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"loss"' in line]
    timed = [r["step"] for r in records if "tokens_per_s" in r]
    assert timed == [2, 3, 4, 6, 7, 8], timed
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in records if "tokens_per_s" in r)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = from_dict(RunConfig, {**json.loads(json.dumps({"model": MODEL})), "data": {"corpus": "synthetic"},
                                "train": {"steps": 40, "batch_size": 8, "seq_len": 32, "log_every": 1,
                                          "eval_every": 0, "progress": False, "peak_flops": 1e11},
                                "optim": {"lr": 1e30, "warmup_steps": 0, "grad_clip": 0.0, "weight_decay": 0.0},
                                "checkpoint": {"every_steps": 1, "keep": 50}, "mesh": {"data": 1},
                                "output_dir": str(tmp_path), "tensorboard": False})
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf|-inf) at step (\d+); training stopped") as e:
        train(cfg)
    bad_step = int(str(e.value).split(" at step ")[1].split(";")[0])
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) == bad_step - 1


def test_divergence_names_the_quantity_that_went_non_finite():
    from jaxaccel.train.loop import divergence

    inf, nan = float("inf"), float("nan")
    assert divergence({"loss": nan, "objective": nan, "grad_norm": nan}) == "loss became nan"
    assert divergence({"loss": 4.1589, "objective": inf, "grad_norm": 1.0}) == \
        "training objective became inf (loss 4.159)"
    assert divergence({"loss": 4.1589, "objective": 4.2, "grad_norm": inf}) == "gradient norm became inf (loss 4.159)"


def test_wrong_model_shape_names_the_parameter(tmp_path):
    train(run_cfg(tmp_path, steps=4))
    other = {**MODEL, "ffn_dim": 96}
    with pytest.raises(CheckpointError, match=r"different model: params/layers/mlp/down/kernel has shape \(2, 64, 32\), "
                                              r"this config expects \(2, 96, 32\)"):
        train(run_cfg(tmp_path, other, steps=8))


def test_corrupted_latest_checkpoint_falls_back(tmp_path, capfd):
    cfg = run_cfg(tmp_path)
    train(cfg)
    for f in (tmp_path / "checkpoints" / "8").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    (tmp_path / "model").rename(tmp_path / "old-model")
    summary = train(cfg)
    assert summary["resumed_from"] == 4
    assert "checkpoint step 8 is unreadable" in capfd.readouterr().err


@pytest.mark.parametrize("mesh,match", [
    ({"data": 3}, "does not divide the 8 available"),
    ({"data": 1, "tensor": 8}, "mesh.tensor=8 does not divide model.n_heads=4"),
    ({"data": 1, "expert": 2}, "mesh.expert=2 needs an MoE model"),
])
def test_bad_meshes(tmp_path, mesh, match):
    with pytest.raises(ConfigError, match=match):
        train(run_cfg(tmp_path, mesh=mesh))


def test_moe_experts_must_divide(tmp_path):
    with pytest.raises(ConfigError, match="mesh.expert=8 does not divide moe.n_experts=4"):
        train(run_cfg(tmp_path, MOE, mesh={"expert": 8}))


def run_train_cli(args, capsys):
    """`python -m jaxaccel.train ARGS`, in this process: (exit status, stderr)."""
    try:
        code = run_cli(train_main, [str(a) for a in args])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_cli_one_line_errors(tmp_path, capsys):
    cfg = ROOT / "configs" / "tiny.yaml"
    for args, message in [((cfg, "train.stepz=3"), "unknown config key 'train.stepz'"),
                          ((cfg, "train.steps=many"), "train.steps: expected an integer"),
                          (("missing.yaml",), "config file 'missing.yaml' does not exist"),
                          ((cfg, "data.corpus=/nonexistent/*.txt", f"output_dir={tmp_path}"), "/nonexistent/*.txt"),
                          # jax.distributed.initialize raised IndexError (a traceback) on a port-less address
                          ((cfg, "--coordinator", "127.0.0.1", "--num-processes", "2", "--process-id", "1"),
                           "--coordinator must be HOST:PORT (e.g. 10.0.0.2:1234), got '127.0.0.1'"),
                          ((cfg, "--coordinator", "127.0.0.1:99999", "--num-processes", "2", "--process-id", "1"),
                           "--coordinator must be HOST:PORT (e.g. 10.0.0.2:1234), got '127.0.0.1:99999'"),
                          # both were written locally, into folders named "s3:" and "gs:"
                          ((cfg, "output_dir=s3://bucket/run"),
                           "output_dir 's3://bucket/run': s3:// is not supported here; it must be a local folder or gs://"),
                          # an unset $BUCKET, a slash missing: both made a local folder "gs:" (gs:/checkpoints)
                          ((cfg, "output_dir=gs://"), "output_dir 'gs://' is not a gs://BUCKET/... path"),
                          ((cfg, "output_dir=gs:/bucket/run"), "output_dir 'gs:/bucket/run' is not a gs://BUCKET/"),
                          ((cfg, "data.cache_dir=gs://bucket/cache"),
                           "data.cache_dir 'gs://bucket/cache': gs:// is not supported here; it must be a local folder"),
                          ((cfg, "train.init_from=http://host/model"), "train.init_from 'http://host/model': http://"),
                          ((cfg, "train.seed=9223372036854775808"), "train.seed must be in [0, 2**63)"),  # OverflowError
                          ((cfg, "--cpu-devices", "-1"), "--cpu-devices must be >= 1, got -1"),  # was ignored
                          ((cfg, "--num-processes", "2", "--process-id", "1"),  # trained as one process
                           "--num-processes and --process-id go with --coordinator")]:
        code, err = run_train_cli(args, capsys)
        assert code == 2, err
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and message in lines[0], err
        assert "Traceback" not in err


def test_init_from_takes_a_builtin_model_name(tmp_path):
    """`train.init_from=builtin:draft` fine-tunes a shipped model, as every command takes
    builtin names for a model path (it was "does not exist")."""
    import jax

    from jaxaccel.model.checkpoint import BUILTIN_MODELS, load_model
    from jaxaccel.model.transformer import canonical_params
    from jaxaccel.train.loop import check_init_from, init_source, initial_params

    check_init_from("builtin:draft", str(tmp_path / "run"))
    assert init_source("builtin:draft") == ("model", BUILTIN_MODELS["draft"])
    with pytest.raises(ConfigError, match=r"train.init_from: unknown built-in model 'nope'; built-in models: "
                                          r"builtin:default, builtin:draft"):
        check_init_from("builtin:nope", str(tmp_path / "run"))
    draft_cfg, draft_params, _ = load_model(BUILTIN_MODELS["draft"])
    model = {**json.loads(json.dumps(to_dict(draft_cfg))), "param_dtype": "float32", "dtype": "float32"}
    cfg = from_dict(RunConfig, {"model": model, "train": {"init_from": "builtin:draft"}})
    got = initial_params(cfg, None)
    want = canonical_params(draft_params, draft_cfg)
    assert float(jax.numpy.abs(got["embed"]["embedding"] - want["embed"]["embedding"].astype("float32")).max()) == 0


class GatedData:
    """Synthetic data whose first training batch waits for `go`: the run holding it stays live."""

    def __init__(self, inner):
        self.inner, self.waiting, self.go = inner, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def train_batches(self, start_step=0):
        self.waiting.set()
        assert self.go.wait(300)
        yield from self.inner.train_batches(start_step)


def test_a_live_run_keeps_its_output_dir_to_itself(tmp_path, capsys):
    """A second trainer on a folder in use is refused with one line naming the holder, whether
    the live run is in this process (a thread) or another; the lock dies with its holder, so a
    SIGKILLed run never blocks the resume."""
    import re

    from jaxaccel.train.loop import output_dir_lock

    cfg = run_cfg(tmp_path, steps=4)
    data = GatedData(SyntheticData(MODEL["vocab_size"], 32, 8, total_steps=4, seed=cfg.data.seed))
    result = {}

    def live_run():
        try:
            result["summary"] = train(cfg, data)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            result["error"] = e

    thread = threading.Thread(target=live_run, daemon=True)
    thread.start()
    try:
        assert data.waiting.wait(300), result
        held = rf"output_dir '{re.escape(str(tmp_path))}' is in use by pid {os.getpid()} on host "
        with pytest.raises(OutputDirInUseError, match=held):
            train(run_cfg(tmp_path, steps=8))
        code, err = run_train_cli([ROOT / "configs" / "tiny.yaml", "data.corpus=synthetic", f"output_dir={tmp_path}"],
                                  capsys)
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert code == 2 and len(lines) == 1 and re.search(held, lines[0]) and "Traceback" not in err, err
    finally:
        data.go.set()
        thread.join(300)
    assert "error" not in result, result
    assert result["summary"]["steps"] == 4 and not (tmp_path / "checkpoints" / "8").exists()

    # Another process holds the folder (as a trainer would), then dies by SIGKILL.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "os.write(fd, f'pid {os.getpid()} on host elsewhere'.encode())\n"
        "print('locked', flush=True)\n"
        "time.sleep(300)\n"), str(tmp_path / "train.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(OutputDirInUseError, match=rf"is in use by pid {holder.pid} on host elsewhere"):
            train(run_cfg(tmp_path, steps=8))
    finally:
        holder.kill()
        holder.wait()
    summary = train(run_cfg(tmp_path, steps=8))
    assert summary["resumed_from"] == 4 and len(losses(tmp_path)) == 8
    # Object stores have no flock: gs:// runs are not locked (and nothing is created locally).
    with output_dir_lock("gs://bucket/run"), output_dir_lock("gs://bucket/run"):
        pass


TWO_PROCESS_ARGS = ["-m", "jaxaccel.train", str(ROOT / "configs" / "tiny.yaml"), "data.corpus=synthetic",
                    "model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
                    "model.n_kv_heads=2", "model.ffn_dim=64", "train.steps=6", "train.batch_size=8", "train.seq_len=32",
                    "train.eval_every=0", "train.peak_flops=1e11", "checkpoint.every_steps=3", "mesh.data=1",
                    "mesh.fsdp=8", "tensorboard=false"]


def two_processes(output_dir, *extra, status=0, only=None):
    """`jaxaccel.train` as 2 processes x 4 CPU devices (jax.distributed on 127.0.0.1), with
    `extra` arguments, and `only[i]` for process i alone; their stderr once both exit `status`."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, *TWO_PROCESS_ARGS, f"output_dir={output_dir}", *extra,
                               *(only or {}).get(i, []), "--cpu-devices", "4", "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == status for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    return [err for _, err in outs]


def test_two_processes_match_one_and_agree_on_the_step_to_resume(tmp_path):
    """2 processes x 4 CPU devices (jax.distributed on 127.0.0.1) == 1 process x 8 devices.
    fsdp=8: each host feeds its own rows and gradients are reduced across both processes, as
    with data=8, and every array is also sharded across them, so each writes its own part of a
    checkpoint. Then process 1's part of the last step is lost: both processes go back to the
    step before it together (before, process 0 restored the last step and waited forever in a
    barrier for process 1, which had fallen back alone) and train to the same curve. Last,
    process 1's part of the exported model is lost and a new run starts from it
    (`train.init_from`): both processes stop with a one-line error, exit 2."""
    assert train_main([*TWO_PROCESS_ARGS[2:], f"output_dir={tmp_path / 'one'}"]) == 0  # this process has the 8 devices
    two_processes(tmp_path / "two")
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)
    part = tmp_path / "two" / "checkpoints" / "6" / "state" / "ocdbt.process_1" / "d"
    assert list(part.iterdir()), "process 1 wrote no part of the checkpoint: the test would not test anything"
    for f in part.iterdir():
        f.unlink()
    errs = two_processes(tmp_path / "two")
    assert "process 1 could not read its part); resuming from step 3" in errs[0]
    assert "warning: checkpoint step 6 is unreadable (" in errs[1] and "resuming from step 3" in errs[1]
    assert "resuming from checkpoint step 3" in errs[0]  # the trainer's log is process 0's
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)
    part = tmp_path / "two" / "model" / "params" / "ocdbt.process_1" / "d"
    assert list(part.iterdir()), "process 1 wrote no part of the model"
    for f in part.iterdir():
        f.unlink()
    errs = two_processes(tmp_path / "three", f"train.init_from={tmp_path / 'two' / 'model'}", status=2)
    # (the model is stored in another layout than the training sharding reads, so here both
    # processes read some of process 1's files and fail on their own; the agreement that
    # makes a healthy one fail with them is the checkpoint case above)
    for err in errs:
        (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
        assert "/two/model/params could not be restored: " in line and "Traceback" not in err


def test_processes_started_with_different_settings_are_refused_on_every_process(tmp_path):
    """A process given another learning rate trained its rows into the shared model silently
    (another train.steps: every process waited forever). Now every process stops with one line
    naming the setting, before anything is written; a host's own token cache folder is allowed."""
    errs = two_processes(tmp_path / "run", status=2, only={0: ["data.cache_dir=/tmp/a"], 1: ["optim.lr=0.03"]})
    for i, err in enumerate(errs):
        (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
        assert re.search(rf"different settings: optim\.lr is [0-9.e-]+ on process {i} but not on process\(es\) "
                         rf"\[{1 - i}\]", line) and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def small_corpus_args(tmp_path):
    import email

    pkg = Path(email.__file__).parent
    return [f"data.corpus={pkg}/*.py", "data.validation_fraction=0.2", "data.vocab_size=512", "model.vocab_size=512",
            "data.unique_tokens=null", "data.epochs=8", f"data.cache_dir={tmp_path / 'cache'}"]


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_uninterrupted_curve_and_decodes(tmp_path, capsys):
    # tiny.yaml's data path on a smaller model and batch: the curve's exactness is what is
    # tested, not the model (each step ~8x cheaper than tiny.yaml's; the suite is compute-bound)
    base = [sys.executable, "-m", "jaxaccel.train", str(ROOT / "configs" / "tiny.yaml"), "train.steps=48",
            "checkpoint.every_steps=12", "train.eval_every=24", "train.eval_batches=2", "train.peak_flops=1e11",
            "model.d_model=64", "model.ffn_dim=192", "train.batch_size=8", "train.seq_len=64",
            *small_corpus_args(tmp_path)]
    # the three trainer processes share their compiled programs (JAX's persistent cache)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    full = subprocess.run([*base, f"output_dir={tmp_path / 'full'}"], capture_output=True, text=True, env=env)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = tmp_path / "killed"
    cmd = [*base, f"output_dir={killed}", "tensorboard=false"]  # the full run writes TensorBoard (~1.5 s import)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "12").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists(), "the run finished before it could be killed"
    again = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from checkpoint step" in again.stderr

    def curve(folder):
        return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "mfu")}
                for line in (folder / "metrics.jsonl").read_text().splitlines()]

    assert curve(killed) == curve(tmp_path / "full")
    assert [r["step"] for r in curve(killed) if "loss" in r] == list(range(1, 49))

    import jaxaccel

    lm = jaxaccel.load(killed)
    assert lm.tokenizer is not None and lm.bos_token_id == 3 and lm.eos_token_ids == (1,)
    out = lm.generate(["import json\n"], max_new_tokens=12)
    assert out.prompt_ids[0][0] == 3 and len(out.tokens[0]) >= 1 and isinstance(out.texts[0], str)
    from jaxaccel.decode.__main__ import main as decode_main

    capsys.readouterr()
    assert decode_main(["--model", str(killed), "--prompt", "def ", "--max-new-tokens", "8", "--output", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["text"] is not None


def test_synthetic_data_keeps_the_token_budget(tmp_path):
    """data.unique_tokens and data.epochs were ignored by the synthetic data: a sweep's "8
    epochs over 96 tokens" run trained on the very batches of its "1 epoch over 768 tokens"
    run and was filed under 8 epochs. Now the unique tokens are whole distinct batches, read
    `epochs` times (each later epoch in its own order), and a budget under one batch is a
    one-line error."""
    from jaxaccel.config import replace
    from jaxaccel.train.synthetic import SyntheticData, synthetic_budget

    tokens = 8 * 32  # a batch of run_cfg
    assert synthetic_budget(2 * tokens, 3.0, 8, 32) == (2, 6)
    assert synthetic_budget(None, 1.0, 8, 32, steps=5) == (5, 5)
    # without unique tokens, train.steps is what trains: over fewer distinct batches, or part of them
    assert synthetic_budget(None, 2.5, 8, 32, steps=5) == (2, 5)
    assert synthetic_budget(None, 0.5, 8, 32, steps=4) == (8, 4)
    assert synthetic_budget(None, 2.0, 8, 32) == (1000, 2000)
    data = SyntheticData(64, 32, 8, total_steps=6, unique_batches=2, seed=3)
    seen = [b["inputs"].tobytes() for b in data.train_batches()]
    assert len(set(seen)) == 2 and all(sorted(seen[i:i + 2]) == sorted(seen[:2]) for i in (2, 4))
    assert [b["inputs"].tobytes() for b in data.train_batches(3)] == seen[3:]  # a resume reads the same batches
    assert data.stats == {"corpus": "synthetic", "unique_tokens": 2 * tokens, "total_tokens": 6 * tokens,
                          "epochs": 3.0}

    def run(name, unique, epochs):
        cfg = run_cfg(tmp_path / name, steps=6, log_every=1)
        cfg = replace(cfg, data=replace(cfg.data, unique_tokens=unique, epochs=epochs))
        return train(cfg), losses(tmp_path / name)

    (once, once_losses), (thrice, thrice_losses) = run("once", 6 * tokens, 1.0), run("thrice", 2 * tokens, 3.0)
    assert once_losses[:2] == thrice_losses[:2] and once_losses[2:] != thrice_losses[2:]  # epoch 2 repeats
    assert once["data"]["epochs"] == 1.0 and thrice["data"]["epochs"] == 3.0, thrice["data"]
    with pytest.raises(ConfigError, match=r"data.unique_tokens=100 does not fill one batch of the synthetic data "
                                          r"\(8 x 32 = 256 tokens\)"):
        run("small", 100, 1.0)
