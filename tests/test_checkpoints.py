"""jaxaccel checkpoints and Hugging Face folders: round trips, and a one-line typed error for
every kind of bad model folder (no torch needed: folders are written with safetensors)."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxaccel
from conftest import TINY
from jaxaccel.errors import CheckpointError, ModelLoadError, UnsupportedArchitectureError


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, tiny_params):
    lm = jaxaccel.from_params(TINY, tiny_params, eos_token_ids=(2,), bos_token_id=1)
    return lm.export_hf(tmp_path_factory.mktemp("hf"))


def copy_folder(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_jaxaccel_checkpoint_round_trip(tmp_path, tiny_lm):
    folder = tiny_lm.save(tmp_path / "ckpt")
    again = jaxaccel.load(folder)
    x = np.arange(20).reshape(2, 10) % 97
    np.testing.assert_array_equal(again.logits(x), tiny_lm.logits(x))
    assert again.config == tiny_lm.config
    half = jaxaccel.load(folder, dtype="bfloat16")
    assert half.config.param_dtype == "bfloat16" and str(half.params["embed"]["embedding"].dtype) == "bfloat16"


def test_hf_folder_round_trip_keeps_special_tokens(hf_folder, tiny_lm):
    lm = jaxaccel.load(hf_folder)
    assert lm.eos_token_ids == (2,) and lm.bos_token_id == 1
    x = np.arange(24).reshape(2, 12) % 97
    np.testing.assert_array_equal(lm.logits(x), tiny_lm.logits(x))


def test_half_written_checkpoint_is_never_taken_for_a_good_one(tmp_path, tiny_lm):
    folder = tiny_lm.save(tmp_path / "ckpt")
    (folder / "jaxaccel.json").unlink()  # the marker is written last: a killed save lacks it
    with pytest.raises(ModelLoadError, match="neither a jaxaccel checkpoint"):
        jaxaccel.load(folder)


def test_corrupted_params_are_reported(tmp_path, tiny_lm):
    folder = tiny_lm.save(tmp_path / "ckpt")
    for f in (folder / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(b"\0" * 100)
    with pytest.raises(CheckpointError, match="could not be restored") as raised:
        jaxaccel.load(folder)
    assert "\n" not in str(raised.value) and "See full TensorStore details" not in str(raised.value)


def test_a_model_another_process_cannot_read_fails_here_too(tmp_path, tiny_lm, monkeypatch):
    """On several hosts the params are read through Orbax's handler (its Checkpointer ends in
    a barrier the others would wait at) and the hosts agree: this one read its part, process 1
    (faked: the all-gather's second row) could not, so this one raises the same one-line error."""
    import jax
    from jax.experimental import multihost_utils

    folder = tiny_lm.save(tmp_path / "ckpt")
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack([x, np.ones_like(x)]))
    with pytest.raises(CheckpointError, match=r"ckpt/params could not be restored: process 1 could not read its part"):
        jaxaccel.load(folder)


def test_first_line_of_a_library_error():
    from jaxaccel.errors import first_line

    tensorstore = ValueError("\nEncountered error while reading array index: (slice(0, 2, 1),). See full TensorStore "
                             "details: <bound method pybind11_detail_function_record_v1_system_libstdcpp_gxx.details>\n"
                             "Traceback ...")
    assert first_line(tensorstore) == "Encountered error while reading array index: (slice(0, 2, 1),)."
    assert first_line(tensorstore, 20) == "Encountered error wh"
    assert first_line(KeyError()) == "KeyError" and first_line(OSError("  ")) == "OSError"


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        jaxaccel.load(tmp_path / "nope")


def test_folder_that_is_neither(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ModelLoadError, match="neither a jaxaccel checkpoint .* nor a Hugging Face model folder"):
        jaxaccel.load(tmp_path)


def test_unsupported_architecture_is_named(tmp_path, hf_folder):
    bad = copy_folder(hf_folder, tmp_path / "gpt2")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError,
                       match="GPT2LMHeadModel is not supported; supported: LlamaForCausalLM, Qwen2ForCausalLM, "
                             "MistralForCausalLM"):
        jaxaccel.load(bad)


