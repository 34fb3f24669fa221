"""python -m jaxaccel.decode — generate text from a jaxaccel checkpoint or a Hugging Face model.

Examples:
    python -m jaxaccel.decode --model path/to/model --prompt "def fib(n):" --max-new-tokens 64
    python -m jaxaccel.decode --model path --prompt-ids 1,2,3 --output json
    python -m jaxaccel.decode --model path --prompts-file prompts.jsonl --temperature 0.7 --top-p 0.9
"""
from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from jaxaccel.cli import ArgumentParser, fail, run_cli

SAMPLE_PROMPT = 'class Stack:\n    """A last-in, first-out stack."""\n\n    def __init__(self):\n'


def build_parser() -> ArgumentParser:
    from jaxaccel.decode.methods import METHODS  # names only: no model code is built

    p = ArgumentParser(prog="python -m jaxaccel.decode", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="jaxaccel checkpoint, training output folder, Hugging Face model folder, or "
                                    "builtin:NAME, NAME one of default, draft, skipdecode, duo, longctx "
                                    "(default: builtin:default, the shipped code model)")
    # one list in command-line order: prompts are decoded (and numbered) in the order given
    p.add_argument("--prompt", action="append", dest="prompts", default=[], type=lambda s: ("--prompt", s),
                   metavar="TEXT", help="prompt text (repeatable)")
    p.add_argument("--prompt-ids", action="append", dest="prompts", type=lambda s: ("--prompt-ids", s),
                   metavar="IDS", help="prompt as comma-separated token ids (repeatable)")
    p.add_argument("--prompts-file", help='JSONL file: one {"prompt": "..."} (or {"text": "..."}, or a JSON '
                                          'string) or {"prompt_ids": [...]} per line')
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per prompt (default: 128)")
    p.add_argument("--method", default="autoregressive",
                   help=f"decoding method: {', '.join(sorted(METHODS))} (default: autoregressive)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. --option template=paper (repeatable; a value is read as YAML, "
                        "and None or null means no value)")
    p.add_argument("--routes", default=None,
                   help="Duo-LLM models: big, small, or one of B/S/- per layer (e.g. BSBSSBSB; _ also skips, "
                        "so a pattern may start with it: _SBB...); default: the model's router, else all big")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: 0)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="parameter and compute dtype (default: the checkpoint's)")
    p.add_argument("--mesh", default=None, help="shard over a device mesh, e.g. tensor=4,data=2")
    p.add_argument("--output", choices=["text", "json"], default="text")
    return p


def read_prompts(args, where: list[str] | None = None) -> list[Any]:
    """The prompts of --prompt / --prompt-ids (in their order), then of --prompts-file.
    `where`, if given, gets each prompt's source (`--prompt-ids '1,2'`, `p.jsonl:3`)."""
    prompts: list[Any] = []
    where = [] if where is None else where
    for flag, text in args.prompts:
        where.append(f"{flag} {text!r:.40}")
        if flag == "--prompt":
            prompts.append(text)
            continue
        try:
            # "1, 2," is [1, 2]; "1,,2" an error; "1 2" too (it is not 12); "": an empty prompt
            items = [t.strip() for t in text.strip().removesuffix(",").split(",")]
            if any(not t.isascii() or not t.lstrip("-").isdigit() for t in items if items != [""]):
                raise ValueError(text)
            prompts.append([] if items == [""] else [int(t) for t in items])
        except ValueError:
            fail(f"--prompt-ids {text!r}: expected comma-separated integers")
    if args.prompts_file is not None:
        if not args.prompts_file.strip():
            fail("--prompts-file must be a path, got an empty string")
        from jaxaccel.files import unsupported_location

        if problem := unsupported_location(args.prompts_file, remote=False):  # not the local 'gs:/b/p.jsonl'
            fail(f"--prompts-file {problem}")
        path = Path(args.prompts_file)
        # JSONL separates records by "\n" only: str.splitlines would also split at U+2028 and
        # friends, which are legal unescaped inside a JSON string.
        text = read_prompts_file(path)
        if not text.strip():
            fail(f"prompts file {str(path)!r} holds no prompts")
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{path}:{n}: not valid JSON ({e.msg})")
            if isinstance(item, dict) and len({"prompt_ids", "prompt", "text"} & set(item)) > 1:
                fail(f'{path}:{n}: give one of "prompt", "text" or "prompt_ids", not {sorted({"prompt_ids", "prompt", "text"} & set(item))}')
            where.append(f"{path}:{n}")
            if isinstance(item, dict) and "prompt_ids" in item:
                ids = item["prompt_ids"]
                if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                    fail(f'{path}:{n}: "prompt_ids" must be a list of integers')
                prompts.append(ids)
            elif isinstance(item, dict) and ("prompt" in item or "text" in item):
                key = "prompt" if "prompt" in item else "text"
                text = item[key]
                if not isinstance(text, str):
                    fail(f'{path}:{n}: "{key}" must be a string')
                prompts.append(text)
            elif isinstance(item, str):
                prompts.append(item)
            else:
                fail(f'{path}:{n}: expected {{"prompt": "..."}} or {{"prompt_ids": [...]}}')
    return prompts


