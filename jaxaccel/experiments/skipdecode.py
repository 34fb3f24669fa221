"""python -m jaxaccel.experiments skipdecode — SkipDecode's quality/speed trade-off (issue 9).

One command: fine-tune the deep model (configs/deep.yaml, `--base`) under the schedule for
each speedup (configs/skipdecode-{S}x.yaml; 1x = the same fine-tune without skipping, the
quality reference), fine-tune the plain shallower baselines (the base's first N layers,
N = the schedule's mean layer count, configs/skipdecode-1x.yaml with model.n_layers=N), then
evaluate, on held-out (validation-split) corpus files:

* quality of the generated part: perplexity and next-token accuracy, teacher forced, of the
  tokens after a `prompt_tokens` prefix (the schedule applied per token, exactly as decoding
  runs it), and agreement of greedy continuations with the full fine-tuned model's;
* speed: decode tokens/s at batch 1 and 8, each speedup's model with `skipdecode` vs the full
  model with `autoregressive`;
* at each speedup three models at the same mean layer count: SkipDecode (fine-tuned with the
  schedule), the base model run with the schedule without fine-tuning, the shallower model.

Fine-tunes already finished are reused, killed ones resume (the trainer's own checkpoints).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.errors import ConfigError, InvalidArgumentError
from jaxaccel.model.options import ExecutionPlan
from jaxaccel.model.skip import SkipSchedule

SPEEDUPS = (1, 2, 3, 5)


# ----------------------------------------------------------------------------- evaluation


def heldout_rows(data_cfg, seq_len: int, n_rows: int, model=None) -> np.ndarray:
    """[<= n_rows, seq_len + 1] token ids from the validation-split documents: consecutive
    non-overlapping windows, the first window of every document first (a file's start, BOS
    included: the prompts for generation), then the later ones. With `model` (a loaded
    LanguageModel scored on them), the data's vocabulary must be the model's: a one-line
    InvalidArgumentError otherwise (the rows would be ids of another vocabulary)."""
    from jaxaccel.data.corpus import open_corpus
    from jaxaccel.data.pipeline import build_data
    from jaxaccel.tokenizer import SentencePieceTokenizer

    data = build_data(data_cfg, seq_len=seq_len, batch_size=8)
    tok = SentencePieceTokenizer(data.vocab_path)
    if model is not None:
        check_same_vocabulary(model, tok)
    windows: list[list[list[int]]] = []
    for doc in open_corpus(data_cfg.corpus, data_cfg.text_field).documents("validation",
                                                                          data_cfg.validation_buckets):
        ids = ([data.bos_id] if data.bos_id is not None else []) + tok.encode(doc.text)
        windows.append([ids[i:i + seq_len + 1] for i in range(0, len(ids) - seq_len, seq_len + 1)])
    rows = [w[k] for k in range(max(map(len, windows), default=0)) for w in windows if k < len(w)][:n_rows]
    if not rows:
        raise ValueError(f"no validation document of {seq_len + 1} tokens")
    return np.asarray(rows, np.int32)


def check_same_vocabulary(lm, data_tokenizer) -> None:
    """The data config's vocabulary (`data_tokenizer`) is the one `lm` was trained with: the
    same pieces under the same ids (a model without a tokenizer: its embedding table covers
    the ids). Pieces, not `decode.lm`'s draft check (the ids of a probe text): the model's
    tokenizer prepends BOS and the data's does not, which is no other vocabulary."""
    n = data_tokenizer.vocab_size
    tok = lm.tokenizer
    if tok is None:
        same = lm.config.vocab_size >= n
    else:
        same = tok.vocab_size == n and all(tok.piece(i) == data_tokenizer.piece(i) for i in range(n))
    if not same:
        theirs = f"{tok.vocab_size} pieces" if tok is not None else f"an embedding table of {lm.config.vocab_size}"
        raise InvalidArgumentError(
            f"the data config's vocabulary ({n} pieces) is not the model's ({theirs}): its held-out text would be "
            f"scored in another vocabulary's ids; pass the --config the model was trained with")


