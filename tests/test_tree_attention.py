"""Tree attention: the Pallas kernel (interpret mode on CPU) against the jnp reference."""
import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaccel.errors import InvalidArgumentError
from jaxaccel.pallas_kernels.tree_attention import (_tree_attention_pallas, default_block_k, tree_attention,
                                                    tree_attention_kernel, tree_attention_reference)


def random_tree_mask(rng, t, n_valid):
    """Ancestor mask (incl. self) of a random tree whose parents precede their children;
    nodes >= n_valid are padding and see only themselves."""
    mask = np.zeros((t, t), bool)
    for i in range(t):
        if i < n_valid:
            parent = rng.integers(-1, i)  # -1: a root hanging off the cache prefix
            if parent >= 0:
                mask[i] = mask[parent]
        mask[i, i] = True
    return mask


def make_inputs(seed, b, h, kvh, d, s, t, prefix, *, shared_mask=False, dtype=jnp.float32):
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), dtype)

    q = normal(b, t, h, d)  # unit scale: scores ~ N(0, d), peaky enough to exercise rescaling
    k_new, v_new = normal(b, t, kvh, d), normal(b, t, kvh, d)
    k_cache, v_cache = normal(b, kvh, s, d), normal(b, kvh, s, d)
    n_masks = 1 if shared_mask else b
    mask = np.stack([random_tree_mask(rng, t, int(rng.integers(1, t + 1)) if t > 1 else 1) for _ in range(n_masks)])
    return q, k_new, v_new, jnp.asarray(mask), k_cache, v_cache, jnp.asarray(prefix, jnp.int32)


def assert_close(got, want, tol=1e-5):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)


CASES = [
    # b, heads, kv_heads, head_dim, S, block_k, T, prefix_len per row; every case has several
    # key blocks per row, so the key-block grid axis (and its skipping) is really exercised
    (1, 2, 2, 16, 64, 16, 1, [64]),  # GQA 1, full cache, 4 blocks
    (3, 4, 2, 16, 128, 32, 7, [0, 128, 45]),  # GQA 2: empty, full, ends inside a block
    (3, 4, 1, 16, 256, 32, 5, [256, 1, 130]),  # GQA 4, 8 blocks: 7 resp. 3 skipped
    (2, 8, 2, 16, 96, 32, 9, [77, 32]),  # GQA 4, S not a power of two, prefix on a block edge
]


@pytest.mark.parametrize("b,h,kvh,d,s,block_k,t,prefix", CASES)
def test_kernel_matches_reference(b, h, kvh, d, s, block_k, t, prefix):
    args = make_inputs(len(prefix) * 100 + t, b, h, kvh, d, s, t, prefix)
    got = tree_attention_kernel(*args, block_k=block_k, interpret=True)
    assert got.shape == (b, t, h, d) and got.dtype == jnp.float32
    assert_close(got, tree_attention_reference(*args))


def test_loop_tiling_matches_reference():
    """The GPU (Triton) body -- grid (batch, kv_head), a loop over key blocks -- in the interpreter."""
    args = make_inputs(21, 3, 4, 2, 16, 128, 7, [0, 128, 45])
    got = _tree_attention_pallas(*args, block_k=32, platform="interpret", tiling="loop")
    assert_close(got, tree_attention_reference(*args))


def test_loop_tiling_blocks_the_rows_and_tree_keys_of_a_large_tree():
    """A 65-node tree with 4 query heads per KV group is 260 query rows: the GPU body holds 64
    at a time (5 row blocks, rows padded to 320, not 512) and folds the 128 padded tree keys in
    blocks of 64, so registers and shared memory do not grow with the tree; ragged prefixes,
    one row's mask shared and one not."""
    for shared in (False, True):
        args = make_inputs(23, 2, 8, 2, 16, 64, 65, [37, 64], shared_mask=shared)
        eqn = _pallas_eqn(jax.make_jaxpr(lambda *a: _tree_attention_pallas(
            *a, block_k=16, platform="interpret", tiling="loop"))(*args).jaxpr)
        assert tuple(eqn.params["grid_mapping"].grid) == (2, 2, 5)
        got = _tree_attention_pallas(*args, block_k=16, platform="interpret", tiling="loop")
        assert_close(got, tree_attention_reference(*args))


def test_kernel_shared_mask():
    """tree_mask with a leading dim of 1 is shared by every batch row."""
    args = make_inputs(7, 3, 2, 2, 16, 96, 17, [0, 96, 64], shared_mask=True)
    assert args[3].shape == (1, 17, 17)
    assert_close(tree_attention_kernel(*args, block_k=32, interpret=True), tree_attention_reference(*args))


