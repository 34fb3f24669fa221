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


# ----------------------------------------------------------------------------- bad input: files, keys, values

import math  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

from jaxaccel.cli import run_cli  # noqa: E402
from jaxaccel.config import load_yaml  # noqa: E402
from jaxaccel.train.config import LoopConfig, OptimConfig, RunConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BINARY = b"\xff\xfe\x00bin"


def cli_error(main, args, capsys) -> tuple[int, str]:
    """Run a CLI in this process: (exit status, its one `error: ` line)."""
    try:
        code = run_cli(main, [str(a) for a in args])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return code, lines[0]


def test_a_binary_file_is_not_a_config(tmp_path, capsys):
    f = tmp_path / "bin.yaml"
    f.write_bytes(BINARY)
    with pytest.raises(ConfigError, match=r"bin\.yaml.*not a UTF-8 text file"):
        load_yaml(f)
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        build(ModelConfig, f)
    from jaxaccel.train.__main__ import main as train_main

    code, line = cli_error(train_main, [f], capsys)
    assert code == 2 and "bin.yaml" in line and "not a UTF-8 text file" in line
    # a sweep whose base: is that file
    from jaxaccel.experiments.__main__ import main as experiments_main

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"base: {f}\nconfig: {{output_dir: {tmp_path / 'sw'}}}\n")
    code, line = cli_error(experiments_main, ["sweep", sweep, "--dry-run", "--flops-per-s", "1e9"], capsys)
    assert code == 2 and "bin.yaml" in line and "not a UTF-8 text file" in line


