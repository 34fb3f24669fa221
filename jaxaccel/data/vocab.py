"""The project's SentencePiece vocabulary: trained on the training split, cached, reused.

Token ids (fixed, whatever the corpus or vocabulary size; defined in `jaxaccel.data.ids` and
re-exported here):

    0 <pad>   padding (seqio's PAD_ID)        4 [R]  UL2 regular span corruption mode
    1 </s>    end of document (EOS)           5 [X]  UL2 extreme span corruption mode
    2 <unk>   unknown (unused: byte fallback) 6 [S]  UL2 sequential (prefix LM) mode
    3 <s>     start of document (BOS)         7 ... 7 + num_sentinels - 1: <extra_id_0>, <extra_id_1>, ...

then the 256 byte-fallback pieces <0x00>..<0xFF>, then the learned BPE merges. Pad/eos/unk
follow seqio's convention (0/1/2) so `seqio.SentencePieceVocabulary` accepts the model as
is; BOS is a real id (3) because every packed document starts with it, so the first token
of a document is predicted too and decoding can prepend it (Llama-style). The mode and
sentinel tokens are SentencePiece *control* symbols, not user-defined ones: a user-defined
symbol is also matched inside raw text, so Python source containing `x[R]` would have been
tokenized as the [R] mode token; control symbols only ever come from their id (they decode
to the empty string).

Training (BPE, byte_fallback) keeps text exact: identity normalisation, no whitespace
collapsing, whitespace-only pieces allowed (indentation), no dummy prefix, digits split —
`decode(encode(text)) == text`, except for U+2581 ("▁"), which SentencePiece uses as its
space marker and decodes back as a space. Training "sentences" are runs of whole lines of up to
`CHUNK_CHARS` characters, newline included, so merges such as `):\n` are learned. When the
training split exceeds `vocab_max_chars`, a fixed hash rule on (document id, chunk index)
keeps about that many characters: no seed, so every run and host picks the same chunks.
The trainer runs with a fixed thread count (the count is recorded in the model file), so
the same corpus and settings give a byte-identical model on any machine.

Cache: `<corpus folder>/vocab-<key[:16]>/spm.model` (+ `vocab.json`: settings, piece count,
training seconds, model sha256). The key covers the manifest hash, the validation split,
and every training setting; a second call finds the model and does not retrain.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import time
from pathlib import Path
from typing import Iterator

from jaxaccel.data import cache
from jaxaccel.data.corpus import split_of
from jaxaccel.data.errors import DataError
from jaxaccel.data.ids import (BOS_ID, EOS_ID, FIRST_SENTINEL_ID, MODE_IDS, MODE_PIECES, NUM_BYTE_PIECES, PAD_ID,
                               UNK_ID, min_vocab_size, sentinel_id)
from jaxaccel.data.tf_import import import_seqio
from jaxaccel.errors import ConfigError

__all__ = ["BOS_ID", "EOS_ID", "FIRST_SENTINEL_ID", "MODE_IDS", "MODE_PIECES", "NUM_BYTE_PIECES", "PAD_ID", "UNK_ID",
           "VocabFile", "check_reserved_ids", "control_symbols", "ensure_vocab", "load_vocabulary",
           "min_vocab_size", "sentinel_id", "train_sentencepiece", "training_chunks", "vocab_key"]

CHUNK_CHARS = 2000
TRAINER_THREADS = 2  # fixed: SentencePiece records it in the model, so it is part of the output bytes
VOCAB_FORMAT = 1  # bump when the training recipe changes (it is part of the cache key)

TRAINS = 0  # how many vocabularies this process has trained (tests check the cache with it)


def control_symbols(num_sentinels: int) -> list[str]:
    return [MODE_PIECES[m] for m in ("R", "X", "S")] + [f"<extra_id_{i}>" for i in range(num_sentinels)]


@dataclasses.dataclass(frozen=True)
class VocabFile:
    path: Path
    vocab_size: int  # piece count
    trained: bool  # False when the cached model was reused
    seconds: float  # training time (of the run that trained it)


def vocab_key(corpus_sha256: str, validation_buckets: int, vocab_size: int, num_sentinels: int,
              vocab_max_chars: int) -> str:
    return cache.content_key("vocab", VOCAB_FORMAT, corpus_sha256, validation_buckets, vocab_size, num_sentinels,
                       vocab_max_chars)


def training_chunks(text: str) -> Iterator[str]:
    """Runs of whole lines (newlines kept) of at most CHUNK_CHARS; longer lines are cut."""
    buf: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        while len(line) > CHUNK_CHARS:
            if buf:
                yield "".join(buf)
                buf, size = [], 0
            yield line[:CHUNK_CHARS]
            line = line[CHUNK_CHARS:]
        if size + len(line) > CHUNK_CHARS and buf:
            yield "".join(buf)
            buf, size = [], 0
        buf.append(line)
        size += len(line)
    if buf:
        yield "".join(buf)


def _keep_chunk(doc_id: str, index: int, keep_fraction: float) -> bool:
    if keep_fraction >= 1.0:
        return True
    h = int(hashlib.sha256(f"{doc_id}\0{index}".encode()).hexdigest()[:13], 16)
    return h < keep_fraction * (1 << 52)


def train_sentencepiece(documents, vocab_size: int, num_sentinels: int, keep_fraction: float = 1.0) -> bytes:
    """Train the BPE model on `documents` (an iterable of `Document`) and return its bytes."""
    import sentencepiece as spm

    def sentences():
        for doc in documents:
            for i, chunk in enumerate(training_chunks(doc.text)):
                if chunk.strip() and _keep_chunk(doc.id, i, keep_fraction):
                    yield chunk

    model = io.BytesIO()
    kept = 0

    def counted():
        nonlocal kept
        for chunk in sentences():
            kept += 1
            yield chunk

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=counted(), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=BOS_ID,
            pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", bos_piece="<s>",
            control_symbols=control_symbols(num_sentinels), normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
            add_dummy_prefix=False, character_coverage=0.9995, input_sentence_size=0,
            shuffle_input_sentence=False, max_sentence_length=4 * CHUNK_CHARS + 16, num_threads=TRAINER_THREADS,
            minloglevel=2)
    except RuntimeError as e:
        message = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        if kept == 0:  # only a sample this small keeps nothing: the split has text (_check_training_text)
            raise ConfigError("the vocabulary's training sample is empty: it keeps none of the training split's "
                              "chunks") from None
        required = re.search(r"smaller than required_chars\.\s*(\d+)\s*vs\s*(\d+)", message)
        if required:  # every character kept by character_coverage is a piece of its own, besides the bytes
            raise ConfigError(f"data.vocab_size={vocab_size} is too small for this training split: its characters"
                              f" and the reserved pieces need {required.group(2)}") from None
        limit = re.search(r"<=\s*(\d+)", message)
        if "too high" in message.lower() or limit:
            most = f"at most {limit.group(1)}" if limit else "fewer"
            raise ConfigError(f"data.vocab_size={vocab_size} is too large for this training split: SentencePiece"
                              f" can make {most} pieces from it") from None
        raise ConfigError(f"SentencePiece training failed: {message}") from None
    return model.getvalue()


def _check_training_text(corpus, validation_buckets: int) -> int:
    """The training split's character count; a DataError that says why when it has no text
    SentencePiece can train on (documents with empty text are skipped, whitespace-only chunks
    are not training sentences)."""
    documents = train_documents = train_chars = 0
    has_text = False
    for doc in corpus.documents():
        documents += 1
        if split_of(doc.id, validation_buckets) == "train":
            train_documents += 1
            train_chars += len(doc.text)
            has_text = has_text or not doc.text.isspace()
    if documents == 0:
        raise DataError(f"corpus {corpus.spec!r} has no text: every document is empty")
    if train_documents == 0:
        raise DataError(f"corpus {corpus.spec!r}: the training split is empty (validation takes every document)")
    if not has_text:
        raise DataError(f"corpus {corpus.spec!r}: no text to train a vocabulary on (the training split's"
                        f" {train_documents} document(s) are whitespace only)")
    return train_chars


def ensure_vocab(corpus, directory: Path, *, validation_buckets: int, vocab_size: int, num_sentinels: int,
                 vocab_max_chars: int) -> VocabFile:
    """The cached model for these settings, training it first if it is not there yet, or again
    when the cached file is not the one vocab.json recorded (truncated by a full disk, a
    cut-short copy): a damaged model was taken, tokenized with, fingerprinted into the run's
    checkpoints, and only failed at the export after the whole training run."""
    global TRAINS
    path = directory / "spm.model"
    info = cache.read_json(directory / "vocab.json", dict)
    if info is not None:
        if _intact_vocab(path, info):
            return VocabFile(path, info["pieces"], trained=False, seconds=info["train_seconds"])
        cache.rebuilding(directory)
    train_chars = _check_training_text(corpus, validation_buckets)
    keep_fraction = min(1.0, vocab_max_chars / train_chars)
    start = time.perf_counter()
    try:
        model = train_sentencepiece(corpus.documents("train", validation_buckets), vocab_size, num_sentinels,
                                    keep_fraction)
    except ConfigError as e:
        if keep_fraction >= 1 or "too small" in str(e):  # a larger sample holds more characters: it needs more
            raise
        raise ConfigError(f"{e} (it trains on a sample: data.vocab_max_chars={vocab_max_chars} of the split's "
                          f"{train_chars} characters; a larger data.vocab_max_chars may fix it)") from None
    seconds = time.perf_counter() - start
    TRAINS += 1
    pieces = _piece_count(model)
    cache.write_bytes(path, model)
    cache.write_json(directory / "vocab.json", {
        "corpus_sha256": corpus.sha256, "validation_buckets": validation_buckets, "vocab_size": vocab_size,
        "num_sentinels": num_sentinels, "vocab_max_chars": vocab_max_chars, "train_chars": train_chars,
        "keep_fraction": keep_fraction, "pieces": pieces, "train_seconds": round(seconds, 3),
        "model_sha256": hashlib.sha256(model).hexdigest(), "format": VOCAB_FORMAT,
        "ids": {"pad": PAD_ID, "eos": EOS_ID, "unk": UNK_ID, "bos": BOS_ID, "modes": MODE_IDS,
                "first_sentinel": FIRST_SENTINEL_ID},
    })
    return VocabFile(path, pieces, trained=True, seconds=seconds)


def _intact_vocab(path: Path, info: dict) -> bool:
    """Whether `path` is the model vocab.json describes (by its sha256, which every vocab.json
    has recorded) and the record holds what the build reads."""
    try:
        model = path.read_bytes()
    except OSError:  # missing, or a folder
        return False
    return (isinstance(info.get("pieces"), int) and isinstance(info.get("train_seconds"), (int, float))
            and info.get("model_sha256") == hashlib.sha256(model).hexdigest())


def _piece_count(model: bytes) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=model).get_piece_size()


def check_reserved_ids(path: Path, num_sentinels: int) -> None:
    """Raise if the model's special pieces are not where this module says they are."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    expected = {PAD_ID: "<pad>", EOS_ID: "</s>", UNK_ID: "<unk>", BOS_ID: "<s>"}
    expected.update({MODE_IDS[m]: p for m, p in MODE_PIECES.items()})
    expected.update({sentinel_id(i): f"<extra_id_{i}>" for i in range(num_sentinels)})
    for i, piece in expected.items():
        if sp.id_to_piece(i) != piece:
            raise AssertionError(f"{path}: id {i} is {sp.id_to_piece(i)!r}, expected {piece!r}")


def load_vocabulary(path: str | Path):
    """The model as a `seqio.SentencePieceVocabulary` (imports TensorFlow and seqio)."""
    seqio = import_seqio()
    return seqio.SentencePieceVocabulary(str(path))
