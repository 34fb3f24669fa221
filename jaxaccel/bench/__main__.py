"""python -m jaxaccel.bench — measured, reproducible speed figures.

    python -m jaxaccel.bench decode [--models 7m,40m] [--batches 1,8] [--runs 5] [--no-hf]
    python -m jaxaccel.bench train [--configs configs/tiny.yaml,configs/default.yaml] [--compare-devices 8]
    python -m jaxaccel.bench spec [--model builtin:default] [--batches 1,4] [--temperatures 0,0.7] [--no-hf] [--sweep none] [--no-cost]
    python -m jaxaccel.bench startup [--model builtin:default] [--runs 5]
    python -m jaxaccel.bench dyspec [--model builtin:default] [--draft builtin:draft] [--budgets 8,16,32,64,128]
    python -m jaxaccel.bench acceptance --target builtin:default --draft builtin:draft [--temperature 0] [--what-if-top1 0.7,0.8]
    python -m jaxaccel.bench skipdecode [--model builtin:skipdecode] [--batches 1,8] [--speedups 2,3,5]
    python -m jaxaccel.bench duo [--model builtin:duo] [--batches 1,8]
    python -m jaxaccel.bench tokenselect [--model builtin:longctx] [--lengths 8192,32768,65536,131072] [--batches 1,4]
    python -m jaxaccel.bench kernels [--runs 20] [--quick]     # Pallas kernels vs references; exit 1 on a mismatch
"""
from __future__ import annotations

import math
import sys
from typing import Sequence

from pathlib import Path

from jaxaccel.cli import ArgumentParser, csv_list, explain_options, fail, run_cli, writable_output


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def require_peers() -> None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        fail("the Hugging Face baseline needs the peers extra: pip install 'jaxaccel[peers]' (or pass --no-hf)")


def _csv(text: str, cast=str, allow_empty: bool = False) -> tuple:
    return csv_list(text, cast, allow_empty=allow_empty)


def _check_temperatures(temperatures: Sequence[float]) -> None:
    bad = [t for t in temperatures if not (math.isfinite(t) and t >= 0)]
    if bad:
        fail(f"temperatures must be finite numbers >= 0, got {bad[0]}")


def _check_batches(batches: Sequence[int], files: int, extra: int = 0) -> None:
    """Every batch size needs at least one full group of prompts: --files held-out files
    (+ `extra` natural-language prompts). Fewer files may turn out long enough: the run
    checks again once it has read them."""
    if max(batches) > files + extra:
        also = f" + {extra} natural-language prompts" if extra else ""
        fail(f"batch {max(batches)} needs at least {max(batches)} prompts, but --files {files}{also} gives at most "
             f"{files + extra}: use smaller --batches or more --files")


