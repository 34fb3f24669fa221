"""A data source with the `jaxaccel.data.TrainData` interface and no TensorFlow: packed
random-token batches, a pure function of (seed, step). For tests and throughput benchmarks.

A token budget (`data.unique_tokens`, `data.epochs`) is kept as with a corpus: the data holds
`unique_batches` distinct batches (the unique tokens, in whole batches; without them, as many
as `train.steps` over `epochs` needs) and runs through them `epochs` times, each epoch after
the first in its own seed-shuffled batch order."""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np

DEFAULT_BATCHES = 1000  # the distinct batches without data.unique_tokens (or train.steps)


def synthetic_budget(unique_tokens: int | None, epochs: float, batch_size: int, seq_len: int,
                     steps: int | None = None) -> tuple[int, int]:
    """(distinct batches, total steps) of the synthetic data under a token budget: the unique
    tokens in whole batches, seen `epochs` times. Without them, `train.steps` is what is
    trained, over ceil(steps / epochs) distinct batches (DEFAULT_BATCHES without steps either).
    ConfigError when the unique tokens do not fill one batch."""
    if unique_tokens is None and steps:
        unique = max(1, math.ceil(steps / epochs))
        return unique, max(steps, int(unique * epochs))
    if unique_tokens is None:
        unique = DEFAULT_BATCHES
    else:
        unique = unique_tokens // (batch_size * seq_len)
        if unique < 1:
            from jaxaccel.errors import ConfigError

            raise ConfigError(f"data.unique_tokens={unique_tokens} does not fill one batch of the synthetic data "
                              f"({batch_size} x {seq_len} = {batch_size * seq_len} tokens)")
    return unique, max(1, int(unique * epochs))


class SyntheticData:
    vocab_path = None
    pad_id = 0
    eos_id = 1

    def __init__(self, vocab_size: int, seq_len: int, batch_size: int, total_steps: int = DEFAULT_BATCHES,
                 seed: int = 0, shard_index: int = 0, num_shards: int = 1, docs_per_row: int = 2,
                 unique_batches: int | None = None):
        if batch_size % num_shards:
            raise ValueError("batch_size must be a multiple of num_shards")
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        self.total_steps = total_steps
        self.steps_per_epoch = self.unique_batches = unique_batches or total_steps
        self.seed, self.shard_index, self.num_shards, self.docs_per_row = seed, shard_index, num_shards, docs_per_row
        tokens = batch_size * seq_len
        self.stats = {"corpus": "synthetic", "unique_tokens": self.unique_batches * tokens,
                      "total_tokens": total_steps * tokens, "epochs": total_steps / self.unique_batches}
        self._orders: dict[int, np.ndarray] = {}

    def batch_of_step(self, step: int) -> int:
        """Which distinct batch `step` reads: epoch 0 in order, each later epoch shuffled."""
        epoch, i = divmod(step, self.unique_batches)
        if epoch == 0:
            return i
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch, 2]).permutation(self.unique_batches)}
        return int(self._orders[epoch][i])

    def _batch(self, step: int, eval_batch: bool = False) -> dict[str, np.ndarray]:
        if not eval_batch:
            step = self.batch_of_step(step)
        rng = np.random.default_rng([self.seed, step, int(eval_batch)])
        b, t = self.batch_size, self.seq_len
        # A learnable pattern: each document counts upward from a random start.
        starts = rng.integers(2, self.vocab_size, (b, self.docs_per_row))
        seg = np.repeat(np.arange(1, self.docs_per_row + 1), t // self.docs_per_row + 1)[:t]
        seg = np.broadcast_to(seg, (b, t)).copy()
        seg[:, -2:] = 0  # a little padding at the end of every row
        first = np.concatenate([[True], seg[0, 1:] != seg[0, :-1]])
        pos = np.zeros((b, t), np.int32)
        for i in range(1, t):
            pos[:, i] = 0 if first[i] else pos[:, i - 1] + 1
        tokens = (starts[np.arange(b)[:, None], np.maximum(seg - 1, 0)] + pos) % (self.vocab_size - 2) + 2
        tokens = np.where(seg > 0, tokens, self.pad_id).astype(np.int32)
        targets = np.concatenate([tokens[:, 1:], np.zeros((b, 1), np.int32)], axis=1)
        same_next = np.concatenate([seg[:, 1:] == seg[:, :-1], np.zeros((b, 1), bool)], axis=1)
        loss_mask = ((seg > 0) & same_next).astype(np.float32)
        rows = slice(self.shard_index * b // self.num_shards, (self.shard_index + 1) * b // self.num_shards)
        out = {"inputs": tokens, "targets": targets, "loss_mask": loss_mask, "segment_ids": seg.astype(np.int32),
               "positions": pos, "bidirectional": np.zeros((b, t), bool)}
        return {k: v[rows] for k, v in out.items()}

    def train_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        for step in range(start_step, self.total_steps):
            yield self._batch(step)

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(2):
            yield self._batch(i, eval_batch=True)
