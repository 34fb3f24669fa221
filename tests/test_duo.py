"""Duo-LLM's FFN (jaxaccel.model.duo): forced routes equal the dense models they stand for,
skip is the identity on the FFN branch, every execution path (masked reference, dispatch,
switch) gives the same numbers, and random-routing training shards and resumes exactly."""
import json
import shutil
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaccel.cli import run_cli
from jaxaccel.config import DuoConfig, ModelConfig, from_dict
from jaxaccel.errors import ConfigError, InvalidArgumentError, UnsupportedArchitectureError
from jaxaccel.model.duo import (BIG, SKIP, SMALL, DuoFFN, capacity_ladder, check_routes, ffn_config, random_routes,
                                route_fractions)
from jaxaccel.model.options import ExecutionPlan
from jaxaccel.model.transformer import fuse_layers, init_cache, init_params, logical_axes, stack_layers
from jaxaccel.model.transformer import forward as _forward
from jaxaccel.train.config import RunConfig
from jaxaccel.train.loop import train
from jaxaccel.train.step import duo_plan

ROOT = Path(__file__).resolve().parent.parent
# init_std 0.1: weights large enough that a wrong route or FFN shows in the logits.
DUO = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64,
                  init_std=0.1, duo=DuoConfig(enabled=True))  # small FFN: 64 / 16 = 4
forward = jax.jit(_forward, static_argnums=(1,), static_argnames=("deterministic", "compute_logits"))
FFN = {mode: jax.jit(DuoFFN(DUO, mode=mode).apply) for mode in ("masked", "dispatch", "switch")}


@pytest.fixture(scope="module")
def duo_params():
    return init_params(DUO, jax.random.key(0), "unrolled")


def tokens(b, t, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, DUO.vocab_size)


def as_dense(params, which: str):
    """A plain model's params holding this Duo model's big or small FFN as its MLP."""
    out = dict(params)
    for i in range(DUO.n_layers):
        layer = dict(params[f"layer_{i}"])
        layer["mlp"] = layer.pop("duo")[which]
        out[f"layer_{i}"] = layer
    return out


def plan(route, b, t):
    return ExecutionPlan(routes=jnp.full((b, t, DUO.n_layers), route, jnp.int32))


@pytest.mark.parametrize("which,route", [("big", BIG), ("small", SMALL)])
def test_forced_routes_equal_the_dense_model_with_that_ffn(duo_params, which, route):
    x = tokens(2, 9)
    dense_cfg = ffn_config(DUO, which)
    assert dense_cfg.ffn_dim == (64 if which == "big" else 4) and not dense_cfg.duo.enabled
    want, _ = forward(as_dense(duo_params, which), dense_cfg, x)
    for params in (duo_params, stack_layers(duo_params, DUO)):  # unrolled and scanned layouts
        got, _ = forward(params, DUO, x, plan=plan(route, 2, 9))
        np.testing.assert_allclose(got, want, atol=1e-5)
    if which == "big":  # no routes: every token takes the big FFN
        got, _ = forward(duo_params, DUO, x)
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_skip_is_the_identity_on_the_ffn_branch(duo_params):
    x = tokens(2, 9)
    no_ffn = as_dense(duo_params, "big")  # a dense model whose FFN adds nothing
    for i in range(DUO.n_layers):
        no_ffn[f"layer_{i}"]["mlp"] = {**no_ffn[f"layer_{i}"]["mlp"], "down": {"kernel": jnp.zeros((64, 32))}}
    want, _ = forward(no_ffn, replace(DUO, duo=DuoConfig()), x)
    got, _ = forward(duo_params, DUO, x, plan=plan(SKIP, 2, 9))
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Per token, at the FFN: skipped tokens get exactly 0, the others their own FFN's output.
    h = jax.random.normal(jax.random.key(3), (2, 5, 32))
    p = {"params": duo_params["layer_0"]["duo"]}
    routes = jnp.array([[0, 1, 2, 2, 0], [2, 1, 0, 1, 2]])
    out = FFN["masked"](p, h, routes)
    assert np.all(np.asarray(out)[np.asarray(routes) == SKIP] == 0.0)
    big = FFN["masked"](p, h, jnp.zeros_like(routes))
    took_big = np.asarray(routes) == BIG
    np.testing.assert_array_equal(np.asarray(out)[took_big], np.asarray(big)[took_big])


