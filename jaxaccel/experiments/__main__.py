"""python -m jaxaccel.experiments sweep|collect|plot|report|skipdecode|tokenselect|duo — run and read experiment sweeps, and the methods' evaluations.

    python -m jaxaccel.experiments sweep configs/experiments/repetition.yaml --dry-run
    python -m jaxaccel.experiments sweep configs/experiments/repetition.yaml            # rerun to resume
    python -m jaxaccel.experiments sweep configs/experiments/repetition.yaml --only 'repeat/epochs=4*'
    python -m jaxaccel.experiments sweep configs/experiments/repetition-pod.yaml --distributed \\
        output_dir=gs://BUCKET/sweeps/repetition                # on every host of a TPU pod
    python -m jaxaccel.experiments collect CONFIG               # rebuild the results file only
    python -m jaxaccel.experiments plot runs/token_crisis/repetition.json --out docs/token_crisis
    python -m jaxaccel.experiments report runs/token_crisis/repetition.json --out table.md
    python -m jaxaccel.experiments skipdecode [--base runs/deep] [--out runs/experiments/skipdecode]   # issue 9
    python -m jaxaccel.experiments duo [--model runs/duo] [--out runs/experiments/duo]
    python -m jaxaccel.experiments tokenselect [--model runs/longctx] [--lengths 256,1024,...,65536]   # issue 10

`KEY=VALUE` after the sweep file override its base training config (as for the trainer).
Bad input (unknown keys, empty axes, duplicate run names, a budget the corpus cannot meet, a
folder or results file that belongs to something else) is a one-line error with exit status 2;
nothing is trained or overwritten.
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

from jaxaccel.cli import (ArgumentParser, add_distributed_arguments, csv_list, explain_options, init_distributed,
                          log_without_tracebacks, run_cli)
from jaxaccel.files import write_atomically


# Keys that mark a results file written before it named its experiment (docs/duo, docs/skipdecode).
_EARLIER_RESULTS = {"duo": ("oracle_mode", "small_ffn_dim"), "skipdecode": ("base", "eval_tokens_per_row")}


def _check_results_owner(path: Path, experiment: str) -> None:
    """Refuse (one line, exit 2) a results.json in the output folder that another experiment or
    sweep wrote: this experiment rewrites it when it ends."""
    import json

    from jaxaccel.cli import fail

    if not path.exists():
        return
    try:
        old = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError):
        old = None
    ours = isinstance(old, dict) and (old.get("experiment") == experiment or (
        "experiment" not in old and all(k in old for k in _EARLIER_RESULTS[experiment])))
    if not ours:
        fail(f"{path} is not a {experiment} experiment's results file; choose another --out folder")


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m jaxaccel.experiments", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in (("sweep", "train the sweep's runs (skipping finished ones, resuming killed ones)"),
                            ("collect", "rebuild the sweep's results file from its run folders, training nothing")):
        s = sub.add_parser(name, help=help_text)
        s.add_argument("config", help="sweep file (configs/experiments/*.yaml)")
        s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the base training config")
        s.add_argument("--results", default=None, help="results file (default: the sweep file's results:, else "
                                                       "OUTPUT_DIR/results.json)")
        if name == "sweep":
            s.add_argument("--only", action="append", default=[], metavar="NAME",
                           help="a run name, group name or shell pattern (repeatable)")
            s.add_argument("--dry-run", action="store_true", help="print the plan and its estimated cost; train nothing")
            s.add_argument("--flops-per-s", type=float, default=None,
                           help="sustained training FLOP/s for the time estimate (default: 30%% of a measured matmul)")
            add_distributed_arguments(s)
    plot = sub.add_parser("plot", help="PNG plots of a results file")
    plot.add_argument("results")
    plot.add_argument("--out", default=None, help="folder (default: plots/ beside the results file)")
    report = sub.add_parser("report", help="Markdown tables of a results file")
    report.add_argument("results")
    report.add_argument("--out", default=None, help="write the Markdown here (default: print it)")
    sd = sub.add_parser("skipdecode", help="SkipDecode: fine-tune per speedup, evaluate quality and speed "
                                           "against the full model and two baselines")
    sd.add_argument("--base", default="runs/deep", help="the deep model (configs/deep.yaml's run folder)")
    sd.add_argument("--root", default="runs/skipdecode", help="where the fine-tunes go")
    sd.add_argument("--configs", default="configs", help="folder with skipdecode-{S}x.yaml")
    sd.add_argument("--speedups", default="1,2,3,5")
    sd.add_argument("--prompt-tokens", type=int, default=64)
    sd.add_argument("--max-length", type=int, default=256)
    sd.add_argument("--eval-rows", type=int, default=64, help="held-out windows scored teacher forced")
    sd.add_argument("--files", type=int, default=8, help="held-out files used as prompts (greedy agreement, speed)")
    sd.add_argument("--batches", default="1,8")
    sd.add_argument("--runs", type=int, default=3)
    sd.add_argument("--dispatch", choices=["cond", "switch"], default="cond")
    sd.add_argument("--out", default="runs/experiments/skipdecode",
                    help="results.json and plots go here (docs/skipdecode holds the committed run)")
    ts = sub.add_parser("tokenselect", help="TokenSelect: long-context retrieval accuracy at 256-64K tokens vs full "
                                            "attention, StreamingLLM and random selection")
    ts.add_argument("--model", default="runs/longctx",
                    help="the model (configs/longctx.yaml's run folder; builtin:longctx is that model, shipped)")
    ts.add_argument("--lengths", default="256,1024,2048,4096,8192,16384,32768,65536", help="context lengths (tokens)")
    ts.add_argument("--tasks", default="passkey,kv_lookup,code_needle")
    ts.add_argument("--methods", default="full,tokenselect,tokenselect_original,streamingllm,random")
    ts.add_argument("--examples", type=int, default=10, help="examples per task and length")
    ts.add_argument("--batch", type=int, default=4, help="examples decoded together")
    ts.add_argument("--k", type=int, default=None,
                    help="top-k selected keys (default: the trained length / 4; the issue's 2048 at 8K)")
    ts.add_argument("--n-init", type=int, default=None, help="first keys always kept (default: the trained length / 64)")
    ts.add_argument("--n-local", type=int, default=None, help="last keys always kept (default: the trained length / 16)")
    ts.add_argument("--chunk", type=int, default=None, help="prefill chunk (default: the trained length / 16)")
    ts.add_argument("--cache-threshold", default="0.9", help="selection cache cosine, or 'none' (off)")
    ts.add_argument("--pool", type=int, default=None,
                    help="max-pool the scores over this odd width (selects the neighbours of high scorers too)")
    ts.add_argument("--full-max-length", type=int, default=None,
                    help="skip full attention above this length (its prefill is quadratic)")
    ts.add_argument("--seed", type=int, default=0)
    ts.add_argument("--out", default="runs/tokenselect",
                    help="results.json, results.md and the plot go here (docs/tokenselect holds the committed run)")
    du = sub.add_parser("duo", help="Duo-LLM: exhaustive and beam oracles, fixed / random baselines, routers")
    du.add_argument("--model", default="runs/duo", help="a random-routing Duo model (configs/duo.yaml's run folder)")
    du.add_argument("--config", default="configs/duo.yaml", help="its training config (the corpus to hold out)")
    du.add_argument("--eval-rows", type=int, default=32, help="held-out windows: half fit the routers, half test")
    du.add_argument("--seq-len", type=int, default=256)
    du.add_argument("--skip-rows", type=int, default=2,
                    help="test windows scored under all 3^L big/small/skip patterns (0: none)")
    du.add_argument("--oracle", choices=["auto", "exhaustive", "beam"], default="auto",
                    help="exhaustive where 2^L patterns fit the limit (auto), or the beam oracle")
    du.add_argument("--beam-width", type=int, default=4)
    du.add_argument("--router-budgets", default="1,2,4,6", help="big layers per token the routers are trained for")
    du.add_argument("--router-steps", type=int, default=150)
    du.add_argument("--random-draws", type=int, default=100)
    du.add_argument("--batch", type=int, default=32, help="rows per forward")
    du.add_argument("--seed", type=int, default=0)
    du.add_argument("--out", default="runs/experiments/duo",
                    help="results.json, results.md and the plots go here (docs/duo holds the committed run)")
    du.add_argument("--save-router", default=None, metavar="DIR",
                    help="save the model here with its router of the --router-budgets value nearest half the "
                         "layers (decoding uses its routes)")
    explain_options(p, {
        "speedups": "comma-separated mean speedups of the schedule", "prompt_tokens": "tokens of each held-out prompt",
        "max_length": "the schedule's length: prompt + generated tokens per evaluation window",
        "batches": "comma-separated batch sizes", "runs": "timed runs per case (the median is reported)",
        "dispatch": "skipped layers: a lax.cond per layer (cond) or a lax.switch over one program per depth "
                    "(switch)", "tasks": "comma-separated retrieval tasks",
        "methods": "comma-separated methods to evaluate", "seed": "random seed", "seq_len": "tokens per window",
        "beam_width": "patterns kept per layer by the beam oracle", "router_steps": "router training steps",
        "random_draws": "random routes drawn per budget (the random baseline)"})
    # KEY=VALUE overrides may come after options too (`sweep CONFIG --dry-run output_dir=...`).
    args, extra = p.parse_known_args(argv)
    log_without_tracebacks()  # sweeps and fine-tunes train: a failed save is one line, as in train
    stray = [e for e in extra if e.startswith("-") or "=" not in e or args.command not in ("sweep", "collect")]
    if stray:
        p.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    # Outputs are checked before any work: a long run never ends in a failed write.
    from jaxaccel.cli import fail, writable_output

    if getattr(args, "seed", 0) < 0:  # numpy's generators take only non-negative seeds
        fail(f"--seed must be >= 0, got {args.seed}")
    if args.command in ("skipdecode", "duo", "tokenselect", "plot") and args.out:
        writable_output(args.out, folder=True, what="--out folder")
    if args.command == "report" and args.out:
        same = Path(args.out).resolve() == Path(args.results).resolve() or (
            Path(args.out).exists() and Path(args.results).exists() and os.path.samefile(args.out, args.results))
        if same:
            fail("--out is the results file itself; give another file for the Markdown")
        writable_output(args.out, what="--out file")
    if args.command in ("skipdecode", "duo"):  # rewritten at the end: never another experiment's results
        _check_results_owner(Path(args.out) / "results.json", args.command)
    if args.command == "duo" and args.save_router:
        from jaxaccel.decode.lm import check_save_destination

        writable_output(args.save_router, folder=True, what="--save-router folder", remote=True)
        # a folder holding other files: refused now, not after the run
        check_save_destination(args.save_router, "choose an empty or new --save-router folder")

    if args.command == "skipdecode":
        import json

        from jaxaccel.cli import fail
        from jaxaccel.experiments import skipdecode

        speedups = csv_list(args.speedups, float, "--speedups")
        batches = csv_list(args.batches, int, "--batches")
        for s in speedups:
            if not (Path(args.configs) / f"skipdecode-{s:g}x.yaml").is_file():
                fail(f"no config {Path(args.configs) / f'skipdecode-{s:g}x.yaml'} for speedup {s:g}")
        if not Path(args.base).exists():
            fail(f"--base {args.base!r} does not exist (train it: python -m jaxaccel.train configs/deep.yaml)")
        if (min(args.eval_rows, args.files, args.runs, args.prompt_tokens, *batches) < 1
                or args.max_length <= args.prompt_tokens):
            fail("eval rows, files, runs, prompt tokens and batches must be >= 1, and --max-length > --prompt-tokens")
        results = skipdecode.run(args.base, args.root, args.configs, speedups, args.prompt_tokens, args.max_length,
                                 args.eval_rows, args.files, batches, args.runs, args.dispatch)
        out = Path(args.out)
        write_atomically(out / "results.json", json.dumps({"experiment": "skipdecode", **results}, indent=2))
        for path in skipdecode.plot(results, out):
            print(path)
        print(skipdecode.markdown(results))
        print("\n".join(skipdecode.summary(results)))
        return 0

    if args.command == "duo":
        import json

        from jaxaccel.cli import fail
        from jaxaccel.experiments import duo

        budgets = csv_list(args.router_budgets, int, "--router-budgets", allow_empty=True)  # none: no routers
        if args.save_router and not budgets:
            fail("--save-router needs --router-budgets: the router it saves is one of them")
        if min(args.eval_rows - 1, args.seq_len, args.beam_width, args.router_steps, args.random_draws,
               args.batch) < 1 or args.skip_rows < 0:
            fail("--eval-rows must be >= 2, --skip-rows >= 0, and --seq-len, --beam-width, --router-steps, "
                 "--random-draws and --batch >= 1")
        if not (args.model.startswith("builtin:") or Path(args.model).exists()):
            fail(f"--model {args.model!r} does not exist (train it: python -m jaxaccel.train configs/duo.yaml)")
        if not Path(args.config).is_file():
            fail(f"--config {args.config!r} does not exist")
        results = duo.run(args.model, args.config, args.eval_rows, args.seq_len, args.skip_rows, args.beam_width,
                          budgets, args.random_draws, args.router_steps, args.batch, args.seed, args.save_router,
                          args.oracle)
        results["command"] = "python -m jaxaccel.experiments " + shlex.join(list(argv) if argv is not None
                                                                              else sys.argv[1:])
        out = Path(args.out)
        write_atomically(out / "results.json", json.dumps({"experiment": "duo", **results}, indent=2))
        text = duo.markdown(results) + "\n\n" + "\n".join(f"- {line}" for line in duo.summary(results)) + "\n"
        write_atomically(out / "results.md", text)
        for path in duo.plot(results, out):
            print(path)
        print(text)
        return 0

    if args.command == "tokenselect":
        from jaxaccel.cli import fail
        from jaxaccel.data.longctx import ALL_TASKS
        from jaxaccel.experiments import tokenselect

        lengths = csv_list(args.lengths, int, "--lengths")
        tasks = csv_list(args.tasks, str, "--tasks")
        methods = csv_list(args.methods, str, "--methods")
        bad = [t for t in tasks if t not in ALL_TASKS] + [m for m in methods if m not in tokenselect.METHODS]
        if bad:
            fail(f"unknown task or method {bad[0]!r}; tasks: {', '.join(ALL_TASKS)}; methods: "
                 f"{', '.join(tokenselect.METHODS)}")
        if not lengths or not tasks or not methods or min(lengths) < 1 or args.examples < 1 or args.batch < 1:
            fail("lengths, tasks, methods, --examples and --batch must be non-empty and >= 1")
        if args.full_max_length is not None and args.full_max_length < 1:
            fail(f"--full-max-length must be >= 1, got {args.full_max_length}")
        try:
            threshold = None if args.cache_threshold.lower() in ("none", "off") else float(args.cache_threshold)
        except ValueError:
            fail(f"--cache-threshold must be a number or 'none', got {args.cache_threshold!r}")
        # what was given; evaluate() scales the rest to the model's trained length
        budget = {name: value for name, value in (("k", args.k), ("n_init", args.n_init), ("n_local", args.n_local),
                                                   ("chunk", args.chunk), ("pool", args.pool)) if value is not None}
        budget["cache_threshold"] = threshold
        from jaxaccel.decode.methods import get_method

        get_method("tokenselect", **budget)  # bad budget values: one line, exit 2, before loading anything
        if not (args.model.startswith("builtin:") or Path(args.model).exists()):
            fail(f"--model {args.model!r} does not exist (train it: python -m jaxaccel.train configs/longctx.yaml, "
                 f"or use builtin:longctx)")
        import jaxaccel

        lm = jaxaccel.load(args.model)
        from jaxaccel.decode.lm import request_lengths

        for n in lengths:  # the longest context's KV cache must fit: one line now, not an OOM kill later
            full = "full" in methods and (args.full_max_length is None or n <= args.full_max_length)
            lm._check_cache_fits(min(args.batch, args.examples), request_lengths(n, 1)[1],
                                 "use shorter --lengths, a smaller --batch or --full-max-length",
                                 prefill_chunk=lm.prefill_chunk if full else None)  # full attention's prefill
        generator = tokenselect.model_tasks(lm, args.model)
        too_short = [(t, n) for t in tasks for n in lengths if n < generator.min_length(t)]
        if too_short:
            fail(f"{too_short[0][0]} needs at least {generator.min_length(too_short[0][0])} tokens, "
                 f"--lengths has {too_short[0][1]}")
        results = tokenselect.evaluate(lm, generator, lengths=lengths, task_names=tasks, methods=methods,
                                       examples=args.examples, budget=budget, batch=args.batch, seed=args.seed,
                                       full_max_length=args.full_max_length, out=args.out, model=args.model)
        for path in tokenselect.write_report(results, args.out):
            print(path)
        print(tokenselect.markdown(results))
        print("\n".join(results["summary"]))
        return 0

    if args.command in ("sweep", "collect"):
        if args.command == "sweep":
            init_distributed(args, p)
        from jaxaccel.experiments.runner import run_sweep
        from jaxaccel.experiments.spec import load_sweep

        if args.results is not None and not args.results.strip():
            fail("--results is empty: give a file, or leave it out for the sweep's own")
        sweep = load_sweep(args.config, args.overrides, results=args.results)
        # The command that reproduces the whole sweep (not this call's --only selection).
        command = shlex.join(["python", "-m", "jaxaccel.experiments", "sweep", args.config, *args.overrides,
                              *(["--results", args.results] if args.results else [])])
        if args.command == "collect":
            run_sweep(sweep, collect=True, command=command)
        elif args.dry_run:
            run_sweep(sweep, args.only, dry_run=True, flops_per_s=args.flops_per_s)
        else:
            # Runs of one sweep share shapes (often all but the data differ): compiled steps are
            # kept in JAX's persistent cache (jaxaccel.decode.compile_cache, $JAXACCEL_COMPILE_CACHE).
            from jaxaccel.decode import compile_cache

            compile_cache.enable()
            run_sweep(sweep, args.only, flops_per_s=args.flops_per_s, command=command)
        return 0

    from jaxaccel.experiments.results import read_results

    doc = read_results(args.results)
    if args.command == "plot":
        from jaxaccel.experiments.plots import plot_results

        out = args.out or str(Path(args.results).parent / "plots")
        for path in plot_results(doc, out):
            print(path)
        return 0
    from jaxaccel.experiments.report import render_report

    text = render_report(doc)
    if args.out:
        write_atomically(Path(args.out), text)
        print(args.out)
    else:
        print(text, end="")
    return 0


def entry() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    entry()
