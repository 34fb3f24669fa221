"""`build_data`: corpus -> vocabulary -> tokens -> repetition budget -> batches.

Repetition budget ("To Repeat or Not To Repeat"): the training documents are shuffled with
`seed`, concatenated (each `<s> text </s>`), and the first `unique_tokens` tokens form the
unique stream U (the last document is cut where the budget ends). U is split into
S = ceil(|U| / R) rows of R tokens (R = seq_len, or the UL2 raw length); these S rows are
one epoch. The run reads ceil(epochs * S) rows (at least one): epoch e is all S rows in the
order of a permutation drawn from (seed, e), so every epoch holds the same multiset of rows
in a different order, and a fractional last epoch takes the first rows of its permutation.
Batches run straight across epoch boundaries (no padding or dropping at an epoch's end);
only the very last global batch is padded with empty rows.

Global batch k is rows [k*B, (k+1)*B) of that stream; shard i of n gets its slice
[k*B + i*B/n, k*B + (i+1)*B/n), so the shards' rows concatenated in shard order are the
global batch (the layout `jax.make_array_from_process_local_data` expects when batch rows
are sharded over processes in order). A batch is a pure function of (config, step), which
is what makes `train_batches(start_step)` resume bit-identically.

Evaluation is always causal LM on the validation split (so runs with different objectives
are comparable): validation documents in a fixed order (by their id hash, independent of
the seed), capped at `max_eval_tokens`, rows of seq_len.

Cache: the unique stream is materialized once per (vocabulary, unique_tokens, seed) in
`<vocab folder>/stream-<key[:16]>/tokens.npy` and memory-mapped; rows of any sequence
length are slices of it, so one cache serves every seq_len and objective. It is written a
piece of whole documents at a time (`_document_chunks`), so a pod-scale stream (2^35 tokens:
128 GiB) is never whole in host memory.
"""
from __future__ import annotations

import functools
import hashlib
import math
from pathlib import Path
from typing import Iterator

import numpy as np

from jaxaccel.data import cache
from jaxaccel.data.config import DataConfig
from jaxaccel.data.corpus import open_corpus
from jaxaccel.data.ids import BOS_ID, EOS_ID, PAD_ID
from jaxaccel.data.objectives import (apply_prefix_lm, causal_rows, empty_rows, row_rng, ul2_raw_length,
                                      ul2_row)
from jaxaccel.data.tasks import tokenize_corpus
from jaxaccel.data.vocab import ensure_vocab, load_vocabulary, vocab_key
from jaxaccel.errors import ConfigError

_DOC_SHUFFLE_TAG = 0xD0C5
_EPOCH_SHUFFLE_TAG = 0xE90C
_STREAM_FORMAT = 1  # bump when the document shuffle or the stream layout changes (part of the cache key)


_CHUNK_TOKENS = 1 << 22  # tokens gathered at a time when the unique stream is written


def _document_chunks(tokens: np.ndarray, offsets: np.ndarray, order: np.ndarray, limit: int | None,
                     chunk_tokens: int = _CHUNK_TOKENS) -> Iterator[np.ndarray]:
    """Documents `order` back to back, cut after `limit` tokens, in pieces of whole documents
    (but the last) of about `chunk_tokens`: a pod-scale stream is never whole in host memory."""
    lengths = (offsets[1:] - offsets[:-1])[order]
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    if limit is not None:
        total = min(total, limit)
    first, done = 0, 0
    while done < total:
        last = int(np.searchsorted(ends, min(done + chunk_tokens, total), side="left")) + 1
        stop = min(int(ends[last - 1]), total)
        lens = lengths[first:last]
        starts = offsets[:-1][order[first:last]]
        # stream position done + q of document j (which fills [ends_j - lens_j, ends_j)) is its
        # token starts_j + done + q - (ends_j - lens_j)
        index = np.repeat(starts - (ends[first:last] - lens - done), lens) + np.arange(int(lens.sum()))
        yield np.asarray(tokens[index[:stop - done]], np.int32)
        first, done = last, stop


