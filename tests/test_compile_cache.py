"""Warm starts: a second `python -m jaxaccel.decode` loads its programs from JAX's persistent
compilation cache instead of compiling them again; the cache is configurable and can be off."""
import json
import os
import shutil
import subprocess
import sys

import jax
import pytest

from jaxaccel.decode import compile_cache


def _decode(cache: str, stderr: list | None = None) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", compile_cache.ENV: cache}
    out = subprocess.run([sys.executable, "-m", "jaxaccel.decode", "--prompt-ids", "3,17,40,9", "--max-new-tokens",
                          "16", "--output", "json"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    if stderr is not None:
        stderr.append(out.stderr)
    return json.loads(out.stdout)


def test_second_process_reads_the_compiled_program_back(tmp_path):
    folder = tmp_path / "xla"
    first = _decode(str(folder))
    entries = list(folder.iterdir())
    assert entries, "nothing was written to the cache"
    second = _decode(str(folder))
    assert second["results"] == first["results"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in entries)  # no new program compiled
    assert second["stats"]["compile_s"] < first["stats"]["compile_s"]

    # Moved (here: copied) elsewhere, the cache still hits: no key holds the folder's path (on
    # CPU, XLA's GPU autotuning cache under the folder is off). An entry truncated by a
    # process killed mid-write used to be read, warned about and compiled again on every run
    # (JAX never replaces an entry): it is now rewritten whole by the next run.
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    loop = max(moved.glob("jit_generate_loop*"), key=lambda p: p.stat().st_size)
    size = loop.stat().st_size
    with open(loop, "r+b") as f:
        f.truncate(size // 3)
    err: list = []
    third = _decode(str(moved), err)
    assert third["results"] == first["results"]
    assert sorted(p.name for p in moved.iterdir()) == sorted(p.name for p in entries)
    assert loop.stat().st_size > size // 2 and err[0].count("warning: ") <= 1, err[0]
    fourth = _decode(str(moved), err)  # the rewritten entry is read back: nothing to say
    assert fourth["results"] == first["results"] and "warning" not in err[1], err[1]


def test_entries_are_written_whole_and_an_unwritable_folder_says_so_once(tmp_path, capsys):
    """The cache JAX builds for jaxaccel's folder (this test process's: conftest's) writes through
    `_WholeEntries`: a temporary file renamed into place, replacing a damaged entry; a folder
    that cannot be written warns once, not once per program."""
    from jax._src import compilation_cache as cc
    from jax._src.lru_cache import LRUCache

    jax.jit(lambda x: x * 3 + 1).lower(jax.numpy.ones(7)).compile()  # the cache exists from the first compile
    if jax.config.jax_compilation_cache_dir:  # (JAXACCEL_TEST_XLA_CACHE=off runs the tests without one)
        assert isinstance(cc._cache, compile_cache._WholeEntries)
    cache = compile_cache._WholeEntries(LRUCache(str(tmp_path / "c"), max_size=-1))
    (tmp_path / "c" / "k-cache").write_bytes(b"trunc")
    cache.put("k", b"the whole entry")
    assert cache.get("k") == b"the whole entry" and sorted(p.name for p in (tmp_path / "c").iterdir()) == ["k-cache"]
    (tmp_path / "c" / "k2-cache").mkdir()  # a write that fails (as in a read-only folder)
    cache.put("k2", b"x")
    cache.put("k2", b"y")
    err = capsys.readouterr().err
    assert err.count("warning: cannot write to the compile cache") == 1 and "not kept" in err
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["k-cache", "k2-cache"]  # no temporary left
    stale, fresh = tmp_path / "c" / ".k3-cache.tmpab12", tmp_path / "c" / ".k4-cache.tmpcd34"  # writers killed
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    os.utime(stale, (1, 1))
    compile_cache._remove_stale_temporaries(tmp_path / "c")
    assert not stale.exists() and fresh.exists()  # the fresh one may be a live writer's


def test_cache_location_and_switch(monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.cache_dir() is None
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "here"))
    assert compile_cache.cache_dir() == tmp_path / "here"
    monkeypatch.delenv(compile_cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.cache_dir() == tmp_path / "xdg" / "jaxaccel" / "xla"
    for on in ("1", "true", " ON "):  # the default folder, not a folder named "true" here
        monkeypatch.setenv(compile_cache.ENV, on)
        assert compile_cache.cache_dir() == tmp_path / "xdg" / "jaxaccel" / "xla"
    monkeypatch.setenv(compile_cache.ENV, "gs://bucket/xla")  # was a local folder "gs:/bucket/xla"
    with pytest.warns(UserWarning, match="must be a local path; this cache is off"):
        assert compile_cache.cache_dir() is None


def test_cache_home_follows_xdg_rules_and_a_missing_home_turns_the_cache_off(monkeypatch, tmp_path):
    """A relative XDG_CACHE_HOME put a cache in every working directory (the spec says to ignore
    it); no home at all (a container's bare uid) was a RuntimeError traceback from load()."""
    from pathlib import Path

    from jaxaccel.data.cache import cache_root
    from jaxaccel.errors import ConfigError

    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert compile_cache.cache_dir() == tmp_path / "home" / ".cache" / "jaxaccel" / "xla"

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    assert compile_cache.cache_dir() is None
    with pytest.raises(ConfigError, match="no home folder to keep the tokenized corpus in: set data.cache_dir"):
        cache_root(None)
    assert cache_root(str(tmp_path / "d")) == tmp_path / "d"


def test_entries_get_the_modes_jax_gives_them_and_jax_thresholds_set_by_the_user_are_kept(tmp_path, monkeypatch):
    """mkstemp's 0600 kept a cache folder shared by several users from ever hitting for the
    others; use_folder overwrote JAX_PERSISTENT_CACHE_MIN_* given through JAX's own variables."""
    from jax._src.lru_cache import LRUCache

    cache = compile_cache._WholeEntries(LRUCache(str(tmp_path / "c"), max_size=-1))
    cache.put("k", b"entry")
    assert (tmp_path / "c" / "k-cache").stat().st_mode & 0o777 == 0o666 & ~compile_cache._UMASK
    before = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir",
                                                   "jax_persistent_cache_min_compile_time_secs",
                                                   "jax_persistent_cache_min_entry_size_bytes",
                                                   "jax_persistent_cache_enable_xla_caches")}
    try:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 5.0)
        monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "5")
        compile_cache.use_folder(tmp_path / "x")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 5.0
        assert jax.config.jax_persistent_cache_min_entry_size_bytes == 0  # not given: jaxaccel's own
    finally:
        for k, v in before.items():
            jax.config.update(k, v)


