"""`python -m jaxaccel.bench`: bad input is one line and exit 2 before the expensive work, and
the figures it reports are ones it measured (from a review of jaxaccel/bench)."""
import json
import math
import pathlib
import statistics
import subprocess
import types
import warnings

import pytest

from jaxaccel.bench.__main__ import main as bench_main
from conftest import run_main
from jaxaccel.errors import InvalidArgumentError

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY_YAML = str(ROOT / "configs" / "tiny.yaml")


def run(argv, capsys):
    return run_main(bench_main, argv, capsys)


def refusal(code, out, err) -> str:
    """The message of a usage refusal: exit 2 with exactly one `error: ...` line on stderr;
    "" for anything else (a success, a traceback, several lines), so `needle in refusal(...)`
    fails then."""
    if code != 2 or not err.startswith("error: ") or err.count("\n") != 1:
        return ""
    return err[len("error: "):].rstrip("\n")


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if anything loads a model's parameters."""
    import jaxaccel

    def load(*args, **kwargs):
        raise AssertionError(f"a model was loaded: {args}")

    monkeypatch.setattr(jaxaccel, "load", load)


@pytest.fixture(scope="module")
def other_vocab_model(tmp_path_factory):
    """A model folder whose jaxaccel.json describes a model with another vocabulary than the
    shipped ones (4096 tokens): enough for every check that reads configs only."""
    from jaxaccel.decode.lm import DRAFT_MODEL_DIR

    meta = json.loads((DRAFT_MODEL_DIR / "jaxaccel.json").read_text())
    meta["model"]["vocab_size"] = 97
    folder = tmp_path_factory.mktemp("vocab97")
    (folder / "jaxaccel.json").write_text(json.dumps(meta))
    return folder


class FakeLM:
    """Just what `spec.run_method` and `decode.bench_jaxaccel` call: generate() with stats."""

    def __init__(self, decode_s=None, prefill_s=None, host_s=0.0):
        self.calls = []
        self._method_memory = {}
        self.decode_s = decode_s or {}  # max_new_tokens -> list of decode_s, consumed in order
        self.prefill_s = prefill_s or {}  # the same for prefill_s (default 0.1)
        self.host_s = host_s  # each call's wall time past its decode_s (setup, result conversion)
        self.clock = 0.0  # a fake time.perf_counter the calls advance

    def generate(self, prompts, max_new_tokens, **kwargs):
        self.calls.append([list(p) for p in prompts])
        seconds = self.decode_s[max_new_tokens].pop(0) if self.decode_s.get(max_new_tokens) else 1.0
        prefill = self.prefill_s[max_new_tokens].pop(0) if self.prefill_s.get(max_new_tokens) else 0.1
        self.clock += seconds + self.host_s
        stats = {"compile_s": 0.0, "decode_s": seconds, "prefill_s": prefill,
                 "new_tokens": len(prompts) * max_new_tokens, "row_forwards": len(prompts) * max_new_tokens}
        return types.SimpleNamespace(stats=stats)


# ----------------------------------------------------------------------------- 1. spec's HF comparison


def test_spec_hf_comparison_needs_no_batch1_greedy_row():
    from jaxaccel.bench.spec import hf_comparison

    rows = [{"batch": 2, "temperature": 0.5, "method": m, "template": t, "hot_start": False, "tokens_per_s": 50.0}
            for m, t in (("autoregressive", None), ("pld", None), ("recycling", "auto"))]
    ours, note = hf_comparison(rows, autoregressive=40.0)
    assert ours == {"autoregressive": 40.0} and "no batch-1, T=0 row" in note
    rows += [{"batch": 1, "temperature": 0.0, "method": m, "template": t, "hot_start": hot, "tokens_per_s": v}
             for m, t, hot, v in (("pld", None, False, 70.0), ("recycling", "auto", False, 90.0),
                                  ("recycling", "paper", False, 1.0), ("recycling", "auto", True, 2.0))]
    ours, note = hf_comparison(rows, autoregressive=40.0)
    assert ours == {"autoregressive": 40.0, "pld": 70.0, "recycling": 90.0} and note == ""
    ours, note = hf_comparison(rows, autoregressive=None)  # no sweep (--sweep none): the table's, if any
    assert ours == {"pld": 70.0, "recycling": 90.0} and "autoregressive not compared" in note
    rows.append({"batch": 1, "temperature": 0.0, "method": "autoregressive", "template": None, "hot_start": False,
                 "tokens_per_s": 45.0})
    assert hf_comparison(rows, autoregressive=None) == ({"autoregressive": 45.0, "pld": 70.0, "recycling": 90.0}, "")


