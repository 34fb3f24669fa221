"""Repetition budgets at their edges, and what the sweep runner records of them.

`TrainData` is built here straight on a synthetic token stream (documents `<s> ... </s>` of
random lengths), so these tests need no corpus, vocabulary or TensorFlow: the schedule, the
rows and their masks are functions of the stream and the config alone. Where `build_data`
itself is needed, its tokenized corpus is a few documents encoded with a SentencePiece model
trained here (no seqio). The runner's planning is tested with `corpus_token_count` replaced by
a number, and its records from hand-written metrics files, so nothing is trained.
"""
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import yaml

import jaxaccel.data
from conftest import fake_tokenized
from jaxaccel.config import from_dict, to_dict
from jaxaccel.data import BOS_ID, EOS_ID, DataConfig, budget, build_data, longctx, pipeline
from jaxaccel.data.pipeline import TrainData, tokens_read
from jaxaccel.errors import ConfigError
from jaxaccel.experiments.results import SweepError
from jaxaccel.experiments.runner import finished_record, plan_steps
from jaxaccel.experiments.spec import load_sweep


def _stream(num_tokens: int, seed: int = 0) -> np.ndarray:
    """`<s> ... </s>` documents of 2-40 tokens back to back, cut at `num_tokens` (as a budget cuts)."""
    rng = np.random.default_rng(seed)
    docs = []
    while sum(map(len, docs)) < num_tokens:
        docs.append(np.concatenate([[BOS_ID], rng.integers(300, 400, int(rng.integers(0, 39))), [EOS_ID]]))
    return np.concatenate(docs)[:num_tokens].astype(np.int32)


def _data(cfg: DataConfig, unique: int, *, seq_len: int, batch_size: int, shard_index: int = 0,
          num_shards: int = 1) -> TrainData:
    return TrainData(cfg, seq_len=seq_len, batch_size=batch_size, shard_index=shard_index, num_shards=num_shards,
                     vocab_path="unused.model", vocab_size=400, stream=_stream(unique),
                     eval_stream=np.zeros(0, np.int32), stats={})


def _positions_read(data: TrainData, steps: int) -> np.ndarray:
    """Stream positions of every token of the first `steps` global batches (repeats kept)."""
    R, U = data.raw_len, len(data._stream)
    out = [np.zeros(0, np.int64)]
    for step in range(steps):
        _, rows = data.sequence_ids(step)
        out += [np.arange(r * R, min((r + 1) * R, U)) for r in rows[rows >= 0]]
    return np.concatenate(out)


# ----------------------------------------------------------------------------- budgets at their edges


def test_a_budget_smaller_than_one_batch_reads_each_token_once_per_epoch_and_no_more():
    U, T, B = 45, 16, 8  # 3 rows an epoch, the last one short; 3 epochs fit in one batch and a bit
    cfg = DataConfig(unique_tokens=U, epochs=3.0)
    data = _data(cfg, U, seq_len=T, batch_size=B)
    assert (data.sequences_per_epoch, data.total_sequences, data.total_steps) == (3, 9, 2)
    stream = data._stream
    positions = _positions_read(data, data.total_steps)
    assert np.array_equal(np.bincount(positions), np.full(U, 3))  # every budget token 3 times, nothing else
    assert data.stats["total_tokens"] == len(positions) == 3 * U
    seen = 0
    for step in range(data.total_steps):
        batch, (_, rows) = data.batch(step), data.sequence_ids(step)
        real = batch["segment_ids"] > 0
        seen += real.sum()
        assert not batch["loss_mask"][~real].any() and not batch["inputs"][~real].any()
        for b in np.flatnonzero(rows >= 0):  # each row is its stream slice; targets never reach past the budget
            start = rows[b] * T
            n = min(T, U - start)
            np.testing.assert_array_equal(batch["inputs"][b, :n], stream[start:start + n])
            scored = np.flatnonzero(batch["loss_mask"][b])
            assert np.all(start + scored + 1 < U)
            np.testing.assert_array_equal(batch["targets"][b, scored], stream[start + scored + 1])
    assert seen == 3 * U


