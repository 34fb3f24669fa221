"""The one forward: every use (training, prefill, steps, trees, SkipDecode) agrees with a
plain full-sequence forward in float32."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY, jit_forward as forward, randomize
from jaxaccel.config import RopeScaling, replace
from jaxaccel.model.layers import rope_inv_freq
from jaxaccel.model.options import ExecutionPlan
from jaxaccel.model.transformer import (canonical_params, fuse_layers, init_cache, init_params, is_fused,
                                        logical_axes, param_shapes, stack_layers, unfuse_layers, unstack_layers)

VARIANTS = {
    "gqa2": TINY,
    "mha": replace(TINY, n_kv_heads=4),
    "mqa_bias_tied": replace(TINY, n_kv_heads=1, qkv_bias=True, tie_embeddings=True),
    "window_llama3": replace(TINY, sliding_window=5, rope_theta=500000.0,
                             rope_scaling=RopeScaling(kind="llama3", factor=8.0, original_max_position=16)),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def model(request):
    cfg = VARIANTS[request.param]
    return cfg, randomize(init_params(cfg, jax.random.key(1), "unrolled"))


def tokens(b, t, seed=0, vocab=TINY.vocab_size):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)


def test_layouts_give_the_same_logits(model):
    cfg, params = model
    x = tokens(2, 12)
    ref, _ = forward(params, cfg, x)
    scanned = stack_layers(params, cfg)
    fused = fuse_layers(params, cfg)
    assert is_fused(fused) and not is_fused(params)
    np.testing.assert_allclose(forward(scanned, cfg, x)[0], ref, atol=1e-5)
    np.testing.assert_allclose(forward(fused, cfg, x)[0], ref, atol=1e-5)
    back = canonical_params(fused, cfg)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), back, params))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                                     unstack_layers(scanned, cfg), params))


def test_cached_prefill_then_steps_equal_full_forward(model):
    cfg, params = model
    x = tokens(2, 14, seed=3)
    ref, _ = forward(params, cfg, x)
    cache = init_cache(cfg, 2, 32)
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    logits, cache = forward(params, cfg, x[:, :9], pos, cache=cache, write_slots=pos, prefix_len=jnp.zeros(2, jnp.int32))
    np.testing.assert_allclose(logits, ref[:, :9], atol=1e-5)
    for t in range(9, 14):
        pos = jnp.full((2, 1), t)
        logits, cache = forward(params, cfg, x[:, t:t + 1], pos, cache=cache, write_slots=pos,
                                prefix_len=jnp.full((2,), t))
        np.testing.assert_allclose(logits[:, 0], ref[:, t], atol=1e-5)


def test_a_cached_call_without_positions_continues_each_rows_prefix(model):
    """positions=None on a cached call rotated the new tokens at 0..T-1 (logits off by ~39, no
    error); it now means prefix_len + 0..T-1, as the engine passes them."""
    cfg, params = model
    x = tokens(2, 7, seed=4)
    ref, _ = forward(params, cfg, x)
    cache = init_cache(cfg, 2, 16)
    pos = jnp.broadcast_to(jnp.arange(4), (2, 4))
    _, cache = forward(params, cfg, x[:, :4], cache=cache, write_slots=pos, prefix_len=jnp.zeros(2, jnp.int32))
    logits, _ = forward(params, cfg, x[:, 4:], cache=cache, write_slots=pos[:, :3] + 4, prefix_len=jnp.full((2,), 4))
    np.testing.assert_allclose(logits, ref[:, 4:], atol=1e-5)


def test_moe_statistics_with_skipped_layers_are_refused():
    """A skipped MoE layer has no statistics: with a traced layer_on the cond's branches did not
    match (a TypeError deep in flax), with a static one the averages were diluted."""
    from jaxaccel.config import MoeConfig
    from jaxaccel.model.transformer import forward as plain_forward

    cfg = replace(TINY, n_layers=2, moe=MoeConfig(n_experts=2, top_k=1))
    params = init_params(cfg, jax.random.key(0), "unrolled")
    with pytest.raises(ValueError, match="return_aux with plan.layer_on is not supported on an MoE or Duo model"):
        plain_forward(params, cfg, tokens(1, 4), plan=ExecutionPlan(layer_on=(True, False)), return_aux=True)
    # a Duo model's per-layer statistics too: a skipped layer recorded none, so the later layers'
    # values moved down one index (static layer_on) or the cond failed (traced)
    from jaxaccel.config import DuoConfig

    duo = replace(TINY, n_layers=2, duo=DuoConfig(enabled=True))
    params = init_params(duo, jax.random.key(0), "unrolled")
    with pytest.raises(ValueError, match="not supported on an MoE or Duo model"):
        plain_forward(params, duo, tokens(1, 4), plan=ExecutionPlan(layer_on=(True, False)), return_aux=True)


def test_ragged_rows_share_one_cached_forward(model):
    """Rows at different lengths in one call: each row only sees its own prefix."""
    cfg, params = model
    x = tokens(2, 10, seed=5)
    lens = jnp.array([4, 7])
    cache = init_cache(cfg, 2, 16)
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    slots = jnp.where(pos < lens[:, None], pos, -1)  # padding writes nothing
    _, cache = forward(params, cfg, x, pos, cache=cache, write_slots=slots, prefix_len=jnp.zeros(2, jnp.int32))
    step = x[:, 9:10]
    logits, _ = forward(params, cfg, step, lens[:, None], cache=cache, write_slots=lens[:, None], prefix_len=lens)
    for b in range(2):
        seq = jnp.concatenate([x[b, :int(lens[b])], step[b]])[None]
        np.testing.assert_allclose(logits[b, 0], forward(params, cfg, seq)[0][0, -1], atol=1e-5)


def test_tree_mask_forward_equals_each_path(model):
    """A token tree verified in one forward (ancestor mask, positions = prefix + depth) gives
    every node the logits of its own root-to-node path."""
    cfg, params = model
    prefix = tokens(1, 6, seed=7)
    #        0
    #      /   \
    #     1     2
    #    / \     \
    #   3   4     5
    parents = [-1, 0, 0, 1, 1, 2]
    depth = [0, 1, 1, 2, 2, 2]
    node_tokens = tokens(1, 6, seed=8)
    anc = np.zeros((6, 6), bool)
    for i in range(6):
        j = i
        while j >= 0:
            anc[i, j] = True
            j = parents[j]
    cache = init_cache(cfg, 1, 32)
    pos = jnp.arange(6)[None]
    _, cache = forward(params, cfg, prefix, pos, cache=cache, write_slots=pos, prefix_len=jnp.zeros(1, jnp.int32))
    tree_pos = 6 + jnp.array(depth)[None]
    logits, _ = forward(params, cfg, node_tokens, tree_pos, cache=cache, write_slots=6 + jnp.arange(6)[None],
                        prefix_len=jnp.array([6]), new_mask=jnp.asarray(anc)[None])
    for i in range(6):
        path = [j for j in range(6) if anc[i, j]]
        seq = jnp.concatenate([prefix[0], node_tokens[0, jnp.array(path)]])[None]
        np.testing.assert_allclose(logits[0, i], forward(params, cfg, seq)[0][0, -1], atol=1e-5)


def test_inactive_layers_pass_rows_through(tiny_params):
    cfg = TINY
    x = tokens(2, 5)
    ref, _ = forward(tiny_params, cfg, x)
    all_on, _ = forward(tiny_params, cfg, x, plan=ExecutionPlan(active=jnp.ones((2, cfg.n_layers), bool)))
    np.testing.assert_allclose(all_on, ref, atol=1e-6)
    # Row 1 skips layer 0: equal to a model whose layer 0 is the identity.
    active = jnp.array([[True, True], [False, True]])
    mixed, _ = forward(tiny_params, cfg, x, plan=ExecutionPlan(active=active))
    np.testing.assert_allclose(mixed[0], ref[0], atol=1e-6)
    assert np.abs(mixed[1] - ref[1]).max() > 1e-3
    one_layer = replace(cfg, n_layers=1)
    p1 = {k: v for k, v in tiny_params.items() if not k.startswith("layer_")}
    p1["layer_0"] = tiny_params["layer_1"]
    np.testing.assert_allclose(mixed[1], forward(p1, one_layer, x[1:])[0][0], atol=1e-5)


def test_dropout_is_off_at_inference_and_on_in_training(tiny_params):
    cfg = replace(TINY, dropout={"embed": 0.1, "attention": 0.1, "mlp": 0.1})
    x = tokens(2, 8)
    a, _ = forward(tiny_params, cfg, x)
    b, _ = forward(tiny_params, TINY, x)
    np.testing.assert_array_equal(a, b)
    c, _ = forward(tiny_params, cfg, x, deterministic=False, dropout_rng=jax.random.key(0))
    d, _ = forward(tiny_params, cfg, x, deterministic=False, dropout_rng=jax.random.key(1))
    assert np.abs(c - a).max() > 1e-3 and np.abs(c - d).max() > 1e-3


def test_droppath_drops_whole_residual_branches_per_example(tiny_params):
    """With DropPath p, an example whose two branches of a layer are both dropped (probability
    p^2 per layer) leaves that layer exactly as the identity: with one layer, its logits equal
    those of the plan that skips the layer. Off at inference."""
    cfg = replace(TINY, n_layers=1, dropout={"path": 0.8})
    params = init_params(cfg, jax.random.key(5), "unrolled")
    x = tokens(64, 6)
    np.testing.assert_array_equal(forward(params, cfg, x)[0], forward(params, replace(cfg, dropout={}), x)[0])
    train, _ = forward(params, cfg, x, deterministic=False, dropout_rng=jax.random.key(0))
    skipped, _ = forward(params, cfg, x, plan=ExecutionPlan(active=np.zeros((64, 1), bool)))
    full, _ = forward(params, cfg, x)
    same = np.all(np.isclose(np.asarray(train), np.asarray(skipped), atol=1e-6), axis=(1, 2))
    assert 0.45 < same.mean() < 0.85  # expected 0.64; a per-token mask would almost never match a whole row
    assert not np.any(np.all(np.isclose(np.asarray(train), np.asarray(full), atol=1e-6), axis=(1, 2)))  # scaled


def test_bfloat16_params_run_and_stay_close(tiny_params):
    cfg16 = replace(TINY, param_dtype="bfloat16", dtype="bfloat16")
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tiny_params)
    x = tokens(2, 8)
    lo, _ = forward(p16, cfg16, x)
    hi, _ = forward(tiny_params, TINY, x)
    assert lo.dtype == jnp.float32
    assert np.abs(np.asarray(lo) - np.asarray(hi)).max() < 0.1 * np.abs(np.asarray(hi)).max()


def test_llama3_rope_scaling_matches_the_published_rule():
    # Llama 3.1: wavelengths below orig/high_freq_factor keep their frequency, above
    # orig/low_freq_factor are divided by `factor`, and the band between is interpolated.
    s = RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)
    base = rope_inv_freq(128, 500000.0, None)
    scaled = rope_inv_freq(128, 500000.0, s)
    wavelen = 2 * np.pi / base
    high = wavelen < 8192 / 4
    low = wavelen > 8192 / 1
    np.testing.assert_allclose(scaled[high], base[high], rtol=1e-6)
    np.testing.assert_allclose(scaled[low], base[low] / 8, rtol=1e-6)
    mid = ~high & ~low
    assert mid.any() and np.all(scaled[mid] < base[mid]) and np.all(scaled[mid] > base[mid] / 8)


def test_logical_axes_cover_every_parameter():
    for layout in ("scanned", "unrolled", "fused"):
        axes = logical_axes(TINY, layout)
        shapes = param_shapes(TINY, layout)
        flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        flat_shapes = jax.tree.leaves(shapes)
        assert len(flat_axes) == len(flat_shapes)
        for a, s in zip(flat_axes, flat_shapes):
            assert len(a) == len(s.shape)
    assert tuple(logical_axes(TINY, "scanned")["layers"]["mlp"]["up"]["kernel"]) == ("layers", "embed", "mlp")


def test_param_count_matches_config():
    for cfg in VARIANTS.values():
        params = init_params(cfg, jax.random.key(0), "unrolled")
        assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()
        assert sum(x.size for x in jax.tree.leaves(unfuse_layers(fuse_layers(params, cfg), cfg))) == cfg.num_params()
