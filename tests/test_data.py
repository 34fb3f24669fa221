"""jaxaccel.data: corpus manifest, split, vocabulary, seqio tokens, repetition budget,
resumption, sharding, and the causal / prefix-LM / UL2 examples.

Everything but one test uses a small corpus written here (40-line pieces of a few stdlib
modules), a 400-piece vocabulary and seq_len 64; the full-stdlib build is the one slow test.
"""
import hashlib
import json
import math
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import pytest

from jaxaccel.config import from_dict, to_dict
from jaxaccel.data import (BATCH_KEYS, BOS_ID, EOS_ID, MODE_IDS, PAD_ID, DataConfig, DataError, attention_mask,
                           budget, build_data, sentinel_id)
from jaxaccel.data import vocab as vocab_module
from jaxaccel.data.corpus import is_validation, manifest_sha256, open_corpus
from jaxaccel.errors import ConfigError, JaxaccelError

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SEQ, BATCH = 64, 8
SMALL = dict(vocab_size=400, num_sentinels=8, validation_fraction=0.1, max_eval_tokens=3000)


def _source_pieces(n_docs: int, lines: int = 40) -> list[str]:
    text = "".join(p.read_text() for p in sorted(STDLIB.glob("json/*.py")) + sorted(STDLIB.glob("email/*.py")))
    all_lines = text.splitlines(keepends=True)
    pieces = ["".join(all_lines[i:i + lines]) for i in range(0, len(all_lines), lines)]
    return pieces[:n_docs]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(_source_pieces(120)):
        (folder / "src" / f"part{i // 50}").mkdir(parents=True, exist_ok=True)
        (folder / "src" / f"part{i // 50}" / f"doc_{i:03d}.py").write_text(text)
    return folder


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def spec(corpus_dir):
    return str(corpus_dir / "src" / "**" / "*.py")


def _cfg(spec, cache_dir, **changes):
    return DataConfig(corpus=spec, cache_dir=cache_dir, **{**SMALL, **changes})


@pytest.fixture(scope="module")
def small(spec, cache_dir):
    """Causal LM, 6000 unique tokens x 3 epochs."""
    return build_data(_cfg(spec, cache_dir, unique_tokens=6000, epochs=3.0), seq_len=SEQ, batch_size=BATCH)


@pytest.fixture(scope="module")
def sp(small):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(small.vocab_path))


def _all_batches(data):
    return list(data.train_batches())


def _rows(batches, key="inputs"):
    return np.concatenate([b[key] for b in batches])


def _row_ids(data):
    """(epoch, row) of every row of the run, in stream order."""
    ids = [data.sequence_ids(k) for k in range(data.total_steps)]
    return np.concatenate([e for e, _ in ids]), np.concatenate([r for _, r in ids])


def _segments(tokens):
    """Split a token stream at BOS: the documents it is made of."""
    starts = np.flatnonzero(tokens == BOS_ID)
    return [tokens[a:b] for a, b in zip(starts, list(starts[1:]) + [len(tokens)])]


def _doc_tokens(data, sp, split):
    corpus = open_corpus(data.cfg.corpus)
    return {d.id: np.array([BOS_ID] + sp.encode(d.text) + [EOS_ID], np.int32)
            for d in corpus.documents(split, data.cfg.validation_buckets)}


# ----------------------------------------------------------------------------- corpus


def test_manifest_names_every_file_with_its_size_and_hash(spec, corpus_dir, small):
    corpus = open_corpus(spec)
    files = sorted((corpus_dir / "src").rglob("*.py"))
    assert [e["path"] for e in corpus.manifest["files"]] == sorted(p.relative_to(corpus_dir / "src").as_posix()
                                                                 for p in files)
    for entry in corpus.manifest["files"]:
        data = (corpus_dir / "src" / entry["path"]).read_bytes()
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert corpus.sha256 == manifest_sha256(corpus.manifest)
    assert open_corpus(spec).manifest == corpus.manifest  # deterministic
    written = json.loads(Path(small.stats["manifest_path"]).read_text())
    assert written == corpus.manifest and small.stats["manifest_sha256"] == corpus.sha256
    # the same files named another way hash the same (content changes: the next test)
    other_spelling = ",".join(str(corpus_dir / "src" / f"part{i}" / "*.py") for i in range(3))
    assert open_corpus(other_spelling).sha256 == corpus.sha256


def test_manifest_hash_changes_with_any_file(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"document {i}\n")
    before = open_corpus(str(tmp_path / "*.txt")).sha256
    (tmp_path / "1.txt").write_text("document 1!\n")
    assert open_corpus(str(tmp_path / "*.txt")).sha256 != before
    (tmp_path / "1.txt").write_text("document 1\n")
    assert open_corpus(str(tmp_path / "*.txt")).sha256 == before
    (tmp_path / "3.txt").write_text("document 3\n")
    assert open_corpus(str(tmp_path / "*.txt")).sha256 != before


