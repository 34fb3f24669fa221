"""JAX's persistent compilation cache for the decode programs (DESIGN decision 14).

`python -m jaxaccel.decode` is run again and again with the same shapes; with the cache on,
a second process loads the compiled program from disk instead of compiling it again.

Where: `$JAXACCEL_COMPILE_CACHE` if set — a local directory, `0` / `off` / `false` / `none`
to disable, `1` / `on` / `true` / `yes` for the default — else `$XDG_CACHE_HOME/jaxaccel/xla`
(default `~/.cache/jaxaccel/xla`). A cache directory the user configured for JAX itself
(`jax_compilation_cache_dir`, e.g. through `JAX_COMPILATION_CACHE_DIR`) is left as it is.
Entries are keyed by JAX on the program, the compiler options, the backend and the jax/jaxlib
versions, so a stale entry is never used.

In the folder jaxaccel sets, entries are written whole (`_WholeEntries`): JAX writes an entry
in place and never replaces one, so a process killed mid-write left a truncated entry that
every later process failed to read (a warning each) and compiled again, for good. A folder
that cannot be written (read-only, full) is still read, and says so once. On CPU, XLA's GPU
autotuning cache (whose path under the folder JAX puts in every key) is off, so a cache
reached through a link, moved or copied still hits.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import jax

ENV = "JAXACCEL_COMPILE_CACHE"
OFF_VALUES = {"0", "off", "false", "none", "no", ""}
ON_VALUES = {"1", "on", "true", "yes"}  # the default folder
# Every program is kept: besides the decode programs, a run compiles a dozen tiny eager ops
# (PRNG keys, casts), ~10 ms each to compile and ~1 ms to read back (JAX skips < 1 s by default).
MIN_COMPILE_SECONDS = 0.0
_UMASK = os.umask(0o022)  # read once (the only way to read it is to set it), then put back
os.umask(_UMASK)


def user_cache_folder(env: str, name: str) -> Path | None:
    """A jaxaccel cache folder: `$env` if set (a directory, or one of OFF_VALUES -> None),
    else `files.user_cache_home() / name`."""
    from jaxaccel.files import user_cache_home

    value = os.environ.get(env)
    word = None if value is None else value.strip().lower()
    if word is None or word in ON_VALUES:
        try:
            return user_cache_home() / name
        except RuntimeError:  # no home folder (a container's uid without one): the cache is off
            return None
    if word in OFF_VALUES:
        return None
    if "://" in value:  # a bucket would become a local folder named "gs:"
        import warnings

        warnings.warn(f"{env}={value}: a cache folder must be a local path; this cache is off", stacklevel=2)
        return None
    return Path(value).expanduser()


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
    except OSError as e:
        if os.environ.get(ENV, "").strip():  # a folder the user named: say why it is not used
            warnings.warn(f"the compile cache folder {folder} ({ENV}) cannot be created ({e.strerror or e}): the "
                          f"cache is off", stacklevel=2)
        _enabled = False
        return False
    use_folder(folder)
    _enabled = True
    return True


def use_folder(folder: str | Path, min_compile_seconds: float = MIN_COMPILE_SECONDS) -> None:
    """Point JAX's persistent cache at `folder`: programs that took at least
    `min_compile_seconds` to compile are written there (whole) and read back by later processes."""
    folder = str(Path(folder).resolve())
    jax.config.update("jax_compilation_cache_dir", folder)
    # (thresholds the user gave JAX through its own environment variables are kept)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if _cpu_only():  # (a GPU keeps its autotuning cache, path and all)
        jax.config.update("jax_persistent_cache_enable_xla_caches", "none")
    _write_entries_whole(folder)
    _remove_stale_temporaries(Path(folder))


def _cpu_only() -> bool:
    """Whether this process computes on the CPU, decided without starting a backend (a load
    of a path that does not exist must not set up a TPU first): the backend when one is up,
    else $JAX_PLATFORMS, else whether a GPU or TPU plugin is installed."""
    try:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            return jax.default_backend() == "cpu"
    except (ImportError, AttributeError):
        return False
    platforms = (jax.config.jax_platforms or "").strip().lower()
    if platforms:
        return platforms.split(",")[0] == "cpu"
    import importlib.util

    return not any(importlib.util.find_spec(name) is not None for name in accelerator_plugins())


def accelerator_plugins() -> tuple[str, ...]:
    """Module names of JAX's TPU, CUDA and ROCm plugins: jaxlib's own table where it has one
    (it names them: jax_rocm60_plugin, not jax_rocm6_plugin), else the names jaxlib 0.10 uses."""
    names = ["jax_cuda13_plugin", "jax_cuda12_plugin", "jax_rocm7_plugin", "jax_rocm60_plugin"]
    try:
        from jaxlib import plugin_support

        names += [n for group in plugin_support._PLUGIN_MODULE_NAMES.values() for n in group]
    except (ImportError, AttributeError):
        pass
    return ("libtpu", *dict.fromkeys(names))


def _remove_stale_temporaries(folder: Path, older_than_s: float = 3600.0) -> None:
    """Temporary files of entries whose writer was killed (`_WholeEntries.put`), an hour on."""
    import time

    try:
        for path in folder.glob(".*.tmp*"):
            if time.time() - path.stat().st_mtime > older_than_s:
                path.unlink()
    except OSError:
        pass


_WHOLE_FOLDERS: set[str] = set()  # the folders whose JAX file cache writes through _WholeEntries


def _write_entries_whole(folder: str) -> None:
    """Have JAX's file cache for `folder` write through `_WholeEntries`. JAX builds that cache
    on the first compile (`compilation_cache.get_file_cache`); a hook, installed once, wraps
    what it returns for these folders only. Internals of jax: another version without them
    keeps its own behaviour."""
    try:
        from jax._src import compilation_cache as cc
        from jax._src.lru_cache import LRUCache
    except ImportError:
        return
    build = getattr(cc, "get_file_cache", None)
    if build is not None and not _WHOLE_FOLDERS:
        def get_file_cache(path):
            made = build(path)
            if (made is not None and str(path) in _WHOLE_FOLDERS and isinstance(made[0], LRUCache)
                    and not made[0].eviction_enabled):
                return _WholeEntries(made[0]), made[1]
            return made

        cc.get_file_cache = get_file_cache
    _WHOLE_FOLDERS.add(folder)


class _WholeEntries:
    """JAX's LRUCache (no eviction) with `put` writing a temporary file renamed into place, and
    replacing an entry that exists: JAX writes only after compiling, so an entry it writes over
    is one it could not use (truncated by a killed process, or damaged). A write that fails
    (a read-only or full folder) says so once and the program is not kept."""

    def __init__(self, base):
        self._base = base
        self._path = base._path
        self.path = base.path
        self._write_failed = False

    def get(self, key: str):
        return self._base.get(key)

    def put(self, key: str, value: bytes) -> None:
        from jax._src.lru_cache import _CACHE_SUFFIX

        import tempfile

        target = Path(self.path) / f"{key}{_CACHE_SUFFIX}"
        temporary = None
        try:
            fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.tmp")
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # as JAX's own entries (mkstemp's 0600 would keep a
                f.write(value)  # cache folder shared by several users from ever hitting for the others)
            os.replace(temporary, target)
        except OSError as e:
            try:
                if temporary is not None:
                    os.unlink(temporary)
            except OSError:
                pass
            if not self._write_failed:
                self._write_failed = True
                sys.stderr.write(f"warning: cannot write to the compile cache {self.path} ({e.strerror or e}): "
                                 f"programs compiled now are not kept for the next run\n")
