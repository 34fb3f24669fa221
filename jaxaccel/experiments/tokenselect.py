"""python -m jaxaccel.experiments tokenselect — TokenSelect's long-context retrieval (issue 10).

A model trained at <= 1,024 tokens on the default corpus mixed with synthetic retrieval tasks
(configs/longctx.yaml, `jaxaccel.data.longctx`) answers the same tasks at 1K ... 64K tokens
under five attention rules, greedy, exact match of the answer's ids:

* `full`: full attention (method autoregressive): RoPE positions past the trained length;
* `tokenselect`: TokenSelect, compact positions (the selected keys re-ranked 0..n);
* `tokenselect_original`: TokenSelect at the keys' true positions;
* `streamingllm`: the same budget spent on the first n_init and the last k + n_local keys
  (StreamingLLM, `selection="recent"`, compact positions);
* `random`: n_init + k uniformly random candidates + n_local (`selection="random"`).

Budget (`scaled_budget`): the issue's defaults (k 2048, n_init 128, n_local 512, chunk 512, for
models trained at 8K) scaled to the trained length L: k L/4, n_init L/64, n_local L/16, chunk
L/16 — a third of the trained length, as 2,688 keys are a third of Llama-3-8B's 8K (at L =
1,024: k 256, n_init 16, n_local 64, chunk 64; at L = 256: 64, 4, 16, 16). Every
attention rule is evaluated on the same examples (a pure function of seed, task, length and
index); the baselines run without the selection cache (each step selects afresh: their best).

Results: `results.json` (every cell: accuracy, per-example correctness and needle depth, time
per example), a Markdown table per task, and `accuracy-vs-length.png`. A rerun with the same
settings keeps the cells already in `results.json` (a killed run resumes where it stopped).
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from jaxaccel.data.longctx import ALL_TASKS, TASKS, RetrievalTasks, example_rng
from jaxaccel.errors import InvalidArgumentError
from jaxaccel.files import write_atomically

LENGTHS = (256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


def scaled_budget(trained_length: int) -> dict[str, Any]:
    """The paper's budget (k 2048, n_init 128, n_local 512, chunk 512 at 8K) scaled to a model
    trained at `trained_length` tokens (each at least 1)."""
    return {"k": max(1, trained_length // 4), "n_init": max(1, trained_length // 64),
            "n_local": max(1, trained_length // 16), "chunk": max(1, trained_length // 16),
            "cache_threshold": 0.9, "pool": None}

# name -> (label, generate method, options on top of the budget; None: the budget is not used)
METHODS: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    "full": ("full attention", "autoregressive", None),
    "tokenselect": ("TokenSelect (compact)", "tokenselect", {"positions": "compact"}),
    "tokenselect_original": ("TokenSelect (original positions)", "tokenselect", {"positions": "original"}),
    "streamingllm": ("StreamingLLM (init + local)", "tokenselect", {"selection": "recent", "cache_threshold": None, "pool": None}),
    "random": ("random (same budget)", "tokenselect", {"selection": "random", "cache_threshold": None, "pool": None}),
}
_SEED_TAG = 0xE7A1  # evaluation examples: a stream apart from the training rows'
RESULT_FILE = "results.json"


# ----------------------------------------------------------------------------- setup


def run_config_of(model_path: str | Path) -> Path | None:
    """The training config beside a model: `<run>/config.yaml` for a run folder or its model/."""
    path = Path(model_path)
    for folder in (path, path.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def model_tasks(lm, model_path: str | Path | None = None, max_code_tokens: int = 400_000) -> RetrievalTasks:
    """The task generator in `lm`'s vocabulary (a SentencePiece tokenizer), with held-out code
    filler: the validation split of the corpus the model was trained on (its run config's
    `data`, else the default corpus)."""
    import sentencepiece as spm

    from jaxaccel.data.config import DataConfig
    from jaxaccel.data.longctx import validation_code
    from jaxaccel.tokenizer import SentencePieceTokenizer

    if not isinstance(lm.tokenizer, SentencePieceTokenizer):
        from jaxaccel.errors import InvalidArgumentError

        raise InvalidArgumentError("the retrieval tasks need the model's SentencePiece tokenizer (tokenizer.model "
                                   "in the model folder); this model has "
                                   + ("none" if lm.tokenizer is None else type(lm.tokenizer).__name__))
    data_cfg = DataConfig()
    config = run_config_of(model_path) if model_path is not None else None
    if config is not None:
        from jaxaccel.config import build
        from jaxaccel.train.config import RunConfig

        data_cfg = build(RunConfig, config).data
    proto = lm.tokenizer.path.read_bytes()
    code = validation_code(data_cfg.corpus, data_cfg.validation_buckets,
                           spm.SentencePieceProcessor(model_proto=proto).encode, max_code_tokens, data_cfg.text_field)
    return RetrievalTasks.from_sentencepiece(proto, code)


def method_options(method: str, budget: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(lm.generate method, its options) of an attention rule."""
    _, generate_method, extra = METHODS[method]
    if extra is None:
        return generate_method, {}
    return generate_method, {**budget, **extra}