def test_validation_split_is_disjoint_stable_and_follows_the_hash_rule(tmp_path, spec, small, sp):
    lines = [json.dumps({"text": f"record {i}: " + "x" * (i % 7), "other": i}) for i in range(2000)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    corpus = open_corpus(str(tmp_path / "d.jsonl"))
    val = [d.id for d in corpus.documents("validation", 1000)]
    train = [d.id for d in corpus.documents("train", small.cfg.validation_buckets)]
    assert not set(val) & set(train) and len(val) + len(train) == 2000
    assert val == [d.id for d in corpus.documents("validation", 1000)]  # stable
    # the documented rule, computed independently: sha256(id) mod 10_000 < fraction * 10_000
    assert val == [f"d.jsonl:{i + 1}" for i in range(2000)
                   if int(hashlib.sha256(f"d.jsonl:{i + 1}".encode()).hexdigest()[:16], 16) % 10_000 < 1000]
    assert 140 <= len(val) <= 260  # 10 % of 2000, +-4.5 sigma
    # the data pipeline: validation docs never reach training, and eval reads only them
    train_docs, val_docs = _doc_tokens(small, sp, "train"), _doc_tokens(small, sp, "validation")
    assert val_docs and not set(train_docs) & set(val_docs)
    train_texts = {d.tobytes() for d in train_docs.values()}
    assert not any(d.tobytes() in train_texts for d in val_docs.values())
    # (that training rows hold only training documents is test_unique_tokens_are_exact_... and
    # test_the_whole_split_is_every_training_document_once)
    evals = list(small.eval_batches())
    eval_tokens = _rows(evals)[_rows(evals, "segment_ids") > 0]  # eval rows are in stream order
    docs = _segments(eval_tokens)
    assert all(d.tobytes() in {v.tobytes() for v in val_docs.values()} for d in docs[:-1])
    assert any(v.tobytes().startswith(docs[-1].tobytes()) for v in val_docs.values())
    val_size = sum(len(v) for v in val_docs.values())
    assert len(eval_tokens) == min(small.cfg.max_eval_tokens, val_size) == small.stats["eval_tokens"]


def test_eval_batches_are_finite_fixed_and_identical_every_call(small):
    first, second = list(small.eval_batches()), list(small.eval_batches())
    assert len(first) == small.eval_steps > 0
    for a, b in zip(first, second):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(a[k], b[k])
    assert not _rows(first, "bidirectional").any()


# ----------------------------------------------------------------------------- vocabulary


def test_vocab_is_deterministic_cached_and_has_fixed_special_ids(spec, cache_dir, tmp_path, small, sp):
    path = small.vocab_path
    mtime, trains = path.stat().st_mtime_ns, vocab_module.TRAINS
    again = build_data(_cfg(spec, cache_dir, unique_tokens=6000, epochs=3.0), seq_len=SEQ, batch_size=BATCH)
    assert again.vocab_path == path and path.stat().st_mtime_ns == mtime and vocab_module.TRAINS == trains
    elsewhere = build_data(_cfg(spec, str(tmp_path)), seq_len=SEQ, batch_size=BATCH)
    assert vocab_module.TRAINS == trains + 1  # a fresh cache trains ...
    assert elsewhere.vocab_path != path and elsewhere.vocab_path.read_bytes() == path.read_bytes()  # ... the same bytes
    assert small.vocab_size == sp.get_piece_size() == 400
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (PAD_ID, EOS_ID, 2, BOS_ID) == (0, 1, 2, 3)
    assert [sp.id_to_piece(MODE_IDS[m]) for m in "RXS"] == ["[R]", "[X]", "[S]"]
    assert [sp.id_to_piece(sentinel_id(i)) for i in range(8)] == [f"<extra_id_{i}>" for i in range(8)]
    text = "def f(x):\n\tif x[R] <extra_id_0>:\n        return 'é✓'  # 2024\n\n"
    ids = sp.encode(text)
    assert sp.decode(ids) == text  # exact: indentation, tabs, newlines, unicode (byte fallback)
    assert not set(ids) & ({BOS_ID, EOS_ID, PAD_ID} | set(MODE_IDS.values()) | {sentinel_id(i) for i in range(8)})


def test_vocab_trains_on_a_fixed_hash_sample_of_a_large_split(spec, tmp_path, small):
    data = build_data(_cfg(spec, str(tmp_path), vocab_max_chars=50_000), seq_len=SEQ, batch_size=BATCH)
    info = json.loads((data.vocab_path.parent / "vocab.json").read_text())
    keep = info["keep_fraction"]
    assert keep == pytest.approx(50_000 / info["train_chars"]) and 0.1 < keep < 0.5
    corpus = open_corpus(spec)
    chunks = [(d.id, i, c) for d in corpus.documents("train", small.cfg.validation_buckets)
              for i, c in enumerate(vocab_module.training_chunks(d.text))]
    assert "".join(c for _, _, c in chunks) == "".join(d.text for d in corpus.documents("train", small.cfg.validation_buckets))
    kept = sum(len(c) for doc_id, i, c in chunks if vocab_module._keep_chunk(doc_id, i, keep))
    assert abs(kept - 50_000) < 20_000  # about vocab_max_chars characters ...
    retrained = vocab_module.train_sentencepiece(corpus.documents("train", small.cfg.validation_buckets), 400, 8, keep)
    assert retrained == data.vocab_path.read_bytes() != small.vocab_path.read_bytes()  # ... the same ones each time


def test_seqio_task_tokens_are_the_sentencepiece_tokens(small, sp):
    from jaxaccel.data.tasks import tokenize_corpus

    corpus = open_corpus(small.cfg.corpus)
    tokenized = tokenize_corpus(corpus, small.vocab_path, small.cfg.validation_buckets)
    assert tokenized.task_name.startswith("jaxaccel_")
    for split in ("train", "validation"):
        docs = _doc_tokens(small, sp, split)
        assert tokenized.doc_ids(split) == list(docs)
        np.testing.assert_array_equal(tokenized.tokens(split), np.concatenate(list(docs.values())))
    assert small.stats["corpus_tokens"] == tokenized.num_tokens("train")
    vocabulary = small.vocabulary()
    import seqio

    assert isinstance(vocabulary, seqio.SentencePieceVocabulary)
    assert (vocabulary.vocab_size, vocabulary.eos_id, vocabulary.pad_id) == (small.vocab_size, EOS_ID, PAD_ID)
    assert small.stats["seqio_task"] in seqio.TaskRegistry.names()


def test_a_corpus_is_tokenized_and_its_stream_written_a_chunk_at_a_time(small, sp, tmp_path, monkeypatch):
    """Pod-scale corpora are never whole in host memory: the split's tokens and the unique stream
    are written in pieces. With pieces of a few dozen tokens the files are what one piece gives."""
    import shutil

    from jaxaccel.data import pipeline, tasks

    monkeypatch.setattr(tasks, "_CHUNK_TOKENS", 50)
    monkeypatch.setattr(pipeline, "_CHUNK_TOKENS", 37)
    vocab = tmp_path / small.vocab_path.parent.name / small.vocab_path.name
    vocab.parent.mkdir()
    shutil.copy(small.vocab_path, vocab)
    corpus = open_corpus(small.cfg.corpus)
    whole = tasks.tokenize_corpus(corpus, small.vocab_path, small.cfg.validation_buckets)
    pieces = tasks.tokenize_corpus(corpus, vocab, small.cfg.validation_buckets)
    assert pieces.directory != whole.directory and pieces.info["splits"] == whole.info["splits"]
    for split in ("train", "validation"):
        np.testing.assert_array_equal(pieces.tokens(split), whole.tokens(split))
        np.testing.assert_array_equal(pieces.offsets(split), whole.offsets(split))
        assert pieces.doc_ids(split) == whole.doc_ids(split) == list(_doc_tokens(small, sp, split))
    stream, info = pipeline._unique_stream(pieces, small.cfg)
    np.testing.assert_array_equal(stream, small._stream)
    assert info["sha256"] == small.stats["unique_stream_sha256"] == hashlib.sha256(stream.tobytes()).hexdigest()
    assert info["documents"] == small.stats["unique_documents"] == int((stream == BOS_ID).sum())


def test_a_damaged_cache_is_built_again_not_read(small, spec, cache_dir, tmp_path):
    """A truncated array (a full disk, a copy cut short) was a memory-map traceback on every run
    and never rebuilt; a missing ids file silently meant no evaluation."""
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    cfg = _cfg(spec, str(copy), unique_tokens=6000, epochs=3.0)

    def same_as_small(data):
        for a, b in zip(_all_batches(data)[:3] + list(data.eval_batches()), _all_batches(small)[:3] +
                        list(small.eval_batches())):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
        assert data.stats["unique_stream_sha256"] == small.stats["unique_stream_sha256"]

    def truncate(path):
        path.write_bytes(path.read_bytes()[:-40])

    [stream] = copy.glob("**/stream-*/tokens.npy")
    truncate(stream)
    with pytest.warns(UserWarning, match=r"data cache \S+stream-\w+ is damaged .* building it again"):
        same_as_small(build_data(cfg, seq_len=SEQ, batch_size=BATCH))
    assert stream.stat().st_size == (small._stream.nbytes + 128)
    [tokens] = copy.glob("**/tokens/train.tokens.npy")
    truncate(tokens)
    (tokens.parent / "validation.ids.json").unlink()
    with pytest.warns(UserWarning, match=r"data cache \S+tokens is damaged"):
        same_as_small(build_data(cfg, seq_len=SEQ, batch_size=BATCH))
    assert (tokens.parent / "validation.ids.json").is_file()


def test_a_damaged_vocabulary_or_cache_record_is_built_again(small, spec, cache_dir, tmp_path):
    """A truncated spm.model was taken as the vocabulary (only its presence was checked): the
    run tokenized with it, fingerprinted its bytes and trained to the end, then failed to
    export, and could not be resumed once the vocabulary was fixed. A cache record missing a
    key was a KeyError traceback. Each is now damage: built again, with a warning."""
    import json
    import shutil

    from jaxaccel.data.errors import DataError
    from jaxaccel.train.loop import data_fingerprint

    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    cfg = _cfg(spec, str(copy), unique_tokens=6000, epochs=3.0)
    [model] = copy.glob("**/spm.model")
    good = model.read_bytes()
    model.write_bytes(good[:len(good) // 2])
    with pytest.warns(UserWarning, match=r"data cache \S+ is damaged .* building it again"):
        data = build_data(cfg, seq_len=SEQ, batch_size=BATCH)
    assert model.read_bytes() == good and data_fingerprint(data) == data_fingerprint(small)
    np.testing.assert_array_equal(_all_batches(data)[0]["inputs"], _all_batches(small)[0]["inputs"])
    for record, key in (("**/vocab.json", "pieces"), ("**/stream-*/info.json", "documents"),
                        ("**/tokens/info.json", "task")):
        [path] = copy.glob(record)
        info = json.loads(path.read_text())
        del info[key]
        path.write_text(json.dumps(info))
        with pytest.warns(UserWarning, match=r"data cache \S+ is damaged"):
            data = build_data(cfg, seq_len=SEQ, batch_size=BATCH)
        assert data.stats["unique_stream_sha256"] == small.stats["unique_stream_sha256"], record
    model.write_bytes(b"not a model")  # under a built run's feet: refused before any training
    with pytest.raises(DataError, match="not a readable SentencePiece model"):
        data_fingerprint(data)


def test_an_existing_file_with_glob_characters_in_its_name_is_itself(tmp_path):
    from jaxaccel.data.corpus import open_corpus

    (tmp_path / "run[1].txt").write_text("alpha beta\n")
    (tmp_path / "run1.txt").write_text("gamma\n")
    corpus = open_corpus(str(tmp_path / "run[1].txt"))
    assert [d.text for d in corpus.documents()] == ["alpha beta\n"]
    assert [d.text for d in open_corpus(str(tmp_path / "run[0-9].txt")).documents()] == ["gamma\n"]


@pytest.mark.parametrize("limit", [None, 0, 1, 29, 30, 31, 200, 10**9])
def test_document_chunks_are_whole_documents_back_to_back(limit):
    from jaxaccel.data.pipeline import _document_chunks

    rng = np.random.default_rng(limit or 0)
    lengths = rng.integers(0, 12, 40)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = rng.integers(0, 1000, int(offsets[-1])).astype(np.int32)
    order = rng.permutation(40)
    want = np.concatenate([tokens[offsets[d]:offsets[d + 1]] for d in order])[:limit]
    ends = set(np.cumsum(lengths[order]).tolist())
    for chunk_tokens in (1, 5, 16, 1 << 22):
        chunks = list(_document_chunks(tokens, offsets, order, limit, chunk_tokens))
        np.testing.assert_array_equal(np.concatenate([np.zeros(0, np.int32), *chunks]), want)
        assert all(len(c) > 0 and c.dtype == np.int32 for c in chunks)
        cuts = np.cumsum([len(c) for c in chunks]).tolist()
        assert all(cut in ends for cut in cuts[:-1])  # a piece ends where a document does
        assert all(len(c) < chunk_tokens + 12 for c in chunks)


def test_an_array_streamed_to_the_cache_is_the_array_and_its_hash(tmp_path):
    from jaxaccel.data import cache

    parts = [np.arange(5), np.zeros(0, np.int64), np.arange(7) * -3]
    count, sha256 = cache.save_array_stream(tmp_path / "a.npy", iter(parts), np.int32)
    whole = np.concatenate(parts).astype(np.int32)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), whole)
    assert (count, sha256) == (12, hashlib.sha256(whole.tobytes()).hexdigest())
    assert cache.save_array_stream(tmp_path / "empty.npy", iter([]), np.int64)[0] == 0
    assert np.load(tmp_path / "empty.npy").shape == (0,)

    def interrupted():
        yield np.arange(3)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.save_array_stream(tmp_path / "a.npy", interrupted(), np.int32)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), whole)  # the old file stands, no temp file is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "empty.npy"]


