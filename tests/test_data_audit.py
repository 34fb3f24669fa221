"""Bad input to the data package gives one clear line, not a traceback or a silent default.

Each test is the reproduction of one defect the data audit found: retrieval tasks too long for
the row, a corpus file name or a JSONL text that is not valid Unicode, and corpora with no text
to train a vocabulary on. Nothing here imports TensorFlow: `build_data` runs on a tokenized
corpus made here with a SentencePiece model trained on a few documents (as in
test_data_review.py), TFDS on a stand-in builder.
"""
import os
import re
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import fake_tokenized

from jaxaccel.config import from_dict
from jaxaccel.data import DataConfig, build_data, corpus as corpus_module, longctx, pipeline
from jaxaccel.data.corpus import open_corpus
from jaxaccel.data.errors import DataError
from jaxaccel.data.vocab import ensure_vocab
from jaxaccel.errors import ConfigError

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message and message
    message.encode("utf-8")  # the CLI prints it: it must be printable whatever the locale's codec
    return message


# ----------------------------------------------------------------------------- retrieval rows that cannot fit


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    """What `pipeline._tokenized` returns: json/decoder.py in 1500-character documents, all
    training, under a 400-piece SentencePiece model trained on them (no seqio / TensorFlow)."""
    text = (STDLIB / "json" / "decoder.py").read_text()
    folder = tmp_path_factory.mktemp("tokenized")
    return fake_tokenized(folder, [text[i:i + 1500] for i in range(0, len(text), 1500)])


def _retrieval_cfg(**retrieval) -> DataConfig:
    return from_dict(DataConfig, {"validation_fraction": 0.0, "num_sentinels": 8, "vocab_size": 400,
                                  "retrieval": {"rate": 0.5, **retrieval}})


def test_retrieval_tasks_longer_than_seq_len_are_refused_when_the_data_is_built(tokenized, monkeypatch):
    # before: the tasks that could not fit were never drawn, silently, and with none fitting every
    # task row was padding (loss_mask 0) while the run exited 0
    monkeypatch.setattr(pipeline, "_tokenized", lambda cfg: tokenized)
    tasks = longctx.RetrievalTasks.from_sentencepiece(tokenized[2].path, tokenized[3].tokens("train"))
    need = {t: tasks.min_length(t) for t in longctx.TASKS}
    seq_len = 128
    too_long = [t for t in longctx.TASKS if need[t] > seq_len]
    assert too_long == ["passkey", "kv_lookup"] and 64 <= need["code_needle"] <= seq_len  # in this vocabulary
    with pytest.raises(ConfigError) as e:
        build_data(_retrieval_cfg(), seq_len=seq_len, batch_size=4)
    message = _one_line(e)
    assert f"passkey (at least {need['passkey']} tokens)" in message
    assert f"kv_lookup (at least {need['kv_lookup']} tokens)" in message
    assert "code_needle" not in message and "seq_len=128" in message
    with pytest.raises(ConfigError) as e:  # not one task fits a row of 32, nor does the default floor of 64
        build_data(_retrieval_cfg(tasks=["code_needle"]), seq_len=32, batch_size=4)
    assert f"code_needle (at least {need['code_needle']} tokens)" in _one_line(e) and "min_length=64" in _one_line(e)
    with pytest.raises(ConfigError) as e:  # the configured floor itself is longer than the row
        build_data(_retrieval_cfg(tasks=["code_needle"], min_length=200), seq_len=seq_len, batch_size=4)
    assert "data.retrieval.min_length=200" in _one_line(e)
    # the tasks that fit are built, and every task row scores its answers
    data = build_data(_retrieval_cfg(tasks=["code_needle"]), seq_len=seq_len, batch_size=4)
    assert next(data.train_batches())["loss_mask"][2:].sum(axis=1).min() > 0