def test_budget_checks_seq_len_as_build_data_does():
    # build_data refuses seq_len < 2; the budget (what a sweep plans with before training) must too,
    # or a sweep plans a seq_len-1 run and fails only when it reaches it, after training the others
    with pytest.raises(ConfigError, match="seq_len must be >= 2"):
        budget(DataConfig(unique_tokens=100), 100, seq_len=1, batch_size=4)
    assert budget(DataConfig(unique_tokens=100), 100, seq_len=2, batch_size=4)["total_sequences"] == 50


@pytest.mark.parametrize("epochs", [0.0, -1.0, float("nan"), float("inf"), 1e300])
def test_epochs_out_of_range_are_one_line_errors(epochs):
    """1e300 epochs was accepted: a 300-digit step count in the dry run, a sweep that trains forever."""
    with pytest.raises(ConfigError, match=r"^data\.epochs must be > 0 and <= 1e\+06, got "):
        DataConfig(unique_tokens=1000, epochs=epochs)
    assert DataConfig(unique_tokens=1000, epochs=1e6).epochs == 1e6


def test_a_tiny_fraction_of_an_epoch_still_reads_a_row():
    # epochs > 0 is valid config; rounding epochs * S to 6 places must not make it an empty (0-step) run
    plan = budget(DataConfig(unique_tokens=1000, epochs=1e-9), 1000, seq_len=64, batch_size=8)
    assert plan["total_sequences"] == 1 and plan["total_steps"] == 1


@pytest.mark.parametrize("objective", ["causal", "ul2"])
def test_tokens_read_counts_any_prefix_of_the_run_exactly(objective):
    for unique, epochs, batch_size in ((1000, 2.5, 8), (997, 0.4, 3), (40, 3.0, 8)):
        cfg = DataConfig(unique_tokens=unique, epochs=epochs, objective=objective, num_sentinels=8, seed=3)
        data = _data(cfg, unique, seq_len=32, batch_size=batch_size)
        for steps in range(data.total_steps + 2):
            positions = _positions_read(data, min(steps, data.total_steps))
            got = tokens_read(cfg, unique, seq_len=32, batch_size=batch_size, steps=steps)
            assert got == (len(positions), len(np.unique(positions))), (unique, epochs, steps)
        assert tokens_read(cfg, unique, seq_len=32, batch_size=batch_size)[0] == data.stats["total_tokens"]


def test_a_run_within_its_first_epoch_records_the_tokens_it_read_not_its_budget():
    """data.epochs < 1 (or train.steps) stops a run inside its first epoch: the sweep record
    counts the distinct tokens its batches held; the budget's count credited it (and the
    scaling fit) with data it never saw."""
    from types import SimpleNamespace

    from jaxaccel.experiments.runner import _tokens_trained
    from jaxaccel.train.config import LoopConfig, RunConfig

    unique, seq_len, batch_size = 997, 32, 3
    for epochs, steps in ((0.4, None), (2.5, 2)):
        cfg = DataConfig(unique_tokens=unique, epochs=epochs, seed=3)
        data = _data(cfg, unique, seq_len=seq_len, batch_size=batch_size)
        run_steps = data.total_steps if steps is None else steps
        positions = _positions_read(data, run_steps)
        stats = {"total_tokens": tokens_read(cfg, unique, seq_len=seq_len, batch_size=batch_size)[0],
                 "unique_tokens": unique, "epochs": epochs, "total_steps": data.total_steps}
        run = SimpleNamespace(config=RunConfig(data=cfg, train=LoopConfig(seq_len=seq_len, batch_size=batch_size)))
        total, seen, repeats = _tokens_trained(run, stats, run_steps)
        assert (total, seen) == (len(positions), len(np.unique(positions))) and seen < unique, (epochs, steps)
        assert repeats == pytest.approx(total / seen)