# ----------------------------------------------------------------------------- repetition budget


def _first_epoch_stream(data):
    """The unique stream, rebuilt from the rows of epoch 0 put back in row order."""
    epochs, rows = _row_ids(data)
    batches = _all_batches(data)
    inputs, segs = _rows(batches), _rows(batches, "segment_ids")
    first_epoch = np.flatnonzero(epochs == 0)
    order = first_epoch[np.argsort(rows[first_epoch])]
    return np.concatenate([inputs[i][segs[i] > 0] for i in order])


def test_unique_tokens_are_exact_whole_shuffled_training_documents(small, sp, spec, cache_dir):
    stream = _first_epoch_stream(small)
    assert len(stream) == small.stats["unique_tokens"] == 6000
    docs = _segments(stream)
    train_docs = {d.tobytes() for d in _doc_tokens(small, sp, "train").values()}
    assert all(d.tobytes() in train_docs for d in docs[:-1])  # whole documents ...
    assert len({d.tobytes() for d in docs}) == len(docs)  # ... each at most once ...
    assert any(t.startswith(docs[-1].tobytes()) for t in train_docs)  # ... the last cut at the budget
    assert small.stats["unique_documents"] == len(docs)
    # another seed draws other documents, but exactly as many tokens
    reseeded = build_data(_cfg(spec, cache_dir, unique_tokens=6000, seed=1), seq_len=SEQ, batch_size=BATCH)
    assert reseeded.stats["unique_tokens"] == 6000
    assert reseeded.stats["unique_stream_sha256"] != small.stats["unique_stream_sha256"]


