"""Synthetic long-context retrieval tasks (TokenSelect's evaluation, issue 10), generated on
the fly from a seed, and their mixture into the training batches.

Three tasks, each an example of exactly `length` tokens laid out as

    <s> context ... question answer </s>

* "passkey" (Mohtashami & Jaggi 2023): an instruction, then filler sentences ("The grass
  is green. The sky is blue. ...") with one needle between two of them at a uniform depth,
  "The pass key is 73914. Remember it. 73914 is the pass key."; the question "What is the
  pass key? The pass key is" and the answer " 73914" (five digits).
* "kv_lookup" (Liu et al. 2023, "Lost in the Middle", with short hex keys): an instruction
  and as many "3fa9c1 = 77e0b2" lines as fit (distinct keys); the question repeats one
  key, uniformly chosen, "... below?\\n3fa9c1 =", and the answer is its value " 77e0b2".
* "code_needle": real corpus code (a window of the token stream, documents' BOS / EOS
  dropped) with one line "lucky_number_42 = 48213" inserted at a line start near a
  uniform depth; the question "# What is the value of the constant below?\\nlucky_number_42 ="
  and the answer " 48213".
* "span_recall" (training only): a window of corpus code, then the first SPAN_CUE tokens of
  one of its spans (at a uniform depth, a cue found nowhere else in the window when one can
  be drawn) as the question; the answer is the span's next SPAN_ANSWER tokens. It is the
  bare long-range copy (induction) that the three tasks above share, with no template to
  learn first.

Text is tokenized piece by piece (`encode` of each segment, ids concatenated), so the answer's
ids are exactly the ids of the value where it appears in the context: retrieval is copying
ids, whatever the tokenizer merges across segment boundaries. Filler is cut at a token (the
last one, or a kv_lookup pad shorter than a line), so lengths are exact. Everything random
comes from one `numpy.random.Generator`, so an example is a pure function of (task, length,
seed).

Training mixture (`RetrievalMixture`, `data.retrieval` in the config): every global batch is
`batch_size - task_rows` corpus rows (the corpus pipeline's own batches at that batch size:
its budget, epochs and resume rule unchanged) followed by `task_rows` rows of task examples
packed back to back as segments (lengths log-uniform in [min_length, what is left of the
row]; the last one takes the rest when another would not fit). A task whose shortest example
is longer than seq_len is a ConfigError when the data is built, not a task silently never
drawn. A task example is scored on its answer and the EOS after it with weight
`answer_weight`, and on its other tokens with `context_weight` (0: not at all); `loss_mask`
carries the weights.
Task row r of step s is a pure function of (seed, s, r), so `train_batches(start)` resumes
exactly; across hosts, the global batch holds the same rows whatever the number of shards
(each shard's corpus rows, then its task rows). Evaluation batches are the corpus's (causal
LM on the validation split): the task accuracy is what `python -m jaxaccel.experiments
tokenselect` measures, at any length.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from jaxaccel.data.config import RETRIEVAL_TASKS, TRAINING_TASKS, RetrievalConfig
from jaxaccel.data.ids import BOS_ID, EOS_ID, PAD_ID
from jaxaccel.data.objectives import empty_rows
from jaxaccel.errors import ConfigError

TASKS = RETRIEVAL_TASKS  # what the evaluation asks
ALL_TASKS = TRAINING_TASKS  # what an example can be (TASKS + "span_recall")
_TASK_TAG = 0x7A5C  # separates these random streams from the corpus shuffles seeded with the same seed

PASSKEY_INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the pass key.\n")
PASSKEY_FILLER = ("The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ",
                  "There and back again. ")
KV_INTRO = ("Below is a list of keys and their values. Remember them: you will be asked for the value of one "
            "key.\n")
KV_QUESTION = "\nWhat is the value of the key below?\n"
CODE_QUESTION = "\n# What is the value of the constant below?\n"
NAME_WORDS = (("lucky", "magic", "secret", "hidden", "special", "target", "golden", "silent"),
              ("number", "value", "code", "key", "token", "answer", "seed", "id"))
HEX_DIGITS = 6  # key and value length in kv_lookup
SPAN_CUE, SPAN_ANSWER = 6, 24  # span_recall: tokens of cue, tokens asked (many: a dense copy signal)


@dataclasses.dataclass(frozen=True)
class TaskExample:
    """One example: `tokens` [length] int32 = BOS, context, question, answer, EOS."""

    task: str
    tokens: np.ndarray
    answer_start: int
    answer_len: int
    needle_start: int  # where the answer's ids sit in the context

    @property
    def prompt(self) -> list[int]:
        """What a model is given: everything before the answer."""
        return self.tokens[:self.answer_start].tolist()

    @property
    def answer(self) -> list[int]:
        return self.tokens[self.answer_start:self.answer_start + self.answer_len].tolist()

    @property
    def depth(self) -> float:
        """The needle's position as a fraction of the prompt (0 = its start)."""
        return self.needle_start / self.answer_start