# ----------------------------------------------------------------------------- 2, 10. prompts and groups


def test_run_method_refuses_a_batch_without_a_full_group():
    from jaxaccel.bench.spec import run_method

    lm = FakeLM()
    with pytest.raises(InvalidArgumentError, match="batch 2 needs at least 2 prompts, got 1"):
        run_method(lm, [[1, 2, 3]], 2, 4, 1, "autoregressive", 0.0)
    assert lm.calls == []


def test_run_method_reports_which_prompts_it_decoded():
    from jaxaccel.bench.spec import decoded_note, run_method

    prompts = [[i + 1] for i in range(11)]  # 8 held-out files + 3 natural-language prompts, as `bench spec`
    lm = FakeLM()
    res = run_method(lm, prompts, 4, 2, 1, "autoregressive", 0.0)
    assert res["prompts_decoded"] == 8 and res["prompts_total"] == 11
    assert {p[0] for call in lm.calls for p in call} == set(range(1, 9))  # the partial group never ran
    note = decoded_note([{"batch": 1, "prompts_decoded": 11, "prompts_total": 11},
                         {"batch": 4, **{k: res[k] for k in ("prompts_decoded", "prompts_total")}}], heldout=8)
    assert "At batch 4 a pass decodes the first 8 of the 11 prompts (2 groups of 4)" in note
    assert "(3 natural-language prompts) is not run" in note and "batch 1" not in note
    assert decoded_note([{"batch": 1, "prompts_decoded": 11, "prompts_total": 11}], heldout=8) == ""


def test_run_method_times_whole_calls_as_the_transformers_baseline_is(monkeypatch):
    """Each call by the wall clock around it (decode_s alone left out 1-3% of host work that
    transformers' timing includes); the loop rate from decode_s minus prefill_s."""
    from jaxaccel.bench import spec

    lm = FakeLM({4: [0.2, 0.3, 0.25, 0.35, 0.26]}, {4: [0.1, 0.1, 0.05, 0.05, 0.06]}, host_s=0.01)
    monkeypatch.setattr(spec.time, "perf_counter", lambda: lm.clock)
    res = spec.run_method(lm, [[1], [2]], 1, 4, 2, "autoregressive", 0.0)  # warm-up, then 2 passes of 2 groups
    assert res["runs_tokens_per_s"] == pytest.approx([8 / 0.57, 8 / 0.63])
    assert res["decode_phase_tokens_per_s"] == pytest.approx(statistics.median([8 / 0.4, 8 / 0.5]))


@pytest.mark.parametrize("argv,needle", [
    (["duo", "--batches", "2", "--files", "1", "--runs", "1", "--new-tokens", "2", "--prompt-tokens", "8"],
     "batch 2 needs at least 2 prompts, but --files 1 gives at most 1"),
    (["skipdecode", "--batches", "1,8", "--files", "4"], "batch 8 needs at least 8 prompts"),
    (["spec", "--batches", "5", "--files", "1", "--no-hf"], "--files 1 + 3 natural-language prompts gives at most 4"),
    (["dyspec", "--batches", "12"], "batch 12 needs at least 12 prompts"),
])
def test_batches_larger_than_the_prompt_set_are_refused_up_front(argv, needle, capsys, no_model_loads):
    assert needle in refusal(*run(argv, capsys))