def test_epochs_repeat_the_same_rows_in_a_new_order(small, spec, cache_dir):
    S = small.sequences_per_epoch
    assert S == math.ceil(6000 / SEQ) and small.total_sequences == 3 * S
    assert small.total_steps == math.ceil(3 * S / BATCH) == len(_all_batches(small))
    epochs, rows = _row_ids(small)
    inputs = _rows(_all_batches(small))
    per_epoch = [inputs[np.flatnonzero(epochs == e)] for e in range(3)]
    as_set = [sorted(r.tobytes() for r in p) for p in per_epoch]
    assert len(per_epoch[0]) == S and as_set[0] == as_set[1] == as_set[2]  # same multiset ...
    assert len(set(as_set[0])) == S  # (rows are distinct, so "same multiset" is a real claim)
    assert not np.array_equal(per_epoch[0], per_epoch[1]) and not np.array_equal(per_epoch[1], per_epoch[2])
    # ... the same order for the same seed, another for another seed
    same = build_data(_cfg(spec, cache_dir, unique_tokens=6000, epochs=3.0), seq_len=SEQ, batch_size=BATCH)
    np.testing.assert_array_equal(_rows(_all_batches(same)), inputs)
    other = build_data(_cfg(spec, cache_dir, unique_tokens=6000, epochs=3.0, seed=1), seq_len=SEQ,
                       batch_size=BATCH)
    assert not np.array_equal(_rows(_all_batches(other)), inputs)
    seen = (_rows(_all_batches(small), "segment_ids") > 0).sum()
    assert small.stats["total_tokens"] == seen == 3 * 6000


