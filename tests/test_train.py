"""The trainer on 8 fake CPU devices: every sharding gives the single-device loss, exact
resume, gradient accumulation, dropout switched on mid-run, and one-line errors."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxaccel.config import from_dict
from jaxaccel.errors import CheckpointError, ConfigError
from jaxaccel.train.config import RunConfig
from jaxaccel.train.loop import TrainingDiverged, train
from jaxaccel.train.synthetic import SyntheticData

ROOT = Path(__file__).resolve().parent.parent
MODEL = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 64}
MOE = {**MODEL, "moe": {"n_experts": 4, "top_k": 2}}


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
    for name, model in (("dense", MODEL), ("moe", MOE)):
        folder = tmp_path_factory.mktemp(f"single-{name}")
        train(run_cfg(folder, model))
        out[name] = losses(folder)
    return out


@pytest.mark.parametrize("name,model,mesh", [
    ("dense", MODEL, {"data": 8}),
    ("dense", MODEL, {"fsdp": 8}),
    ("dense", MODEL, {"data": 2, "tensor": 4}),
    ("moe", MOE, {"data": 2, "expert": 4}),
    ("moe", MOE, {"fsdp": 2, "expert": 4}),
])
def test_each_sharding_gives_the_single_device_loss(tmp_path, single_device, name, model, mesh):
    train(run_cfg(tmp_path, model, mesh))
    got = losses(tmp_path)
    assert len(got) == 8
    np.testing.assert_allclose(got, single_device[name], rtol=2e-5)
    assert got[-1] < got[0]  # it learns


def test_gradient_accumulation_matches_the_full_batch(tmp_path, single_device):
    train(run_cfg(tmp_path, grad_accum=4))
    np.testing.assert_allclose(losses(tmp_path), single_device["dense"], rtol=2e-5)


def test_moe_metrics_are_logged(tmp_path):
    # Training capacity factor 0.5 (dropout off): some assignments must drop.
    train(run_cfg(tmp_path, {**MOE, "moe": {**MOE["moe"], "capacity_factor": 0.5}}, steps=4))
    rec = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"loss"' in line][-1]
    assert rec["moe_load_balance"] >= 1.0 - 1e-6  # >= 1, equality only when perfectly balanced
    assert abs(sum(rec["moe_expert_load"]) - 1.0) < 1e-3 and 0.3 < rec["moe_dropped"] < 1
    assert rec["tokens_per_s"] > 0 and 0 < rec["mfu"] < 1


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


def test_dropout_switches_on_at_its_step(tmp_path, single_device):
    model = {**MODEL, "dropout": {"attention": 0.2, "mlp": 0.2}}
    train(run_cfg(tmp_path, model, dropout_start_step=4))
    got = losses(tmp_path)
    np.testing.assert_allclose(got[:4], single_device["dense"][:4], rtol=1e-6)
    assert abs(got[5] - single_device["dense"][5]) > 1e-4


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


def test_cli_one_line_errors(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "jaxaccel.train", *args], capture_output=True, text=True,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"})

    cfg = ROOT / "configs" / "tiny.yaml"
    for args, message in [((str(cfg), "train.stepz=3"), "unknown config key 'train.stepz'"),
                          ((str(cfg), "train.steps=many"), "train.steps: expected an integer"),
                          (("missing.yaml",), "config file 'missing.yaml' does not exist"),
                          ((str(cfg), "data.corpus=/nonexistent/*.txt", f"output_dir={tmp_path}"),
                           "/nonexistent/*.txt")]:
        proc = run(*args)
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and message in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr


def test_two_processes_match_one(tmp_path):
    """2 processes x 4 CPU devices (jax.distributed on 127.0.0.1) == 1 process x 8 devices."""
    common = ["-m", "jaxaccel.train", str(ROOT / "configs" / "tiny.yaml"), "data.corpus=synthetic",
              "model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
              "model.ffn_dim=64", "train.steps=6", "train.batch_size=8", "train.seq_len=32", "train.eval_every=0",
              "train.peak_flops=1e11", "checkpoint.every_steps=3", "mesh.data=8", "tensorboard=false"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    one = subprocess.run([sys.executable, *common, f"output_dir={tmp_path / 'one'}", "--cpu-devices", "8"],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, *common, f"output_dir={tmp_path / 'two'}", "--cpu-devices", "4",
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)


def small_corpus_args(tmp_path):
    import email

    pkg = Path(email.__file__).parent
    return [f"data.corpus={pkg}/*.py", "data.validation_fraction=0.2", "data.vocab_size=512", "model.vocab_size=512",
            "data.unique_tokens=null", "data.epochs=8", f"data.cache_dir={tmp_path / 'cache'}"]


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_uninterrupted_curve_and_decodes(tmp_path):
    base = [sys.executable, "-m", "jaxaccel.train", str(ROOT / "configs" / "tiny.yaml"), "train.steps=120",
            "checkpoint.every_steps=30", "train.eval_every=60", *small_corpus_args(tmp_path)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    full = subprocess.run([*base, f"output_dir={tmp_path / 'full'}"], capture_output=True, text=True, env=env)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = tmp_path / "killed"
    cmd = [*base, f"output_dir={killed}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "30").is_dir() and proc.poll() is None and time.time() < deadline:
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
    assert [r["step"] for r in curve(killed) if "loss" in r] == list(range(1, 121))

    import jaxaccel

    lm = jaxaccel.load(killed)
    assert lm.tokenizer is not None and lm.bos_token_id == 3 and lm.eos_token_ids == (1,)
    out = lm.generate(["import json\n"], max_new_tokens=12)
    assert out.prompt_ids[0][0] == 3 and len(out.tokens[0]) >= 1 and isinstance(out.texts[0], str)
    dec = subprocess.run([sys.executable, "-m", "jaxaccel.decode", "--model", str(killed), "--prompt", "def ",
                          "--max-new-tokens", "8", "--output", "json"], capture_output=True, text=True, env=env)
    assert dec.returncode == 0, dec.stderr
    assert json.loads(dec.stdout)["results"][0]["text"] is not None