def test_retrieval_rows_take_their_code_from_the_budget_not_the_whole_split(tmp_path, monkeypatch):
    # code_needle / span_recall rows are windows of corpus code: under data.unique_tokens they must be
    # windows of the unique stream, or a token-crisis run with retrieval rows trains on corpus tokens
    # outside its budget
    text = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_text()
    docs = [text[i:i + 1500] for i in range(0, len(text), 1500)]
    fake = fake_tokenized(tmp_path, docs)
    monkeypatch.setattr(pipeline, "_tokenized", lambda cfg: fake)
    code_streams = []
    real = longctx.RetrievalTasks.from_sentencepiece.__func__

    def recording(cls, model, code_tokens):
        code_streams.append(np.asarray(code_tokens))
        return real(cls, model, code_tokens)

    monkeypatch.setattr(longctx.RetrievalTasks, "from_sentencepiece", classmethod(recording))
    retrieval = {"rate": 0.5, "tasks": ("code_needle", "span_recall"), "min_length": 48}
    cfg = from_dict(DataConfig, {"unique_tokens": 300, "epochs": 2.0, "validation_fraction": 0.0,
                                 "num_sentinels": 8, "vocab_size": 400, "retrieval": retrieval})
    data = build_data(cfg, seq_len=128, batch_size=4)
    budget_tokens = np.asarray(data.base._stream)
    assert len(budget_tokens) == 300 < fake[3].num_tokens("train")
    np.testing.assert_array_equal(code_streams[-1], budget_tokens)
    rows = next(data.train_batches())  # 2 corpus rows of the budget, then 2 rows of task examples
    assert rows["inputs"].shape == (4, 128) and rows["loss_mask"][2:].any()
    # without a budget the whole split is the code (as before: the shipped long-context recipe)
    whole = from_dict(DataConfig, {**to_dict(cfg), "unique_tokens": None})
    build_data(whole, seq_len=128, batch_size=4)
    np.testing.assert_array_equal(code_streams[-1], fake[3].tokens("train"))


# ----------------------------------------------------------------------------- what the runner plans and records


def _sweep(tmp_path, *, data=None, train=None, axes=None, model=None):
    spec = {
        "name": "review",
        "config": {
            "output_dir": str(tmp_path / "runs"), "tensorboard": False,
            "model": {"vocab_size": 512, "d_model": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 32,
                      "max_seq_len": 64, **(model or {})},
            "data": {"corpus": str(tmp_path / "corpus.txt"), "vocab_size": 400, "num_sentinels": 8,
                     "unique_tokens": 1000, "epochs": 2.0, **(data or {})},
            "train": {"batch_size": 8, "seq_len": 32, "progress": False, **(train or {})},
        },
        "axes": axes or {"data.seed": [0]},
    }
    path = tmp_path / "review.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_sweep(path)


@pytest.fixture
def corpus_of(monkeypatch):
    """The training split's token count (and vocabulary size) the runner sees (nothing is tokenized)."""
    def set_count(count, vocab_size=400):
        monkeypatch.setattr(jaxaccel.data, "corpus_token_count", lambda cfg, build=True: count)
        monkeypatch.setattr(pipeline, "corpus_facts", lambda cfg: (count, vocab_size))
    return set_count


def test_the_plan_refuses_seq_len_1_before_any_run_trains(tmp_path, corpus_of):
    corpus_of(5000)
    sweep = _sweep(tmp_path, axes={"train.seq_len": [32, 1]})
    with pytest.raises(ConfigError, match="run 'seq_len=1': seq_len must be >= 2"):
        plan_steps(list(sweep.runs), build=True)


def test_the_plan_counts_only_the_corpus_rows_of_a_batch_with_retrieval_rows(tmp_path, corpus_of, monkeypatch):
    # rate 0.25 of 8 rows: 2 task rows, so the budget is read 6 corpus rows a step (as the trainer
    # reads it: build_data gives TrainData batch_size - task_rows)
    corpus_of(5000)
    monkeypatch.setattr(pipeline, "check_retrieval_fits", lambda *a, **kw: None)  # no corpus here (next test)
    retrieval = {"retrieval": {"rate": 0.25, "min_length": 16}}
    expected = budget(DataConfig(unique_tokens=1000, epochs=2.0), 1000, seq_len=32, batch_size=6)["total_steps"]
    assert expected > budget(DataConfig(unique_tokens=1000, epochs=2.0), 1000, seq_len=32, batch_size=8)["total_steps"]
    run = _sweep(tmp_path, data=retrieval).runs[0]
    assert plan_steps([run], build=True)[0] == {run.name: expected}
    run = _sweep(tmp_path, data=retrieval, train={"steps": expected}).runs[0]  # the whole budget: allowed
    assert plan_steps([run], build=True)[0] == {run.name: expected}
    with pytest.raises(SweepError, match="more than its data budget"):
        plan_steps([_sweep(tmp_path, data=retrieval, train={"steps": expected + 1}).runs[0]], build=True)