def test_fractional_epochs_take_the_first_rows_of_the_next_epoch(spec, cache_dir, small):
    data = build_data(_cfg(spec, cache_dir, unique_tokens=6000, epochs=2.5), seq_len=SEQ, batch_size=BATCH)
    S = data.sequences_per_epoch
    assert data.total_sequences == math.ceil(2.5 * S) and data.total_steps == math.ceil(data.total_sequences / BATCH)
    epochs, rows = _row_ids(data)
    live = epochs >= 0
    assert live.sum() == data.total_sequences and (~live).sum() == data.total_steps * BATCH - data.total_sequences
    last = rows[epochs == 2]
    assert len(last) == data.total_sequences - 2 * S and len(set(last)) == len(last)
    np.testing.assert_array_equal(rows[: 2 * S], _row_ids(small)[1][: 2 * S])  # same seed: same first epochs
    batches = _all_batches(data)
    assert data.stats["total_tokens"] == (_rows(batches, "segment_ids") > 0).sum()
    assert 2 * 6000 < data.stats["total_tokens"] < 3 * 6000
    pad = ~live
    assert not _rows(batches, "segment_ids")[pad].any() and not _rows(batches, "loss_mask")[pad].any()
    # the logged epoch counts rows read, not the last batch's padding rows
    assert (~live).sum() > 0 and data.epochs_read(data.total_steps) == data.total_sequences / S
    assert data.epochs_read(1) == BATCH / S and data.total_steps / data.steps_per_epoch > data.total_sequences / S


def test_train_batches_resume_bit_identically(small, spec, cache_dir):
    full = _all_batches(small)
    restarted = build_data(_cfg(spec, cache_dir, unique_tokens=6000, epochs=3.0), seq_len=SEQ, batch_size=BATCH)
    for start in (0, 1, small.total_steps // 2, small.total_steps - 1, small.total_steps):
        resumed = list(restarted.train_batches(start))
        assert len(resumed) == small.total_steps - start
        for a, b in zip(full[start:], resumed):
            for k in BATCH_KEYS:
                np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(ConfigError):
        next(small.train_batches(small.total_steps + 1))


@pytest.mark.parametrize("objective", ["causal", "ul2"])
def test_shards_concatenate_to_the_global_batch(spec, cache_dir, objective):
    cfg = _cfg(spec, cache_dir, unique_tokens=3000, epochs=1.5, objective=objective)
    whole = build_data(cfg, seq_len=SEQ, batch_size=BATCH)
    for num_shards in (2, 4):
        shards = [build_data(cfg, seq_len=SEQ, batch_size=BATCH, shard_index=i, num_shards=num_shards)
                  for i in range(num_shards)]
        assert all(s.total_steps == whole.total_steps for s in shards)
        for step in (0, whole.total_steps - 1):
            for k in BATCH_KEYS:
                got = np.concatenate([s.batch(step)[k] for s in shards])
                np.testing.assert_array_equal(got, whole.batch(step)[k])
        for parts in zip(*(s.eval_batches() for s in shards), whole.eval_batches()):
            np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in parts[:-1]]), parts[-1]["inputs"])
    with pytest.raises(ConfigError, match="multiple of num_shards"):
        build_data(cfg, seq_len=SEQ, batch_size=BATCH, shard_index=0, num_shards=3)


# ----------------------------------------------------------------------------- examples


def test_causal_rows_are_consistently_packed(small):
    batches = _all_batches(small)
    b = {k: _rows(batches, k) for k in BATCH_KEYS}
    dtypes = {"inputs": np.int32, "targets": np.int32, "loss_mask": np.float32, "segment_ids": np.int32,
              "positions": np.int32, "bidirectional": np.bool_}
    assert all(b[k].dtype == dtypes[k] and b[k].shape[1] == SEQ for k in BATCH_KEYS)
    inp, tgt, loss, seg, pos = b["inputs"], b["targets"], b["loss_mask"], b["segment_ids"], b["positions"]
    real = seg > 0
    same_next = (seg[:, 1:] == seg[:, :-1]) & real[:, 1:]
    # inside a segment the target is the next input; across a boundary or on padding there is no loss
    np.testing.assert_array_equal(tgt[:, :-1][same_next], inp[:, 1:][same_next])
    assert np.all(loss[:, :-1][real[:, :-1] & ~same_next] == 0) and np.all(loss[~real] == 0)
    assert np.all(loss[:, :-1][same_next] == 1)
    # a new segment inside a row starts exactly at a BOS, positions restart there and count up
    new_segment = real[:, 1:] & (seg[:, 1:] != seg[:, :-1])
    assert np.all(inp[:, 1:][new_segment] == BOS_ID) and np.all(pos[:, 1:][new_segment] == 0)
    np.testing.assert_array_equal(pos[:, 1:][same_next], pos[:, :-1][same_next] + 1)
    assert np.all(pos[:, 0][real[:, 0]] == 0) and np.all(seg[:, 0][real[:, 0]] == 1)
    assert np.all(inp[~real] == PAD_ID) and not b["bidirectional"].any()
    # the last position of a row predicts the first token of the next row (same document going on)
    epochs, rows = _row_ids(small)
    first_of_row = {(e, r): inp[i, 0] for i, (e, r) in enumerate(zip(epochs, rows))}
    for i, (e, r) in enumerate(zip(epochs, rows)):
        if loss[i, -1]:
            assert tgt[i, -1] == first_of_row[(e, r + 1)] != BOS_ID
    assert loss[:, -1].any()
    assert np.all(tgt[loss == 1] != BOS_ID) and np.all(inp[loss == 1] != EOS_ID)


def test_attention_mask_matches_hand_written_example():
    batch = {"segment_ids": np.array([[1, 1, 1, 2, 2, 0]]),
             "bidirectional": np.array([[True, True, False, True, False, False]])}
    expected = np.array([
        [1, 1, 0, 0, 0, 0],  # prefix token 0 sees the whole prefix of segment 1
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],  # token 2 (not in the prefix) sees the prefix and itself
        [0, 0, 0, 1, 0, 0],  # segment 2 starts: nothing of segment 1
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding sees only itself (no empty softmax row)
    ], bool)
    np.testing.assert_array_equal(attention_mask(batch)[0], expected)
    import jax.numpy as jnp

    on_device = attention_mask({k: jnp.asarray(v) for k, v in batch.items()})
    np.testing.assert_array_equal(np.asarray(on_device)[0], expected)


