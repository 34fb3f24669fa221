"""Training state created directly in its sharding: parameters and optimizer moments carry
logical axis names (flax boxes survive `optimizer.init`), one rule table maps them to the mesh,
and `jax.jit(create, out_shardings=...)` materialises every array on its devices."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxaccel import sharding as shd
from jaxaccel.config import ModelConfig
from jaxaccel.model.transformer import Transformer
from jaxaccel.train.step import TrainState


def _boxed_state(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, seed: int):
    model = Transformer(model_cfg, scanned=True)
    tokens = jnp.zeros((1, 1), jnp.int32)
    init_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
    boxed = model.init({"params": init_key}, tokens, tokens)["params"]
    opt_state = optimizer.init(boxed)
    return TrainState(step=jnp.int32(0), params=boxed, opt_state=opt_state, rng=dropout_key)


def state_shardings(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh, seed: int = 0):
    """(abstract TrainState of ShapeDtypeStructs carrying shardings, tree of shardings)."""
    abstract_boxed = jax.eval_shape(lambda: _boxed_state(model_cfg, optimizer, seed))
    specs = nn.get_partition_spec(abstract_boxed)
    shapes = nn.unbox(abstract_boxed)

    def to_sharding(spec, shape):
        if not isinstance(spec, PartitionSpec):
            spec = PartitionSpec()
        return NamedSharding(mesh, shd.logical_to_spec(tuple(spec) + (None,) * (len(shape.shape) - len(spec)),
                                                       shape.shape, mesh))

    shardings = jax.tree.map(to_sharding, specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return abstract, shardings


def create_state(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, shardings: Any, seed: int):
    return jax.jit(lambda: nn.unbox(_boxed_state(model_cfg, optimizer, seed)), out_shardings=shardings)()


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, shd.logical_to_spec(("batch", "length"), (mesh.size * 8, 8), mesh))


def global_batch(local: dict, sharding: NamedSharding) -> dict:
    """This process's rows -> global arrays (one call works for 1 or many hosts)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
