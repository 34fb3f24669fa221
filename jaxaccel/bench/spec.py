"""Speculative decoding: autoregressive vs prompt lookup vs Token Recycling on one model.

For each batch size and temperature, every method decodes the same prompts with the same
compiled-once functions; reported per method: tokens/s (median over runs of the whole prompt
set), mean accepted tokens per target forward (MAT, bonus token counted, as Spec-Bench), and
speedup over autoregressive measured in the same run. Also: the cost of one verification
forward against tree size (the CPU's compute roof makes big trees expensive), a sweep over
Token Recycling templates, and Hugging Face transformers' prompt-lookup `generate` on the
same weights (batch 1, greedy; peers extra).

Prompts: the first `prompt_tokens` tokens of held-out (validation-split) files of the default
corpus, plus a few long natural-language prompts. EOS is disabled so every row decodes
exactly `new_tokens` tokens.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jaxaccel.bench.common import machine

NATURAL_PROMPTS = [
    "The history of computing is a story of abstraction. Early machines were programmed by rewiring "
    "plugboards; later, stored programs let the same hardware run any sequence of instructions. Assembly "
    "languages gave names to those instructions, and high-level languages hid the machine almost entirely. "
    "Each layer made programmers more productive, but each also added a cost that someone had to pay. In this "
    "essay we look at where that cost went, and why",
    "Dear members of the committee,\n\nThank you for the opportunity to present our annual report. This year the "
    "library extended its opening hours, digitised the remaining parish records and began a reading programme "
    "for children in the eastern districts. Attendance grew by eleven percent, and the volunteer group doubled "
    "in size. The sections below describe the budget, the building works and the plans for next year. First,",
    "Instructions for assembling the bookshelf. Before you begin, check that the box contains two side panels, "
    "four shelves, one back panel, sixteen wooden dowels, sixteen cam locks and a hex key. Lay the side panels "
    "flat on a soft surface with the pre-drilled holes facing up. Insert the wooden dowels into the holes along "
    "the edges. Then take the first shelf and",
]

SWEEP = ((1, 1), (2, 1), (1, 1, 1), (1, 1, 1, 1), (2, 1, 1), (2, 2, 1), (1,) * 7, (3, 2, 1, 1), (3, 3, 2, 1),
         (4, 4, 3, 2, 1), (6, 8, 6, 4, 2, 1), (8, 12, 12, 8, 4, 2), "paper")


def heldout_prompts(lm, n_files: int, prompt_tokens: int) -> list[list[int]]:
    """The first `prompt_tokens` tokens of the first `n_files` validation-split documents of
    the default corpus that are at least twice that long."""
    from jaxaccel.data.config import DataConfig
    from jaxaccel.data.corpus import open_corpus

    cfg = DataConfig()
    prompts = []
    for doc in open_corpus(cfg.corpus).documents("validation", cfg.validation_buckets):
        ids = lm.tokenizer.encode(doc.text)
        if len(ids) >= 2 * prompt_tokens:
            prompts.append(ids[:prompt_tokens])
        if len(prompts) == n_files:
            break
    return prompts


def check_prompts(prompts: list[list[int]], heldout: int, prompt_tokens: int, batches: Sequence[int]) -> None:
    """Before any timing: at least one held-out file long enough for a prompt, and at least
    one full group of prompts at every batch size (InvalidArgumentError otherwise)."""
    from jaxaccel.errors import InvalidArgumentError

    if heldout == 0:
        raise InvalidArgumentError(f"no held-out file of the default corpus is at least {2 * prompt_tokens} tokens "
                                   f"long (twice --prompt-tokens {prompt_tokens}): use fewer --prompt-tokens")
    if max(batches) > len(prompts):
        raise InvalidArgumentError(f"batch {max(batches)} needs at least {max(batches)} prompts, but there are "
                                   f"{len(prompts)} ({heldout} held-out files at least {2 * prompt_tokens} tokens long"
                                   f"{' + natural-language prompts' if len(prompts) > heldout else ''}): use smaller "
                                   f"--batches or more --files")


def run_method(lm, prompts: list[list[int]], batch: int, new_tokens: int, runs: int, method: str,
               temperature: float, **opts) -> dict[str, Any]:
    """Decode the prompts in groups of `batch` (compiled once per group shape); the median of
    `runs` passes over the prompt set. Only full groups run: a last partial group (fewer
    than `batch` prompts) is not decoded at this batch size; `prompts_decoded` says how many
    (the first ones) were."""
    from jaxaccel.errors import InvalidArgumentError

    full = len(prompts) // batch
    if full == 0:
        raise InvalidArgumentError(f"batch {batch} needs at least {batch} prompts, got {len(prompts)}")
    groups = [prompts[i * batch:(i + 1) * batch] for i in range(full)]
    for g in groups[:1]:
        lm.generate(g, max_new_tokens=new_tokens, method=method, temperature=temperature, **opts)  # compile
    rates, loop_rates, total_tokens, total_forwards = [], [], 0, 0
    compile_s = 0.0
    for r in range(runs):
        lm._method_memory.clear()  # hot start carries over the prompts of one pass, not across passes
        elapsed, loop, tokens = 0.0, 0.0, 0
        for i, g in enumerate(groups):
            # the wall clock around the call, as transformers' generate is timed (host setup and
            # result conversion included; decode_s alone left out 1-3% of the call), compiling
            # (a group shape first met in a timed pass) excluded
            t0 = time.perf_counter()
            out = lm.generate(g, max_new_tokens=new_tokens, method=method, temperature=temperature, seed=100 * r + i,
                              **opts)
            elapsed += time.perf_counter() - t0 - out.stats["compile_s"]
            compile_s += out.stats["compile_s"]
            loop += out.stats["decode_s"] - out.stats["prefill_s"]
            tokens += out.stats["new_tokens"]
            total_forwards += out.stats["row_forwards"]
        total_tokens += tokens
        rates.append(tokens / elapsed)  # each pass's own count: with EOS (sampling) passes differ
        if loop > 0:  # a pass whose clock saw no decode loop has no loop rate
            loop_rates.append(tokens / loop)
    return {"tokens_per_s": statistics.median(rates), "runs_tokens_per_s": rates,
            "mat": total_tokens / total_forwards,
            "decode_phase_tokens_per_s": statistics.median(loop_rates) if loop_rates else None,
            "new_tokens": total_tokens // runs, "recompiled_s": compile_s,
            "prompts_decoded": full * batch, "prompts_total": len(prompts)}


def decoded_note(rows: Sequence[dict[str, Any]], heldout: int | None = None) -> str:
    """One sentence per batch size at which a pass decodes fewer than all prompts (the last,
    partial group is not run), naming which were left out; "" when every row ran them all.
    heldout: how many of the prompts (the first ones) are held-out files, the rest natural."""
    out = []
    for batch in sorted({r["batch"] for r in rows}):
        r = next(r for r in rows if r["batch"] == batch)
        done, total = r.get("prompts_decoded"), r.get("prompts_total")
        if done is None or done >= total:
            continue
        left = total - done
        if heldout is None:
            which = f"the last {left}"
        else:  # prompts are the held-out files, then the natural-language prompts
            natural_left, files_left = min(left, total - heldout), max(0, heldout - done)
            kinds = [(files_left, "held-out file"), (natural_left, "natural-language prompt")]
            which = " and ".join(f"{n} {kind}{'s' * (n != 1)}" for n, kind in kinds if n)
        out.append(f"At batch {batch} a pass decodes the first {done} of the {total} prompts ({done // batch} "
                   f"group{'s' * (done // batch != 1)} of {batch}); the last partial group ({which}) is not run at "
                   f"that batch size.")
    return " ".join(out)


def verification_cost(lm, sizes: Sequence[int], prefix: int = 512, reps: int = 16, runs: int = 5) -> list[dict]:
    """Seconds per verification forward (batch 1, a chain-shaped tree of N nodes over a
    `prefix`-token cache), timed inside one jitted loop of `reps` forwards."""
    from jaxaccel.decode import tuning

    cfg = lm.config
    rows = []
    base = None
    for n in sizes:
        cache = lm.handle.init_cache(1, prefix + n + 16)
        attention = tuning.tree_attention_policy(cfg, n, prefix + n + 16, sharded=False)

        def loop(model, cache):
            mask = jnp.tril(jnp.ones((1, n, n), bool))
            tokens = jnp.zeros((1, n), jnp.int32)
            plen = jnp.full((1,), prefix, jnp.int32)
            pos = plen[:, None] + jnp.arange(n)[None]

            def body(i, carry):  # the logits are summed so that nothing is dead code
                c, total = carry
                logits, c = model.forward(tokens, pos, cache=c, write_slots=pos, prefix_len=plen, new_mask=mask,
                                          attention=attention)
                return c, total + logits[0, 0, 0]

            return jax.lax.fori_loop(0, reps, body, (cache, jnp.float32(0)))

        fn = jax.jit(loop).lower(lm.handle, cache).compile(compiler_options=tuning.compiler_options())
        jax.block_until_ready(fn(lm.handle, cache))
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(lm.handle, cache))
            times.append((time.perf_counter() - t0) / reps)
        t = statistics.median(times)
        base = base or t
        rows.append({"nodes": n, "ms": 1e3 * t, "relative": t / base})
    return rows


def bench_hf_prompt_lookup(lm, prompts: list[list[int]], new_tokens: int, runs: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="jaxaccel-bench-spec-") as folder:
        lm.export_hf(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                  eos_token_id=None, prompt_lookup_num_tokens=10, max_matching_ngram_size=3)
    results = {}
    for label, extra in (("hf_prompt_lookup", kwargs), ("hf_greedy", {k: v for k, v in kwargs.items()
                                                                      if not k.startswith(("prompt", "max_match"))})):
        times = []
        with torch.no_grad():
            model.generate(torch.tensor([prompts[0]]), **extra)
            for _ in range(runs):
                elapsed = 0.0
                for p in prompts:
                    ids = torch.tensor([p])
                    t0 = time.perf_counter()
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), **extra)
                    elapsed += time.perf_counter() - t0
                    assert out.shape[1] == len(p) + new_tokens
                times.append(elapsed)
        total = len(prompts) * new_tokens
        results[label] = {"tokens_per_s": total / statistics.median(times), "runs_tokens_per_s": [total / t for t in times]}
    return results


def run(model: str = "builtin:default", batches: Sequence[int] = (1, 4), temperatures: Sequence[float] = (0.0, 0.7),
        new_tokens: int = 128, runs: int = 3, n_files: int = 8, prompt_tokens: int = 256, sweep: Sequence = SWEEP,
        hf: bool = True, cost: bool = True, progress: Callable[[str], None] = print,
        partial: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """sweep: the templates of the batch-1 greedy template sweep (empty: none); cost: measure
    the verification forward's cost per tree size. partial: called with the results so far
    after the table and after the sweep, so a failure later (the transformers baseline)
    keeps them."""
    import jaxaccel
    from jaxaccel.decode import tuning
    from jaxaccel.decode.recycling import build_template, template_widths

    lm = jaxaccel.load(model, dtype="float32")
    lm.eos_token_ids = ()  # every row decodes exactly new_tokens
    code = heldout_prompts(lm, n_files, prompt_tokens)
    natural = [lm.encode(p) for p in NATURAL_PROMPTS]
    prompts = code + natural
    check_prompts(prompts, len(code), prompt_tokens, batches)
    auto = tuning.recycling_widths()
    result: dict[str, Any] = {
        "benchmark": "spec", "machine": machine(), "model": model, "params_m": round(lm.num_params() / 1e6, 2),
        "new_tokens": new_tokens, "runs": runs, "prompts": {"heldout_files": len(code), "natural": len(natural),
                                                            "prompt_tokens": [len(p) for p in prompts]},
        "auto_template": list(auto)}

    if cost:
        sizes = sorted({1, 2, 4, 8, 11, 16, 24, 32, 48, 64, 81} | {len(build_template(template_widths(t, 8), 8)[0])
                                                                     for t in sweep})
        result["cost"] = verification_cost(lm, sizes)
        for row in result["cost"]:
            progress(f"verification forward, {row['nodes']:3d} nodes: {row['ms']:.2f} ms "
                     f"({row['relative']:.2f}x one token)")

    rows = []
    for batch in batches:
        for temperature in temperatures:
            base = run_method(lm, prompts, batch, new_tokens, runs, "autoregressive", temperature)
            entries = [("autoregressive", {}, base), ("pld", {}, None), ("recycling", {"template": "auto"}, None),
                       ("recycling", {"template": "paper"}, None),
                       ("recycling", {"template": "paper", "hot_start": True}, None)]
            for method, opts, res in entries:
                res = res or run_method(lm, prompts, batch, new_tokens, runs, method, temperature, **opts)
                row = {"batch": batch, "temperature": temperature, "method": method,
                       "template": opts.get("template"), "hot_start": opts.get("hot_start", False), **res,
                       "speedup": res["tokens_per_s"] / base["tokens_per_s"]}
                rows.append(row)
                progress(format_row(row))
    result["rows"] = rows
    if partial is not None:
        partial(result)

    sweep_rows = []
    base = run_method(lm, prompts, 1, new_tokens, runs, "autoregressive", 0.0) if sweep else None
    for t in sweep:
        widths = template_widths(t, 8)
        res = run_method(lm, prompts, 1, new_tokens, runs, "recycling", 0.0, template=list(widths) if t != "paper" else t)
        row = {"template": list(widths), "nodes": 1 + sum(widths), **res, "speedup": res["tokens_per_s"] / base["tokens_per_s"],
               "autoregressive_tokens_per_s": base["tokens_per_s"]}
        sweep_rows.append(row)
        progress(f"sweep {row['template']} ({row['nodes']} nodes): MAT {row['mat']:.2f}, {row['tokens_per_s']:.0f} tok/s, "
                 f"{row['speedup']:.2f}x autoregressive")
    if sweep_rows:
        result["sweep"] = sweep_rows
        result["fastest_template"] = max(sweep_rows, key=lambda r: r["tokens_per_s"])["template"]
        result["sweep_autoregressive_tokens_per_s"] = base["tokens_per_s"]
        if partial is not None:
            partial(result)

    if hf:
        result["hf"] = bench_hf_prompt_lookup(lm, prompts, new_tokens, runs)
        result["hf_ours"], note = hf_comparison(rows, base["tokens_per_s"] if base else None)
        ours = ", ".join(f"{label} {value:.0f}" for label, value in result["hf_ours"].items())
        for label, res in result["hf"].items():
            progress(f"transformers {label}: {res['tokens_per_s']:.0f} tok/s (ours: {ours}){note}")
    return result


def hf_comparison(rows: Sequence[dict[str, Any]], autoregressive: float | None) -> tuple[dict[str, float], str]:
    """What of ours compares with transformers' batch-1 greedy rows: the autoregressive
    baseline of the template sweep (always batch 1, greedy; None without a sweep: the
    table's), and prompt lookup and Token Recycling (template auto) from the table when it
    has a batch-1, T=0 row; (tok/s by label, a note naming what the table lacks)."""
    measured = {r["method"]: r for r in rows if r["batch"] == 1 and r["temperature"] == 0.0
                and r["template"] in (None, "auto") and not r.get("hot_start")}
    ours = {} if autoregressive is None else {"autoregressive": autoregressive}
    for method in ("autoregressive", "pld", "recycling"):
        if method in measured and method not in ours:
            ours[method] = measured[method]["tokens_per_s"]
    missing = [m for m in ("autoregressive", "pld", "recycling") if m not in ours]
    note = f" (no batch-1, T=0 row in this run: {', '.join(missing)} not compared)" if missing else ""
    return ours, note


def _label(row: dict[str, Any], fmt: str = " ({})") -> str:
    return (row["method"] + (fmt.format(row["template"]) if row.get("template") else "")
            + (", hot start" if row.get("hot_start") else ""))


def format_row(row: dict[str, Any]) -> str:
    label = _label(row)
    return (f"batch {row['batch']}, T={row['temperature']}: {label}: MAT {row['mat']:.2f}, "
            f"{row['tokens_per_s']:.0f} tok/s, {row['speedup']:.2f}x autoregressive")


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    out = [f"Model `{result['model']}` ({result['params_m']}M params, float32), {m['cpu']} ({m['cores']} cores), "
           f"{m['backend']}, jax {m['jax']}, {m['date']}; {result['prompts']['heldout_files']} held-out corpus files + "
           f"{result['prompts']['natural']} natural-language prompts, {result['new_tokens']} new tokens each, median "
           f"of {result['runs']} runs. Template `auto` = {result['auto_template']}.", "",
           "| batch | temperature | method | MAT | tok/s | vs autoregressive |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        label = _label(r, " `{}`")
        out.append(f"| {r['batch']} | {r['temperature']} | {label} | {r['mat']:.2f} | {r['tokens_per_s']:.0f} | "
                   f"{r['speedup']:.2f}x |")
    note = decoded_note(result["rows"], result["prompts"]["heldout_files"])
    if note:
        out += ["", note]
    if "hf" in result:
        out += ["", "| transformers (batch 1, greedy, same weights) | tok/s |", "|---|---|"]
        for label, r in result["hf"].items():
            out.append(f"| {label} | {r['tokens_per_s']:.0f} |")
        for label, value in result.get("hf_ours", {}).items():
            out.append(f"| jaxaccel {label} (same prompts) | {value:.0f} |")
    if "sweep" in result:
        out += ["", "Template sweep (batch 1, greedy):", "", "| template | nodes | MAT | tok/s | vs autoregressive |",
                "|---|---|---|---|---|"]
        for r in result["sweep"]:
            out.append(f"| {r['template']} | {r['nodes']} | {r['mat']:.2f} | {r['tokens_per_s']:.0f} | "
                       f"{r['speedup']:.2f}x |")
    if "cost" in result:
        out += ["", "Verification forward cost (batch 1, 512-token prefix):", "", "| nodes | ms | vs 1 token |",
                "|---|---|---|"]
        for r in result["cost"]:
            out.append(f"| {r['nodes']} | {r['ms']:.2f} | {r['relative']:.2f}x |")
    return "\n".join(out)
