"""Llama-family decoder (functional flax.linen)."""
from jaxaccel.model.transformer import (LayerKV, build_visibility, forward, init_cache, init_params, is_scanned,
                                        logical_axes, param_shapes, stack_layers, unstack_layers)

__all__ = ["LayerKV", "build_visibility", "forward", "init_cache", "init_params", "is_scanned", "logical_axes",
           "param_shapes", "stack_layers", "unstack_layers"]