def test_unsupported_rope_type_is_named(tmp_path, hf_folder):
    bad = copy_folder(hf_folder, tmp_path / "yarn")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="rope type 'yarn' is not supported"):
        jaxaccel.load(bad)


def test_missing_tensor_is_named(tmp_path, hf_folder):
    bad = copy_folder(hf_folder, tmp_path / "missing")
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="tensor model.layers.1.mlp.up_proj.weight is missing"):
        jaxaccel.load(bad)


def test_wrong_shape_is_named(tmp_path, hf_folder):
    bad = copy_folder(hf_folder, tmp_path / "shape")
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor model.layers.0.self_attn.k_proj.weight has shape \[8, 32\]"):
        jaxaccel.load(bad)


def test_pytorch_bin_only_folder(tmp_path, hf_folder):
    bad = tmp_path / "bin"
    bad.mkdir()
    (bad / "config.json").write_text((hf_folder / "config.json").read_text())
    (bad / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(CheckpointError, match="no .safetensors weights .*convert them to safetensors"):
        jaxaccel.load(bad)


def test_bad_dtype_argument():
    with pytest.raises(jaxaccel.InvalidArgumentError, match="dtype must be one of"):
        jaxaccel.load(".", dtype="int8")


def test_a_model_folder_whose_arrays_differ_from_its_config_names_the_first_parameter(tmp_path, tiny_lm):
    """Checked against the stored metadata before any read: the message names the same
    parameter every time (Orbax's own error names whichever concurrent read failed first)."""
    folder = tiny_lm.save(tmp_path / "ckpt")
    meta = json.loads((folder / "jaxaccel.json").read_text())
    meta["model"]["vocab_size"] = 50  # the stored embedding is [97, 32], the head [32, 97]
    (folder / "jaxaccel.json").write_text(json.dumps(meta))
    for _ in range(2):
        with pytest.raises(CheckpointError, match=r"ckpt/params does not match the model in jaxaccel.json: "
                                                  r"embed/embedding has shape \(97, 32\), this config expects \(50, 32\)$"):
            jaxaccel.load(folder)


def test_a_failed_restore_leaves_no_pages_of_abandoned_reads_on_stderr(tmp_path, tiny_lm, monkeypatch):
    """Orbax abandons the other arrays' reads when one fails; Python used to report each at
    garbage collection ("Exception ignored in: <coroutine ...>" and a TensorStore spec, ~60
    lines per array) after the one-line error. Exactly those are dropped; other unraisable
    exceptions still reach the hook that was there."""
    import gc
    import sys
    import types

    from jaxaccel.model.checkpoint import quiet_abandoned_reads

    import jaxaccel.model.checkpoint as model_checkpoint

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u))
    # the shape check before the restore would refuse the folder without starting any read
    monkeypatch.setattr(model_checkpoint, "shape_difference", lambda stored, expected: None)
    folder = tiny_lm.save(tmp_path / "ckpt")
    meta = json.loads((folder / "jaxaccel.json").read_text())
    meta["model"]["vocab_size"] = 50  # the stored embedding is [97, 32], the head [32, 97]
    (folder / "jaxaccel.json").write_text(json.dumps(meta))
    # Orbax reads the arrays concurrently: whichever mismatch it meets first is the one named
    with pytest.raises(CheckpointError, match="could not be restored: Requested shape: \\((50, 32|32, 50)\\)"):
        jaxaccel.load(folder)
    gc.collect()
    assert not [u for u in seen if isinstance(u.object, types.CoroutineType)]
    quiet_abandoned_reads()  # idempotent: one filter, still in front of the recorder
    other = types.SimpleNamespace(object=object(), exc_value=ValueError("x"))
    sys.unraisablehook(other)
    assert seen[-1] is other


