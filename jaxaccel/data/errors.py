"""The data package's typed error.

`DataError` is for problems with the corpus itself (a glob that matches nothing, an empty
corpus, a malformed JSONL line, a TFDS dataset that is not on this machine); a bad value
in `DataConfig` is a `jaxaccel.errors.ConfigError` naming the key. Both are
`JaxaccelError`s with a one-line message, so the CLIs report them as `error: <message>`.
"""
from jaxaccel.errors import JaxaccelError


class DataError(JaxaccelError, ValueError):
    """The corpus cannot be read as configured: missing files, no text, malformed records."""
