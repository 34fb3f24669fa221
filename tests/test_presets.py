"""Every shipped preset parses, fits its intended machine, and is the size its name says."""
from pathlib import Path

import pytest

from jaxaccel.config import build
from jaxaccel.train.config import RunConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("path", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_preset_parses(path):
    cfg = build(RunConfig, CONFIGS / path)
    assert cfg.data.vocab_size <= cfg.model.vocab_size
    assert cfg.train.seq_len <= cfg.model.max_seq_len


@pytest.mark.parametrize("path,devices,params,experts", [
    ("pod-150m.yaml", 32, 150e6, 0),
    ("pod-1b.yaml", 64, 1.0e9, 0),
    ("pod-moe-8x.yaml", 32, None, 8),
])
def test_pod_presets_fit_a_pod(path, devices, params, experts):
    cfg = build(RunConfig, CONFIGS / path)
    sizes = cfg.mesh.sizes(devices)
    cfg.check_mesh(sizes)
    assert sizes["data"] * sizes["fsdp"] * sizes["tensor"] * sizes["expert"] == devices
    if params is not None:
        assert 0.8 < cfg.model.num_params() / params < 1.25
    assert cfg.model.moe.n_experts == experts
    assert cfg.output_dir.startswith("gs://") and cfg.data.corpus.startswith("tfds:")


def test_default_and_draft_share_their_vocabulary_settings():
    default, draft = build(RunConfig, CONFIGS / "default.yaml"), build(RunConfig, CONFIGS / "draft.yaml")
    assert default.data == draft.data and default.model.vocab_size == draft.model.vocab_size
    assert draft.model.num_params() * 5 < default.model.num_params()
