"""Test setup: CPU only, 8 fake devices (multi-device tests use them; single-device code
just uses device 0), float32 everywhere, and shared tiny models."""
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# No persistent compilation cache in tests (test_compile_cache turns it on in subprocesses).
os.environ.setdefault("JAXACCEL_COMPILE_CACHE", "off")
# Most of the suite's time is XLA compiling small programs, not running them. Tests compile
# with LLVM at -O0 (`--xla_backend_optimization_level=0`), except the training step, which the
# suite runs for hundreds of steps: it keeps -O1 through the trainer's own XLA options
# (`train.step.compiler_options`, below). XLA's older elemental emitters
# (`--xla_cpu_use_fusion_emitters=false`) compile faster too; the HLO passes and fusion
# decisions are unchanged. (The library keeps XLA's defaults: its fusion emitters decode faster.)
# Measured on the 2-core Intel Xeon CI host (2026-12-01, -n 0): test_decode + test_tree_attention
# 108 s with -O0 and the fusion emitters, 70 s with -O0 without them, 82 s at -O1 without them;
# the token-crisis notebook, which trains more than it compiles, 190 s with every program at -O0
# and 90 s at -O1 (the default -O2: 100 s and 93 s), hence the training step's -O1.
# An XLA_FLAGS that sets the level itself, or names a flags file, is left as it is.
# Under pytest-xdist every worker is its own XLA process; with XLA's multithreaded CPU runtime
# each would spread over all cores and they would oversubscribe them. One thread per worker
# (the workers are the parallelism) measured ~6% faster on 2 cores, four test files.
_flags = os.environ.get("XLA_FLAGS", "")
# Whether the tests set the LLVM levels is decided once, by the controller: xdist workers inherit
# its verdict (they also inherit its XLA_FLAGS, level included, so they could not tell).
_SETS_LEVELS = "JAXACCEL_TEST_SETS_LEVELS"
_own_levels = not os.path.isfile(_flags) and "xla_backend_optimization_level" not in _flags
if "PYTEST_XDIST_WORKER" not in os.environ:
    os.environ[_SETS_LEVELS] = str(int(_own_levels))
if _own_levels:
    _flags += " --xla_backend_optimization_level=0"
if not os.path.isfile(_flags):
    if "xla_cpu_use_fusion_emitters" not in _flags:
        _flags += " --xla_cpu_use_fusion_emitters=false"
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        _flags += " --xla_cpu_multi_thread_eigen=false"
    os.environ["XLA_FLAGS"] = _flags.strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# The training step alone compiles at -O1, through the trainer's own XLA options. Not when
# XLA_FLAGS sets a level of its own or names a flags file. Measured on the 2-core Intel Xeon host
# (2026-12-01, full suite, one run each, JAXACCEL_TEST_TIME_REPORT below): 29:53 this way, 34:00
# with everything at -O1 but the decode programs at -O0, 39:53 with everything at -O1.
# A `python -c` subprocess that trains runs TRAIN_STEP_AT_O1 first (the patch does not reach a
# subprocess, and the LLVM level changes float rounding: a run killed in a subprocess at -O0
# and resumed here at -O1 ended 5e-7 off the uninterrupted run); TRAIN_CLI is the trainer's CLI
# run that way.
TRAIN_STEP_AT_O1 = ""
if os.environ.get(_SETS_LEVELS) == "1":
    TRAIN_STEP_AT_O1 = ("from jaxaccel.train import step as _step\n"
                        "_library_options = _step.compiler_options\n"
                        "_step.compiler_options = lambda: {**_library_options(), 'xla_backend_optimization_level': 1}\n")
    exec(TRAIN_STEP_AT_O1)
TRAIN_CLI = TRAIN_STEP_AT_O1 + ("import runpy, sys\n"
                                "sys.argv[0] = 'jaxaccel.train'\n"
                                "runpy.run_module('jaxaccel.train', run_name='__main__', alter_sys=True)\n")


import numpy as np  # noqa: E402
import pytest  # noqa: E402

# One persistent XLA compilation cache per pytest run, shared by the xdist workers: many test
# files compile the same tiny programs (the TINY model's decode steps, training steps), and a
# second worker or file then reads them back instead of compiling again. The controller makes
# the folder and removes it at the end; set JAXACCEL_TEST_XLA_CACHE=off to compile everything.
# (jax.config, not JAX_COMPILATION_CACHE_DIR: the CLI subprocesses of test_compile_cache must
# not inherit it.)
_TEST_CACHE = "JAXACCEL_TEST_XLA_CACHE"


