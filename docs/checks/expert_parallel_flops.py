"""FLOPs per device, collectives and memory of the compiled MoE train step on 8 CPU devices.

    python docs/checks/expert_parallel_flops.py data=8
    python docs/checks/expert_parallel_flops.py data=2,expert=4

XLA's cost and memory analyses of the step `python -m jaxaccel.train` compiles (the trainer's own
shardings), for a 4-layer, d_model 128, 8-expert top-2 model at batch 32 x 256. Nothing runs.
"""
import functools
import os
import re
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxaccel.config import from_dict  # noqa: E402
from jaxaccel.train.config import RunConfig  # noqa: E402
from jaxaccel.train.loop import build_mesh  # noqa: E402
from jaxaccel.train.state import batch_sharding, state_shardings  # noqa: E402
from jaxaccel.train.step import lr_schedule, make_optimizer, train_step  # noqa: E402

mesh_spec = {k: int(v) for k, v in (a.split("=") for a in sys.argv[1].split(","))}
model = {"vocab_size": 512, "d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 256,
         "moe": {"n_experts": 8, "top_k": 2, "every": 2}}
B, T = 32, 256
cfg = from_dict(RunConfig, {"model": model, "data": {"corpus": "synthetic"},
                            "train": {"steps": 1, "batch_size": B, "seq_len": T},
                            "mesh": {"data": 1, **mesh_spec}, "output_dir": "unused", "tensorboard": False})
mesh = build_mesh(cfg)
optimizer = make_optimizer(cfg.optim, 10)
state, shardings = state_shardings(cfg.model, optimizer, mesh)
rows = batch_sharding(mesh)
batch = {k: jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=rows)
         for k in ("inputs", "targets", "positions", "segment_ids")}
batch["loss_mask"] = jax.ShapeDtypeStruct((B, T), jnp.float32, sharding=rows)
step = functools.partial(train_step, model_cfg=cfg.model, optimizer=optimizer, schedule=lr_schedule(cfg.optim, 10),
                         grad_accum=1, dropout=False, remat=False, bidirectional=False, mesh=mesh)
compiled = jax.jit(step, in_shardings=(shardings, rows), out_shardings=(shardings, None)).lower(
    state, batch).compile()
cost = compiled.cost_analysis()
cost = cost[0] if isinstance(cost, list) else cost
text = compiled.as_text()
collectives = {op: len(re.findall(rf"\b{op}(-start)?\(", text))
               for op in ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")}
print(f"{sys.argv[1]}: {cost['flops']:.3e} FLOPs per device, {collectives}")
memory = compiled.memory_analysis()
print(f"  {memory.temp_size_in_bytes / 2**20:.1f} MiB temporaries, {memory.argument_size_in_bytes / 2**20:.1f} MiB "
      f"arguments per device")