def test_a_directory_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_yaml(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")


def test_non_string_keys_are_named(tmp_path):
    f = tmp_path / "k.yaml"
    f.write_text("1: a\nfoo: b\n")
    with pytest.raises(ConfigError, match=r"config key 1\b.*not a string"):
        build(RunConfig, f)
    f.write_text("model: {1: 2}\n")
    with pytest.raises(ConfigError, match=r"config key 1 in model\b.*not a string"):
        build(RunConfig, f)
    f.write_text("model:\n  dropout: {null: 0.1}\n")
    with pytest.raises(ConfigError, match=r"config key None in model\.dropout"):
        build(RunConfig, f)
    f.write_text("on: 1\n")  # YAML 1.1 reads a bare `on` key as true
    with pytest.raises(ConfigError, match=r"config key True"):
        build(RunConfig, f)


@pytest.mark.parametrize("override, match", [
    ("optim.lr=.nan", "optim.lr must be a finite number > 0, got nan"),
    ("optim.lr=inf", "optim.lr must be a finite number > 0, got inf"),
    ("optim.lr=-1e-3", "optim.lr must be a finite number > 0, got -0.001"),
    ("optim.lr=0", "optim.lr must be a finite number > 0, got 0"),
    ("optim.b1=1.0", r"optim.b1 must be in \[0, 1\), got 1.0"),
    ("optim.b1=-0.1", r"optim.b1 must be in \[0, 1\), got -0.1"),
    ("optim.b2=1.5", r"optim.b2 must be in \[0, 1\), got 1.5"),
    ("optim.b2=.nan", r"optim.b2 must be in \[0, 1\), got nan"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be a finite number >= 0, got -0.1"),
    ("optim.weight_decay=.inf", "optim.weight_decay must be a finite number >= 0, got inf"),
    ("optim.grad_clip=.nan", "optim.grad_clip must be a finite number >= 0"),
    ("model.rope_theta=0", "model.rope_theta must be a finite number > 0, got 0"),
    ("model.rope_theta=-10000", "model.rope_theta must be a finite number > 0, got -10000"),
    ("model.rope_theta=.inf", "model.rope_theta must be a finite number > 0, got inf"),
    ("model.norm_eps=0", "model.norm_eps must be a finite number > 0, got 0"),
    ("model.norm_eps=-1e-6", "model.norm_eps must be a finite number > 0, got -1e-06"),
    ("model.norm_eps=.nan", "model.norm_eps must be a finite number > 0, got nan"),
    ("train.peak_flops=0", r"train.peak_flops must be a finite number > 0 or null \(null: measure a matmul\), got 0"),
    ("train.peak_flops=-5", r"train.peak_flops must be a finite number > 0 or null \(null: measure a matmul\), got -5"),
    ("train.peak_flops=.nan", r"train.peak_flops must be a finite number > 0 or null \(null: measure a matmul\), got nan"),
    ("train.seq_len=4096", r"train.seq_len \(4096\) is longer than model.max_seq_len \(2048\).*raise model.max_seq_len"),
])
def test_out_of_range_values_are_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        build(RunConfig, None, [override])


def test_in_range_values_still_build():
    cfg = build(RunConfig, None, ["optim.b1=0", "optim.b2=0.999", "optim.weight_decay=0", "train.peak_flops=1e11",
                                  "train.seq_len=2048", "model.rope_theta=1e6", "model.norm_eps=1e-5"])
    assert (cfg.optim.b1, cfg.optim.weight_decay, cfg.train.peak_flops, cfg.train.seq_len) == (0.0, 0.0, 1e11, 2048)
    assert OptimConfig().lr > 0 and LoopConfig().peak_flops is None and math.isfinite(ModelConfig().rope_theta)
    with pytest.raises(ConfigError, match="raise model.max_seq_len"):
        replace(RunConfig(model=replace(ModelConfig(), max_seq_len=64)), train=replace(LoopConfig(), seq_len=128))


def test_every_shipped_config_still_builds():
    from jaxaccel.experiments.spec import load_sweep

    for f in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = build(RunConfig, f)
        assert cfg.train.seq_len <= cfg.model.max_seq_len, f
    for f in sorted((ROOT / "configs" / "models").glob("*.yaml")):
        build(ModelConfig, f)
    for f in sorted((ROOT / "configs" / "experiments").glob("*.yaml")):
        assert load_sweep(f).runs, f


def _synthetic_sweep(tmp_path, axes) -> Path:
    sweep = {"name": "s", "config": {"output_dir": str(tmp_path / "runs"), "data": {"corpus": "synthetic"},
                                     "train": {"steps": 2, "seq_len": 32, "batch_size": 4, "peak_flops": 1e11},
                                     "model": {"max_seq_len": 64}},
             "axes": axes}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


@pytest.mark.parametrize("rate", ["0", "-5", "nan", "inf"])
def test_sweep_flops_per_s_must_be_finite_and_positive(tmp_path, capsys, rate):
    from jaxaccel.experiments.__main__ import main as experiments_main

    path = _synthetic_sweep(tmp_path, {"optim.lr": [1e-3, 2e-3]})
    code, line = cli_error(experiments_main, ["sweep", path, "--dry-run", "--flops-per-s", rate], capsys)
    assert code == 2 and "--flops-per-s" in line and "finite number > 0" in line and rate in line
    assert not (tmp_path / "runs").exists()


def test_sweep_dry_run_with_a_good_rate_still_plans(tmp_path, capsys):
    from jaxaccel.experiments.__main__ import main as experiments_main

    path = _synthetic_sweep(tmp_path, {"optim.lr": [1e-3, 2e-3]})
    assert run_cli(experiments_main, ["sweep", str(path), "--dry-run", "--flops-per-s", "1e9"]) == 0
    assert "estimated cost" in capsys.readouterr().out


def test_sweep_runs_with_the_same_parsed_config_are_duplicates(tmp_path, capsys):
    from jaxaccel.experiments.__main__ import main as experiments_main
    from jaxaccel.experiments.runner import check_distinct_runs
    from jaxaccel.experiments.spec import load_sweep

    path = _synthetic_sweep(tmp_path, {"optim.lr": ["1e-3", 0.001]})  # YAML reads 1e-3 (no dot) as a string
    path.write_text(path.read_text().replace("'1e-3'", "1e-3"))
    sweep = load_sweep(path)
    assert len(sweep.runs) == 2  # two names, one config
    with pytest.raises(ConfigError, match=r"runs 'lr=1e-3' and 'lr=0.001' of sweep 's' have the same config"):
        check_distinct_runs(sweep)
    for args in (["--dry-run", "--flops-per-s", "1e9"], []):
        code, line = cli_error(experiments_main, ["sweep", path, *args], capsys)
        assert code == 2 and "'lr=1e-3' and 'lr=0.001'" in line and "same config" in line
    assert not (tmp_path / "runs").exists()