def test_skipdecode_bench_refuses_a_generation_length_that_is_not_its_schedules(capsys, no_model_loads):
    """64 + 300 new tokens over a 256-position schedule ran 108 steps at its minimum depth and
    labelled the row with its nominal speedup (3.28 mean layers measured as "2x")."""
    needle = "--prompt-tokens + --new-tokens (364) must equal --max-length (256)"
    assert needle in refusal(*run(["skipdecode", "--new-tokens", "300"], capsys))


def test_no_heldout_file_long_enough_is_refused_before_timing(capsys):
    code, out, err = run(["duo", "--batches", "1", "--files", "1", "--runs", "1", "--new-tokens", "2",
                          "--prompt-tokens", "100000"], capsys)
    assert "no held-out file of the default corpus is at least 200000 tokens long" in refusal(code, out, err), err
    assert "round" not in err
    from jaxaccel.bench.spec import check_prompts

    with pytest.raises(InvalidArgumentError, match="batch 4 needs at least 4 prompts, but there are 3"):
        check_prompts([[1]] * 3, 0 + 1, 8, [1, 4])


# ----------------------------------------------------------------------------- 3, 12. train --compare-devices


@pytest.mark.parametrize("devices,needle", [
    ("3", "--compare-devices 3 with"), ("0", "--compare-devices must be >= 1"), ("-2", "--compare-devices must be >= 1"),
])
def test_train_compare_devices_is_checked_before_measuring(devices, needle, capsys):
    code, out, err = run(["train", "--configs", TINY_YAML, "--compare-devices", devices], capsys)
    assert needle in refusal(code, out, err), err
    assert "matmul peak" not in err
    if devices == "3":
        assert "must be a multiple of mesh data*fsdp*expert (3)" in err


def test_a_failed_child_process_is_one_project_error():
    from jaxaccel.bench.common import SubprocessFailed, subprocess_failure

    e = subprocess_failure(subprocess.CompletedProcess([], 1, "", ""), "the 8-device run")
    assert isinstance(e, SubprocessFailed) and str(e) == "the 8-device run failed: exit status 1, nothing on stderr"
    tb = "Traceback (most recent call last):\n  File x\nValueError: boom\n\n"
    assert str(subprocess_failure(subprocess.CompletedProcess([], 1, "", tb), "x")) == "x failed: ValueError: boom"
    assert str(subprocess_failure(subprocess.CompletedProcess([], 2, "", "error: bad\n"), "x")) == "x failed: bad"


# ----------------------------------------------------------------------------- 4. startup


def test_startup_refuses_a_folder_that_is_no_model(tmp_path, capsys):
    message = refusal(*run(["startup", "--model", str(tmp_path), "--runs", "1"], capsys))
    assert "is neither a jaxaccel checkpoint" in message and str(tmp_path) in message
    assert "unknown built-in model 'nope'" in refusal(*run(["startup", "--model", "builtin:nope"], capsys))


def test_startup_children_run_without_jaxs_own_cache_on_this_backend(monkeypatch):
    """A JAX cache folder in the environment wins over JAXACCEL_COMPILE_CACHE: the "cache off"
    and "cold" runs read it. The children get jaxaccel's cache only, and pick their backend
    as this process does (CPU was forced when JAX_PLATFORMS was unset)."""
    from jaxaccel.bench import startup

    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/somewhere/full")
    monkeypatch.setenv("JAX_ENABLE_COMPILATION_CACHE", "true")
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    seen = []

    def fake_run(cmd, **kw):
        seen.append(kw["env"])
        return subprocess.CompletedProcess(cmd, 0, json.dumps({"compile_s": 1.0, "programs": 1}), "")

    monkeypatch.setattr(startup.subprocess, "run", fake_run)
    startup.first_calls("builtin:default", ["autoregressive"])
    startup.decode_wall("builtin:default", 1, "/tmp/empty-cache")
    assert [env["JAXACCEL_COMPILE_CACHE"] for env in seen] == ["off", "/tmp/empty-cache", "/tmp/empty-cache"]
    for env in seen:
        assert "JAX_COMPILATION_CACHE_DIR" not in env and "JAX_ENABLE_COMPILATION_CACHE" not in env
        assert "JAX_PLATFORMS" not in env  # unset here: the children choose as this process would


