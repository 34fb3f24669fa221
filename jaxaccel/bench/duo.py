"""Duo-LLM decode speed (issue 11): what a 50% big budget buys end to end.

Decode tokens/s of one Duo model on held-out prompts, batch 1 and 8, median of `runs` rounds
(each round times one pass of every row, interleaved), for:
all big (the baseline: the dense big model's compute), a fixed pattern with half the layers
big (every token the same routes: each layer traces only its FFN), the model's router when it
has one (per-token routes: `lax.switch` at batch 1, grouped dispatch with a capacity ladder at
batch >= 2), and all small (the floor). Each routed row reports how many layers per token
actually took the big FFN (teacher-forced over its prompts and outputs).
"""
from __future__ import annotations

import statistics
from typing import Any, Callable, Sequence

import numpy as np

from jaxaccel.bench.common import machine, machine_line
from jaxaccel.bench.spec import check_prompts, decoded_note, heldout_prompts, run_method
from jaxaccel.errors import InvalidArgumentError


def half_pattern(n_layers: int) -> str:
    """Half the layers big, alternating from a big first layer (BSBSBSBS for 8): a neutral
    default; pass the best fixed pattern of `experiments duo` (BSSSBSBB for builtin:duo) to
    time the one whose quality docs/DUO.md reports."""
    return "".join("BS"[i % 2] for i in range(n_layers - n_layers % 2)) + "S" * (n_layers % 2)


def big_layers(lm, prompts: list[list[int]], outputs: list[list[int]], routes: str | None) -> float:
    """Mean number of layers that took the big FFN in the forwards that produced the output
    tokens (the last prompt token's, then each output's but the last), teacher forced over
    prompt + output; padding excluded."""
    from jaxaccel.decode.lm import duo_routes
    from jaxaccel.experiments.duo import big_layer_counts
    from jaxaccel.model.duo import BIG

    plan = duo_routes(routes, lm.config)
    if plan is not None:  # a fixed pattern: every token the same
        return float(sum(r == BIG for r in plan.routes))
    sequences = [p + o for p, o in zip(prompts, outputs)]
    width = max(len(s) for s in sequences)
    tokens = np.zeros((len(sequences), width), np.int32)
    counted = np.zeros((len(sequences), width), bool)
    for i, (p, o) in enumerate(zip(prompts, outputs)):
        tokens[i, :len(p) + len(o)] = p + o
        counted[i, len(p) - 1:len(p) + len(o) - 1] = True  # the tokens whose forward produced an output token
    return float(big_layer_counts(lm.params, lm.config, tokens)[counted].mean())


def check_pattern(config, pattern: str | None) -> None:
    """Before anything is loaded or timed: the model is a Duo-LLM model and `pattern` (None:
    the default) is one of B/S/- per layer (or big / small / skip); InvalidArgumentError."""
    from jaxaccel.decode.lm import duo_routes

    if not config.duo.enabled:
        raise InvalidArgumentError("the model is not a Duo-LLM model (model.duo.enabled is off)")
    if pattern is not None:
        duo_routes(pattern, config)


def run(model: str, batches: Sequence[int], new_tokens: int, runs: int, files: int, prompt_tokens: int,
        pattern: str | None = None, progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    import jaxaccel
    from jaxaccel.decode.lm import duo_routes

    lm = jaxaccel.load(model)
    lm.eos_token_ids = ()  # every row decodes exactly new_tokens: a row ended by EOS would time an idle slot
    check_pattern(lm.config, pattern)
    n = lm.config.n_layers
    pattern = pattern or half_pattern(n)
    rows_spec = [("all big", "big"), (f"fixed {pattern}", pattern)]
    if lm.config.duo.router:
        rows_spec.append(("router", None))
    rows_spec.append(("all small", "small"))
    prompts = heldout_prompts(lm, files, prompt_tokens)
    check_prompts(prompts, len(prompts), prompt_tokens, batches)
    result: dict[str, Any] = {"machine": machine(), "model": model, "n_layers": n, "d_model": lm.config.d_model,
                              "ffn_dim": lm.config.ffn_dim, "small_ffn_dim": lm.config.small_ffn_dim,
                              "new_tokens": new_tokens, "runs": runs, "files": len(prompts),
                              "prompt_tokens": prompt_tokens, "rows": []}
    for b in batches:
        # Rounds interleave the rows (one pass of each per round), so a slow spell of this noisy
        # machine hits every row alike; "vs all big" is the median of the per-round ratios.
        speeds: dict[str, list[float]] = {name: [] for name, _ in rows_spec}
        decoded = len(prompts)
        for r in range(runs):
            progress(f"batch {b}: round {r + 1} of {runs}")
            for name, routes in rows_spec:
                timed = run_method(lm, prompts, b, new_tokens, 1, "autoregressive", 0.0, routes=routes)
                speeds[name].append(timed["tokens_per_s"])
                decoded = timed["prompts_decoded"]
        base = speeds[rows_spec[0][0]]
        for name, routes in rows_spec:
            # Over the prompts timed, in the groups they were timed in (a router's count
            # depends on the text: a subset would describe other prompts).
            ids, outputs = [], []
            routed = duo_routes(routes, lm.config) is None  # a fixed pattern's count needs no decoding
            for i in range(0, decoded if routed else 0, b):
                out = lm.generate(prompts[i:i + b], max_new_tokens=new_tokens, routes=routes)
                ids += out.prompt_ids
                outputs += out.tokens
            result["rows"].append({
                "batch": b, "routes": name, "big_layers": big_layers(lm, ids, outputs, routes),
                "tokens_per_s": statistics.median(speeds[name]), "runs_tokens_per_s": speeds[name],
                "prompts_decoded": decoded, "prompts_total": len(prompts),
                "vs_all_big": statistics.median(x / y for x, y in zip(speeds[name], base))})
    return result


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    note = decoded_note(result["rows"])
    lines = [f"Duo-LLM decode on {result['model']} ({result['n_layers']} layers, d {result['d_model']}, big FFN "
             f"{result['ffn_dim']}, small {result['small_ffn_dim']}); {result['files']} held-out prompts of "
             f"{result['prompt_tokens']} tokens, {result['new_tokens']} new tokens, median of {result['runs']}; "
             f"{machine_line(m)}", "",
             *([note, ""] if note else []),
             "| batch | routes | big layers / token | tokens/s | vs all big |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['batch']} | {r['routes']} | {r['big_layers']:.2f} of {result['n_layers']} | "
                     f"{r['tokens_per_s']:.0f} | {r['vs_all_big']:.2f}x |")
    return "\n".join(lines)
