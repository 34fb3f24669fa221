"""`DataConfig`: what a training run reads, how much of it, and with which objective.

It is nested as `data:` in the training YAML and parsed with `jaxaccel.config.from_dict`, so
every field is a plain type and every bad value is a `ConfigError` naming `data.<key>`.
Sequence length and batch size are not here: they belong to the trainer and are passed to
`jaxaccel.data.build_data`.
"""
from __future__ import annotations

import dataclasses
import math

from jaxaccel.data.ids import min_vocab_size
from jaxaccel.errors import ConfigError
from jaxaccel.files import unsupported_location

OBJECTIVES = ("causal", "prefix_lm", "ul2")
DENOISER_MODES = ("R", "X", "S")


MAX_EPOCHS = 1e6  # far past any repetition study (the paper's go to a few hundred); 1e300 was a 300-digit step count


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """One UL2 denoiser (Tay et al. 2022, "UL2: Unifying Language Learning Paradigms").

    `mode`: "R" regular or "X" extreme span corruption, "S" sequential denoising (prefix LM).
    `mean_span` and `noise_density` (the fraction of tokens corrupted) apply to R and X only.
    `rate` is the denoiser's weight in the mixture; weights are normalised by their sum.
    """

    mode: str = "R"
    mean_span: float = 3.0
    noise_density: float = 0.15
    rate: float = 1.0

    def __post_init__(self):
        if self.mode not in DENOISER_MODES:
            raise ConfigError(f"data.denoisers[].mode must be one of {', '.join(DENOISER_MODES)}, got {self.mode!r}")
        if not (self.rate >= 0 and math.isfinite(self.rate)):
            raise ConfigError(f"data.denoisers[].rate must be >= 0, got {self.rate}")
        if self.mode != "S":
            if not 0.0 < self.noise_density < 1.0:
                raise ConfigError(f"data.denoisers[].noise_density must be in (0, 1), got {self.noise_density}")
            if not (self.mean_span >= 1.0 and math.isfinite(self.mean_span)):
                raise ConfigError(f"data.denoisers[].mean_span must be >= 1, got {self.mean_span}")


# The three denoisers of the brief: R (mean span 3, 15 % noise), X (mean span 32, 50 % noise)
# and S (prefix LM); UL2's own 7-denoiser mixture is expressible as a longer tuple.
UL2_DENOISERS = (
    Denoiser("R", mean_span=3.0, noise_density=0.15, rate=0.4),
    Denoiser("X", mean_span=32.0, noise_density=0.5, rate=0.4),
    Denoiser("S", rate=0.2),
)