def _assert_no_target_is_visible(batch):
    """No scored position can see the token it predicts, nor anything after it."""
    mask = attention_mask(batch)
    rows, cols = np.nonzero(batch["loss_mask"][:, :-1])
    assert len(rows) > 0
    seg = batch["segment_ids"]
    for r, i in zip(rows, cols):
        if seg[r, i + 1] == seg[r, i]:
            assert not mask[r, i, i + 1:].any(), (r, i)


def test_prefix_lm_rows_have_a_bidirectional_prefix_and_no_loss_on_it(spec, cache_dir, small):
    data = build_data(_cfg(spec, cache_dir, unique_tokens=6000, epochs=3.0, objective="prefix_lm"), seq_len=SEQ,
                      batch_size=BATCH)
    assert data.total_steps == small.total_steps
    some_prefix = 0
    for step in range(data.total_steps):
        p, c = data.batch(step), small.batch(step)
        for k in ("inputs", "targets", "segment_ids", "positions"):
            np.testing.assert_array_equal(p[k], c[k])  # same rows, only masks change
        for row in range(BATCH):
            for s in np.unique(p["segment_ids"][row][p["segment_ids"][row] > 0]):
                where = np.flatnonzero(p["segment_ids"][row] == s)
                bidir = p["bidirectional"][row][where]
                prefix = int(bidir.sum())
                assert np.all(bidir[:prefix]) and not bidir[prefix:].any()  # a prefix of the segment
                if len(where) >= 2:
                    assert 1 <= prefix <= len(where) - 1
                    some_prefix += 1
                expected = c["loss_mask"][row][where] * (np.arange(len(where)) >= prefix - 1)
                np.testing.assert_array_equal(p["loss_mask"][row][where], expected)
        _assert_no_target_is_visible(p)
    assert some_prefix > 0


def _ul2_parts(row):
    """(mode, corrupted input, target part, input length) of one UL2 row."""
    n = int((row["segment_ids"] > 0).sum())
    tokens, input_len = row["inputs"][:n], int(row["bidirectional"].sum())
    return int(tokens[0]), tokens[1:input_len], tokens[input_len:], input_len


def test_ul2_rows_reconstruct_the_raw_text_and_score_only_targets(spec, cache_dir):
    cfg = _cfg(spec, cache_dir, unique_tokens=20000, epochs=2.0, objective="ul2")
    data = build_data(cfg, seq_len=SEQ, batch_size=BATCH)
    raw_len = data.stats["raw_sequence_length"]
    assert raw_len < SEQ and data.sequences_per_epoch == math.ceil(20000 / raw_len)
    # causal rows of length raw_len with the same seed are the raw rows in the same order
    raw = build_data(_cfg(spec, cache_dir, unique_tokens=20000, epochs=2.0), seq_len=raw_len, batch_size=BATCH)
    assert raw.total_steps == data.total_steps
    modes = {"R": 0, "X": 0, "S": 0}
    by_mode = {v: k for k, v in MODE_IDS.items()}
    for step in range(data.total_steps):
        batch, source = data.batch(step), raw.batch(step)
        _assert_no_target_is_visible(batch)
        for b in range(BATCH):
            row = {k: v[b] for k, v in batch.items()}
            original = source["inputs"][b][source["segment_ids"][b] > 0]
            if not len(original):
                assert not row["segment_ids"].any()
                continue
            mode, corrupted, targets, input_len = _ul2_parts(row)
            modes[by_mode[mode]] += 1
            n = len(corrupted) + len(targets) + 1
            assert set(np.unique(row["segment_ids"][:n])) == {1} and not row["segment_ids"][n:].any()
            np.testing.assert_array_equal(row["positions"][:n], np.arange(n))
            np.testing.assert_array_equal(row["targets"][: n - 1], row["inputs"][1:n])
            scored = np.zeros(SEQ)
            scored[input_len - 1: n - 1] = 1  # every target-part token, predicted from the position before
            np.testing.assert_array_equal(row["loss_mask"], scored)
            if by_mode[mode] == "S":
                np.testing.assert_array_equal(np.concatenate([corrupted, targets]), original)
                assert len(targets) >= 1 and len(corrupted) >= 1
                continue
            density = {"R": 0.15, "X": 0.5}[by_mode[mode]]
            sentinel_ids = {sentinel_id(i) for i in range(cfg.num_sentinels)}
            in_sentinels = [t for t in corrupted if t in sentinel_ids]
            assert in_sentinels == [sentinel_id(i) for i in range(len(in_sentinels))] and in_sentinels
            assert targets[-1] == EOS_ID and targets[0] == sentinel_id(0)
            spans, current = {}, None  # sentinel -> the tokens it stands for
            for t in targets[:-1]:
                if t in sentinel_ids:
                    current = spans.setdefault(int(t), [])
                else:
                    current.append(int(t))
            assert list(spans) == in_sentinels and all(spans.values())
            rebuilt = np.concatenate([spans[int(t)] if t in sentinel_ids else [t] for t in corrupted])
            np.testing.assert_array_equal(rebuilt, original)
            noise = sum(len(v) for v in spans.values())
            assert noise == min(max(round(len(original) * density), 1), len(original) - 1)
    total = sum(modes.values())
    assert total == data.total_sequences
    for mode, rate in (("R", 0.4), ("X", 0.4), ("S", 0.2)):
        assert abs(modes[mode] / total - rate) < 4.5 * math.sqrt(rate * (1 - rate) / total), modes