def test_retrieval_data_refuses_tasks_longer_than_seq_len(tokenized):
    tasks = longctx.RetrievalTasks.from_sentencepiece(tokenized[2].path, tokenized[3].tokens("train"))
    with pytest.raises(ConfigError, match="passkey"):
        longctx.RetrievalData(tasks, vocab_size=400, seq_len=128, batch_size=2, total_steps=1)
    longctx.RetrievalData(tasks, vocab_size=400, seq_len=128, batch_size=2, total_steps=1,
                          task_names=("code_needle",))


# ----------------------------------------------------------------------------- text that is not valid Unicode


def test_a_corpus_file_name_that_is_not_utf8_is_a_one_line_data_error(tmp_path):
    # before: UnicodeEncodeError in corpus.is_validation (the document id is the file's path)
    (tmp_path / "good.txt").write_text("fine text\n")
    name = os.path.join(os.fsencode(tmp_path), b"caf\xe9.txt")
    try:
        with open(name, "wb") as f:
            f.write(b"more text\n")
    except OSError:
        pytest.skip("this file system refuses a non-UTF-8 file name")
    with pytest.raises(DataError) as e:
        list(open_corpus(str(tmp_path / "*.txt")).documents("train", 1000))
    message = _one_line(e)
    assert message.endswith(": file name is not UTF-8") and "caf\\xe9.txt" in message


def test_a_jsonl_text_with_a_lone_surrogate_is_a_one_line_data_error(tmp_path):
    # before: a TensorFlow InternalError traceback (validation) or "Unable to cast Python instance" (training)
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "abc \\ud800"}\n')  # valid JSON, not valid Unicode
    with pytest.raises(DataError) as e:
        list(open_corpus(str(path)).documents())
    assert _one_line(e) == f"{path}:3: text is not valid Unicode (a lone surrogate)"


def fake_tfds(monkeypatch, tmp_path, **splits):
    """A prepared TFDS dataset "fake" whose split NAME holds the examples `splits[NAME]`,
    sliced by TFDS's own reading of a split spelling (TensorFlow is not installed here)."""
    from tensorflow_datasets.core import ReadInstruction

    for name in splits:
        (tmp_path / f"fake-{name}.tfrecord").write_bytes(b"records")
    info = SimpleNamespace(full_name="fake/1.0.0", splits={
        name: SimpleNamespace(num_examples=len(examples), filepaths=[tmp_path / f"fake-{name}.tfrecord"])
        for name, examples in splits.items()})

    def as_dataset(split, shuffle_files):
        assert shuffle_files is False
        (part,) = ReadInstruction.from_spec(split).to_absolute(info.splits)
        return splits[part.splitname][part.from_ or 0:part.to]

    builder = SimpleNamespace(name="fake", info=info, as_dataset=as_dataset, is_prepared=lambda: True,
                              data_dir=tmp_path)
    monkeypatch.setattr(corpus_module, "_tfds_builder", lambda name: builder)
    monkeypatch.setattr(corpus_module, "import_tfds", lambda: SimpleNamespace(as_numpy=lambda dataset: dataset))


def test_a_tfds_text_that_is_not_utf8_is_a_one_line_data_error(monkeypatch, tmp_path):
    fake_tfds(monkeypatch, tmp_path, train=[{"text": b"fine"}, {"text": b"caf\xe9"}])
    with pytest.raises(DataError) as e:
        list(open_corpus("tfds:fake").documents())
    assert _one_line(e) == "tfds:fake train example 1: field 'text' is not UTF-8 text (byte 3)"