RETRIEVAL_TASKS = ("passkey", "kv_lookup", "code_needle")
# Tasks for training only (the evaluation's are RETRIEVAL_TASKS): "span_recall" asks for the
# continuation of a span of code seen earlier in the example, cued by its first tokens.
TRAINING_TASKS = RETRIEVAL_TASKS + ("span_recall",)


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
    """Synthetic long-context retrieval examples mixed into every training batch
    (`jaxaccel.data.longctx`; TokenSelect's evaluation, issue 10).

    rate: the fraction of each global batch's rows that hold task examples instead of corpus
        rows (round(rate * batch_size) rows); 0 = off.
    tasks: which tasks, each example's drawn uniformly among those whose shortest example fits
        what is left of the row (so a row's first example uniformly among all; later ones
        favour the tasks with short minimums): "passkey" (a number hidden in filler text),
        "kv_lookup" (many key = value lines, ask one), "code_needle" (a constant's line
        hidden in corpus code); and, for training only, "span_recall" (a window of code, then
        the first `SPAN_CUE` tokens of one of its spans: the answer is the span's next tokens,
        the plain long-range copy that the three evaluation tasks all need).
    min_length: the shortest example in tokens; lengths are log-uniform between it (or the
        task's own minimum) and what is left of the row, examples packed back to back.
    answer_weight: the loss weight of an answer token (and its EOS) against a corpus token's
        1 (`loss_mask` carries it; the logged training loss is then the weighted mean). An
        example scores only ~7 tokens where a corpus row scores all of its tokens, so at 1
        the answers would get a few percent of the gradient.
    context_weight: the loss weight of a task example's other tokens (its filler, code, key
        lines and question). 0 scores the answer only; a positive weight adds language
        modelling of the example text, and with it the in-context repetition (the needle's
        number said twice, code's repeated names) from which copying heads form.
    """

    rate: float = 0.0
    tasks: tuple[str, ...] = RETRIEVAL_TASKS
    min_length: int = 64
    answer_weight: float = 1.0
    context_weight: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.rate < 1.0:
            raise ConfigError(f"data.retrieval.rate must be in [0, 1), got {self.rate}")
        unknown = [t for t in self.tasks if t not in TRAINING_TASKS]
        if unknown or not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"data.retrieval.tasks must be distinct names among {', '.join(TRAINING_TASKS)}, "
                              f"got {list(self.tasks)}")
        if self.min_length < 16:
            raise ConfigError(f"data.retrieval.min_length must be >= 16, got {self.min_length}")
        if not (self.answer_weight > 0 and math.isfinite(self.answer_weight)):
            raise ConfigError(f"data.retrieval.answer_weight must be > 0, got {self.answer_weight}")
        if not (self.context_weight >= 0 and math.isfinite(self.context_weight)):
            raise ConfigError(f"data.retrieval.context_weight must be >= 0, got {self.context_weight}")

    @property
    def enabled(self) -> bool:
        return self.rate > 0


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training data for the repetition experiments ("To Repeat or Not To Repeat").

    corpus: "stdlib" (the running Python's standard library sources, no network); or a
        comma-separated list of text files / globs (`**` recurses), where `.jsonl` files give
        one document per line from `text_field`; or "tfds:NAME[:SPLIT]" for a TFDS dataset
        already prepared on this machine (never downloaded).
    cache_dir: manifests, vocabularies and token arrays; default $XDG_CACHE_HOME/jaxaccel/data
        (~/.cache/jaxaccel/data).
    vocab_size: SentencePiece pieces, including the reserved ids (pad, eos, unk, bos, the
        three UL2 mode tokens, `num_sentinels` sentinels) and the 256 byte-fallback pieces.
    num_sentinels: span-corruption sentinels reserved in every vocabulary (also for causal
        runs, so runs with different objectives share one vocabulary).
    vocab_max_chars: the vocabulary is trained on at most about this many characters of
        the training split (a fixed hash rule picks which chunks; no seed).
    unique_tokens: the first this-many tokens of the seed-shuffled training split; None =
        the whole training split.
    epochs: how many times the unique tokens are seen (fractional allowed).
    seed: document shuffle (hence which tokens are unique), per-epoch order, objective noise.
    validation_fraction: documents whose id hashes below this fraction are held out.
    max_eval_tokens: cap on the validation token stream.
    objective: "causal", "prefix_lm" or "ul2" (mixture of `denoisers`).
    retrieval: synthetic long-context retrieval rows mixed into the batches (`RetrievalConfig`;
        causal objective only).
    """

    corpus: str = "stdlib"
    text_field: str = "text"
    cache_dir: str | None = None
    vocab_size: int = 8192
    num_sentinels: int = 100
    vocab_max_chars: int = 100_000_000
    unique_tokens: int | None = None
    epochs: float = 1.0
    seed: int = 0
    validation_fraction: float = 0.02
    max_eval_tokens: int = 65536
    objective: str = "causal"
    denoisers: tuple[Denoiser, ...] = UL2_DENOISERS
    retrieval: RetrievalConfig = RetrievalConfig()

    def __post_init__(self):
        if not any(p.strip() for p in self.corpus.split(",")):
            raise ConfigError("data.corpus must not be empty (use 'stdlib', file paths/globs, or 'tfds:NAME')")
        if not self.text_field:
            raise ConfigError("data.text_field must not be empty")
        if self.cache_dir is not None and (problem := unsupported_location(self.cache_dir, remote=False)):
            raise ConfigError(f"data.cache_dir {problem} (each host keeps its own cache)")
        if self.num_sentinels < 1:
            raise ConfigError(f"data.num_sentinels must be >= 1, got {self.num_sentinels}")
        if self.vocab_size < min_vocab_size(self.num_sentinels):
            raise ConfigError(
                f"data.vocab_size must be >= {min_vocab_size(self.num_sentinels)} (reserved ids + 256 byte pieces + 1"
                f" with num_sentinels={self.num_sentinels}), got {self.vocab_size}"
            )
        if self.vocab_max_chars < 1:
            raise ConfigError(f"data.vocab_max_chars must be >= 1, got {self.vocab_max_chars}")
        if self.unique_tokens is not None and self.unique_tokens < 1:
            raise ConfigError(f"data.unique_tokens must be >= 1 or null, got {self.unique_tokens}")
        if not (0 < self.epochs <= MAX_EPOCHS):  # also refuses nan and inf
            raise ConfigError(f"data.epochs must be > 0 and <= {MAX_EPOCHS:g}, got {self.epochs}")
        if self.seed < 0:
            raise ConfigError(f"data.seed must be >= 0, got {self.seed}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"data.validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.validation_fraction > 0 and self.validation_buckets == 0:  # the split's resolution is 1/10,000
            raise ConfigError(f"data.validation_fraction {self.validation_fraction} rounds to no held-out documents "
                              "(the split works in steps of 0.0001); use 0 for no validation, or at least 0.0001")
        if self.max_eval_tokens < 0:
            raise ConfigError(f"data.max_eval_tokens must be >= 0, got {self.max_eval_tokens}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"data.objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.objective == "ul2":
            if not self.denoisers:
                raise ConfigError("data.denoisers must not be empty when data.objective is 'ul2'")
            if sum(d.rate for d in self.denoisers) <= 0:
                raise ConfigError("data.denoisers: the rates must not all be 0")
        if self.corpus.strip() == "synthetic" and self.objective != "causal":  # it was silently causal
            raise ConfigError(f"data.objective {self.objective!r} needs a text corpus: the synthetic data (tests, "
                              f"throughput) is causal only")
        if self.retrieval.enabled and self.objective != "causal":
            raise ConfigError(f"data.retrieval needs data.objective 'causal', got {self.objective!r}")

    @property
    def validation_buckets(self) -> int:
        """Documents whose id hash mod 10_000 is below this are validation (see corpus.py)."""
        return int(round(self.validation_fraction * 10_000))
