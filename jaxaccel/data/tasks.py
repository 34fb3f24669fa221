"""seqio Tasks over a corpus, and the tokenized arrays materialized from them.

The data package's TensorFlow user (through seqio), and only when a cache is missing: once
the token arrays exist, training reads numpy memory maps and never imports TensorFlow. TF
itself is imported through `jaxaccel.data.tf_import` (quiet logging, no accelerators), and
only inside the functions that run the Task.

Task `jaxaccel_<slug>_<key[:12]>` (one per corpus x vocabulary x validation split; splits
"train" and "validation"): a `FunctionDataSource` yields the split's documents in manifest
order as {"targets": text, "doc_id": id}; the preprocessors are
`seqio.preprocessors.tokenize` (the project's `SentencePieceVocabulary`), BOS prepended,
and `seqio.preprocessors.append_eos`. Packing to a sequence length is *not* a Task step:
seqio's packing (`trim_and_pack`) trims every document to the sequence length and packs
first-fit in stream order, which would silently drop most of a long source file and make
the unique-token count depend on the sequence length. jaxaccel instead concatenates the
tokenized documents and splits the stream into rows in numpy (like T5's
`reduce_concat_tokens` + `split_tokens`, but keeping document boundaries as segment ids);
see `jaxaccel.data.pipeline`.

Materialized per split (in `<vocab folder>/tokens/`): `<split>.tokens.npy` (int32, every
document's `<s> ... </s>` back to back), `<split>.offsets.npy` (int64, document d is
`tokens[offsets[d]:offsets[d+1]]`), `<split>.ids.json` (document ids), and `info.json`
(written last: the folder is complete only when it exists).
"""
from __future__ import annotations

import array
import functools
import hashlib
import json
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from jaxaccel.data import cache
from jaxaccel.data.corpus import SPLITS, Corpus
from jaxaccel.data.errors import DataError
from jaxaccel.data.ids import BOS_ID
from jaxaccel.data.tf_import import autograph_disabled, import_seqio, import_tensorflow, stderr_silenced
from jaxaccel.files import write_atomically

TASK_PREFIX = "jaxaccel_"
_CHUNK_TOKENS = 1 << 22  # tokens held in memory at a time while a split is written


def task_name(corpus: Corpus, vocab_dir: Path) -> str:
    return f"{TASK_PREFIX}{corpus.slug.replace('-', '_')}_{vocab_dir.name.removeprefix('vocab-')[:12]}"


def register_task(corpus: Corpus, vocab_path: Path, validation_buckets: int) -> str:
    """Register (once per process) the seqio Task of this corpus, vocabulary and split."""
    seqio = import_seqio()
    tf = import_tensorflow()
    name = task_name(corpus, vocab_path.parent)
    if name in seqio.TaskRegistry.names():
        registered = seqio.TaskRegistry.get(name).output_features["targets"].vocabulary
        if registered.sentencepiece_model_file == str(vocab_path):
            return name
        seqio.TaskRegistry.remove(name)  # same content in another cache folder: point the Task at ours

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None):
        del shuffle_files, seed  # document order is the manifest order; shuffling is ours, by seed, in numpy

        def generate():
            for doc in corpus.documents(split, validation_buckets):
                yield {"targets": doc.text, "doc_id": doc.id}

        signature = {"targets": tf.TensorSpec((), tf.string), "doc_id": tf.TensorSpec((), tf.string)}
        return tf.data.Dataset.from_generator(generate, output_signature=signature)

    @seqio.map_over_dataset
    def prepend_bos(example):
        example = dict(example)
        example["targets"] = tf.concat([tf.constant([BOS_ID], tf.int32), example["targets"]], axis=0)
        return example

    vocabulary = seqio.SentencePieceVocabulary(str(vocab_path))
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(dataset_fn, splits=SPLITS),
        preprocessors=[
            functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
            prepend_bos,
            seqio.preprocessors.append_eos,
        ],
        output_features={"targets": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32)},
        metric_fns=[],
    )
    return name