def _template(text: str) -> tuple[int, ...]:
    """A --sweep template such as 4-4-2 (widths per level: repeats are the point, unlike a list of runs)."""
    try:
        return tuple(int(x) for x in text.split("-"))
    except ValueError:
        fail(f"--sweep: {text!r} is not a template (widths joined by '-', e.g. 4-4-2, or 'paper')")


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m jaxaccel.bench", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="which", required=True)
    dec = sub.add_parser("decode", help="autoregressive tokens/s vs Hugging Face transformers and the roofline")
    dec.add_argument("--models", default="7m,40m",
                     help="comma-separated presets (7m, 40m) or model YAML files (configs/models/*.yaml)")
    dec.add_argument("--batches", default="1,8")
    dec.add_argument("--prompt-len", type=int, default=64)
    dec.add_argument("--new-tokens", type=int, default=128)
    dec.add_argument("--runs", type=int, default=5)
    dec.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    dec.add_argument("--no-hf", action="store_true", help="skip the Hugging Face transformers baseline")
    dec.add_argument("--json", default=None, help="also write the results here")
    tr = sub.add_parser("train", help="training tokens/s and MFU of config presets; 8 CPU devices vs 1")
    tr.add_argument("--configs", default="configs/tiny.yaml,configs/default.yaml")
    tr.add_argument("--compare-devices", type=int, default=8, help="emulated CPU devices for the scaling row (1: skip)")
    tr.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    tr.add_argument("--json", default=None)
    tr.add_argument("--devices-only", action="store_true", help=argparse_suppress())
    tr.add_argument("--cpu-devices", type=int, default=None, help=argparse_suppress())
    tr.add_argument("--peak", type=float, default=None, help=argparse_suppress())
    sp = sub.add_parser("spec", help="speculative decoding: autoregressive vs prompt lookup vs Token Recycling")
    sp.add_argument("--model", default="builtin:default")
    sp.add_argument("--batches", default="1,4")
    sp.add_argument("--temperatures", default="0,0.7")
    sp.add_argument("--new-tokens", type=int, default=128)
    sp.add_argument("--runs", type=int, default=3)
    sp.add_argument("--files", type=int, default=8, help="held-out corpus files used as prompts")
    sp.add_argument("--prompt-tokens", type=int, default=256)
    sp.add_argument("--sweep", default=None, help='templates to sweep, e.g. "4-4-2,paper" (default: a built-in '
                                                  'list; "none": no sweep)')
    sp.add_argument("--no-cost", action="store_true", help="skip the verification-cost table (forward time per tree "
                                                           "size)")
    sp.add_argument("--no-hf", action="store_true", help="skip transformers' prompt-lookup baseline")
    sp.add_argument("--json", default=None)
    st = sub.add_parser("startup", help="whole-process decode CLI wall time (cold/warm compile cache) and "
                                        "first-call compile time per method")
    st.add_argument("--model", default="builtin:default")
    st.add_argument("--runs", type=int, default=5, help="warm CLI runs (median)")
    st.add_argument("--repeats", type=int, default=3, help="fresh processes per method for the first-call figure")
    st.add_argument("--methods", default="autoregressive,recycling")
    st.add_argument("--json", default=None)
    dy = sub.add_parser("dyspec", help="draft-model speculation: sps, specinfer, sequoia, dyspec vs autoregressive")
    dy.add_argument("--model", default="builtin:default")
    dy.add_argument("--draft", default="builtin:draft")
    dy.add_argument("--batches", default="1,4")
    dy.add_argument("--temperatures", default="0,0.6")
    dy.add_argument("--budgets", default="8,16,32,64,128")
    dy.add_argument("--methods", default="sps,specinfer,sequoia,dyspec",
                    help="also specinfer-chains: SpecInfer as the papers run it, budget/8 chains of depth 8")
    dy.add_argument("--new-tokens", type=int, default=128)
    dy.add_argument("--runs", type=int, default=3)
    dy.add_argument("--files", type=int, default=8, help="held-out corpus files used as prompts")
    dy.add_argument("--prompt-tokens", type=int, default=256)
    dy.add_argument("--figure", default=None, help="write DySpec's Figure 2 here (one PNG per temperature)")
    dy.add_argument("--json", default=None)
    ac = sub.add_parser("acceptance", help="Sequoia's positional acceptance vector of a draft for a target")
    ac.add_argument("--target", default="builtin:default")
    ac.add_argument("--draft", default="builtin:draft")
    ac.add_argument("--temperature", type=float, default=0.0)
    ac.add_argument("--top-k", type=int, default=None)
    ac.add_argument("--top-p", type=float, default=None)
    ac.add_argument("--max-rank", type=int, default=16)
    ac.add_argument("--what-if-top1", default="",
                    help="also predict tokens per step for drafts whose top token is accepted this often, e.g. 0.7,0.8")
    ac.add_argument("--json", default=None, help="also write it here (method option acceptance=PATH reads it)")
    sk = sub.add_parser("skipdecode", help="SkipDecode: step cost at h layers (cond vs static), tokens/s vs "
                                           "autoregressive")
    sk.add_argument("--model", default="builtin:skipdecode")
    sk.add_argument("--batches", default="1,8")
    sk.add_argument("--speedups", default="2,3,5")
    sk.add_argument("--new-tokens", type=int, default=192)
    sk.add_argument("--max-length", type=int, default=256, help="the schedule's max_length")
    sk.add_argument("--runs", type=int, default=3)
    sk.add_argument("--files", type=int, default=8, help="held-out corpus files used as prompts")
    sk.add_argument("--prompt-tokens", type=int, default=64)
    sk.add_argument("--json", default=None)
    du = sub.add_parser("duo", help="Duo-LLM: decode tokens/s at a 50%% big budget (fixed pattern, router) vs all big")
    du.add_argument("--model", default="builtin:duo")
    du.add_argument("--batches", default="1,8")
    du.add_argument("--pattern", default=None,
                    help="the fixed pattern (B/S/- per layer; _ also skips); default: half big, alternating")
    du.add_argument("--new-tokens", type=int, default=128)
    du.add_argument("--runs", type=int, default=7, help="rounds (each times every row once, interleaved)")
    du.add_argument("--files", type=int, default=8, help="held-out corpus files used as prompts")
    du.add_argument("--prompt-tokens", type=int, default=64)
    du.add_argument("--json", default=None)
    tk = sub.add_parser("tokenselect", help="TokenSelect: attention time per step, decode tokens/s and prefill time "
                                            "vs full attention at long contexts")
    tk.add_argument("--model", default="builtin:longctx",
                    help="the shipped long-context model, or runs/longctx (configs/longctx.yaml's run, the docs' figures)")
    tk.add_argument("--lengths", default="8192,32768,65536,131072", help="cached tokens")
    tk.add_argument("--batches", default="1,4")
    tk.add_argument("--new-tokens", type=int, default=32)
    tk.add_argument("--runs", type=int, default=3)
    tk.add_argument("--reps", type=int, default=16, help="decode steps per timed attention loop")
    tk.add_argument("--prefill-length", type=int, default=32768, help="prompt of the prefill timing (0: skip)")
    tk.add_argument("--prefill-runs", type=int, default=None, help="default: --runs")
    tk.add_argument("--k", type=int, default=None, help="default: the method's (the paper's budget, 2048)")
    tk.add_argument("--n-init", type=int, default=None, help="default: the method's (128)")
    tk.add_argument("--n-local", type=int, default=None, help="default: the method's (512)")
    tk.add_argument("--chunk", type=int, default=None, help="default: the method's (512)")
    tk.add_argument("--cache-threshold", type=float, default=None, help="default: the method's (0.9)")
    tk.add_argument("--json", default=None)
    ke = sub.add_parser("kernels", help="every Pallas kernel against its jnp reference on this backend (agreement, "
                                        "then time on TPU/GPU); exit 1 when one disagrees")
    ke.add_argument("--runs", type=int, default=20, help="timed calls per kernel and reference (median)")
    ke.add_argument("--quick", action="store_true", help="one case per kernel and dtype")
    ke.add_argument("--json", default=None)
    explain_options(p, {
        "json": "also write the raw figures to this JSON file", "runs": "timed runs per case (the median is reported)",
        "batches": "comma-separated batch sizes", "new_tokens": "tokens generated per prompt",
        "prompt_tokens": "tokens of each held-out prompt", "prompt_len": "prompt tokens",
        "model": "model path or builtin:NAME", "target": "target model path or builtin:NAME",
        "draft": "draft model path or builtin:NAME", "temperatures": "comma-separated temperatures (0 = greedy)",
        "temperature": "sampling temperature (0 = greedy)", "top_k": "top-k filter", "top_p": "nucleus mass",
        "budgets": "comma-separated tree budgets", "speedups": "comma-separated mean speedups of the schedule",
        "configs": "comma-separated training configs", "override": "a config KEY=VALUE for every config (repeatable)",
        "methods": "comma-separated decoding methods", "dtype": "parameter and compute dtype",
        "max_rank": "children ranks measured per node"})
    args = p.parse_args(argv)
    if getattr(args, "json", None) == "":  # (an empty name wrote no file, without a word)
        fail("--json needs a file name")
    if getattr(args, "json", None):  # before any work: a long run never ends in a failed write
        writable_output(args.json, what="--json file")
    if getattr(args, "figure", None):
        if not args.figure.endswith(".png"):
            fail(f"--figure must name a .png file (one per temperature is written beside it), got {args.figure!r}")
        writable_output(args.figure, what="--figure file")

    if args.which == "kernels":
        from jaxaccel.bench import kernels
        from jaxaccel.bench.common import write_json, write_partial

        if args.runs < 1:
            fail(f"--runs must be >= 1, got {args.runs}")
        # the results so far go to JSON.partial after every case: a process that dies later (a
        # compiler abort) keeps what it found, and an earlier complete JSON is replaced at the end
        result = kernels.run(args.runs, args.quick, progress=lambda s: print(s, file=sys.stderr, flush=True),
                             on_row=lambda partial: write_partial(args.json, partial) if args.json else None)
        if args.json:
            write_json(args.json, result)
        print(kernels.markdown(result))
        if result["failed"]:
            print(f"error: {result['failed']} of {len(result['cases'])} kernel cases failed (see the table)",
                  file=sys.stderr)
            return 1
        return 0

    if args.which == "tokenselect":
        from jaxaccel.bench import tokenselect
        from jaxaccel.bench.common import write_json
        from jaxaccel.decode.methods import get_method

        lengths, batches = _csv(args.lengths, int), _csv(args.batches, int)
        if not lengths or not batches or min(*lengths, *batches) < 1 or min(args.runs, args.reps, args.new_tokens) < 1:
            fail("lengths, batches, runs, reps and new tokens must be >= 1")
        if args.prefill_length < 0 or (args.prefill_runs is not None and args.prefill_runs < 1):
            fail("--prefill-length must be >= 0 and --prefill-runs >= 1")
        budget = {name: value for name, value in (("k", args.k), ("n_init", args.n_init), ("n_local", args.n_local),
                                                   ("chunk", args.chunk), ("cache_threshold", args.cache_threshold))
                  if value is not None}  # the rest: the method's defaults (tokenselect.BUDGET)
        get_method("tokenselect", **budget)  # bad values: one line, exit 2
        if not (args.model.startswith("builtin:") or Path(args.model).exists()):
            fail(f"--model {args.model!r} does not exist (train it: python -m jaxaccel.train configs/longctx.yaml)")
        result = tokenselect.run(args.model, lengths, batches, new_tokens=args.new_tokens, runs=args.runs,
                                 reps=args.reps, budget=budget, prefill_length=args.prefill_length,
                                 prefill_runs=args.prefill_runs, progress=lambda s: print(s, file=sys.stderr))
        print(tokenselect.markdown(result))
        if args.json:
            write_json(args.json, result)
        return 0

    if args.which == "duo":
        from jaxaccel.bench import duo
        from jaxaccel.bench.common import model_config, write_json

        batches = _csv(args.batches, int)
        if not batches or min(batches) < 1 or min(args.runs, args.files, args.new_tokens, args.prompt_tokens) < 1:
            fail("batches, runs, files, new tokens and prompt tokens must be >= 1")
        _check_batches(batches, args.files)
        config = model_config(args.model)  # the pattern is checked before anything is loaded
        if config is not None:
            duo.check_pattern(config, args.pattern)
        result = duo.run(args.model, batches, args.new_tokens, args.runs, args.files, args.prompt_tokens,
                         args.pattern, progress=lambda s: print(s, file=sys.stderr))
        print(duo.markdown(result))
        if args.json:
            write_json(args.json, result)
        return 0

    if args.which == "skipdecode":
        from jaxaccel.bench import skipdecode
        from jaxaccel.bench.common import write_json

        batches, speedups = _csv(args.batches, int), _csv(args.speedups, float)
        if (not batches or min(batches) < 1 or args.runs < 1 or args.files < 1 or args.new_tokens < 1
                or args.prompt_tokens < 1):
            fail("batches, runs, files, new tokens and prompt tokens must be >= 1")
        if not speedups or min(speedups) < 1:
            fail("speedups must be >= 1")
        if args.max_length <= args.prompt_tokens:
            fail(f"--max-length ({args.max_length}) must exceed --prompt-tokens ({args.prompt_tokens})")
        if args.prompt_tokens + args.new_tokens != args.max_length:  # the speedups are means over max_length
            fail(f"--prompt-tokens + --new-tokens ({args.prompt_tokens + args.new_tokens}) must equal --max-length "
                 f"({args.max_length}): a schedule's speedup is its mean over the positions up to max_length, so "
                 f"another generation length would run another mean than the row's nominal speedup")
        _check_batches(batches, args.files)
        result = skipdecode.run(args.model, batches, speedups, args.new_tokens, args.runs, args.files,
                                args.prompt_tokens, args.max_length, progress=lambda s: print(s, file=sys.stderr))
        print(skipdecode.markdown(result))
        if args.json:
            write_json(args.json, result)
        return 0

    if args.which == "dyspec":
        from jaxaccel.bench import draft as draft_bench
        from jaxaccel.bench.common import model_config, write_json, write_partial
        from jaxaccel.bench.spec import NATURAL_PROMPTS
        from jaxaccel.decode.methods import METHODS, get_method

        batches, budgets = _csv(args.batches, int), _csv(args.budgets, int)
        temperatures, methods = _csv(args.temperatures, float), _csv(args.methods)
        if (not batches or min(batches) < 1 or not budgets or min(budgets) < 1 or args.runs < 1 or args.files < 1
                or args.new_tokens < 1 or args.prompt_tokens < 1):
            fail("batches, budgets, runs, files, new tokens and prompt tokens must be >= 1")
        _check_temperatures(temperatures)
        _check_batches(batches, args.files, len(NATURAL_PROMPTS))
        unknown = [m for m in methods if m not in draft_bench.METHODS]
        if unknown:
            fail(f"unknown method {unknown[0]!r}; choose from {', '.join(draft_bench.METHODS)}")
        assert all(m in METHODS for m in draft_bench.DEFAULT_METHODS)
        for name in methods:  # bad budgets: one line before the first baseline is timed
            for budget in budgets:
                method, opts = draft_bench.method_options(name, budget, args.draft)
                get_method(method, **opts)
        target_config, draft_config = model_config(args.model), model_config(args.draft)
        if target_config is not None and draft_config is not None:  # before the first baseline is timed
            draft_bench.check_draft_config(draft_config, target_config)
        result = draft_bench.run(args.model, args.draft, batches, temperatures, budgets, methods, args.new_tokens,
                                 args.runs, args.files, args.prompt_tokens, args.figure,
                                 progress=lambda s: print(s, file=sys.stderr),
                                 partial=(lambda r: write_partial(args.json, r)) if args.json else None)
        print(draft_bench.markdown(result))
        if args.json:
            write_json(args.json, result)
        return 0

    if args.which == "acceptance":
        from jaxaccel.bench import draft as draft_bench
        from jaxaccel.bench.common import model_config, write_json
        from jaxaccel.decode.sampling import GREEDY_BELOW, check_sampling_args

        check_sampling_args(args.temperature, args.top_k, args.top_p)
        if args.temperature < GREEDY_BELOW and (args.top_k is not None or args.top_p is not None):
            fail(f"--top-k / --top-p apply only when sampling: with --temperature {args.temperature:g} the vector "
                 f"is measured greedily (give a temperature > 0 to measure under the filters)")
        if args.max_rank < 1:
            fail("max-rank must be >= 1")
        what_if = _csv(args.what_if_top1, float, allow_empty=True)
        if any(not 0.0 <= t < 1.0 for t in what_if):
            fail(f"--what-if-top1: every value must be in [0, 1), got {args.what_if_top1!r}")
        target_config, draft_config = model_config(args.target), model_config(args.draft)
        if target_config is not None and draft_config is not None:  # else a meaningless vector would be cached
            draft_bench.check_draft_config(draft_config, target_config)
        if target_config is not None and args.max_rank > target_config.vocab_size:  # (ranks past it are 0)
            fail(f"--max-rank {args.max_rank} is more than the vocabulary's {target_config.vocab_size} tokens")
        result = draft_bench.acceptance(args.target, args.draft, args.temperature, args.top_k, args.top_p,
                                        args.max_rank, what_if)
        print(" ".join(f"{x:.4f}" for x in result["acceptance"]), f"(sum {result['sum']:.3f})")
        print(draft_bench.acceptance_markdown(result))
        if args.json:
            write_json(args.json, result)
        return 0

    if args.which == "startup":
        from jaxaccel.bench import startup
        from jaxaccel.bench.common import model_config, write_json

        from jaxaccel.decode.methods import get_method

        if args.runs < 1 or args.repeats < 1:
            fail("runs and repeats must be >= 1")
        methods = _csv(args.methods)
        if not methods:
            fail("--methods must name at least one method")
        for m in methods:
            get_method(m)  # an unknown one: one line, exit 2, before any process starts
        model_config(args.model)  # a path that is no model: one line before any process starts
        result = startup.run(args.model, args.runs, methods, args.repeats,
                             progress=lambda s: print(s, file=sys.stderr))
        print(startup.markdown(result))
        if args.json:
            write_json(args.json, result)
        return 0

    if args.which == "spec":
        from jaxaccel.bench import spec
        from jaxaccel.bench.common import write_json, write_partial

        batches = _csv(args.batches, int)
        temperatures = _csv(args.temperatures, float)
        if (not batches or min(batches) < 1 or args.runs < 1 or args.new_tokens < 1 or args.files < 1
                or args.prompt_tokens < 1):
            fail("batches, runs, new tokens, files and prompt tokens must be >= 1")
        _check_temperatures(temperatures)
        _check_batches(batches, args.files, len(spec.NATURAL_PROMPTS))
        sweep = spec.SWEEP
        if args.sweep is not None and args.sweep.strip().lower() == "none":
            sweep = ()
        elif args.sweep:
            sweep = tuple(t if t == "paper" else _template(t) for t in _csv(args.sweep))
        from jaxaccel.decode.recycling import template_widths
        from jaxaccel.errors import JaxaccelError

        for t in sweep:  # before anything is timed (a bad width used to fail after the main table)
            try:
                template_widths(t if t == "paper" else list(t), 8)
            except JaxaccelError as e:
                fail(f"--sweep {'-'.join(map(str, t)) if t != 'paper' else t}: {e}")
        if not args.no_hf:
            require_peers()
        result = spec.run(args.model, batches, temperatures, args.new_tokens, args.runs, args.files, args.prompt_tokens,
                          sweep, hf=not args.no_hf, cost=not args.no_cost, progress=lambda s: print(s, file=sys.stderr),
                          partial=(lambda r: write_partial(args.json, r)) if args.json else None)
        print(spec.markdown(result))
        if args.json:
            write_json(args.json, result)
        return 0

    if args.which == "train":
        if args.cpu_devices:
            import jax

            jax.config.update("jax_num_cpu_devices", args.cpu_devices)
        from jaxaccel.bench import train as train_bench
        from jaxaccel.bench.common import write_json

        configs = _csv(args.configs)
        for c in configs:
            if not Path(c).is_file():
                fail(f"config file {c!r} does not exist")
        # --compare-devices >= 1, and the multi-device row's config must split its batch over the devices: checked before the 1-device rows
        train_bench.check_overrides(configs[:1] if args.devices_only else configs, args.override,
                                    (args.cpu_devices or 1) if args.devices_only else args.compare_devices)
        if args.devices_only:
            result = train_bench.run_devices_only(configs[0], args.peak, args.cpu_devices or 1, tuple(args.override))
        else:
            result = train_bench.run(configs, args.compare_devices, tuple(args.override),
                                     progress=lambda s: print(s, file=sys.stderr))
            print(train_bench.markdown(result))
        if args.json:
            write_json(args.json, result)
        return 0

    if args.which == "decode":
        from jaxaccel.bench import decode

        models = [decode.resolve_model(m) for m in _csv(args.models)]
        batches = _csv(args.batches, int)
        if not batches or min(batches) < 1 or args.runs < 1 or args.new_tokens < 1 or args.prompt_len < 1:
            fail("batches, runs, new tokens and prompt length must be >= 1")
        hf = not args.no_hf
        if hf:
            require_peers()
            from jaxaccel.convert.hf import check_exportable
            from jaxaccel.errors import JaxaccelError

            for label, config in models:  # the HF baseline exports each model: refused before any is timed
                try:
                    check_exportable(config)
                except JaxaccelError as e:
                    fail(f"model {label}: {e} (pass --no-hf to time jaxaccel alone)")
        result = decode.run(models, batches, args.prompt_len, args.new_tokens, args.runs, hf=hf, dtype=args.dtype,
                            progress=lambda s: print(s, file=sys.stderr))
        print(decode.markdown(result))
        if args.json:
            from jaxaccel.bench.common import write_json

            write_json(args.json, result)
    return 0


def entry() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    entry()
