"""Autoregressive decoding throughput: jaxaccel against Hugging Face transformers on the
same weights, plus each run against the memory-bandwidth roofline measured in the same run.

Roofline: at batch B one decode step reads every weight once, so tokens/s can be at most
B x bandwidth / bytes_per_step. Two byte counts are reported: all parameter bytes (the
convention the issue uses) and the bytes a step really streams (the embedding table is
gathered, not read, unless it is tied to the output head).
"""
from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from typing import Any

import jax
import numpy as np

from jaxaccel.bench.common import figure, BandwidthProbe, machine
from jaxaccel.config import ModelConfig

PRESETS: dict[str, ModelConfig] = {
    "7m": ModelConfig(vocab_size=8192, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=704),
    "40m": ModelConfig(vocab_size=16384, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1408),
}


def resolve_model(name: str) -> tuple[str, ModelConfig]:
    """A preset name ("7m") or a ModelConfig YAML file -> (label, config)."""
    from pathlib import Path

    from jaxaccel.config import build
    from jaxaccel.errors import ConfigError

    if name in PRESETS:
        return name, PRESETS[name]
    if name.endswith((".yaml", ".yml")):
        return Path(name).stem, build(ModelConfig, name)
    raise ConfigError(f"unknown model preset {name!r}; valid: {', '.join(PRESETS)} or a model YAML file")


def weight_bytes(config: ModelConfig) -> tuple[int, int]:
    """(all parameter bytes, bytes streamed per decode step)."""
    itemsize = np.dtype(config.param_dtype if config.param_dtype != "bfloat16" else "float16").itemsize
    total = config.num_params() * itemsize
    streamed = total if config.tie_embeddings else total - (config.vocab_size - 1) * config.d_model * itemsize
    return total, streamed


def bench_jaxaccel(lm, prompts: list[list[int]], new_tokens: int, runs: int, probe: BandwidthProbe) -> dict[str, Any]:
    """Median tokens/s of whole generate calls by the wall clock around each call, as
    transformers' are timed (prefill, host setup and result conversion included; compile
    time, none after the warm-up call, excluded), and of the decode phase alone: each call's
    `decode_s` minus its own `prefill_s` (the loop samples every new token). (Until
    2026-12-04 the phase subtracted a separate 1-token call, whose cache was a smaller
    bucket, and the totals were `decode_s`, which leaves out the 1-4% of host work.) A
    bandwidth sample is taken between runs, so the roofline sees the same machine state."""
    first = lm.generate(prompts, max_new_tokens=new_tokens)
    assert first.stats["new_tokens"] == len(prompts) * new_tokens, "a row stopped early: EOS must be disabled"
    totals, loops, prefills = [], [], []
    probe.samples.clear()
    for _ in range(runs):  # a bandwidth sample between runs: both see the same machine state
        t0 = time.perf_counter()
        stats = lm.generate(prompts, max_new_tokens=new_tokens).stats
        totals.append(time.perf_counter() - t0 - stats["compile_s"])
        loops.append(stats["decode_s"] - stats["prefill_s"])
        prefills.append(stats["prefill_s"])
        probe.sample()
    batch = len(prompts)
    decode_phase = None
    if min(loops) <= 0:
        warnings.warn(f"decode phase not measured at batch {batch}: in {sum(x <= 0 for x in loops)} of {runs} runs "
                      f"the decode loop took no measurable time ({new_tokens} new tokens are within the timing "
                      f"noise): use more --new-tokens", stacklevel=2)
    else:
        decode_phase = batch * new_tokens / statistics.median(loops)
    return {"tokens_per_s": batch * new_tokens / statistics.median(totals),
            "runs": [batch * new_tokens / t for t in totals], "prefill_s": statistics.median(prefills),
            "decode_phase_tokens_per_s": decode_phase,
            "compile_s": first.stats["compile_s"], "bandwidth": probe.median()}


