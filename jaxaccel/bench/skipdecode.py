"""SkipDecode speed (issue 9): is skipping real, and what does it buy end to end.

* `step_cost`: milliseconds per decode step at h of n layers (batch 1 and 8, a cache of
  `cache_len` slots), timed inside one jitted loop of `reps` steps, for the two ways the
  method can skip — `cond` (one program, a `lax.cond` per layer on the step's flags) and
  `static` (the layers not traced at all: what each branch of `dispatch="switch"` runs).
  A step at h layers should cost about h/n of a full step plus the fixed part (embedding,
  logits, sampling).
* `end_to_end`: decode tokens/s of `skipdecode` (cond and switch) vs `autoregressive` on the
  same model, held-out prompts of `prompt_tokens`, `new_tokens` generated, median of `runs`:
  end to end (the prompt's prefill, which always runs every layer, included) and of the
  decode loop alone.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jaxaccel.bench.common import figure, machine, machine_line
from jaxaccel.bench.spec import check_prompts, decoded_note, heldout_prompts, run_method
from jaxaccel.model.options import ExecutionPlan
from jaxaccel.model.skip import SkipSchedule


def step_cost(lm, depths: Sequence[int], batch: int, cache_len: int = 512, reps: int = 32,
              runs: int = 5) -> list[dict[str, Any]]:
    from jaxaccel.decode import tuning

    cfg = lm.config
    schedule = SkipSchedule(cfg.n_layers, min_layers=min(depths), max_layers=cfg.n_layers, max_length=cache_len)
    prefix = cache_len // 2

    def make(static: bool | None, h: int):
        def loop(model, cache, on):
            tokens = jnp.zeros((batch, 1), jnp.int32)
            plen = jnp.full((batch,), prefix, jnp.int32)
            plan = None if static is None else ExecutionPlan(layer_on=schedule.static_active(h) if static else on)

            def body(i, carry):
                c, total = carry
                pos = (plen + i)[:, None]
                logits, c = model.forward(tokens, pos, cache=c, write_slots=pos, prefix_len=plen + i, plan=plan)
                return c, total + logits[0, 0, 0]

            return jax.lax.fori_loop(0, reps, body, (cache, jnp.float32(0)))

        return jax.jit(loop, donate_argnums=(1,))

    def timed(fn, on) -> float:
        cache = lm.handle.init_cache(batch, cache_len)
        compiled = fn.lower(lm.handle, cache, on).compile(compiler_options=tuning.compiler_options())
        cache = jax.block_until_ready(compiled(lm.handle, cache, on)[0])  # warm-up done before the clock
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            cache, total = compiled(lm.handle, cache, on)
            jax.block_until_ready(total)
            times.append((time.perf_counter() - t0) / reps)
        return statistics.median(times)

    plain = timed(make(None, cfg.n_layers), jnp.ones(cfg.n_layers, bool))
    cond_fn = make(False, 0)
    rows = []
    for h in depths:
        on = schedule.active(h)
        t_cond, t_static = timed(cond_fn, on), timed(make(True, h), on)
        rows.append({"layers": h, "batch": batch, "cond_ms": 1e3 * t_cond, "static_ms": 1e3 * t_static,
                     "plain_full_ms": 1e3 * plain, "cond_vs_full": t_cond / plain, "static_vs_full": t_static / plain,
                     "layer_fraction": h / cfg.n_layers})
    return rows


def method_schedule(lm, speedup: float, max_length: int) -> SkipSchedule:
    """The schedule `method="skipdecode", speedup=..., max_length=...` runs on `lm`: the
    model's trained warm-up (its info) where it has one, as the method takes it."""
    from jaxaccel.decode.skipdecode import SkipDecode

    method = SkipDecode(speedup=speedup, max_length=max_length)
    method.use_model_info(lm.info or {})
    return method.schedule(lm.config)


