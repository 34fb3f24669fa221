"""Routed experts: exact equivalence to the dense MLP with one expert, capacity and priority
rules, the auxiliary losses' defining values, and dropless decoding."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxaccel
from conftest import TINY, jit_forward as forward, randomize, reference_greedy
from jaxaccel.config import MoeConfig, replace
from jaxaccel.model.moe import expert_capacity, route
from jaxaccel.model.transformer import init_params, stack_layers, unstack_layers

MOE = replace(TINY, n_layers=4, moe=MoeConfig(n_experts=4, top_k=2, every=2, capacity_factor=1.0))


def tokens(b, t, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, TINY.vocab_size)


def test_one_expert_moe_equals_the_dense_model_exactly(tiny_params):
    one = replace(TINY, moe=MoeConfig(n_experts=1, top_k=1))
    params = {k: v for k, v in tiny_params.items()}
    for i in range(TINY.n_layers):
        layer = dict(tiny_params[f"layer_{i}"])
        mlp = layer.pop("mlp")
        layer["moe"] = {"router": jnp.zeros((TINY.d_model, 1)), "gate": mlp["gate"]["kernel"][None],
                        "up": mlp["up"]["kernel"][None], "down": mlp["down"]["kernel"][None]}
        params[f"layer_{i}"] = layer
    x = tokens(3, 12)
    for deterministic in (True, False):
        dense, _ = forward(tiny_params, TINY, x, deterministic=deterministic, dropout_rng=jax.random.key(0))
        sparse, _ = forward(params, one, x, deterministic=deterministic, dropout_rng=jax.random.key(0))
        np.testing.assert_array_equal(np.asarray(sparse), np.asarray(dense))


def test_capacity_and_priority():
    # 6 tokens, 2 experts, top-1: everyone wants expert 0; capacity 2 keeps the first two.
    logits = jnp.array([[[5.0, 0.0]] * 6])
    cap = expert_capacity(6, 2, 1, 2 / 3)
    assert cap == 2
    dispatch, combine, stats = route(logits, 1, cap, normalize=True)
    assert dispatch.shape == (1, 6, 2, 2)
    served = np.asarray(dispatch.sum(axis=(2, 3)))[0]
    np.testing.assert_array_equal(served, [1, 1, 0, 0, 0, 0])
    assert float(stats["dropped"]) == pytest.approx(4 / 6)
    # top-2, priority "rank" (GShard): every token's first choice is served before any second choice.
    logits = jnp.array([[[3.0, 2.0, 0.0], [3.0, 2.0, 0.0], [2.0, 3.0, 0.0]]])
    dispatch, combine, _ = route(logits, 2, 2, normalize=True, priority="rank")
    d = np.asarray(dispatch)[0]  # [token, expert, slot]
    assert d[:, 0].sum() == 2 and d[:, 1].sum() == 2  # capacity 2 each
    assert d[2, 1].sum() == 1  # token 2's first choice (expert 1) beats tokens 0/1's second choices
    # Expert 1's remaining slot goes to token 0 (earlier), so token 1 loses its second choice.
    first_gate = float(jax.nn.softmax(jnp.array([3.0, 2.0]))[0])
    np.testing.assert_allclose(np.asarray(combine).sum(axis=(2, 3))[0][:2], [1.0, first_gate], rtol=1e-6)
    # top-2, priority "token" (the default, causal): tokens 0 and 1 take both experts' slots,
    # token 2 (the latest) loses both of its choices.
    dispatch, combine, _ = route(logits, 2, 2, normalize=True)
    d = np.asarray(dispatch)[0]
    np.testing.assert_array_equal(d.sum(axis=(1, 2)), [2, 2, 0])
    np.testing.assert_allclose(np.asarray(combine).sum(axis=(2, 3))[0], [1.0, 1.0, 0.0], rtol=1e-6)


@pytest.mark.parametrize("priority,causal", [("token", True), ("rank", False)])
def test_token_priority_keeps_a_capacity_bound_forward_causal(priority, causal):
    """With capacity binding (this config's training factor 1.0), a token's output under
    "token" priority depends on earlier tokens only: changing later tokens leaves earlier
    logits alone; under "rank" a later token's first choice can take an earlier token's slot."""
    from jaxaccel.model.transformer import forward as raw_forward

    cfg = replace(MOE, init_std=0.3, moe=replace(MOE.moe, every=1, priority=priority))
    params = init_params(cfg, jax.random.key(0), "unrolled")
    x = tokens(16, 16, seed=1)
    y = x.at[:, 10:].set((x[:, 10:] + 7) % cfg.vocab_size)
    run = jax.jit(lambda t: raw_forward(params, cfg, t, moe_training=True)[0])
    same = np.allclose(np.asarray(run(x))[:, :10], np.asarray(run(y))[:, :10], atol=1e-6)
    assert same == causal


def test_tokens_a_plan_leaves_inactive_take_no_expert_slot():
    """A token that passes through a layer (ExecutionPlan.active off: SkipDecode's fine-tune)
    is routed like padding: under binding capacity and "rank" priority its choices would
    otherwise take active tokens' slots (and count in the load-balancing loss)."""
    from jaxaccel.model.options import ExecutionPlan
    from jaxaccel.model.transformer import forward as raw_forward

    cfg = replace(MOE, init_std=0.3, moe=replace(MOE.moe, every=1, priority="rank"))
    params = init_params(cfg, jax.random.key(0), "unrolled")
    x = tokens(16, 16, seed=1)
    y = x.at[:, 10:].set((x[:, 10:] + 7) % cfg.vocab_size)
    active = jnp.broadcast_to((jnp.arange(16) < 10)[None, :, None], (16, 16, cfg.n_layers))
    run = jax.jit(lambda t: raw_forward(params, cfg, t, moe_training=True, plan=ExecutionPlan(active=active))[0])
    np.testing.assert_allclose(np.asarray(run(x))[:, :10], np.asarray(run(y))[:, :10], atol=1e-6)


def test_padding_takes_no_expert_slot():
    logits = jnp.array([[[5.0, 0.0]] * 4])
    mask = jnp.array([[False, False, True, True]])
    dispatch, _, stats = route(logits, 1, 2, normalize=True, token_mask=mask)
    np.testing.assert_array_equal(np.asarray(dispatch.sum(axis=(2, 3)))[0], [0, 0, 1, 1])
    assert float(stats["dropped"]) == 0.0 and float(stats["expert_load"][0]) == 1.0


def test_aux_losses_take_their_defining_values():
    e = 4
    logits = jnp.zeros((2, 8, e))  # uniform router: P_e = 1/E, so load balance = sum_e f_e = 1
    _, _, stats = route(logits, 2, 8, normalize=True)
    assert float(stats["load_balance"]) == pytest.approx(1.0)
    assert float(stats["router_z"]) == pytest.approx(np.log(e) ** 2)
    np.testing.assert_allclose(float(stats["expert_load"].sum()), 1.0, rtol=1e-6)


@pytest.fixture(scope="module")
def moe_params():
    return randomize(init_params(MOE, jax.random.key(4), "unrolled"), scale=0.2)


def test_scanned_blocks_equal_unrolled_layers(moe_params):
    x = tokens(2, 16, seed=1)
    scanned = stack_layers(moe_params, MOE)
    assert set(scanned["layers"]) == {"layer_0", "layer_1"} and "moe" in scanned["layers"]["layer_1"]
    from jaxaccel.model.transformer import forward as eager_forward

    # moe_training: the training capacity factor (1.0), under which some tokens drop.
    run = jax.jit(lambda p: eager_forward(p, MOE, x, return_aux=True, moe_training=True))
    la, _, aux_a = run(moe_params)
    lb, _, aux_b = run(scanned)
    np.testing.assert_allclose(la, lb, atol=1e-5)
    for k in aux_a:
        np.testing.assert_allclose(aux_a[k], aux_b[k], rtol=1e-5, atol=1e-7)
    assert 0 < float(aux_a["dropped"]) < 1  # capacity factor 1.0 with 16 tokens drops some
    back = unstack_layers(scanned, MOE)
    assert jax.tree.all(jax.tree.map(lambda p, q: bool(jnp.array_equal(p, q)), back, moe_params))


def test_router_gets_gradients(moe_params):
    from jaxaccel.model.transformer import forward as eager_forward

    x = tokens(2, 8, seed=2)

    def loss(p):
        logits, _, aux = eager_forward(p, MOE, x, return_aux=True)
        return jnp.mean(logits ** 2) + 0.01 * aux["load_balance"]

    g = jax.jit(jax.grad(loss))(moe_params)
    assert float(jnp.abs(g["layer_1"]["moe"]["router"]).sum()) > 0
    assert float(jnp.abs(g["layer_1"]["moe"]["gate"]).sum()) > 0


def test_moe_decoding_is_dropless_and_matches_full_recompute(moe_params):
    lm = jaxaccel.from_params(MOE, moe_params, eos_token_ids=())
    prompts = [[5, 17, 33, 2, 9], [1, 2, 3], [40] * 11]
    out = lm.generate(prompts, max_new_tokens=10)
    # The reference recomputes full sequences without a cache through lm.logits, dropless too.
    for p, got in zip(prompts, out.tokens):
        assert got == reference_greedy(lm, p, 10)
    assert lm.generate([prompts[0]], max_new_tokens=10).tokens[0] == out.tokens[0]
    # on an expert-parallel mesh: the batch (bucketed to the 8 ways data x expert split it)
    # over both, the experts' tokens moved by all-to-all, the same tokens
    sharded = jaxaccel.from_params(MOE, moe_params, eos_token_ids=(), mesh="data=2,expert=4")
    assert sharded.generate(prompts, max_new_tokens=10).tokens == out.tokens


def test_lm_logits_of_an_moe_model_drop_nothing_as_decoding_does(moe_params):
    """A capacity that binds in uncached forwards (eval factor 0.5: 4 slots per expert for 16
    tokens, top-2 of 4 experts) drops assignments there; `lm.logits` serves them all."""
    bound = replace(MOE, moe=replace(MOE.moe, eval_capacity_factor=0.5))
    dropless = replace(MOE, moe=replace(MOE.moe, eval_capacity_factor=None))
    x = np.asarray(tokens(2, 16, seed=3))
    from jaxaccel.model.transformer import forward as eager_forward

    want = jax.jit(lambda p: eager_forward(p, dropless, x)[0])(moe_params)
    capped, _, aux = jax.jit(lambda p: eager_forward(p, bound, x, return_aux=True))(moe_params)
    assert float(aux["dropped"]) > 0.1 and not np.allclose(capped, want, atol=1e-3)
    lm = jaxaccel.from_params(bound, moe_params, eos_token_ids=())
    np.testing.assert_allclose(lm.logits(x), want, atol=1e-5)
    first = lm.generate([list(r) for r in x], max_new_tokens=1).tokens
    assert [f[0] for f in first] == np.argmax(want[:, -1], -1).tolist()


def test_moe_cannot_be_exported_to_hf(moe_params, tmp_path):
    with pytest.raises(jaxaccel.UnsupportedArchitectureError, match="MoE models cannot be exported"):
        jaxaccel.from_params(MOE, moe_params).export_hf(tmp_path)


def test_accumulated_steps_report_the_whole_batchs_routing_statistics(moe_params):
    """Routing is per row, so micro-batching changes no routing decision: the logged expert load
    and dropped share of a step are the whole batch's, weighted by tokens, even when padding
    (the last batch's filler rows) leaves whole micro-batches empty."""
    import optax

    from jaxaccel.train.step import TrainState, train_step

    rows, t = 8, 16
    x = np.asarray(tokens(rows, t + 1, seed=5))
    segments = np.ones((rows, t), np.int32)
    segments[1, 11:] = 0  # a padded tail
    segments[2:] = 0  # six empty rows: micro-batches of 4 take rows i::4, so two are all padding
    batch = {"inputs": jnp.asarray(x[:, :-1] * segments), "targets": jnp.asarray(x[:, 1:] * segments),
             "loss_mask": jnp.asarray(segments, jnp.float32), "segment_ids": jnp.asarray(segments),
             "positions": jnp.broadcast_to(jnp.arange(t), (rows, t)), "bidirectional": jnp.zeros((rows, t), bool)}
    opt = optax.sgd(0.0)
    state = TrainState(jnp.int32(0), stack_layers(moe_params, MOE), opt.init(stack_layers(moe_params, MOE)),
                       jax.random.key(0))
    out = {accum: jax.jit(lambda s, b, n=accum: train_step(
        s, b, model_cfg=MOE, optimizer=opt, schedule=optax.constant_schedule(0.0), grad_accum=n, dropout=False,
        remat=False, attention="dense", bidirectional=False))(state, batch)[1] for accum in (1, 2, 4)}
    assert 0 < float(out[1]["moe_dropped"]) < 1
    np.testing.assert_allclose(float(np.sum(out[1]["moe_expert_load"])), 1.0, rtol=1e-6)
    for accum in (2, 4):
        assert float(out[accum]["loss"]) == pytest.approx(float(out[1]["loss"]), rel=1e-6)
        for key in ("moe_dropped", "moe_expert_load", "moe_router_z"):
            np.testing.assert_allclose(out[accum][key], out[1][key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_top_k_by_argmax_equals_lax_top_k_with_ties_and_gradients():
    from jaxaccel.model.moe import top_k_by_argmax

    x = jax.random.uniform(jax.random.key(5), (3, 7, 8))
    x = x.at[0, 0].set(jnp.asarray([0.5, 0.9, 0.9, 0.1, 0.9, 0.2, 0.3, 0.4]))  # a three-way tie for first
    x = jnp.round(x * 4) / 4  # many more ties
    for k in (1, 2, 3, 8):
        want, got = jax.lax.top_k(x, k), top_k_by_argmax(x, k)
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
        assert got[1].dtype == want[1].dtype

        def loss(fn, x):
            values, _ = fn(x, k)
            return jnp.sum(values * jnp.arange(1.0, k + 1))

        np.testing.assert_array_equal(np.asarray(jax.grad(lambda x: loss(top_k_by_argmax, x))(x)),
                                      np.asarray(jax.grad(lambda x: loss(jax.lax.top_k, x))(x)))


def compiled_moe_step(mesh_spec: dict):
    """The training step of a small MoE model compiled for an 8-device mesh: (FLOPs per
    device, the optimized HLO text)."""
    import functools

    from jaxaccel.config import from_dict
    from jaxaccel.train.config import RunConfig
    from jaxaccel.train.loop import build_mesh
    from jaxaccel.train.state import batch_sharding, state_shardings
    from jaxaccel.train.step import lr_schedule, make_optimizer, train_step

    model = {"vocab_size": 128, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128,
             "moe": {"n_experts": 8, "top_k": 2, "every": 2}}
    cfg = from_dict(RunConfig, {"model": model, "data": {"corpus": "synthetic"},
                                "train": {"steps": 1, "batch_size": 16, "seq_len": 64},
                                "mesh": {"data": 1, **mesh_spec},
                                "output_dir": "unused", "tensorboard": False})
    mesh = build_mesh(cfg)
    optimizer = make_optimizer(cfg.optim, 10)
    state, shardings = state_shardings(cfg.model, optimizer, mesh)
    rows = batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((16, 64), jnp.int32, sharding=rows)
             for k in ("inputs", "targets", "positions", "segment_ids")}
    batch["loss_mask"] = jax.ShapeDtypeStruct((16, 64), jnp.float32, sharding=rows)
    step = functools.partial(train_step, model_cfg=cfg.model, optimizer=optimizer, schedule=lr_schedule(cfg.optim, 10),
                             grad_accum=1, dropout=False, remat=False, bidirectional=False, mesh=mesh)
    compiled = jax.jit(step, in_shardings=(shardings, rows), out_shardings=(shardings, None)).lower(
        state, batch).compile()
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"], compiled.as_text()


def test_the_expert_axis_splits_the_batch_and_moves_tokens_with_all_to_alls():
    """GShard's expert parallelism: on data=2 x expert=4 the batch was split over data alone,
    so the four devices of an expert group ran the same attention and routing for the same
    rows (2.2x the FLOPs per device of data=8 on this model). Now the batch is split over
    expert too, each expert layer's tokens go to their experts' devices and back by
    all-to-all, and nothing gathers a whole batch (the router's top_k did)."""
    import re

    flat, _ = compiled_moe_step({"data": 8})
    experts, text = compiled_moe_step({"data": 2, "expert": 4})
    assert experts < 1.05 * flat
    assert len(re.findall(r"\ball-to-all(-start)?\(", text)) >= 4  # one each way, forward and backward
    assert not re.findall(r"\ball-gather(-start)?\(", text)


def test_fsdp_meshes_compile_without_replicating_a_batch():
    """The embedding lookup's gradient (a scatter-add into the fsdp-split table) made XLA
    replicate the batch-split rows on every device first, which it says on stderr as an
    "Involuntary full rematerialization" (data x fsdp and fsdp x expert meshes). In a
    subprocess: the tests silence XLA's warnings (TF_CPP_MIN_LOG_LEVEL=3)."""
    import subprocess
    import sys
    from pathlib import Path

    script = ("import jax\n"
              "jax.config.update('jax_num_cpu_devices', 8)\n"
              "from test_moe import compiled_moe_step\n"
              "for mesh in ({'data': 2, 'fsdp': 4}, {'fsdp': 2, 'expert': 4}):\n"
              "    compiled_moe_step(mesh)\n"
              "print('compiled')\n")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0", "JAXACCEL_COMPILE_CACHE": "off"}
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "compiled", done.stderr[-2000:]
    assert "Involuntary full rematerialization" not in done.stderr, done.stderr[-2000:]


def test_only_an_uncached_forward_gathers_the_embedding_table():
    """The gathered table is for the lookup's gradient: decoding (a cached forward) on an
    fsdp mesh gathered the whole [vocab, d_model] table at every generated token."""
    import re

    from jaxaccel import sharding as shd
    from jaxaccel.config import ModelConfig
    from jaxaccel.model.transformer import forward, init_cache, init_params

    cfg = ModelConfig(vocab_size=128, d_model=64, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=128, max_seq_len=32)
    mesh = shd.make_mesh({"data": 1, "fsdp": 8, "tensor": 1, "expert": 1})
    params = init_params(cfg, jax.random.key(0), "unrolled")
    tokens = jnp.zeros((8, 4), jnp.int32)
    uncached = jax.jit(lambda p, t: forward(p, cfg, t, mesh=mesh)[0]).lower(params, tokens).as_text()
    cached = jax.jit(lambda p, t, c: forward(p, cfg, t, cache=c, write_slots=jnp.zeros((8, 4), jnp.int32),
                                             prefix_len=jnp.zeros((8,), jnp.int32),
                                             mesh=mesh)[0]).lower(params, tokens, init_cache(cfg, 8, 32)).as_text()
    whole = r"sdy.sharding_constraint %\S+ <@mesh, \[\{\}, \{\}\]> : tensor<128x64xf32>"  # the table, unsplit
    assert len(re.findall(whole, uncached)) == 1
    assert not re.findall(whole, cached)
