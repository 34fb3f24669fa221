"""JAX's persistent compilation cache for the decode programs (DESIGN decision 14).

`python -m jaxaccel.decode` is run again and again with the same shapes; with the cache on,
a second process loads the compiled program from disk instead of compiling it again.

Where: `$JAXACCEL_COMPILE_CACHE` if set — a directory, or `0` / `off` / `false` / `none` to
disable — else `$XDG_CACHE_HOME/jaxaccel/xla` (default `~/.cache/jaxaccel/xla`). A cache
directory the user configured for JAX itself (`jax_compilation_cache_dir`, e.g. through
`JAX_COMPILATION_CACHE_DIR`) is left as it is. Entries are keyed by JAX on the program, the
compiler options, the backend and the jax/jaxlib versions, so a stale entry is never used.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax

ENV = "JAXACCEL_COMPILE_CACHE"
OFF_VALUES = {"0", "off", "false", "none", "no", ""}
# Every program is kept: besides the decode programs, a run compiles a dozen tiny eager ops
# (PRNG keys, casts), ~10 ms each to compile and ~1 ms to read back (JAX skips < 1 s by default).
MIN_COMPILE_SECONDS = 0.0


def user_cache_folder(env: str, name: str) -> Path | None:
    """A jaxaccel cache folder: `$env` if set (a directory, or one of OFF_VALUES -> None),
    else `files.user_cache_home() / name`."""
    from jaxaccel.files import user_cache_home

    value = os.environ.get(env)
    if value is not None:
        return None if value.strip().lower() in OFF_VALUES else Path(value).expanduser()
    return user_cache_home() / name


def cache_dir() -> Path | None:
    """The directory the cache uses, or None when disabled."""
    return user_cache_folder(ENV, "xla")


_enabled: bool | None = None


def enable() -> bool:
    """Turn the cache on for this process (idempotent) -> whether it is on. Failing to
    create the directory (read-only home) leaves it off rather than failing the caller."""
    global _enabled
    if _enabled is not None:
        return _enabled
    if jax.config.jax_compilation_cache_dir:  # the user's own setting wins
        _enabled = True
        return True
    folder = cache_dir()
    if folder is None:
        _enabled = False
        return False
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        _enabled = False
        return False
    use_folder(folder)
    _enabled = True
    return True


def use_folder(folder: str | Path, min_compile_seconds: float = MIN_COMPILE_SECONDS) -> None:
    """Point JAX's persistent cache at `folder`: programs that took at least
    `min_compile_seconds` to compile are written there and read back by later processes."""
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
