"""Sharded inference on 8 fake CPU devices gives the same tokens as one device."""
import jax
import numpy as np
import pytest

import jaxaccel
from conftest import TINY, randomize
from jaxaccel import sharding as shd
from jaxaccel.config import replace
from jaxaccel.errors import ConfigError
from jaxaccel.model.transformer import init_params

PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9], [3, 2]]


def test_eight_devices_are_available():
    assert len(jax.devices()) == 8


@pytest.mark.parametrize("n_kv_heads", [4, 2])  # 4: fused q/k/v split by KV head; 2: tensor=4 cannot, unfused
def test_mesh_tensor4_data2_gives_single_device_tokens(tmp_path, n_kv_heads):
    cfg = replace(TINY, n_kv_heads=n_kv_heads, d_model=64, ffn_dim=96)
    params = randomize(init_params(cfg, jax.random.key(2), "unrolled"))
    folder = jaxaccel.from_params(cfg, params).save(tmp_path / "m")
    single = jaxaccel.load(folder)
    sharded = jaxaccel.load(folder, mesh="tensor=4,data=2")
    ref = single.generate(PROMPTS, max_new_tokens=16)
    out = sharded.generate(PROMPTS, max_new_tokens=16)
    assert out.tokens == ref.tokens
    sampled_ref = single.generate(PROMPTS, max_new_tokens=16, temperature=1.0, seed=7)
    sampled = sharded.generate(PROMPTS, max_new_tokens=16, temperature=1.0, seed=7)
    assert sampled.tokens == sampled_ref.tokens
    # Parameters really are split over the tensor axis.
    layer = sharded.params["layer_0"]
    attn_kernel = layer["attn"]["qkv"]["kernel"] if n_kv_heads == 4 else layer["attn"]["q"]["kernel"]
    assert "tensor" in str(attn_kernel.sharding.spec)
    assert len(attn_kernel.sharding.device_set) == 8
    assert "tensor" in str(layer["mlp"]["down"]["kernel"].sharding.spec)


def test_rules_replicate_what_does_not_divide():
    mesh = shd.make_mesh("tensor=4,data=2")
    assert shd.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh) == jax.sharding.PartitionSpec(
        None, None, None)
    assert shd.logical_to_spec(("embed", "heads", "head_dim"), (64, 8, 16), mesh) == jax.sharding.PartitionSpec(
        None, "tensor", None)
    assert shd.logical_to_spec(("batch", "length"), (4, 16), mesh) == jax.sharding.PartitionSpec("data", None)


@pytest.mark.parametrize("spec,match", [
    ("tensor=16", "needs 16 devices but only 8 are available"),
    ("model=2", "mesh axis 'model' is unknown; valid axes: data, fsdp, tensor, expert"),
    ("tensor=two", "size must be an integer"),
    ("tensor", "expected axis=size pairs"),
    ("data=0", "size must be >= 1"),
    ({"tensor": np.float32(2.5)}, "size must be an integer"),  # truncated to 2 before
    ({"tensor": np.float16(1.5)}, "size must be an integer"),
])
def test_bad_mesh_specs(spec, match):
    with pytest.raises(ConfigError, match=match):
        shd.make_mesh(spec)


def test_a_tpu_mesh_of_every_chip_follows_the_physical_layout(monkeypatch):
    """All of a TPU's chips: jax.make_mesh (mesh_utils: ICI neighbours adjacent on an axis),
    not the listed order; a shape it cannot lay out falls back to the listed order. CPU and
    GPU meshes keep the listed order."""
    tpus = [type("FakeTpu", (), {"platform": "tpu", "id": i})() for i in range(8)]
    asked = []

    def physical(shape, names, axis_types=None, *, devices=None):
        asked.append((tuple(shape), tuple(names), devices))
        return "physical mesh"

    monkeypatch.setattr(jax, "make_mesh", physical)
    assert shd.make_mesh("fsdp=4,tensor=2", devices=tpus) == "physical mesh"
    assert asked == [((1, 4, 2, 1), shd.MESH_AXES, tpus)]
    assert shd.make_mesh("tensor=2").devices.ravel().tolist() == jax.devices()[:2]  # CPU: not asked
    assert len(asked) == 1

    def cannot(shape, names, axis_types=None, *, devices=None):
        asked.append("cannot")
        raise ValueError("cannot lay out this shape on the torus")

    monkeypatch.setattr(jax, "make_mesh", cannot)  # falls back to the listed order (real devices, as if TPUs)
    cpus = jax.devices()
    monkeypatch.setattr(type(cpus[0]), "platform", "tpu", raising=False)
    assert shd.make_mesh("fsdp=4,tensor=2", devices=cpus).devices.ravel().tolist() == cpus
    assert asked[-1] == "cannot"  # it was asked, and its refusal fell back