@functools.cache
def _loaded(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    return cache.load_array(directory / f"{split}.tokens.npy"), cache.load_array(directory / f"{split}.offsets.npy")


class TokenizedCorpus:
    """Both splits as token arrays (memory-mapped), documents in manifest order."""

    def __init__(self, directory: Path, info: dict):
        self.directory = directory
        self.info = info
        self.task_name = info["task"]

    def tokens(self, split: str) -> np.ndarray:
        return _loaded(self.directory, split)[0]

    def offsets(self, split: str) -> np.ndarray:
        return _loaded(self.directory, split)[1]

    def num_documents(self, split: str) -> int:
        return len(self.offsets(split)) - 1

    def num_tokens(self, split: str) -> int:
        return int(self.offsets(split)[-1])

    def doc_ids(self, split: str) -> list[str]:
        return cache.read_json(self.directory / f"{split}.ids.json")


def _write_split(task, split: str, directory: Path) -> dict[str, int]:
    """Run the Task over one split, streaming its tokens, ids and offsets to the cache files as
    they come: host memory holds one chunk of tokens and 8 bytes a document, so a pod-scale
    corpus is tokenized without being held whole."""
    lengths = array.array("q")

    def write_ids(ids_file) -> None:  # the JSON list `cache.write_json` would write, one id at a time
        def chunks() -> Iterator[np.ndarray]:
            pieces, size = [], 0
            # tf_text's SentencePiece op logs on stderr when it loads a model with identity normalisation
            with stderr_silenced() as stderr, autograph_disabled():
                dataset = task.get_dataset(sequence_length=None, split=split, shuffle=False, use_cached=False,
                                           seed=0)
                for example in tqdm(dataset.as_numpy_iterator(), desc=f"tokenizing {split}", unit=" docs",
                                    file=stderr, disable=None, leave=False):
                    piece = example["targets"].astype(np.int32, copy=False)
                    ids_file.write((",\n " if lengths else "\n ").encode()
                                   + json.dumps(example["doc_id"].decode()).encode())
                    lengths.append(len(piece))
                    pieces.append(piece)
                    size += len(piece)
                    if size >= _CHUNK_TOKENS:
                        yield np.concatenate(pieces)
                        pieces, size = [], 0
            if pieces:
                yield np.concatenate(pieces)

        ids_file.write(b"[")
        cache.save_array_stream(directory / f"{split}.tokens.npy", chunks(), np.int32)
        ids_file.write(b"\n]\n" if lengths else b"]\n")

    write_atomically(directory / f"{split}.ids.json", write_ids)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(np.frombuffer(lengths, np.int64), out=offsets[1:])
    cache.save_array(directory / f"{split}.offsets.npy", offsets)
    return {"documents": len(lengths), "tokens": int(offsets[-1])}


def _intact(directory: Path, info: dict) -> bool:
    """Whether both splits' arrays (and the validation ids, which evaluation reads) are there
    whole, as info.json counted them."""
    try:
        counts = {split: (int(info["splits"][split]["tokens"]), int(info["splits"][split]["documents"]))
                  for split in SPLITS}
    except (KeyError, TypeError, ValueError):
        return False
    if not isinstance(info.get("task"), str):
        return False
    for split, (tokens, documents) in counts.items():
        offsets = cache.intact_array(directory / f"{split}.offsets.npy", documents + 1)
        if (offsets is None or cache.intact_array(directory / f"{split}.tokens.npy", tokens) is None
                or int(offsets[-1]) != tokens):
            return False
    ids = cache.read_json(directory / "validation.ids.json", list)
    return ids is not None and len(ids) == counts["validation"][1]


def tokenize_corpus(corpus: Corpus, vocab_path: Path, validation_buckets: int) -> TokenizedCorpus:
    """The cached token arrays of both splits; runs the seqio Task once when they are missing."""
    directory = vocab_path.parent / "tokens"
    info = cache.read_json(directory / "info.json", dict)
    vocab_sha256 = hashlib.sha256(vocab_path.read_bytes()).hexdigest()
    if info is not None:
        # the arrays of exactly this model (a record from before the hash was kept: taken)
        if _intact(directory, info) and info.get("vocab_sha256", vocab_sha256) == vocab_sha256:
            return TokenizedCorpus(directory, info)
        stale = info.get("vocab_sha256", vocab_sha256) != vocab_sha256
        cache.rebuilding(directory, "holds the tokens of another vocabulary" if stale else None)
        _loaded.cache_clear()
    seqio = import_seqio()
    name = register_task(corpus, vocab_path, validation_buckets)
    task = seqio.get_mixture_or_task(name)
    counts = {}
    for split in SPLITS:
        counts[split] = _write_split(task, split, directory)
    if counts["train"]["documents"] == 0:
        raise DataError(f"corpus {corpus.spec!r}: the training split is empty")
    info = {"task": name, "corpus_sha256": corpus.sha256, "validation_buckets": validation_buckets,
            "vocab": str(vocab_path), "vocab_sha256": vocab_sha256, "splits": counts}
    cache.write_json(directory / "info.json", info)
    return TokenizedCorpus(directory, info)