def example_rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([_TASK_TAG, seed, *keys])


class RetrievalTasks:
    """The task generator over one tokenizer and one code stream.

    encode: text -> token ids (no BOS / EOS added); code_tokens: a token stream of real code
    in the same vocabulary (the filler of "code_needle"; special ids in it are dropped);
    line_ends: the ids whose text ends a line (a needle line goes right after one)."""

    def __init__(self, encode: Callable[[str], Sequence[int]], code_tokens: np.ndarray,
                 line_ends: Sequence[int] | np.ndarray, *, bos_id: int = BOS_ID, eos_id: int = EOS_ID):
        self._encode = encode
        self.code_tokens = np.asarray(code_tokens)
        if len(self.code_tokens) == 0:
            raise ValueError("code_tokens is empty: code_needle needs a code stream")
        self.line_ends = np.asarray(sorted(set(int(i) for i in line_ends)), np.int64)
        self.bos_id, self.eos_id = bos_id, eos_id
        self._drop = np.asarray([bos_id, eos_id, PAD_ID], np.int64)
        scan = 1 << 20  # in pieces: a pod-scale memory-mapped stream is not read whole to check it
        if all(np.isin(self.code_tokens[i:i + scan], self._drop).all() for i in range(0, len(self.code_tokens), scan)):
            raise ValueError("code_tokens holds only BOS / EOS / padding ids")
        self._cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def from_sentencepiece(cls, model: str | Path | bytes, code_tokens: np.ndarray) -> "RetrievalTasks":
        """From a SentencePiece model (file or serialized proto); a line ends after any piece
        whose text ends with a newline."""
        import sentencepiece as spm

        sp = (spm.SentencePieceProcessor(model_proto=model) if isinstance(model, bytes)
              else spm.SentencePieceProcessor(model_file=str(model)))
        line_ends = [i for i in range(sp.get_piece_size())
                     if not sp.is_control(i) and sp.decode([i]).endswith("\n")]
        return cls(lambda text: sp.encode(text), code_tokens, line_ends)

    # ------------------------------------------------------------------ pieces

    def _ids(self, text: str) -> tuple[int, ...]:
        ids = self._cache.get(text)
        if ids is None:
            ids = tuple(int(i) for i in self._encode(text))
            if len(self._cache) < 20_000:  # the templates come first; bounded over a long run
                self._cache[text] = ids
        return ids

    def ids(self, *texts: str) -> list[int]:
        return [i for t in texts for i in self._ids(t)]

    def _filler(self, n: int) -> tuple[list[int], np.ndarray]:
        """n filler tokens (the sentences repeated, cut at a token) and where sentences start."""
        sentences = [self._ids(t) for t in PASSKEY_FILLER]
        unit = [i for ids in sentences for i in ids]
        starts = np.cumsum([0] + [len(ids) for ids in sentences[:-1]])
        reps = n // len(unit) + 1
        all_starts = (starts[None, :] + len(unit) * np.arange(reps)[:, None]).ravel()
        return (unit * reps)[:n], np.append(all_starts[all_starts < n], n)

    def _code(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n code tokens from a uniform offset (wrapping around the stream), special ids dropped."""
        stream, size = self.code_tokens, len(self.code_tokens)
        start, out, have = int(rng.integers(size)), [], 0
        while have < n:
            take = min(size - start, n - have + 64)  # a little extra for the ids dropped
            piece = np.asarray(stream[start:start + take], np.int64)
            out.append(piece[~np.isin(piece, self._drop)][:n - have])
            have += len(out[-1])
            start = (start + take) % size
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def code_prompt(self, n: int, rng: np.random.Generator | int) -> np.ndarray:
        """BOS + n - 1 tokens of code from a uniform offset: a plain long prompt (benchmarks)."""
        if not isinstance(rng, np.random.Generator):
            rng = example_rng(int(rng))
        return np.concatenate([[self.bos_id], self._code(n - 1, rng)]).astype(np.int32)

    def _assemble(self, task: str, parts: list[Sequence[int]], needle_start: int) -> TaskExample:
        """BOS + parts + EOS; the last part is the answer; `needle_start` counts the BOS."""
        context = [self.bos_id] + [int(i) for p in parts[:-1] for i in p]
        answer = [int(i) for i in parts[-1]]
        tokens = np.asarray(context + answer + [self.eos_id], np.int32)
        return TaskExample(task, tokens, len(context), len(answer), needle_start)

    @staticmethod
    def _number(rng: np.random.Generator) -> str:
        return str(int(rng.integers(10_000, 100_000)))

    # ------------------------------------------------------------------ tasks

    def min_length(self, task: str) -> int:
        """The shortest example `task` is generated at (its fixed parts plus a little context)."""
        if task not in ALL_TASKS:
            raise ValueError(f"unknown task {task!r}; tasks: {', '.join(ALL_TASKS)}")
        rng = example_rng(0)
        if task == "span_recall":
            return 2 + 3 * (SPAN_CUE + SPAN_ANSWER)
        if task == "passkey":
            fixed = len(self.ids(PASSKEY_INTRO, *self._passkey_needle("12345"), *self._passkey_question()))
            return fixed + 2 * 6 + 8
        if task == "kv_lookup":
            # an ASCII character is at most one token (a piece or a byte piece): bounds for any key
            line = 2 * HEX_DIGITS + 1 + len(self.ids(" =", "\n"))
            return len(self.ids(KV_INTRO, KV_QUESTION, " =")) + 2 * HEX_DIGITS + 1 + 3 * line + 2
        name = self._name(rng)
        return len(self.ids(*self._code_line(name, "12345"), CODE_QUESTION, name, " =", " 12345")) + 24

    def example(self, task: str, length: int, rng: np.random.Generator | int) -> TaskExample:
        """An example of `task` with exactly `length` tokens (rng: a Generator or a seed)."""
        if task not in ALL_TASKS:
            raise ValueError(f"unknown task {task!r}; tasks: {', '.join(ALL_TASKS)}")
        if length < self.min_length(task):
            raise ValueError(f"{task} needs at least {self.min_length(task)} tokens, asked for {length}")
        if not isinstance(rng, np.random.Generator):
            rng = example_rng(int(rng))
        made = {"passkey": self._passkey_example, "kv_lookup": self._kv_example,
                "code_needle": self._code_example, "span_recall": self._span_example}[task](length, rng)
        assert len(made.tokens) == length, (task, len(made.tokens), length)
        return made

    @staticmethod
    def _passkey_needle(number: str) -> list[str]:
        return ["The pass key is", " " + number, ". Remember it.", " " + number, " is the pass key. "]

    @staticmethod
    def _passkey_question() -> list[str]:
        return ["\nWhat is the pass key? The pass key is"]

    def _passkey_example(self, length: int, rng: np.random.Generator) -> TaskExample:
        number = self._number(rng)
        intro, question, answer = self.ids(PASSKEY_INTRO), self.ids(*self._passkey_question()), self.ids(" " + number)
        needle = self.ids(*self._passkey_needle(number))
        filler, starts = self._filler(length - 2 - len(intro) - len(needle) - len(question) - len(answer))
        target = rng.random() * len(filler)
        cut = int(starts[np.argmin(np.abs(starts - target))])  # between two sentences
        at = 1 + len(intro) + cut + len(self.ids("The pass key is"))
        return self._assemble("passkey", [intro, filler[:cut], needle, filler[cut:], question, answer], at)

    @staticmethod
    def _kv_line(key: str, value: str) -> list[str]:
        return [key, " =", " " + value, "\n"]

    def _kv_example(self, length: int, rng: np.random.Generator) -> TaskExample:
        intro = self.ids(KV_INTRO)
        budget = length - 2 - len(intro)
        # A line is at least 4 tokens (key, " =", value, newline): more lines than can fit.
        n_max = max(2, budget // 4)
        keys = rng.choice(16 ** HEX_DIGITS, size=min(n_max, 16 ** HEX_DIGITS), replace=False)
        values = rng.integers(0, 16 ** HEX_DIGITS, size=len(keys))
        hexes = [(f"{k:0{HEX_DIGITS}x}", f"{v:0{HEX_DIGITS}x}") for k, v in zip(keys, values)]
        lines: list[list[int]] = []
        used = 0
        for key, value in hexes:
            line = self.ids(*self._kv_line(key, value))
            # the question for this key must still fit after the lines so far and this one
            if used + len(line) + len(self.ids(KV_QUESTION, key, " =", " " + value)) > budget:
                break
            lines.append(line)
            used += len(line)
        if len(lines) < 2:
            raise ValueError(f"kv_lookup: {length} tokens hold fewer than two key lines")
        # ask one of the lines whose question fits after all of them (the last one's does)
        fits = [i for i in range(len(lines))
                if used + len(self.ids(KV_QUESTION, hexes[i][0], " =", " " + hexes[i][1])) <= budget]
        asked = fits[int(rng.integers(len(fits)))]
        key, value = hexes[asked]
        question, answer = self.ids(KV_QUESTION, key, " ="), self.ids(" " + value)
        pad = self._filler(budget - used - len(question) - len(answer))[0]
        before = sum(len(x) for x in lines[:asked])
        at = 1 + len(intro) + len(pad) + before + len(self.ids(key, " ="))
        body = [i for line in lines for i in line]
        return self._assemble("kv_lookup", [intro, pad, body, question, answer], at)

    def _name(self, rng: np.random.Generator) -> str:
        first, second = NAME_WORDS
        return f"{first[int(rng.integers(len(first)))]}_{second[int(rng.integers(len(second)))]}_" \
               f"{int(rng.integers(10, 100))}"

    @staticmethod
    def _code_line(name: str, number: str) -> list[str]:
        return [name, " =", " " + number, "\n"]

    def _code_example(self, length: int, rng: np.random.Generator) -> TaskExample:
        name, number = self._name(rng), self._number(rng)
        needle = self.ids(*self._code_line(name, number))
        question, answer = self.ids(CODE_QUESTION, name, " ="), self.ids(" " + number)
        code = self._code(length - 2 - len(needle) - len(question) - len(answer), rng)
        target = int(round(rng.random() * len(code)))
        starts = np.flatnonzero(np.isin(code, self.line_ends)) + 1  # a line starts after a line end
        starts = np.concatenate([[0], starts])
        cut = int(starts[np.argmin(np.abs(starts - target))])
        at = 1 + cut + len(self.ids(name, " ="))
        return self._assemble("code_needle", [code[:cut], needle, code[cut:], question, answer], at)

    def _span_example(self, length: int, rng: np.random.Generator) -> TaskExample:
        code = self._code(length - 2 - SPAN_CUE - SPAN_ANSWER, rng)
        span = SPAN_CUE + SPAN_ANSWER
        windows = np.lib.stride_tricks.sliding_window_view(code, SPAN_CUE)
        for _ in range(8):  # a cue that occurs once in the window, when one can be drawn
            at = int(rng.integers(len(code) - span + 1))
            cue = code[at:at + SPAN_CUE]
            if int((windows == cue).all(axis=1).sum()) == 1:
                break
        return self._assemble("span_recall", [code, cue, code[at + SPAN_CUE:at + span]], 1 + at + SPAN_CUE)

    # ------------------------------------------------------------------ training rows

    def packed_row(self, rng: np.random.Generator, seq_len: int, tasks: Sequence[str] = TASKS,
                   min_length: int = 64, answer_weight: float = 1.0,
                   context_weight: float = 0.0) -> dict[str, np.ndarray]:
        """One training row of `seq_len` tokens: examples of `tasks` back to back, one segment
        each, scored on the answer and its EOS with weight `answer_weight` and on the rest
        with `context_weight` (the batch keys of `objectives`)."""
        out = {k: v[0] for k, v in empty_rows(1, seq_len).items()}
        floors = {t: max(min_length, self.min_length(t)) for t in tasks}
        used, segment = 0, 0
        while True:
            room = seq_len - used
            fitting = [t for t in tasks if floors[t] <= room]
            if not fitting:
                break
            task = fitting[int(rng.integers(len(fitting)))]
            lo = floors[task]
            n = int(round(math.exp(rng.uniform(math.log(lo), math.log(room)))))
            n = min(max(n, lo), room)
            if room - n < min(floors.values()):
                n = room  # nothing else would fit after it: take the rest
            ex = self.example(task, n, rng)
            segment += 1
            span = slice(used, used + n)
            out["inputs"][span] = ex.tokens
            out["targets"][used:used + n - 1] = ex.tokens[1:]
            out["segment_ids"][span] = segment
            out["positions"][span] = np.arange(n)
            # position i predicts token i + 1: the answer's ids and the EOS after them
            out["loss_mask"][used:used + n - 1] = context_weight
            out["loss_mask"][used + ex.answer_start - 1:used + ex.answer_start + ex.answer_len] = answer_weight
            used += n
        return out


def validation_code(corpus: str, validation_buckets: int, encode: Callable[[str], Sequence[int]],
                    max_tokens: int | None = None, text_field: str = "text") -> np.ndarray:
    """The validation split's documents of `corpus`, tokenized with `encode` and concatenated
    (no BOS / EOS): held-out code filler for evaluation, in any model's vocabulary."""
    from jaxaccel.data.corpus import open_corpus

    pieces, have = [], 0
    for doc in open_corpus(corpus, text_field).documents("validation", validation_buckets):
        pieces.append(np.asarray(encode(doc.text), np.int64))
        have += len(pieces[-1])
        if max_tokens is not None and have >= max_tokens:
            break
    if not pieces:
        from jaxaccel.data.errors import DataError

        raise DataError(f"corpus {corpus!r} has no validation documents to draw held-out code from (its "
                        f"data.validation_fraction is 0, or its validation split is empty)")
    return np.concatenate(pieces)


# ----------------------------------------------------------------------------- the training mixture


def task_rows_per_batch(cfg: RetrievalConfig, batch_size: int, num_shards: int = 1) -> int:
    """round(rate * batch_size) task rows per global batch; both parts must split over the shards."""
    rows = int(round(cfg.rate * batch_size))
    if cfg.enabled and rows < 1:
        raise ConfigError(f"data.retrieval.rate={cfg.rate} gives no task row in a batch of {batch_size}")
    if batch_size - rows < 1:
        raise ConfigError(f"data.retrieval.rate={cfg.rate} leaves no corpus row in a batch of {batch_size}")
    if rows % num_shards or (batch_size - rows) % num_shards:
        raise ConfigError(f"data.retrieval: {rows} task rows and {batch_size - rows} corpus rows per batch must "
                          f"both be multiples of the {num_shards} data shards")
    return rows


def check_tasks_fit(tasks: RetrievalTasks, names: Sequence[str], min_length: int, seq_len: int) -> None:
    """Raise a ConfigError unless every task in `names` has an example that fits a row of
    `seq_len` tokens (`packed_row` never draws a task whose shortest example is longer than
    the row: it would be left out silently, and with none fitting every task row would be
    padding)."""
    own = {t: tasks.min_length(t) for t in names}
    too_long = [t for t in names if own[t] > seq_len]
    if too_long:
        listed = ", ".join(f"{t} (at least {own[t]} tokens)" for t in too_long)
        also = f", nor can data.retrieval.min_length={min_length}" if min_length > seq_len else ""
        raise ConfigError(f"data.retrieval.tasks: {listed} cannot fit seq_len={seq_len} in this vocabulary{also};"
                          " raise train.seq_len or remove them from data.retrieval.tasks")
    if min_length > seq_len:
        raise ConfigError(f"data.retrieval.min_length={min_length} is longer than seq_len={seq_len}: no task "
                          "example fits a row; lower it or raise train.seq_len")


class RetrievalMixture:
    """The `TrainData` interface over a corpus source plus task rows (module docstring).

    base: the corpus batches at batch size `batch_size - task_rows` for this shard (anything
    with `train_batches(start)`, `eval_batches()`, `vocab_size`, `vocab_path`, `total_steps`,
    `steps_per_epoch` and `stats`: `TrainData`, or `SyntheticData` in tests). Each of this
    shard's batches is its corpus rows followed by its task rows (global task rows
    [shard * t, (shard + 1) * t), t = task_rows / num_shards)."""

    pad_id, eos_id, bos_id = PAD_ID, EOS_ID, BOS_ID

    def __init__(self, base, tasks: RetrievalTasks, cfg: RetrievalConfig, *, seq_len: int, task_rows: int,
                 seed: int, shard_index: int = 0, num_shards: int = 1):
        check_tasks_fit(tasks, cfg.tasks, cfg.min_length, seq_len)
        self.base, self.tasks, self.cfg = base, tasks, cfg
        self.seq_len, self.seed = seq_len, seed
        self.task_rows = task_rows
        self.rows_per_shard = task_rows // num_shards
        self.first_task_row = shard_index * self.rows_per_shard
        self.vocab_path, self.vocab_size = base.vocab_path, base.vocab_size
        self.total_steps, self.steps_per_epoch = base.total_steps, base.steps_per_epoch
        self.stats = {**base.stats, "retrieval_rate": cfg.rate, "retrieval_task_rows": task_rows,
                      "retrieval_tasks": ",".join(cfg.tasks), "retrieval_min_length": cfg.min_length,
                      "retrieval_answer_weight": cfg.answer_weight, "retrieval_context_weight": cfg.context_weight,
                      "batch_size": getattr(base, "batch_size", 0) + task_rows}

    def epochs_read(self, steps: int) -> float:
        """The corpus's epochs read by the first `steps` batches."""
        reader = getattr(self.base, "epochs_read", None)
        return reader(steps) if reader is not None else steps / self.steps_per_epoch

    def task_batch(self, step: int) -> dict[str, np.ndarray]:
        """This shard's task rows of global batch `step`."""
        rows = [self.tasks.packed_row(example_rng(self.seed, step, self.first_task_row + r), self.seq_len,
                                      self.cfg.tasks, self.cfg.min_length, self.cfg.answer_weight,
                                      self.cfg.context_weight)
                for r in range(self.rows_per_shard)]
        return {k: np.stack([row[k] for row in rows]) for k in rows[0]}

    def train_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Batches `start_step`, ...: exactly what an uninterrupted run gets."""
        for step, corpus in zip(range(start_step, self.total_steps), self.base.train_batches(start_step)):
            tasks = self.task_batch(step)
            yield {k: np.concatenate([corpus[k], tasks[k].astype(corpus[k].dtype)]) for k in corpus}

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """The corpus's validation batches, each followed by `rows_per_shard` padding rows: an
        eval batch has the shape of a training batch, so it splits over the mesh's batch axes as
        one does (the corpus rows alone need not: 8 - 4 task rows on a data axis of 8), and the
        padding (zero loss weight) changes no figure."""
        for corpus in self.base.eval_batches():
            pad = empty_rows(self.rows_per_shard, corpus["inputs"].shape[1])
            yield {k: np.concatenate([corpus[k], pad[k].astype(corpus[k].dtype)]) for k in corpus}

    def __repr__(self) -> str:
        return f"RetrievalMixture({self.base!r}, task_rows={self.task_rows}, tasks={','.join(self.cfg.tasks)})"


class RetrievalData:
    """Task rows only, with the `TrainData` interface: a model trained on the retrieval tasks
    alone (the notebook's fallback, small demonstrations). Step s of a run is a function of
    (seed, s); evaluation is `eval_steps` fixed batches of task rows (the answer loss)."""

    pad_id, eos_id, bos_id = PAD_ID, EOS_ID, BOS_ID

    def __init__(self, tasks: RetrievalTasks, *, vocab_size: int, seq_len: int, batch_size: int, total_steps: int,
                 seed: int = 0, task_names: Sequence[str] = TASKS, min_length: int = 64,
                 vocab_path: str | Path | None = None, eval_steps: int = 2, shard_index: int = 0,
                 num_shards: int = 1):
        if batch_size % num_shards:
            raise ConfigError(f"batch_size ({batch_size}) must be a multiple of num_shards ({num_shards})")
        check_tasks_fit(tasks, task_names, min_length, seq_len)
        self.tasks, self.task_names, self.min_length = tasks, tuple(task_names), min_length
        self.vocab_size, self.vocab_path = vocab_size, None if vocab_path is None else Path(vocab_path)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.total_steps = self.steps_per_epoch = total_steps
        self.eval_steps = eval_steps
        self.rows_per_shard = batch_size // num_shards
        self.first_row = shard_index * self.rows_per_shard
        tokens = total_steps * batch_size * seq_len
        self.stats = {"corpus": "retrieval tasks", "retrieval_tasks": ",".join(self.task_names),
                      "unique_tokens": tokens, "total_tokens": tokens, "epochs": 1.0, "batch_size": batch_size}

    def batch(self, step: int, split: int = 0) -> dict[str, np.ndarray]:
        rows = [self.tasks.packed_row(example_rng(self.seed, split, step, self.first_row + r), self.seq_len,
                                      self.task_names, self.min_length) for r in range(self.rows_per_shard)]
        return {k: np.stack([row[k] for row in rows]) for k in rows[0]}

    def train_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        for step in range(start_step, self.total_steps):
            yield self.batch(step)

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        for step in range(self.eval_steps):
            yield self.batch(step, split=1)