@pytest.mark.parametrize("case", ["random", "all_big", "all_skip", "no_small"])
def test_dispatch_at_batch_8_equals_per_token_routing(duo_params, case):
    h = jax.random.normal(jax.random.key(4), (8, 3, 32))
    routes = {"random": jax.random.randint(jax.random.key(5), (8, 3), 0, 3), "all_big": jnp.zeros((8, 3), jnp.int32),
              "all_skip": jnp.full((8, 3), SKIP), "no_small": jnp.array([[0, 2, 0]] * 8)}[case]
    p = {"params": duo_params["layer_1"]["duo"]}
    reference = FFN["masked"](p, h, routes)
    np.testing.assert_allclose(FFN["dispatch"](p, h, routes), reference, atol=1e-6)
    if case == "random":  # and token by token (batch 1, one token: lax.switch on its route)
        for b in range(8):
            for t in range(3):
                got = FFN["switch"](p, h[b:b + 1, t:t + 1], routes[b:b + 1, t:t + 1])
                np.testing.assert_allclose(got[0, 0], reference[b, t], atol=1e-6)


def test_out_of_range_traced_routes_are_a_skip_on_every_path(duo_params):
    """Traced routes are not value-checked; a route of -1 was a skip in the masked and dispatch
    paths but the big FFN in the switch (which clamps its index)."""
    h = jax.random.normal(jax.random.key(6), (1, 1, 32))
    p = {"params": duo_params["layer_1"]["duo"]}
    for bad in (-1, 3):
        routes = jnp.full((1, 1), bad, jnp.int32)
        for mode in ("masked", "dispatch", "switch"):
            np.testing.assert_array_equal(FFN[mode](p, h, routes), np.zeros((1, 1, DUO.d_model)), err_msg=mode)


def test_dispatch_runs_each_ffn_on_a_buffer_from_the_capacity_ladder():
    assert capacity_ladder(8) == tuple(range(9))  # decode at batch 8: exactly the routed count
    assert capacity_ladder(2) == (0, 1, 2)
    assert capacity_ladder(2048) == (0, 256, 512, 768, 1024, 1280, 1536, 1792, 2048)
    # One lax.switch per FFN over the rungs; rung k runs the FFN on [1, capacity_k, d_model].
    p = {"params": init_params(DUO, jax.random.key(0), "unrolled")["layer_0"]["duo"]}
    jaxpr = jax.make_jaxpr(DuoFFN(DUO, mode="dispatch").apply)(p, jnp.ones((4, 2, 32)), jnp.zeros((4, 2), jnp.int32))
    conds = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond"]
    assert len(conds) == 2
    for cond in conds:
        rows = [sorted({v.aval.shape[1] for e in branch.jaxpr.eqns if e.primitive.name == "dot_general"
                        for v in e.invars[:1]}) for branch in cond.params["branches"]]
        assert rows == [[]] + [[c] for c in capacity_ladder(8)[1:]]  # rung 0 computes nothing


def test_cached_forwards_equal_the_masked_reference_in_decode_and_scanned_layouts(duo_params):
    """Prefill (dispatch over 8 x 5 tokens) and batch-8 decode steps (dispatch over 8) in the
    fused decode layout, and batch-1 steps (switch) in the scanned layout, give the uncached
    forward's logits (the masked reference)."""
    b, t, steps = 8, 5, 2
    x = tokens(b, t + steps, seed=6)
    routes = jax.random.randint(jax.random.key(7), (b, t + steps, DUO.n_layers), 0, 3)
    want, _ = forward(duo_params, DUO, x, plan=ExecutionPlan(routes=routes))
    for params in (fuse_layers(duo_params, DUO),):
        cache = init_cache(DUO, b, 16)
        pos = jnp.broadcast_to(jnp.arange(t + steps, dtype=jnp.int32), (b, t + steps))
        got, cache = forward(params, DUO, x[:, :t], pos[:, :t], cache=cache, write_slots=pos[:, :t],
                             prefix_len=jnp.zeros(b, jnp.int32), plan=ExecutionPlan(routes=routes[:, :t]))
        np.testing.assert_allclose(got, want[:, :t], atol=2e-5)
        for i in range(t, t + steps):
            got, cache = forward(params, DUO, x[:, i:i + 1], pos[:, i:i + 1], cache=cache, write_slots=pos[:, i:i + 1],
                                 prefix_len=jnp.full(b, i, jnp.int32), plan=ExecutionPlan(routes=routes[:, i:i + 1]))
            np.testing.assert_allclose(got[:, 0], want[:, i], atol=2e-5)
    row = 3  # batch 1, one token per call: the switch path, scanned layout
    scanned = stack_layers(duo_params, DUO)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *init_cache(DUO, 1, 16))
    for i in range(2):
        one = jnp.full((1, 1), i, jnp.int32)
        step_plan = ExecutionPlan(routes=routes[row:row + 1, i:i + 1])
        got, stacked = forward(scanned, DUO, x[row:row + 1, i:i + 1], one, cache=stacked, write_slots=one,
                               prefix_len=jnp.full(1, i, jnp.int32), plan=step_plan)
        np.testing.assert_allclose(got[0, 0], want[row, i], atol=2e-5)