def test_a_cache_folder_that_cannot_be_created_is_said_once(tmp_path):
    """JAXACCEL_COMPILE_CACHE naming a path that cannot be a folder (a file there) turned the
    cache off without a word; the user asked for that folder."""
    (tmp_path / "file").write_text("x")
    code = "from jaxaccel.decode import compile_cache; print(compile_cache.enable())"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", compile_cache.ENV: str(tmp_path / "file" / "xla")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
    assert out.stderr.count("cannot be created") == 1 and "the cache is off" in out.stderr


def test_any_accelerator_plugin_jaxlib_names_means_not_cpu_only(monkeypatch):
    """Decided before a backend starts: an installed GPU/TPU plugin means the process may not
    compute on the CPU. ROCm 6's plugin is jax_rocm60_plugin (a jax_rocm6_plugin was looked
    for), so a ROCm 6 host counted as CPU-only and lost XLA's GPU autotuning cache."""
    import importlib.util

    from jax._src import xla_bridge

    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    old = jax.config.jax_platforms
    try:
        jax.config.update("jax_platforms", "")
        for name in ("jax_rocm60_plugin", "jax_rocm7_plugin", "jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu"):
            monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a, name=name: object() if n == name else None)
            assert not compile_cache._cpu_only(), name
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None)
        assert compile_cache._cpu_only()
    finally:
        jax.config.update("jax_platforms", old)
