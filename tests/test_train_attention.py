"""Training attention: flash (blockwise, segment-aware) equals the dense reference inside the
real train step, and the step's compiled temporary memory grows linearly with the sequence."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY
from jaxaccel.config import replace
from jaxaccel.train.config import OptimConfig
from jaxaccel.train.step import TrainState, loss_and_metrics, make_optimizer, lr_schedule, train_step
from jaxaccel.model.transformer import init_params


def _batch(t: int, rows: int = 2, seed: int = 0, prefix: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    seg = np.zeros((rows, t), np.int32)
    pos = np.zeros((rows, t), np.int32)
    bid = np.zeros((rows, t), bool)
    for r in range(rows):  # two packed documents, then padding
        a, b = t // 3, (3 * t) // 4
        seg[r, :a], seg[r, a:b] = 1, 2
        pos[r, :a], pos[r, a:b] = np.arange(a), np.arange(b - a)
        if prefix:
            bid[r, :a // 2] = True
    inputs = rng.integers(1, TINY.vocab_size, (rows, t)).astype(np.int32) * (seg > 0)
    targets = np.roll(inputs, -1, axis=1)
    return {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets), "loss_mask": jnp.asarray(seg > 0),
            "segment_ids": jnp.asarray(seg), "positions": jnp.asarray(pos), "bidirectional": jnp.asarray(bid)}


@pytest.mark.parametrize("bidirectional,tiles", [(True, None), (False, None), (True, (8, 16)), (False, (16, 8))])
def test_flash_training_loss_and_grads_equal_dense(bidirectional, tiles, monkeypatch):
    """tiles None: the default 128 x 128, one tile of the 40 tokens; small tiles: many, the
    last ones partial, so the online softmax and the tile skipping run inside the model too."""
    if tiles is not None:
        from jaxaccel.model.options import FlashAttention
        from jaxaccel.train import step

        monkeypatch.setattr(step, "training_attention", lambda name, mesh=None, *a, **k: FlashAttention(
            *tiles, implementation="jnp") if name == "flash" else step.DENSE)
    params = init_params(TINY, jax.random.key(0), "scanned")
    batch = _batch(40, prefix=bidirectional)

    def loss(p, attention):
        return loss_and_metrics(p, TINY, batch, None, dropout=False, remat=False, attention=attention,
                                bidirectional=bidirectional)[0]

    dense_loss, dense_grads = jax.value_and_grad(loss)(params, "dense")
    flash_loss, flash_grads = jax.value_and_grad(loss)(params, "flash")
    np.testing.assert_allclose(flash_loss, dense_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(flash_grads), jax.tree.leaves(dense_grads)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def _step_temp_bytes(t: int, attention: str) -> int:
    cfg = replace(TINY, n_layers=1, max_seq_len=8192)
    optim = OptimConfig()
    optimizer = make_optimizer(optim, 10)
    params = init_params(cfg, jax.random.key(0), "scanned")
    state = TrainState(jnp.int32(0), params, optimizer.init(params), jax.random.key(1))
    fn = functools.partial(train_step, model_cfg=cfg, optimizer=optimizer, schedule=lr_schedule(optim, 10),
                           grad_accum=1, dropout=False, remat=False, attention=attention, bidirectional=False)
    compiled = jax.jit(fn).lower(state, _batch(t, rows=1, prefix=False)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_train_step_memory_grows_linearly_with_flash_attention():
    flash = {t: _step_temp_bytes(t, "flash") for t in (1024, 4096)}
    dense = {t: _step_temp_bytes(t, "dense") for t in (1024, 4096)}
    # 4x the tokens: linear memory grows ~4x (plus fixed costs), quadratic ~16x.
    assert flash[4096] / flash[1024] < 6, flash
    assert dense[4096] / dense[1024] > 10, dense
    assert flash[4096] < dense[4096] / 5, (flash, dense)


def test_activations_carry_their_logical_sharding_on_a_mesh():
    """With a mesh, the residual stream, q/k/v, attention output, MLP hidden and logits are
    pinned by sharding constraints from the rule table; without one, none are emitted."""
    from jaxaccel.model.transformer import forward
    from jaxaccel.sharding import make_mesh

    cfg = replace(TINY, n_layers=2)
    params = init_params(cfg, jax.random.key(0), "scanned")
    x = jnp.zeros((8, 16), jnp.int32)
    mesh = make_mesh("fsdp=4,tensor=2")

    def hlo(mesh):
        return jax.jit(lambda p, t: forward(p, cfg, t, mesh=mesh)[0]).lower(params, x).as_text()

    def constraints(text):  # Shardy or GSPMD spelling
        return [line for line in text.splitlines() if "sharding_constraint" in line or "@Sharding" in line]

    sharded, plain = constraints(hlo(mesh)), constraints(hlo(None))
    assert plain == []
    # the scan body holds one layer: q, k, v, attention output, two residuals, MLP hidden; plus embeddings, logits
    assert len(sharded) >= 9, len(sharded)
    logits = [line for line in sharded if "x97x" in line]
    assert logits and all("fsdp" in line for line in logits)  # [batch, length, vocab]: batch split over fsdp
    heads = [line for line in sharded if "x4x8x" in line]  # q [batch, length, heads, head_dim]
    assert heads and all("tensor" in line for line in heads)


def test_evaluation_accuracy_counts_argmax_hits_not_ties():
    """A collapsed model's flat logits tie every token at the maximum: evaluation counts the
    argmax (token 0) hitting the target, not every target reaching the maximum."""
    from jaxaccel.train.step import eval_step

    params = init_params(TINY, jax.random.key(0), "scanned")
    params = {**params, "lm_head": jax.tree.map(jnp.zeros_like, params["lm_head"])}  # every logit 0
    batch = _batch(24, prefix=False)
    batch["targets"] = batch["targets"].at[0, :4].set(0)  # four targets that the argmax gets right
    m = eval_step(params, batch, model_cfg=TINY, attention="dense", bidirectional=False)
    expected = float(jnp.sum((batch["targets"] == 0) * batch["loss_mask"]))
    assert expected >= 4 and float(m["correct"]) == expected < float(m["tokens"])


def test_splash_is_checked_on_first_use_and_a_wrong_kernel_falls_back(monkeypatch, capsys):
    """On one TPU the trainer picked the splash kernel unchecked: a wrong kernel would train
    silently. It is now compared once per shape with the jnp path, forward and backward (here
    in the Pallas interpreter), and a mismatch falls back to the jnp path with one warning."""
    from jaxaccel.model.options import FlashAttention
    from jaxaccel.pallas_kernels import flash_attention as fa
    from jaxaccel.train import step

    cfg = replace(TINY, n_heads=2, n_kv_heads=1, d_model=16)

    def while_traced():  # as the trainer calls it: from loss_and_metrics, inside the jitted step
        chosen = []
        jax.jit(lambda x: chosen.append(step.training_attention("flash", None, cfg, 128, interpret=True)) or x)(1.0)
        return chosen[0]

    step._splash_checked.cache_clear()
    assert while_traced() == FlashAttention()  # (a check run in the trace failed on tracers, always)
    assert "warning" not in capsys.readouterr().err
    real = fa._splash_attention
    step._splash_checked.cache_clear()
    monkeypatch.setattr(fa, "_splash_attention", lambda *a, **k: real(*a, **k) + 1e-2)
    policy = while_traced()
    assert policy == FlashAttention(implementation="jnp")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the splash kernel check failed (the kernel differs from the reference" in err
    step._splash_checked.cache_clear()
    # on a CPU (no interpret) no check runs and flash attention keeps its own choice (the jnp path)
    assert step.training_attention("flash", None, cfg, 128) == FlashAttention()