def test_both_ffns_are_counted_and_shard_like_the_mlp():
    from jaxaccel.model.transformer import count_params, param_shapes

    assert count_params(param_shapes(DUO)) == DUO.num_params()
    routed = replace(DUO, duo=DuoConfig(enabled=True, router=True))  # each layer's router counted too
    assert count_params(param_shapes(routed)) == routed.num_params() == DUO.num_params() + 2 * (2 * 32 + 2)
    scanned, fused = logical_axes(DUO, "scanned"), logical_axes(DUO, "fused")
    for which in ("big", "small"):
        assert tuple(scanned["layers"]["duo"][which]["up"]["kernel"]) == ("layers", "embed", "mlp")
        assert tuple(scanned["layers"]["duo"][which]["down"]["kernel"]) == ("layers", "mlp", "embed")
        assert tuple(fused["layer_0"]["duo"][which]["gate_up"]["kernel"]) == ("embed", None, "mlp")


def test_per_row_routes_broadcast_over_tokens(duo_params):
    x = tokens(2, 6)
    pattern = jnp.array([[0, 2], [1, 0]])
    a, _ = forward(duo_params, DUO, x, plan=ExecutionPlan(routes=pattern))
    b, _ = forward(duo_params, DUO, x, plan=ExecutionPlan(routes=jnp.broadcast_to(pattern[:, None], (2, 6, 2))))
    np.testing.assert_array_equal(a, b)


def test_random_routes_follow_the_probabilities_and_the_key():
    duo = DuoConfig(enabled=True, p_big=0.3, p_skip=0.2)
    routes = random_routes(duo, jax.random.key(0), (32, 64, 8))
    np.testing.assert_allclose(route_fractions(routes), [0.3, 0.5, 0.2], atol=0.01)
    cfg = replace(DUO, duo=duo)
    key = jax.random.key(9)
    np.testing.assert_array_equal(duo_plan(cfg, (4, 8), key).routes, duo_plan(cfg, (4, 8), key).routes)
    assert not np.array_equal(duo_plan(cfg, (4, 8), key).routes, duo_plan(cfg, (4, 8), jax.random.key(10)).routes)
    assert duo_plan(cfg, (4, 8), None).routes.shape == (4, 8, DUO.n_layers)  # evaluation: a fixed draw


def test_a_duo_model_saves_loads_and_refuses_hf_export(tmp_path, duo_params):
    from jaxaccel.convert.hf import export_hf
    from jaxaccel.model.checkpoint import load_model, save_model

    save_model(tmp_path / "duo", DUO, duo_params)
    config, params, _ = load_model(tmp_path / "duo")
    assert config == DUO
    x = tokens(2, 5)
    r = plan(SMALL, 2, 5)
    np.testing.assert_array_equal(forward(params, config, x, plan=r)[0], forward(duo_params, DUO, x, plan=r)[0])
    with pytest.raises(UnsupportedArchitectureError, match="Duo-LLM models cannot be exported"):
        export_hf(tmp_path / "hf", DUO, duo_params)


# ----------------------------------------------------------------------------- training

MODEL = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 64,
         "duo": {"enabled": True, "p_big": 0.5, "p_skip": 0.2}}


def run_cfg(tmp, mesh=None, steps=8):
    return from_dict(RunConfig, {
        "model": MODEL, "data": {"corpus": "synthetic"},
        "train": {"steps": steps, "batch_size": 8, "seq_len": 32, "log_every": 2, "eval_every": 0,
                  "progress": False, "peak_flops": 1e11},
        "optim": {"lr": 1e-2, "warmup_steps": 2}, "checkpoint": {"every_steps": 4, "keep": 5},
        "mesh": {"data": 1, **(mesh or {})}, "output_dir": str(tmp), "tensorboard": False})


def records(folder):
    return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "mfu")}
            for line in open(Path(folder) / "metrics.jsonl")]


def losses(folder):
    return [r["loss"] for r in records(folder) if "loss" in r]


