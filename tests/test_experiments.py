"""The experiment machinery at toy size (DESIGN decision 13): a 2 x 2 sweep of a tiny model on a
small real corpus expands into named runs, trains them, skips them when finished, resumes a
SIGKILLed one to the uninterrupted result, aggregates one results file, plots valid PNGs and
reports the same numbers; a run repeated with the same seed is bit-identical; bad input is a
one-line error (exit 2) that touches nothing; the data-constrained scaling law reproduces its
published value; the pod launcher recreates a preempted slice and reruns the same sweep."""
import email
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from conftest import TRAIN_STEP_AT_O1
from jaxaccel.cli import run_cli
from jaxaccel.config import to_dict
from jaxaccel.errors import ConfigError
from jaxaccel.experiments.__main__ import main as experiments_main
from jaxaccel.experiments.results import FORMAT, RESULT_FILE, VERSION
from jaxaccel.experiments.scaling import PUBLISHED, effective_data, fit_rd_star
from jaxaccel.experiments.spec import load_sweep

ROOT = Path(__file__).resolve().parent.parent
EMAIL = Path(email.__file__).parent  # ~160k tokens of real Python: a corpus that tokenizes in seconds
RUN_NAMES = ["epochs=1,d_model=16", "epochs=1,d_model=32", "epochs=2,d_model=16", "epochs=2,d_model=32"]
KILLED = "epochs=2,d_model=32"  # 32 steps, checkpoints every 8: killed right after step 16's


def toy_sweep(cache: Path, output_dir: Path, **changes) -> dict:
    sweep = {
        "name": "toy",
        "config": {
            "output_dir": str(output_dir), "tensorboard": False,
            "model": {"vocab_size": 512, "d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64,
                      "max_seq_len": 64},
            "data": {"corpus": f"{EMAIL}/*.py", "vocab_size": 512, "num_sentinels": 8, "validation_fraction": 0.2,
                     "cache_dir": str(cache), "unique_tokens": 4096, "max_eval_tokens": 2048},
            "train": {"batch_size": 8, "seq_len": 32, "eval_every": 8, "log_every": 4, "progress": False,
                      "peak_flops": 1e11, "attention": "dense"},
            "optim": {"lr": 1e-2, "warmup_steps": 2},
            "checkpoint": {"every_steps": 8, "keep": 5},
            "mesh": {"data": 1},
        },
        "axes": {"data.epochs": [1, 2], "model.d_model": [16, 32]},
    }
    sweep.update(changes)
    return sweep