def torch_dtype(dtype: str):
    """The torch dtype of a bench dtype name ("float32", "bfloat16"): the HF baseline runs in
    the dtype jaxaccel runs in."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def bench_hf(folder: str, prompts: list[list[int]], new_tokens: int, runs: int,
             dtype: str = "float32") -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(dtype)).eval()
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.generate(ids, **kwargs)
        rates = []
        for _ in range(runs):
            t0 = time.perf_counter()
            out = model.generate(ids, **kwargs)
            rates.append(ids.shape[0] * new_tokens / (time.perf_counter() - t0))
        assert out.shape[1] == ids.shape[1] + new_tokens
    return {"tokens_per_s": statistics.median(rates), "runs": rates, "torch_threads": torch.get_num_threads(),
            "dtype": dtype}


def run(models=(("7m", PRESETS["7m"]), ("40m", PRESETS["40m"])), batches=(1, 8), prompt_len: int = 64, new_tokens: int = 128, runs: int = 5,
        hf: bool = True, dtype: str = "float32", seed: int = 0, progress=print) -> dict[str, Any]:
    import jaxaccel
    from jaxaccel.config import replace
    from jaxaccel.model.transformer import init_params

    probe = BandwidthProbe()
    rows = []
    for name, base in models:
        config = replace(base, param_dtype=dtype, dtype=dtype)
        params = init_params(config, jax.random.key(seed), "unrolled")
        lm = jaxaccel.from_params(config, params)  # no EOS: every row generates exactly new_tokens
        total_bytes, streamed_bytes = weight_bytes(config)
        hf_dir = None
        if hf:
            hf_dir = tempfile.TemporaryDirectory(prefix=f"jaxaccel-bench-{name}-")
            lm.export_hf(hf_dir.name)
        rng = np.random.default_rng(seed)
        for batch in batches:
            prompts = rng.integers(0, config.vocab_size, (batch, prompt_len)).tolist()
            ours = bench_jaxaccel(lm, prompts, new_tokens, runs, probe)
            bandwidth = ours["bandwidth"]
            row = {"model": name, "params_m": round(config.num_params() / 1e6, 1), "dtype": dtype, "batch": batch,
                   "jaxaccel_tok_s": ours["tokens_per_s"], "jaxaccel_runs": ours["runs"],
                   "compile_s": ours["compile_s"], "prefill_s": ours["prefill_s"], "bandwidth_gb_s": bandwidth / 1e9,
                   "decode_phase_tok_s": ours["decode_phase_tokens_per_s"],
                   "roofline_all_tok_s": batch * bandwidth / total_bytes,
                   "roofline_streamed_tok_s": batch * bandwidth / streamed_bytes}
            # The roofline bounds a decode step, so it is compared with the decode phase.
            phase = row["decode_phase_tok_s"]
            row["roofline_all_frac"] = None if phase is None else phase / row["roofline_all_tok_s"]
            row["roofline_streamed_frac"] = None if phase is None else phase / row["roofline_streamed_tok_s"]
            if hf:
                theirs = bench_hf(hf_dir.name, prompts, new_tokens, runs, dtype)
                row.update(hf_tok_s=theirs["tokens_per_s"], hf_runs=theirs["runs"],
                           speedup_vs_hf=ours["tokens_per_s"] / theirs["tokens_per_s"])
            rows.append(row)
            progress(format_row(row))
        if hf_dir is not None:
            hf_dir.cleanup()
    return {"benchmark": "decode", "machine": machine(), "dtype": dtype,
            "prompt_len": prompt_len, "new_tokens": new_tokens, "runs": runs, "rows": rows}


def format_row(row: dict[str, Any]) -> str:
    hf = f", HF {row['hf_tok_s']:.0f} tok/s ({row['speedup_vs_hf']:.2f}x)" if "hf_tok_s" in row else ""
    return (f"{row['model']} {row.get('dtype', 'float32')} batch {row['batch']}: jaxaccel {row['jaxaccel_tok_s']:.0f} "
            f"tok/s{hf}, decode phase {figure(row['decode_phase_tok_s'], '.0f')} tok/s = "
            f"{figure(row['roofline_all_frac'], '.0f', 100, '%')} of roofline (all weights) "
            f"at {row['bandwidth_gb_s']:.1f} GB/s, "
            f"{figure(row['roofline_streamed_frac'], '.0f', 100, '%')} (streamed bytes), "
            f"compile {row['compile_s']:.1f} s")


def markdown(result: dict[str, Any]) -> str:
    lines = ["| model | params | dtype | batch | jaxaccel tok/s | HF tok/s | speedup | decode-phase tok/s "
             "| read GB/s | roofline tok/s (all / streamed) | decode phase, % of roofline (all / streamed) "
             "| prefill ms | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        hf = f"{r['hf_tok_s']:.0f} | {r['speedup_vs_hf']:.2f}x" if "hf_tok_s" in r else "– | –"
        lines.append(f"| {r['model']} | {r['params_m']}M | {r.get('dtype', 'float32')} | {r['batch']} | "
                     f"{r['jaxaccel_tok_s']:.0f} | {hf} | {figure(r['decode_phase_tok_s'], '.0f')} | "
                     f"{r['bandwidth_gb_s']:.1f} | {r['roofline_all_tok_s']:.0f} / "
                     f"{r['roofline_streamed_tok_s']:.0f} | {figure(r['roofline_all_frac'], '.0f', 100, '%')} / "
                     f"{figure(r['roofline_streamed_frac'], '.0f', 100, '%')} | "
                     f"{1e3 * r['prefill_s']:.0f} | {r['compile_s']:.1f} |")
    m = result["machine"]
    lines.append("")
    lines.append(f"Machine: {m['cpu']}, {m['cores']} cores, JAX {m['jax']} ({m['backend']}); read bandwidth "
                 f"sampled between the runs of each row; {result['prompt_len']}-token prompts, "
                 f"{result['new_tokens']} new tokens, median of {result['runs']} runs; "
                 f"{result.get('dtype', 'float32')} weights and compute (HF baseline in the same dtype); {m['date']}.")
    return "\n".join(lines)
