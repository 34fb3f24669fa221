"""Long-context retrieval tasks (jaxaccel.data.longctx), their training mixture, the TokenSelect
experiment and benchmark, at toy size: a word-level stand-in tokenizer, a SentencePiece model
trained here in a second, a tiny random model, contexts of 128-176 tokens."""
import dataclasses
import io
import json
import re
import zlib

import jax
import numpy as np
import pytest

import jaxaccel
from jaxaccel.bench.__main__ import main as bench_main
from jaxaccel.cli import run_cli
from jaxaccel.config import ModelConfig
from jaxaccel.data import BATCH_KEYS, BOS_ID, EOS_ID
from jaxaccel.data.config import DataConfig, RetrievalConfig
from jaxaccel.data.longctx import ALL_TASKS, SPAN_ANSWER, SPAN_CUE, TASKS, RetrievalMixture, RetrievalTasks, task_rows_per_batch
from jaxaccel.errors import ConfigError, InvalidArgumentError
from jaxaccel.experiments.__main__ import main as experiments_main
from jaxaccel.model.transformer import init_params
from jaxaccel.train.synthetic import SyntheticData

WORD = re.compile(r" ?\w+| ?[^\w\s]|\n| ")


def word_tokenizer(vocab_size):
    """Each word (with its leading space), punctuation mark or newline -> a hashed id >= 8."""
    return lambda text: [8 + zlib.crc32(w.encode()) % (vocab_size - 8) for w in WORD.findall(text)]


def make_tasks(vocab_size, seed=0):
    encode = word_tokenizer(vocab_size)
    newline = encode("\n")[0]
    rng = np.random.default_rng(seed)
    code = rng.integers(8, vocab_size, 5000)
    code[rng.random(5000) < 0.1] = newline
    code[::97] = BOS_ID  # document boundaries the filler must drop
    code[1::97] = EOS_ID
    return RetrievalTasks(encode, code, [newline])


@pytest.fixture(scope="module")
def tasks():
    return make_tasks(1_000_003)  # a vocabulary big enough that no two words share an id here


def contains(haystack, needle):
    n = len(needle)
    return any(list(haystack[i:i + n]) == list(needle) for i in range(len(haystack) - n + 1))


# ----------------------------------------------------------------------------- the tasks


@pytest.mark.parametrize("task", ALL_TASKS)
def test_examples_have_the_asked_length_and_their_answer_in_the_context(tasks, task):
    for length in (tasks.min_length(task), 150, 1000, 5000):
        for seed in range(3):
            ex = tasks.example(task, length, seed)
            assert len(ex.tokens) == length and ex.task == task
            assert ex.tokens[0] == BOS_ID and ex.tokens[-1] == EOS_ID
            assert ex.answer_start + ex.answer_len == length - 1  # prompt, answer, EOS
            assert ex.tokens[ex.needle_start:ex.needle_start + ex.answer_len].tolist() == ex.answer
            assert contains(ex.prompt, ex.answer) and 0 < ex.depth < 1
            assert BOS_ID not in ex.tokens[1:].tolist() and EOS_ID not in ex.tokens[:-1].tolist()


def test_the_asked_key_is_one_of_many_distinct_keys(tasks):
    ex = tasks.example("kv_lookup", 2000, 5)
    prompt = ex.prompt
    key = prompt[-2]  # the question ends "<key> ="
    assert prompt.count(key) == 2  # its line and the question
    lines = [i for i in range(len(prompt) - 1) if prompt[i + 1] == prompt[-1]]  # tokens before " ="
    assert len(lines) > 100 and len(set(prompt[i] for i in lines)) == len(lines) - 1  # distinct but the asked one


def test_code_needle_is_a_line_of_its_own_in_corpus_code(tasks):
    newline = tasks.line_ends[0]
    for seed in range(10):
        ex = tasks.example("code_needle", 600, seed)
        start = ex.needle_start - 2  # the needle line: name, " =", value, "\n"
        assert ex.tokens[start - 1] == newline or start == 1
        assert ex.tokens[ex.needle_start + ex.answer_len] == newline


