import re

import pytest

from jaxaccel.config import ModelConfig, build, from_dict, parse_override, replace, to_dict
from jaxaccel.errors import ConfigError


def test_defaults_yaml_and_overrides(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text("d_model: 64\nn_heads: 4\ndropout:\n  mlp: 0.1\n")
    cfg = build(ModelConfig, f, ["n_layers=3", "dropout.embed=0.05", "rope_scaling.kind=llama3",
                                 "rope_scaling.factor=4.0"])
    assert (cfg.d_model, cfg.n_layers, cfg.dropout.mlp, cfg.dropout.embed) == (64, 3, 0.1, 0.05)
    assert cfg.rope_scaling.factor == 4.0 and cfg.rope_scaling.kind == "llama3"
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg
    # a scaling without its kind (or factor) is not Llama 3's x8 by default
    with pytest.raises(ConfigError, match=r"rope_scaling\.kind is required"):
        build(ModelConfig, f, ["rope_scaling.factor=4.0"])
    with pytest.raises(ConfigError, match=r"rope_scaling\.factor is required"):
        build(ModelConfig, f, ["rope_scaling.kind=linear"])


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
    # a key given twice: PyYAML kept the last value silently (the first one, edited, did nothing)
    f.write_text("n_layers: 2\nd_model: 64\nn_layers: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML \(the key 'n_layers' is given twice \(line 3\)\)"):
        build(ModelConfig, f)
    f.write_text("base: &b {n_layers: 2}\nmodel:\n  <<: *b\n  d_model: 64\n")  # merge keys stay allowed
    assert load_yaml(f)["model"] == {"n_layers": 2, "d_model": 64}


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
    ("train.eval_every=-1", "train.eval_every must be >= 0, got -1"),  # evaluated at every step
    ("train.dropout_start_step=-5", "train.dropout_start_step must be >= 0, got -5"),
    ("train.eval_batches=0", r"train.eval_batches must be >= 1 or null .*validation_fraction=0"),  # silently no eval
    ("train.eval_batches=-2", r"train.eval_batches must be >= 1 or null"),
    ("data.corpus=,", "data.corpus must not be empty"),  # was a traceback from os.path.commonpath
    ("train.init_from=' '", "train.init_from must be a model or run folder, or null; got an empty string"),  # was cwd
    ("data.corpus= , ,", "data.corpus must not be empty"),
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


def test_numbers_read_as_yaml_1_2_in_overrides_options_and_files(tmp_path):
    """PyYAML's YAML 1.1 read `010` as octal 8 (every_steps=0100 was 64), `1e-3` as a string
    (`--option threshold=1e-3` was refused as '1e-3'), `1:30` as 90."""
    from jaxaccel.config import dump_yaml, parse_override, parse_yaml
    from jaxaccel.decode.__main__ import parse_options

    assert build(RunConfig, None, ["checkpoint.every_steps=0100"]).checkpoint.every_steps == 100
    assert parse_options(["k=010", "threshold=1e-3", "speedup=2e0", "n=0x10"]) == dict(k=10, threshold=0.001,
                                                                                       speedup=2.0, n=16)
    assert parse_override("a=1:30")[1] == "1:30" and parse_override("a=.inf")[1] == math.inf
    assert build(RunConfig, None, ["train.steps=1_000"]).train.steps == 1000  # YAML 1.1's separators still read
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 010\noptim:\n  lr: 3e-4\n")
    cfg = build(RunConfig, path)
    assert (cfg.train.steps, cfg.optim.lr) == (10, 3e-4)
    # what the trainer writes as config.yaml reads back as the same values, strings included
    data = {"a": "1e5", "b": "010", "c": 1e-5, "d": "1:30", "e": "on", "f": 2**70}
    assert parse_yaml(dump_yaml(data).encode(), "x") == data


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

    path = _synthetic_sweep(tmp_path, {"optim.lr": [1, 1.0]})  # an int and a float, one learning rate
    sweep = load_sweep(path)
    assert len(sweep.runs) == 2  # two names, one config
    with pytest.raises(ConfigError, match=r"runs 'lr=1' and 'lr=1.0' of sweep 's' have the same config"):
        check_distinct_runs(sweep)
    for args in (["--dry-run", "--flops-per-s", "1e9"], []):
        code, line = cli_error(experiments_main, ["sweep", path, *args], capsys)
        assert code == 2 and "'lr=1' and 'lr=1.0'" in line and "same config" in line
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- bad input: the Python API

import dataclasses  # noqa: E402

import numpy as np  # noqa: E402

from jaxaccel.config import (DropoutConfig, DuoConfig, MoeConfig, RopeScaling, check_types,  # noqa: E402
                             with_overrides)


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("kwargs, match", [
    ({"vocab_size": "256"}, r"^model\.vocab_size: expected an integer, got '256'$"),
    ({"vocab_size": None}, r"^model\.vocab_size: expected an integer, got None$"),
    ({"vocab_size": 256.5}, r"^model\.vocab_size: expected an integer, got 256\.5$"),
    ({"vocab_size": True}, r"^model\.vocab_size: expected an integer, got True$"),
    ({"max_seq_len": "x"}, r"^model\.max_seq_len: expected an integer, got 'x'$"),
    ({"sliding_window": "x"}, r"^model\.sliding_window: expected an integer, got 'x'$"),
    ({"head_dim": 8.0}, r"^model\.head_dim: expected an integer, got 8\.0$"),
    ({"norm_eps": "x"}, r"^model\.norm_eps: expected a number, got 'x'$"),
    ({"norm_eps": "1e-5"}, r"^model\.norm_eps: expected a number, got '1e-5'$"),  # YAML's leniency only
    ({"rope_theta": True}, r"^model\.rope_theta: expected a number, got True$"),
    ({"tie_embeddings": 1}, r"^model\.tie_embeddings: expected true/false, got 1$"),
    ({"dtype": 32}, r"^model\.dtype: expected a string, got 32$"),
    ({"architecture": None}, r"^model\.architecture: expected a string, got None$"),
    ({"moe": {"n_experts": 2}}, r"^model\.moe: expected a MoeConfig, got \{'n_experts': 2\} \(pass MoeConfig"),
    ({"moe": None}, r"^model\.moe: expected a MoeConfig, got None$"),
    ({"rope_scaling": "x"}, r"^model\.rope_scaling: expected a RopeScaling, got 'x'$"),
    ({"dropout": 0.1}, r"^model\.dropout: expected a DropoutConfig, got 0\.1$"),
    ({"duo": True}, r"^model\.duo: expected a DuoConfig, got True$"),
])
def test_model_config_constructor_checks_types(kwargs, match):
    with pytest.raises(ConfigError, match=match) as err:
        ModelConfig(**kwargs)
    one_line(err)


@pytest.mark.parametrize("make, match", [
    (lambda: MoeConfig(n_experts="2"), r"^moe\.n_experts: expected an integer, got '2'$"),
    (lambda: MoeConfig(eval_capacity_factor="x"), r"^moe\.eval_capacity_factor: expected a number, got 'x'$"),
    (lambda: MoeConfig(normalize_top_k="no"), r"^moe\.normalize_top_k: expected true/false, got 'no'$"),
    (lambda: MoeConfig(priority="first"), r"^moe\.priority must be 'token' or 'rank', got 'first'$"),
    (lambda: DropoutConfig(mlp="0.1"), r"^dropout\.mlp: expected a number, got '0\.1'$"),
    (lambda: DropoutConfig(path=None), r"^dropout\.path: expected a number, got None$"),
    (lambda: DuoConfig(enabled="yes"), r"^duo\.enabled: expected true/false, got 'yes'$"),
    (lambda: DuoConfig(small_ratio=2.0), r"^duo\.small_ratio: expected an integer, got 2\.0$"),
    (lambda: RopeScaling(kind=1, factor=2.0), r"^rope_scaling\.kind: expected a string, got 1$"),
    (lambda: RopeScaling(kind="linear", factor="2"), r"^rope_scaling\.factor: expected a number, got '2'$"),
    (lambda: RopeScaling(kind="linear"), r"^rope_scaling\.factor is required: a finite number > 0"),
    (lambda: RopeScaling(factor=8.0), r"^rope_scaling\.kind is required: 'linear' or 'llama3'$"),
    (lambda: RopeScaling(kind="llama3", factor=float("inf")),
     r"^rope_scaling\.factor must be a finite number > 0, got inf$"),
    (lambda: RopeScaling(kind="llama3", factor=8.0, original_max_position=0),
     r"^rope_scaling\.original_max_position must be >= 1"),
    (lambda: RopeScaling(kind="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=4.0),
     r"^rope_scaling\.low_freq_factor and high"),
    (lambda: ModelConfig(head_dim=0), r"^model\.head_dim must be >= 1 or null"),
    (lambda: ModelConfig(init_std=float("nan")), r"^model\.init_std must be a finite number > 0, got nan$"),
    (lambda: MoeConfig(n_experts=4, capacity_factor=float("nan")), r"^moe\.capacity_factor must be a finite number"),
    (lambda: MoeConfig(n_experts=4, eval_capacity_factor=float("inf")),
     r"^moe\.eval_capacity_factor must be a finite number in \(0, 1e6\]"),
    (lambda: MoeConfig(n_experts=4, load_balance_weight=-1.0), r"^moe\.load_balance_weight must be a finite number >= 0"),
    (lambda: MoeConfig(n_experts=4, router_z_weight=float("nan")), r"^moe\.router_z_weight must be a finite number >= 0"),
    # a section built wrongly and slipped past its own constructor is still caught by its parent
    (lambda: ModelConfig(dropout=_unchecked(DropoutConfig, mlp="0.1")), r"^model\.dropout\.mlp: expected a number"),
])
def test_nested_config_constructors_check_types(make, match):
    with pytest.raises(ConfigError, match=match) as err:
        make()
    one_line(err)


def _unchecked(cls, **fields):
    """An instance of `cls` whose __post_init__ never ran (as a dataclass without checks makes)."""
    obj = object.__new__(cls)
    for f in dataclasses.fields(cls):
        object.__setattr__(obj, f.name, fields.get(f.name, f.default))
    return obj


def test_numpy_scalars_are_accepted_and_become_python_values():
    cfg = ModelConfig(vocab_size=np.int64(256), d_model=np.int32(64), n_heads=np.int8(4), norm_eps=np.float32(1e-5),
                      rope_theta=np.int64(500000), tie_embeddings=np.bool_(True), dtype=np.str_("bfloat16"),
                      dropout=DropoutConfig(mlp=np.float64(0.1)), moe=MoeConfig(n_experts=np.uint8(0)))
    assert (cfg.vocab_size, cfg.d_model, cfg.n_heads, cfg.tie_embeddings, cfg.dtype) == (256, 64, 4, True, "bfloat16")
    for value, tp in [(cfg.vocab_size, int), (cfg.d_model, int), (cfg.n_heads, int), (cfg.norm_eps, float),
                      (cfg.rope_theta, float), (cfg.tie_embeddings, bool), (cfg.dtype, str), (cfg.dropout.mlp, float),
                      (cfg.moe.n_experts, int)]:
        assert type(value) is tp, (value, tp)
    assert cfg == ModelConfig(vocab_size=256, d_model=64, n_heads=4, norm_eps=float(np.float32(1e-5)),
                              rope_theta=500000.0, tie_embeddings=True, dtype="bfloat16",
                              dropout=DropoutConfig(mlp=0.1))
    yaml.safe_dump(to_dict(cfg))  # plain Python values: a run's config.yaml stays readable
    assert ModelConfig() == ModelConfig() and hash(ModelConfig()) == hash(ModelConfig())


def test_from_dict_takes_numpy_scalars():
    cfg = from_dict(RunConfig, {"train": {"steps": np.int64(2), "remat": np.bool_(True)},
                                "optim": {"lr": np.float32(1e-3), "warmup_steps": np.int32(0)},
                                "model": {"dropout": {"mlp": np.float16(0.25)}}})
    assert cfg.train.steps == 2 and type(cfg.train.steps) is int and cfg.train.remat is True
    assert type(cfg.optim.lr) is float and abs(cfg.optim.lr - 1e-3) < 1e-9 and type(cfg.optim.warmup_steps) is int
    assert cfg.model.dropout.mlp == 0.25
    with pytest.raises(ConfigError, match=r"train\.steps: expected an integer, got np\.float64\(2\.0\)"):
        from_dict(RunConfig, {"train": {"steps": np.float64(2.0)}})
    with pytest.raises(ConfigError, match=r"^model\.norm_eps: 10{400} is too large for a number$"):
        from_dict(RunConfig, {"model": {"norm_eps": 10 ** 400}})


@pytest.mark.parametrize("data", [None, [("train", {})], "train.steps=2", 5])
def test_from_dict_needs_a_mapping(data):
    with pytest.raises(ConfigError, match=r"^RunConfig: expected a mapping of config keys to values, got ") as err:
        from_dict(RunConfig, data)
    assert repr(data) in one_line(err)


def test_build_checks_its_path_and_takes_one_override_string():
    for path in (5, b"configs/tiny.yaml", ["configs/tiny.yaml"]):
        with pytest.raises(ConfigError, match=r"^a config file path must be a str or pathlib\.Path, got ") as err:
            build(RunConfig, path)
        assert repr(path) in one_line(err)
    tiny = ROOT / "configs" / "tiny.yaml"
    one = build(RunConfig, str(tiny), "train.steps=2")  # one string: one override, not ten one-letter ones
    assert one.train.steps == 2 and one == build(RunConfig, tiny, ["train.steps=2"])
    assert build(RunConfig, tiny, None) == build(RunConfig, tiny)
    with pytest.raises(ConfigError, match=r"^an override must be a 'key\.sub=value' string, got 5$"):
        build(RunConfig, tiny, ["train.steps=2", 5])
    with pytest.raises(ConfigError, match=r"^overrides must be a list of 'key\.sub=value' strings, got 5$"):
        build(RunConfig, tiny, 5)
    with pytest.raises(ConfigError, match=r"^setting key 3 must look like 'key\.sub'$"):
        with_overrides({}, (), {3: 1})
    with pytest.raises(ConfigError, match=r"^expected a mapping of config keys to values, got None$"):
        with_overrides(None)


def test_check_types_is_there_for_other_config_dataclasses():
    @dataclasses.dataclass(frozen=True)
    class Section:
        n: int = 1
        rate: float | None = None

        def __post_init__(self):
            check_types(self, "section")

    assert type(Section(n=np.int64(3), rate=np.float32(0.5)).n) is int and Section(rate=2).rate == 2.0
    with pytest.raises(ConfigError, match=r"^section\.rate: expected a number, got 'x'$"):
        Section(rate="x")


# ------------------------------------------------------------------ train() and RunConfig


def _refused_by_train(cfg, match, tmp_path):
    from jaxaccel.train.loop import train

    with pytest.raises(ConfigError, match=match) as err:
        train(cfg)
    one_line(err)
    assert not any(tmp_path.iterdir())  # refused before any work


@pytest.mark.parametrize("bad, match", [
    (None, r"^train\(\) takes a RunConfig, got NoneType None: build one with jaxaccel\.config\.build\(RunConfig, "),
    ({"train": {"steps": 2}}, r"^train\(\) takes a RunConfig, not a dict: convert it with jaxaccel\.config\.from_dict"),
    ("configs/tiny.yaml", (r"^train\(\) takes a RunConfig, not the path 'configs/tiny\.yaml': load it with "
                           r"jaxaccel\.config\.build\(RunConfig, 'configs/tiny\.yaml'\)$")),
    (Path("configs/tiny.yaml"), r"not the path 'configs/tiny\.yaml'"),
    (ModelConfig(), r"^train\(\) takes a RunConfig, got ModelConfig"),
])
def test_train_says_what_to_pass(bad, match, tmp_path, monkeypatch):
    from jaxaccel.train.loop import train

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=match) as err:
        train(bad)
    assert "\n" not in str(err.value)  # one line
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_train_checks_a_hand_built_run_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^output_dir: expected a string, got 5$"):
        RunConfig(output_dir=5)  # the constructor checks its own fields
    with pytest.raises(ConfigError, match=r"^tensorboard: expected true/false, got 'no'$"):
        RunConfig(tensorboard="no")
    _refused_by_train(RunConfig(output_dir=" "), r"^output_dir must not be empty$", tmp_path)
    with pytest.raises(ConfigError, match=r"^train\.remat: expected true/false, got 'yes'$"):
        RunConfig(train=LoopConfig(remat="yes"))
    from jaxaccel.train.loop import _check_run_config

    cfg = _check_run_config(RunConfig(output_dir=tmp_path / "run", train=LoopConfig(steps=np.int64(3))))
    assert cfg.output_dir == str(tmp_path / "run") and type(cfg.train.steps) is int
    good = RunConfig()
    assert _check_run_config(good) is good  # nothing to convert: the same object


def test_run_config_sections_given_as_dicts_are_config_errors():
    with pytest.raises(ConfigError, match=r"^model: expected a ModelConfig, got \{'vocab_size': 10\}"):
        RunConfig(model={"vocab_size": 10})


def test_path_fields_take_pathlib_paths(tmp_path):
    from jaxaccel.data.config import DataConfig
    from jaxaccel.train.config import LoopConfig

    cfg = RunConfig(output_dir=tmp_path / "run", data=DataConfig(cache_dir=tmp_path / "cache"),
                    train=LoopConfig(init_from=tmp_path / "base"))
    assert (cfg.output_dir, cfg.data.cache_dir, cfg.train.init_from) == (
        str(tmp_path / "run"), str(tmp_path / "cache"), str(tmp_path / "base"))


def test_the_synthetic_data_refuses_an_objective_it_does_not_have():
    """data.objective: prefix_lm with corpus: synthetic trained a causal model: the same losses."""
    from jaxaccel.data.config import DataConfig

    with pytest.raises(ConfigError, match="data.objective 'prefix_lm' needs a text corpus: the synthetic data"):
        DataConfig(corpus="synthetic", objective="prefix_lm")
    DataConfig(corpus="synthetic")


@pytest.mark.parametrize("top,group,message", [
    ({"axes": {"optim.lr": [1e-3, 2e-3]}}, {"axes": {"optim.lr": [5e-3]}},
     "'optim.lr' is given twice: in the sweep's axes (every group's) and in group 'g' axes"),
    ({"zip": {"optim.lr": [1e-3, 2e-3]}}, {"axes": {"optim.lr": [5e-3]}},
     "'optim.lr' is given twice: in the sweep's zip (every group's) and in group 'g' axes"),
    ({"axes": {"optim.lr": [1e-3, 2e-3]}}, {"zip": {"optim.lr": [5e-3]}},
     "'optim.lr' is given twice: in the sweep's axes (every group's) and in group 'g' zip"),
])
def test_a_group_does_not_silently_replace_the_sweeps_own_axes(tmp_path, top, group, message):
    """The sweep's zip and axes apply to every group; a group giving the same key replaced
    them for its runs without a word."""
    from jaxaccel.experiments.spec import load_sweep

    path = _synthetic_sweep(tmp_path, {})
    sweep = yaml.safe_load(path.read_text())
    del sweep["axes"]
    sweep.update(top, groups={"g": group})
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_sweep(path)


def test_a_sweeps_base_is_read_beside_the_sweep_file_only(tmp_path, monkeypatch):
    """A base missing beside the sweep file was read from the working directory instead,
    whatever file of that name happened to be there."""
    from jaxaccel.experiments.spec import load_sweep

    (tmp_path / "sub").mkdir()
    (tmp_path / "tiny.yaml").write_text("train: {steps: 7}\n")  # in the working directory only
    monkeypatch.chdir(tmp_path)
    sweep = {"name": "s", "base": "tiny.yaml", "config": {"output_dir": str(tmp_path / "runs"),
                                                          "data": {"corpus": "synthetic"}}}
    (tmp_path / "sub" / "s.yaml").write_text(yaml.safe_dump(sweep))
    with pytest.raises(ConfigError, match=r"base 'tiny.yaml' is not a file \(a base is read relative to the sweep "
                                          r"file: sub/tiny.yaml\)"):
        load_sweep("sub/s.yaml")
    (tmp_path / "sub" / "tiny.yaml").write_text("train: {steps: 5}\n")
    assert load_sweep("sub/s.yaml").base["train"]["steps"] == 5


def test_a_run_may_start_from_an_earlier_run_of_its_sweep_however_the_path_is_spelled(tmp_path, monkeypatch):
    """The plan checks every run's train.init_from before anything trains, except one naming
    an earlier run's folder (not trained yet) — compared as absolute paths: the same folder
    spelled absolute was refused as missing. A later run's folder is not exempt."""
    from jaxaccel.experiments.runner import plan_steps
    from jaxaccel.experiments.spec import load_sweep

    monkeypatch.chdir(tmp_path)
    base = yaml.safe_load(_synthetic_sweep(tmp_path, {}).read_text())
    base["config"].update(output_dir="runs", mesh={"data": 1})  # relative to the working directory, as train() reads
    for init_from in (str(tmp_path / "runs" / "a"), "runs/a", "./runs/a/model"):
        sweep = {**base, "axes": None, "groups": {"a": {}, "b": {"set": {"train.init_from": init_from}}}}
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
        assert plan_steps(list(load_sweep(tmp_path / "s.yaml").runs), build=True)[0] == {"a": 2, "b": 2}
    sweep = {**base, "axes": None, "groups": {"b": {"set": {"train.init_from": "runs/a"}}, "a": {}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    with pytest.raises(ConfigError, match=r"run 'b': train.init_from: 'runs/a' does not exist"):
        plan_steps(list(load_sweep(tmp_path / "s.yaml").runs), build=True)