def test_tfds_document_ids_are_indices_in_the_whole_split(monkeypatch, tmp_path):
    """An example's id (which decides whether it is held out) was spelled with the slice:
    "train[:2%]:5" and "train[:1%]:5" were two ids for one example, so runs on two slices held
    out different examples of their common part, and one slice's validation examples were
    another's training examples. Now it is the example's index in its whole split, as TFDS
    reads the spelling (composite splits too); a whole split's ids, and so its corpus hash,
    did not change."""
    train = [{"text": f"doc {i}"} for i in range(10)]
    fake_tfds(monkeypatch, tmp_path, train=train, validation=[{"text": f"val {i}"} for i in range(4)])
    whole = open_corpus("tfds:fake:train")
    assert [d.id for d in whole.documents()] == [f"train:{i}" for i in range(10)]
    assert "ids" not in whole.manifest["tfds"]
    sliced = open_corpus("tfds:fake:train[3:7]")
    assert [(d.id, d.text) for d in sliced.documents()] == [(f"train:{i}", f"doc {i}") for i in range(3, 7)]
    assert sliced.manifest["tfds"]["ids"] == "split:index" and sliced.sha256 != whole.sha256
    assert [d.id for d in open_corpus("tfds:fake:train[-20%:]").documents()] == ["train:8", "train:9"]
    mixed = open_corpus("tfds:fake:train[:2]+validation[1:3]")
    assert [d.id for d in mixed.documents()] == ["train:0", "train:1", "validation:1", "validation:2"]
    assert [f["path"] for f in mixed.manifest["files"]] == ["fake-train.tfrecord", "fake-validation.tfrecord"]
    with pytest.raises(DataError) as e:
        open_corpus("tfds:fake:test[:5]")
    assert _one_line(e).startswith("data.corpus: tfds dataset 'fake' cannot read split 'test[:5]': Unknown split")


# ----------------------------------------------------------------------------- no text to train a vocabulary on


def _vocab(corpus_spec: str, directory: Path, validation_buckets: int = 0):
    return ensure_vocab(open_corpus(corpus_spec), directory, validation_buckets=validation_buckets, vocab_size=400,
                        num_sentinels=8, vocab_max_chars=10 ** 7)


def test_a_corpus_of_whitespace_says_there_is_no_text_to_train_a_vocabulary_on(tmp_path):
    # before: "SentencePiece training failed: INTERNAL: ... [!sentences_.empty()]"
    for i in range(2):
        (tmp_path / f"blank{i}.txt").write_text("   \n\n \t\n" * 10)
    with pytest.raises(DataError) as e:
        _vocab(str(tmp_path / "*.txt"), tmp_path / "vocab")
    message = _one_line(e)
    assert "no text to train a vocabulary on" in message and "whitespace" in message
    assert "SentencePiece" not in message


def test_a_corpus_of_empty_documents_does_not_blame_validation(tmp_path):
    # before: "the training split is empty (validation takes every document)" with validation_fraction 0
    (tmp_path / "a.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    with pytest.raises(DataError) as e:
        _vocab(str(tmp_path / "a.jsonl"), tmp_path / "vocab")
    message = _one_line(e)
    assert "every document is empty" in message and "validation" not in message
    # where validation does take every document, the message still says so
    (tmp_path / "b.txt").write_text("some text\n")
    with pytest.raises(DataError, match=re.escape("validation takes every document")):
        _vocab(str(tmp_path / "b.txt"), tmp_path / "vocab2", validation_buckets=10_000)


def test_a_damaged_cache_file_is_built_again_not_a_traceback(tmp_path):
    """Cache files are written atomically, so only damage from outside makes a bad one: a file
    that is not UTF-8 was a UnicodeDecodeError traceback and valid JSON of another type a
    TypeError deep in the build; each now reads as missing (the build makes it again)."""
    from jaxaccel.data import cache

    (tmp_path / "bytes.json").write_bytes(b"\xff\xfe{}")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "folder.json").mkdir()
    (tmp_path / "good.json").write_text('{"pieces": 400}')
    assert cache.read_json(tmp_path / "bytes.json") is None
    assert cache.read_json(tmp_path / "list.json", dict) is None and cache.read_json(tmp_path / "list.json") == [1, 2]
    assert cache.read_json(tmp_path / "folder.json") is None and cache.read_json(tmp_path / "missing.json") is None
    assert cache.read_json(tmp_path / "good.json", dict) == {"pieces": 400}


