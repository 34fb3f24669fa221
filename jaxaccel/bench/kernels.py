"""`python -m jaxaccel.bench kernels`: every Pallas kernel against its jnp reference on this
machine's backend — agreement first, then time.

The kernels were written and tested on a CPU host, in the Pallas interpreter, and lowered for
TPU (Mosaic) and GPU (Triton) without a device to compile them on. This is the one command
to run when a TPU or GPU is at hand: each case compiles and runs the kernel and its
reference on the same random inputs (`pallas_kernels.checks`), reports the largest
difference, and on an accelerator times both (median of `runs` calls after a warm-up). It
exits 1 when any kernel fails to compile or disagrees with its reference.

Cases per backend:
* GPU / TPU: the shapes decoding and training run — tree verification (17 to 129 nodes, a
  draft budget + 1, over 4K and 32K caches), TokenSelect scoring (8K to 128K keys) and sparse
  attention (2,688 selected keys of a 128K cache — the paper's budget — in both position
  modes, and 2,000, which pads a partial key block; a second row shorter than the budget),
  32 query / 8 KV heads of 128, bfloat16 and float32, batch 1 to 4; splash attention (TPU
  only: no GPU kernel, see `flash_attention`) at 2K and 4K tokens. `quick` keeps one case per
  kernel and dtype. A failure is a finding, not a bug of the command: decoding falls back to
  the reference for the shapes that fail.
* CPU: no compiled Pallas. The same kernels run in the Pallas interpreter at toy sizes — a
  check of the command itself, not a speed figure (no times are reported).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax

from jaxaccel.bench.common import machine


def _accelerator_cases(backend: str, quick: bool) -> list[Callable]:
    from jaxaccel.pallas_kernels import checks

    heads = dict(heads=32, kv_heads=8, head_dim=128)
    cases: list[Callable] = []
    for dtype in ("bfloat16", "float32"):
        # a tree of `budget` drafted nodes is verified as budget + 1 nodes: 17, 65, 129
        tree = [(65, 4096, 1)] if quick else [(17, 4096, 1), (64, 4096, 1), (65, 32768, 2), (129, 32768, 4)]
        cases += [lambda n=n, s=s, b=b, dtype=dtype: checks.tree_attention_case(
            nodes=n, cache_len=s, batch=b, dtype=dtype, **heads) for n, s, b in tree]
        score = [(131072, 2)] if quick else [(8192, 1), (32768, 2), (131072, 1), (131072, 4)]
        cases += [lambda s=s, b=b, dtype=dtype: checks.score_keys_case(cache_len=s, batch=b, dtype=dtype, **heads)
                  for s, b in score]
        # batch > 1: the second row is shorter than the budget (every slot selected, the rest
        # masked); 2,688 = the paper's budget (21 x 128), 2,000 pads a partial key block
        sparse = [(131072, 2, 2688, "compact")] if quick else [
            (131072, 2, 2688, "compact"), (131072, 2, 2688, "original"), (131072, 4, 2000, "compact")]
        cases += [lambda s=s, b=b, n=n, p=p, dtype=dtype: checks.sparse_attention_case(
            cache_len=s, batch=b, selected=n, positions=p, dtype=dtype, **heads) for s, b, n, p in sparse]
        if backend == "tpu" and not quick:  # the DMA path (the default) against the XLA gather it replaced
            cases.append(lambda dtype=dtype: checks.sparse_attention_case(
                cache_len=131072, batch=2, selected=2688, positions="compact", dtype=dtype, gather="xla", **heads))
        if backend == "tpu":
            splash = [2048] if quick else [2048, 4096]
            cases += [lambda t=t, dtype=dtype: checks.splash_attention_case(
                seq_len=t, heads=16, kv_heads=8, head_dim=128, batch=2, dtype=dtype) for t in splash]
    return cases


def _interpreter_cases(quick: bool) -> list[Callable]:
    from jaxaccel.pallas_kernels import checks

    small = dict(heads=4, kv_heads=2, head_dim=32, interpret=True)
    cases: list[Callable] = []
    for dtype in ("float32",) if quick else ("float32", "bfloat16"):
        cases += [lambda dtype=dtype: checks.tree_attention_case(nodes=8, cache_len=96, block_k=32, dtype=dtype,
                                                                 **small),
                  lambda dtype=dtype: checks.score_keys_case(cache_len=96, block_k=32, dtype=dtype, **small),
                  lambda dtype=dtype: checks.sparse_attention_case(cache_len=96, selected=24, block_k=8, dtype=dtype,
                                                                   **small)]
        if not quick:  # TPU's path: indices in SMEM and DMA copies, in the TPU interpreter
            cases.append(lambda dtype=dtype: checks.sparse_attention_case(cache_len=96, selected=24, block_k=8,
                                                                          dtype=dtype, gather="dma", **small))
    if not quick:
        cases.append(lambda: checks.splash_attention_case(seq_len=256, heads=2, kv_heads=1, head_dim=128, batch=1,
                                                          dtype="float32", interpret=True))
    return cases


def _median_ms(fn: Callable, args: tuple, runs: int) -> float:
    jax.block_until_ready(fn(*args))  # compiled by the check; one more call warms caches
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run(runs: int = 20, quick: bool = False, progress: Callable[[str], None] = lambda s: None,
        on_row: Callable[[dict[str, Any]], None] = lambda result: None) -> dict[str, Any]:
    """Check (and on TPU/GPU time) every case of this backend -> the report `markdown` prints.
    `on_row(result so far)` after each case, so a run that dies later keeps what it found;
    a case that cannot even be built (out of memory, say) is a failed row, not a crash."""
    backend = jax.default_backend()
    interpreted = backend not in ("tpu", "gpu")
    builders = _interpreter_cases(quick) if interpreted else _accelerator_cases(backend, quick)
    result = {"machine": machine(), "device_kind": jax.devices()[0].device_kind, "backend": backend,
              "interpreted": interpreted, "runs": runs, "quick": quick, "cases": [], "failed": 0}
    for build in builders:
        row = _run_case(build, runs, interpreted, progress)
        result["cases"].append(row)
        result["failed"] += not row["ok"]
        progress(markdown_row(row))
        on_row(result)
    return result


def _run_case(build: Callable, runs: int, interpreted: bool, progress: Callable[[str], None]) -> dict[str, Any]:
    from jaxaccel.errors import first_line
    from jaxaccel.pallas_kernels import checks

    try:
        case = build()
    except Exception as e:  # noqa: BLE001 - reported as the row's problem
        return {"kernel": "?", "dtype": "?", "shape": {}, "max_abs_error": None, "allowed": None, "ok": False,
                "problem": f"the case could not be built ({type(e).__name__}: {first_line(e, 200)})",
                "kernel_ms": None, "reference_ms": None, "speedup": None}
    progress(f"{case.kernel_name} {case.dtype} " + " ".join(f"{k}={v}" for k, v in case.shape.items()
                                                             if v is not None))
    result = checks.compare(case)
    row = {"kernel": case.kernel_name, "dtype": case.dtype, "shape": case.shape, "max_abs_error": result.error,
           "allowed": result.allowed, "ok": result.problem is None, "problem": result.problem,
           "kernel_ms": None, "reference_ms": None, "speedup": None}
    if result.problem is None and not interpreted:
        try:  # at the backend's default matmul precision: what decoding runs
            row["kernel_ms"] = _median_ms(case.kernel, case.args, runs)
            row["reference_ms"] = _median_ms(case.reference, case.args, runs)
            row["speedup"] = row["reference_ms"] / row["kernel_ms"]
        except Exception as e:  # noqa: BLE001
            row.update(ok=False, problem=f"timing failed ({type(e).__name__}: {first_line(e, 200)})")
    return row


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    head = (f"Pallas kernels vs their jnp references on {result['device_kind']} ({result['backend']}, jax {m['jax']}, "
            f"{m['date']})")
    if result["interpreted"]:
        head += ": no compiled Pallas on this backend, so the kernels ran in the Pallas interpreter at toy sizes " \
                "(a check of agreement only; no times)"
    else:
        head += f"; times: median of {result['runs']} calls"
    lines = [head, "", "| kernel | dtype | shape | max abs error | allowed | agrees | kernel ms | reference ms | "
                       "speedup |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [markdown_row(r) for r in result["cases"]]
    return "\n".join(lines)


def markdown_row(r: dict[str, Any]) -> str:
    shape = ", ".join(f"{k} {v}" for k, v in r["shape"].items() if v is not None)
    err, allowed = ("—" if r[k] is None else f"{r[k]:.2g}" for k in ("max_abs_error", "allowed"))
    ok = "yes" if r["ok"] else f"**no**: {r['problem']}"
    ms = ["—" if r[k] is None else f"{r[k]:.3f}" for k in ("kernel_ms", "reference_ms")]
    speed = "—" if r["speedup"] is None else f"{r['speedup']:.2f}x"
    return f"| {r['kernel']} | {r['dtype']} | {shape} | {err} | {allowed} | {ok} | {ms[0]} | {ms[1]} | {speed} |"
