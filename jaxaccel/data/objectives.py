"""Training examples for a decoder-only model: causal LM, prefix LM, and UL2 denoising.

Every example is a row of `seq_len` tokens with these arrays (the batch keys):

    inputs        [T] int32    token ids fed to the model (0 = padding)
    targets       [T] int32    the token to predict at each position (0 where there is none)
    loss_mask     [T] float32  1 where `targets` is scored, else 0 (padding, non-target parts,
                               the last token of a document)
    segment_ids   [T] int32    1, 2, ... per segment in the row; 0 = padding
    positions     [T] int32    RoPE positions, restarting at 0 in every segment
    bidirectional [T] bool     the token is in a segment's bidirectional prefix/input part

Visibility (`attention_mask`): key j is visible to query i iff they share a nonzero segment
and (j <= i, or both i and j are bidirectional); additionally every token sees itself, so a
padding query never has an empty softmax row. The bidirectional part is always a prefix of
its segment, so this is exactly prefix-LM attention: the prefix sees the whole prefix, every
later token sees the prefix and the tokens before it.

Causal rows (`causal_rows`) come straight from the packed stream: row r holds stream tokens
[r*R, r*R + R), documents are segments (a document starts at its BOS, id 3), and
`targets[i]` is the next stream token when it belongs to the same document — within the row
that is `inputs[i + 1]`; at the last position it is the first token of the next row (the same
document continuing), so no token goes unpredicted at a row boundary. The EOS closing a
document has no target (the next token is the next document's BOS).

Prefix LM (`apply_prefix_lm`): per segment of length L >= 2 a split P uniform in [1, L-1];
tokens [0, P) are bidirectional, and the loss covers the targets after the prefix, i.e.
positions i >= P-1 (position P-1 predicts the first non-prefix token from the prefix).

UL2 (`ul2_row`), decoder-only form (Tay et al. 2022, sec. 3.1; spans as in T5's
`random_spans_noise_mask`). A raw row of R stream tokens is one example — like T5/UL2, which
corrupt concatenated text, the example spans document boundaries — laid out as

    R/X: [mode] x0 x1 <extra_id_0> x5 ... | <extra_id_0> x2 x3 x4 <extra_id_1> ... </s>
    S:   [S] x0 ... x(P-1) | xP ... x(n-1)

The part before `|` is bidirectional; the loss covers every token after it (predicted from
the position before). Span denoisers have round(n * noise_density) noise tokens in
round(noise / mean_span) spans, capped at the `num_sentinels` sentinels (spans then get
longer); as in T5 the first span is always non-noise, so a row with a single span (short
rows, long mean spans) always has its tail corrupted. The S denoiser splits at P uniform in
[1, n-1]. R (raw row length) is the longest
length whose corrupted form fits `seq_len` for every denoiser in the mixture
(`ul2_raw_length`).

Randomness: one `numpy.random.Generator` per (seed, epoch, row index) (`row_rng`), so an
example is a pure function of those and any step can be rebuilt on resume.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxaccel.errors import ConfigError
from jaxaccel.data.config import Denoiser
from jaxaccel.data.ids import BOS_ID, EOS_ID, MODE_IDS, PAD_ID, sentinel_id

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions", "bidirectional")
_DTYPES = {"inputs": np.int32, "targets": np.int32, "loss_mask": np.float32, "segment_ids": np.int32,
           "positions": np.int32, "bidirectional": np.bool_}
_OBJECTIVE_TAG = 0x0B1EC7  # separates these random streams from the shuffles seeded with the same seed


def row_rng(seed: int, epoch: int, row: int) -> np.random.Generator:
    return np.random.default_rng([_OBJECTIVE_TAG, seed, epoch, row])


def empty_rows(n: int, seq_len: int) -> dict[str, np.ndarray]:
    """`n` all-padding rows."""
    return {k: np.zeros((n, seq_len), dt) for k, dt in _DTYPES.items()}


def causal_rows(stream: np.ndarray, row_starts: np.ndarray, row_len: int, seq_len: int) -> dict[str, np.ndarray]:
    """Rows of `row_len` stream tokens starting at `row_starts` [n], right-padded to `seq_len`."""
    n = len(row_starts)
    size = len(stream)
    index = np.asarray(row_starts, np.int64)[:, None] + np.arange(row_len + 1)  # one token of lookahead
    valid = index < size
    tokens = np.where(valid, np.asarray(stream)[np.minimum(index, max(size - 1, 0))] if size else 0, PAD_ID)
    starts = valid & (tokens == BOS_ID)
    inputs, in_row = tokens[:, :row_len], valid[:, :row_len]
    segment_start = starts[:, :row_len].copy()
    segment_start[:, 0] = True  # a row opens a segment even mid-document
    segment_ids = np.cumsum(segment_start, axis=1) * in_row
    column = np.arange(row_len)
    last_start = np.maximum.accumulate(np.where(segment_start, column, 0), axis=1)
    positions = (column - last_start) * in_row
    has_target = valid[:, 1:] & ~starts[:, 1:]
    out = empty_rows(n, seq_len)
    out["inputs"][:, :row_len] = inputs
    out["targets"][:, :row_len] = np.where(has_target, tokens[:, 1:], PAD_ID)
    out["loss_mask"][:, :row_len] = has_target
    out["segment_ids"][:, :row_len] = segment_ids
    out["positions"][:, :row_len] = positions
    return out


def apply_prefix_lm(rows: dict[str, np.ndarray], rngs: Sequence[np.random.Generator]) -> dict[str, np.ndarray]:
    """Turn causal rows into prefix-LM rows in place: a random prefix per segment."""
    for b, rng in enumerate(rngs):
        segment_ids = rows["segment_ids"][b]
        positions = rows["positions"][b]
        lengths = np.bincount(segment_ids)[1:]
        if not len(lengths):
            continue
        split = np.where(lengths >= 2, rng.integers(1, np.maximum(lengths, 2)), 0)
        prefix = np.where(segment_ids > 0, split[np.maximum(segment_ids - 1, 0)], 0)
        rows["bidirectional"][b] = positions < prefix
        rows["loss_mask"][b] *= positions >= prefix - 1
    return rows


def random_spans_noise_mask(length: int, noise_density: float, mean_span: float, max_spans: int,
                            rng: np.random.Generator) -> np.ndarray:
    """bool [length]: alternating non-noise / noise spans, starting with non-noise (T5's rule)."""
    num_noise = _num_noise(length, noise_density)
    num_spans = _num_spans(length, num_noise, mean_span, max_spans)
    noise_lengths = _random_composition(num_noise, num_spans, rng)
    keep_lengths = _random_composition(length - num_noise, num_spans, rng)
    run_lengths = np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], num_spans), run_lengths)