def write_sweep(path: Path, sweep: dict) -> Path:
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def cli(args, capsys=None):
    """`python -m jaxaccel.experiments ARGS` in this process: (exit status, stdout, stderr)."""
    try:
        code = run_cli(experiments_main, [str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return code, out, err


def files_of(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """JAX's persistent compilation cache in a temporary folder for this module: every run of the
    toy shapes after the first loads its programs instead of compiling them (the sweep CLI turns
    the same cache on; the test session runs with it off)."""
    from jax._src import compilation_cache

    folder = tmp_path_factory.mktemp("xla-cache")
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    before = {n: getattr(jax.config, n) for n in names}
    for name, value in zip(names, (str(folder), 0.0, 0)):
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    yield folder
    for name, value in before.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def toy(tmp_path_factory, compile_cache):
    """The toy sweep, run once: (sweep file, output folder, results document)."""
    base = tmp_path_factory.mktemp("toy")
    cache, out = base / "cache", base / "runs"
    path = write_sweep(base / "toy.yaml", toy_sweep(cache, out))
    code, _, _ = cli(["sweep", path])
    assert code == 0
    return path, out, json.loads((out / "results.json").read_text())


def test_sweep_expands_into_one_folder_per_setting(toy):
    path, out, _ = toy
    sweep = load_sweep(path)
    assert [r.name for r in sweep.runs] == RUN_NAMES
    run = sweep.run("epochs=2,d_model=16")
    assert run.settings == {"data.epochs": 2, "model.d_model": 16}
    assert (run.config.data.epochs, run.config.model.d_model, run.config.model.n_layers) == (2.0, 16, 1)
    assert run.config.output_dir == f"{out}/epochs=2,d_model=16"
    assert sweep.results_path == f"{out}/results.json"
    assert [r.name for r in sweep.select(["epochs=1,*"])] == RUN_NAMES[:2]


def test_sweep_trains_every_run_and_aggregates_one_results_file(toy):
    _, out, doc = toy
    assert doc["format"] == FORMAT and doc["sweep"] == "toy" and [r["name"] for r in doc["runs"]] == RUN_NAMES
    for record in doc["runs"]:
        epochs = record["settings"]["data.epochs"]
        assert record["status"] == "done" and record["steps"] == 16 * epochs
        assert record["config"]["data"]["epochs"] == epochs and record["config"]["model"]["d_model"] == \
            record["settings"]["model.d_model"]
        assert (record["unique_tokens"], record["total_tokens"]) == (4096, 4096 * epochs)
        assert record["curve"]["eval_step"] == list(range(8, 16 * epochs + 1, 8))
        assert record["curve"]["train_step"] == list(range(1, 16 * epochs + 1))
        assert record["final"]["eval_loss"] == record["curve"]["eval_loss"][-1]
        assert record["best"]["eval_loss"] == min(record["curve"]["eval_loss"]) <= record["final"]["eval_loss"]
        assert 0 < record["final"]["eval_accuracy"] < 1 and record["wall_s"] > 0
        assert json.loads((out / record["name"] / RESULT_FILE).read_text())["final"] == record["final"]
    by_name = {r["name"]: r for r in doc["runs"]}
    assert by_name["epochs=2,d_model=32"]["final"]["eval_loss"] < by_name["epochs=1,d_model=16"]["final"]["eval_loss"]


def test_rerunning_the_sweep_skips_finished_runs(toy, monkeypatch, capsys):
    path, out, doc = toy

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("jaxaccel.train.loop.train", no_training)
    before = {name: files_of(out / name) for name in RUN_NAMES}
    code, _, err = cli(["sweep", path], capsys)
    assert code == 0, err
    assert "4 finished already, 0 to train" in err
    assert {name: files_of(out / name) for name in RUN_NAMES} == before
    again = json.loads((out / "results.json").read_text())
    assert again["runs"] == doc["runs"]


def test_a_finished_run_whose_folder_is_gone_keeps_its_record(toy, monkeypatch, capsys):
    """Run folders pruned once finished (plots and reports need only the results file): the next
    sweep (`--only` another run) or collect wrote the run's record over as "new"."""
    import shutil

    path, out, doc = toy
    monkeypatch.setattr("jaxaccel.train.loop.train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    shutil.move(out / RUN_NAMES[0], out.parent / "pruned")
    try:
        for args in (["sweep", path, "--only", RUN_NAMES[1]], ["collect", path], ["sweep", path]):
            code, _, err = cli(args, capsys)
            assert code == 0, err
            assert json.loads((out / "results.json").read_text())["runs"] == doc["runs"], args
        # The sweep file changed since (here the evaluation interval; its run folders elsewhere,
        # its results the same file): a record is its old run's only one, so it is refused as a
        # folder of another run is, not written over as "new".
        before = (out / "results.json").read_bytes()
        changed = toy_sweep(out.parent / "cache", out.parent / "elsewhere", results=str(out / "results.json"))
        changed["config"]["train"]["eval_every"] = 4
        other = write_sweep(out.parent / "changed.yaml", changed)
        for args in (["sweep", other], ["collect", other], ["sweep", other, "--dry-run"]):
            code, _, err = cli(args, capsys)
            assert code == 2 and err.count("\n") == 1, (args, err)
            assert "only record of a finished run" in err and "train.eval_every is 8 there, 4 in this sweep" in err
            assert (out / "results.json").read_bytes() == before, args
    finally:
        shutil.move(out.parent / "pruned", out / RUN_NAMES[0])


def test_a_run_another_process_finished_meanwhile_is_not_trained_again(toy, monkeypatch, capsys):
    """A second sweep process on the same run folders (`--only`, or a shipped sweep sharing runs)
    finishes a run after this one planned it: looked at again before training, it is kept."""
    from jaxaccel.experiments import runner

    path, out, doc = toy
    real, calls = runner.inspect_run, []

    def stale_then_real(run):  # the start-up pass and the first results write still see every run unfinished
        calls.append(run.name)
        return runner.RunState("partial", 8) if len(calls) <= 2 * len(RUN_NAMES) else real(run)

    monkeypatch.setattr(runner, "inspect_run", stale_then_real)
    monkeypatch.setattr("jaxaccel.train.loop.train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    before = {name: files_of(out / name) for name in RUN_NAMES}
    code, _, err = cli(["sweep", path], capsys)
    assert code == 0, err
    assert "0 finished already, 4 to train" in err and err.count("finished meanwhile by another process; kept") == 4
    assert {name: files_of(out / name) for name in RUN_NAMES} == before
    assert json.loads((out / "results.json").read_text())["runs"] == doc["runs"]


def test_the_results_file_keeps_runs_another_process_finished_and_its_owner(toy, tmp_path, monkeypatch, capsys):
    """Two processes on one sweep's folders (`--only A` and `--only B`): each wrote the whole
    results file from what it saw at its start, so the last one dropped the other's run. And
    a second sweep on the same file (none there yet at its start) overwrote the first's."""
    import shutil

    import jaxaccel.train.loop as loop

    path, out, _ = toy
    mine, theirs = RUN_NAMES[0], RUN_NAMES[1]
    work = tmp_path / "runs"
    shutil.copytree(out, work)
    (work / "results.json").unlink()
    shutil.rmtree(work / mine)
    aside = tmp_path / "theirs"
    shutil.move(work / theirs, aside)
    sweep = write_sweep(tmp_path / "toy.yaml", {**yaml.safe_load(path.read_text())})
    real_train = loop.train

    def train_while_the_other_process_finishes_theirs(cfg, **kwargs):
        assert json.loads((work / "results.json").read_text())["sweep"] == "toy"  # claimed before training
        shutil.move(aside, work / theirs)
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(loop, "train", train_while_the_other_process_finishes_theirs)
    code, _, err = cli(["sweep", sweep, f"output_dir={work}", "--only", mine], capsys)
    assert code == 0, err
    status = {r["name"]: r["status"] for r in json.loads((work / "results.json").read_text())["runs"]}
    assert status[mine] == "done" and status[theirs] == "done"  # 'new' before: the start-up view

    # another sweep takes the file while this one trains: refused at its next write, the file kept
    shutil.rmtree(work / mine)
    other = {**yaml.safe_load(path.read_text()), "name": "other"}
    taken = {"format": FORMAT, "version": VERSION, "sweep": "toy", "runs": []}

    def train_while_another_sweep_takes_the_file(cfg, **kwargs):
        (work / "results.json").write_text(json.dumps(taken))
        return real_train(cfg, **kwargs)

    (work / "results.json").unlink()
    monkeypatch.setattr(loop, "train", train_while_another_sweep_takes_the_file)
    code, _, err = cli(["sweep", write_sweep(tmp_path / "other.yaml", other), f"output_dir={work}", "--only", mine],
                       capsys)
    assert code == 2 and "holds the results of sweep 'toy', not 'other'" in err, err
    assert json.loads((work / "results.json").read_text()) == taken
    assert (work / mine / RESULT_FILE).exists()  # the run's own record is kept

    # a results path that cannot be written fails before any training
    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("trained before the results file was checked"))
    code, _, err = cli(["sweep", sweep, f"output_dir={tmp_path / 'fresh'}", "--results", f"{path}/results.json"],
                       capsys)
    assert code == 2 and err.startswith(f"error: cannot write the results file {path}/results.json"), err
    code, _, err = cli(["sweep", sweep, "--results", " "], capsys)
    assert code == 2 and "--results is empty" in err


def test_a_run_finished_between_the_look_and_the_lock_keeps_the_finishing_record(toy, monkeypatch, capsys):
    """The other process finishes the run after this one's last look but before its lock: this
    train() finds nothing left to train. The record the other process writes (its wall time,
    where it resumed from) is kept, not overwritten by this call's seconds of nothing."""
    from jaxaccel.experiments import runner

    path, out, doc = toy
    real, trained = runner.inspect_run, set()

    def stale_until_trained(run):  # the start-up pass and the look before training see it unfinished
        return real(run) if run.config.output_dir in trained else runner.RunState("partial", 8)

    def nothing_left(cfg, **kwargs):
        trained.add(cfg.output_dir)
        return {"steps": 8, "resumed_from": 8, "final_loss": 0.0}

    monkeypatch.setattr(runner, "inspect_run", stale_until_trained)
    monkeypatch.setattr("jaxaccel.train.loop.train", nothing_left)
    done = {r["name"]: r for r in doc["runs"]}
    before = {name: files_of(out / name) for name in RUN_NAMES}
    code, _, err = cli(["sweep", path], capsys)
    assert code == 0, err
    assert err.count("finished meanwhile by another process; kept") == len(RUN_NAMES)
    assert {name: files_of(out / name) for name in RUN_NAMES} == before
    assert {r["name"]: r for r in json.loads((out / "results.json").read_text())["runs"]} == done


def test_a_killed_run_resumes_to_the_uninterrupted_result(toy, tmp_path, compile_cache, capsys):
    """The sweep process is SIGKILLed right after the step-16 checkpoint of a 32-step run; the
    same command resumes it from there and ends with exactly the uninterrupted run's numbers."""
    path, _, doc = toy
    out = tmp_path / "runs"
    script = textwrap.dedent("""
        import os, signal, sys
        from jaxaccel.train import checkpoint

        save = checkpoint.Checkpoints.save

        def save_then_die(self, step, state, meta):
            save(self, step, state, meta)
            if step == 16:
                self.wait()
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.Checkpoints.save = save_then_die
        from jaxaccel.experiments.__main__ import main
        main(sys.argv[1:])
    """)
    script = TRAIN_STEP_AT_O1 + script  # the resumed half runs in this process: compile as it does
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(compile_cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    args = ["sweep", str(path), f"output_dir={out}", "--only", KILLED]
    proc = subprocess.run([sys.executable, "-c", script, *args, "--cpu-devices", "8"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    folder = out / KILLED
    assert (folder / "checkpoints" / "16").is_dir() and not (folder / RESULT_FILE).exists()
    code, plan, _ = cli(["sweep", path, f"output_dir={out}", "--dry-run", "--flops-per-s", "1e9"], capsys)
    assert code == 0 and f"{KILLED}  partial (step 16)" in plan

    code, _, err = cli(args, capsys)
    assert code == 0, err
    assert "resuming from step 16" in err
    resumed = json.loads((folder / RESULT_FILE).read_text())
    original = next(r for r in doc["runs"] if r["name"] == KILLED)
    assert resumed["resumed_from"] == 16
    for key in ("final", "best", "curve", "steps", "total_tokens"):
        assert resumed[key] == original[key], key


def test_two_runs_with_the_same_seed_give_bit_identical_losses(toy, tmp_path, capsys):
    path, _, doc = toy
    name = "epochs=1,d_model=32"
    code, _, err = cli(["sweep", path, f"output_dir={tmp_path}", "--only", name], capsys)
    assert code == 0, err
    again = json.loads((tmp_path / name / RESULT_FILE).read_text())
    first = next(r for r in doc["runs"] if r["name"] == name)
    assert again["final"]["train_loss"] == first["final"]["train_loss"]
    assert again["final"]["eval_loss"] == first["final"]["eval_loss"]
    assert again["curve"] == first["curve"]


def test_plot_writes_valid_pngs(toy, tmp_path, capsys):
    import matplotlib.image

    _, out, _ = toy
    code, stdout, err = cli(["plot", out / "results.json", "--out", tmp_path], capsys)
    assert code == 0, err
    written = [Path(line) for line in stdout.split()]
    assert {p.name for p in written} == {"sweep-final.png", "sweep-curves.png"}
    for png in written:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = matplotlib.image.imread(png).shape
        assert height > 100 and width > 100


def test_report_reflects_the_results_file(toy, capsys):
    _, out, doc = toy
    code, report, err = cli(["report", out / "results.json"], capsys)
    assert code == 0, err
    rows = {line.split("|")[1].strip().strip("`"): line for line in report.splitlines() if line.startswith("| `")}
    assert sorted(rows) == sorted(RUN_NAMES)
    for record in doc["runs"]:
        cells = [c.strip() for c in rows[record["name"]].split("|")[1:-1]]
        assert cells[1] == f"{record['final']['eval_loss']:.4f}"
        assert cells[2] == f"{record['best']['eval_loss']:.4f} ({record['best']['eval_loss_step']})"
        assert cells[3] == f"{record['final']['eval_accuracy']:.4f}"
        assert cells[5] == str(record["steps"])


def test_dry_run_prints_the_plan_and_its_cost_and_writes_nothing(toy, tmp_path, capsys):
    path, out, doc = toy
    code, plan, _ = cli(["sweep", path, "--dry-run", "--flops-per-s", "1e9"], capsys)
    assert code == 0 and all(f"{name}  done" in plan for name in RUN_NAMES) and "estimated cost: 0 FLOP" in plan
    # how it checkpoints and recomputes does not make another run (the trainer resumes across
    # them; the sweep refused its own runs as "a different run")
    code, plan, err = cli(["sweep", path, "checkpoint.every_steps=3", "checkpoint.keep=1", "train.remat=true",
                           "--dry-run", "--flops-per-s", "1e9"], capsys)
    assert code == 0 and all(f"{name}  done" in plan for name in RUN_NAMES), err
    fresh = tmp_path / "fresh"
    code, plan, _ = cli(["sweep", path, f"output_dir={fresh}", "--dry-run", "--flops-per-s", "1e9"], capsys)
    assert code == 0 and all(f"{name}  new" in plan for name in RUN_NAMES)
    # + 15 s start-up a run; 2 and 4 evaluations of 2048 tokens (every 8 steps of 16 and 32: the
    # last step's is one of them), not one more each (4.35 GFLOP)
    assert "estimated cost: 4.02 GFLOP, about 64 s at 1 GFLOP/s (--flops-per-s)" in plan
    assert not fresh.exists()
    # the tokens column is the corpus tokens each run reads, as its record will count them:
    # under UL2 a row holds fewer of them (its task tokens), and it was steps x batch x seq_len
    code, plan, err = cli(["sweep", path, f"output_dir={fresh}", "data.objective=ul2", "--dry-run"], capsys)
    rows = {line.split()[0]: line.split() for line in plan.splitlines() if line.split()[:1] and "=" in line.split()[0]}
    assert code == 0 and sorted(rows) == sorted(RUN_NAMES), err
    for record in doc["runs"]:
        steps, tokens = int(rows[record["name"]][2]), int(rows[record["name"]][3].replace(",", ""))
        assert tokens == record["total_tokens"] < steps * 8 * 32, (record["name"], tokens, steps)


def test_run_flops_counts_the_evaluations_the_loop_runs():
    """The loop evaluates every eval_every steps and at the last step: the count was one too
    many where eval_every divides the steps (1.8% too many FLOPs for the shipped sweeps), and
    for a resumed run it counted from its checkpoint as if from step 0 (steps 8..17 of a run
    evaluating every 8: at 8, 16 and 17, not 2)."""
    from types import SimpleNamespace

    from jaxaccel.config import from_dict
    from jaxaccel.experiments.runner import run_flops
    from jaxaccel.train.config import RunConfig
    from jaxaccel.train.metrics import flops_per_token

    cfg = from_dict(RunConfig, {"model": {"vocab_size": 64, "d_model": 32, "n_layers": 1, "n_heads": 2,
                                          "ffn_dim": 64},
                                "train": {"batch_size": 2, "seq_len": 16, "eval_every": 8, "eval_batches": 1}})
    run = SimpleNamespace(config=cfg)
    step, evaluation = 32 * flops_per_token(cfg.model, 16), 32 * flops_per_token(cfg.model, 16) / 3
    for steps, start, evals in [(16, 0, 2), (17, 0, 3), (17, 7, 3), (17, 8, 2), (16, 16, 0), (5, 0, 1)]:
        assert run_flops(run, steps, start) == pytest.approx((steps - start) * step + evals * evaluation), (steps, start)
    no_periodic = SimpleNamespace(config=from_dict(RunConfig, {**to_dict(cfg), "train": {**to_dict(cfg)["train"],
                                                                                         "eval_every": 0}}))
    assert run_flops(no_periodic, 16) == pytest.approx(16 * step + evaluation)


@pytest.mark.parametrize("case,message", [
    ("unknown key", "unknown config key 'data.epoch' in the sweep's axes; did you mean 'data.epochs'"),
    ("empty axis", "axis 'model.d_model' in the sweep's axes is empty"),
    ("duplicate names", "duplicate run name 'epochs=1,d_model=16'"),
    ("budget", "data.unique_tokens=1000000000 is more than the "),
    # checks train() makes, made for every run before the first trains (the runs before the
    # bad one trained in full first)
    ("a later run's vocabulary", "run 'epochs=1,model.vocab_size=256': the vocabulary has 512 tokens but "
                                 "model.vocab_size is 256"),
    ("a later run's mesh", "run 'epochs=1,mesh.data=16': mesh data=16 fsdp=1 tensor=1 expert=1 uses 16 devices"),
    ("a later run's init_from", "-no-model': train.init_from: "),  # (the run's name spells the path)
    ("a later run's validation split", "run 'epochs=1,validation_fraction=0.0001': data.validation_fraction=0.0001 "
                                       "holds out none of the"),
    ("other run's folder", "belongs to a different run (optim.lr is 0.01 there, 0.02 in this sweep)"),
    ("other sweep's results", "holds the results of sweep 'other', not 'toy'; refusing to overwrite it"),
    ("not a results file", "is not a jaxaccel sweep results file"),
    ("results not a path", "results must be a string, got 3"),
    ("description a list", "description must be a string, got ['a']"),
    ("override of an axis", "override 'data.epochs=3': data.epochs is set by the sweep's axes, which wins over "
                            "the base config"),
    ("override of a section holding an axis", "override 'model={}': model.d_model is set by the sweep's axes"),
    ("plot lines not keys", "plots[0].lines must be a config key or a list of them, got [1]"),
    ("plot x a list", "plots[0].x must be a string, got [1]"),
    ("plot log base 1", "plots[0].logx must be true (base 2) or a log base > 1, got 1"),
    ("plot y a section", "'model' in plots[0].y (nor is it one of final_eval_loss"),
    ("curves of a final figure", "plots[0].y (kind curves) must be one of eval_loss, eval_accuracy, train_loss, "
                                 "got 'final_eval_loss'"),
])
def test_bad_input_is_one_line_and_touches_nothing(toy, tmp_path, capsys, case, message):
    path, out, _ = toy
    cache = Path(yaml.safe_load(path.read_text())["config"]["data"]["cache_dir"])
    sweep = toy_sweep(cache, out)
    args = ["sweep"]
    if case == "unknown key":
        sweep["axes"] = {"data.epoch": [1, 2], "model.d_model": [16, 32]}
    elif case == "empty axis":
        sweep["axes"] = {"data.epochs": [1, 2], "model.d_model": []}
    elif case == "duplicate names":
        sweep["axes"] = {"data.epochs": [1, 1], "model.d_model": [16, 32]}
    elif case.startswith("a later run's"):
        axis = {"vocabulary": ("model.vocab_size", [512, 256]), "mesh": ("mesh.data", [1, 16]),
                "init_from": ("train.init_from", [None, str(tmp_path / "no-model")]),
                "validation split": ("data.validation_fraction", [0.2, 0.0001])}[case.split("'s ")[1]]
        sweep["axes"] = {"data.epochs": [1, 2], axis[0]: axis[1]}
    elif case == "budget":
        sweep["config"]["data"]["unique_tokens"] = 10**9
        sweep["config"]["output_dir"] = str(tmp_path / "budget")
    elif case == "results not a path":
        sweep["results"] = 3
    elif case == "description a list":
        sweep["description"] = ["a"]
    elif case == "override of an axis":
        args = ["sweep", "data.epochs=3"]
    elif case == "override of a section holding an axis":
        args = ["sweep", "model={}"]
    elif case.startswith("plot") or case.startswith("curves"):
        plot = {"plot lines not keys": {"x": "optim.lr", "lines": [1]}, "plot x a list": {"x": [1]},
                "plot log base 1": {"x": "optim.lr", "logx": 1}, "plot y a section": {"x": "optim.lr", "y": "model"},
                "curves of a final figure": {"kind": "curves", "y": "final_eval_loss"}}[case]
        sweep["plots"] = [{"name": "p", **plot}]
    elif case == "other run's folder":
        sweep["config"]["optim"]["lr"] = 0.02
    elif case == "other sweep's results":
        foreign = {"format": FORMAT, "version": VERSION, "sweep": "other", "runs": []}
        (tmp_path / "other.json").write_text(json.dumps(foreign))
        args = ["sweep", "--results", tmp_path / "other.json"]
    else:
        (tmp_path / "metrics.json").write_text(json.dumps({"loss": 1.0}))
        args = ["report", tmp_path / "metrics.json"]
    spec = write_sweep(tmp_path / "bad.yaml", sweep)
    if args[0] == "sweep":
        args.insert(1, spec)
    before, other_files = files_of(out), files_of(tmp_path)
    code, _, err = cli(args, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    assert files_of(out) == before and files_of(tmp_path) == other_files  # nothing written, nothing trained


def test_published_data_constrained_scaling_law_value():
    # Muennighoff et al. 2023, Figure 1's model: N = 6.34B parameters, D = 242B tokens, U = 25B unique.
    assert PUBLISHED.loss(6.34e9, 242e9, 25e9) == pytest.approx(2.2256, abs=1e-4)
    assert PUBLISHED.loss(8.67e9, 178e9, 25e9) == pytest.approx(2.2270, abs=1e-4)
    assert (PUBLISHED.rd_star, PUBLISHED.rn_star) == (pytest.approx(15.39, abs=5e-3), pytest.approx(5.31, abs=5e-3))
    assert effective_data(1e9, 1e9, 15.39) == 1e9  # one epoch: every token counts
    assert effective_data(1e9, 1e15, 15.39) == pytest.approx(16.39e9)  # saturates at (1 + R_D*) U
    assert 1e9 < effective_data(1e9, 4e9, 15.39) < 4e9  # repeats count, but less than new tokens
    # a run that read only part of its budget (data.epochs < 1) saw only what it read
    assert effective_data(8192, 4096, 15.39) == 4096
    assert PUBLISHED.loss(1e8, 4096, 8192) == PUBLISHED.loss(1e8, 4096, 4096) != PUBLISHED.loss(1e8, 8192, 8192)


def test_rd_star_fit_recovers_the_constant_of_synthetic_runs():
    rng = np.random.default_rng(0)
    tokens = 2.0**21
    unique = [tokens / 2**k for k in range(6)] + [tokens / e for e in (2, 4, 8, 16, 32)]
    seen = unique[:6] + [tokens] * 5  # single-epoch runs on less data, then repeated runs
    params = [1e6] * len(seen)
    losses = [2.0 + 40.0 / effective_data(u, d, 4.0) ** 0.3 for u, d in zip(unique, seen)]
    fit = fit_rd_star(params, seen, unique, np.array(losses) + rng.normal(0, 1e-3, len(losses)))
    assert fit.rd_star == pytest.approx(4.0, rel=0.15) and fit.beta == pytest.approx(0.3, rel=0.1)
    assert not fit.rd_star_at_bound and fit.rmse < 2e-3


def test_rd_star_fit_counts_distinct_settings_and_flags_a_beta_at_its_bound():
    """Runs that differ only by seed are one point: three settings (two seeds each) cannot pin
    down E, B, beta and R_D* of one size, yet the fit printed a precise R_D* (684, 18.5 or 14.1
    by the noise draw). Four settings determine the four unknowns exactly: the fit is exact
    whatever the losses (RMSE ~0) and says nothing either, so it needs one more."""
    unique, seen = [2.0**21, 2.0**19, 2.0**17, 2.0**15] * 2, [2.0**21] * 8
    losses = [2.0 + 40.0 / effective_data(u, d, 15.0) ** 0.3 for u, d in zip(unique, seen)]
    with pytest.raises(ValueError, match=r"needs at least 5 distinct \(params, tokens, unique tokens\) settings "
                                         r"\(1 model size\(s\)\), got 4 \(in 8 finished runs\)"):
        fit_rd_star([1e6] * 8, seen, unique, losses)
    # a loss that falls more steeply than beta's range allows: beta ends at its bound, and says so
    unique = [2.0**21 / 2**k for k in range(5)] + [2.0**21 / e for e in (2, 4, 8)]
    seen = unique[:5] + [2.0**21] * 3
    steep = fit_rd_star([1e6] * 8, seen, unique, [2 + 1e18 / effective_data(u, d, 4.0) ** 3 for u, d in zip(unique, seen)])
    assert steep.beta == 2.0 and steep.beta_at_bound and not fit_rd_star(
        [1e6] * 8, seen, unique, [2 + 40 / effective_data(u, d, 4.0) ** 0.3 for u, d in zip(unique, seen)]).beta_at_bound


def test_report_fits_the_named_groups_and_leaves_out_runs_without_a_parameter_count():
    from jaxaccel.experiments.report import render_report

    def run(name, group, epochs, loss, params=1e6):
        return {"name": name, "group": group, "status": "done", "params": params, "unique_tokens": 2.0**21 / epochs,
                "total_tokens": 2.0**21, "final": {"eval_loss": loss}}

    runs = [run(f"repeat/e={e}", "repeat", e, 3.0 + 0.1 * e) for e in (1, 2, 4, 8, 16)]
    runs += [run("dropout/e=16", "dropout", 16, 2.0), run("repeat/odd", "repeat", 32, 5.0, params=None)]
    doc = {"sweep": "s", "runs": runs, "report": {"scaling_fit": ["repeat"]}}
    text = render_report(doc)  # a null params made report and plot tracebacks
    assert "Fitted to the groups repeat. Fitted on 5 runs" in text and "`dropout/e=16`" not in text
    assert "Left out of the fit: `repeat/odd` (no parameter count)." in text



def test_report_scaling_fit_names_groups_of_the_sweep(tmp_path):
    sweep = {"name": "s", "config": {"output_dir": str(tmp_path / "runs"), "data": {"corpus": "synthetic"}},
             "groups": {"a": {"set": {"data.epochs": 1}}}, "report": {"scaling_fit": ["b"]}}
    with pytest.raises(ConfigError, match=r"report.scaling_fit must be true or a list of this sweep's groups "
                                          r"\(a\), got \['b'\]"):
        load_sweep(write_sweep(tmp_path / "s.yaml", sweep))
    sweep["report"]["scaling_fit"] = ["a"]
    assert load_sweep(write_sweep(tmp_path / "s.yaml", sweep)).report == {"scaling_fit": ["a"]}


def test_a_final_plot_of_several_groups_draws_one_line_per_group():
    """groups: [repeat, ul2] joined both groups' runs into one unlabeled zig-zag line."""
    from jaxaccel.experiments import plots

    class Axes:
        def __init__(self):
            self.lines = {}

        def plot(self, xs, ys, marker=None, label=None):
            self.lines[label] = list(zip(xs, ys))

        def __getattr__(self, name):
            return lambda *a, **k: None

    runs = [{"name": f"{g}/e={e}", "group": g, "status": "done", "epochs": e, "final": {"eval_loss": loss},
             "config": {"model": {"n_experts": 8 if g == "ul2" else 0}}}
            for g, base in (("repeat", 3.0), ("ul2", 4.0)) for e, loss in ((1, base), (4, base + 1))]
    for spec in ({"x": "epochs"}, {"x": "epochs", "groups": ["repeat", "ul2"]}):
        ax = Axes()
        plots._final(ax, {"runs": runs}, spec)
        assert ax.lines == {"repeat": [(1, 3.0), (4, 4.0)], "ul2": [(1, 4.0), (4, 5.0)]}, spec
    # with `lines`, its keys say what a line is, across groups (moe.yaml's moe-vs-dense joins an
    # MoE's 1-epoch run and its 16-epoch run, of two groups)
    runs[3]["group"] = "ul2_dropout"
    ax = Axes()
    plots._final(ax, {"runs": runs}, {"x": "epochs", "lines": "model.n_experts"})
    assert ax.lines == {"n_experts=0": [(1, 3.0), (4, 4.0)], "n_experts=8": [(1, 4.0), (4, 5.0)]}


def test_shipped_sweeps_expand_and_shared_runs_are_the_same_run(tmp_path, capsys):
    """Every configs/experiments file expands; a run name two CPU sweeps share (they share an
    output_dir) is one config, trained once. The pod files plan (dry run) without touching C4."""
    seen: dict[str, dict] = {}
    files = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))
    assert len([f for f in files if not f.stem.endswith("-pod")]) == 6 and len([f for f in files if
                                                                                f.stem.endswith("-pod")]) == 6
    for path in files:
        sweep = load_sweep(path)
        assert sweep.runs and sweep.results_path.startswith(sweep.output_dir)
        for run in sweep.runs:
            config = to_dict(run.config)
            assert seen.setdefault(f"{sweep.output_dir}/{run.name}", config) == config, (path, run.name)
            if path.stem.endswith("-pod"):  # every paper-scale run fits a 64-chip slice
                run.config.check_mesh(run.config.mesh.sizes(64))
                assert run.config.output_dir.startswith("gs://") and run.config.data.corpus.startswith("tfds:")
    shared = load_sweep(ROOT / "configs/experiments/repetition.yaml").run("repeat/epochs=16,unique_tokens=65536")
    assert shared.config.data.unique_tokens * shared.config.data.epochs == 2**20
    code, plan, err = cli(["sweep", ROOT / "configs/experiments/scaling-pod.yaml", f"output_dir={tmp_path}",
                           "--dry-run", "--flops-per-s", "1e16"], capsys)
    assert code == 0, err
    assert "repeat/epochs=256,unique_tokens=134217728  new" in plan and "budgets against it unchecked" in plan


def test_pod_launcher_recreates_a_preempted_slice_and_reruns_the_same_sweep():
    proc = subprocess.run([sys.executable, str(ROOT / "gcp" / "tpu_pod.py"), "sweep", "--name", "tc", "--zone", "z",
                           "--accelerator-type", "v4-64", "--spot", "--config",
                           "configs/experiments/repetition-pod.yaml", "--sweep-args", "output_dir=gs://b/tc",
                           "--dry-run", "--simulate-preemption", "1"], capture_output=True, text=True, check=True)
    steps = []
    for line in proc.stdout.splitlines():
        if line.startswith("+ gcloud"):
            words = line.split()
            steps.append(words[5] if words[5] != "ssh" else ("run" if "--command=cd" in line else "install"))
        elif line.startswith("+ git"):
            steps.append("archive")
    setup = ["archive", "scp", "install"]
    assert steps == ["create", *setup, "run", "describe", "delete", "create", *setup, "run", "delete"]
    runs = [line for line in proc.stdout.splitlines() if "--command=cd ~/jaxaccel && " in line]
    assert len(runs) == 2 and runs[0] == runs[1]
    assert ("python -m jaxaccel.experiments sweep configs/experiments/repetition-pod.yaml --distributed "
            "output_dir=gs://b/tc") in runs[0]
    assert all("--spot" in line for line in proc.stdout.splitlines() if "tpu-vm create" in line)
    assert "is PREEMPTED: recreating it and rerunning the same command" in proc.stdout


def test_label_smoothing_changes_the_objective_but_not_the_logged_loss():
    import jax.numpy as jnp
    import optax

    from jaxaccel.config import ModelConfig
    from jaxaccel.model.transformer import forward, init_params
    from jaxaccel.train.step import loss_and_metrics

    TINY = ModelConfig(vocab_size=97, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=32)
    params = init_params(TINY, jax.random.key(0), "scanned")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, TINY.vocab_size, (2, 17))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((2, 16), np.float32),
             "segment_ids": np.ones((2, 16), np.int32), "positions": np.tile(np.arange(16), (2, 1)),
             "bidirectional": np.zeros((2, 16), bool)}
    objective = jax.jit(lambda p, b, eps: loss_and_metrics(p, TINY, b, None, dropout=False, remat=False,
                                                           training=False, attention="dense", label_smoothing=eps),
                        static_argnums=2)
    plain, m0 = objective(params, batch, 0.0)
    smooth, m1 = objective(params, batch, 0.1)
    logits = jax.jit(forward, static_argnums=1)(params, TINY, jnp.asarray(batch["inputs"]),
                                                 jnp.asarray(batch["positions"]))[0]
    targets = optax.smooth_labels(jax.nn.one_hot(batch["targets"], TINY.vocab_size), 0.1)
    expected = float(jnp.mean(optax.softmax_cross_entropy(logits, targets)))
    assert float(smooth) == pytest.approx(expected, rel=1e-5) and float(smooth) != pytest.approx(float(plain))
    assert float(m1["ce_sum"]) == pytest.approx(float(m0["ce_sum"]), rel=1e-6)  # logged: the plain cross entropy


def test_a_run_written_before_a_setting_existed_still_matches():
    from jaxaccel.config import to_dict
    from jaxaccel.experiments.runner import config_differences
    from jaxaccel.train.config import RunConfig

    planned = to_dict(RunConfig())
    old = json.loads(json.dumps(planned))
    del old["train"]["skip_schedule"], old["train"]["init_from"]  # an older jaxaccel wrote this folder
    assert config_differences(old, planned) == []
    planned["train"]["init_from"] = "runs/deep"  # a new setting, set: a different run
    assert config_differences(old, planned) == [("train.init_from", None, "runs/deep")]
    # moe.priority: a dense run from before it matches; an MoE run from before it was trained
    # in rank order, so it matches a plan of rank and differs from today's default, token
    del old["model"]["moe"]["priority"]
    planned["train"]["init_from"] = None
    assert config_differences(old, planned) == []
    old["model"]["moe"]["n_experts"] = planned["model"]["moe"]["n_experts"] = 8
    assert config_differences(old, planned) == [("model.moe.priority", "rank", "token")]
    planned["model"]["moe"]["priority"] = "rank"
    assert config_differences(old, planned) == []


def test_pod_launcher_waits_out_a_preemption_notice(monkeypatch):
    """A run stopped by a preemption notice exits 143 on a slice still READY (the reclaim comes
    ~30 s later): the launcher must wait for it and recover, not give up as "not a preemption";
    a notice never followed by a reclaim reruns the command on the same slice."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tpu_pod", ROOT / "gcp" / "tpu_pod.py")
    pod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pod)

    class Fake:
        def __init__(self, codes, states):
            self.codes, self.states, self.log = list(codes), list(states), []
            self.restarts = 0  # the launcher's count against --max-restarts

        def execute(self, cmds):
            step = "run" if any("--command=cd ~/jaxaccel && " in " ".join(c) for c in cmds) else "other"
            self.log.append(step)
            return self.codes.pop(0) if step == "run" else 0

        def state(self, args):
            return self.states.pop(0)

        def sleep(self, seconds):
            self.log.append("sleep")

    args = pod.main.__globals__["argparse"].Namespace(
        name="tc", zone="z", project=None, accelerator_type="v4-8", version="v", spot=True, max_restarts=3,
        command="python -m jaxaccel.train configs/pod-1b.yaml --distributed", config=None, sweep_args="",
        dry_run=True, simulate_preemption=0, step="run")
    monkeypatch.setattr(pod, "plan", lambda a, what: [["gcloud", what] + (
        ["--command=cd ~/jaxaccel && x"] if what == "run" else [])])
    reclaimed = Fake([143, 0], ["READY", "READY", "PREEMPTED"])
    assert pod.run_with_recovery(args, reclaimed) == 0
    assert reclaimed.log[:4] == ["run", "sleep", "sleep", "other"] and reclaimed.log.count("run") == 2
    kept = Fake([143, 0], ["READY"] * 20)
    assert pod.run_with_recovery(args, kept) == 0 and kept.log.count("run") == 2 and "other" not in kept.log
    failed = Fake([1], ["READY"])
    assert pod.run_with_recovery(args, failed) == 1 and failed.log == ["run"]


@pytest.mark.parametrize("body,message", [
    ({}, "sweep (a name) is missing or malformed"),
    ({"sweep": "s", "runs": "x"}, "runs (a list of run records)"),
    ({"sweep": "s", "runs": [1, 2]}, "runs (a list of run records)"),
    ({"sweep": "s", "runs": [], "groups": "x"}, "groups (a list of objects)"),
    ({"sweep": "s", "runs": [], "report": [1]}, "report (an object)"),
    # the records and plot specs inside (a traceback from report's table or plot's figure before)
    ({"sweep": "s", "runs": [{"name": "a", "final": "x"}]}, "runs[0] (a): final is not an object"),
    ({"sweep": "s", "runs": [{"name": "a", "wall_s": "5"}]}, "runs[0] (a): wall_s is not a number"),
    ({"sweep": "s", "runs": [{"name": "a", "unique_tokens": "x"}]}, "unique_tokens is not a number"),
    ({"sweep": "s", "runs": [{"name": "a", "final": {"eval_loss": "low"}}]}, "final.eval_loss is not a number"),
    ({"sweep": "s", "runs": [{"name": "a", "curve": {"eval_step": [8, None], "eval_loss": [3.0, 2.0]}}]},
     "curve.eval_step holds a null step"),
    ({"sweep": "s", "runs": [], "groups": [{"name": "g", "set": [1, 2]}]}, "group 'g': set is not an object"),
    ({"sweep": "s", "runs": [], "plots": [{"name": "p", "kind": "final"}]}, "needs x"),
    ({"sweep": "s", "runs": [], "plots": ["p"]}, "plots[0]"),
    ({"sweep": "s", "runs": [], "plots": [{"name": "p", "kind": "pie", "x": "data.epochs"}]}, "kind must be one of"),
    ({"sweep": "s", "runs": [], "plots": [{"name": "../../escape", "x": "data.epochs"}]}, "file-name-safe"),
])
@pytest.mark.parametrize("command", ["report", "plot"])
def test_a_results_file_with_a_malformed_body_is_one_line(tmp_path, capsys, body, message, command):
    """Right format and version, wrong body: one line before anything is written (plot's
    --out folder included), not a KeyError from the middle of a table or figure."""
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"format": FORMAT, "version": VERSION, **body}))
    code, out, err = cli([command, results, "--out", tmp_path / "out"], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_a_diverged_run_is_marked_in_the_plots_not_drawn_as_a_result():
    """Its final value is the last evaluation before the loss went non-finite: a red cross off
    the line in `final`, a dashed '(diverged)' curve, a hatched '(diverged)' bar."""
    from jaxaccel.experiments import plots

    def run(name, lr, loss, status="done"):  # a diverged record has no steps or total_tokens
        done = {"steps": 8, "total_tokens": 2048} if status == "done" else {"stream_tokens_per_step": 256}
        return {"name": name, "group": "", "status": status, "config": {"optim": {"lr": lr}}, "tokens_per_step": 512,
                "final": {"eval_loss": loss}, "curve": {"eval_step": [4, 8], "eval_loss": [loss + 1, loss]}, **done}

    doc = {"sweep": "s", "runs": [run("a", 0.01, 3.0), run("b", 0.02, 2.5), run("c", 1e30, 4.2, "diverged")]}
    plt = plots._pyplot()
    fig, axes = plt.subplots(1, 3)
    try:
        assert plots._final(axes[0], doc, {"x": "optim.lr", "y": "final_eval_loss"})
        (line,) = axes[0].lines
        assert list(line.get_ydata()) == [3.0, 2.5]  # the good runs only
        (cross,) = axes[0].collections
        assert cross.get_offsets().tolist() == [[1e30, 4.2]] and "diverged" in cross.get_label()
        assert plots._curves(axes[1], doc, {})
        styles = {ln.get_label(): ln.get_linestyle() for ln in axes[1].lines}
        assert styles == {"a": "-", "b": "-", "c (diverged)": "--"}
        # in stream tokens, as the others (it was drawn in steps: x = 4, 8 among 1024, 2048; a
        # batch's 512 tokens per step, UL2's longer model rows, would stretch it)
        assert [list(ln.get_xdata()) for ln in axes[1].lines] == [[1024, 2048]] * 3
        assert plots._bar(axes[2], doc, {})
        assert [t.get_text() for t in axes[2].get_xticklabels()] == ["a", "b", "c (diverged)"]
        assert [p.get_hatch() for p in axes[2].patches] == [None, None, "xx"]
    finally:
        plt.close(fig)


@pytest.mark.parametrize("command,args,message", [
    ("experiments", ["tokenselect", "--lengths", "256,256"], "--lengths '256,256': 256 is given twice"),
    ("experiments", ["tokenselect", "--tasks", "passkey,,kv"], "without empty items"),
    ("experiments", ["skipdecode", "--speedups", "2,2"], "--speedups '2,2': 2 is given twice"),
    ("experiments", ["duo", "--router-budgets", "", "--save-router", "ROUTER"], "--save-router needs --router-budgets"),
    ("experiments", ["duo", "--model", "builtin:duo", "--config", "configs/experiments/repetition.yaml", "--out",
                     "OUT"], "--config "),
    ("bench", ["tokenselect", "--lengths", "64,64"], "64 is given twice"),
    ("bench", ["acceptance", "--max-rank", "100000000"], "is more than the vocabulary's"),
])
def test_lists_given_twice_and_impossible_options_are_refused(tmp_path, capsys, command, args, message):
    """From an audit: a length given twice ran (and reported) twice; --save-router with no
    router budgets exited 0 and saved nothing; --max-rank 10^8 printed 700 MB and cached 500
    MB; a broken duo --config blamed --seq-len."""
    from jaxaccel.bench.__main__ import main as bench_main

    args = [a.replace("ROUTER", str(tmp_path / "router")).replace("OUT", str(tmp_path / "out")) for a in args]
    main = experiments_main if command == "experiments" else bench_main
    try:
        code = run_cli(main, args)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err[-2000:]
    assert "--seq-len" not in lines[0] and "Traceback" not in err
    assert not (tmp_path / "router").exists() and not (tmp_path / "out").exists()


def test_help_shows_defaults_of_zero():
    """0 == False: the help formatter hid every default of 0 (--seed, --temperature)."""
    from jaxaccel.cli import DefaultsHelpFormatter

    import argparse
    p = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--flag", action="store_true", help="a switch")
    p.add_argument("--empty", default="", help="nothing")
    text = p.format_help()
    assert "random seed (default: 0)" in text and "a switch\n" in text and "(default: )" not in text


def test_plot_replaces_no_file_when_one_figure_fails_and_report_shows_no_nan_wall(tmp_path, monkeypatch):
    from jaxaccel.experiments import plots
    from jaxaccel.experiments.report import render_report

    run = {"name": "a", "group": "", "status": "done", "config": {"optim": {"lr": 0.1}}, "wall_s": float("nan"),
           "final": {"eval_loss": 3.0}, "curve": {"eval_step": [4, 8], "eval_loss": [4.0, 3.0]}}
    doc = {"sweep": "s", "runs": [run], "plots": [{"name": "first", "kind": "curves"},
                                                  {"name": "second", "kind": "bar", "y": "final_eval_loss"}]}
    (tmp_path / "first.png").write_bytes(b"earlier")
    monkeypatch.setattr(plots, "_bar", lambda ax, doc, spec: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        plots.plot_results(doc, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.png"]
    assert (tmp_path / "first.png").read_bytes() == b"earlier"  # the earlier set of plots stays whole
    monkeypatch.undo()
    assert [p.name for p in plots.plot_results(doc, tmp_path)] == ["first.png", "second.png"]
    assert (tmp_path / "first.png").read_bytes()[:4] == b"\x89PNG"
    row = next(line for line in render_report(doc).splitlines() if line.startswith("| `a`"))
    assert "nan" not in row and row.rstrip(" |").endswith("–")


def test_null_sections_of_a_results_file_read_as_empty_and_zipped_keys_share_a_line(tmp_path, capsys):
    """`final`: null, no `settings`, a group's `zip`: null passed the shape check and then were
    tracebacks in report and plot; and without `plots:` a zipped group's final plot split its
    lines by the key zipped with x, one point per line."""
    from jaxaccel.experiments.plots import default_specs

    runs = [{"name": f"r{i}", "group": "g", "status": "done", "final": None, "curve": {"eval_step": [8],
             "eval_loss": [None]}} for i in range(2)]
    doc = {"format": FORMAT, "version": VERSION, "sweep": "s", "runs": runs,
           "groups": [{"name": "g", "set": None, "zip": None, "axes": {"model.d_model": [16, 32]}}]}
    results = tmp_path / "r.json"
    results.write_text(json.dumps(doc))
    for command in ("report", "plot"):
        code, out, err = cli([command, results, "--out", tmp_path / command], capsys)
        assert code == 0, err

    def run(epochs, unique, d_model):
        return {"name": f"{epochs},{d_model}", "group": "g", "settings": {
            "data.epochs": epochs, "data.unique_tokens": unique, "model.d_model": d_model}}

    zipped = {"data.epochs": [1, 2, 4], "data.unique_tokens": [400, 200, 100]}
    doc = {"runs": [run(e, u, d) for e, u in zip(*zipped.values()) for d in (16, 32)],
           "groups": [{"name": "g", "zip": zipped, "axes": {"model.d_model": [16, 32]}}]}
    final = next(s for s in default_specs(doc) if s["kind"] == "final")
    assert final["x"] == "data.epochs" and final["lines"] == ["model.d_model"]  # not data.unique_tokens
    doc["groups"][0]["axes"] = {}
    doc["runs"] = [r for r in doc["runs"] if r["settings"]["model.d_model"] == 16]
    assert next(s for s in default_specs(doc) if s["kind"] == "final")["lines"] is None  # one line of 3 points


def test_a_diverged_run_records_the_stream_tokens_of_its_steps(toy):
    """A diverged run has no data stats (the trainer raised): its curve's token scale comes from
    the plan, and equals what a finished run of the same data read per step."""
    from jaxaccel.experiments.runner import _stream_tokens_per_step

    path, _, doc = toy
    sweep = load_sweep(path)
    for record in doc["runs"]:
        planned = _stream_tokens_per_step(sweep.run(record["name"]), {})
        assert planned == record["total_tokens"] / record["steps"] == record["stream_tokens_per_step"] == 256


def test_report_says_why_the_gap_column_or_a_run_of_the_fit_is_left_out():
    """A reference or baseline run without a final validation loss (diverged, no eval) dropped the
    gap column without a word, and the scaling fit dropped such runs silently."""
    from jaxaccel.experiments.report import render_report

    def run(name, status="done", loss=3.0, **extra):
        return {"name": name, "group": "", "status": status, "params": 1000, "unique_tokens": 100,
                "total_tokens": 400, "final": {} if loss is None else {"eval_loss": loss}, **extra}

    doc = {"sweep": "s", "runs": [run("unique", loss=None), run("repeated", loss=3.5), run("dropout"),
                                  run("blown", status="diverged", loss=9.0)],
           "report": {"reference": "unique", "baseline": "repeated", "scaling_fit": True}}
    text = render_report(doc)
    assert "gap recovered" not in text
    assert "(gap column left out: no final validation loss for unique)" in text
    assert "Left out of the fit: `unique` (no final validation loss); `blown` (diverged)." in text
    doc["runs"][0]["final"] = {"eval_loss": 3.5}
    assert "have the same final validation loss, 3.5000" in render_report(doc)
    doc["runs"][0]["final"] = {"eval_loss": 2.5}
    text = render_report(doc)
    assert "gap recovered" in text and "gap column left out" not in text
    assert "`unique` (no" not in text and "`blown` (diverged)" in text


def test_a_sweep_does_not_train_beside_runs_of_another_corpus_version(tmp_path):
    """A corpus file edited (or `corpus: stdlib` under another Python) after some runs finished:
    the sweep trained the rest on the new corpus and vocabulary, and one results file and
    report mixed them without a word."""
    from jaxaccel.data.corpus import open_corpus
    from jaxaccel.experiments.report import render_report
    from jaxaccel.experiments.results import SweepError
    from jaxaccel.experiments.runner import RunState, check_same_corpora

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"f{i}.py").write_text(f"x = {i}\n" * 20)
    sweep = toy_sweep(tmp_path / "cache", tmp_path / "runs")
    sweep["config"]["data"]["corpus"] = f"{corpus}/*.py"
    runs = load_sweep(write_sweep(tmp_path / "s.yaml", sweep)).runs
    sha = open_corpus(f"{corpus}/*.py").sha256
    done = {"name": runs[0].name, "status": "done", "data": {"manifest_sha256": sha}}
    states = {runs[0].name: RunState("done", 8, done), **{r.name: RunState("new") for r in runs[1:]}}
    check_same_corpora(runs, states)  # the same corpus: fine
    (corpus / "f1.py").write_text("y = 2\n")
    with pytest.raises(SweepError, match=rf"run '{runs[0].name}' was trained on another version of corpus .* "
                                         rf"\(manifest {sha[:12]}, now.*or remove its record from the results file "
                                         rf"R.json to retrain it"):
        check_same_corpora(runs, states, "R.json")  # its folder is gone: the record is what holds it
    (tmp_path / "runs" / runs[0].name).mkdir(parents=True)
    with pytest.raises(SweepError, match="or move the run's folder away to retrain it"):
        check_same_corpora(runs, states, "R.json")
    other = {**done, "name": runs[1].name, "data": {"manifest_sha256": "f" * 64}}
    text = render_report({"sweep": "toy", "runs": [done, other]})
    assert "trained on 2 different versions of their corpora" in text
    assert "different versions" not in render_report({"sweep": "toy", "runs": [done]})


@pytest.mark.parametrize("part", ["set", "axes", "zip"])
def test_a_section_given_whole_in_a_sweep_is_refused(tmp_path, part):
    """`set: {data: {epochs: 2}}` replaced the whole data section: the run trained on the
    default corpus and vocabulary, the base file's budget dropped, without a word."""
    sweep = toy_sweep(tmp_path / "cache", tmp_path / "runs")
    value = {"epochs": 2}
    group = {"set": {"data": value}} if part == "set" else {part: {"data": [value]}}
    sweep.update(axes=None, groups={"g": group})
    with pytest.raises(ConfigError, match=r"'data' in group 'g' .*is given a whole section, which would drop the "
                                          r"base config's other data\.\* settings: set its keys one by one, e\.g\. "
                                          r"'data\.\w+'"):
        load_sweep(write_sweep(tmp_path / "s.yaml", sweep))
    sweep["groups"]["g"] = {"set": {"model.rope_scaling": None}}  # a section set to null is a value, not a merge
    load_sweep(write_sweep(tmp_path / "s.yaml", sweep))