def _gather_documents(tokens: np.ndarray, offsets: np.ndarray, order: np.ndarray, limit: int | None) -> np.ndarray:
    """Documents `order` back to back, cut after `limit` tokens, as one array."""
    return np.concatenate([np.zeros(0, np.int32), *_document_chunks(tokens, offsets, order, limit)])


def _unique_stream(tokenized, cfg: DataConfig) -> tuple[np.ndarray, dict]:
    offsets = tokenized.offsets("train")
    corpus_tokens = int(offsets[-1])
    unique = corpus_tokens if cfg.unique_tokens is None else cfg.unique_tokens
    if unique > corpus_tokens:
        raise ConfigError(
            f"data.unique_tokens={unique} is larger than the training split of corpus {cfg.corpus!r}:"
            f" {corpus_tokens} tokens in {len(offsets) - 1} documents"
        )
    key = cache.content_key("stream", _STREAM_FORMAT, unique, cfg.seed)
    directory = tokenized.directory.parent / f"stream-{key[:16]}"
    info = cache.read_json(directory / "info.json", dict)
    # The token arrays it was cut from are those of this vocabulary: `tokenize_corpus` rebuilds
    # them when the vocabulary changes (a damaged one retrained), and a stream of the old ids
    # of the same length is no good then. A record from before the hash was kept: taken.
    vocab_sha256 = tokenized.info.get("vocab_sha256")
    if info is not None:
        stream = cache.intact_array(directory / "tokens.npy", unique)
        if (stream is not None and info.get("unique_tokens") == unique and isinstance(info.get("documents"), int)
                and isinstance(info.get("sha256"), str) and info.get("vocab_sha256", vocab_sha256) == vocab_sha256):
            return stream, info
        stale = stream is not None and info.get("vocab_sha256", vocab_sha256) != vocab_sha256
        cache.rebuilding(directory, "was cut from the tokens of another vocabulary" if stale else None)
    order = np.random.default_rng([_DOC_SHUFFLE_TAG, cfg.seed]).permutation(len(offsets) - 1)
    documents = 0

    def counted(chunks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        nonlocal documents
        for chunk in chunks:
            documents += int((chunk == BOS_ID).sum())
            yield chunk

    written, sha256 = cache.save_array_stream(
        directory / "tokens.npy", counted(_document_chunks(tokenized.tokens("train"), offsets, order, unique)),
        np.int32)
    assert written == unique, (written, unique)
    info = {"unique_tokens": unique, "seed": cfg.seed, "documents": documents, "corpus_tokens": corpus_tokens,
            "sha256": sha256, "vocab_sha256": vocab_sha256}
    cache.write_json(directory / "info.json", info)
    return cache.load_array(directory / "tokens.npy"), info


def _eval_stream(tokenized, cfg: DataConfig) -> np.ndarray:
    ids = tokenized.doc_ids("validation")
    if not ids or cfg.max_eval_tokens == 0:
        return np.zeros(0, np.int32)
    order = np.argsort([hashlib.sha256(i.encode()).hexdigest() for i in ids], kind="stable")
    return _gather_documents(tokenized.tokens("validation"), tokenized.offsets("validation"), order,
                             cfg.max_eval_tokens)


def _vocab_dir(corpus, cfg: DataConfig) -> tuple[Path, Path]:
    corpus_dir = cache.cache_root(cfg.cache_dir) / corpus.key
    key = vocab_key(corpus.sha256, cfg.validation_buckets, cfg.vocab_size, cfg.num_sentinels, cfg.vocab_max_chars)
    return corpus_dir, corpus_dir / f"vocab-{key[:16]}"


def _tokenized(cfg: DataConfig):
    """(corpus, its cache folder, vocabulary, token arrays), building what is missing."""
    corpus = open_corpus(cfg.corpus, cfg.text_field)
    corpus_dir, vocab_dir = _vocab_dir(corpus, cfg)
    corpus.write_manifest(corpus_dir)
    vocab = ensure_vocab(corpus, vocab_dir, validation_buckets=cfg.validation_buckets, vocab_size=cfg.vocab_size,
                         num_sentinels=cfg.num_sentinels, vocab_max_chars=cfg.vocab_max_chars)
    return corpus, corpus_dir, vocab, tokenize_corpus(corpus, vocab.path, cfg.validation_buckets)


def corpus_token_count(cfg: DataConfig, *, build: bool = True) -> int | None:
    """Tokens in the training split of `cfg`'s corpus under its vocabulary: the most
    `data.unique_tokens` can be. build=False: only from the cache (None when the corpus has
    not been tokenized with this vocabulary yet), so nothing is trained or tokenized; a TFDS
    corpus is not even opened then (its manifest hashes every file of the split)."""
    if build:
        return _tokenized(cfg)[3].num_tokens("train")
    if cfg.corpus.strip().startswith("tfds:"):
        return None
    corpus = open_corpus(cfg.corpus, cfg.text_field)
    info = cache.read_json(_vocab_dir(corpus, cfg)[1] / "tokens" / "info.json", dict)
    try:
        return None if info is None else int(info["splits"]["train"]["tokens"])
    except (KeyError, TypeError, ValueError):  # a damaged record counts as none, as everywhere in the cache
        return None


def _check_holdout(cfg: DataConfig, tokenized) -> None:
    if cfg.validation_buckets > 0 and tokenized.num_documents("validation") == 0:
        raise ConfigError(
            f"data.validation_fraction={cfg.validation_fraction} holds out none of the"
            f" {tokenized.num_documents('train')} documents of {cfg.corpus!r}; raise it, or set it to 0 for no eval"
        )


def check_vocab_fits(data_vocab_size: int, model_vocab_size: int) -> None:
    """The model must have an embedding row for every token id of the data's vocabulary."""
    if data_vocab_size > model_vocab_size:
        raise ConfigError(f"the vocabulary has {data_vocab_size} tokens but model.vocab_size is "
                          f"{model_vocab_size}; set model.vocab_size >= {data_vocab_size}")


def corpus_facts(cfg: DataConfig) -> tuple[int, int]:
    """(tokens of the training split, vocabulary size) of `cfg`'s corpus, built when missing,
    with `build_data`'s check of its validation split: for a sweep's plan to fail before any
    run trains."""
    _, _, vocab, tokenized = _tokenized(cfg)
    _check_holdout(cfg, tokenized)
    return tokenized.num_tokens("train"), vocab.vocab_size


def check_retrieval_fits(cfg: DataConfig, seq_len: int, *, build: bool = True) -> None:
    """What `build_data` checks of `data.retrieval` against `seq_len`, for a sweep's plan to
    fail before any run trains: min_length, and (with the corpus's vocabulary, built when
    `build`; a dry run writes nothing, so checks min_length alone) that every task has an
    example fitting a row."""
    if not cfg.retrieval.enabled:
        return
    from jaxaccel.data.longctx import RetrievalTasks, check_tasks_fit

    r = cfg.retrieval
    if r.min_length > seq_len:
        check_tasks_fit(None, (), r.min_length, seq_len)
    if not build:
        return
    vocab = _tokenized(cfg)[2]
    # (the lengths need no code: a one-token stream stands in for it)
    check_tasks_fit(RetrievalTasks.from_sentencepiece(vocab.path, np.full(1, 10, np.int32)), r.tasks, r.min_length,
                    seq_len)


def budget(cfg: DataConfig, unique_tokens: int, *, seq_len: int, batch_size: int) -> dict[str, int | float]:
    """The schedule of a repetition budget over a unique stream of `unique_tokens` tokens: raw
    row length R, rows per epoch S = ceil(U / R), rows read ceil(epochs * S) (at least one),
    global batches. Checks what `build_data` checks of seq_len, so a sweep's plan fails first."""
    if seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2, got {seq_len}")
    if unique_tokens < 2:  # one token predicts nothing: every step would log a loss of 0.0
        raise ConfigError(f"data.unique_tokens must be >= 2 (a token and the next one to predict), got {unique_tokens}")
    raw_len = ul2_raw_length(seq_len, cfg.denoisers, cfg.num_sentinels) if cfg.objective == "ul2" else seq_len
    per_epoch = -(-unique_tokens // raw_len)
    # round() first so that e.g. epochs=0.1 of 30 rows is 3 rows, not ceil(3.0000000000000004) = 4;
    # epochs > 0 always reads a row (a tiny fraction must not round to an empty run)
    total = max(1, math.ceil(round(cfg.epochs * per_epoch, 6)))
    return {"raw_sequence_length": raw_len, "sequences_per_epoch": per_epoch, "total_sequences": total,
            "steps_per_epoch": per_epoch / batch_size, "total_steps": -(-total // batch_size)}


def epoch_permutation(seed: int, epoch: int, sequences_per_epoch: int) -> np.ndarray:
    """The order of epoch `epoch`'s rows (row r = stream tokens [r*R, (r+1)*R))."""
    return np.random.default_rng([_EPOCH_SHUFFLE_TAG, seed, epoch]).permutation(sequences_per_epoch)


def tokens_read(cfg: DataConfig, unique_tokens: int, *, seq_len: int, batch_size: int,
                steps: int | None = None) -> tuple[int, int]:
    """(stream tokens read, distinct stream tokens read) by the first `steps` global batches of
    `batch_size` corpus rows (all of the budget's batches by default), repeats counted in the
    first. Every row holds R stream tokens but the stream's last row, which holds the rest;
    so a run stopped early (train.steps below the budget) is counted exactly, not as its budget."""
    plan = budget(cfg, unique_tokens, seq_len=seq_len, batch_size=batch_size)
    raw_len, per_epoch = plan["raw_sequence_length"], plan["sequences_per_epoch"]
    rows = plan["total_sequences"] if steps is None else min(max(steps, 0) * batch_size, plan["total_sequences"])
    full, rest = divmod(rows, per_epoch)
    short = raw_len * per_epoch - unique_tokens  # tokens missing from the last row
    partial = rest * raw_len
    if rest and per_epoch - 1 in epoch_permutation(cfg.seed, full, per_epoch)[:rest]:
        partial -= short
    return full * unique_tokens + partial, unique_tokens if full else partial


def build_data(cfg: DataConfig, *, seq_len: int, batch_size: int, shard_index: int = 0,
               num_shards: int = 1) -> "TrainData":
    """Everything a training run reads. Builds (or finds in the cache) the manifest, the
    vocabulary, the token arrays and the unique stream; TensorFlow is imported only if a
    cache entry is missing. With `cfg.retrieval` on, a `longctx.RetrievalMixture` (the same
    interface) whose corpus part is this pipeline's batches at the smaller batch size."""
    if seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2, got {seq_len}")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ConfigError(f"shard_index must be in [0, num_shards={num_shards}), got {shard_index}")
    if batch_size < 1 or batch_size % num_shards:
        raise ConfigError(f"batch_size ({batch_size}) must be a positive multiple of num_shards ({num_shards})")
    corpus, corpus_dir, vocab, tokenized = _tokenized(cfg)
    _check_holdout(cfg, tokenized)
    stream, stream_info = _unique_stream(tokenized, cfg)
    task_rows = 0
    if cfg.retrieval.enabled:  # synthetic retrieval rows take part of every batch (jaxaccel.data.longctx)
        from jaxaccel.data.longctx import task_rows_per_batch

        task_rows = task_rows_per_batch(cfg.retrieval, batch_size, num_shards)
    stats = {
        "corpus": cfg.corpus,
        "manifest_sha256": corpus.sha256,
        "manifest_path": str(corpus_dir / "manifest.json"),
        "corpus_files": corpus.manifest["num_files"],
        "corpus_bytes": corpus.manifest["total_bytes"],
        "train_documents": tokenized.num_documents("train"),
        "validation_documents": tokenized.num_documents("validation"),
        "corpus_tokens": tokenized.num_tokens("train"),
        "unique_documents": stream_info["documents"],
        "unique_stream_sha256": stream_info["sha256"],
        "seqio_task": tokenized.task_name,
        "vocab_path": str(vocab.path),
        "vocab_size": vocab.vocab_size,
        "vocab_train_seconds": vocab.seconds,
    }
    data = TrainData(cfg, seq_len=seq_len, batch_size=batch_size - task_rows, shard_index=shard_index,
                     num_shards=num_shards, vocab_path=vocab.path, vocab_size=vocab.vocab_size, stream=stream,
                     eval_stream=_eval_stream(tokenized, cfg), stats=stats)
    if not task_rows:
        return data
    from jaxaccel.data.longctx import RetrievalMixture, RetrievalTasks

    # The code of code_needle / span_recall rows is corpus text: under a budget it comes from the
    # unique stream, so no corpus token beyond data.unique_tokens is trained on; without one,
    # from the whole training split (the same tokens, in manifest order).
    code = stream if cfg.unique_tokens is not None else tokenized.tokens("train")
    tasks = RetrievalTasks.from_sentencepiece(vocab.path, code)
    return RetrievalMixture(data, tasks, cfg.retrieval, seq_len=seq_len, task_rows=task_rows, seed=cfg.seed,
                            shard_index=shard_index, num_shards=num_shards)


class TrainData:
    """The batches of one run, for one shard (host). See the module docstring.

    vocab_path       the SentencePiece .model (copy it into checkpoints)
    vocab_size       its piece count (the model's vocab_size must be >= this)
    pad_id, eos_id, bos_id
    stats            what the run reads: corpus, manifest sha256, token counts, budget
    sequences_per_epoch  rows in one epoch (S)
    steps_per_epoch  S / batch_size global batches (a float: batches cross epoch boundaries)
    total_steps      ceil(ceil(epochs * S) / batch_size) = number of global batches
    eval_steps       number of eval batches
    """

    pad_id = PAD_ID
    eos_id = EOS_ID
    bos_id = BOS_ID

    def __init__(self, cfg: DataConfig, *, seq_len: int, batch_size: int, shard_index: int, num_shards: int,
                 vocab_path: Path, vocab_size: int, stream: np.ndarray, eval_stream: np.ndarray, stats: dict):
        self.cfg = cfg
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.shard_index = shard_index
        self.num_shards = num_shards
        self.rows_per_shard = batch_size // num_shards
        self.vocab_path = Path(vocab_path)
        self.vocab_size = vocab_size
        self._stream = stream
        self._eval_stream = eval_stream
        unique = len(stream)
        plan = budget(cfg, unique, seq_len=seq_len, batch_size=batch_size)
        self.raw_len = plan["raw_sequence_length"]
        self.sequences_per_epoch = plan["sequences_per_epoch"]
        self.total_sequences = plan["total_sequences"]
        self.steps_per_epoch = plan["steps_per_epoch"]
        self.total_steps = plan["total_steps"]
        self.eval_sequences = -(-len(eval_stream) // seq_len)
        self.eval_steps = -(-self.eval_sequences // batch_size)
        self.stats = dict(stats)
        self.stats.update({
            "objective": cfg.objective,
            "seed": cfg.seed,
            "unique_tokens": unique,
            "epochs": cfg.epochs,
            "total_tokens": self._total_tokens(),
            "sequence_length": seq_len,
            "raw_sequence_length": self.raw_len,
            "sequences_per_epoch": self.sequences_per_epoch,
            "total_sequences": self.total_sequences,
            "batch_size": batch_size,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "eval_tokens": len(eval_stream),
            "eval_sequences": self.eval_sequences,
            "eval_steps": self.eval_steps,
        })

    # ------------------------------------------------------------------ schedule

    @functools.lru_cache(maxsize=4)
    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """The order of the epoch's rows (row r = stream tokens [r*R, (r+1)*R))."""
        return epoch_permutation(self.cfg.seed, epoch, self.sequences_per_epoch)

    def _total_tokens(self) -> int:
        """Stream tokens in the run's ceil(epochs * S) rows (repeats counted)."""
        return tokens_read(self.cfg, len(self._stream), seq_len=self.seq_len, batch_size=self.batch_size)[0]

    def epochs_read(self, steps: int) -> float:
        """Epochs of the stream read by the first `steps` global batches: the last batch's padding
        rows (past the budget's ceil(epochs * S) rows) are not rows read."""
        return min(steps * self.batch_size, self.total_sequences) / self.sequences_per_epoch

    def sequence_ids(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(epoch, row) of each of this shard's rows at global step `step`; -1 for padding rows."""
        first = step * self.batch_size + self.shard_index * self.rows_per_shard
        index = first + np.arange(self.rows_per_shard)
        live = index < self.total_sequences
        epochs = np.where(live, index // self.sequences_per_epoch, -1)
        rows = np.full(self.rows_per_shard, -1, np.int64)
        for epoch in np.unique(epochs[live]):
            sel = epochs == epoch
            rows[sel] = self.epoch_permutation(int(epoch))[index[sel] % self.sequences_per_epoch]
        return epochs, rows

    # ------------------------------------------------------------------ batches

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This shard's rows of global batch `step`."""
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} is outside [0, {self.total_steps})")
        epochs, rows = self.sequence_ids(step)
        out = empty_rows(self.rows_per_shard, self.seq_len)
        live = np.flatnonzero(rows >= 0)
        if not len(live):
            return out
        if self.cfg.objective == "ul2":
            for b in live:
                start = rows[b] * self.raw_len
                example = ul2_row(self._stream[start:start + self.raw_len], self.seq_len, self.cfg.denoisers,
                                  row_rng(self.cfg.seed, int(epochs[b]), int(rows[b])), self.cfg.num_sentinels)
                for k, v in example.items():
                    out[k][b] = v
            return out
        made = causal_rows(self._stream, rows[live] * self.raw_len, self.raw_len, self.seq_len)
        if self.cfg.objective == "prefix_lm":
            apply_prefix_lm(made, [row_rng(self.cfg.seed, int(epochs[b]), int(rows[b])) for b in live])
        for k, v in made.items():
            out[k][live] = v
        return out

    def train_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Batches `start_step`, ..., total_steps - 1: exactly what an uninterrupted run gets."""
        if not 0 <= start_step <= self.total_steps:
            raise ConfigError(f"start_step must be in [0, {self.total_steps}], got {start_step}")
        for step in range(start_step, self.total_steps):
            yield self.batch(step)

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """The validation batches (causal LM): finite, and identical on every call."""
        T = self.seq_len
        for step in range(self.eval_steps):
            first = step * self.batch_size + self.shard_index * self.rows_per_shard
            index = first + np.arange(self.rows_per_shard)
            live = index < self.eval_sequences
            out = empty_rows(self.rows_per_shard, T)
            if live.any():
                made = causal_rows(self._eval_stream, index[live] * T, T, T)
                for k, v in made.items():
                    out[k][live] = v
            yield out

    def vocabulary(self):
        """The vocabulary as a `seqio.SentencePieceVocabulary` (imports TensorFlow)."""
        return load_vocabulary(self.vocab_path)

    def __repr__(self) -> str:
        s = self.stats
        return (f"TrainData({s['corpus']!r}, objective={s['objective']}, unique_tokens={s['unique_tokens']},"
                f" epochs={s['epochs']}, total_tokens={s['total_tokens']}, steps={self.total_steps},"
                f" shard={self.shard_index}/{self.num_shards})")