def test_kernel_bfloat16():
    args = make_inputs(11, 3, 4, 2, 16, 128, 9, [0, 70, 128], dtype=jnp.bfloat16)
    got = tree_attention_kernel(*args, block_k=32, interpret=True)
    assert got.dtype == jnp.bfloat16
    assert_close(got, tree_attention_reference(*args), tol=3e-2)


def test_default_block_k():
    """block_k=None: the largest of 128..8 dividing the cache length (else the whole cache)."""
    assert [default_block_k(s) for s in (4096, 256, 96, 72, 100)] == [128, 128, 32, 8, 100]
    args = make_inputs(17, 2, 2, 1, 16, 96, 3, [50, 96])  # 3 blocks of 32
    assert_close(tree_attention_kernel(*args, interpret=True), tree_attention_reference(*args))


def test_row_with_no_visible_key_is_zero():
    """An empty mask row with prefix 0 sees nothing: the kernel and the reference return 0 there
    (the reference used to average all S + T values: a kernel-vs-reference check on such an
    input would have failed a correct kernel). Every other row still matches the reference."""
    q, k_new, v_new, mask, k_cache, v_cache, _ = make_inputs(5, 2, 2, 1, 16, 64, 4, [0, 0])
    mask = np.array(mask)
    mask[0, 3] = False
    prefix = jnp.asarray([0, 40], jnp.int32)
    args = (q, k_new, v_new, jnp.asarray(mask), k_cache, v_cache, prefix)
    got = np.asarray(tree_attention_kernel(*args, block_k=16, interpret=True))
    want = np.asarray(tree_attention_reference(*args))
    np.testing.assert_array_equal(got[0, 3], 0.0)
    np.testing.assert_array_equal(want[0, 3], 0.0)
    assert_close(got[0, :3], want[0, :3])
    assert_close(got[1], want[1])


def test_public_op_dispatch():
    args = make_inputs(3, 3, 4, 2, 16, 64, 5, [0, 64, 20])
    # On CPU the default is the reference, bit for bit.
    np.testing.assert_array_equal(np.asarray(tree_attention(*args, block_k=32)),
                                  np.asarray(tree_attention_reference(*args)))

    def traced(**kw):
        return str(jax.make_jaxpr(functools.partial(tree_attention, block_k=32, **kw))(*args))

    assert "pallas_call" not in traced()
    assert "pallas_call" not in traced(interpret=True, use_kernel=False)
    assert "pallas_call" in traced(interpret=True)  # interpret=True really runs the kernel
    with mock.patch("jax.default_backend", return_value="tpu"):  # a cache under 8 slots: the reference on TPU
        tiny = make_inputs(3, 1, 4, 2, 16, 4, 3, [4])
        assert "pallas_call" not in str(jax.make_jaxpr(functools.partial(tree_attention, block_k=4))(*tiny))
    assert_close(tree_attention(*args, block_k=32, interpret=True), tree_attention_reference(*args))
    # the reference path checks shapes, and a block_k given, all the same (one line each)
    for bad, words in (({"block_k": 7}, "block_k=7"), ({"block_k": 24}, "divide the cache length 64")):
        with pytest.raises(InvalidArgumentError, match=words):
            tree_attention(*args, **bad)
    with pytest.raises(InvalidArgumentError, match="prefix_len must be"):
        tree_attention(*args[:6], args[6][:2])


@pytest.mark.parametrize("tiling", ["grid", "loop"])
def test_blocks_beyond_prefix_are_skipped(tiling):
    """Cache blocks that start at or after prefix_len are never used: NaN there changes nothing."""
    args = make_inputs(13, 3, 4, 2, 16, 128, 6, [0, 64, 33])
    k_cache, v_cache = np.array(args[4]), np.array(args[5])
    for row, first_unread in enumerate([0, 64, 64]):  # block_k = 32
        k_cache[row, :, first_unread:] = np.nan
        v_cache[row, :, first_unread:] = np.nan
    poisoned = args[:4] + (jnp.asarray(k_cache), jnp.asarray(v_cache), args[6])
    got = _tree_attention_pallas(*poisoned, block_k=32, platform="interpret", tiling=tiling)
    assert_close(got, tree_attention_reference(*args))


def _shapes(b=2, t=3, h=4, kvh=2, d=16, s=96):
    """ShapeDtypeStructs: the checks run before anything is traced."""
    f = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.float32)
    return (f((b, t, h, d)), f((b, t, kvh, d)), f((b, t, kvh, d)), jax.ShapeDtypeStruct((b, t, t), jnp.bool_),
            f((b, kvh, s, d)), f((b, kvh, s, d)), jax.ShapeDtypeStruct((b,), jnp.int32))


