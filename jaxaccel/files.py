"""Whole-or-nothing file writes: the one helper every small file the project writes goes
through (results and run configs, metrics rewrites, data-cache entries, calibration caches).

A local file is written to a temporary file beside it, flushed to disk, and renamed over
the target, so a kill, a full disk or a power cut leaves the old file or the new one, never
a part; the folder is synced too, so the rename itself survives a power cut. A new file gets
the usual permissions (0666 less the umask, as `open` would), so a shared sweep or cache
folder stays readable to the group; a file that exists keeps its own. A symbolic link is
followed as `open` follows it: the file it points to is replaced and the link stays; a
dangling link's target is created (not its folders); a loop is an OSError. A remote path
(gs://..., through etils' epath) is written with one call: an object store's write is
whole already. A leaf module: it imports nothing from jaxaccel.
"""
from __future__ import annotations

import errno
import hashlib
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Callable


def write_atomically(path: Any, data: bytes | str | Callable[[BinaryIO], Any]) -> None:
    """Replace the file `path` (a str, Path or epath.Path) with `data`: bytes, a str (UTF-8),
    or a function that writes the file's contents to the binary file it is given (for large
    arrays: `lambda f: np.save(f, array)`)."""
    if isinstance(data, str):
        data = data.encode()
    write = data if callable(data) else (lambda f: f.write(data))
    if "://" in str(path):
        if isinstance(path, str):  # as the docstring says: a str of a URL is an epath too
            from etils import epath

            path = epath.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            write(f)
        return
    path = Path(path)
    if path.is_symlink():  # as open() does: a loop is an error, a dangling link's target is created
        try:
            path = Path(os.path.realpath(path, strict=True))
        except FileNotFoundError:
            path = Path(os.path.realpath(path))
            if not path.parent.is_dir():  # open() creates no folders for a link's target either
                raise FileNotFoundError(errno.ENOENT, "the folder of the link's target does not exist",
                                        str(path)) from None
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:
        mode = None
    # the name's first 50 characters (200 bytes at most): a name open() takes must not fail for the suffix
    tmp = path.with_name(f".{path.name[:50]}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """fsync a folder (the entry a rename made); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def unsupported_location(path: Any, *, remote: bool = True) -> str | None:
    """Why `path` cannot be a place the project reads or writes, or None. Local paths and (where
    `remote`) gs:// are; any other URL (s3://, http://, or gs:// where only a local folder will
    do) is not: pathlib would turn "s3://b/x" into a local folder named "s3:"."""
    text = str(path)
    if text.startswith("gs:/") and not (text.startswith("gs://") and text[5:].split("/")[0]):
        # "gs://" (an unset $BUCKET) or "gs:/b" (one slash): pathlib makes either a local "gs:" folder
        if not remote:
            return f"{text!r}: gs:// is not supported here; it must be a local folder"
        return f"{text!r} is not a gs://BUCKET/... path (no bucket, or a slash missing)"
    scheme, sep, _ = text.partition("://")
    if not sep or not scheme or not all(c.isalnum() or c in "+.-" for c in scheme):
        return None
    if scheme == "gs" and remote:
        return None
    where = "a local folder or gs://" if remote else "a local folder"
    return f"{text!r}: {scheme}:// is not supported here; it must be {where}"


def user_cache_home() -> Path:
    """Where jaxaccel's caches live (the data cache, compiled programs, acceptance tables):
    `$XDG_CACHE_HOME/jaxaccel`, default `~/.cache/jaxaccel`. A relative XDG_CACHE_HOME is
    ignored, as the XDG spec says (it would put a cache in every working directory).
    RuntimeError when there is neither (no $HOME and no home in the user database)."""
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or "").expanduser()
    return (xdg if xdg.is_absolute() else Path.home() / ".cache") / "jaxaccel"


def folder_fingerprint(source) -> str:
    """A digest of a model folder's files (relative path, size, modification time): a model
    retrained or re-exported into the same folder is another model. "" for a remote folder
    (gs://), named by its path only."""
    root = Path(str(source))
    if not root.is_dir():
        return ""
    entries = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "tensorboard"]  # a training run's logs are not its weights
        for name in files:
            if name == "metrics.jsonl":
                continue
            try:  # a live run's checkpoint files come and go
                st = os.stat(os.path.join(folder, name))
            except OSError:
                continue
            entries.append(f"{os.path.relpath(os.path.join(folder, name), root)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()[:16]
