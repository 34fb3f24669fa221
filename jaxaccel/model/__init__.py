"""Llama-family decoder (functional flax.linen)."""
from jaxaccel.model.options import (DENSE, DenseAttention, ExecutionPlan, FlashAttention, LayerOptions, Segments,
                                    TreeKernelAttention)
from jaxaccel.model.transformer import (LayerKV, ModelHandle, build_visibility, forward, init_cache, init_params,
                                        is_scanned, logical_axes, param_shapes, stack_layers, unstack_layers)

__all__ = ["DENSE", "DenseAttention", "ExecutionPlan", "FlashAttention", "LayerOptions", "Segments",
           "TreeKernelAttention", "LayerKV", "ModelHandle", "build_visibility", "forward", "init_cache", "init_params",
           "is_scanned", "logical_axes", "param_shapes", "stack_layers", "unstack_layers"]
