"""TokenSelect speed (issue 10): full attention vs TokenSelect on one model, one run.

* `attention_ms`: milliseconds per decode step of one attention layer over `context`
  cached tokens, timed inside one jitted loop of `reps` steps (the median of `runs` loops):
  full attention over the whole cache; TokenSelect selecting afresh every step (what a step
  costs with the selection cache off, or on a miss: score every key, top-k, attend over the
  budget); TokenSelect reusing its selection (a cache hit: no scoring). The query projection
  and RoPE are in all three. Times n_layers = the attention time of a whole decode step.
* `decode_speed`: tokens/s of the decode loop alone (prefill excluded), `new_tokens` greedy
  tokens per row after a `context`-token prompt (EOS off): autoregressive vs tokenselect with
  the selection cache off and on (with its measured hit rate). TokenSelect decodes over its
  own chunked prefill of a real prompt (held-out code of the default corpus: the hit rate
  depends on real keys and queries). Full attention decodes over a zero cache of the same
  size: a dense prefill of 128K tokens takes hours on a CPU, and what a dense step costs does
  not depend on the values in the cache.
* `tokenselect_prefill_s` (decode table): seconds of TokenSelect's chunked prefill of the
  decode prompts, whose cache the TokenSelect rows decode over.
* `prefill_s`: seconds to prefill one `prefill_length`-token prompt: full attention (chunks of
  128 tokens against the whole cache: quadratic) vs TokenSelect's chunked selection (each
  chunk of `chunk` tokens attends over the keys its mean query selects: O(n·k)).

Every figure is the median of `runs` timings after a warm-up; the machine is in the result.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.bench.common import machine, machine_line
from jaxaccel.errors import InvalidArgumentError
from jaxaccel.decode.tokenselect import TokenSelect

# The method's own defaults, the paper's budget (k 2048, n_init 128, n_local 512, chunk 512):
# what a user gets at these lengths. The retrieval experiment scales the budget to the model's
# trained length instead (experiments.tokenselect.scaled_budget).
BUDGET = {key: value for key, value in TokenSelect.options.items() if key not in ("positions", "selection")}
LENGTHS = (8192, 32768, 65536, 131072)


def _median_time(fn: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----------------------------------------------------------------------------- one attention layer


def check_reuse_reps(reps: int, n_local: int) -> None:
    """Timing selection-cache hits over `reps` steps: a selection is reused n_local steps at most."""
    if reps > n_local + 1:
        raise InvalidArgumentError(f"timing selection-cache hits needs reps <= n_local + 1 ({n_local + 1}), got "
                                   f"{reps}: later steps would select afresh")


def attention_ms(config, policy, context: int, batch: int, *, reuse: bool = False, reps: int = 16,
                 runs: int = 5) -> float:
    """Milliseconds per decode step of one attention layer of `config` under `policy` (DENSE
    or a TokenSelectAttention) over `context` cached tokens. reuse=True: a TokenSelect step
    that hits its selection cache (the same query every step, the state filled beforehand)."""
    from jaxaccel.decode import tuning
    from jaxaccel.model.layers import Attention, jnp_dtype, rope_inv_freq, rope_tables
    from jaxaccel.model.options import LayerOptions, SelectionState, TokenSelectAttention
    from jaxaccel.model.transformer import build_visibility

    hd, kvh = config.resolved_head_dim, config.n_kv_heads
    dtype = jnp_dtype(config.dtype)
    cache_len = context + reps
    inv_freq = rope_inv_freq(hd, config.rope_theta, config.rope_scaling)
    key_x, key_k, key_v, key_p = jax.random.split(jax.random.key(0), 4)
    xs = jax.random.normal(key_x, (reps, batch, 1, config.d_model), dtype)
    if reuse:  # cos(q_t, q_cached) = 1: every step reuses the selection
        xs = jnp.broadcast_to(xs[:1], xs.shape)
    cache = (jax.random.normal(key_k, (batch, kvh, cache_len, hd), dtype),
             jax.random.normal(key_v, (batch, kvh, cache_len, hd), dtype))
    if isinstance(policy, TokenSelectAttention):  # a miss selects afresh; a hit reuses whatever the threshold
        import dataclasses

        policy = dataclasses.replace(policy, cache_threshold=-1.0 if reuse else None)
        policy = tuning.token_select_policy(policy, config, cache_len, sharded=False)  # as generate decides
    stateful = isinstance(policy, TokenSelectAttention) and policy.cache_threshold is not None
    if stateful and reuse:
        check_reuse_reps(reps, policy.n_local)
    layer = Attention(config, LayerOptions(fused=True, attention=policy))

    def inputs(i):
        lengths = jnp.full((batch,), context, jnp.int32) + i
        positions = lengths[:, None]
        return rope_tables(positions, inv_freq), build_visibility(positions, cache_len=cache_len,
                                                                  prefix_len=lengths), positions

    rope0, vis0, slots0 = inputs(0)
    params = Attention(config, LayerOptions(fused=True)).init(key_p, xs[0], rope0, vis0, cache, slots0)
    # sized as the method's init_state sizes it: a k past the cache's slots selects nothing
    state = SelectionState.empty(batch, min(policy.k, max(cache_len, 1)), config.n_heads * hd) if stateful else None

    def loop(params, cache, state):
        def body(i, carry):
            cache, state, total = carry
            rope, vis, slots = inputs(i)
            res = layer.apply(params, xs[i], rope, vis, cache, slots, *(() if state is None else (state,)))
            return res[1], (res[2] if state is not None else None), total + res[0][0, 0, 0].astype(jnp.float32)

        return jax.lax.fori_loop(0, reps, body, (cache, state, jnp.float32(0)))

    fn = jax.jit(loop, donate_argnums=(1,)).lower(params, cache, state).compile(
        compiler_options=tuning.compiler_options())
    # warm-up (fills the selection state for `reuse`), finished before the first timed run
    cache, state, _ = jax.block_until_ready(fn(params, cache, state))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        cache, state, total = fn(params, cache, state)
        jax.block_until_ready(total)
        times.append((time.perf_counter() - t0) / reps)
    if stateful and reuse and context + reps > policy.n_init + policy.k + policy.n_local:
        assert int(jnp.sum(state.hits)) > 0, "the reuse timing did not hit the selection cache"
    return 1e3 * statistics.median(times)


# ----------------------------------------------------------------------------- decode and prefill


def code_stream(lm, max_tokens: int = 400_000) -> np.ndarray | None:
    """Held-out code in `lm`'s vocabulary (the default corpus's validation split, its
    documents back to back), or None when the model has no tokenizer."""
    if lm.tokenizer is None:
        return None
    from jaxaccel.data.config import DataConfig
    from jaxaccel.data.longctx import validation_code

    cfg = DataConfig()
    return validation_code(cfg.corpus, cfg.validation_buckets, lm.tokenizer.encode, max_tokens)


def _prompts(lm, code: np.ndarray | None, context: int, batch: int, seed: int = 0) -> np.ndarray:
    """[batch, context] prompts: windows of `code` at random offsets (wrapping), else random ids."""
    rng = np.random.default_rng(seed)
    if code is None:
        return rng.integers(4, lm.config.vocab_size, size=(batch, context)).astype(np.int32)
    starts = rng.integers(len(code), size=batch)
    return np.asarray(code)[(starts[:, None] + np.arange(context)) % len(code)].astype(np.int32)


def _handle(lm, decoder, cache_len: int):
    """The model with the method's forward defaults, backend choices made as `generate` makes
    them (TokenSelect's kernels: on TPU/GPU only once they matched their references)."""
    from jaxaccel.decode import tuning

    return lm.handle.with_defaults(**tuning.resolve_forward_defaults(decoder.forward_defaults(), lm.config, cache_len,
                                                                     sharded=lm.mesh is not None))


def _padded(prompts: np.ndarray, cache_len: int) -> tuple[jax.Array, jax.Array]:
    tokens = np.zeros((prompts.shape[0], cache_len), np.int32)
    tokens[:, :prompts.shape[1]] = prompts
    return jnp.asarray(tokens), jnp.full((prompts.shape[0],), prompts.shape[1], jnp.int32)


def prefill_s(lm, method: str, options: dict[str, Any], prompts: np.ndarray, cache_len: int, runs: int,
              keep: bool = False, warmup: bool = True):
    """Median seconds of the prefill of `prompts` [batch, n] under `method` (its prefill
    chunk and attention policy), after a warm-up run; keep=True also returns the last cache."""
    from jaxaccel.decode import tuning
    from jaxaccel.decode.engine import PREFILL_CHUNK, prefill_cache
    from jaxaccel.decode.methods import get_method

    decoder = get_method(method, **options)
    decoder.check(lm.config)
    handle = _handle(lm, decoder, cache_len)
    tokens, lens = _padded(prompts, cache_len)
    chunk = min(cache_len, decoder.prefill_chunk() or PREFILL_CHUNK)
    import functools

    fn = jax.jit(functools.partial(prefill_cache, cache_len=cache_len, chunk=chunk)).lower(handle, tokens, lens)
    fn = fn.compile(compiler_options=tuning.compiler_options())
    if warmup:
        jax.block_until_ready(fn(handle, tokens, lens))
    cache = None
    times = []
    for _ in range(runs):
        cache = None  # release the previous cache before the next one is made
        t0 = time.perf_counter()
        cache = jax.block_until_ready(fn(handle, tokens, lens))
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return (seconds, cache) if keep else seconds


def decode_speed(lm, method: str, options: dict[str, Any], prompts: np.ndarray, cache, new_tokens: int,
                 runs: int) -> dict[str, Any]:
    """Tokens/s of the decode loop over `cache` (a prefilled cache, or None: zeros) for
    `prompts` [batch, context]; EOS off, so every row decodes `new_tokens` tokens."""
    import functools

    from jaxaccel.decode import tuning
    from jaxaccel.decode.engine import generate_loop
    from jaxaccel.decode.lm import request_lengths
    from jaxaccel.decode.methods import get_method
    from jaxaccel.decode.sampling import make_sampling

    decoder = get_method(method, **options)
    decoder.check(lm.config)
    batch, context = prompts.shape
    out_len, cache_len = request_lengths(context, new_tokens)
    handle = _handle(lm, decoder, cache_len)
    if cache is None:
        cache = handle.init_cache(batch, cache_len)
    tokens, lens = _padded(prompts, cache_len)
    mode, sampling = make_sampling(0.0, None, None)
    rng = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(batch))
    args = (tokens, lens, jnp.ones((batch,), bool), jnp.int32(new_tokens), sampling, rng, None, None)
    static = dict(method=decoder, mode=mode, eos_ids=(), out_len=out_len)
    fn = jax.jit(functools.partial(generate_loop, **static), donate_argnums=(1,))
    spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), cache)
    fn = fn.lower(handle, spec, *args).compile(compiler_options=tuning.compiler_options())
    times, stats = [], {}
    for r in range(runs + 1):  # the first run warms up
        working = jax.block_until_ready(jax.tree.map(jnp.copy, cache))  # the loop consumes its cache
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(handle, working, *args)._replace(cache=None))
        if r:
            times.append(time.perf_counter() - t0)
        assert int(np.asarray(out.num_new).min()) == new_tokens
        stats = decoder.stats(out.method_output, batch)
        del working, out
    seconds = statistics.median(times)
    return {"tokens_per_s": batch * new_tokens / seconds, "ms_per_step": 1e3 * seconds / new_tokens,
            "selection_cache_hit_rate": stats.get("selection_cache_hit_rate")}