def test_a_tfds_split_slice_and_a_bucket_data_dir_open(tmp_path, monkeypatch):
    """Every pod preset's corpus ('tfds:c4/en:train[:1%]') was refused: the slice's own colon
    split the spec in four. And with TFDS_DATA_DIR on a bucket TFDS names its files by gs://
    paths (etils epaths), which pathlib and builtin open turned into local '/gs/...' names.
    Here the bucket is a local folder behind a path type whose name is gs://."""
    from test_foundation import _ObjectStorePath

    (tmp_path / "c4" / "en").mkdir(parents=True)
    (tmp_path / "c4" / "en" / "c4-train.tfrecord-00000").write_bytes(b"records")
    bucket = _ObjectStorePath(tmp_path, "gs://bucket/tfds")
    asked = []

    def builder(name):
        asked.append(name)
        split = SimpleNamespace(filepaths=[bucket / "c4" / "en" / "c4-train.tfrecord-00000"], num_examples=100)
        info = SimpleNamespace(splits={"train": split}, full_name="c4/en/3.1.0")
        return SimpleNamespace(is_prepared=lambda: True, data_dir=bucket, info=info)

    monkeypatch.setattr(corpus_module, "_tfds_builder", builder)
    # the split's files are sized, never read: hashing them read all of C4's train split
    # (for train[:1%]) on every host at every start
    monkeypatch.setattr(corpus_module, "_sha256_file", lambda path: pytest.fail(f"{path} was read"))
    corpus = open_corpus("tfds:c4/en:train[:1%]")
    assert asked == ["c4/en"] and corpus.manifest["tfds"]["split"] == "train[:1%]"
    assert corpus.manifest["files"] == [{"path": "c4/en/c4-train.tfrecord-00000", "bytes": 7}]
    (tmp_path / "c4" / "en" / "c4-train.tfrecord-00000").write_bytes(b"records, re-prepared")
    assert open_corpus("tfds:c4/en:train[:1%]").sha256 != corpus.sha256  # another size: another corpus
    assert corpus.manifest["root"] == "gs://bucket/tfds"
    # the dataset's name, not its last file's path (the hashing loop overwrote it): reading the
    # documents asked TFDS for a builder named by that path, so every TFDS corpus failed to build
    assert corpus.manifest["tfds"]["name"] == "c4/en" and corpus.slug == "tfds-c4_en"


def test_a_corpus_file_that_cannot_be_opened_is_a_data_error_naming_it(tmp_path):
    """Only read errors were caught while hashing: a file that cannot be opened (no permission,
    gone between the glob and the hash) was a bare OSError traceback at the API."""
    with pytest.raises(DataError, match=r"gone\.txt: no such file or directory"):
        corpus_module._sha256_file(tmp_path / "gone.txt")
    with pytest.raises(DataError, match=r"is a directory"):
        corpus_module._sha256_file(tmp_path)


def test_the_unique_stream_is_cut_again_when_its_tokens_were_rebuilt_under_another_vocabulary(tmp_path):
    """The stream cache was checked only by its length: token arrays rebuilt for a new
    vocabulary (a damaged spm.model retrained) under the same folder kept the old ids' stream."""
    import numpy as np

    class Tokenized:
        directory = tmp_path / "vocab" / "tokens"

        def __init__(self, tokens, vocab_sha256):
            self._tokens, self.info = np.array(tokens, np.int32), {"vocab_sha256": vocab_sha256}

        def tokens(self, split):
            return self._tokens

        def offsets(self, split):
            return np.array([0, 5, 10], np.int64)

    cfg = DataConfig(corpus="x.txt", vocab_size=400, num_sentinels=8)
    old = Tokenized([3, 10, 11, 12, 1, 3, 20, 21, 22, 1], "a" * 64)
    new = Tokenized([3, 40, 41, 42, 1, 3, 50, 51, 52, 1], "b" * 64)  # same counts, other ids
    assert sorted(np.asarray(pipeline._unique_stream(old, cfg)[0]).tolist()) == sorted(old.tokens("train").tolist())
    with pytest.warns(UserWarning, match="was cut from the tokens of another vocabulary: building it again"):
        stream, info = pipeline._unique_stream(new, cfg)
    assert sorted(np.asarray(stream).tolist()) == sorted(new.tokens("train").tolist())
    assert info["vocab_sha256"] == "b" * 64