def teacher_forced(params, config, rows: np.ndarray, prompt_tokens: int, schedule: SkipSchedule | None,
                   batch: int = 8) -> dict[str, float]:
    """Cross entropy and accuracy of the tokens after `prompt_tokens`, teacher forced; with a
    schedule each token runs the layers decoding would give it (`SkipSchedule.token_active`)."""
    from jaxaccel.model.transformer import forward

    @jax.jit
    def score(params, x, y):
        plan = None
        if schedule is not None:
            pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape)
            plan = ExecutionPlan(active=schedule.token_active(pos, jnp.full((x.shape[0],), prompt_tokens)))
        logits, _ = forward(params, config, x, plan=plan)
        logp = jax.nn.log_softmax(logits[:, prompt_tokens - 1:], -1)
        target = y[:, prompt_tokens - 1:]
        ce = -jnp.take_along_axis(logp, target[..., None], -1)[..., 0]
        return ce.sum(), (jnp.argmax(logp, -1) == target).sum(), ce.size

    ce, correct, n = 0.0, 0, 0
    for i in range(0, len(rows), batch):
        chunk = jnp.asarray(rows[i:i + batch])
        c, k, m = score(params, chunk[:, :-1], chunk[:, 1:])
        ce, correct, n = ce + float(c), correct + int(k), n + int(m)
    return {"loss": ce / n, "perplexity": math.exp(ce / n), "accuracy": correct / n, "tokens": n}


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict[str, float]:
    """Token-level agreement of two sets of greedy continuations: the fraction of positions
    with the same token, and the mean length of the common prefix."""
    same, total, prefix = 0, 0, []
    for a, b in zip(reference, other):
        n = min(len(a), len(b))
        eq = [x == y for x, y in zip(a[:n], b[:n])]
        same, total = same + sum(eq), total + max(len(a), len(b))
        prefix.append(eq.index(False) if False in eq else n)
    return {"token_agreement": same / max(total, 1), "common_prefix": float(np.mean(prefix))}


def shallow_layers(schedule: SkipSchedule, span: int) -> int:
    """The plain baseline's depth for a schedule: its mean layer count, rounded half up
    (ties go to the baseline)."""
    return max(1, int(math.floor(schedule.mean_layers(span) + 0.5)))


# ----------------------------------------------------------------------------- the run


def fine_tune(config_path: Path, output_dir: Path, base: str, overrides: Sequence[str] = (),
              log: Callable[[str], None] = print) -> Path:
    """Train (or resume, or reuse) one fine-tune; -> its model folder."""
    from jaxaccel.config import build
    from jaxaccel.train.config import RunConfig
    from jaxaccel.train.loop import train

    model_dir = output_dir / "model"
    if "://" not in base:  # runs/deep/ and runs/deep are one base (a reused fine-tune compares it)
        base = os.path.normpath(base)
    cfg = build(RunConfig, config_path, [f"train.init_from={base}", f"output_dir={output_dir}",
                                         "train.progress=false", *overrides])
    if (model_dir / "jaxaccel.json").is_file():  # reused only if it is this fine-tune (base, schedule, steps...)
        from jaxaccel.config import parse_yaml, to_dict
        from jaxaccel.experiments.results import SweepError
        from jaxaccel.experiments.runner import config_differences

        try:
            saved = parse_yaml((output_dir / "config.yaml").read_bytes(), str(output_dir / "config.yaml"))
        except (OSError, ConfigError):
            saved = None
        train_saved = saved.get("train") if isinstance(saved, dict) else None
        if isinstance(train_saved, dict) and isinstance(train_saved.get("init_from"), str) and \
                "://" not in train_saved["init_from"]:  # written before bases were normalised
            saved = {**saved, "train": {**train_saved, "init_from": os.path.normpath(train_saved["init_from"])}}
        diff = config_differences(saved, to_dict(cfg)) if isinstance(saved, dict) else [("config.yaml", None, None)]
        if diff:
            key, have, want = diff[0]
            what = (f"{key} is {have!r} there, {want!r} now" if key != "config.yaml"
                    else "it has no readable config.yaml")
            raise SweepError(f"{output_dir} holds a fine-tune made with other settings ({what}); move it away or "
                             f"give --root another folder")
        return model_dir
    log(f"fine-tuning {output_dir} ({config_path} {' '.join(overrides)})")
    train(cfg)
    return model_dir