def test_a_failed_load_through_the_api_prints_only_its_error(tmp_path, tiny_lm):
    """A model folder copied without params/manifest.ocdbt: the one-line CheckpointError, and
    (it was 6 to 138 lines) no "Event loop is closed" pages from TensorStore's threads calling
    back into Orbax's closed loop, nor "Task exception was never retrieved" ones."""
    import os
    import subprocess
    import sys

    folder = tiny_lm.save(tmp_path / "ckpt")
    (folder / "params" / "manifest.ocdbt").unlink()
    code = (f"import jaxaccel\ntry:\n    jaxaccel.load({str(folder)!r})\n"
            f"except jaxaccel.CheckpointError as e:\n    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0 and out.stdout.startswith("refused:"), out.stderr[-2000:]
    noise = [line for line in out.stderr.splitlines() if "Event loop is closed" in line or "never retrieved" in line]
    assert not noise, out.stderr[-3000:]


class Killed(BaseException):
    """A kill: no `except OSError` sees it."""


@pytest.mark.parametrize("kind", ["save", "export_hf"])
def test_a_save_killed_while_moving_in_never_loses_the_earlier_model(tmp_path, tiny_params, monkeypatch, kind):
    """A kill at each rename of the move-in: the folder is then either the new model (the move
    was complete) or, once the next save or export starts, the earlier model again. Before the
    journal, the next save deleted the set-aside earlier model, and a next save that failed
    (a full disk) left no model at all."""
    import shutil
    from pathlib import Path

    import jax
    import orbax.checkpoint as ocp

    from jaxaccel.model import checkpoint

    earlier = jaxaccel.from_params(TINY, tiny_params, eos_token_ids=())
    newer = jaxaccel.from_params(TINY, jax.tree.map(lambda x: -x, tiny_params), eos_token_ids=())
    write = (lambda lm, folder: lm.save(folder, overwrite=True)) if kind == "save" else \
        (lambda lm, folder: lm.export_hf(folder, overwrite=True))
    embed = lambda lm: np.asarray(lm.params["embed"]["embedding"])  # noqa: E731
    real_move_in, real_rename = checkpoint.move_in, Path.rename

    def kill_at(k):
        def move_in(*args, **kwargs):
            count = [0]

            def step(real):
                def run(*a, **kw):
                    count[0] += 1
                    if count[0] == k:
                        raise Killed
                    return real(*a, **kw)
                return run
            with monkeypatch.context() as m:  # each rename, and the deletions after them
                m.setattr(Path, "rename", step(real_rename))
                m.setattr(shutil, "rmtree", step(shutil.rmtree))
                return real_move_in(*args, **kwargs)
        return move_in

    outcomes = set()
    for k in range(1, 30):
        folder = tmp_path / f"{kind}-{k}"
        write(earlier, folder)
        monkeypatch.setattr(checkpoint, "move_in", kill_at(k))
        try:
            write(newer, folder)
        except Killed:
            killed = True
        else:
            killed = False
        monkeypatch.setattr(checkpoint, "move_in", real_move_in)
        if not killed:
            break  # past the last step
        try:
            loaded = jaxaccel.load(folder)
        except ModelLoadError as e:
            assert "killed while it moved the new model in" in str(e) and "\n" not in str(e)
            loaded = None
        if loaded is not None:  # the new model's marker was in (or the kill came before any move)
            now = embed(loaded)
            assert np.array_equal(now, embed(newer)) or np.array_equal(now, embed(earlier))
        # the next save fails on a full disk: the earlier model (or the complete new one) is there
        with monkeypatch.context() as m:
            m.setattr(ocp.StandardCheckpointer, "save", lambda *a, **kw: (_ for _ in ()).throw(OSError(28, "full")))
            if kind == "export_hf":
                import safetensors.numpy
                m.setattr(safetensors.numpy, "save_file", lambda *a, **kw: (_ for _ in ()).throw(OSError(28, "full")))
            with pytest.raises(CheckpointError):
                write(newer, folder)
        now = embed(jaxaccel.load(folder))
        if np.array_equal(now, embed(earlier)):
            outcomes.add("earlier")
        else:
            assert np.array_equal(now, embed(newer))
            outcomes.add("newer")
        assert not (folder / checkpoint.SET_ASIDE).exists() and not (folder / checkpoint.STAGING).exists()
    assert k > 3 and outcomes == {"earlier", "newer"}  # kills before and after the marker's move


def test_a_second_kill_while_the_earlier_model_is_put_back_loses_nothing(tmp_path, tiny_params, monkeypatch):
    """A save killed with the earlier model set aside; the next save killed at each rename of
    putting it back; then a save that fails. The marker used to come back first, so a kill
    before params/ came back read as a finished move and the earlier params were deleted."""
    import json
    from pathlib import Path

    import orbax.checkpoint as ocp

    from jaxaccel.model import checkpoint

    earlier = jaxaccel.from_params(TINY, tiny_params, eos_token_ids=())
    embed = np.asarray(tiny_params["embed"]["embedding"])
    real_rename = Path.rename
    for k in (1, 2, 3):
        folder = tmp_path / f"m{k}"
        earlier.save(folder)
        aside = folder / checkpoint.SET_ASIDE  # as a move-in killed after setting the old model aside
        aside.mkdir()
        old = [checkpoint.MARKER, *(n for n in checkpoint.MODEL_ENTRIES if (folder / n).exists())]
        (aside / checkpoint.JOURNAL).write_text(json.dumps({"old": old, "new": ["params", checkpoint.MARKER],
                                                            "staging": checkpoint.STAGING}))
        for name in old:
            real_rename(folder / name, aside / name)
        count = [0]

        def rename(self, dest, k=k):
            count[0] += 1
            if count[0] == k:
                raise Killed
            return real_rename(self, dest)

        with monkeypatch.context() as m:
            m.setattr(Path, "rename", rename)
            try:
                checkpoint.recover_move(folder)
            except Killed:
                pass
        with monkeypatch.context() as m:  # the next save fails on a full disk
            m.setattr(ocp.StandardCheckpointer, "save", lambda *a, **kw: (_ for _ in ()).throw(OSError(28, "full")))
            with pytest.raises(CheckpointError):
                earlier.save(folder)
        np.testing.assert_array_equal(np.asarray(jaxaccel.load(folder).params["embed"]["embedding"]), embed)


def test_a_move_in_that_cannot_write_its_journal_or_lost_its_staging_keeps_the_earlier_model(
        tmp_path, tiny_params, monkeypatch):
    """A full disk at the journal is a CheckpointError with the earlier model in place (it was
    an OSError traceback); a kill while the old files are set aside, then the staging folder
    deleted by hand, still gets the earlier model back (the 'finished' test used to be that
    no new file was left in staging, and deleted the set-aside model)."""
    import shutil
    from pathlib import Path

    import jax
    import orbax.checkpoint as ocp

    from jaxaccel.model import checkpoint

    earlier = jaxaccel.from_params(TINY, tiny_params, eos_token_ids=())
    newer = jaxaccel.from_params(TINY, jax.tree.map(lambda x: -x, tiny_params), eos_token_ids=())
    embed = lambda lm: np.asarray(lm.params["embed"]["embedding"])  # noqa: E731
    folder = earlier.save(tmp_path / "m")
    real_write = Path.write_text

    def full_at_the_journal(self, *args, **kwargs):
        if self.name.startswith(checkpoint.JOURNAL):
            raise OSError(28, "No space left on device")
        return real_write(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", full_at_the_journal)
        with pytest.raises(CheckpointError, match="No space left on device.*earlier model is back in place"):
            newer.save(folder)
    assert np.array_equal(embed(jaxaccel.load(folder)), embed(earlier))
    assert not (folder / checkpoint.SET_ASIDE).exists()

    real_rename, renames = Path.rename, [0]

    def killed_after_one_set_aside(self, target):
        if Path(target).parent.name == checkpoint.SET_ASIDE and not Path(target).name.startswith(checkpoint.JOURNAL):
            renames[0] += 1
            if renames[0] == 2:  # the marker is aside, params (old) not yet
                raise Killed
        return real_rename(self, target)

    with monkeypatch.context() as m:
        m.setattr(Path, "rename", killed_after_one_set_aside)
        with pytest.raises(Killed):
            newer.save(folder)
    assert (folder / checkpoint.SET_ASIDE / "jaxaccel.json").exists() and not (folder / "jaxaccel.json").exists()
    shutil.rmtree(folder / checkpoint.STAGING)  # "leftover junk", deleted by hand
    with monkeypatch.context() as m:
        m.setattr(ocp.StandardCheckpointer, "save", lambda *a, **kw: (_ for _ in ()).throw(OSError(28, "full")))
        with pytest.raises(CheckpointError):
            newer.save(folder)
    assert np.array_equal(embed(jaxaccel.load(folder)), embed(earlier))
