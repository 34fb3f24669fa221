"""Warm starts: a second `python -m jaxaccel.decode` loads its programs from JAX's persistent
compilation cache instead of compiling them again; the cache is configurable and can be off."""
import json
import os
import subprocess
import sys

from jaxaccel.decode import compile_cache


def _decode(cache: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", compile_cache.ENV: cache}
    out = subprocess.run([sys.executable, "-m", "jaxaccel.decode", "--prompt-ids", "3,17,40,9", "--max-new-tokens",
                          "16", "--output", "json"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
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


def test_cache_location_and_switch(monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.cache_dir() is None
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "here"))
    assert compile_cache.cache_dir() == tmp_path / "here"
    monkeypatch.delenv(compile_cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.cache_dir() == tmp_path / "xdg" / "jaxaccel" / "xla"