def fake_devices(platform, n, per_group, attr):
    kind = type(f"Fake{platform}", (), {"platform": platform, "device_kind": f"fake {platform}",
                                        "__repr__": lambda self: f"d{self.id}"})
    devices = []
    for i in range(n):
        d = kind()
        d.id, d.process_index, d.coords, d.core_on_chip = i, i // 4, (i, 0, 0), 0
        setattr(d, attr, i // per_group)
        devices.append(d)
    return devices


def test_a_multislice_mesh_puts_the_slices_on_data_parallel_axes():
    """Two TPU slices of four chips: the slices along `data` (else `fsdp`), each slice's share of
    the mesh inside one slice, so that tensor/fsdp collectives never cross the data-center
    network; a mesh that cannot be split so is refused."""
    tpus = fake_devices("tpu", 8, 4, "slice_index")
    slice_of = np.vectorize(lambda d: d.slice_index)
    grid = shd._hybrid_grid(tpus, (2, 1, 4, 1))  # data=2, tensor=4
    assert grid.shape == (2, 1, 4, 1)
    assert (slice_of(grid[0]) == 0).all() and (slice_of(grid[1]) == 1).all()
    grid = shd._hybrid_grid(tpus, (1, 4, 2, 1))  # fsdp=4 over two slices of fsdp=2 x tensor=2
    assert (slice_of(grid[0, :2]) == 0).all() and (slice_of(grid[0, 2:]) == 1).all()
    assert sorted(d.id for d in grid.ravel()) == list(range(8))
    interleaved = fake_devices("tpu", 8, 4, "slice_index")
    for d in interleaved:  # no torus to lay out along, slices listed interleaved: each slice's chips in order
        del d.coords
        d.slice_index = d.id % 2
    assert [d.id for d in shd._hybrid_grid(interleaved, (2, 1, 2, 2)).ravel()] == [0, 2, 4, 6, 1, 3, 5, 7]
    assert [d.id for d in shd._hybrid_grid(interleaved, (1, 4, 2, 1)).ravel()] == [0, 2, 4, 6, 1, 3, 5, 7]
    assert [d.id for d in shd._hybrid_grid(interleaved, (2, 2, 2, 1))[:, 0].ravel()] == [0, 2, 1, 3]
    with pytest.raises(ConfigError, match="span 2 TPU slices.*data x fsdp must split into the 2 slices"):
        shd.make_mesh("tensor=8", devices=tpus)
    sixteen = fake_devices("tpu", 16, 4, "slice_index")  # 4 slices: data=2 x fsdp=2 across them, tensor inside
    grid = shd._hybrid_grid(sixteen, (2, 2, 4, 1))
    assert all(len({d.slice_index for d in grid[i, j].ravel()}) == 1 for i in range(2) for j in range(2))
    assert len({grid[i, j, 0, 0].slice_index for i in range(2) for j in range(2)}) == 4
    assert shd._hybrid_grid(tpus[:4], (2, 1, 2, 1)) is None  # one slice: the usual torus layout
    with pytest.raises(ConfigError, match="takes 4, 2 chips from them: use whole slices"):
        shd._hybrid_grid(tpus[:6], (2, 3, 1, 1))
    # GPU hosts: the same layout by process; a mesh that cannot split keeps the listed order
    gpus = fake_devices("gpu", 8, 4, "process_index")
    grid = shd._hybrid_grid(gpus, (2, 1, 4, 1))
    assert [d.process_index for d in grid[0].ravel()] == [0] * 4
    assert shd._hybrid_grid(gpus, (1, 1, 8, 1)) is None
    assert shd._hybrid_grid(jax.devices(), (2, 1, 4, 1)) is None  # CPU: the listed order


def test_a_batch_shard_spanning_two_hosts_is_refused():
    """Each host feeds its own rows: a tensor group laid over two hosts (4 chips a host,
    tensor=8, or a layout that interleaves hosts) had the hosts supply different rows for
    one shard. A shard on one host passes."""
    from types import SimpleNamespace

    tpus = fake_devices("tpu", 16, 16, "slice_index")  # one slice, 4 hosts of 4 chips

    def mesh(order, shape):
        return SimpleNamespace(devices=np.array([tpus[i] for i in order], dtype=object).reshape(shape),
                               axis_names=shd.MESH_AXES)

    shd.check_batch_shards_on_one_host(mesh(range(16), (4, 1, 4, 1)))  # data=4, tensor=4: one host a shard
    shd.check_batch_shards_on_one_host(mesh(range(16), (2, 2, 1, 4)))  # expert splits the batch too
    with pytest.raises(ConfigError, match=r"batch shard 0's 8 devices \(tensor=8\) on hosts 0, 1;"):
        shd.check_batch_shards_on_one_host(mesh(range(16), (2, 1, 8, 1)))
    interleaved = [4 * (i % 4) + i // 4 for i in range(16)]  # a shard's 4 chips on 4 hosts
    with pytest.raises(ConfigError, match="on hosts 0, 1, 2, 3; .* make tensor=4 at most the devices of one host"):
        shd.check_batch_shards_on_one_host(mesh(interleaved, (1, 4, 4, 1)))


def test_a_mesh_from_jax_make_mesh_decodes():
    """jax.make_mesh gives Explicit axes (JAX 0.10): it was accepted, then generate failed with a
    raw ValueError from with_sharding_constraint. The same devices and names are used as Auto."""
    params = randomize(init_params(TINY, jax.random.key(2), "unrolled"))
    mesh = jax.make_mesh((4, 1, 2, 1), ("data", "fsdp", "tensor", "expert"))
    sharded = jaxaccel.from_params(TINY, params, mesh=mesh)
    assert sharded.generate(PROMPTS, max_new_tokens=6).tokens == \
        jaxaccel.from_params(TINY, params).generate(PROMPTS, max_new_tokens=6).tokens


@pytest.mark.parametrize("mesh,shards", [("tensor=8", 1), ("expert=8", 1), ("data=2,tensor=4", 2), ("data=4", 4)])
def test_the_cache_check_counts_what_one_device_really_holds(monkeypatch, mesh, shards):
    """The check divided the cache by the mesh size, but the cache is split over the batch axes
    and over tensor only where it divides the KV heads (TINY: 2): a device with half the real
    need free passed, and XLA then ran out of memory with a traceback."""
    import jaxaccel.decode.lm as lm_module
    from jaxaccel.errors import InvalidArgumentError

    params = randomize(init_params(TINY, jax.random.key(2), "unrolled"))
    lm = jaxaccel.from_params(TINY, params, mesh=mesh)
    batch, cache_len = 4, 128
    whole = 2 * TINY.n_layers * batch * TINY.n_kv_heads * cache_len * TINY.resolved_head_dim * 4
    per_device = whole // shards
    monkeypatch.setattr(lm_module, "_device_memory", lambda: (per_device - 1, 0))  # an accelerator, 1 byte short
    with pytest.raises(InvalidArgumentError, match="needs .* GB per device"):
        lm._check_cache_fits(batch, cache_len)
    monkeypatch.setattr(lm_module, "_device_memory", lambda: (per_device, 0))
    lm._check_cache_fits(batch, cache_len)
    # CPU: every device's copy lives in the one RAM (a replicated cache: one whole copy per replica)
    need = whole * (lm.mesh.size // shards)
    monkeypatch.setattr(lm_module, "_bytes_resident", lambda params: 0)
    monkeypatch.setattr(lm_module, "_device_memory", lambda: (need - 1, None))
    with pytest.raises(InvalidArgumentError, match="this machine has"):
        lm._check_cache_fits(batch, cache_len)
    monkeypatch.setattr(lm_module, "_device_memory", lambda: (need, None))
    lm._check_cache_fits(batch, cache_len)