def run(base: str = "runs/deep", root: str = "runs/skipdecode", configs: str = "configs",
        speedups: Sequence[float] = SPEEDUPS, prompt_tokens: int = 64, max_length: int = 256, eval_rows: int = 64,
        files: int = 8, batches: Sequence[int] = (1, 8), runs: int = 3, dispatch: str = "cond",
        log: Callable[[str], None] = print) -> dict[str, Any]:
    import jaxaccel
    from jaxaccel.bench.common import machine
    from jaxaccel.bench.spec import run_method
    from jaxaccel.config import build
    from jaxaccel.train.config import RunConfig

    configs_dir, root_dir = Path(configs), Path(root)
    if 1 not in speedups:
        speedups = (1, *speedups)
    cfg1 = build(RunConfig, configs_dir / "skipdecode-1x.yaml")
    n_layers, span = cfg1.model.n_layers, max_length - prompt_tokens
    schedules = {s: SkipSchedule.for_speedup(n_layers, s, max_length=max_length) for s in speedups}
    for s in speedups:  # evaluate under exactly the schedule each model is fine-tuned with
        trained = build(RunConfig, configs_dir / f"skipdecode-{s:g}x.yaml").skip_schedule()
        if s != 1 and (trained is None or trained[0] != schedules[s]):
            raise ConfigError(f"configs/skipdecode-{s:g}x.yaml does not fine-tune under {schedules[s].describe()} "
                             f"(max_length {max_length}); pass --max-length to match it")
    models = {s: fine_tune(configs_dir / f"skipdecode-{s:g}x.yaml", root_dir / f"{s:g}x", base, log=log)
              for s in speedups}
    shallow = {}
    for s in speedups:
        if s == 1:
            continue
        n = shallow_layers(schedules[s], span)
        shallow[s] = (n, fine_tune(configs_dir / "skipdecode-1x.yaml", root_dir / f"shallow-{n}layers", base,
                                   [f"model.n_layers={n}"], log=log))

    base_lm = jaxaccel.load(base)
    full = jaxaccel.load(str(models[1]))
    rows = heldout_rows(cfg1.data, max_length, eval_rows)
    prompts = [r[:prompt_tokens].tolist() for r in rows[:files]]
    new_tokens = span

    def greedy(lm, **kw) -> list[list[int]]:
        out = lm.generate(prompts, max_new_tokens=new_tokens, **kw)
        return out.tokens

    reference = greedy(full)

    def speed(lm, method: str, **kw) -> dict[str, dict[str, float]]:
        """End to end (prefill included) and of the decode loop alone, per batch size."""
        out = {"tokens_per_s": {}, "decode_phase_tokens_per_s": {}}
        for b in batches:
            r = run_method(lm, prompts, b, new_tokens, runs, method, 0.0, **kw)
            for k in out:
                out[k][f"batch{b}"] = r[k]
        return out

    log("speed: the full model")
    full_speeds = speed(full, "autoregressive")
    full_speed, full_phase = full_speeds["tokens_per_s"], full_speeds["decode_phase_tokens_per_s"]
    results: dict[str, Any] = {
        "machine": machine(), "base": base, "n_layers": n_layers, "prompt_tokens": prompt_tokens,
        "max_length": max_length, "new_tokens": new_tokens, "eval_rows": int(len(rows)),
        "eval_tokens_per_row": span + 1, "files": len(prompts), "runs": runs, "dispatch": dispatch,
        "full": {"model": str(models[1]), **teacher_forced(full.params, full.config, rows, prompt_tokens, None),
                 **full_speeds},
        "speedups": []}
    for s in speedups:
        if s == 1:
            continue
        sch = schedules[s]
        opts = dict(method="skipdecode", speedup=s, max_length=max_length, dispatch=dispatch)
        log(f"speedup {s:g}: {sch.describe()}")
        lm = jaxaccel.load(str(models[s]))
        n, shallow_dir = shallow[s]
        sh = jaxaccel.load(str(shallow_dir))
        row = {"speedup": s, "schedule": sch.describe(), "max_layers": sch.max_layers, "min_layers": sch.min_layers,
               "mean_layers": sch.mean_layers(span), "layers_per_step": sch.layers_np(np.arange(span), span).tolist()}
        row["skipdecode"] = {"model": str(models[s]),
                             **teacher_forced(lm.params, lm.config, rows, prompt_tokens, sch),
                             **agreement(reference, greedy(lm, **opts)),
                             **speed(lm, "skipdecode", speedup=s, max_length=max_length, dispatch=dispatch)}
        row["no_finetune"] = {"model": base,
                              **teacher_forced(base_lm.params, base_lm.config, rows, prompt_tokens, sch),
                              **agreement(reference, greedy(base_lm, **opts))}
        row["shallow"] = {"model": str(shallow_dir), "n_layers": n,
                          **teacher_forced(sh.params, sh.config, rows, prompt_tokens, None),
                          **agreement(reference, greedy(sh)), **speed(sh, "autoregressive")}
        for b in batches:
            k = f"batch{b}"
            for name in ("skipdecode", "shallow"):
                row[name][f"speedup_{k}"] = row[name]["tokens_per_s"][k] / full_speed[k]
                row[name][f"decode_phase_speedup_{k}"] = row[name]["decode_phase_tokens_per_s"][k] / full_phase[k]
        ppl = results["full"]["perplexity"]
        for name in ("skipdecode", "no_finetune", "shallow"):
            row[name]["perplexity_rise"] = row[name]["perplexity"] / ppl - 1
        row["skipdecode_best"] = all(row["skipdecode"]["perplexity"] < row[o]["perplexity"]
                                     for o in ("no_finetune", "shallow"))
        results["speedups"].append(row)
    return results


# ----------------------------------------------------------------------------- report