def pytest_configure(config):
    import tempfile

    from jaxaccel.decode import acceptance, compile_cache

    # DySpec's measured acceptance rates go to a folder of this run's, whatever the user's
    # setting (every xdist worker and CLI subprocess inherits it).
    if not hasattr(config, "workerinput"):
        os.environ[acceptance.CACHE_ENV] = tempfile.mkdtemp(prefix="jaxaccel-test-acceptance-")
        config._jaxaccel_test_acceptance = os.environ[acceptance.CACHE_ENV]
    if not hasattr(config, "workerinput") and _TEST_CACHE not in os.environ:
        os.environ[_TEST_CACHE] = tempfile.mkdtemp(prefix="jaxaccel-test-xla-")
        config._jaxaccel_test_cache = os.environ[_TEST_CACHE]
    folder = os.environ.get(_TEST_CACHE, "off")
    if folder.strip().lower() not in compile_cache.OFF_VALUES:
        compile_cache.use_folder(folder, min_compile_seconds=0.2)


def pytest_unconfigure(config):
    import shutil

    for name in ("_jaxaccel_test_cache", "_jaxaccel_test_acceptance"):
        folder = getattr(config, name, None)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

# The longest test files first (worker-seconds in the time report below, 2026-12-02: test_launchers
# 253 s, test_train 245 s, test_cli 151 s, ...; the rest under 125 s each, in collection order
# after these). pytest-xdist's loadfile hands out whole files in this order (with
# --no-loadscope-reorder, in pytest-xdist >= 3.8; its default is most tests first, which started
# the 6-test, 487 s notebook file near the end and left the other worker idle for minutes).
# Stale entries only cost balance, never a test.
_LONGEST_FILES_FIRST = ("test_launchers.py", "test_train.py", "test_cli.py", "test_draft.py", "test_train_crash.py",
                        "test_skipdecode.py", "test_decode.py", "test_foundation.py", "test_default_model.py",
                        "test_model.py", "test_experiments.py", "test_duo.py", "test_hf_parity.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order kept


from jaxaccel.config import ModelConfig  # noqa: E402

TINY = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=256)