def test_span_recall_cues_a_span_of_its_code_and_asks_what_follows(tasks):
    for seed in range(10):
        ex = tasks.example("span_recall", 300, seed)
        cue = ex.prompt[-SPAN_CUE:]
        at = ex.needle_start - SPAN_CUE  # where the cue's span starts in the code
        assert ex.prompt[at:at + SPAN_CUE] == cue and ex.answer_len == SPAN_ANSWER
        assert ex.tokens[ex.needle_start:ex.needle_start + SPAN_ANSWER].tolist() == ex.answer
        code = ex.prompt[1:-SPAN_CUE]  # random ids: the cue occurs once in the window
        assert sum(code[i:i + SPAN_CUE] == cue for i in range(len(code) - SPAN_CUE + 1)) == 1


def test_examples_are_a_function_of_the_seed(tasks):
    for task in ALL_TASKS:
        a, b = tasks.example(task, 400, 11), tasks.example(task, 400, 11)
        np.testing.assert_array_equal(a.tokens, b.tokens)
        answers = {tuple(tasks.example(task, 400, s).answer) for s in range(8)}
        assert len(answers) > 4
        depths = [tasks.example(task, 800, s).depth for s in range(40)]
        assert min(depths) < 0.25 and max(depths) > 0.75


def test_context_weight_scores_the_example_text_too(tasks):
    rng = lambda: np.random.default_rng(4)  # noqa: E731
    answers = tasks.packed_row(rng(), 512, min_length=64, answer_weight=8.0)
    both = tasks.packed_row(rng(), 512, min_length=64, answer_weight=8.0, context_weight=0.5)
    np.testing.assert_array_equal(answers["inputs"], both["inputs"])
    for s in range(1, both["segment_ids"].max() + 1):
        idx = np.flatnonzero(both["segment_ids"] == s)
        mask = both["loss_mask"][idx]
        answer = answers["loss_mask"][idx] == 8.0
        assert answer.sum() >= 2 and np.all(mask[answer] == 8.0)  # the answer (and EOS) keep their weight
        np.testing.assert_array_equal(mask[~answer][:-1], 0.5)  # every other position predicting its segment
        assert mask[-1] == 0.0  # the EOS predicts nothing
    with pytest.raises(ConfigError, match="context_weight must be >= 0"):
        RetrievalConfig(context_weight=-1.0)


