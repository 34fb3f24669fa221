"""Metrics: one JSON object per line in `metrics.jsonl` (train lines and eval lines), the same
scalars to TensorBoard (tensorboardX: no TensorFlow outside the data package), and FLOP
accounting for MFU."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.config import ModelConfig


def summary_writer_class():
    """tensorboardX's `SummaryWriter`, imported without PyTorch. tensorboardX imports torch at
    module import when it is installed (Colab has it; so does the `peers` extra), only to
    accept torch tensors: 3.1-3.7 s of a training run's start on a 2-core CPU (docs/BENCHMARKS.md,
    "Training start"). We log Python floats, so torch is hidden while tensorboardX imports and
    made importable again right after; a process that already imported torch keeps it."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide and sys.modules.get("torch", 0) is None:  # (not if tensorboardX imported it after all)
            del sys.modules["torch"]
    return SummaryWriter


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B: 6 N + 12 L H D T, where
    N counts the matmul parameters a token uses (top-k experts; the output head, not the
    embedding gather) and the second term the attention score/value matmuls."""
    n = cfg.active_params() - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.n_heads * cfg.resolved_head_dim * seq_len


def measure_peak_flops(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
    """FLOP/s of a jitted [n, n] @ [n, n] matmul on the default device (median of repeats)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / float(np.median(times))


def devices_peak_flops(devices: int, dtype: str = "float32") -> float:
    """Measured matmul FLOP/s of `devices` devices, for MFU and sweep estimates: one device's
    in the model's compute `dtype` times the count on an accelerator (a float32 peak would
    overstate a bfloat16 model's MFU several times); on CPU the one float32 measurement, whose
    matmul already used every core that the fake devices share."""
    if jax.default_backend() == "cpu":
        return measure_peak_flops()
    return measure_peak_flops(dtype=jnp.dtype(dtype)) * devices


class MetricsWriter:
    """Appends to OUTPUT_DIR/metrics.jsonl. For a gs:// output_dir (no appends on GCS) the file
    lives in a local mirror and is uploaded whole at every flush."""

    def __init__(self, output_dir: str | Path, tensorboard: bool, resume_step: int):
        self.remote = None
        if str(output_dir).startswith("gs://"):
            import hashlib

            from etils import epath

            self.remote = epath.Path(str(output_dir)) / "metrics.jsonl"
            local = Path.home() / ".cache" / "jaxaccel" / "runs" / hashlib.sha256(str(output_dir).encode()).hexdigest()[:16]
            local.mkdir(parents=True, exist_ok=True)
            if self.remote.exists():
                (local / "metrics.jsonl").write_bytes(self.remote.read_bytes())
            output_dir = local
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                writer = summary_writer_class()

                # A resumed run's new event file starts with a purge: TensorBoard drops the
                # earlier files' points after the checkpoint, which this run writes again. (Its
                # own name, too: files are named by the second, and one of that second is replaced.)
                # So does a run started again from step 0 beside an earlier attempt's event files
                # (killed before its first checkpoint): metrics.jsonl was cut back to nothing.
                tb_dir = Path(output_dir) / "tensorboard"
                earlier = tb_dir.is_dir() and any(tb_dir.iterdir())
                resumed = {"purge_step": resume_step + 1, "filename_suffix": f".resumed-{resume_step}"}
                self._tb = writer(str(tb_dir), **(resumed if resume_step or earlier else {}))
            except ImportError:
                self._tb = None

    def _truncate_after(self, step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint: keep lines up to `step`."""
        if not self.path.exists():
            return
        from jaxaccel.files import write_atomically

        kept = []
        for line in self.path.read_text(errors="replace").splitlines():
            record = _record(line)  # None for a line cut by a kill, or not a record
            at = record.get("step", 0) if record is not None else None
            if isinstance(at, (int, float)) and at <= step:
                kept.append(line)
        # whole or not at all: a kill or a full disk here must not lose the lines before the checkpoint
        write_atomically(self.path, "".join(k + "\n" for k in kept).encode())

    def has(self, step: int, key: str) -> bool:
        """Whether a record of `step` with `key` is in the file (flushed)."""
        self._file.flush()
        for line in self.path.read_text(errors="replace").splitlines():
            record = _record(line)
            if record is not None and record.get("step") == step and key in record:
                return True
        return False

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            step = int(record["step"])
            for k, v in clean.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

    def flush(self) -> None:
        self._file.flush()
        if self.remote is not None:
            self.remote.write_bytes(self.path.read_bytes())
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self.flush()
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _record(line: str) -> dict | None:
    """A metrics line as a dict; None for a line cut by a kill or otherwise not a record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None
