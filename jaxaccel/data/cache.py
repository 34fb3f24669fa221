"""On-disk cache helpers: the cache root, content keys, and atomic writes.

Every cached artefact is written to a temporary name and renamed into place, and a folder
of several files counts as complete only once its `info.json` exists (written last). So a
killed run, or several hosts filling a shared cache at once, never leave a half-written
file that a later run would trust. A file damaged from outside afterwards (truncated by a full
disk or a cut-short copy, deleted) is found when the folder is opened, against the lengths its
info.json records (the vocabulary: against its sha256 in vocab.json; a record missing one of
its keys is damage too), and built again with a warning.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, BinaryIO, Iterable

import numpy as np

from jaxaccel.files import user_cache_home, write_atomically

def cache_root(cache_dir: str | None) -> Path:
    """`data.cache_dir`, else `files.user_cache_home() / "data"` (beside the compilation cache)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    try:
        return user_cache_home() / "data"
    except RuntimeError:  # no $HOME nor a home in the user database (a container's bare uid)
        from jaxaccel.errors import ConfigError

        raise ConfigError("no home folder to keep the tokenized corpus in: set data.cache_dir (or "
                          "XDG_CACHE_HOME to an absolute path)") from None


def content_key(*parts: Any) -> str:
    """sha256 hex of the canonical JSON of `parts` (the key of a cached artefact)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_bytes(path: Path, data: bytes) -> None:
    write_atomically(path, data)


def write_json(path: Path, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: Path, kind: type = object) -> Any | None:
    """The JSON value in `path`, or None when there is none to take: no file, or one that is
    not UTF-8 JSON of `kind` (every cache file is written atomically, so only damage from
    outside makes one; its contents are then built again)."""
    try:
        value = json.loads(path.read_bytes())
    except (FileNotFoundError, IsADirectoryError, ValueError):  # ValueError: bad JSON, not UTF-8
        return None
    return value if isinstance(value, kind) else None


def save_array(path: Path, array: np.ndarray) -> None:
    write_atomically(path, lambda f: np.save(f, array, allow_pickle=False))


def save_array_stream(path: Path, chunks: Iterable[np.ndarray], dtype) -> tuple[int, str]:
    """Write the 1-D concatenation of `chunks` as the .npy file `path` (atomically, like
    `save_array`) holding one chunk in memory at a time: a pod-scale token stream never is
    whole in host memory. Returns (its length, the sha256 of its data bytes: the same as
    `hashlib.sha256(np.concatenate(chunks).astype(dtype).tobytes())`)."""
    dtype = np.dtype(dtype).newbyteorder("<")
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False}
    digest, count = hashlib.sha256(), 0

    def write(f: BinaryIO) -> None:
        nonlocal count
        start = f.tell()
        # The header is padded to 64 bytes, so a placeholder length takes exactly the room of any
        # real one (checked below); it is rewritten in place once the length is known.
        np.lib.format.write_array_header_1_0(f, {**header, "shape": (2 ** 62,)})
        room = f.tell() - start
        for chunk in chunks:
            data = np.ascontiguousarray(chunk, dtype).reshape(-1)
            digest.update(memoryview(data).cast("B"))
            f.write(memoryview(data).cast("B"))
            count += data.size
        end = f.tell()
        f.seek(start)
        np.lib.format.write_array_header_1_0(f, {**header, "shape": (count,)})
        if f.tell() - start != room:
            raise AssertionError(f"the .npy header of {count} elements is not {room} bytes")
        f.seek(end)

    write_atomically(path, write)
    return count, digest.hexdigest()


def load_array(path: Path) -> np.ndarray:
    """Memory-mapped, read-only: training reads these arrays without loading them whole."""
    return np.load(path, mmap_mode="r", allow_pickle=False)


def intact_array(path: Path, length: int) -> np.ndarray | None:
    """`load_array(path)` if it is there whole (one dimension of `length` items, as the folder's
    info.json says it was written); None when it is missing, truncated or not an array, so
    that its contents are built again (the file was damaged from outside, as in `read_json`)."""
    try:
        array = load_array(path)
    except (OSError, ValueError, EOFError):  # ValueError: "mmap length is greater than file size", bad header
        return None
    return array if array.ndim == 1 and len(array) == length else None


def rebuilding(path: Path, stale: str | None = None) -> None:
    """Say that a damaged cache entry (or a `stale` one: why) is made again (one line, once per entry)."""
    import warnings

    why = stale or "is damaged (missing or truncated files)"
    warnings.warn(f"data cache {path} {why}: building it again", stacklevel=3)
