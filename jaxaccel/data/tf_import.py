"""TensorFlow, seqio and TFDS, imported quietly and kept off the accelerators.

The data package's only door to TensorFlow: every use goes through these functions, and
only inside the function that needs it, so importing `jaxaccel.data` never imports TF.
TF's C++ logging is silenced (TF_CPP_MIN_LOG_LEVEL=3) before the import, and TF is kept off
every GPU/TPU (`set_visible_devices([], ...)`) so it never allocates accelerator memory
that JAX owns. A leaf module: it imports nothing from jaxaccel (but its error, when they are
not installed).
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys


@contextlib.contextmanager
def stderr_silenced():
    """Point fd 2 at /dev/null for the block: TF's native libraries print on stderr before
    absl logging is initialised, where TF_CPP_MIN_LOG_LEVEL cannot reach. Yields a file on
    the real stderr (for a progress bar); Python exceptions still propagate as usual."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (e.g. an embedded interpreter): silence nothing
        yield sys.stderr
        return
    original = os.fdopen(os.dup(saved), "w")
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield original
    finally:
        original.close()
        os.dup2(saved, 2)
        os.close(saved)


# seqio (and with it TensorFlow, ~600 MB) is the `train` extra: decoding never needs it
TRAIN_EXTRA = "the train extra installs: pip install 'jaxaccel[train]' (from a checkout: pip install -e '.[train]')"


@functools.cache
def import_tensorflow():
    """The `tensorflow` module, imported (once) quietly and with no GPU/TPU visible to it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    with stderr_silenced():
        try:
            import tensorflow as tf
        except ImportError:
            from jaxaccel.data.errors import DataError

            raise DataError(f"tokenizing a corpus needs TensorFlow and seqio, which {TRAIN_EXTRA}") from None
    with stderr_silenced():  # probing for devices logs driver errors on machines without them
        for kind in ("GPU", "TPU"):  # JAX owns the accelerators; TF only tokenizes, on the CPU
            try:
                tf.config.set_visible_devices([], kind)
            except (RuntimeError, ValueError):
                pass  # devices already initialised by an earlier TF user, or no such device type
    return tf


@contextlib.contextmanager
def autograph_disabled():
    """tf.data traces every `map` function through AutoGraph, which rewrites its Python
    source first: ~3 s of a small corpus's first tokenization (about a quarter of it), for
    functions (seqio's tokenize/append_eos, ours) written in plain TF ops with no tensor-
    dependent Python control flow. Inside this block `map` traces them as written, with the
    same results. TF has no public switch for this, so a private one is used when present
    and nothing changes when it is not."""
    import_tensorflow()
    try:
        from tensorflow.python.autograph.core import ag_ctx

        context = ag_ctx.ControlStatusCtx(status=ag_ctx.Status.DISABLED)
    except (ImportError, AttributeError):  # another TF layout: AutoGraph stays on
        context = contextlib.nullcontext()
    with context:
        yield


@functools.cache
def import_seqio():
    """The `seqio` module, imported after `import_tensorflow`."""
    import_tensorflow()
    with stderr_silenced():
        try:
            import seqio
        except ImportError:
            from jaxaccel.data.errors import DataError

            raise DataError(f"tokenizing a corpus needs seqio, which {TRAIN_EXTRA}") from None
    return seqio


@functools.cache
def import_tfds():
    """The `tensorflow_datasets` module, imported after `import_tensorflow`."""
    import_tensorflow()
    import tensorflow_datasets as tfds

    return tfds
