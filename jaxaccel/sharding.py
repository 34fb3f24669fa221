"""Device meshes and the one table that maps logical axis names to mesh axes.

Every parameter and activation carries logical axis names (`jaxaccel.model.layers`); this
module decides, in `LOGICAL_RULES`, which mesh axis each one is split over. A logical axis
whose size the mesh axis does not divide is replicated instead (e.g. 2 KV heads on a
4-way `tensor` axis), so one rule table serves every model size.

Mesh axes: `data` (batch), `fsdp` (batch + parameter sharding), `tensor` (heads / MLP /
vocab), `expert` (MoE experts, and the batch everywhere else: GShard's expert parallelism,
each expert layer's tokens moved between the two splits by all-to-alls). A mesh over several
TPU slices (multi-slice) or GPU hosts puts the slices on `data` (the rest on `fsdp`), so only
data parallelism crosses the data-center network.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxaccel.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical axis -> mesh axes it may be split over (in order), None = replicated.
LOGICAL_RULES: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("expert_group", ("data", "fsdp")),  # inside an expert layer: the batch, less the expert axis
    ("vocab", ("tensor",)),
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("expert", ("expert",)),
    ("head_dim", None),
    ("layers", None),
    ("length", None),
    ("cache_len", None),
)
_RULES = dict(LOGICAL_RULES)


def parse_mesh_spec(text: str | Mapping[str, int] | None) -> dict[str, int]:
    """"tensor=4,data=2" -> {"data": 2, "fsdp": 1, "tensor": 4, "expert": 1}."""
    sizes = {axis: 1 for axis in MESH_AXES}
    if text is None or text == "":
        return sizes
    items = text.items() if isinstance(text, Mapping) else None
    if items is None:
        items = []
        for part in str(text).split(","):
            if "=" not in part:
                raise ConfigError(f"mesh {text!r}: expected axis=size pairs like tensor=4,data=2")
            name, size = part.split("=", 1)
            items.append((name.strip(), size.strip()))
    seen = set()
    for name, size in items:
        if name not in sizes:
            raise ConfigError(f"mesh axis {name!r} is unknown; valid axes: {', '.join(MESH_AXES)}")
        if name in seen:
            raise ConfigError(f"mesh {text!r} names the axis {name!r} twice")
        seen.add(name)
        if isinstance(size, bool) or isinstance(size, (float, np.floating)) and not float(size).is_integer():
            raise ConfigError(f"mesh axis {name}: size must be an integer, got {size!r}")
        try:
            size = int(size)
        except (TypeError, ValueError):
            raise ConfigError(f"mesh axis {name}: size must be an integer, got {size!r}") from None
        if size < 1:
            raise ConfigError(f"mesh axis {name}: size must be >= 1, got {size}")
        sizes[name] = size
    return sizes


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh with all four axes (unnamed ones have size 1) over the first devices needed.

    Devices of several TPU slices (or GPU hosts) are laid out slice by slice along `data` (what
    `data` cannot take, along `fsdp`; data x fsdp that cannot take them is a ConfigError on TPU),
    each slice along its torus; the chips of one TPU slice follow its torus (jax.make_mesh)."""
    sizes = parse_mesh_spec(spec)
    devices = list(jax.devices() if devices is None else devices)
    need = math.prod(sizes.values())
    if need > len(devices):
        shape = ",".join(f"{k}={v}" for k, v in sizes.items() if v > 1)
        raise ConfigError(f"mesh {shape} needs {need} devices but only {len(devices)} are available")
    shape, types = tuple(sizes[a] for a in MESH_AXES), (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    hybrid = _hybrid_grid(devices[:need], shape)
    if hybrid is not None:
        return Mesh(hybrid, MESH_AXES, axis_types=types)
    if need == len(devices) and devices[0].platform == "tpu":
        # every chip: laid out along the physical torus (jax.make_mesh), so that neighbours on a
        # mesh axis are ICI neighbours; a shape it cannot map falls back to the listed order
        try:
            return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
        except (ValueError, NotImplementedError, AssertionError):
            pass
    grid = np.array(devices[:need], dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=types)


# Mesh axes that may cross the slow network between TPU slices (DCN) or GPU hosts, best first:
# `data` crosses it once per step (the gradient all-reduce), `fsdp` at every layer.
_DCN_AXES = ("data", "fsdp")


def _granules(devices: Sequence[Any]) -> tuple[str, list[list[Any]]] | None:
    """The devices grouped by what the slow network joins: TPU slices (a multi-slice job) or,
    on GPUs, hosts (NVLink inside one, InfiniBand/Ethernet between). None when they are one
    group, or on CPU (no fast network to keep together: the listed order is process-major)."""
    platform = getattr(devices[0], "platform", None)
    attr = {"tpu": "slice_index", "gpu": "process_index"}.get(platform)
    if attr is None or not all(hasattr(d, attr) for d in devices):
        return None
    groups: dict[int, list[Any]] = {}
    for d in devices:
        groups.setdefault(getattr(d, attr), []).append(d)
    return (attr, [groups[k] for k in sorted(groups)]) if len(groups) > 1 else None


def _hybrid_grid(devices: Sequence[Any], shape: tuple[int, ...]) -> np.ndarray | None:
    """The device grid of a mesh whose devices span several TPU slices or GPU hosts: the slices
    are laid out along `data` (what `data` cannot take, along `fsdp`), each slice's share laid out
    inside it (mesh_utils.create_hybrid_device_mesh: along the torus on TPU), so that only data
    parallelism crosses the slow network. None when the devices are one slice/host, or (GPU
    hosts) when neither axis can be split over them: the listed order then."""
    found = _granules(devices)
    if found is None:
        return None
    attr, groups = found
    n = len(groups)
    ici, dcn, left = list(shape), [1] * len(shape), n
    for name in _DCN_AXES:  # as many slices along data as it takes, the rest along fsdp
        axis = MESH_AXES.index(name)
        dcn[axis] = math.gcd(shape[axis], left)
        ici[axis] //= dcn[axis]
        left //= dcn[axis]
    even = len({len(g) for g in groups}) == 1
    if left > 1 or not even:
        if attr == "process_index":
            return None
        what = (f"data x fsdp must split into the {n} slices (data or fsdp a multiple of {n}, or data x fsdp "
                f"one, e.g. data=2,fsdp=2 over 4)" if even else
                f"the mesh takes {', '.join(str(len(g)) for g in groups)} chips from them: use whole slices")
        raise ConfigError(f"the mesh's {len(devices)} devices span {n} TPU slices, which only the data-center "
                          f"network joins: {what}, so that only data parallelism crosses it")
    from jax.experimental import mesh_utils
    for split in (False, True):  # split a physical axis of the torus only if the shape needs it
        try:
            grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, list(devices), allow_split_physical_axes=split,
                                                        process_is_granule=attr == "process_index")
        except (ValueError, NotImplementedError, AssertionError, TypeError, AttributeError):
            continue  # no physical layout for this shape (or these devices)
        if grid.shape == tuple(shape):
            return grid
    # each slice's devices in their listed order
    blocks = np.empty(dcn, dtype=object)
    for i, group in enumerate(groups):
        blocks.flat[i] = np.array(group, dtype=object).reshape(ici)
    return np.block(blocks.tolist())


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for an array with these logical axes and this shape on `mesh`."""
    used: set[str] = set()
    out = []
    for name, dim in zip(axes, shape):
        chosen = []
        for mesh_axis in (_RULES.get(name) or ()) if name is not None else ():
            size = mesh.shape.get(mesh_axis, 1)
            if size == 1 or mesh_axis in used:
                continue
            split = math.prod(mesh.shape[a] for a in chosen) * size
            if dim % split:
                continue  # does not divide: leave this dimension less sharded
            chosen.append(mesh_axis)
        used.update(chosen)
        out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*out)


def named_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def tree_shardings(axes_tree: Any, shapes_tree: Any, mesh: Mesh) -> Any:
    """NamedSharding per leaf, from a tree of logical axes (PartitionSpecs of names) and shapes."""
    return jax.tree.map(lambda shape, axes: named_sharding(tuple(axes), shape.shape, mesh), shapes_tree, axes_tree,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


BATCH_AXES = _RULES["batch"]  # the mesh axes that split the batch: data, fsdp, expert
BATCH_AXES_NAME = "*".join(BATCH_AXES)  # "data*fsdp*expert", as error messages name them


def batch_ways(mesh: Mesh | Mapping[str, int] | None) -> int:
    """The devices a batch is split over (`BATCH_AXES`), from a mesh or its axis sizes; 1
    without a mesh."""
    sizes = {} if mesh is None else mesh.shape if isinstance(mesh, Mesh) else mesh
    return math.prod(sizes.get(axis, 1) for axis in BATCH_AXES)


def check_batch_shards_on_one_host(mesh: Mesh) -> None:
    """Each host feeds its own rows of the global batch (`make_array_from_process_local_data`),
    so the devices that hold one batch shard — along the mesh axes that do not split the
    batch (`tensor`) — must all be on one host: two hosts would each supply different rows
    for the same shard (its replicas disagreeing; not tried on a pod). ConfigError otherwise."""
    grid = np.asarray(mesh.devices, dtype=object)
    names = list(mesh.axis_names)
    batch = [names.index(a) for a in BATCH_AXES]
    shards = np.moveaxis(grid, batch, list(range(len(batch)))).reshape(math.prod(grid.shape[i] for i in batch), -1)
    for i, shard in enumerate(shards):
        hosts = sorted({d.process_index for d in shard})
        if len(hosts) > 1:
            split = ", ".join(f"{n}={grid.shape[j]}" for j, n in enumerate(names)
                              if j not in batch and grid.shape[j] > 1)
            raise ConfigError(f"the mesh puts batch shard {i}'s {len(shard)} devices ({split}) on hosts "
                              f"{', '.join(map(str, hosts))}; each host feeds its own rows, so one shard must sit "
                              f"on one host: make {split} at most the devices of one host, moving the rest to data "
                              f"or fsdp")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_tree(tree: Any, shardings: Any) -> Any:
    """Place host or device arrays onto their shardings."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


def constrain(x: jax.Array, axes: Sequence[str | None], mesh: Mesh | None) -> jax.Array:
    """Pin an activation to the layout its logical axes give on `mesh` (no-op without a mesh),
    so FSDP/tensor layouts inside the model are decided by the rule table, not guessed by the
    compiler (MaxText annotates its activations the same way)."""
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(axes, x.shape, mesh))