def examples_for(tasks: RetrievalTasks, task: str, length: int, n: int, seed: int):
    return [tasks.example(task, length, example_rng(seed, _SEED_TAG, ALL_TASKS.index(task), length, i)) for i in range(n)]


# ----------------------------------------------------------------------------- the run


def evaluate(lm, tasks: RetrievalTasks, *, lengths: Sequence[int] = LENGTHS, task_names: Sequence[str] = TASKS,
             methods: Sequence[str] = tuple(METHODS), examples: int = 10, budget: dict[str, Any] | None = None,
             batch: int = 4, seed: int = 0, full_max_length: int | None = None, out: str | Path | None = None,
             model: str = "", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Accuracy of every (method, task, length) cell; with `out`, results.json is rewritten
    after every cell and its finished cells are kept when the settings match."""
    from jaxaccel.bench.common import machine

    budget = {**scaled_budget(lm.config.max_seq_len), **(budget or {})}
    settings = {"model": model, "trained_length": lm.config.max_seq_len, "examples": examples, "seed": seed,
                "budget": budget, "batch": batch}
    results: dict[str, Any] = {"experiment": "tokenselect", "settings": settings, "machine": machine(),
                               "lengths": list(lengths), "tasks": list(task_names), "methods": list(methods),
                               "labels": {m: METHODS[m][0] for m in methods}, "cells": []}
    done: dict[tuple, dict] = {}
    path = Path(out) / RESULT_FILE if out is not None else None
    if path is not None and path.exists():
        try:
            old = json.loads(path.read_bytes())
        except (OSError, UnicodeDecodeError, ValueError):
            old = None
        if not isinstance(old, dict) or old.get("experiment") != "tokenselect":
            raise InvalidArgumentError(f"{path} is not this experiment's results file; choose another output folder")
        if old.get("settings") != settings:  # never overwrite another run's cells
            changed = sorted(k for k in {*settings, *(old.get("settings") or {})}
                             if settings.get(k) != (old.get("settings") or {}).get(k))
            raise InvalidArgumentError(f"{path} holds a run with other settings ({', '.join(changed)}); choose "
                                       f"another output folder, or move that file away to start again")
        # a cell skipped for --full-max-length is not a result: computed when the rerun allows it
        done = {(c["method"], c["task"], c["length"]): c for c in old.get("cells", []) if "skipped" not in c}
        # Cells of lengths, tasks or methods this run does not select stay in the file (a rerun
        # with other --lengths used to drop them); the file's lists become the union.
        selected = {(m, t, n) for n in lengths for t in task_names for m in methods}
        results["cells"] = [c for c in old.get("cells", []) if (c["method"], c["task"], c["length"]) not in selected]
        results["lengths"] = sorted({*old.get("lengths", []), *lengths})
        results["tasks"] = list(dict.fromkeys([*old.get("tasks", []), *task_names]))
        results["methods"] = list(dict.fromkeys([*old.get("methods", []), *methods]))
        results["labels"] = {m: METHODS[m][0] if m in METHODS else m for m in results["methods"]}
        log(f"{path}: {len(done)} finished cells kept"
            + (f", and {len(results['cells'])} of other lengths, tasks or methods" if results["cells"] else ""))

    def save() -> None:
        if path is not None:
            write_atomically(path, json.dumps(results, indent=1))  # a kill mid-write keeps the cells before

    for length in lengths:
        for task in task_names:
            batch_examples = None
            for method in methods:
                key = (method, task, length)
                if key in done:
                    results["cells"].append(done[key])
                    continue
                if method == "full" and full_max_length is not None and length > full_max_length:
                    results["cells"].append({"method": method, "task": task, "length": length, "accuracy": None,
                                             "skipped": f"longer than --full-max-length {full_max_length}"})
                    save()
                    continue
                if batch_examples is None:
                    batch_examples = examples_for(tasks, task, length, examples, seed)
                cell = run_cell(lm, method, task, length, batch_examples, budget, batch)
                log(f"{length:>6} {task:<12} {METHODS[method][0]:<34} {cell['accuracy'] * 100:5.1f}% "
                    f"({cell['seconds_per_example']:.1f} s/example)")
                results["cells"].append(cell)
                save()
    results["summary"] = summary(results)
    save()
    return results


def run_cell(lm, method: str, task: str, length: int, examples, budget: dict[str, Any], batch: int) -> dict[str, Any]:
    generate_method, options = method_options(method, budget)
    correct, hits, lookups, cached = [], 0, 0, False
    t0 = time.perf_counter()
    for i in range(0, len(examples), batch):
        group = examples[i:i + batch]
        with warnings.catch_warnings():  # positions past the trained length are the point here
            warnings.filterwarnings("ignore", message=".*past the model's maximum length.*")
            out = lm.generate([e.prompt for e in group], max_new_tokens=max(e.answer_len for e in group),
                              method=generate_method, temperature=0.0, **options)
        correct += [got[:e.answer_len] == e.answer for got, e in zip(out.tokens, group)]
        hits += int(out.stats.get("selection_cache_hits") or 0)  # the cell's rate: hits / lookups over
        lookups += int(out.stats.get("selection_lookups") or 0)  # all its batches, a short last one too
        cached |= out.stats.get("selection_cache_hit_rate") is not None  # (the baselines have no cache)
    seconds = time.perf_counter() - t0
    return {"method": method, "task": task, "length": length, "examples": len(examples),
            "correct": int(sum(correct)), "accuracy": float(np.mean(correct)),
            "per_example": [bool(c) for c in correct],
            "depths": [round(e.depth, 4) for e in examples], "seconds_per_example": seconds / len(examples),
            "selection_cache_hit_rate": hits / lookups if lookups and cached else None}


# ----------------------------------------------------------------------------- reading the results


def accuracy_table(results: dict[str, Any]) -> dict[str, dict[str, dict[int, float | None]]]:
    """{task or "mean": {method: {length: accuracy}}}; the mean over tasks needs every task."""
    table: dict[str, dict[str, dict[int, float | None]]] = {}
    for c in results["cells"]:
        table.setdefault(c["task"], {}).setdefault(c["method"], {})[c["length"]] = c["accuracy"]
    mean: dict[str, dict[int, float | None]] = {}
    for method in results["methods"]:
        for length in results["lengths"]:
            accs = [table.get(t, {}).get(method, {}).get(length) for t in results["tasks"]]
            mean.setdefault(method, {})[length] = float(np.mean(accs)) if all(a is not None for a in accs) else None
    table["mean"] = mean
    return table


def _length_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def markdown(results: dict[str, Any]) -> str:
    table = accuracy_table(results)
    s = results["settings"]
    b = s["budget"]
    lines = [f"Retrieval accuracy (%, greedy exact match, {s['examples']} examples per cell) of "
             f"{s['model'] or 'the model'} trained at {s['trained_length']} tokens; budget k={b['k']}, "
             f"n_init={b['n_init']}, n_local={b['n_local']}"
             f" ({b['k'] + b['n_init'] + b['n_local']} keys), chunk {b['chunk']}, selection cache "
             f"{b['cache_threshold']} (TokenSelect only)"
             + (f", scores max-pooled over {b['pool']} keys." if b.get("pool") else ".")]
    for task in [*results["tasks"], "mean"]:
        lines += ["", f"**{task}**" if task != "mean" else "**mean over tasks**", "",
                  "| method | " + " | ".join(_length_label(n) for n in results["lengths"]) + " |",
                  "|---|" + "---|" * len(results["lengths"])]
        for method in results["methods"]:
            row = table.get(task, {}).get(method, {})
            cells = [f"{row[n] * 100:.0f}" if row.get(n) is not None else "—" for n in results["lengths"]]
            lines.append(f"| {results['labels'][method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(results: dict[str, Any]) -> list[str]:
    """The issue's targets, one line each (mean over tasks)."""
    mean = accuracy_table(results)["mean"]
    trained = results["settings"]["trained_length"]
    lengths = results["lengths"]
    out = []
    base_len = min((n for n in lengths if n >= trained), default=None)
    far = 16 * trained if 16 * trained in lengths else None
    ts = mean.get("tokenselect", {})
    if base_len is not None and far is not None and ts.get(base_len) is not None and ts.get(far) is not None:
        kept = ts[far] / ts[base_len] if ts[base_len] else float("nan")
        out.append(f"TokenSelect at {_length_label(far)} (16x the trained length): {ts[far] * 100:.0f}% vs "
                   f"{ts[base_len] * 100:.0f}% at {_length_label(base_len)}, {kept * 100:.0f}% kept (target >= 90%): "
                   f"{'met' if kept >= 0.9 else 'not met'}")
    full = mean.get("full", {})
    if far is not None and full.get(far) is not None:
        out.append(f"full attention at {_length_label(far)}: {full[far] * 100:.0f}% (target < 30%): "
                   f"{'met' if full[far] < 0.3 else 'not met'}")
    b = results["settings"]["budget"]
    window = b["k"] + b["n_init"] + b["n_local"]
    beyond = [mean.get("streamingllm", {}).get(n) for n in lengths if n > 2 * window]
    beyond = [a for a in beyond if a is not None]
    if beyond:
        out.append(f"StreamingLLM beyond twice its {window}-key window: mean {np.mean(beyond) * 100:.0f}% "
                   f"(expected: retrieval fails)")
    return out


def plot(results: dict[str, Any], out: str | Path) -> list[Path]:
    from jaxaccel.experiments.plots import _pyplot

    plt = _pyplot()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = accuracy_table(results)
    panels = [*results["tasks"], "mean"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), sharey=True, squeeze=False)
    styles = {"full": "k-o", "tokenselect": "C0-o", "tokenselect_original": "C0--s", "streamingllm": "C3:^",
              "random": "C2-.v"}
    lengths = results["lengths"]
    for ax, task in zip(axes[0], panels):
        for method in results["methods"]:
            row = table.get(task, {}).get(method, {})
            xs = [n for n in lengths if row.get(n) is not None]
            ax.plot(xs, [row[n] * 100 for n in xs], styles.get(method, "-o"), label=results["labels"][method])
        ax.axvline(results["settings"]["trained_length"], color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [_length_label(n) for n in lengths])
        ax.set(title=task if task != "mean" else "mean over tasks", xlabel="context (tokens)", ylim=(-3, 103))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = out / "accuracy-vs-length.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def write_report(results: dict[str, Any], out: str | Path) -> list[Path]:
    """results.json, results.md and the plot in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / RESULT_FILE, json.dumps(results, indent=1))
    write_atomically(out / "results.md", markdown(results) + "\n\n" + "\n".join(f"- {s}" for s in results.get(
        "summary", summary(results))) + "\n")
    return [out / RESULT_FILE, out / "results.md", *plot(results, out)]