def _num_noise(length: int, noise_density: float) -> int:
    """Corrupted tokens of a row of `length`: at least one, and at least one left uncorrupted."""
    return min(max(int(round(length * noise_density)), 1), length - 1)


def _num_spans(length: int, num_noise: int, mean_span: float, max_spans: int) -> int:
    return max(1, min(int(round(num_noise / mean_span)), max_spans, num_noise, length - num_noise))


def _random_composition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`parts` positive integers summing to `total`, uniformly among all such compositions."""
    if parts == 1:
        return np.array([total])
    cuts = np.sort(rng.choice(total - 1, parts - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [total]]))


def corrupted_length(length: int, denoiser: Denoiser, num_sentinels: int) -> int:
    """Tokens in the UL2 example made from `length` raw tokens."""
    if denoiser.mode == "S" or length < 2:
        return length + 1
    num_noise = _num_noise(length, denoiser.noise_density)
    return length + 2 + 2 * _num_spans(length, num_noise, denoiser.mean_span, num_sentinels)


def _warn_capped_spans(length: int, seq_len: int, denoisers: Sequence[Denoiser], num_sentinels: int) -> None:
    """A row wants more spans than there are sentinels: the spans get longer than configured
    (noise density stays exact). Said once per setting, with the sentinel count that avoids it."""
    import warnings

    for d in denoisers:
        if d.mode == "S":
            continue
        num_noise = _num_noise(length, d.noise_density)
        wanted = int(round(num_noise / d.mean_span))
        if wanted > num_sentinels:
            warnings.warn(f"UL2 denoiser {d.mode}(mean_span={d.mean_span:g}) at seq_len={seq_len}: "
                          f"data.num_sentinels={num_sentinels} allows {num_sentinels} spans a row, so its spans "
                          f"average {num_noise / num_sentinels:.1f} tokens; data.num_sentinels={wanted} keeps them "
                          f"at {d.mean_span:g}", stacklevel=3)


def ul2_raw_length(seq_len: int, denoisers: Sequence[Denoiser], num_sentinels: int) -> int:
    """The longest raw row whose corrupted form fits in `seq_len` for every active denoiser."""
    active = [d for d in denoisers if d.rate > 0]
    for length in range(seq_len - 1, 1, -1):  # corrupted_length is nondecreasing in length
        if all(corrupted_length(length, d, num_sentinels) <= seq_len for d in active):
            _warn_capped_spans(length, seq_len, active, num_sentinels)
            return length
    raise ConfigError(f"seq_len={seq_len} is too short for data.objective='ul2' (no raw length fits every denoiser)")


def ul2_row(raw: np.ndarray, seq_len: int, denoisers: Sequence[Denoiser], rng: np.random.Generator,
            num_sentinels: int) -> dict[str, np.ndarray]:
    """One UL2 example from raw tokens (see the module docstring for the layout)."""
    rates = np.array([d.rate for d in denoisers], np.float64)
    denoiser = denoisers[int(rng.choice(len(denoisers), p=rates / rates.sum()))]
    raw = np.asarray(raw, np.int32)
    n = len(raw)
    if n < 2:  # nothing to split: the (at most one) token is all context, no loss
        sequence, input_len = np.concatenate([[MODE_IDS["S"]], raw]), n + 1
    elif denoiser.mode == "S":
        split = int(rng.integers(1, n))
        sequence, input_len = np.concatenate([[MODE_IDS["S"]], raw]), 1 + split
    else:
        noise = random_spans_noise_mask(n, denoiser.noise_density, denoiser.mean_span, num_sentinels, rng)
        span_start = noise & ~np.concatenate([[False], noise[:-1]])
        span_index = np.cumsum(span_start) - 1
        sentinels = sentinel_id(span_index).astype(np.int32)
        corrupted = np.where(span_start, sentinels, raw)[~noise | span_start]
        noise_tokens, noise_span = raw[noise], span_index[noise]
        num_spans = int(span_start.sum())
        slots = np.arange(len(noise_tokens)) + noise_span + 1  # each span is preceded by its sentinel
        targets = np.empty(len(noise_tokens) + num_spans, np.int32)
        targets[slots] = noise_tokens
        first_of_span = np.concatenate([[True], noise_span[1:] != noise_span[:-1]])
        targets[slots[first_of_span] - 1] = sentinel_id(np.arange(num_spans))
        sequence = np.concatenate([[MODE_IDS[denoiser.mode]], corrupted, targets, [EOS_ID]])
        input_len = 1 + len(corrupted)
    length = len(sequence)
    if length > seq_len:
        raise AssertionError(f"UL2 example of {length} tokens exceeds seq_len={seq_len}")  # ul2_raw_length bug
    out = {k: v[0] for k, v in empty_rows(1, seq_len).items()}
    out["inputs"][:length] = sequence
    out["targets"][: length - 1] = sequence[1:]
    out["loss_mask"][max(input_len - 1, 0): length - 1] = 1.0
    out["segment_ids"][:length] = 1
    out["positions"][:length] = np.arange(length)
    out["bidirectional"][:input_len] = True
    return out


def attention_mask(batch) -> np.ndarray:
    """[B, T, T] bool, True where query i may attend to key j (rule in the module docstring).

    Works on numpy arrays and, unchanged, on jax arrays (pass the device batch to build the
    mask on the accelerator instead of shipping B*T*T bytes from the host)."""
    segment_ids = batch["segment_ids"]
    bidirectional = batch["bidirectional"]
    if type(segment_ids).__module__.startswith("jax"):
        import jax.numpy as xp
    else:
        xp = np
    t = segment_ids.shape[-1]
    query, key = xp.arange(t)[:, None], xp.arange(t)[None, :]
    same_segment = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] != 0)
    both_bidirectional = bidirectional[:, :, None] & bidirectional[:, None, :]
    return (same_segment & ((key <= query)[None] | both_bidirectional)) | (key == query)[None]
