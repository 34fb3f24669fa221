"""Typed exceptions. Every user-facing failure is one of these, with a one-line message.

The CLIs catch `JaxaccelError` and print `error: <message>` with exit status 2; anything
else escaping is a bug in jaxaccel, not bad input.
"""


def first_line(e: BaseException, limit: int | None = None) -> str:
    """The first non-empty line of an exception's message (its type's name when it has none),
    at most `limit` characters, without TensorStore's "See full TensorStore details: <bound
    method ...>" tail, for one-line reports of errors raised by the libraries underneath."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    line = line.split(" See full TensorStore details:")[0]
    return line if limit is None else line[:limit]


class JaxaccelError(Exception):
    """Base class: a problem with the user's input, stated in one line."""


class ConfigError(JaxaccelError, ValueError):
    """Unknown config key, wrong type, or an inconsistent combination of values."""


class ModelLoadError(JaxaccelError, FileNotFoundError):
    """A model path that is missing, or is neither a jaxaccel checkpoint nor an HF model."""


class UnsupportedArchitectureError(ModelLoadError):
    """An HF `architectures` entry that jaxaccel cannot load."""


class CheckpointError(ModelLoadError):
    """A checkpoint whose tensors are missing, misshapen or unreadable."""


class InvalidPromptError(JaxaccelError, ValueError):
    """An empty prompt, a prompt that is too long, or a token id outside the vocabulary."""


class InvalidArgumentError(JaxaccelError, ValueError):
    """A generation argument out of range (temperature, top_p, top_k, max_new_tokens, method)."""


class Preempted(Exception):
    """A run stopped by a preemption notice (SIGTERM) after saving a checkpoint: not bad input.
    The CLIs print `stopped: <message>` and exit 143 (128 + SIGTERM); rerunning the same
    command resumes from that checkpoint."""


class Interrupted(Preempted):
    """A run stopped by Ctrl-C after saving a checkpoint of its current step. The CLIs print
    `stopped: <message>` and exit 130 (128 + SIGINT), as for any Ctrl-C."""