def plot(results: dict[str, Any], out: str | Path) -> list[Path]:
    from jaxaccel.experiments.plots import _pyplot, save_figure

    plt = _pyplot()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = results["speedups"]
    full, n_layers = results["full"], results["n_layers"]
    # each point at its own nominal speedup: a schedule's layers over its mean layers per token
    # (the 5x request reaches 4.8x), a shallow model's layers over its own
    xs = {"skipdecode": [1] + [n_layers / r["mean_layers"] for r in rows],
          "shallow": [1] + [n_layers / r["shallow"]["n_layers"] for r in rows]}
    xs["no_finetune"] = xs["skipdecode"]
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, style in (("skipdecode", "o-"), ("no_finetune", "s--"), ("shallow", "^:")):
        axes[0].plot(xs[name], [full["perplexity"]] + [r[name]["perplexity"] for r in rows], style, label=name)
        axes[1].plot(xs[name], [1.0] + [r[name]["token_agreement"] for r in rows], style, label=name)
    axes[0].set(xlabel="nominal speedup (layers / mean layers per token)", ylabel="perplexity (generated part)",
                yscale="log", title="quality vs speedup")
    axes[1].set(xlabel="nominal speedup", ylabel="greedy agreement with the full model",
                title="agreement vs speedup")
    paths.append(save_figure(plt, fig, axes, out / "quality-vs-speedup.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    span = results["new_tokens"]
    ax.plot(range(span), [results["n_layers"]] * span, label="1x (full)")
    for r in rows:
        ax.plot(range(span), r["layers_per_step"], label=f"{r['speedup']:g}x: {r['max_layers']} -> {r['min_layers']}")
    ax.set(xlabel="generated token t", ylabel="layers run", title=f"SkipDecode schedules ({results['n_layers']} layers)")
    paths.append(save_figure(plt, fig, [ax], out / "layers-per-step.png"))
    return paths


def markdown(results: dict[str, Any]) -> str:
    full = results["full"]
    bs = sorted(full["tokens_per_s"])
    phase = "decode_phase_tokens_per_s" in full  # results written before it have end-to-end figures only
    head = ("| speedup | model | layers | perplexity | rise vs full | accuracy | greedy agreement | common prefix | "
            + " | ".join(f"tok/s {b}" for b in bs) + " | " + " | ".join(f"vs full ({b})" for b in bs)
            + "".join(f" | decode loop vs full ({b})" for b in bs if phase) + " |")
    lines = [head, "|" + "---|" * (8 + (3 if phase else 2) * len(bs))]

    def line(s, name, m, layers):
        speeds = m.get("tokens_per_s", {})
        cells = [f"{speeds[b]:.0f}" if b in speeds else "—" for b in bs]
        ratios = [f"{speeds[b] / full['tokens_per_s'][b]:.2f}x" if b in speeds else "—" for b in bs]
        loop = m.get("decode_phase_tokens_per_s", {})
        ratios += [f"{loop[b] / full['decode_phase_tokens_per_s'][b]:.2f}x" if b in loop else "—"
                   for b in bs if phase]
        agree = m.get("token_agreement", 1.0)
        prefix = m.get("common_prefix", float(results["new_tokens"]))
        return (f"| {s} | {name} | {layers} | {m['perplexity']:.3f} | {m.get('perplexity_rise', 0) * 100:+.1f}% | "
                f"{m['accuracy']:.3f} | {agree:.3f} | {prefix:.1f} | " + " | ".join(cells + ratios) + " |")

    lines.append(line("1x", "full (fine-tuned, autoregressive)", full, results["n_layers"]))
    for r in results["speedups"]:
        s = f"{r['speedup']:g}x"
        lines.append(line(s, "**SkipDecode**", r["skipdecode"], f"{r['max_layers']}→{r['min_layers']} "
                                                                f"(mean {r['mean_layers']:.2f})"))
        lines.append(line(s, "schedule, no fine-tune", r["no_finetune"], "same"))
        lines.append(line(s, "shallow model", r["shallow"], r["shallow"]["n_layers"]))
    return "\n".join(lines)


def summary(results: dict[str, Any]) -> list[str]:
    """The issue's targets, one line each."""
    out = []
    bs = sorted(results["full"]["tokens_per_s"])
    for r in results["speedups"]:
        sd = r["skipdecode"]
        speeds = ", ".join(f"{sd[f'speedup_{b}']:.2f}x at {b}" for b in bs)
        phase = ", ".join(f"{sd[f'decode_phase_speedup_{b}']:.2f}x" for b in bs if f"decode_phase_speedup_{b}" in sd)
        speeds += f" (decode loop alone: {phase})" if phase else ""
        out.append(f"{r['speedup']:g}x: perplexity {sd['perplexity_rise'] * 100:+.1f}% vs full, tokens/s {speeds}; "
                   f"beats both baselines: {'yes' if r['skipdecode_best'] else 'no'}")
    return out