def test_startup_child_failure_without_stderr_is_one_line(monkeypatch):
    from jaxaccel.bench import startup
    from jaxaccel.bench.common import SubprocessFailed

    monkeypatch.setattr(startup.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", ""))
    with pytest.raises(SubprocessFailed, match="python -m jaxaccel.decode failed: exit status 1"):
        startup.decode_wall("builtin:default", 1, "off")
    with pytest.raises(SubprocessFailed, match="method 'pld' failed: exit status 1"):
        startup.first_calls("builtin:default", ["pld"])


# ----------------------------------------------------------------------------- 5, 9. drafts, patterns, temperatures


def test_acceptance_refuses_a_draft_with_another_vocabulary(other_vocab_model, capsys, no_model_loads):
    message = refusal(*run(["acceptance", "--draft", str(other_vocab_model)], capsys))
    assert "the draft's vocabulary (97 tokens) differs from the target's (4096)" in message


def test_dyspec_refuses_a_draft_with_another_vocabulary_before_timing(other_vocab_model, capsys, no_model_loads):
    code, out, err = run(["dyspec", "--draft", str(other_vocab_model), "--batches", "1"], capsys)
    assert "the draft's vocabulary (97 tokens) differs" in refusal(code, out, err), err
    assert "autoregressive" not in out + err


def test_draft_pair_check_on_loaded_models(tiny_lm):
    import dataclasses

    from jaxaccel.bench.draft import check_pair

    check_pair(tiny_lm, tiny_lm)
    other = types.SimpleNamespace(config=dataclasses.replace(tiny_lm.config, vocab_size=96), tokenizer=None)
    with pytest.raises(InvalidArgumentError, match="vocabulary"):
        check_pair(tiny_lm, other)


@pytest.mark.parametrize("pattern,needle", [("BXBSBSBS", "routes must be"), ("BSB", "(8 letters)")])
def test_duo_pattern_is_checked_before_loading(pattern, needle, capsys, no_model_loads):
    assert needle in refusal(*run(["duo", "--pattern", pattern, "--batches", "1"], capsys))


def test_duo_refuses_a_model_that_is_not_duo(capsys, no_model_loads):
    assert "not a Duo-LLM model" in refusal(*run(["duo", "--model", "builtin:draft", "--batches", "1"], capsys))


@pytest.mark.parametrize("which,values", [("spec", "0,nan"), ("spec", "inf"), ("dyspec", "nan"), ("spec", "-1")])
def test_temperatures_must_be_finite(which, values, capsys, no_model_loads):
    argv = [which, "--temperatures", values, *(["--no-hf"] if which == "spec" else [])]
    assert "temperatures must be finite numbers >= 0" in refusal(*run(argv, capsys))


# ----------------------------------------------------------------------------- 6, 11. tokenselect


def test_tokenselect_refuses_a_prefill_that_cannot_fit_before_any_timing(capsys):
    code, out, err = run(["tokenselect", "--lengths", "64", "--batches", "1", "--prefill-length", "10000000"], capsys)
    message = refusal(code, out, err)
    assert "KV cache" in message and "use a shorter --prefill-length" in message, err
    assert "attention," not in err


def test_tokenselect_prefill_of_the_decode_rows_is_a_warm_median(tiny_lm, monkeypatch):
    from jaxaccel.bench import tokenselect

    calls = []

    def prefill_s(lm, method, options, prompts, cache_len, runs, keep=False, warmup=True):
        calls.append({"runs": runs, "warmup": warmup})
        return (0.5, None) if keep else 0.5

    monkeypatch.setattr(tokenselect, "prefill_s", prefill_s)
    monkeypatch.setattr(tokenselect, "attention_ms", lambda *a, **k: 1.0)
    monkeypatch.setattr(tokenselect, "decode_speed", lambda *a, **k: {"tokens_per_s": 10.0,
                                                                      "selection_cache_hit_rate": None})
    result = tokenselect.run(tiny_lm, (16,), (1,), new_tokens=2, runs=3, prefill_length=0)
    assert calls == [{"runs": 3, "warmup": True}]
    assert result["decode"][0]["tokenselect_prefill_s"] == 0.5


# ----------------------------------------------------------------------------- 7, 8. decode


class FakeProbe:
    def __init__(self):
        self.samples = []

    def sample(self):
        self.samples.append(1e9)

    def median(self):
        return 1e9


def test_decode_bench_times_whole_calls_and_each_call_minus_its_own_prefill(monkeypatch):
    """The totals are the wall clock around each call, as transformers' are (decode_s left
    out the host work, 1-4% of a call); the decode phase is each call's decode_s minus its own
    prefill_s (a separate 1-token call had a smaller cache bucket than the timed calls)."""
    from jaxaccel.bench import decode as bench_decode
    from jaxaccel.bench.decode import bench_jaxaccel, format_row, markdown

    lm = FakeLM({8: [1.0, 0.05, 0.02, 0.03]}, {8: [0.5, 0.01, 0.015, 0.02]}, host_s=0.004)
    monkeypatch.setattr(bench_decode.time, "perf_counter", lambda: lm.clock)
    res = bench_jaxaccel(lm, [[1, 2]], 8, 3, FakeProbe())
    assert [len(c) for c in lm.calls] == [1] * 4 and math.isclose(res["tokens_per_s"], 8 / 0.034)
    # loops 0.04, 0.005, 0.01 -> median 0.01; prefill median 0.015
    assert math.isclose(res["decode_phase_tokens_per_s"], 8 / 0.01) and math.isclose(res["prefill_s"], 0.015)
    lm = FakeLM({2: [1.0, 0.010, 0.012]}, {2: [0.1, 0.011, 0.010]})  # a call no longer than its prefill
    monkeypatch.setattr(bench_decode.time, "perf_counter", lambda: lm.clock)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = bench_jaxaccel(lm, [[1, 2]], 2, 2, FakeProbe())
    assert res["decode_phase_tokens_per_s"] is None
    assert any("decode phase not measured" in str(w.message) for w in caught)
    row = {"model": "7m", "params_m": 7.0, "dtype": "bfloat16", "batch": 1, "jaxaccel_tok_s": 100.0,
           "jaxaccel_runs": [100.0], "compile_s": 1.0, "prefill_s": 0.01, "bandwidth_gb_s": 10.0,
           "decode_phase_tok_s": None, "roofline_all_tok_s": 1000.0, "roofline_streamed_tok_s": 1100.0,
           "roofline_all_frac": None, "roofline_streamed_frac": None}
    machine = {"cpu": "cpu", "cores": 2, "jax": "0", "backend": "cpu", "date": "today"}
    table = markdown({"rows": [row], "machine": machine, "prompt_len": 8, "new_tokens": 2, "runs": 2,
                      "dtype": "bfloat16"})
    assert "| 7m | 7.0M | bfloat16 | 1 | 100 | – | – | — |" in table and "— / —" in table
    assert "decode phase — tok/s" in format_row(row) and "bfloat16" in format_row(row)


def test_hf_baseline_runs_in_the_bench_dtype():
    torch = pytest.importorskip("torch")
    from jaxaccel.bench.decode import torch_dtype

    assert torch_dtype("bfloat16") is torch.bfloat16 and torch_dtype("float32") is torch.float32


def test_a_benchmark_that_dies_keeps_its_partial_results_beside_an_earlier_complete_file(tmp_path, monkeypatch,
                                                                                       capsys):
    """`bench kernels --json F` rewrote F after every case: killed after the first, an earlier
    complete F was replaced by one case, with nothing marking it incomplete. The results so far
    now go to F.partial ("complete": false); F is written whole at the end, and the sidecar
    removed."""
    from jaxaccel.bench import kernels
    from jaxaccel.bench.__main__ import main as bench_main
    from jaxaccel.errors import JaxaccelError

    out = tmp_path / "kernels.json"
    out.write_text('{"cases": ["an earlier complete run"]}')

    def dies_after_one_case(runs, quick, progress, on_row):
        on_row({"cases": [{"name": "first"}], "failed": 0})
        raise JaxaccelError("the compiler aborted")

    monkeypatch.setattr(kernels, "run", dies_after_one_case)
    code, _, err = run_main(bench_main, ["kernels", "--json", out], capsys)
    assert code == 2 and "the compiler aborted" in err
    assert json.loads(out.read_text()) == {"cases": ["an earlier complete run"]}
    assert json.loads((tmp_path / "kernels.json.partial").read_text()) == {
        "cases": [{"name": "first"}], "failed": 0, "complete": False}

    def finishes(runs, quick, progress, on_row):
        on_row({"cases": [{"name": "first"}], "failed": 0})
        return {"cases": [{"name": "first"}, {"name": "second"}], "failed": 0}

    monkeypatch.setattr(kernels, "run", finishes)
    monkeypatch.setattr(kernels, "markdown", lambda result: "table")
    code, out_text, _ = run_main(bench_main, ["kernels", "--json", out], capsys)
    assert code == 0 and out_text.strip() == "table"
    assert json.loads(out.read_text())["cases"] == [{"name": "first"}, {"name": "second"}]
    assert not (tmp_path / "kernels.json.partial").exists()


# ----------------------------------------------------------------------------- review of 2026-12-04


def test_spec_sweep_templates_repeat_widths_and_bad_ones_fail_before_timing(capsys, no_model_loads, monkeypatch):
    """--sweep 4-4-2 (the --help example) was refused as "4 is given twice"; a bad width was
    found only after the main table had been timed (and that table lost)."""
    from jaxaccel.bench import spec

    seen = {}
    monkeypatch.setattr(spec, "run", lambda *a, **k: seen.setdefault("sweep", a[7]) and {})
    monkeypatch.setattr(spec, "markdown", lambda result: "")
    code, out, err = run(["spec", "--no-hf", "--sweep", "4-4-2,1-1-1,paper"], capsys)
    assert code == 0, err
    assert seen["sweep"] == ((4, 4, 2), (1, 1, 1), "paper")
    assert "width 0" in refusal(*run(["spec", "--no-hf", "--sweep", "0-1"], capsys))
    assert "is not a template" in refusal(*run(["spec", "--no-hf", "--sweep", "4-x"], capsys))


def test_an_empty_json_name_is_refused(capsys, no_model_loads):
    assert refusal(*run(["decode", "--models", "7m", "--no-hf", "--json", ""], capsys)) == "--json needs a file name"


def test_decode_refuses_a_model_the_hf_baseline_cannot_export_before_timing_any(tmp_path, capsys, monkeypatch):
    import yaml

    from jaxaccel.bench import decode

    monkeypatch.setattr(decode, "run", lambda *a, **k: pytest.fail("timing started"))
    monkeypatch.setattr("jaxaccel.bench.__main__.require_peers", lambda: None)
    moe = yaml.safe_load(open(TINY_YAML))["model"] | {"moe": {"n_experts": 4, "top_k": 2}}
    (tmp_path / "moe.yaml").write_text(yaml.safe_dump(moe))
    message = refusal(*run(["decode", "--models", f"7m,{tmp_path / 'moe.yaml'}"], capsys))
    assert "model moe: MoE models cannot be exported" in message and "--no-hf" in message


def test_dyspec_checks_the_drafts_length_before_the_first_baseline(tiny_lm):
    from jaxaccel.bench.draft import check_draft_length

    n = tiny_lm.config.max_seq_len
    check_draft_length(tiny_lm, n - 16, [8, 16], ["sps", "dyspec"], "d")  # dyspec: at most max_depth 16 deep
    with pytest.raises(InvalidArgumentError, match=rf"draft's maximum length \({n}\) is shorter than the {n + 1} "):
        check_draft_length(tiny_lm, n - 15, [8, 16], ["sps", "dyspec"], "d")