def test_too_short_or_unknown_is_a_clear_error(tasks):
    with pytest.raises(ValueError, match="passkey needs at least"):
        tasks.example("passkey", tasks.min_length("passkey") - 1, 0)
    with pytest.raises(ValueError, match="unknown task 'haystack'"):
        tasks.example("haystack", 500, 0)
    encode = word_tokenizer(1000)
    special = np.tile([BOS_ID, EOS_ID, 0], (1 << 20) // 3 + 5)  # spans more than one scanned piece
    with pytest.raises(ValueError, match="only BOS / EOS / padding"):
        RetrievalTasks(encode, special, [9])
    special[-1] = 9  # one real token, in the last piece, is enough
    assert len(RetrievalTasks(encode, special, [9]).code_tokens) == len(special)


def test_sentencepiece_tasks_copy_ids(tmp_path):
    """With a real SentencePiece model: segments tokenized apart still put the answer's exact
    ids in the context, and line ends are found from the pieces."""
    import sentencepiece as spm

    text = ("def f(x):\n    return x + 1\n\nclass A:\n    value = 3\n" * 40 + "The grass is green. The sky is blue. "
            "Here we go. 0123456789 abcdef ABCDEF key value pass\n" * 40).splitlines(keepends=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, split_digits=True, add_dummy_prefix=False,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   allow_whitespace_only_pieces=True, pad_id=0, eos_id=1, unk_id=2, bos_id=3,
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    code = np.asarray(sp.encode("".join(text[:200])), np.int64)
    tasks = RetrievalTasks.from_sentencepiece(model.getvalue(), code)
    assert all(sp.decode([int(i)]).endswith("\n") for i in tasks.line_ends) and len(tasks.line_ends) >= 1
    for task in TASKS:
        ex = tasks.example(task, 700, 3)
        assert len(ex.tokens) == 700 and contains(ex.prompt, ex.answer)
        assert sp.decode(ex.answer).strip().isalnum()


# ----------------------------------------------------------------------------- training rows


def test_packed_rows_score_only_answers_and_their_eos(tasks):
    row = tasks.packed_row(np.random.default_rng(0), 1024, min_length=64)
    assert set(row) == set(BATCH_KEYS)
    seg = row["segment_ids"]
    assert seg.max() >= 2 and (seg > 0).sum() >= 1024 - 64  # packed: at most a short tail unused
    for s in range(1, seg.max() + 1):
        idx = np.flatnonzero(seg == s)
        tokens = row["inputs"][idx]
        assert tokens[0] == BOS_ID and tokens[-1] == EOS_ID
        np.testing.assert_array_equal(row["positions"][idx], np.arange(len(idx)))
        scored = np.flatnonzero(row["loss_mask"][idx])
        # the scored positions predict the answer and the EOS: the last tokens of the segment
        assert scored[-1] == len(idx) - 2 and np.all(np.diff(scored) == 1)
        np.testing.assert_array_equal(row["targets"][idx][scored], tokens[scored + 1])
        answer = tokens[scored[0] + 1:-1]
        assert contains(tokens[:scored[0] + 1].tolist(), answer.tolist())


def mixture(tasks, shard=0, shards=1, batch=8, rate=0.5, steps=5, weight=1.0):
    cfg = RetrievalConfig(rate=rate, min_length=32, answer_weight=weight)
    rows = task_rows_per_batch(cfg, batch, shards)
    base = SyntheticData(vocab_size=97, seq_len=256, batch_size=batch - rows, total_steps=steps, seed=1,
                         shard_index=shard, num_shards=shards)
    return RetrievalMixture(base, tasks, cfg, seq_len=256, task_rows=rows, seed=3, shard_index=shard,
                            num_shards=shards)


def test_mixture_resumes_exactly_and_shards_split_the_batch(tasks):
    data = mixture(tasks)
    whole = list(data.train_batches(0))
    assert len(whole) == data.total_steps == 5
    assert whole[0]["inputs"].shape == (8, 256) and whole[0]["loss_mask"].dtype == np.float32
    resumed = list(mixture(tasks).train_batches(3))
    for a, b in zip(whole[3:], resumed):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(whole[0]["inputs"][4:], whole[1]["inputs"][4:])  # task rows differ per step
    halves = [next(mixture(tasks, s, 2).train_batches(2)) for s in range(2)]
    rows = lambda b: sorted(map(tuple, b["inputs"].tolist()))  # noqa: E731
    assert rows({"inputs": np.concatenate([h["inputs"] for h in halves])}) == rows(whole[2])
    assert data.stats["retrieval_task_rows"] == 4
    weighted = next(mixture(tasks, weight=8.0).train_batches(0))["loss_mask"]
    assert set(np.unique(weighted[4:])) == {0.0, 8.0} and set(np.unique(weighted[:4])) <= {0.0, 1.0}


def test_a_mixture_evaluates_on_a_mesh_wider_than_its_corpus_rows(tmp_path):
    """Eval batches have a training batch's shape: 4 corpus rows of a batch of 8 cannot split over
    a data axis of 8 (the run failed at its first evaluation), and the padding changes no figure."""
    import json

    from jaxaccel.config import from_dict
    from jaxaccel.train.config import RunConfig
    from jaxaccel.train.loop import train

    data = mixture(make_tasks(512), steps=2)
    for ev, tr in zip(data.eval_batches(), data.train_batches(0)):
        assert ev["inputs"].shape == tr["inputs"].shape and not ev["loss_mask"][4:].any()
    cfg = from_dict(RunConfig, {
        "model": {"vocab_size": 512, "d_model": 32, "n_layers": 1, "n_heads": 2, "ffn_dim": 64, "max_seq_len": 256},
        "data": {"corpus": "synthetic"}, "mesh": {"data": 8}, "output_dir": str(tmp_path), "tensorboard": False,
        "train": {"steps": 2, "batch_size": 8, "seq_len": 256, "eval_every": 1, "progress": False,
                  "peak_flops": 1e11}, "checkpoint": {"every_steps": 2}})
    train(cfg, data)
    evals = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"eval_loss"' in line]
    corpus_tokens = sum(float(b["loss_mask"].sum()) for b in data.base.eval_batches())
    assert evals and all(e["eval_tokens"] == corpus_tokens for e in evals)


def test_build_data_mixes_task_rows_into_the_corpus_batches(tmp_path):
    """The trainer's path (`data.retrieval` in the config): corpus rows from the pipeline at
    the smaller batch size, then task rows in the corpus vocabulary; resumable."""
    import sysconfig
    from pathlib import Path

    from jaxaccel.data import build_data

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for i, path in enumerate(sorted(stdlib.glob("json/*.py"))):
        (tmp_path / f"doc_{i}.py").write_text(path.read_text())
    cfg = DataConfig(corpus=str(tmp_path / "*.py"), cache_dir=str(tmp_path / "cache"), vocab_size=400,
                     num_sentinels=8, validation_fraction=0.2,
                     retrieval=RetrievalConfig(rate=0.5, min_length=32, answer_weight=2.0))
    data = build_data(cfg, seq_len=256, batch_size=4)
    plain = build_data(dataclasses.replace(cfg, retrieval=RetrievalConfig()), seq_len=256, batch_size=2)
    assert isinstance(data, RetrievalMixture) and data.total_steps == plain.total_steps
    batches = list(data.train_batches(0))[:3]
    for step, (mixed, corpus) in enumerate(zip(batches, plain.train_batches(0))):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(mixed[k][:2], corpus[k])  # the corpus rows, as without tasks
        assert mixed["inputs"].shape == (4, 256) and mixed["inputs"].max() < data.vocab_size
        assert set(np.unique(mixed["loss_mask"][2:])) == {0.0, 2.0}
    np.testing.assert_array_equal(next(data.train_batches(2))["inputs"], batches[2]["inputs"])
    assert next(data.eval_batches())["inputs"].shape[1] == 256 and data.vocab_path.is_file()


def test_retrieval_config_errors_are_one_line():
    for bad, message in [(dict(rate=1.0), "rate must be in [0, 1)"), (dict(tasks=("passkey", "x")), "tasks must be"),
                         (dict(min_length=8), "min_length must be >= 16"),
                         (dict(answer_weight=0.0), "answer_weight must be > 0")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            RetrievalConfig(**bad)
    with pytest.raises(ConfigError, match="needs data.objective 'causal'"):
        DataConfig(objective="ul2", retrieval=RetrievalConfig(rate=0.5))
    with pytest.raises(ConfigError, match="gives no task row"):
        task_rows_per_batch(RetrievalConfig(rate=0.01), 8)
    with pytest.raises(ConfigError, match="multiples of the 2 data shards"):
        task_rows_per_batch(RetrievalConfig(rate=0.375), 8, 2)


# ----------------------------------------------------------------------------- experiment and bench

CFG = ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=128)
BUDGET = dict(k=16, n_init=4, n_local=16, chunk=16, cache_threshold=0.9)


@pytest.fixture(scope="module")
def lm():
    return jaxaccel.from_params(CFG, init_params(CFG, jax.random.key(0), "unrolled"), eos_token_ids=())


def test_default_budget_is_the_papers_scaled_to_the_trained_length():
    from jaxaccel.experiments.tokenselect import scaled_budget

    # the paper's k 2048, n_init 128, n_local 512, chunk 512 at 8K, in proportion
    assert scaled_budget(8192) == dict(k=2048, n_init=128, n_local=512, chunk=512, cache_threshold=0.9, pool=None)
    small = scaled_budget(256)
    assert (small["k"], small["n_init"], small["n_local"], small["chunk"]) == (64, 4, 16, 16)
    assert scaled_budget(16)["n_init"] == 1  # never 0


def test_experiment_runs_every_cell_and_resumes(lm, tmp_path, monkeypatch):
    from jaxaccel.experiments import tokenselect as exp

    small = make_tasks(CFG.vocab_size)
    kwargs = dict(lengths=(128, 176), examples=2, budget=BUDGET, batch=2, full_max_length=128, out=tmp_path,
                  log=lambda s: None)
    results = exp.evaluate(lm, small, **kwargs)
    cells = {(c["method"], c["task"], c["length"]): c for c in results["cells"]}
    assert len(cells) == 2 * len(TASKS) * len(exp.METHODS)
    assert all(cells[("full", t, 176)]["accuracy"] is None for t in TASKS)  # past --full-max-length
    ran = [c for c in results["cells"] if c["accuracy"] is not None]
    assert all(len(c["per_example"]) == 2 and 0 <= c["accuracy"] <= 1 for c in ran)
    assert cells[("tokenselect", "passkey", 176)]["selection_cache_hit_rate"] is not None
    # the baselines have no selection cache: no hit rate (it read 0.0)
    assert all(cells[(m, t, 176)]["selection_cache_hit_rate"] is None for m in ("streamingllm", "random")
               for t in TASKS)
    paths = exp.write_report(results, tmp_path)
    assert all(p.is_file() for p in paths) and (tmp_path / "accuracy-vs-length.png").stat().st_size > 1000
    table = exp.markdown(results)
    assert "**passkey**" in table and "**mean over tasks**" in table and "| full attention | " in table
    assert json.loads((tmp_path / "results.json").read_text())["cells"] == json.loads(json.dumps(results["cells"]))

    def no_more(*args, **kw):
        raise AssertionError("a finished cell ran again")

    real_run_cell = exp.run_cell
    monkeypatch.setattr(exp, "run_cell", no_more)
    again = exp.evaluate(lm, small, **kwargs)
    assert again["cells"] == results["cells"]
    # The cells skipped for --full-max-length are not results: a rerun that allows them runs them
    ran_again = []
    monkeypatch.setattr(exp, "run_cell", lambda lm_, method, task, length, *a: ran_again.append(
        (method, task, length)) or real_run_cell(lm_, method, task, length, *a))
    wider = exp.evaluate(lm, small, **{**kwargs, "full_max_length": None})
    assert sorted(ran_again) == sorted(("full", t, 176) for t in TASKS)
    assert all(c["accuracy"] is not None for c in wider["cells"])
    kwargs["full_max_length"] = None
    # A rerun with other lengths (and fewer methods) keeps the cells it does not select: it
    # used to rewrite the file with its own selection alone.
    ran_again.clear()
    monkeypatch.setattr(exp, "run_cell", lambda lm_, method, task, length, *a: ran_again.append(
        (method, task, length)) or real_run_cell(lm_, method, task, length, *a))
    more = exp.evaluate(lm, small, **{**kwargs, "lengths": (144,), "methods": ("tokenselect",)})
    assert sorted(ran_again) == sorted(("tokenselect", t, 144) for t in TASKS)
    assert more["lengths"] == [128, 144, 176] and more["methods"] == list(exp.METHODS)
    assert {k: c for k, c in ((tuple(c[f] for f in ("method", "task", "length")), c) for c in more["cells"])
            if k[2] != 144} == {(c["method"], c["task"], c["length"]): c for c in wider["cells"]}
    assert len(more["cells"]) == len(wider["cells"]) + len(TASKS)
    exp.markdown(more)  # (the lengths other methods lack are "—")
    monkeypatch.setattr(exp, "run_cell", no_more)
    # Another run's results, or another file, in the folder: refused, left as it was.
    before = (tmp_path / "results.json").read_bytes()
    with pytest.raises(InvalidArgumentError, match=r"other settings \(examples\)"):
        exp.evaluate(lm, small, **{**kwargs, "examples": 3})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.json").write_text('{"runs": []}')
    with pytest.raises(InvalidArgumentError, match="not this experiment's results file"):
        exp.evaluate(lm, small, **{**kwargs, "out": tmp_path / "other"})
    assert (tmp_path / "results.json").read_bytes() == before


def test_bench_runs_end_to_end(lm):
    from jaxaccel.bench import tokenselect as bench

    # 24 cached tokens fit the budget (36 keys): TokenSelect is full attention there, never a hit
    result = bench.run(lm, lengths=(24, 160), batches=(2,), new_tokens=4, runs=1, reps=2, budget=BUDGET,
                       prefill_length=160)
    assert [a["fits_budget"] for a in result["attention"]] == [True, False]
    a, d, p = result["attention"][1], result["decode"][1], result["prefill"]
    assert a["full_ms"] > 0 and a["select_ms"] > 0 and a["reuse_ms"] > 0 and "cache_on_ms" in a
    assert d["full_tokens_per_s"] > 0 and d["tokenselect_on_tokens_per_s"] > 0 and 0 <= d["hit_rate"] <= 1
    assert p["full_s"] > 0 and p["chunked_s"] > 0
    assert result["kv_bytes_per_token_per_layer"] == 2 * CFG.n_kv_heads * CFG.resolved_head_dim * 4
    text = bench.markdown(result)
    assert "Attention time per decode step" in text and "Prefill of one prompt" in text
    assert "| 24 (fits the budget: full attention) | 2 |" in text
    json.dumps(result)


def test_bench_attention_with_a_k_past_the_cache():
    """A k larger than the cache is a valid budget (the whole cache fits): the bench's selection
    state is sized as generate's is, not [batch, k] (k=10**12 tried to allocate 4 TB)."""
    from jaxaccel.bench import tokenselect as bench
    from jaxaccel.model.options import TokenSelectAttention

    policy = TokenSelectAttention(k=10**12, n_init=2, n_local=4, cache_threshold=0.9)
    assert bench.attention_ms(CFG, policy, 40, 1, reuse=True, reps=2, runs=1) > 0
    # timed hits: a selection is reused n_local steps at most, so more reps would time misses
    with pytest.raises(InvalidArgumentError, match=r"needs reps <= n_local \+ 1 \(5\), got 6"):
        bench.attention_ms(CFG, policy, 40, 1, reuse=True, reps=6, runs=1)


def test_cell_hit_rate_is_hits_over_lookups():
    """A short last batch weighs by its lookups, not as much as a full batch."""
    from types import SimpleNamespace

    from jaxaccel.experiments import tokenselect as exp

    batches = iter([(0, 40), (1, 1)])

    class Stub:
        def generate(self, prompts, **kwargs):
            hits, lookups = next(batches)
            return SimpleNamespace(tokens=[[1] for _ in prompts], stats={
                "selection_cache_hits": hits, "selection_lookups": lookups,
                "selection_cache_hit_rate": hits / lookups})

    examples = [SimpleNamespace(prompt=[1, 2], answer=[1], answer_len=1, depth=0.5) for _ in range(5)]
    cell = exp.run_cell(Stub(), "tokenselect", "passkey", 64, examples, dict(BUDGET), 4)
    assert cell["selection_cache_hit_rate"] == pytest.approx(1 / 41) and cell["accuracy"] == 1.0


@pytest.mark.parametrize("main,argv,message", [
    (experiments_main, ["tokenselect", "--tasks", "haystack"], "unknown task or method 'haystack'"),
    (experiments_main, ["tokenselect", "--lengths", "1024,x"], "--lengths '1024,x': expected a comma-separated list of integers"),
    (experiments_main, ["tokenselect", "--model", "/no/such/model"], "does not exist"),
    (experiments_main, ["tokenselect", "--n-local", "-1"], "n_local must be an integer >= 0"),
    (experiments_main, ["tokenselect", "--tasks", "span_recall", "--cache-threshold", "2"], "cache_threshold"),
    (experiments_main, ["tokenselect", "--pool", "4"], "pool must be an odd integer"),
    (experiments_main, ["tokenselect", "--full-max-length", "-1"], "--full-max-length must be >= 1"),
    (experiments_main, ["tokenselect", "--seed", "-1"], "--seed must be >= 0, got -1"),
    (experiments_main, ["tokenselect", "--model", "builtin:longctx", "--lengths", "99999999999"],
     "the KV cache for 103079215104 positions x batch 4 ("),
    (bench_main, ["tokenselect", "--lengths", "99999999999", "--batches", "1"], "the KV cache for"),
    (bench_main, ["tokenselect", "--batches", "0"], "must be >= 1"),
    (bench_main, ["tokenselect", "--k", "0"], "k must be an integer >= 1"),
])
def test_cli_bad_input_exits_2(capsys, main, argv, message):
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_models_the_tasks_cannot_be_drawn_for_are_one_line(capsys, tmp_path):
    """A model without a SentencePiece tokenizer, and one trained with no validation split (no
    held-out code to draw filler from), ended the evaluation with a ValueError traceback."""
    import shutil

    from jaxaccel.model.checkpoint import BUILTIN_MODELS

    config = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=512)
    bare = jaxaccel.from_params(config, init_params(config, jax.random.key(0), "unrolled")).save(tmp_path / "bare")
    run = tmp_path / "run"
    shutil.copytree(BUILTIN_MODELS["longctx"], run / "model")
    (run / "config.yaml").write_text("data:\n  validation_fraction: 0\n")
    for model, message in ((bare, "the retrieval tasks need the model's SentencePiece tokenizer (tokenizer.model "
                                  "in the model folder); this model has none"),
                           (run / "model", "has no validation documents to draw held-out code from")):
        with pytest.raises(SystemExit) as exit_:
            run_cli(experiments_main, ["tokenselect", "--model", str(model), "--lengths", "256", "--tasks", "passkey",
                                       "--examples", "1", "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and err.count("\n") == 1, err