# ----------------------------------------------------------------------------- the benchmark


def run(model, lengths: Sequence[int] = LENGTHS, batches: Sequence[int] = (1, 4), *, new_tokens: int = 32,
        runs: int = 3, reps: int = 16, budget: dict[str, Any] | None = None, prefill_length: int = 32768,
        prefill_runs: int | None = None, progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """model: a path (`jaxaccel.load`) or a LanguageModel. Prompts: held-out corpus code in the
    model's vocabulary, or random ids for a model without a tokenizer."""
    from jaxaccel.decode.lm import cache_bucket, request_lengths
    from jaxaccel.model.options import DENSE, TokenSelectAttention

    name = model if isinstance(model, str) else "(in memory)"
    if isinstance(model, str):
        import jaxaccel

        lm = jaxaccel.load(model)
    else:
        lm = model
    for context in lengths:  # the largest cache of the run must fit: one line now, not an OOM kill later
        lm._check_cache_fits(max(batches), request_lengths(context, new_tokens)[1],  # full attention's prefill too
                             "use shorter --lengths or fewer --batches", prefill_chunk=lm.prefill_chunk)
    if prefill_length:  # so must the prefill timing's, run last
        lm._check_cache_fits(1, cache_bucket(prefill_length + 16), "use a shorter --prefill-length (0: skip it)",
                             prefill_chunk=lm.prefill_chunk)
    code = code_stream(lm)
    budget = {**BUDGET, **(budget or {})}
    policy = TokenSelectAttention(k=budget["k"], n_init=budget["n_init"], n_local=budget["n_local"],
                                  pool=budget["pool"], cache_threshold=budget["cache_threshold"])
    check_reuse_reps(reps, policy.n_local)  # before minutes of other timings
    cfg = lm.config
    ts_off = {**budget, "cache_threshold": None}
    ts_on = dict(budget)
    result: dict[str, Any] = {
        "machine": machine(), "model": name, "n_layers": cfg.n_layers, "d_model": cfg.d_model,
        "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.resolved_head_dim,
        "dtype": cfg.dtype, "budget": budget, "new_tokens": new_tokens, "runs": runs, "reps": reps,
        "prompts": "held-out corpus code" if code is not None else "random token ids",
        "kv_bytes_per_token_per_layer": 2 * cfg.n_kv_heads * cfg.resolved_head_dim * jnp.dtype(cfg.dtype).itemsize,
        "attention": [], "decode": [], "prefill": None}
    for context in lengths:
        for b in batches:
            progress(f"attention, {context} cached tokens, batch {b}")
            full = attention_ms(cfg, DENSE, context, b, reps=reps, runs=runs)
            select = attention_ms(cfg, policy, context, b, reps=reps, runs=runs)
            reuse = attention_ms(cfg, policy, context, b, reuse=True, reps=reps, runs=runs)
            result["attention"].append({"context": context, "batch": b, "full_ms": full, "select_ms": select,
                                        "reuse_ms": reuse, "n_layers": cfg.n_layers,
                                        "fits_budget": context + reps <= policy.n_init + policy.k + policy.n_local,
                                        "full_vs_select": full / select, "full_vs_reuse": full / reuse})
    for context in lengths:
        for b in batches:
            progress(f"decode, {context} cached tokens, batch {b}")
            prompts = _prompts(lm, code, context, b)
            ts_prefill, cache = prefill_s(lm, "tokenselect", ts_off, prompts, request_lengths(context, new_tokens)[1],
                                          runs, keep=True)
            full = decode_speed(lm, "autoregressive", {}, prompts, None, new_tokens, runs)
            off = decode_speed(lm, "tokenselect", ts_off, prompts, cache, new_tokens, runs)
            on = decode_speed(lm, "tokenselect", ts_on, prompts, cache, new_tokens, runs)
            del cache
            row = {"context": context, "batch": b, "full_tokens_per_s": full["tokens_per_s"],
                   "tokenselect_off_tokens_per_s": off["tokens_per_s"],
                   "tokenselect_on_tokens_per_s": on["tokens_per_s"],
                   "hit_rate": on["selection_cache_hit_rate"], "tokenselect_prefill_s": ts_prefill}
            row["off_vs_full"] = row["tokenselect_off_tokens_per_s"] / row["full_tokens_per_s"]
            row["on_vs_full"] = row["tokenselect_on_tokens_per_s"] / row["full_tokens_per_s"]
            result["decode"].append(row)
            attn = next(a for a in result["attention"] if a["context"] == context and a["batch"] == b)
            if row["hit_rate"] is not None:  # the attention share of a step at the measured hit rate
                attn["cache_on_ms"] = row["hit_rate"] * attn["reuse_ms"] + (1 - row["hit_rate"]) * attn["select_ms"]
                attn["full_vs_cache_on"] = attn["full_ms"] / attn["cache_on_ms"]
                attn["hit_rate"] = row["hit_rate"]
    if prefill_length:
        progress(f"prefill, {prefill_length} tokens")
        prompts = _prompts(lm, code, prefill_length, 1, seed=1)
        cache_len = cache_bucket(prefill_length + 16)
        n = prefill_runs or runs
        full_s = prefill_s(lm, "autoregressive", {}, prompts, cache_len, n)
        chunked_s = prefill_s(lm, "tokenselect", ts_off, prompts, cache_len, n)
        result["prefill"] = {"length": prefill_length, "full_s": full_s, "chunked_s": chunked_s,
                             "speedup": full_s / chunked_s, "runs": n}
    result["summary"] = summary(result)
    return result


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def summary(result: dict[str, Any]) -> list[str]:
    """The issue's targets on this machine, one line each."""
    out = []
    longest = max((a["context"] for a in result["attention"]), default=None)
    for a in result["attention"]:
        if a["context"] == longest:
            ratio = a.get("full_vs_cache_on", a["full_vs_select"])
            hit = f", hit rate {a['hit_rate']:.2f}" if "hit_rate" in a else ""
            out.append(f"attention per step at {_k(longest)}, batch {a['batch']}: full attention's time / "
                       f"TokenSelect's = {ratio:.1f}x (cache on{hit}; {a['full_vs_select']:.1f}x selecting every "
                       f"step, {a['full_vs_reuse']:.1f}x on a hit; above 1 is faster; target >= 10x at 128K)")
    for d in result["decode"]:
        if d["context"] == 65536:
            out.append(f"decode at 64K, batch {d['batch']}: {d['on_vs_full']:.2f}x full attention's tokens/s with "
                       f"the cache on, {d['off_vs_full']:.2f}x off (target >= 2x)")
    p = result["prefill"]
    if p is not None:
        out.append(f"prefill of {_k(p['length'])} tokens: {p['speedup']:.1f}x faster chunked "
                   f"({p['chunked_s']:.3g} s vs {p['full_s']:.3g} s; target >= 3x at 32K)")
    return out


def markdown(result: dict[str, Any]) -> str:
    m, b = result["machine"], result["budget"]
    head = (f"TokenSelect on {result['model']} ({result['n_layers']} layers, d_model {result['d_model']}, "
            f"{result['n_heads']} heads / {result['n_kv_heads']} KV heads of {result['head_dim']}, {result['dtype']}); "
            f"budget k={b['k']}, n_init={b['n_init']}, n_local={b['n_local']}, chunk {b['chunk']}, cache threshold "
            f"{b['cache_threshold']}; {machine_line(m)}; "
            f"medians of {result['runs']} runs")
    lines = [head, "", f"Attention time per decode step (ms, all {result['n_layers']} layers; one layer timed over "
             f"{result['reps']} steps):", "",
             "| cached tokens | batch | full | TokenSelect, selecting | TokenSelect, reused | cache on (hit rate) "
             "| full / selecting | full / cache on |", "|---|---|---|---|---|---|---|---|"]
    for a in result["attention"]:
        n = a["n_layers"]
        on = (f"{a['cache_on_ms'] * n:.2f} ({a['hit_rate']:.2f})" if "cache_on_ms" in a else "—")
        fits = " (fits the budget: full attention)" if a.get("fits_budget") else ""
        lines.append(f"| {_k(a['context'])}{fits} | {a['batch']} | {a['full_ms'] * n:.2f} | {a['select_ms'] * n:.2f} | "
                     f"{a['reuse_ms'] * n:.2f} | {on} | {a['full_vs_select']:.1f}x | "
                     f"{a.get('full_vs_cache_on', float('nan')):.1f}x |")
    lines += ["", f"Decode tokens/s ({result['new_tokens']} new tokens per row, prompts: {result['prompts']}; "
              "full attention over a zero cache, TokenSelect over its own chunked prefill):", "",
              "| cached tokens | batch | full | TokenSelect, cache off | TokenSelect, cache on | hit rate | off / full "
              "| on / full | TokenSelect prefill (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for d in result["decode"]:
        hit = "—" if d["hit_rate"] is None else f"{d['hit_rate']:.2f}"
        lines.append(f"| {_k(d['context'])} | {d['batch']} | {d['full_tokens_per_s']:.1f} | "
                     f"{d['tokenselect_off_tokens_per_s']:.1f} | {d['tokenselect_on_tokens_per_s']:.1f} | {hit} | "
                     f"{d['off_vs_full']:.2f}x | {d['on_vs_full']:.2f}x | {d['tokenselect_prefill_s']:.3g} |")
    p = result["prefill"]
    if p is not None:
        lines += ["", f"Prefill of one prompt (s, median of {p.get('runs', '?')} runs):", "", "| prompt | full attention | chunked selection | speedup |",
                  "|---|---|---|---|", f"| {_k(p['length'])} | {p['full_s']:.3g} | {p['chunked_s']:.3g} | "
                  f"{p['speedup']:.1f}x |"]
    lines += ["", *[f"- {s}" for s in result["summary"]]]
    return "\n".join(lines)
