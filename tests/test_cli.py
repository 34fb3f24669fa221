"""The command lines: output formats, and a one-line error + exit 2 for every bad input."""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import warnings

import pytest

import jaxaccel
from conftest import TINY, run_main, with_default_sigint
from jaxaccel.bench.__main__ import main as bench_main
from jaxaccel.convert.__main__ import main as convert_main
from jaxaccel.decode.__main__ import main as decode_main
from jaxaccel.errors import ConfigError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_params):
    return jaxaccel.from_params(TINY, tiny_params, eos_token_ids=()).export_hf(tmp_path_factory.mktemp("m"))


run = run_main


def test_decode_json_output(model_dir, capsys, tiny_lm):
    code, out, err = run(decode_main, ["--model", str(model_dir), "--prompt-ids", "1, 2,3", "--prompt-ids", " 4,5,",
                                       "--max-new-tokens", "6", "--output", "json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert [r["prompt_ids"] for r in doc["results"]] == [[1, 2, 3], [4, 5]]
    expected = tiny_lm.generate([[1, 2, 3], [4, 5]], max_new_tokens=6).tokens
    assert [r["tokens"] for r in doc["results"]] == expected
    for key in ("new_tokens", "steps", "target_forwards", "mean_accepted", "decode_s", "tokens_per_s", "compile_s"):
        assert key in doc["stats"]


def test_decode_text_output_and_prompts_file(model_dir, capsys, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt_ids": [7, 8, 9]}\n\n{"prompt_ids": [10]}\n')
    code, out, err = run(decode_main, ["--model", str(model_dir), "--prompts-file", str(f), "--max-new-tokens", "4",
                                       "--temperature", "0.8", "--top-k", "5", "--top-p", "0.9", "--seed", "3"], capsys)
    assert code == 0, err
    assert out.count("--- prompt") == 2 and "new ids:" in out
    assert "tok/s" in err


@pytest.mark.parametrize("args,message", [
    (["--model", "/nonexistent/model"], "model path '/nonexistent/model' does not exist"),
    (["--prompt-ids", "1,2", "--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["--prompt-ids", "1,2", "--temperature", "inf"], "temperature must be a finite number >= 0, got inf"),
    (["--prompt-ids", "1,2", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["--prompt-ids", "1,2", "--top-k", "0"], "top_k must be an integer >= 1"),
    (["--prompt-ids", "1,2", "--max-new-tokens", "0"], "max_new_tokens must be an integer in [1, 2**30]"),
    (["--prompt-ids", "1,2", "--max-new-tokens", "1" + "0" * 320], "max_new_tokens must be an integer in [1, 2**30]"),
    (["--prompt-ids", "1,2", "--method", "nope"], "unknown method 'nope'; valid methods: autoregressive"),
    (["--prompt-ids", "1,x"], "expected comma-separated integers"),
    (["--prompt-ids", "1,500"], "token id 500 is outside the vocabulary (0..96)"),
    (["--prompt-ids", ""], "prompt 0 (--prompt-ids '') is empty"),
    (["--prompt-ids", "1", "--prompt-ids", "1,500"], "prompt 1 (--prompt-ids '1,500'): token id 500 is outside"),
    (["--prompt-ids", "1,,2"], "expected comma-separated integers"),
    (["--prompt-ids", "1 2 3"], "--prompt-ids '1 2 3': expected comma-separated integers"),  # was [123]
    (["--prompt-ids", "1,+2"], "expected comma-separated integers"),
    (["--prompt-ids", "1", "--prompts-file", ""], "--prompts-file must be a path"),
    (["--prompt-ids", "1", "--mesh", " "], "--mesh must name axes"),
    (["--prompt", "hello"], "prompt 0 (--prompt 'hello') is text, but this model has no tokenizer: pass prompts as lists of token ids (CLI: --prompt-ids)"),
    (["--prompt-ids", "1", "--temperature", "hot"], "invalid float value: 'hot'"),
    (["--prompts-file", "/nonexistent.jsonl"], "does not exist"),
    # was "prompts file 'gs:/bucket/p.jsonl' does not exist": the URL mangled, nothing said it is not read
    (["--prompts-file", "gs://bucket/p.jsonl"], "--prompts-file 'gs://bucket/p.jsonl': gs:// is not supported here"),
    (["--prompts-file", "gs:/bucket/p.jsonl"], "--prompts-file 'gs:/bucket/p.jsonl': gs:// is not supported here"),
    # was "(did you mean temperature?)"
    (["--prompt-ids", "1", "--option", "temperature=0.5"],
     "unknown option temperature for method 'autoregressive' (temperature is an argument of generate itself, not a "
     "method option: --temperature)"),
    (["--prompt-ids", "1", "--method", "recycling", "--option", "k=3", "--option", "k=8"],
     "--option k is given twice (3 and 8); give it once"),
    (["--prompt-ids", "1", "--method", "recycling", "--option", "hot_start=true"],
     "--option hot_start needs the Token Recycling matrix of an earlier generate call in the same process"),
    (["--prompt-ids", "1", "--method", "pld", "--option", "max_ngram"],  # was "must look like key.sub=value"
     "--option 'max_ngram' must look like KEY=VALUE (e.g. --option budget=64)"),
])
def test_decode_bad_input_is_one_line(model_dir, capsys, args, message):
    if "--model" not in args:
        args = ["--model", str(model_dir)] + args
    code, out, err = run(decode_main, args, capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("content,message", [
    (bytes(range(256)), "is not UTF-8 text (byte 0x80 at offset 128, line 2); expected JSONL"),
    (b'{"prompt_ids": [1]}\n\xff\xfe\x00', "is not UTF-8 text (byte 0xff at offset 20, line 2)"),
    ("directory", "is a directory; expected a JSONL file"),
    ("unreadable", "cannot be read (Permission denied)"),
    (b'{"prompt_ids": "1,2"}\n', 'p.jsonl:1: "prompt_ids" must be a list of integers'),
    (b'\n{"text": 5}\n', 'p.jsonl:2: "text" must be a string'),
    (b"\x00\x01\x02\n", "p.jsonl:1: not valid JSON"),
    (b'{"prompt": "x", "prompt_ids": [1]}\n', 'p.jsonl:1: give one of "prompt", "text" or "prompt_ids", not '
                                             "['prompt', 'prompt_ids']"),  # prompt_ids used to win silently
    (b"\n  \n", "holds no prompts"),
    (b'{"prompt": "a\\ud800b"}\n', "p.jsonl:1) is not valid Unicode text (a lone surrogate at character 1)"),
    (b'{"prompt_ids": [1]}\n\n{"prompt_ids": [1, 500]}\n', "prompt 1 ("),
    (b'{"prompt_ids": [1]}\n\n{"prompt_ids": [1, 500]}\n', "p.jsonl:3): token id 500 is outside the vocabulary"),
])
def test_decode_bad_prompts_file_is_one_line(model_dir, capsys, tmp_path, monkeypatch, content, message):
    f = tmp_path / "p.jsonl"
    if content == "directory":
        f.mkdir()
    elif content == "unreadable":
        f.write_text('{"prompt_ids": [1]}\n')
        real = pathlib.Path.read_bytes

        def denied(self):  # chmod 000 would not stop root, who runs these tests in containers
            if self == f:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(pathlib.Path, "read_bytes", denied)
    else:
        f.write_bytes(content)
    code, out, err = run(decode_main, ["--model", str(model_dir), "--prompts-file", str(f)], capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err


def test_decode_keeps_the_command_line_order_of_prompts(model_dir, capsys, tiny_lm):
    """--prompt-ids and --prompt interleaved: decoded and numbered in the order given (all
    --prompt first, then all --prompt-ids, used to renumber them)."""
    from jaxaccel.decode.__main__ import build_parser, read_prompts

    args = build_parser().parse_args(["--prompt-ids", "1,2", "--prompt", "a", "--prompt-ids", "3"])
    where = []
    assert read_prompts(args, where) == [[1, 2], "a", [3]]
    assert where == ["--prompt-ids '1,2'", "--prompt 'a'", "--prompt-ids '3'"]
    code, out, err = run(decode_main, ["--model", str(model_dir), "--prompt-ids", "4,5", "--prompt-ids", "1,2,3",
                                       "--max-new-tokens", "3", "--output", "json"], capsys)
    assert code == 0, err
    assert [r["prompt_ids"] for r in json.loads(out)["results"]] == [[4, 5], [1, 2, 3]]


def test_prompts_file_lines_split_on_newlines_only(tmp_path):
    """A leading BOM is dropped, and U+2028 (legal unescaped inside a JSON string) does not split a record."""
    from jaxaccel.decode.__main__ import build_parser, read_prompts

    f = tmp_path / "p.jsonl"
    f.write_bytes('\ufeff{"prompt": "a\u2028b"}\r\n{"prompt_ids": [4, 5]}\n'.encode())
    assert read_prompts(build_parser().parse_args(["--prompts-file", str(f)])) == ["a\u2028b", [4, 5]]


def test_decode_subprocess_error_has_no_traceback(tmp_path):
    """The one test that needs a fresh process: `python -m jaxaccel.decode` exists and its
    bad-input path prints one line, with no traceback or logging noise from a cold import."""
    (tmp_path / "x.txt").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "jaxaccel.decode", "--model", str(tmp_path)], capture_output=True,
                          text=True, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "neither a jaxaccel checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_convert_round_trip(model_dir, tmp_path, capsys, tiny_lm):
    code, _, err = run(convert_main, ["import", str(model_dir), str(tmp_path / "ja")], capsys)
    assert code == 0, err
    assert (tmp_path / "ja" / "jaxaccel.json").is_file()
    code, _, err = run(convert_main, ["export", str(tmp_path / "ja"), str(tmp_path / "hf")], capsys)
    assert code == 0, err
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    # an earlier export is replaced, as export_hf does (the CLI used to want --force for its own output);
    # other files there need --force, checked before the load
    code, _, err = run(convert_main, ["export", str(tmp_path / "ja"), str(tmp_path / "hf")], capsys)
    assert code == 0, err
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    code, _, err = run(convert_main, ["export", str(tmp_path / "ja"), str(tmp_path / "hf")], capsys)
    assert code == 2 and "holds other files (notes.txt); use --force to write into it" in err and err.count("\n") == 1
    code, _, err = run(convert_main, ["import", str(model_dir), str(tmp_path / "hf")], capsys)
    assert code == 2 and "holds other files" in err  # an HF export is not an earlier import
    # a Hugging Face model jaxaccel did not export (any HF folder has a config.json) is not replaced without --force
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    del config["exported_by"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    (tmp_path / "hf" / "notes.txt").unlink()
    code, _, err = run(convert_main, ["export", str(tmp_path / "ja"), str(tmp_path / "hf")], capsys)
    assert code == 2 and "holds a Hugging Face model that jaxaccel did not export" in err, err
    assert "exported_by" not in (tmp_path / "hf" / "config.json").read_text()


def test_bench_decode_runs_and_reports(capsys, tmp_path):
    code, out, err = run(bench_main, ["decode", "--models", "7m", "--batches", "1", "--runs", "1", "--new-tokens", "48",
                                      "--prompt-len", "8", "--no-hf", "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "r.json").read_text())
    row = doc["rows"][0]
    assert row["jaxaccel_tok_s"] > 0 and 0 < row["roofline_all_frac"] and row["bandwidth_gb_s"] > 0
    assert "| 7m |" in out
    code, _, err = run(bench_main, ["decode", "--models", "3b"], capsys)
    assert code == 2 and "unknown model preset '3b'" in err


def test_model_yaml_presets_match_the_bench_presets():
    from pathlib import Path

    from jaxaccel.bench.decode import PRESETS, resolve_model

    root = Path(__file__).resolve().parent.parent / "configs" / "models"
    for name, file in (("7m", "llama-7m.yaml"), ("40m", "llama-40m.yaml")):
        label, config = resolve_model(str(root / file))
        assert config == PRESETS[name] and label == file[:-5]
        assert 0.8 < config.num_params() / float(name[:-1]) / 1e6 < 1.2


def test_bench_train_runs_and_reports(capsys, tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    code, out, err = run(bench_main, ["train", "--configs", str(root / "configs" / "tiny.yaml"), "--compare-devices", "1",
                                      "--override", "data.corpus=synthetic", "--override", "train.batch_size=8",
                                      "--override", "train.seq_len=32", "--json", str(tmp_path / "t.json")], capsys)
    assert code == 0, err
    row = json.loads((tmp_path / "t.json").read_text())["rows"][0]
    assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1
    assert "| " in out and "MFU" in out


def test_bench_startup_runs_and_reports(capsys):
    from jaxaccel.bench import startup

    result = startup.run("builtin:default", runs=1, methods=("autoregressive", "pld"), repeats=1, lengths=(5, 40),
                         progress=lambda s: None)
    wall = result["decode_wall"]
    assert wall["cold_s"] > 0 and len(wall["warm_runs_s"]) == 1
    calls = result["first_calls"]
    assert calls["autoregressive"]["relative"] == 1.0 and calls["pld"]["compile_s"] > 0
    assert calls["autoregressive"]["programs"] == 2  # prompts of 5 and 40 tokens share the prefill and loop programs
    assert "| pld |" in startup.markdown(result)
    code, _, err = run(bench_main, ["startup", "--runs", "0"], capsys)
    assert code == 2 and "runs and repeats must be >= 1" in err


@pytest.mark.parametrize("started_as", ["script", "-m"])
def test_ctrl_c_ends_a_command_at_once_even_with_background_work_left(tmp_path, started_as):
    """Ctrl-C in a command used to print `interrupted` and return through Python's shutdown,
    which waits for every non-daemon thread: one cut off mid-way (Orbax's save threads) hung
    the process forever. A command now stops at once, exit 130, one line. Started as `python
    -m jaxaccel.X` the handler is there from jaxaccel's first import (a Ctrl-C while jax was
    importing was a traceback, or swallowed by a garbage-collector callback)."""
    import signal
    import time

    (tmp_path / "hang.py").write_text(
        "import sys, tempfile, threading, time\n"
        "from jaxaccel.cli import run_cli\n"
        "def main(argv):\n"
        "    threading.Thread(target=time.sleep, args=(600,)).start()  # never finishes\n"
        "    with tempfile.TemporaryDirectory() as scratch:  # removed as the command unwinds\n"
        "        print(scratch, flush=True)\n"
        "        time.sleep(600)\n"
        "    return 0\n"
        "raise SystemExit(run_cli(main))\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if started_as == "script":
        cmd = [sys.executable, str(tmp_path / "hang.py")]
    else:  # the import of jaxaccel itself (jax, the model code) is where the first second goes
        cmd = [sys.executable, "-m", "jaxaccel.decode", "--max-new-tokens", "2000"]
    proc = subprocess.Popen(with_default_sigint(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    scratch = None
    if started_as == "script":
        scratch = proc.stdout.readline().strip()
        assert os.path.isdir(scratch)
    else:  # jaxaccel's first import has run (and installed its handler) once jax is importing
        maps, until = pathlib.Path(f"/proc/{proc.pid}/maps"), time.time() + 60
        while proc.poll() is None and time.time() < until and "jaxlib" not in maps.read_text():
            time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert scratch is None or not os.path.exists(scratch)  # os._exit at the first Ctrl-C left it behind


@pytest.mark.parametrize("argv,command", [
    (["python", "-m", "jaxaccel.decode", "--prompt", "x"], True),
    (["python", "-X", "utf8", "-W", "ignore", "-m", "jaxaccel.train", "c.yaml"], True),
    (["/venv/bin/python", "/venv/bin/jaxaccel-decode"], True),
    (["python", "-m", "pytest", "-m", "jaxaccel"], False),
    (["python", "my_script.py", "-m", "jaxaccel.decode"], False),
    (["python", "jaxaccel-notes.py"], False),
    (["python", "-c", "import jaxaccel"], False),
    (["python"], False),
])
def test_which_processes_are_jaxaccel_commands(monkeypatch, argv, command):
    from jaxaccel import cli

    monkeypatch.setattr(sys, "orig_argv", argv)
    assert cli.is_command_process() is command


def test_a_closed_stdout_ends_a_command_quietly():
    """`python -m jaxaccel.decode ... | head`: the reader leaving was "error: [Errno 32] Broken
    pipe", exit 2 (and Python's own complaint at exit); now exit 141 as a SIGPIPE'd tool, silent."""
    code = ("import sys\nfrom jaxaccel.cli import run_cli\n"
            "def main(argv):\n    for _ in range(1000):\n        print('x' * 1000, flush=True)\n    return 0\n"
            "sys.exit(run_cli(main))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 141 and err == "", err


def test_ctrl_c_handling_leaves_an_ignored_sigint_and_traceback_mode_alone(monkeypatch):
    """A shell script's background job starts with SIGINT ignored, and a Ctrl-C meant for the
    script must not stop it: neither a command nor a training loop takes SIGINT then. With
    JAXACCEL_TRACEBACK=1 Ctrl-C keeps Python's KeyboardInterrupt (where was it stuck?)."""
    import signal

    from jaxaccel import cli
    from jaxaccel.train.loop import preemption_notice

    before = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        cli.install_ctrl_c_handler()
        with preemption_notice():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.signal(signal.SIGINT, signal.default_int_handler)
        monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
        cli.install_ctrl_c_handler()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        monkeypatch.delenv(cli.TRACEBACK_ENV)
        cli.install_ctrl_c_handler()
        assert signal.getsignal(signal.SIGINT) is cli._on_ctrl_c
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.slow
def test_bench_spec_can_skip_its_sweep_and_cost_table(capsys, tmp_path):
    """`bench spec --runs 1` took ~80 s at any size: the template sweep and the verification-cost
    table always ran. `--sweep none --no-cost` leaves out both (results and report)."""
    code, out, err = run(bench_main, ["spec", "--batches", "1", "--temperatures", "0", "--runs", "1", "--new-tokens",
                                      "8", "--files", "1", "--prompt-tokens", "16", "--sweep", "none", "--no-cost",
                                      "--no-hf", "--json", str(tmp_path / "s.json")], capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "s.json").read_text())
    assert "sweep" not in doc and "cost" not in doc and "verification forward" not in err
    assert [r["method"] for r in doc["rows"]] == ["autoregressive", "pld", "recycling", "recycling", "recycling"]
    assert all(r["mat"] >= 1.0 and r["tokens_per_s"] > 0 for r in doc["rows"])
    assert "| 1 | 0.0 | autoregressive |" in out and "Template sweep" not in out and "forward cost" not in out


@pytest.mark.slow
def test_bench_dyspec_runs_and_reports(capsys, tmp_path, monkeypatch):
    """`bench dyspec` at toy size on the shipped pair: every method's row with its MAT, the
    `auto` row against its own autoregressive baseline, the 1:50 prediction and Figure 2. The
    methods run with the draft the bench loaded and reports (generate loaded its own copy,
    in another dtype than the report said)."""
    import jaxaccel.decode.lm as lm_module

    def no_second_draft(*args, **kwargs):
        raise AssertionError(f"generate loaded a draft of its own: {args}")

    monkeypatch.setattr(lm_module, "load", no_second_draft)  # (the bench loads through jaxaccel.load)
    code, out, err = run(bench_main, ["dyspec", "--batches", "1", "--temperatures", "0", "--budgets", "8",
                                      "--methods", "sps,specinfer-chains,dyspec", "--new-tokens", "12", "--runs", "1",
                                      "--files", "1", "--prompt-tokens", "32",
                                      "--figure", str(tmp_path / "f2.png"), "--json", str(tmp_path / "d.json")], capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "d.json").read_text())
    rows = {(r["method"], r["budget"]): r for r in doc["rows"]}
    assert set(rows) == {("autoregressive", None), ("sps", 8), ("specinfer-chains", 8), ("dyspec", 8),
                         ("dyspec", "auto")}
    assert rows["autoregressive", None]["mat"] == 1.0 and rows["specinfer-chains", 8]["nodes"] == 8
    assert all(r["mat"] >= 1.0 and r["tokens_per_s"] > 0 and r["predicted_accelerator_speedup"] > 0
               for r in doc["rows"])
    auto = rows["dyspec", "auto"]
    assert auto["baseline_tokens_per_s"] > 0 and "budget" in auto["auto_plan"] and "budget" in auto["accelerator_plan"]
    assert (tmp_path / "f2-T0.0.png").stat().st_size > 1000 and -1 <= doc["figure2"][0]["correlation"] <= 1
    assert "| specinfer-chains | 8 (8) |" in out
    assert doc["dtype"] == "float32" and doc["draft_dtype"] == "bfloat16"  # builtin:draft as stored
    assert "float32 target, bfloat16 draft" in out
    code, _, err = run(bench_main, ["dyspec", "--methods", "medusa"], capsys)
    assert code == 2 and "unknown method 'medusa'" in err


# ----------------------------------------------------------------------------- bad input found by fuzzing the CLIs


@pytest.fixture(scope="module")
def jaxaccel_dir(tmp_path_factory, tiny_params):
    from jaxaccel.model.checkpoint import save_model

    return save_model(tmp_path_factory.mktemp("ja") / "m", TINY, tiny_params)


@pytest.mark.parametrize("change,message", [
    ({"jaxaccel.json": b"\xff\xfe"}, "jaxaccel.json is unreadable"),
    ({"jaxaccel.json": b"[1, 2]"}, "not a jaxaccel model (not a JSON object)"),
    ({"layout": "weird"}, "unknown parameter layout 'weird'"),
    ({"eos_token_ids": "x"}, "eos_token_ids must be a list of token ids"),
    ({"tokenizer.model": b"garbage"}, "tokenizer.model: not a valid tokenizer file"),
    ({"tokenizer.model": b""}, "tokenizer.model: "),
    ({"info": [1, 2]}, "info must be a JSON object"),
])
def test_decode_corrupt_model_folder_is_one_line(jaxaccel_dir, tmp_path, capsys, change, message):
    assert_decode_refuses(corrupted_copy(jaxaccel_dir, tmp_path, "jaxaccel.json", change), message, capsys)


def corrupted_copy(model, tmp_path, meta_file: str, change: dict):
    """A copy of the model folder with `change` applied: name -> bytes (the file's new
    contents), None (the file removed), or any other value (that key set in `meta_file`)."""
    import shutil

    folder = shutil.copytree(model, tmp_path / "m")
    for name, value in change.items():
        if value is None:
            (folder / name).unlink()
        elif isinstance(value, bytes):
            (folder / name).write_bytes(value)
        else:
            meta = json.loads((folder / meta_file).read_text())
            (folder / meta_file).write_text(json.dumps({**meta, name: value}))
    return folder


def assert_decode_refuses(folder, message, capsys):
    code, _, err = run(decode_main, ["--model", str(folder), "--prompt-ids", "1,2", "--max-new-tokens", "2"], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("change,message", [
    ({"config.json": b"\xff\xfe{}"}, "config.json is unreadable"),
    ({"config.json": b"[1]"}, "config.json must hold a JSON object"),
    ({"architectures": 5}, "architectures must be a list of names"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, got 'false'"),
    ({"max_position_embeddings": 2048.7}, "max_position_embeddings must be an integer, got 2048.7"),
    ({"generation_config.json": None, "eos_token_id": "abc"}, "config.json: eos_token_id must be a token id"),
    ({"generation_config.json": None, "eos_token_id": [None]}, "config.json: eos_token_id must be a token id"),
    ({"generation_config.json": None, "bos_token_id": 1.5}, "config.json: bos_token_id must be a token id"),
    ({"generation_config.json": b'{"eos_token_id": "abc"}'}, "generation_config.json: eos_token_id must be a token id"),
    ({"model.safetensors": None, "model.safetensors.index.json": b"[1]"}, "model.safetensors.index.json is unreadable"),
    ({"model.safetensors": None, "model.safetensors.index.json": b"\xff\xfe"}, "model.safetensors.index.json is unreadable"),
    ({"model.safetensors": None, "model.safetensors.index.json": b'{"weight_map": [1]}'}, "weight_map must map tensor names"),
    ({"model.safetensors": None, "model.safetensors.index.json": b'{"weight_map": {"lm_head.weight": 5}}'}, "weight_map must map tensor names"),
])
def test_decode_corrupt_hf_folder_is_one_line(model_dir, tmp_path, capsys, change, message):
    # (generation_config.json removed where config.json's ids are tested: its ids would win; and
    # model.safetensors where the index is: it would win, as in transformers)
    assert_decode_refuses(corrupted_copy(model_dir, tmp_path, "config.json", change), message, capsys)


def test_hf_architectures_given_as_one_name_loads(model_dir, tmp_path):
    import shutil

    folder = shutil.copytree(model_dir, tmp_path / "m")
    hf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**hf, "architectures": hf["architectures"][0]}))
    assert jaxaccel.load(folder).config == jaxaccel.load(model_dir).config


def test_decode_corrupt_params_is_one_line_in_a_process(jaxaccel_dir, tmp_path):
    """Truncated OCDBT data files fail the restore on one array while others'
    reads are pending: their callbacks ('Event loop is closed') and the abandoned coroutines
    (each with a multi-line TensorStore spec) must not print after the one-line error."""
    import shutil

    folder = shutil.copytree(jaxaccel_dir, tmp_path / "m")
    for f in (folder / "params").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:20])
    proc = subprocess.run([sys.executable, "-m", "jaxaccel.decode", "--model", str(folder), "--prompt-ids", "1,2",
                           "--max-new-tokens", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "could not be restored" in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_decode_hf_config_with_a_mistyped_value_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 97,
                                                      "hidden_size": "abc", "num_hidden_layers": 2,
                                                      "num_attention_heads": 4, "intermediate_size": 48}))
    code, _, err = run(decode_main, ["--model", str(tmp_path), "--prompt-ids", "1"], capsys)
    assert code == 2 and "config.json: hidden_size must be an integer, got 'abc'" in err and err.count("\n") == 1


def test_sampling_flags_without_a_temperature_say_decoding_is_greedy(model_dir, capsys, tiny_lm):
    # they were ignored silently: a user asking for top-k sampling got greedy output unaware
    with pytest.warns(UserWarning) as caught:
        code, out, err = run(decode_main, ["--model", str(model_dir), "--prompt-ids", "1,2,3", "--max-new-tokens",
                                           "4", "--top-k", "5", "--top-p", "0.9", "--seed", "3", "--output", "json"],
                             capsys)
    assert code == 0, err
    assert [str(w.message) for w in caught] == [
        "--seed applies only when sampling (--temperature > 0): this run decodes greedily",
        "top_k and top_p apply only when sampling (temperature > 0): with temperature 0 this call decodes greedily"]
    assert json.loads(out)["results"][0]["tokens"] == tiny_lm.generate([[1, 2, 3]], max_new_tokens=4).tokens[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code, out, err = run(decode_main, ["--model", str(model_dir), "--prompt-ids", "1,2,3", "--max-new-tokens",
                                           "4", "--temperature", "0.7", "--top-k", "5", "--seed", "3"], capsys)
    assert code == 0, err


def test_outputs_are_checked_before_any_work(tmp_path, capsys):
    """Unwritable outputs are one line and exit 2 before anything runs; no command overwrites
    its own input or a model."""
    from jaxaccel.experiments.__main__ import main as experiments_main
    from jaxaccel.train.__main__ import main as train_main

    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    code, _, err = run(bench_main, ["acceptance", "--json", str(a_file / "x.json")], capsys)
    assert code == 2 and f"{a_file} is a file, not a folder" in err and err.count("\n") == 1
    # A folder still to be made is checked without being made; a remote path is left to the writer.
    from jaxaccel.cli import writable_output

    writable_output(tmp_path / "new" / "deeper" / "r.json")
    writable_output(tmp_path / "new_out", folder=True)
    writable_output("gs://bucket/out", folder=True, remote=True)
    for args in (["kernels", "--json", "gs://bucket/k.json"], ["dyspec", "--figure", "gs://bucket/f.png"]):
        code, _, err = run(bench_main, args, capsys)  # wrote the local gs:/bucket/..., exit 0
        assert code == 2 and "gs:// is not supported here; it must be a local folder" in err and err.count("\n") == 1
    sweep = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "experiments",
                         "repetition.yaml")
    for args in (["plot", "R.json", "--out", "gs://bucket/plots"], ["report", "R.json", "--out", "gs://b/t.md"],
                 ["collect", sweep, f"output_dir={tmp_path}", "--results", "s3://b/r.json"]):  # a local s3:/b
        code, _, err = run(experiments_main, args, capsys)
        assert code == 2 and "// is not supported here; it must be a local folder" in err and err.count("\n") == 1
    code, _, err = run(experiments_main, ["collect", sweep, f"output_dir={tmp_path}", "--results", "gs:/b/r.json"],
                       capsys)
    assert code == 2 and "results 'gs:/b/r.json' is not a gs://BUCKET/... path" in err  # wrote ./gs:/b/r.json
    assert not (tmp_path / "new").exists() and not (tmp_path / "new_out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
    code, _, err = run(experiments_main, ["tokenselect", "--out", str(a_file)], capsys)
    assert code == 2 and "--out folder" in err and "is a file, not a folder" in err
    code, _, err = run(experiments_main, ["duo", "--save-router", str(tmp_path)], capsys)  # holds a_file
    assert code == 2 and "holds other files (a_file)" in err and "choose an empty or new --save-router folder" in err
    code, _, err = run(experiments_main, ["report", str(a_file), "--out", str(a_file)], capsys)
    assert code == 2 and "--out is the results file itself" in err
    assert a_file.read_text() == "keep"
    # An OSError that gets past the checks is one line too.
    code, _, err = run(experiments_main, ["report", str(tmp_path)], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    # A run into a model folder would overwrite its tokenizer: refused.
    model = tmp_path / "model"
    model.mkdir()
    (model / "jaxaccel.json").write_text("{}")
    tiny = pathlib.Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
    code, _, err = run(train_main, [str(tiny), f"output_dir={model}"], capsys)
    assert code == 2 and "holds a model (jaxaccel.json)" in err
    assert sorted(p.name for p in model.iterdir()) == ["jaxaccel.json"]
    for inside in (model / "params", model / "params" / "deeper" / "run"):
        code, _, err = run(train_main, [str(tiny), f"output_dir={inside}"], capsys)
        assert code == 2 and "is inside a model folder" in err and not (model / "params").exists()
    # ... and so is a folder whose config.yaml, tokenizer.model or metrics.jsonl no run wrote.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("hello: world\n")
    code, _, err = run(train_main, [str(tiny), f"output_dir={mine}"], capsys)
    assert code == 2 and "holds config.yaml but neither a run's checkpoints nor a run's config.yaml" in err
    assert [p.name for p in mine.iterdir()] == ["config.yaml"] and (mine / "config.yaml").read_text() == "hello: world\n"
    from jaxaccel.train.loop import check_output_dir

    (mine / "config.yaml").unlink()
    (mine / "tokenizer.model").write_bytes(b"mine")
    with pytest.raises(ConfigError, match="holds tokenizer.model but neither"):
        check_output_dir(str(mine))
    # A run's folder whose config.yaml a kill cut short (older trainers rewrote it in place):
    # its checkpoints say it is a run's, and it resumes (check_resumed_config skips the file).
    (mine / "config.yaml").write_text("model:\n  vocab_size: 4")
    (mine / "checkpoints").mkdir()
    with pytest.raises(ConfigError, match="holds config.yaml but neither"):  # an empty checkpoints/ is no run's
        check_output_dir(str(mine))
    (mine / "checkpoints" / "40").mkdir()
    check_output_dir(str(mine))
    # A model/ folder there is replaced by the run's export: only the run's own may be there.
    (mine / "model" / "params").mkdir(parents=True)
    (mine / "model" / "params" / "weights.bin").write_bytes(b"mine")
    with pytest.raises(ConfigError, match="its model/ folder holds files that are not a jaxaccel model"):
        check_output_dir(str(mine))
    (mine / "model" / "jaxaccel.json").write_text("{}")
    check_output_dir(str(mine))
    shutil.rmtree(mine / "checkpoints")
    (mine / "config.yaml").write_text("mine: 1\n")
    (mine / "tokenizer.model").unlink()
    with pytest.raises(ConfigError, match="holds config.yaml but neither"):
        check_output_dir(str(mine))
    (mine / "config.yaml").unlink()
    with pytest.raises(ConfigError, match="holds a model that this folder's run did not write"):
        check_output_dir(str(mine))
    code, _, err = run(train_main, [" "], capsys)
    assert code == 2 and "the config must be a path to a YAML file" in err
    # An empty path is not the current folder (convert --force would have emptied its params/).
    for argv in (["import", str(model), ""], ["import", " ", str(tmp_path / "out"), "--force"]):
        code, _, err = run(convert_main, argv, capsys)
        assert code == 2 and "must be a path, got an empty string" in err and err.count("\n") == 1


def test_bench_checks_its_arguments_before_running(capsys):
    tiny = str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml")
    code, _, err = run(bench_main, ["startup", "--methods", "autoregressive,nope", "--runs", "1"], capsys)
    assert code == 2 and "unknown method 'nope'" in err
    code, _, err = run(bench_main, ["train", "--configs", tiny, "--override", "train.steps=5"], capsys)
    assert code == 2 and "the bench sets train.steps itself" in err
    code, _, err = run(bench_main, ["train", "--configs", tiny, "--override", "train.batch_size=abc"], capsys)
    assert code == 2 and "batch_size" in err and "matmul peak" not in err  # refused before measuring anything
    code, _, err = run(bench_main, ["dyspec", "--prompt-tokens", "-5"], capsys)
    assert code == 2 and "prompt tokens must be >= 1" in err
    for argv in (["dyspec", "--temperatures", ",,,"], ["dyspec", "--budgets", "8,,16"], ["train", "--configs", ","],
                 ["decode", "--models", ",", "--no-hf"]):
        code, out, err = run(bench_main, argv, capsys)
        assert code == 2 and "without empty items" in err and err.count("\n") == 1 and not out
    for which in ("spec", "skipdecode"):
        code, out, err = run(bench_main, [which, "--prompt-tokens", "0"], capsys)
        assert code == 2 and "prompt tokens must be >= 1" in err
    code, out, err = run(bench_main, ["dyspec", "--figure", "f.svg"], capsys)
    assert code == 2 and "--figure must name a .png file" in err
    code, out, err = run(bench_main, ["dyspec", "--budgets", "8,5000", "--batches", "1"], capsys)
    assert code == 2 and "budget must be at most 512, got 5000" in err and "autoregressive" not in out + err


@pytest.mark.parametrize("config", [b"\xff\xfe\x00bin", b"- 1\n- 2\n", b"model: [1]\n"])
def test_decode_run_folder_with_a_bad_config_is_one_line(tmp_path, capsys, config):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.yaml").write_bytes(config)
    code, _, err = run(decode_main, ["--model", str(tmp_path), "--prompt-ids", "1"], capsys)
    assert code == 2 and "config.yaml: not a readable training config" in err and err.count("\n") == 1, err


def test_bench_acceptance_refuses_filters_it_would_not_apply(capsys):
    """At temperature 0 the vector is measured greedily: --top-k / --top-p did nothing, and
    the JSON recorded them as if they had."""
    for flags in (["--top-k", "5"], ["--top-p", "0.5"]):
        code, _, err = run(bench_main, ["acceptance", "--target", "/no/such/model", *flags], capsys)
        assert code == 2 and "apply only when sampling" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("values", ["0.7,1", "0.7,abc", "-0.1"])
def test_bench_acceptance_what_if_values_are_checked_before_loading(values, capsys):
    code, _, err = run(bench_main, ["acceptance", "--target", "/no/such/model", "--what-if-top1", values], capsys)
    assert code == 2 and ("what-if-top1" in err or "comma-separated" in err)
    assert err.count("\n") == 1


def word_start_tokenizer(folder: pathlib.Path):
    """A SentencePiece tokenizer with a word-start marker (Llama's "\u2581"), trained on the
    standard library's json package."""
    import sysconfig

    import sentencepiece as spm

    from jaxaccel.tokenizer import SentencePieceTokenizer

    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    (folder / "corpus.txt").write_text("".join(p.read_text() for p in sorted(stdlib.glob("json/*.py"))))
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "sp"),
                                   vocab_size=TINY.vocab_size, model_type="bpe", add_dummy_prefix=True,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    return SentencePieceTokenizer(folder / "sp.model")


def test_decode_prints_prompt_and_continuation_decoded_together(tmp_path, capsys, tiny_params, monkeypatch):
    """A SentencePiece tokenizer with a word-start marker (Llama's) decodes a continuation's
    first word without its space when decoded apart from the prompt: the CLI decodes the two
    together. (The continuation is fixed: a random tiny model rarely starts a word.)"""
    from jaxaccel.decode.lm import LanguageModel

    tok = word_start_tokenizer(tmp_path)
    folder = jaxaccel.from_params(TINY, tiny_params, tokenizer=tok, eos_token_ids=()).save(tmp_path / "model")
    ids, new = tok.encode("import json as"), tok.encode("value")  # "\u2581value...": a word start
    together, apart = tok.decode(ids + new), tok.decode(ids) + tok.decode(new)
    assert together == "import json as value" and apart == "import json asvalue"
    generate = LanguageModel.generate

    def continuing_with_a_word(self, *args, **kwargs):
        out = generate(self, *args, **kwargs)
        out.tokens, out.texts = [list(new)], [tok.decode(new)]
        return out

    monkeypatch.setattr(LanguageModel, "generate", continuing_with_a_word)
    code, out, err = run(decode_main, ["--model", str(folder), "--prompt", "import json as", "--max-new-tokens", "2"],
                         capsys)
    assert code == 0, err
    assert out.splitlines()[0] == together


def test_texts_and_json_text_keep_the_space_before_the_first_new_word(tmp_path, capsys, tiny_params):
    """out.texts (and the CLI's JSON "text") is what the tokens add after the prompt: decoded
    apart, a word-start tokenizer's first new word lost its space, so prompt + text glued two
    words, and the JSON output disagreed with the text output."""
    from jaxaccel.tokenizer import continuation_text

    tok = word_start_tokenizer(tmp_path)
    ids, new = tok.encode("import json as"), tok.encode("value")
    assert continuation_text(tok, ids, new) == " value" and tok.decode(new) == "value"
    assert continuation_text(tok, ids, []) == "" and continuation_text(tok, [], new) == tok.decode(new)
    lm = jaxaccel.from_params(TINY, tiny_params, tokenizer=tok, eos_token_ids=())
    # Sampled near-uniformly over 64 rows: this tiny vocabulary has two word-start pieces of 97.
    prompts = ["import json as", "def f(x):", "class A:", "return", "if x", "for i in", "while", "x ="] * 8
    out = lm.generate(prompts, max_new_tokens=3, temperature=5.0, seed=3)
    texts = [tok.decode(p + t) for p, t in zip(out.prompt_ids, out.tokens)]
    assert all(text.startswith(tok.decode(p)) for text, p in zip(texts, out.prompt_ids))
    assert out.texts == [text[len(tok.decode(p)):] for text, p in zip(texts, out.prompt_ids)]
    # (the precondition that makes this a test: some row's first new token starts a word)
    assert any(a != tok.decode(t) for a, t in zip(out.texts, out.tokens))
    folder = lm.save(tmp_path / "model")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    code, json_out, err = run(decode_main, ["--model", str(folder), "--prompts-file", str(tmp_path / "prompts.jsonl"),
                                            "--max-new-tokens", "3", "--temperature", "5", "--seed", "3",
                                            "--output", "json"], capsys)
    assert code == 0, err
    assert [r["text"] for r in json.loads(json_out)["results"]] == out.texts


def test_a_continuation_of_prompt_ids_cut_inside_a_character_starts_with_that_character():
    """Prompt ids cut by token count can end inside a character the vocabulary spells in byte
    pieces: the prompt alone decodes to a U+FFFD; the continuation is the whole character on."""
    from jaxaccel.decode.lm import load
    from jaxaccel.tokenizer import continuation_text

    tok = load("builtin:draft").tokenizer
    ids = tok.encode("prix: 5\u20ac et")
    cuts = [cut for cut in range(1, len(ids)) if tok.decode(ids[:cut]) == "prix: 5\ufffd"]
    assert cuts  # (the precondition: this tokenizer spells the euro sign in byte pieces)
    for cut in cuts:
        assert continuation_text(tok, ids[:cut], ids[cut:]) == "\u20ac et"
        assert continuation_text(tok, ids[:cut], []) == ""  # no new ids, no text
    # a U+FFFD of the prompt's own text is the prompt's
    prompt = tok.encode("bad byte: \ufffd")
    assert continuation_text(tok, prompt, tok.encode(" ok")) == tok.decode(prompt + tok.encode(" ok"))[
        len(tok.decode(prompt)):]
    assert continuation_text(tok, prompt, []) == ""


def test_decode_option_hot_start_false_is_accepted():
    from jaxaccel.decode.__main__ import parse_options

    assert parse_options(["hot_start=false", "k=4"]) == {"hot_start": False, "k": 4}


def test_bench_help_says_what_each_option_is_and_its_default(capsys):
    """Most benchmark options had neither help text nor a visible default."""
    for command in ("decode", "spec", "dyspec", "skipdecode", "duo", "tokenselect", "startup", "train", "kernels"):
        code, out, _ = run(bench_main, [command, "--help"], capsys)
        assert code == 0 and "--json JSON" in out and "also write the" in out, command
    code, out, _ = run(bench_main, ["spec", "--help"], capsys)
    assert "timed runs per case (the median is reported) (default:" in out and "(default: 1,4)" in out
    from jaxaccel.experiments.__main__ import main as experiments_main

    code, out, _ = run(experiments_main, ["skipdecode", "--help"], capsys)
    assert code == 0 and "comma-separated mean speedups of the schedule (default: 1,2,3,5)" in " ".join(out.split())


def test_abandoned_tensorstore_reads_are_quiet_as_tasks_and_as_bare_futures():
    """A damaged store's abandoned metadata reads reach asyncio's log as a Task or, when the read
    fails before its task is awaited, as a bare Future (a flaky second line in the test above):
    both dropped; any other never-retrieved exception still logged."""
    import logging

    from jaxaccel.model import checkpoint

    def record(message):
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None, None)

    spec = "ValueError('OUT_OF_RANGE: Error opening \"zarr\" driver ... [tensorstore_spec=\\'{}\\']')"
    assert not checkpoint._QUIET_ASYNCIO.filter(record(f"Future exception was never retrieved\nfuture: <Future "
                                                      f"finished exception={spec}>"))
    assert checkpoint._QUIET_ASYNCIO.filter(record("Future exception was never retrieved\nfuture: <Future finished "
                                                   "exception=ValueError('something of ours')>"))


def test_a_storage_error_of_tensorflow_is_one_line(capsys):
    """An unreachable gs:// output_dir (the presets' YOUR_BUCKET, no network, no credentials)
    failed inside tf.io.gfile with a TensorFlow FailedPreconditionError: neither OSError nor
    ours, so a traceback and exit 1. Other TensorFlow errors (a bug) still propagate."""
    from jaxaccel.cli import run_cli

    def tf_error(name):
        cls = type(name, (Exception,), {"__module__": "tensorflow.python.framework.errors_impl"})
        return type(name, (cls,), {"__module__": "tensorflow.python.framework.errors_impl"})

    def failing(error):
        def main(argv):
            raise error("Error executing an HTTP request: when reading metadata of gs://YOUR_BUCKET/runs/x\n  more")
        return main

    with pytest.raises(SystemExit) as e:
        run_cli(failing(tf_error("FailedPreconditionError")), [])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "gs://YOUR_BUCKET/runs/x" in err and "credentials" in err
    with pytest.raises(Exception, match="HTTP request"):
        run_cli(failing(tf_error("InvalidArgumentError")), [])


def test_experiments_log_a_failed_save_without_tracebacks(monkeypatch, capsys):
    """Sweeps train too, but only the train CLI kept Orbax's absl tracebacks out of the log: a
    failed checkpoint save printed 7 tracebacks (374 lines) before the sweep's one-line error."""
    import logging

    from jaxaccel import cli
    from jaxaccel.experiments.__main__ import main as experiments_main

    for name in ("absl", "asyncio"):
        monkeypatch.setattr(logging.getLogger(name), "filters", [])
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    run(experiments_main, ["report", "missing.json"], capsys)
    assert all(cli._drop_traceback in logging.getLogger(n).filters for n in ("absl", "asyncio"))
    record = logging.LogRecord("absl", logging.ERROR, __file__, 1, "save failed", (), (ValueError, ValueError(), None))
    assert logging.getLogger("absl").filter(record) and record.exc_info is None and record.getMessage() == "save failed"


def test_decoded_text_the_terminal_cannot_encode_prints_lossily_not_as_a_traceback():
    """Under a cp1252 console (or PYTHONIOENCODING), printing generated text holding CJK ended
    the command in a UnicodeEncodeError traceback after the work was done."""
    env = {**os.environ, "PYTHONIOENCODING": "cp1252", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "jaxaccel.decode", "--prompt", "# \u4e2d\u6587", "--max-new-tokens",
                           "2"], capture_output=True, env=env, timeout=300)
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
    assert proc.stdout.startswith(b"# ??"), proc.stdout