def test_random_routing_resumes_on_8_devices_to_the_single_device_curve(tmp_path):
    """Routes are drawn per step from the step's key: a run killed after its step-4 checkpoint
    and resumed on a data=2, fsdp=2, tensor=2 mesh (both FFNs sharded like the MLP, routes
    following the batch) reproduces the uninterrupted single-device curve, loss for loss."""
    single = tmp_path / "single"
    train(run_cfg(single))
    resumed = tmp_path / "resumed"
    shutil.copytree(single, resumed)
    shutil.rmtree(resumed / "checkpoints" / "8")  # as if killed after the step-4 checkpoint
    summary = train(run_cfg(resumed, {"data": 2, "fsdp": 2, "tensor": 2}))
    assert summary["resumed_from"] == 4
    want, got = records(single), records(resumed)
    assert [r.get("step") for r in got] == [r.get("step") for r in want]
    np.testing.assert_allclose(losses(resumed), losses(single), rtol=2e-5)
    assert len(losses(single)) == 8 and losses(single)[-1] < losses(single)[0]  # it learns


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("duo,match", [
    ({"enabled": True, "small_ratio": 5}, r"duo.small_ratio \(5\) must divide model.ffn_dim \(64\)"),
    ({"enabled": True, "p_big": 1.5}, r"duo.p_big must be in \[0, 1\], got 1.5"),
    ({"enabled": True, "p_skip": -0.1}, r"duo.p_skip must be in \[0, 1\]"),
    ({"enabled": True, "p_big": 0.7, "p_skip": 0.5}, r"duo.p_big \+ duo.p_skip must be <= 1"),
    ({"enabled": True, "small_ratio": 0}, "duo.small_ratio must be >= 1"),
])
def test_bad_duo_configs_are_one_line_errors(duo, match):
    with pytest.raises(ConfigError, match=match) as e:
        from_dict(ModelConfig, {**{k: v for k, v in MODEL.items() if k != "duo"}, "duo": duo})
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="cannot both be on"):
        from_dict(ModelConfig, {**MODEL, "moe": {"n_experts": 4}})


@pytest.mark.parametrize("routes,match", [
    (np.zeros((2, 5, 3), np.int32), r"routes has shape \[2, 5, 3\]; expected \[batch, T, n_layers\] = \[2, 5, 2\]"),
    (np.zeros((3, 5, 2), np.int32), r"plan.routes has shape \[3, 5, 2\]"),
    (np.full((2, 5, 2), 3, np.int32), r"must be 0 \(big\), 1 \(small\) or 2 \(skip\), got 3"),
    (np.full((2, 2), -1, np.int32), r"got -1"),
    (np.zeros((2, 5, 2), np.float32), "must hold integers"),
])
def test_bad_routes_are_one_line_errors(duo_params, routes, match):
    with pytest.raises(InvalidArgumentError, match=match) as e:
        _forward(duo_params, DUO, tokens(2, 5), plan=ExecutionPlan(routes=routes))
    assert "\n" not in str(e.value)
    check_routes(np.ones((2, 5, 2), np.int32), (2, 5), 2)  # the right shape passes


def test_routes_on_a_dense_model_are_refused(duo_params):
    with pytest.raises(InvalidArgumentError, match="plan.routes needs a Duo-LLM model"):
        _forward(as_dense(duo_params, "big"), ffn_config(DUO, "big"), tokens(1, 4),
                 plan=ExecutionPlan(routes=np.zeros((2,), np.int32)))


def test_presets_load_and_the_cli_rejects_bad_duo_settings(capsys):
    from jaxaccel.config import build
    from jaxaccel.train.__main__ import main as train_main

    cpu = build(RunConfig, ROOT / "configs" / "duo.yaml")
    assert cpu.model.n_layers == 8 and cpu.model.small_ffn_dim * 16 == cpu.model.ffn_dim
    assert cpu.model.num_params() * 2 < 15e6  # bfloat16: small enough to ship
    pod = build(RunConfig, ROOT / "configs" / "pod-duo.yaml")
    assert (pod.model.n_layers, pod.model.d_model, pod.model.ffn_dim, pod.model.small_ffn_dim) == (12, 2560, 10240, 640)
    pod.check_mesh(pod.mesh.sizes(64))  # fsdp 16 x tensor 4 on a 64-chip slice
    for override, message in [("model.duo.small_ratio=5", "duo.small_ratio (5) must divide model.ffn_dim (768)"),
                              ("model.duo.p_big=2", "duo.p_big must be in [0, 1]")]:
        try:
            code = run_cli(train_main, [str(ROOT / "configs" / "duo.yaml"), override])
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert code == 2 and len(lines) == 1 and message in lines[0], err