def read_prompts_file(path: Path) -> str:
    """The file's text, or a one-line error: missing, a directory, unreadable, or not UTF-8 text."""
    name = repr(str(path))
    if not path.exists():
        fail(f"prompts file {name} does not exist")
    if path.is_dir():
        fail(f"prompts file {name} is a directory; expected a JSONL file")
    try:
        data = path.read_bytes()
    except OSError as e:  # permissions, a dangling mount, ...
        fail(f"prompts file {name} cannot be read ({e.strerror or e})")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")  # a BOM (some editors write one) is not line 1's
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        fail(f"prompts file {name} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}, line {line}); "
             f"expected JSONL")


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    from jaxaccel.config import parse_override
    from jaxaccel.errors import ConfigError

    options = {}
    for item in items:
        if "=" not in str(item):
            fail(f"--option {item!r} must look like KEY=VALUE (e.g. --option budget=64)")
        try:
            path, value = parse_override(item)
        except ConfigError as e:
            fail(f"--option: {e}")
        key = ".".join(path)
        if value in ("None", "none"):  # Python's spelling of YAML's null (pool=None, cache_threshold=None)
            value = None
        if key in options:  # as a YAML key given twice: refused, not the last one silently
            fail(f"--option {key} is given twice ({options[key]!r} and {value!r}); give it once")
        options[key] = value
    if options.get("hot_start") is True:
        fail("--option hot_start needs the Token Recycling matrix of an earlier generate call in the same process "
             "(the Python API: generate(..., method_input=earlier.method_output)); one command has none to start from")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    where: list[str] = []
    prompts = read_prompts(args, where)
    options = parse_options(args.option)

    import jaxaccel
    from jaxaccel.decode.lm import check_max_new_tokens
    from jaxaccel.decode.methods import get_method
    from jaxaccel.decode.sampling import GREEDY_BELOW, check_sampling_args
    from jaxaccel.errors import InvalidArgumentError, InvalidPromptError

    # Check cheap arguments before the (slow) model load.
    if args.mesh is not None and not args.mesh.strip():
        raise InvalidArgumentError("--mesh must name axes, e.g. tensor=4,data=2; got an empty string")
    check_sampling_args(args.temperature, args.top_k, args.top_p)
    if args.seed is not None and args.temperature < GREEDY_BELOW:
        warnings.warn("--seed applies only when sampling (--temperature > 0): this run decodes greedily")
    check_max_new_tokens(args.max_new_tokens)
    get_method(args.method, **options)

    lm = jaxaccel.load(args.model, dtype=args.dtype, mesh=args.mesh)
    if not prompts:
        if lm.tokenizer is None:
            fail("this model has no tokenizer: give prompts with --prompt-ids")
        prompts = [SAMPLE_PROMPT]
    try:
        result = lm.generate(prompts, max_new_tokens=args.max_new_tokens, method=args.method,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed or 0,
                             progress=args.output == "text" and sys.stderr.isatty(), routes=args.routes, **options)
    except InvalidPromptError as e:  # "prompt 3 ...": say where prompt 3 came from
        index = re.match(r"prompt (\d+)\b", str(e))
        if index is None or int(index.group(1)) >= len(where):
            raise
        raise InvalidPromptError(f"prompt {index.group(1)} ({where[int(index.group(1))]})"
                                 f"{str(e)[index.end():]}") from None
    if args.output == "json":
        out = {"results": [{"prompt_ids": ids, "tokens": toks, "text": (result.texts[i] if result.texts else None)}
                           for i, (ids, toks) in enumerate(zip(result.prompt_ids, result.tokens))],
               "stats": result.stats}
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
        return 0
    for i, (ids, toks) in enumerate(zip(result.prompt_ids, result.tokens)):
        if len(prompts) > 1:
            print(f"--- prompt {i} ---")
        if lm.tokenizer is not None:
            # decoded together: a tokenizer that marks word starts (SentencePiece's "\u2581", HF
            # Metaspace) drops the space before the first new word when the two are decoded apart
            print(lm.tokenizer.decode(list(ids) + list(toks)))
        else:
            print("prompt ids:", ",".join(map(str, ids)))
            print("new ids:   ", ",".join(map(str, toks)))
    s = result.stats
    print(f"[{s['method']}] {s['new_tokens']} new tokens in {s['decode_s']:.2f} s = {s['tokens_per_s']:.1f} tok/s "
          f"(batch {s['batch']}, {s['target_forwards']} target forwards, {s['mean_accepted']:.2f} tokens/forward, "
          f"compile {s['compile_s']:.1f} s)", file=sys.stderr)
    return 0


def entry() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    entry()
