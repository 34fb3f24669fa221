"""Duo-LLM decode speed (issue 11): what a 50% big budget buys end to end.

Decode tokens/s of one Duo model on held-out prompts, batch 1 and 8, median of `runs`, for:
all big (the baseline: the dense big model's compute), a fixed pattern with half the layers
big (every token the same routes: each layer traces only its FFN), the model's router when it
has one (per-token routes: `lax.switch` at batch 1, grouped dispatch with a capacity ladder at
batch >= 2), and all small (the floor). Each routed row reports how many layers per token
actually took the big FFN (teacher-forced over its prompts and outputs).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.bench.common import machine, machine_line
from jaxaccel.bench.spec import heldout_prompts, run_method
from jaxaccel.errors import InvalidArgumentError


def half_pattern(n_layers: int) -> str:
    """Half the layers big, the later ones (where a low-budget oracle tends to put them), e.g.
    SSSSBBBB for 8 layers."""
    big = n_layers // 2
    return "S" * (n_layers - big) + "B" * big


def big_layers(lm, sequences: list[list[int]], routes: str | None) -> float:
    """Mean number of layers per token that took the big FFN, teacher forced."""
    from jaxaccel.decode.lm import duo_routes
    from jaxaccel.model.transformer import forward

    plan = duo_routes(routes, lm.config)
    width = max(len(s) for s in sequences)
    tokens = np.zeros((len(sequences), width), np.int32)
    for i, s in enumerate(sequences):
        tokens[i, :len(s)] = s
    _, _, aux = jax.jit(lambda p, t: forward(p, lm.config, t, plan=plan, return_aux=True))(lm.params,
                                                                                           jnp.asarray(tokens))
    return float(jnp.sum(aux["duo_p_big"]))


def run(model: str, batches: Sequence[int], new_tokens: int, runs: int, files: int, prompt_tokens: int,
        pattern: str | None = None, progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    import jaxaccel

    lm = jaxaccel.load(model)
    if not lm.config.duo.enabled:
        raise InvalidArgumentError(f"{model} is not a Duo-LLM model (model.duo.enabled is off)")
    n = lm.config.n_layers
    pattern = pattern or half_pattern(n)
    rows_spec = [("all big", "big"), (f"fixed {pattern}", pattern)]
    if lm.config.duo.router:
        rows_spec.append(("router", None))
    rows_spec.append(("all small", "small"))
    prompts = heldout_prompts(lm, files, prompt_tokens)
    result: dict[str, Any] = {"machine": machine(), "model": model, "n_layers": n, "d_model": lm.config.d_model,
                              "ffn_dim": lm.config.ffn_dim, "small_ffn_dim": lm.config.small_ffn_dim,
                              "new_tokens": new_tokens, "runs": runs, "files": len(prompts),
                              "prompt_tokens": prompt_tokens, "rows": []}
    for b in batches:
        base = None
        for name, routes in rows_spec:
            progress(f"batch {b}: {name}")
            r = run_method(lm, prompts, b, new_tokens, runs, "autoregressive", 0.0, routes=routes)
            out = lm.generate(prompts[:b], max_new_tokens=new_tokens, routes=routes)
            used = big_layers(lm, [p + t for p, t in zip(out.prompt_ids, out.tokens)], routes)
            base = r["tokens_per_s"] if base is None else base
            result["rows"].append({"batch": b, "routes": name, "big_layers": used, "tokens_per_s": r["tokens_per_s"],
                                   "runs_tokens_per_s": r["runs_tokens_per_s"], "vs_all_big": r["tokens_per_s"] / base})
    return result


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"Duo-LLM decode on {result['model']} ({result['n_layers']} layers, d {result['d_model']}, big FFN "
             f"{result['ffn_dim']}, small {result['small_ffn_dim']}); {result['files']} held-out prompts of "
             f"{result['prompt_tokens']} tokens, {result['new_tokens']} new tokens, median of {result['runs']}; "
             f"{machine_line(m)}", "",
             "| batch | routes | big layers / token | tokens/s | vs all big |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['batch']} | {r['routes']} | {r['big_layers']:.2f} of {result['n_layers']} | "
                     f"{r['tokens_per_s']:.0f} | {r['vs_all_big']:.2f}x |")
    return "\n".join(lines)
