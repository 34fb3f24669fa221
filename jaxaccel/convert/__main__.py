"""python -m jaxaccel.convert — Hugging Face <-> jaxaccel checkpoints.

    python -m jaxaccel.convert import HF_FOLDER OUT_FOLDER [--dtype bfloat16]   # HF -> jaxaccel
    python -m jaxaccel.convert export MODEL OUT_FOLDER [--max-shard-size 2GB]   # jaxaccel (or HF) -> HF
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Sequence

from jaxaccel.cli import ArgumentParser, explain_options, fail, log_without_tracebacks, run_cli


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not m:
        fail(f"--max-shard-size {text!r}: expected a size like 500MB or 2GB")
    scale = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[m.group(2)]
    size = int(float(m.group(1)) * scale)
    if size < 1:
        fail(f"--max-shard-size {text!r} must be at least 1 byte")
    return size


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m jaxaccel.convert", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="direction", required=True)
    imp = sub.add_parser("import", help="Hugging Face folder -> jaxaccel checkpoint")
    exp = sub.add_parser("export", help="jaxaccel checkpoint (or HF folder) -> Hugging Face folder")
    for q in (imp, exp):
        q.add_argument("source")
        q.add_argument("destination")
        q.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
        q.add_argument("--force", action="store_true",
                       help="write into a destination holding other files (an earlier model written there by the "
                            "same direction is replaced without it)")
    exp.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (e.g. 500MB, 2GB)")
    explain_options(p, {"dtype": "parameter dtype of the written model (default: the source's)"})
    args = p.parse_args(argv)

    for name in ("source", "destination"):  # Path("") is ".": the current folder, not what was meant
        if not getattr(args, name).strip():
            fail(f"the {name} must be a path, got an empty string")
    # The destination stays a string: Path("gs://b/x") is the local folder "gs:/b/x", which the
    # remote check (gs:// taken, other URLs refused) then never saw.
    dest = args.destination
    from jaxaccel.convert.hf import REMOTE_HF
    from jaxaccel.decode.lm import destination, locate

    if "://" not in dest + args.source:
        # the folder that is read (a finished run's model/, a builtin's, ~ expanded), not the spelling
        read = Path(locate(args.source)[1]).resolve()
        if read == Path(dest).expanduser().resolve():
            fail(f"destination must differ from the source (both are {read})")
    # as save / export_hf decide, before the load: an earlier import (export) there is replaced,
    # other files need --force (they are then kept beside the model)
    if args.direction == "export" and "://" in dest:  # before the load
        fail(REMOTE_HF.format(path=dest, what="written to"))
    if args.direction == "import" and not args.force and "://" not in dest:
        _check_no_trained_model(Path(dest).expanduser())
    destination(dest, args.force, "save" if args.direction == "import" else "export", "use --force to write into it")

    max_shard_bytes = parse_size(args.max_shard_size) if args.direction == "export" else None  # before the load

    if args.direction == "export":
        _check_exportable_before_loading(args.source)

    import jaxaccel

    log_without_tracebacks()  # Orbax's log of a failed write (a full disk): its lines, not its tracebacks
    lm = jaxaccel.load(args.source, dtype=args.dtype)
    if args.direction == "import":
        lm.save(dest, overwrite=args.force)
    else:
        lm.export_hf(dest, overwrite=args.force, max_shard_bytes=max_shard_bytes)
    print(f"wrote {dest} ({lm.num_params() / 1e6:.1f}M parameters, {lm.config.param_dtype})", file=sys.stderr)
    return 0


def _check_no_trained_model(folder: Path) -> None:
    """An import replaces an earlier model in its destination, but not a trained one (a run's
    exported model/, a fine-tune): that needs --force."""
    from jaxaccel.errors import CheckpointError
    from jaxaccel.model.checkpoint import MARKER, read_meta

    if not (folder / MARKER).is_file():
        return
    try:
        steps = (read_meta(folder).get("info") or {}).get("trained_steps")
    except CheckpointError:
        return  # not a model this jaxaccel reads: `destination` decides
    if steps is not None:
        fail(f"destination {str(folder)!r} holds a trained model ({steps} training steps): an import would replace "
             f"it; choose another folder, or use --force to replace it")


def _check_exportable_before_loading(source: str) -> None:
    """A model with no Hugging Face counterpart (MoE, Duo-LLM, biases or a window its
    architecture lacks) is refused from its config, before the parameters are read; a path
    that is no model is the load's one-line error, said here."""
    from jaxaccel.convert.hf import check_exportable
    from jaxaccel.decode.lm import model_config

    if "://" not in source:
        check_exportable(model_config(source))


def entry() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    entry()
