import pytest

from jaxaccel.config import ModelConfig, build, from_dict, parse_override, replace, to_dict
from jaxaccel.errors import ConfigError


def test_defaults_yaml_and_overrides(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text("d_model: 64\nn_heads: 4\ndropout:\n  mlp: 0.1\n")
    cfg = build(ModelConfig, f, ["n_layers=3", "dropout.embed=0.05", "rope_scaling.factor=4.0"])
    assert (cfg.d_model, cfg.n_layers, cfg.dropout.mlp, cfg.dropout.embed) == (64, 3, 0.1, 0.05)
    assert cfg.rope_scaling.factor == 4.0 and cfg.rope_scaling.kind == "llama3"
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown config key 'd_modle'.*valid keys: .*d_model"):
        from_dict(ModelConfig, {"d_modle": 3})
    with pytest.raises(ConfigError, match=r"'dropout.mlpp'.*valid keys: attention, embed, mlp"):
        build(ModelConfig, None, ["dropout.mlpp=0.1"])


def test_wrong_types_name_the_key():
    with pytest.raises(ConfigError, match="n_layers: expected an integer"):
        build(ModelConfig, None, ["n_layers=two"])
    with pytest.raises(ConfigError, match="tie_embeddings: expected true/false"):
        from_dict(ModelConfig, {"tie_embeddings": 1})
    with pytest.raises(ConfigError, match="multiple of model.n_kv_heads"):
        replace(ModelConfig(), n_kv_heads=3)
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        parse_override("n_layers")


def test_bad_yaml_is_one_line_error(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build(ModelConfig, f)
    with pytest.raises(ConfigError, match="does not exist"):
        build(ModelConfig, tmp_path / "missing.yaml")