@pytest.mark.parametrize("backend,shape,block_k,words", [
    ("cpu", {}, 40, ["block_k=40", "divide the cache length 96"]),
    ("cpu", {}, 0, ["block_k=0", ">= 1"]),
    ("cpu", {}, 12, ["block_k=12", "multiple of 8"]),
    ("cpu", {"s": 0}, None, ["cache length must be >= 1, got 0"]),
    ("cpu", {"h": 3}, 32, ["heads (3)", "kv_heads (2)"]),
    ("gpu", {"d": 24}, 32, ["head_dim=24", "power of two >= 16"]),
    ("gpu", {"d": 8}, 32, ["head_dim=8", "power of two >= 16"]),
    ("gpu", {}, 8, ["block_k=8", "power of two >= 16"]),
    ("gpu", {}, 48, ["block_k=48", "power of two >= 16"]),
    # a 4-slot cache as one block: its bf16 dots fail Mosaic's verifier (lowered for TPU, an audit)
    ("tpu", {"s": 4}, 4, ["block_k=4", "below 8 on TPU"]),
])
def test_constraint_errors(backend, shape, block_k, words):
    """Bad sizes fail up front with one line naming the value and the rule."""
    with mock.patch("jax.default_backend", return_value=backend), pytest.raises(InvalidArgumentError) as err:
        tree_attention_kernel(*_shapes(**shape), block_k=block_k, interpret=backend == "cpu")
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert isinstance(err.value, ValueError)


def _pallas_eqn(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            return eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns") and (found := _pallas_eqn(inner)) is not None:
                return found
    return None


def _long_cache_args(dtype=jnp.float32, t: int = 8):
    b, h, kvh, d, s = 2, 4, 2, 64, 4096
    return (jnp.zeros((b, t, h, d), dtype), jnp.zeros((b, t, kvh, d), dtype), jnp.zeros((b, t, kvh, d), dtype),
            jnp.ones((b, t, t), bool), jnp.zeros((b, kvh, s, d), dtype), jnp.zeros((b, kvh, s, d), dtype),
            jnp.array([10, 3000], jnp.int32))


def test_grid_tiles_the_cache():
    """A 4096-slot cache: grid (batch, kv_head, 4096 / block_k), K and V blocks [block_k, d] (what a
    program holds does not grow with S), the softmax state in 3 scratch buffers."""
    args = _long_cache_args()
    eqn = _pallas_eqn(jax.make_jaxpr(lambda *a: tree_attention_kernel(*a, block_k=128, interpret=True))(*args).jaxpr)
    grid_mapping = eqn.params["grid_mapping"]
    assert tuple(grid_mapping.grid) == (2, 2, 32)
    k_block = grid_mapping.block_mappings[1].block_shape  # [q, k_cache, v_cache, ...] after prefix_len
    assert [getattr(dim, "block_size", None) for dim in k_block][2:] == [128, 64]
    assert grid_mapping.num_scratch_operands == 3


def test_grid_pads_query_rows_to_a_multiple_of_16_not_a_power_of_two():
    """A budget-128 DySpec tree (129 nodes) with 2 query heads per KV head is 258 query rows per
    program: padded to 272 (to 512 before, doubling the VMEM of q, the output and the softmax
    state: 1,032 rows became 2,048 at 8 heads per KV head)."""
    args = _long_cache_args(jnp.bfloat16, 129)
    eqn = _pallas_eqn(jax.make_jaxpr(lambda *a: tree_attention_kernel(*a, block_k=128, interpret=True))(*args).jaxpr)
    q_block = eqn.params["grid_mapping"].block_mappings[0].block_shape
    assert [getattr(dim, "block_size", None) for dim in q_block][2:] == [272, 64]


@pytest.mark.parametrize("platform,backend,marker", [("tpu", "tpu", "tpu_custom_call"), ("cuda", "gpu", "triton")])
@pytest.mark.parametrize("nodes", [8, 129])
def test_kernel_lowers_for_accelerators(platform, backend, marker, nodes):
    """Lowering (no device needed) of a 4096-slot bf16 cache for TPU through Mosaic and for CUDA
    through Triton, a small tree and a DySpec budget-128 one, so an API drift breaks here and
    not first on a pod. Compiling and timing need the hardware."""
    args = _long_cache_args(jnp.bfloat16, nodes)
    with mock.patch("jax.default_backend", return_value=backend):
        text = jax.jit(lambda *a: tree_attention_kernel(*a, block_k=128)).trace(*args).lower(
            lowering_platforms=(platform,)).as_text()
    assert marker in text.lower()