def test_ul2_noise_is_deterministic_per_row_and_differs_between_epochs(spec, cache_dir):
    # R and S only: at seq_len 64 an X row has a single span, which (as in T5) is always the tail
    denoisers = ({"mode": "R", "mean_span": 3.0, "noise_density": 0.15, "rate": 1.0}, {"mode": "S", "rate": 1.0})
    cfg = from_dict(DataConfig, {**to_dict(_cfg(spec, cache_dir, unique_tokens=3000, epochs=2.0, objective="ul2")),
                                 "denoisers": denoisers})
    a, b = build_data(cfg, seq_len=SEQ, batch_size=BATCH), build_data(cfg, seq_len=SEQ, batch_size=BATCH)
    batches = _all_batches(a)
    for x, y in zip(batches, _all_batches(b)):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
    epochs, rows = _row_ids(a)
    inputs, bidirectional = _rows(batches), _rows(batches, "bidirectional")  # S rows differ in the split only
    by_row = {}
    for i, (e, r) in enumerate(zip(epochs, rows)):
        if r >= 0:  # not a padding row
            by_row.setdefault(r, {})[e] = inputs[i].tobytes() + bidirectional[i].tobytes()
    assert len(by_row) == a.sequences_per_epoch and all(len(v) == 2 for v in by_row.values())
    differing = sum(v[0] != v[1] for v in by_row.values())
    assert differing >= 0.9 * len(by_row)  # fresh noise (and denoiser) each epoch


# ----------------------------------------------------------------------------- errors


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value) and isinstance(excinfo.value, JaxaccelError)
    return str(excinfo.value)


def test_bad_config_values_raise_one_line_config_errors():
    with pytest.raises(ConfigError) as e:
        from_dict(DataConfig, {"objective": "mlm"})
    assert "data.objective" in _one_line(e) and "mlm" in str(e.value)
    cases = [({"epochs": 0}, "data.epochs"), ({"validation_fraction": 1.0}, "data.validation_fraction"),
             ({"validation_fraction": 0.00001}, "rounds to no held-out documents"),
             ({"unique_tokens": 0}, "data.unique_tokens"), ({"vocab_size": 300}, "data.vocab_size"),
             ({"denoisers": [{"mode": "Q"}]}, "mode"), ({"objective": "ul2", "denoisers": []}, "data.denoisers"),
             ({"denoisers": [{"mode": "R", "noise_density": 1.5}]}, "noise_density"), ({"vocab": 3}, "vocab")]
    for data, key in cases:
        with pytest.raises(ConfigError) as e:
            from_dict(DataConfig, data)
        assert key in _one_line(e), data
    parsed = from_dict(DataConfig, {"objective": "ul2", "denoisers": [{"mode": "X", "mean_span": 8, "rate": 2}]})
    assert parsed.denoisers[0].mode == "X" and parsed.denoisers[0].mean_span == 8.0


def test_a_budget_of_one_token_is_refused():
    # one token predicts nothing: the run logged a loss of 0.0 at every step
    with pytest.raises(ConfigError, match=r"data.unique_tokens must be >= 2 .*, got 1"):
        budget(DataConfig(corpus="stdlib", unique_tokens=1), 1, seq_len=SEQ, batch_size=BATCH)


def test_unique_tokens_beyond_the_corpus_names_the_corpus_size(spec, cache_dir, small):
    size = small.stats["corpus_tokens"]
    with pytest.raises(ConfigError) as e:
        build_data(_cfg(spec, cache_dir, unique_tokens=size + 1), seq_len=SEQ, batch_size=BATCH)
    assert f"{size} tokens" in _one_line(e) and "data.unique_tokens" in str(e.value)


def test_the_whole_split_is_every_training_document_once(spec, cache_dir, small, sp):
    size = small.stats["corpus_tokens"]
    for unique in (size, None):
        whole = build_data(_cfg(spec, cache_dir, unique_tokens=unique), seq_len=SEQ, batch_size=BATCH)
        assert whole.stats["unique_tokens"] == size
        assert whole.stats["unique_documents"] == small.stats["train_documents"]
        docs = sorted(d.tobytes() for d in _segments(_first_epoch_stream(whole)))
        assert docs == sorted(d.tobytes() for d in _doc_tokens(small, sp, "train").values())


def test_bad_corpora_raise_one_line_data_errors(tmp_path, cache_dir):
    missing = str(tmp_path / "nothing" / "*.txt")
    with pytest.raises(DataError) as e:
        open_corpus(missing)
    assert repr(missing) in _one_line(e)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError) as e:
        open_corpus(str(tmp_path / "empty.txt"))
    assert "empty" in _one_line(e)
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n\n{"text": ""}\n')
    with pytest.raises(DataError) as e:
        build_data(DataConfig(corpus=str(tmp_path / "blank.jsonl"), cache_dir=cache_dir, **SMALL), seq_len=SEQ,
                   batch_size=BATCH)
    assert "empty" in _one_line(e)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": "cut\n')
    with pytest.raises(DataError) as e:
        list(open_corpus(str(tmp_path / "bad.jsonl")).documents())
    assert f"{tmp_path / 'bad.jsonl'}:3" in _one_line(e)
    (tmp_path / "field.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(DataError) as e:
        list(open_corpus(str(tmp_path / "field.jsonl")).documents())
    assert f"{tmp_path / 'field.jsonl'}:2" in _one_line(e) and "'text'" in str(e.value)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError) as e:
        list(open_corpus(str(tmp_path / "latin1.txt")).documents())
    assert "UTF-8" in _one_line(e)
    with pytest.raises(DataError) as e:
        open_corpus(str(tmp_path))
    assert "directory" in _one_line(e)
    (tmp_path / "tiny.txt").write_text("a tiny corpus\n")
    with pytest.raises(ConfigError) as e:  # SentencePiece cannot make 8192 pieces from 14 characters
        build_data(DataConfig(corpus=str(tmp_path / "tiny.txt"), cache_dir=cache_dir, validation_fraction=0.0),
                   seq_len=SEQ, batch_size=BATCH)
    assert "data.vocab_size=8192" in _one_line(e)
    with pytest.raises(DataError) as e:
        open_corpus("tfds:no_such_dataset_xyz")
    assert "no_such_dataset_xyz" in _one_line(e)