def test_a_damaged_token_count_record_counts_as_none_in_a_dry_run(tmp_path):
    """corpus_token_count(build=False) (the sweep's dry run) read the record's splits unchecked:
    a record without them was a KeyError traceback, where the cache takes it for missing."""
    (tmp_path / "a.txt").write_text("hello world\n")
    cfg = DataConfig(corpus=str(tmp_path / "a.txt"), cache_dir=str(tmp_path / "cache"), vocab_size=400,
                     num_sentinels=8)
    info = pipeline._vocab_dir(open_corpus(cfg.corpus), cfg)[1] / "tokens" / "info.json"
    info.parent.mkdir(parents=True)
    for damaged in ('{"task": "x"}', '{"splits": {"train": {"tokens": "many"}}}', '{"splits": []}'):
        info.write_text(damaged)
        assert pipeline.corpus_token_count(cfg, build=False) is None, damaged
    info.write_text('{"splits": {"train": {"tokens": 17}}}')
    assert pipeline.corpus_token_count(cfg, build=False) == 17


def test_a_vocabulary_sample_too_small_says_so_and_names_vocab_max_chars(tmp_path):
    """A data.vocab_max_chars that keeps no chunk gave SentencePiece's own
    'INTERNAL: ... [!sentences_.empty()]'; one that keeps a few blamed the split."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_text()
    (tmp_path / "a.txt").write_text(text)
    corpus = open_corpus(str(tmp_path / "a.txt"))
    with pytest.raises(ConfigError) as e:
        ensure_vocab(corpus, tmp_path / "v", validation_buckets=0, vocab_size=400, num_sentinels=8, vocab_max_chars=100)
    assert "training sample is empty" in str(e.value) and "data.vocab_max_chars=100" in str(e.value)
    assert f"of the split's {len(text)} characters" in str(e.value) and "INTERNAL" not in str(e.value)
    # a vocab_size too small for the sample's characters: a larger sample needs more pieces, no hint
    rng = np.random.default_rng(0)
    cjk = "\n".join("".join(chr(0x4E00 + i) for i in rng.integers(0, 600, 60)) for _ in range(1000))
    (tmp_path / "b.txt").write_text(cjk)
    with pytest.raises(ConfigError, match="is too small") as e:
        ensure_vocab(open_corpus(str(tmp_path / "b.txt")), tmp_path / "w", validation_buckets=0, vocab_size=300,
                     num_sentinels=8, vocab_max_chars=30_000)
    assert "vocab_max_chars" not in str(e.value)


def test_ul2_spans_longer_than_configured_are_said():
    """Past ~2,200 tokens a row wants more spans than the 100 sentinels: R(mean_span=3) at
    seq_len 8192 averaged 12-token spans, with nothing said outside a module docstring."""
    import warnings

    from jaxaccel.data.config import Denoiser
    from jaxaccel.data.objectives import random_spans_noise_mask, ul2_raw_length

    r, x, s = Denoiser("R", 3.0, 0.15), Denoiser("X", 32.0, 0.5), Denoiser("S", rate=0.5)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        short = ul2_raw_length(2048, [r, x, s], 100)
    assert said == [] and 1800 < short < 2048  # under the cap: nothing said
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        long = ul2_raw_length(8192, [r, s], 100)
    assert len(said) == 1 and issubclass(said[0].category, UserWarning), [str(w.message) for w in said]
    message = str(said[0].message)
    assert message == ("UL2 denoiser R(mean_span=3) at seq_len=8192: data.num_sentinels=100 allows 100 spans a row, "
                       "so its spans average 12.0 tokens; data.num_sentinels=399 keeps them at 3"), message
    # what it says is what a row of that length gets: 100 noise spans averaging 12 tokens
    mask = random_spans_noise_mask(long, r.noise_density, r.mean_span, 100, np.random.default_rng(0))
    starts = np.flatnonzero(mask[1:] & ~mask[:-1])
    assert len(starts) == 100 and mask.sum() / len(starts) == pytest.approx(12.0, abs=0.05)