def test_the_plan_refuses_retrieval_tasks_that_cannot_fit_before_any_run_trains(tmp_path, corpus_of, monkeypatch):
    # build_data refused them only when that run started: the sweep's earlier runs had trained
    corpus_of(5000)
    text = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_text()
    fake = fake_tokenized(tmp_path, [text[i:i + 1500] for i in range(0, len(text), 1500)])
    monkeypatch.setattr(pipeline, "_tokenized", lambda cfg: fake)
    retrieval = {"retrieval": {"rate": 0.25, "min_length": 16, "tasks": ["passkey"]}}
    sweep = _sweep(tmp_path, data=retrieval, axes={"train.seq_len": [256, 24]}, model={"max_seq_len": 256})
    with pytest.raises(ConfigError, match=r"run 'seq_len=24': data.retrieval.tasks: passkey \(at least \d+ tokens\) "
                                          r"cannot fit seq_len=24"):
        plan_steps(list(sweep.runs), build=True)
    assert plan_steps(list(sweep.runs)[:1], build=True)[0]
    # min_length needs no vocabulary: refused by a dry run too
    sweep = _sweep(tmp_path, data={"retrieval": {"rate": 0.25, "min_length": 300}}, train={"seq_len": 256},
                   model={"max_seq_len": 256})
    with pytest.raises(ConfigError, match="min_length=300 is longer than seq_len=256"):
        plan_steps(list(sweep.runs), build=False)


def test_a_run_stopped_by_train_steps_records_the_tokens_it_read_not_its_budget(tmp_path):
    run = _sweep(tmp_path, train={"steps": 3}).runs[0]
    cfg = run.config
    data = _data(cfg.data, 1000, seq_len=32, batch_size=8)  # the budget: 32 rows an epoch, 8 steps
    assert data.total_steps == 8
    stats = {**data.stats, "corpus_tokens": 5000}
    positions = _positions_read(data, 3)  # 24 of the first epoch's 32 rows
    record = finished_record(run, {"steps": 3, "data": stats}, "done", None, 1.0, 0)
    assert record["total_tokens"] == len(positions) < 1000
    assert record["unique_tokens"] == len(np.unique(positions)) == len(positions)
    assert record["epochs"] == 1.0
    assert record["data"]["total_tokens"] == 2000 and record["data"]["unique_tokens"] == 1000  # the budget, as planned
    whole = finished_record(run, {"steps": 8, "data": stats}, "done", None, 1.0, 0)
    assert (whole["total_tokens"], whole["unique_tokens"], whole["epochs"]) == (2000, 1000, 2.0)


def test_an_evaluation_of_no_tokens_is_no_validation_figure(tmp_path):
    # validation_fraction 0 (or max_eval_tokens 0): the trainer logs eval_loss 0.0 over 0 tokens; a
    # results file must not read that as a perfect model
    run = _sweep(tmp_path, data={"validation_fraction": 0.0}).runs[0]
    folder = tmp_path / "runs" / run.name
    folder.mkdir(parents=True)
    lines = [{"step": 4, "loss": 5.5, "accuracy": 0.1}, {"step": 4, "eval_loss": 0.0, "eval_accuracy": 0.0,
                                                         "eval_perplexity": 1.0, "eval_tokens": 0.0},
             {"step": 8, "loss": 5.0, "accuracy": 0.2}, {"step": 8, "eval_loss": 0.0, "eval_accuracy": 0.0,
                                                         "eval_perplexity": 1.0, "eval_tokens": 0.0}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    record = finished_record(run, {"steps": 8, "data": {}}, "done", None, 1.0, 0)
    assert record["final"] == {"step": 8, "eval_loss": None, "eval_accuracy": None, "train_loss": 5.0}
    assert record["best"]["eval_loss"] is None and record["curve"]["eval_step"] == []
    # an evaluation that scored tokens is kept as it is
    lines[3].update(eval_loss=4.25, eval_accuracy=0.3, eval_tokens=512.0)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    record = finished_record(run, {"steps": 8, "data": {}}, "done", None, 1.0, 0)
    assert record["final"]["eval_loss"] == 4.25 and record["curve"]["eval_step"] == [8]