def test_jsonl_documents_and_their_ids(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "alpha"}\n\n{"text": "beta", "meta": 1}\n')
    (tmp_path / "b.txt").write_text("gamma\n")
    corpus = open_corpus(f"{tmp_path / '*.jsonl'}, {tmp_path / 'b.txt'}")
    assert [(d.id, d.text) for d in corpus.documents()] == [("a.jsonl:1", "alpha"), ("a.jsonl:3", "beta"),
                                                             ("b.txt", "gamma\n")]
    assert is_validation("a.jsonl:1", 10_000) and not is_validation("a.jsonl:1", 0)


# ----------------------------------------------------------------------------- TensorFlow isolation


def test_import_and_warm_cache_never_import_tensorflow(small):
    code = textwrap.dedent(f"""
        import json, sys
        import jaxaccel, jaxaccel.data
        assert "tensorflow" not in sys.modules and "seqio" not in sys.modules, "import pulled in TF"
        from jaxaccel.config import from_dict, to_dict
        cfg = from_dict(jaxaccel.data.DataConfig, json.loads(sys.argv[1]))
        data = jaxaccel.data.build_data(cfg, seq_len={SEQ}, batch_size={BATCH})
        next(data.train_batches())
        assert "tensorflow" not in sys.modules, "a warm cache imported TF"
        print(data.stats["unique_stream_sha256"])
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(to_dict(small.cfg))], capture_output=True,
                         text=True, env=env, timeout=900)  # a hang guard only, not a speed claim
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == small.stats["unique_stream_sha256"]


# ----------------------------------------------------------------------------- the real default corpus


@pytest.mark.slow
def test_default_stdlib_corpus_and_vocab(tmp_path, monkeypatch):
    from jaxaccel.data import tasks as tasks_module

    corpus = open_corpus("stdlib")
    paths = [e["path"] for e in corpus.manifest["files"]]
    assert paths == sorted(paths) and all(p.endswith(".py") for p in paths)
    assert "os.py" in paths and "json/decoder.py" in paths and "idlelib/editor.py" in paths
    excluded = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    assert not any(excluded & set(p.split("/")[:-1]) for p in paths)
    cfg = DataConfig(cache_dir=str(tmp_path))
    trains = vocab_module.TRAINS
    data = build_data(cfg, seq_len=512, batch_size=8)
    assert data.vocab_size == 8192 and vocab_module.TRAINS == trains + 1
    # the cost is paid once (checked by counts, not by wall-clock limits, which flake on a busy machine):
    # a second build is all cache hits, with no vocabulary training and no seqio/TensorFlow tokenization
    def no_seqio():
        raise AssertionError("a warm cache ran the seqio Task again")

    monkeypatch.setattr(tasks_module, "import_seqio", no_seqio)
    again = build_data(cfg, seq_len=512, batch_size=8)
    assert vocab_module.TRAINS == trains + 1
    assert again.stats["unique_stream_sha256"] == data.stats["unique_stream_sha256"]
    assert data.stats["manifest_sha256"] == corpus.sha256
    assert data.stats["unique_tokens"] == data.stats["corpus_tokens"] > 1_000_000
    assert data.stats["validation_documents"] > 0 and data.stats["eval_tokens"] == 65536
    batch = next(data.train_batches())
    assert batch["inputs"].shape == (8, 512) and batch["loss_mask"].sum() > 0


def test_without_the_train_extra_tokenizing_says_what_to_install(monkeypatch):
    """seqio (and TensorFlow) are the `train` extra: decoding never needs them, and without
    them a corpus run is one line naming the extra, not a ModuleNotFoundError traceback."""
    import sys

    from jaxaccel.data import tf_import
    from jaxaccel.data.errors import DataError

    for missing in ("tensorflow", "seqio"):
        tf_import.import_tensorflow.cache_clear()
        tf_import.import_seqio.cache_clear()
        with monkeypatch.context() as m:
            m.setitem(sys.modules, missing, None)  # an import of it raises ImportError
            with pytest.raises(DataError, match=r"needs .*seqio, which the train extra installs: "
                                                r"pip install 'jaxaccel\[train\]'"):
                tf_import.import_seqio()
    tf_import.import_tensorflow.cache_clear()
    tf_import.import_seqio.cache_clear()


def test_the_data_cache_follows_xdg_cache_home(monkeypatch, tmp_path):
    """Beside the compilation cache: $XDG_CACHE_HOME isolated every cache but this one."""
    from jaxaccel.data.cache import cache_root

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root(None) == tmp_path / "xdg" / "jaxaccel" / "data"
    assert cache_root(str(tmp_path / "mine")) == tmp_path / "mine"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root(None) == tmp_path / "home" / ".cache" / "jaxaccel" / "data"


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux /proc")
def test_a_read_error_names_the_corpus_file():
    """An OSError from read() has no file name: with a glob over many files the one line did
    not say which one failed."""
    from jaxaccel.data.corpus import _sha256_file
    from jaxaccel.data.errors import DataError

    with pytest.raises(DataError, match=r"^/proc/self/mem: input/output error$"):
        _sha256_file(Path("/proc/self/mem"))
