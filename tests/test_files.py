"""jaxaccel.files.write_atomically: whole or nothing, the usual permissions, no litter."""
import os

import numpy as np
import pytest

from jaxaccel.files import write_atomically


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    write_atomically(target, "old\n")

    def half_then_fail(f):
        f.write(b"new, cut")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomically(target, half_then_fail)
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["results.json"]


def test_files_get_the_umask_permissions_not_private_ones(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomically(tmp_path / "a" / "b.bin", b"\x00\x01")  # parents are created
    finally:
        os.umask(old)
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "a" / "b.bin").stat().st_mode & 0o777 == 0o644


def test_a_streamed_array_round_trips(tmp_path):
    array = np.arange(10, dtype=np.int32)
    write_atomically(tmp_path / "x.npy", lambda f: np.save(f, array, allow_pickle=False))
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), array)


def test_an_existing_file_keeps_its_mode_and_a_link_its_target(tmp_path):
    real = tmp_path / "shared" / "results.json"
    write_atomically(real, "one\n")
    os.chmod(real, 0o640)
    link = tmp_path / "results.json"
    link.symlink_to(real)
    write_atomically(link, "two\n")
    assert link.is_symlink() and os.readlink(link) == str(real)  # the link is not replaced by a file
    assert real.read_text() == "two\n" and real.stat().st_mode & 0o777 == 0o640
    assert sorted(os.listdir(real.parent)) == ["results.json"]


def test_a_dangling_link_is_written_through_and_a_loop_is_refused(tmp_path):
    """As open() behaves: a dangling link's target is created in its existing folder (no
    folders are made for it), and a link loop is an error, not replaced by a file."""
    dangling = tmp_path / "out.json"
    dangling.symlink_to(tmp_path / "real.json")
    write_atomically(dangling, "x\n")
    assert dangling.is_symlink() and (tmp_path / "real.json").read_text() == "x\n"
    nowhere = tmp_path / "nowhere.json"
    nowhere.symlink_to(tmp_path / "missing" / "deeper" / "real.json")
    with pytest.raises(FileNotFoundError):
        write_atomically(nowhere, "y\n")
    assert not (tmp_path / "missing").exists() and nowhere.is_symlink()
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(OSError):
        write_atomically(a, "z\n")
    assert a.is_symlink() and b.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "nowhere.json", "out.json", "real.json"]


def test_a_long_name_that_open_takes_is_written_too(tmp_path):
    """The temporary name added ~23 characters to the target's: a 233-255 byte name that
    open() takes failed with 'File name too long'."""
    for name in ("x" * 255, "é" * 127):  # 255 and 254 bytes
        write_atomically(tmp_path / name, b"data")
        assert (tmp_path / name).read_bytes() == b"data"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["x" * 255, "é" * 127])  # no temporary left


def test_a_url_given_as_a_str_is_written_through_its_path_type(tmp_path, monkeypatch):
    """The docstring takes a str, but a str of gs://... failed on `path.parent`."""
    from etils import epath
    from test_foundation import _ObjectStorePath

    made = []
    monkeypatch.setattr(epath, "Path", lambda url: made.append(url) or _ObjectStorePath(tmp_path / "b" / "x.json", url))
    write_atomically("gs://bucket/x.json", '{"a": 1}')
    assert made == ["gs://bucket/x.json"] and (tmp_path / "b" / "x.json").read_text() == '{"a": 1}'