def randomize(params, seed=0, scale=0.3):
    """Perturb init params so logits are peaked (random-init models tie too often)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="session")
def tiny_config():
    return TINY


@pytest.fixture(scope="session")
def tiny_params():
    from jaxaccel.model.transformer import init_params

    return randomize(init_params(TINY, jax.random.key(0), "unrolled"))


@pytest.fixture(scope="session")
def tiny_lm(tiny_params):
    import jaxaccel

    return jaxaccel.from_params(TINY, tiny_params, eos_token_ids=())


def reference_greedy(lm, prompt, n, eos=()):
    """Greedy decoding by recomputing the full forward at every step (no cache)."""
    seq = list(prompt)
    out = []
    width = 64 * ((len(prompt) + n + 63) // 64)  # causal: right padding never changes earlier logits
    for _ in range(n):
        token = int(np.argmax(lm.logits([seq + [0] * (width - len(seq))])[0, len(seq) - 1]))
        out.append(token)
        seq.append(token)
        if token in eos:
            break
    return out


def _jit_forward():
    from jaxaccel.model.transformer import forward

    return jax.jit(forward, static_argnums=(1,), static_argnames=("deterministic", "compute_logits"))


jit_forward = _jit_forward()


# ----------------------------------------------------------------------------- sampling checks
# Speculative samplers are tested against the exact target distribution of the first two
# generated tokens: a 6-token vocabulary makes that 36 cells, ROWS independent rows one call.

SMALL = ModelConfig(vocab_size=6, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=24, max_seq_len=64)
ROWS = 3000


def perturbed(params, seed, scale):
    """`params` plus Gaussian noise of std `scale` (a draft close to or far from its target)."""
    import jax

    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def toy_corpus(folder):
    """A small code corpus (the stdlib's json package and 12 email modules) as files in `folder`."""
    import sysconfig
    from pathlib import Path

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    folder.mkdir()
    for i, f in enumerate(sorted(stdlib.glob("json/*.py")) + sorted(stdlib.glob("email/*.py"))[:12]):
        (folder / f"doc_{i:02d}.py").write_text(f.read_text())
    return folder


def exact_pair_probs(lm, prompt, temperature, top_k=None, top_p=None):
    """P(first two generated tokens) from the model's own logits (the target distribution)."""
    import jax.numpy as jnp

    from jaxaccel.decode.sampling import make_sampling, target_probs

    mode, sp = make_sampling(temperature, top_k, top_p)
    seqs = np.array([prompt + [a] for a in range(lm.config.vocab_size)])
    logits = lm.logits(seqs)
    p1 = np.asarray(target_probs(jnp.asarray(logits[0, len(prompt) - 1]), mode, sp))
    p2 = np.asarray(target_probs(jnp.asarray(logits[:, len(prompt)]), mode, sp))
    return p1[:, None] * p2


def chi2_pvalue(pairs, expected):
    """Chi-square goodness of fit of observed (first, second) token pairs to `expected`."""
    from scipy import stats

    counts = np.zeros_like(expected)
    for a, b in pairs:
        counts[a, b] += 1
    exp = expected.ravel() * len(pairs)
    keep = exp > 0
    assert counts.ravel()[~keep].sum() == 0  # nothing outside the support (top-k)
    return stats.chisquare(counts.ravel()[keep], exp[keep] / exp[keep].sum() * len(pairs)).pvalue


# ----------------------------------------------------------------------------- time report
# JAXACCEL_TEST_TIME_REPORT=<file>: every test appends one JSON line there: its wall time
# (fixture setup included) and the seconds JAX spent tracing, lowering and compiling in this
# process, with its slowest compiles by name. How the suite's time is found; it checks nothing.
_REPORT = os.environ.get("JAXACCEL_TEST_TIME_REPORT")
if _REPORT:
    _REPORT = os.path.abspath(_REPORT)
    import collections
    import json
    import time

    _spent: collections.Counter = collections.Counter()
    _programs: list = []

    def _listen(event, seconds, **kw):
        name = event.rsplit("/", 1)[-1]
        _spent[name] += seconds
        if name == "backend_compile_duration":
            _programs.append((round(seconds, 2), str(kw.get("fun_name", "?"))))

    jax.monitoring.register_event_duration_secs_listener(_listen)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        _spent.clear()
        _programs.clear()
        start = time.perf_counter()
        yield
        row = {"test": item.nodeid, "wall": round(time.perf_counter() - start, 2),
               **{k: round(v, 2) for k, v in _spent.items()}, "n_compiles": len(_programs),
               "slowest": sorted(_programs, reverse=True)[:8]}
        with open(_REPORT, "a") as f:
            f.write(json.dumps(row) + "\n")


@pytest.fixture
def default_sigint():
    """SIGINT as a terminal's foreground process gets it (Python's KeyboardInterrupt handler),
    for tests that press Ctrl-C: a suite started as a background job of a script inherits
    SIGINT ignored, and jaxaccel rightly leaves an ignored SIGINT alone. Children: `with_default_sigint`."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def with_default_sigint(cmd: list) -> list:
    """`cmd` (a Python command line) started through an interpreter that sets SIGINT back to its
    default first and then execs it (see `default_sigint`; a preexec_fn would fork this
    multithreaded process)."""
    reset = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
             "os.execv(sys.argv[1], sys.argv[1:])")
    return [sys.executable, "-c", reset, *map(str, cmd)]


def run_main(main, argv, capsys):
    """A CLI's `main` run in this process as its console script runs it: (exit status,
    stdout, stderr)."""
    from jaxaccel.cli import run_cli

    try:
        code = run_cli(main, [str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def fake_tokenized(tmp_path, docs: list[str]):
    """What `pipeline._tokenized` returns, for `docs` as the training split (no validation), with
    a real SentencePiece model trained on them and no seqio/TensorFlow."""
    from types import SimpleNamespace

    import sentencepiece as spm

    from jaxaccel.data import BOS_ID, EOS_ID
    from jaxaccel.data.corpus import Document
    from jaxaccel.data.vocab import train_sentencepiece

    model = tmp_path / "spm.model"
    model.write_bytes(train_sentencepiece([Document(f"d{i}", t) for i, t in enumerate(docs)], 400, 8))
    sp = spm.SentencePieceProcessor(model_file=str(model))
    pieces = [np.array([BOS_ID, *sp.encode(t), EOS_ID], np.int32) for t in docs]
    tokens = {"train": np.concatenate(pieces), "validation": np.zeros(0, np.int32)}
    offsets = {"train": np.concatenate([[0], np.cumsum([len(p) for p in pieces])]), "validation": np.zeros(1, np.int64)}

    class Tokenized:
        directory, task_name, info = tmp_path / "vocab" / "tokens", "fake", {"vocab_sha256": None}

        def tokens(self, split):
            return tokens[split]

        def offsets(self, split):
            return offsets[split]

        def num_documents(self, split):
            return len(offsets[split]) - 1

        def num_tokens(self, split):
            return int(offsets[split][-1])

        def doc_ids(self, split):
            return [f"d{i}" for i in range(self.num_documents(split))]

    corpus = SimpleNamespace(sha256="0" * 64, manifest={"num_files": len(docs), "total_bytes": 1})
    vocab = SimpleNamespace(path=model, vocab_size=sp.get_piece_size(), seconds=0.0)
    return corpus, tmp_path, vocab, Tokenized()