def end_to_end(lm, prompts: list[list[int]], batch: int, speedups: Sequence[float], new_tokens: int, runs: int,
               max_length: int, dispatches: Sequence[str] = ("cond", "switch")) -> list[dict[str, Any]]:
    base = run_method(lm, prompts, batch, new_tokens, runs, "autoregressive", 0.0)
    decoded = {"prompts_decoded": base["prompts_decoded"], "prompts_total": base["prompts_total"]}
    base_loop = base["decode_phase_tokens_per_s"]
    rows = [{"batch": batch, "method": "autoregressive", "speedup_nominal": 1.0, "mean_layers": lm.config.n_layers,
             "tokens_per_s": base["tokens_per_s"], "runs_tokens_per_s": base["runs_tokens_per_s"], "vs_ar": 1.0,
             "decode_phase_tokens_per_s": base_loop, "decode_phase_vs_ar": 1.0 if base_loop else None, **decoded}]
    for s in speedups:
        schedule = method_schedule(lm, s, max_length)
        for dispatch in dispatches:
            r = run_method(lm, prompts, batch, new_tokens, runs, "skipdecode", 0.0, speedup=s, max_length=max_length,
                           dispatch=dispatch)
            span = max_length - len(prompts[0])
            rows.append({"batch": batch, "method": f"skipdecode ({dispatch})", "speedup_nominal": s,
                         "schedule": schedule.describe(), "mean_layers": schedule.mean_layers(span, new_tokens),
                         "tokens_per_s": r["tokens_per_s"], "runs_tokens_per_s": r["runs_tokens_per_s"],
                         "vs_ar": r["tokens_per_s"] / base["tokens_per_s"],
                         "decode_phase_tokens_per_s": r["decode_phase_tokens_per_s"],
                         "decode_phase_vs_ar": (r["decode_phase_tokens_per_s"] / base_loop
                                                if r["decode_phase_tokens_per_s"] and base_loop else None), **decoded})
    return rows


def run(model: str, batches: Sequence[int], speedups: Sequence[float], new_tokens: int, runs: int, files: int,
        prompt_tokens: int, max_length: int, progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    import jaxaccel

    lm = jaxaccel.load(model)
    lm.eos_token_ids = ()  # every row decodes exactly new_tokens: a row ended by EOS would time an idle slot
    n = lm.config.n_layers
    schedules = [method_schedule(lm, s, max_length) for s in speedups]
    depths = sorted({n, *(sk.min_layers for sk in schedules), *(sk.max_layers for sk in schedules)}, reverse=True)
    result: dict[str, Any] = {"machine": machine(), "model": model, "n_layers": n, "new_tokens": new_tokens,
                              "runs": runs, "prompt_tokens": prompt_tokens, "max_length": max_length,
                              "step_cost": [], "end_to_end": []}
    prompts = heldout_prompts(lm, files, prompt_tokens)
    check_prompts(prompts, len(prompts), prompt_tokens, batches)  # before the step costs are timed
    for b in batches:
        progress(f"step cost, batch {b}")
        result["step_cost"] += step_cost(lm, depths, b, cache_len=max(512, max_length))
    for b in batches:
        progress(f"end to end, batch {b}")
        result["end_to_end"] += end_to_end(lm, prompts, b, speedups, new_tokens, runs, max_length)
    return result


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"SkipDecode on {result['model']} ({result['n_layers']} layers); {machine_line(m)}", "",
             "| batch | layers run | cond ms/step | static ms/step | full step ms | cond / full | static / full "
             "| layers / n |", "|---|---|---|---|---|---|---|---|"]
    for r in result["step_cost"]:
        lines.append(f"| {r['batch']} | {r['layers']} | {r['cond_ms']:.2f} | {r['static_ms']:.2f} | "
                     f"{r['plain_full_ms']:.2f} | {r['cond_vs_full']:.2f} | {r['static_vs_full']:.2f} | "
                     f"{r['layer_fraction']:.2f} |")
    lines += ["", f"End to end: {result['prompt_tokens']}-token held-out prompts, {result['new_tokens']} new tokens, "
              f"schedule length {result['max_length']}, median of {result['runs']}", "",
              "| batch | method | nominal speedup | mean layers | tok/s | vs autoregressive | decode loop tok/s "
              "(prefill excluded) | vs autoregressive |", "|---|---|---|---|---|---|---|---|"]
    for r in result["end_to_end"]:
        lines.append(f"| {r['batch']} | {r['method']} | {r['speedup_nominal']:g} | {r['mean_layers']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r['vs_ar']:.2f}x | {figure(r['decode_phase_tokens_per_s'], '.0f')} | "
                     f"{figure(r['decode_phase_vs_ar'], '.2f', unit='x')} |")
    note = decoded_note([r for r in result["end_to_end"] if r["method"] == "autoregressive"])
    if note:
        lines += ["", note]
    return "\n".join(lines)
