"""Read a training output folder as a model: its exported `model/` when the run finished,
otherwise the parameters of its latest readable checkpoint (a run still going, or killed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from jaxaccel.errors import CheckpointError


def is_run_dir(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() and (folder / "checkpoints").is_dir()


def load_run_params(folder: Path, dtype: str | None = None) -> tuple[Any, Any, dict]:
    """(model config, scanned params, meta) from the latest readable checkpoint of a run."""
    from jaxaccel.config import build, replace
    from jaxaccel.sharding import make_mesh
    from jaxaccel.train.checkpoint import Checkpoints
    from jaxaccel.train.config import RunConfig
    from jaxaccel.train.state import state_shardings
    from jaxaccel.train.step import make_optimizer

    cfg = build(RunConfig, folder / "config.yaml")
    optimizer = make_optimizer(cfg.optim, cfg.train.steps or 1)
    abstract, _ = state_shardings(cfg.model, optimizer, make_mesh(None, jax.devices()[:1]), cfg.train.seed)
    ckpts = Checkpoints(folder / "checkpoints", cfg.checkpoint, read_only=True)  # the run may still be going
    try:
        restored = ckpts.restore_latest(abstract)
    finally:
        ckpts.close()
    if restored is None:
        raise CheckpointError(f"training run {folder} has no readable checkpoint yet")
    model_cfg = cfg.model
    params = restored.state.params
    if dtype is not None:
        model_cfg = replace(model_cfg, param_dtype=dtype, dtype=dtype)
        params = jax.tree.map(lambda x: x.astype(dtype), params)
    from jaxaccel.data.vocab import BOS_ID, EOS_ID

    return model_cfg, params, {"step": restored.step, "eos_token_ids": [EOS_ID], "bos_token_id": BOS_ID,
                               "layout": "scanned"}
