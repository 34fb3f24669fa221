"""Hugging Face export/import: a config its family cannot hold is refused, a misshapen tensor is
named, an export is never half-written or mixed with an earlier one, a re-export touches only
the export's own files, and the tokenizer's side files (and its BOS behaviour) come along."""
import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxaccel
from conftest import randomize
from jaxaccel.cli import run_cli
from jaxaccel.config import ModelConfig
from jaxaccel.convert.__main__ import main as convert_main
from jaxaccel.convert.hf import EXPORT_MANIFEST, config_from_hf, config_to_hf, export_hf, tensor_plan
from jaxaccel.errors import CheckpointError, ConfigError, ModelLoadError, UnsupportedArchitectureError
from jaxaccel.model.transformer import init_params

CFG = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=24, max_seq_len=64)
SP_MODEL = Path(jaxaccel.__file__).resolve().parent / "assets" / "default_model" / "tokenizer.model"


def tiny(seed=0, config=CFG, **kwargs):
    params = randomize(init_params(config, jax.random.key(seed), "unrolled"), seed=seed)
    return jaxaccel.from_params(config, params, **{"eos_token_ids": (), **kwargs})


def embedding(lm):
    return np.asarray(lm.params["embed"]["embedding"])


def word_level_tokenizer(folder: Path):
    """A 64-piece tokenizer.json (the tokenizers library, no training)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from jaxaccel.tokenizer import HFTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 64)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return HFTokenizer(folder / "tokenizer.json")


class KilledTokenizer:
    """A tokenizer whose save is where the export process dies."""
    vocab_size = 64

    def encode(self, text):
        return [5]

    def decode(self, ids):
        return ""

    def save(self, folder):
        raise KeyboardInterrupt


def run(argv, capsys):
    try:
        code = run_cli(convert_main, argv)
    except SystemExit as e:  # `error: ...` and exit 2
        code = e.code
    return code, capsys.readouterr().err


# ----------------------------------------------------------------------------- 1: refusals


@pytest.mark.parametrize("changes, setting, hint", [
    (dict(qkv_bias=True), "model.qkv_bias=true", "set model.architecture to qwen2"),
    (dict(sliding_window=8), "model.sliding_window=8", "set model.architecture to mistral"),
    (dict(architecture="qwen2"), "model.qkv_bias=false", "set model.architecture to llama"),
    (dict(architecture="qwen2", qkv_bias=True, sliding_window=8), "model.sliding_window=8", "none of the three"),
    (dict(architecture="mistral", qkv_bias=True), "model.qkv_bias=true", "set model.architecture to qwen2"),
])
def test_export_refuses_a_config_its_hf_family_cannot_hold(tmp_path, changes, setting, hint):
    lm = tiny(config=dataclasses.replace(CFG, **changes))
    with pytest.raises(ConfigError) as raised:
        lm.export_hf(tmp_path / "out")
    message = str(raised.value)
    assert setting in message and hint in message and "\n" not in message
    assert not (tmp_path / "out" / "config.json").exists()


def test_cli_export_of_a_biased_llama_is_one_error_line(tmp_path, capsys):
    ckpt = tiny(config=dataclasses.replace(CFG, qkv_bias=True)).save(tmp_path / "ckpt")
    code, err = run(["export", str(ckpt), str(tmp_path / "hf")], capsys)
    assert code == 2 and err.startswith("error: cannot export") and "qkv_bias" in err and err.count("\n") == 1
    assert not (tmp_path / "hf" / "config.json").exists()


# ----------------------------------------------------------------------------- 2: transposed tensors


@pytest.mark.parametrize("name", ["k_proj", "v_proj"])
def test_transposed_kv_weight_is_refused_with_both_shapes(tmp_path, name):
    folder = tiny().export_hf(tmp_path / "hf")
    tensors = load_file(str(folder / "model.safetensors"))
    key = f"model.layers.0.self_attn.{name}.weight"
    assert tensors[key].shape == (8, 16)
    tensors[key] = np.ascontiguousarray(tensors[key].T)  # same element count, wrong layout
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"tensor {key} has shape \[16, 8\], expected \[8, 16\]"):
        jaxaccel.load(folder)


# ----------------------------------------------------------------------------- 3: no EOS


def test_export_without_eos_generates_in_transformers(tmp_path):
    folder = tiny().export_hf(tmp_path / "hf")
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] is None
    assert jaxaccel.load(folder).eos_token_ids == ()
    torch = pytest.importorskip("torch", reason="needs the peers extra (torch + transformers)")
    transformers = pytest.importorskip("transformers", reason="needs the peers extra (torch + transformers)")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


# ----------------------------------------------------------------------------- 4, 5, 7: re-exports


@pytest.mark.parametrize("killed_at", ["second shard", "tokenizer"])
def test_killed_reexport_leaves_the_earlier_model(tmp_path, monkeypatch, killed_at):
    import safetensors.numpy

    first = tiny(0)
    folder = first.export_hf(tmp_path / "hf", max_shard_bytes=2_000)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    second = tiny(1, tokenizer=KilledTokenizer() if killed_at == "tokenizer" else None)
    if killed_at == "second shard":
        writes = []
        real = safetensors.numpy.save_file

        def dies_on_second(*args, **kwargs):
            writes.append(1)
            if len(writes) == 2:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(safetensors.numpy, "save_file", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        second.export_hf(folder, max_shard_bytes=2_000)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    np.testing.assert_array_equal(embedding(jaxaccel.load(folder)), embedding(first))


def test_reexport_replaces_the_earlier_tokenizer(tmp_path):
    from jaxaccel.tokenizer import HFTokenizer

    word_level_tokenizer(tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    tok = HFTokenizer(tmp_path / "tok" / "tokenizer.json")  # read with its side file
    folder = tiny(0, tokenizer=tok).export_hf(tmp_path / "hf")
    assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()
    tiny(1).export_hf(folder, overwrite=True)
    assert not (folder / "tokenizer.json").exists() and not (folder / "tokenizer_config.json").exists()
    again = jaxaccel.load(folder)
    assert again.tokenizer is None
    np.testing.assert_array_equal(embedding(again), embedding(tiny(1)))


def test_force_export_deletes_only_the_earlier_exports_files(tmp_path, capsys):
    folder = tiny(0).export_hf(tmp_path / "hf", max_shard_bytes=2_000)
    old_shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(old_shards) > 1
    (folder / "model_backup.safetensors").write_bytes(b"someone else's")
    (folder / "notes.txt").write_text("keep")
    source = tiny(1).export_hf(tmp_path / "source")
    code, err = run(["export", str(source), str(folder), "--force"], capsys)
    assert code == 0, err
    assert (folder / "model_backup.safetensors").read_bytes() == b"someone else's"
    assert (folder / "notes.txt").read_text() == "keep"
    assert not any((folder / name).exists() for name in old_shards)
    assert not (folder / "model.safetensors.index.json").exists()
    assert not any(p.name.startswith(".jaxaccel") and p.name != EXPORT_MANIFEST for p in folder.iterdir())
    np.testing.assert_array_equal(embedding(jaxaccel.load(folder)), embedding(tiny(1)))


# ----------------------------------------------------------------------------- 8: files without an index


def test_model_safetensors_wins_without_an_index(tmp_path):
    folder = tiny(0).export_hf(tmp_path / "hf")
    other = load_file(str(tiny(1).export_hf(tmp_path / "other") / "model.safetensors"))
    save_file(other, str(folder / "zz_other.safetensors"))  # sorts after model.safetensors
    np.testing.assert_array_equal(embedding(jaxaccel.load(folder)), embedding(tiny(0)))


def test_a_tensor_in_two_files_without_an_index_is_refused(tmp_path):
    folder = tiny(0).export_hf(tmp_path / "hf")
    (folder / "model.safetensors").rename(folder / "a.safetensors")
    shutil.copy(folder / "a.safetensors", folder / "b.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor \S+ is in both a.safetensors and b.safetensors") as raised:
        jaxaccel.load(folder)
    assert "\n" not in str(raised.value)


def _restore_as(path: Path, name: str, dtype: str, data: bytes) -> None:
    """Rewrite safetensors file `path` with tensor `name` stored as `dtype` (safetensors' name,
    e.g. F8_E4M3, which numpy cannot write) holding `data`, the other tensors unchanged."""
    tensors = load_file(str(path))
    shape = list(tensors.pop(name).shape)
    header, blobs, offset = {}, [], 0
    names = {"F32": "<f4", "F16": "<f2", "I8": "i1"}
    for key, value in [(name, None)] + sorted(tensors.items()):
        blob = data if value is None else np.ascontiguousarray(value).tobytes()
        kind = dtype if value is None else {np.dtype(v): k for k, v in names.items()}[value.dtype]
        header[key] = {"dtype": kind, "shape": shape if value is None else list(value.shape),
                       "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


@pytest.mark.parametrize("dtype,itemsize", [("F8_E4M3", 1), ("I8", 1)])
def test_quantized_weights_are_refused_not_misread(tmp_path, dtype, itemsize):
    # FP8 was a numpy traceback; int8 loaded silently as a different model
    folder = tiny().export_hf(tmp_path / "hf")
    key = "model.layers.0.mlp.up_proj.weight"
    _restore_as(folder / "model.safetensors", key, dtype, bytes(24 * 16 * itemsize))
    with pytest.raises(CheckpointError, match=rf"tensor {key} is stored as {dtype}; only F32, BF16, F16, F64") as e:
        jaxaccel.load(folder)
    assert "\n" not in str(e.value)
    hf = json.loads((folder / "config.json").read_text())
    hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3"}
    (folder / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UnsupportedArchitectureError, match="quantized checkpoints .quantization_config, quant_method "
                                                            "'fp8'. are not supported"):
        jaxaccel.load(folder)


# ----------------------------------------------------------------------------- 9: config.json readings


def hf_config(architecture="llama", **changes):
    config = dataclasses.replace(CFG, architecture=architecture, qkv_bias=architecture == "qwen2",
                                 sliding_window=16 if architecture == "mistral" else None)
    hf = config_to_hf(config)
    for key, value in changes.items():
        if value is ...:
            hf.pop(key, None)
        else:
            hf[key] = value
    return hf


def test_rope_scaling_that_is_not_an_object_is_one_config_error():
    with pytest.raises(ConfigError, match="rope_scaling must be an object") as raised:
        config_from_hf(hf_config(rope_parameters=None, rope_scaling="linear"))
    assert "\n" not in str(raised.value)


def test_missing_fields_take_transformers_defaults():
    assert config_from_hf(hf_config("mistral", sliding_window=...)).sliding_window == 4096
    assert config_from_hf(hf_config("mistral", sliding_window=None)).sliding_window is None
    assert config_from_hf(hf_config("mistral")).sliding_window == 16
    for arch, default in (("llama", 2048), ("qwen2", 32768), ("mistral", 131072)):
        assert config_from_hf(hf_config(arch, max_position_embeddings=...)).max_seq_len == default
    with pytest.raises(ConfigError, match="max_position_embeddings must be >= 1, got 0"):
        config_from_hf(hf_config(max_position_embeddings=0))
    # llama3 RoPE without original_max_position_embeddings: transformers uses max_position_embeddings
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    scaled = config_from_hf(hf_config("llama", rope_parameters={"rope_theta": 1e4, **llama3}, max_position_embeddings=1024))
    assert (scaled.rope_scaling.kind, scaled.rope_scaling.original_max_position) == ("llama3", 1024)


def test_null_architectures_go_by_model_type():
    for arch in ("llama", "qwen2", "mistral"):
        assert config_from_hf(hf_config(arch, architectures=None)).architecture == arch


# ----------------------------------------------------------------------------- 6: tokenizer side files


def test_tokenizer_side_files_survive_import_and_export(tmp_path):
    folder = tiny(0, tokenizer=word_level_tokenizer(tmp_path / "tok")).export_hf(tmp_path / "hf")
    extras = {"tokenizer_config.json": b'{"model_max_length": 64, "chat_template_note": "x"}\n',
              "special_tokens_map.json": b'{"bos_token": "<s>", "eos_token": "</s>"}\n',
              "chat_template.jinja": b"{% for m in messages %}{{ m['content'] }}{% endfor %}"}
    for name, data in extras.items():
        (folder / name).write_bytes(data)
    again = jaxaccel.load(folder).export_hf(tmp_path / "again")
    for name, data in extras.items():
        assert (again / name).read_bytes() == data, name
    # through a jaxaccel checkpoint too (HF -> jaxaccel -> HF), the source folder gone meanwhile
    saved = jaxaccel.load(folder).save(tmp_path / "ckpt")
    import shutil

    shutil.rmtree(folder)
    back = jaxaccel.load(saved).export_hf(tmp_path / "back")
    for name, data in extras.items():
        assert (saved / name).read_bytes() == data and (back / name).read_bytes() == data, name


def test_sentencepiece_bos_behaviour_is_written_for_transformers(tmp_path):
    from jaxaccel.convert.hf import hf_add_bos
    from jaxaccel.tokenizer import SentencePieceTokenizer, load_tokenizer

    tok = SentencePieceTokenizer(SP_MODEL, add_bos=True)
    folder = tiny(0, config=dataclasses.replace(CFG, vocab_size=tok.vocab_size), tokenizer=tok).export_hf(
        tmp_path / "hf")
    text = "def f(x):\n    return x + 1"
    assert tok.encode(text)[0] == 3
    assert json.loads((folder / "tokenizer_config.json").read_text())["add_bos_token"] is True
    assert hf_add_bos(folder) is True
    assert load_tokenizer(folder, add_bos=hf_add_bos(folder)).encode(text) == tok.encode(text)
    transformers = pytest.importorskip("transformers", reason="needs the peers extra (torch + transformers)")
    assert transformers.AutoTokenizer.from_pretrained(folder)(text).input_ids == tok.encode(text)
    # special tokens' text is text, as SentencePiece (and the model's training data) read it:
    # transformers mapped "</s>" to the EOS id
    for special in ("x = '</s>'", "<unk>", "<extra_id_0>"):
        assert transformers.AutoTokenizer.from_pretrained(folder)(special).input_ids == tok.encode(special), special
    # Without BOS the file says so (transformers' own default would be taken otherwise).
    plain = SentencePieceTokenizer(SP_MODEL, add_bos=False)
    folder = tiny(0, config=dataclasses.replace(CFG, vocab_size=tok.vocab_size), tokenizer=plain).export_hf(
        tmp_path / "plain")
    assert hf_add_bos(folder) is False
    assert transformers.AutoTokenizer.from_pretrained(folder)(text).input_ids == plain.encode(text)


def test_ids_past_the_sentencepiece_pieces_decode_to_nothing():
    """A model whose embedding table is padded past its tokenizer (HF checkpoints often are) can
    generate such ids; decoding them raised IndexError at the end of generate, losing the tokens."""
    from jaxaccel.tokenizer import SentencePieceTokenizer

    tok = jaxaccel.load("builtin:default").tokenizer
    assert isinstance(tok, SentencePieceTokenizer)
    ids = tok.encode("def f(x):\n    return x")
    n = tok.vocab_size
    assert tok.decode(ids + [n, n + 7]) == tok.decode(ids) and tok.decode([n]) == ""
    assert tok.piece(n) == "" and tok.piece(ids[-1]) != ""


# ----------------------------------------------------------------------------- review of 2026-12-04


def test_a_model_transformers_resaved_is_not_taken_for_an_own_export(tmp_path, capsys):
    """transformers keeps unknown config keys: a jaxaccel export it loaded and saved again (after a
    fine-tune, say) kept the export mark, and a later export replaced it without --force."""
    folder = tiny(0).export_hf(tmp_path / "hf")
    copied = Path(shutil.copytree(folder, tmp_path / "copy"))  # a plain copy is still the export
    source = tiny(1).export_hf(tmp_path / "source")
    code, err = run(["export", str(source), str(copied)], capsys)
    assert code == 0, err
    config = json.loads((folder / "config.json").read_text())
    config["transformers_version"] = "5.25.0"  # what save_pretrained writes, the mark kept
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code, err = run(["export", str(source), str(folder)], capsys)
    assert code == 2 and "holds a Hugging Face model that jaxaccel did not export, or changed since" in err, err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    # re-saved weights (other shards, same config): refused too
    (folder / "config.json").write_text(json.dumps(config_to_hf(CFG) | {"exported_by": "jaxaccel"}, indent=2))
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes() + b" ")
    with pytest.raises(jaxaccel.errors.InvalidArgumentError, match="did not export, or changed since"):
        tiny(1).export_hf(folder)


@pytest.mark.filterwarnings("ignore:.*pieces but the model")
def test_force_writes_beside_another_models_tokenizer_unless_it_brings_its_own(tmp_path, capsys):
    """`import --force` / save(overwrite=True) into an HF folder deleted its tokenizer files even
    when the new model had no tokenizer; export --force into a jaxaccel checkpoint's folder
    deleted its tokenizer.model. A folder's tokenizer is replaced only by a write that has one."""
    hf = tiny(0).export_hf(tmp_path / "hf")
    word_level_tokenizer(hf)
    (hf / "tokenizer_config.json").write_text('{"add_bos_token": true}')
    tiny(1).save(hf, overwrite=True)
    assert (hf / "tokenizer.json").is_file() and (hf / "tokenizer_config.json").is_file()
    assert jaxaccel.load(hf).tokenizer is not None  # the folder's, as a tokenizer copied beside a model
    np.testing.assert_array_equal(embedding(jaxaccel.load(hf)), embedding(tiny(1)))
    with_sp = tiny(2, tokenizer=jaxaccel.tokenizer.SentencePieceTokenizer(SP_MODEL))
    with_sp.save(hf, overwrite=True)  # an earlier save is there now: its entries all go
    assert sorted(p.name for p in hf.glob("tokenizer*")) == ["tokenizer.model"]
    assert isinstance(jaxaccel.load(hf).tokenizer, jaxaccel.tokenizer.SentencePieceTokenizer)

    ckpt = with_sp.save(tmp_path / "ckpt")
    code, err = run(["export", str(tmp_path / "hf"), str(ckpt), "--force"], capsys)  # it has no tokenizer.json
    assert code == 0, err
    assert (ckpt / "tokenizer.model").read_bytes() == SP_MODEL.read_bytes() and (ckpt / "jaxaccel.json").is_file()
    word_level_tokenizer(tmp_path / "tok")
    tiny(3, tokenizer=jaxaccel.tokenizer.HFTokenizer(tmp_path / "tok" / "tokenizer.json")).export_hf(ckpt, overwrite=True)
    assert sorted(p.name for p in ckpt.glob("tokenizer*")) == ["tokenizer.json"]  # one tokenizer, the export's


def test_import_keeps_the_weights_dtype_when_config_json_says_another(tmp_path):
    """config.json's dtype was taken for the stored one: float32 weights under "dtype":
    "bfloat16" were rounded on import (convert promises the source's dtype, losslessly)."""
    folder = tiny(0).export_hf(tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "float32"
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    with pytest.warns(UserWarning, match="config.json says bfloat16 but the weights are stored as float32"):
        lm = jaxaccel.load(folder)
    assert lm.config.param_dtype == "float32"
    np.testing.assert_array_equal(embedding(lm), embedding(tiny(0)))
    assert jaxaccel.load(folder, dtype="bfloat16").config.param_dtype == "bfloat16"  # asked for: as asked


def test_model_safetensors_wins_over_an_index_beside_it_as_in_transformers(tmp_path):
    folder = tiny(0).export_hf(tmp_path / "hf", max_shard_bytes=2_000)
    assert (folder / "model.safetensors.index.json").is_file()
    shutil.copy(tiny(1).export_hf(tmp_path / "one") / "model.safetensors", folder)
    np.testing.assert_array_equal(embedding(jaxaccel.load(folder)), embedding(tiny(1)))


def test_a_llama_whose_width_is_not_a_multiple_of_its_heads_exports_as_mistral():
    from jaxaccel.convert.hf import check_exportable

    odd = dataclasses.replace(CFG, d_model=20, n_heads=2, head_dim=8)
    with pytest.raises(ConfigError, match="d_model 21 is not a multiple of n_heads 2.*architecture to mistral"):
        check_exportable(dataclasses.replace(odd, d_model=21, n_heads=2))
    check_exportable(dataclasses.replace(odd, d_model=21, architecture="mistral", sliding_window=None))
    check_exportable(odd)


def test_export_writes_back_what_the_import_kept(tmp_path):
    """HF -> jaxaccel -> HF dropped generation_config.json's defaults and pad_token_id, and an
    exported SkipDecode model lost its trained schedule (its info): another decode."""
    folder = tiny(0).export_hf(tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "pad_token_id": 3}))
    gen = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": 3, "do_sample": True, "temperature": 0.6,
           "top_p": 0.9}
    (folder / "generation_config.json").write_text(json.dumps(gen))
    saved = jaxaccel.load(folder).save(tmp_path / "ja")
    out = jaxaccel.load(saved).export_hf(tmp_path / "back")
    assert json.loads((out / "generation_config.json").read_text()) == gen
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == 3
    assert "jaxaccel_info" not in json.loads((out / "config.json").read_text())  # nothing else to carry

    schedule = {"warmup_layers": 1, "min_layers": 1, "max_layers": 1, "max_length": 40}
    lm = tiny(0, info={"skip_schedule": schedule, "trained_steps": 7})
    again = jaxaccel.load(lm.export_hf(tmp_path / "skip"))
    assert again.info == {"skip_schedule": schedule, "trained_steps": 7}
    from jaxaccel.decode.skipdecode import SkipDecode

    method = SkipDecode()
    method.use_model_info(again.info)
    assert method.opts["max_length"] == 40


def test_rope_parameters_and_rope_scaling_that_disagree_are_refused():
    hf = config_to_hf(CFG)
    both = {**hf, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0},
            "rope_scaling": {"type": "linear", "factor": 4.0}}
    with pytest.raises(ConfigError, match="rope_parameters and rope_scaling disagree \\(rope type 'default' vs "
                                          "'linear'\\)"):
        config_from_hf(both)
    agree = {**hf, "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0},
             "rope_scaling": {"type": "linear", "factor": 4.0}}
    assert config_from_hf(agree).rope_scaling.factor == 4.0
    with pytest.raises(ConfigError, match="disagree \\(factor\\)"):
        config_from_hf({**agree, "rope_scaling": {"type": "linear", "factor": 2.0}})


def test_tokenizer_json_is_read_and_written_as_utf8_in_any_locale(tmp_path):
    """tokenizer.json is UTF-8 by definition: under a C/ASCII locale it was read with the
    locale's codec (a non-ASCII piece made the file 'not a valid tokenizer file')."""
    import os
    import subprocess
    import sys

    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "caf\u00e9": 1, "\u00fcber": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "out").mkdir()
    script = ("import sys; from jaxaccel.tokenizer import HFTokenizer; t = HFTokenizer(sys.argv[1]); "
              "t.save(__import__('pathlib').Path(sys.argv[2])); print(t.encode(chr(252) + 'ber caf' + chr(233)))")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    proc = subprocess.run([sys.executable, "-X", "utf8=0", "-c", script, str(tmp_path / "tokenizer.json"),
                           str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[2, 1]", proc.stderr
    assert Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json")).encode("\u00fcber caf\u00e9").ids == [2, 1]


def test_empty_sentencepiece_file_is_refused_before_sentencepiece_logs(tmp_path, capfd):
    from jaxaccel.tokenizer import load_tokenizer

    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="tokenizer.model: not a valid tokenizer file \\(the file is empty\\)"):
        load_tokenizer(tmp_path)
    assert capfd.readouterr().err == ""  # no sentencepiece log lines before the one-line error


# ----------------------------------------------------------------------------- review of 2026-12-04


def test_layer_types_decide_the_window_or_are_refused():
    """transformers reads a Mistral config with layer_types as Ministral (a window on the
    sliding_attention layers only), Qwen2 windows per layer_types: a window on every layer
    (the old reading) gave logits 6.7 off past the window, silently."""
    n = CFG.n_layers
    assert config_from_hf(hf_config("mistral", layer_types=["full_attention"] * n)).sliding_window is None
    assert config_from_hf(hf_config("mistral", layer_types=["sliding_attention"] * n)).sliding_window == 16
    assert config_from_hf(hf_config("qwen2", layer_types=["full_attention"] * n)).sliding_window is None
    mixed = ["full_attention", "sliding_attention"] * (n // 2)
    for arch in ("mistral", "qwen2"):
        with pytest.raises(UnsupportedArchitectureError, match="per-layer attention kinds"):
            config_from_hf(hf_config(arch, layer_types=mixed))
    with pytest.raises(UnsupportedArchitectureError, match="per-layer attention kinds"):
        config_from_hf(hf_config("qwen2", layer_types=["sliding_attention"] * n))
    with pytest.raises(ConfigError, match="layer_types must be a list"):
        config_from_hf(hf_config("mistral", layer_types=["chunked_attention"] * n))


def test_a_nested_rope_theta_wins_over_the_top_level_one_as_in_transformers():
    nested = hf_config(rope_parameters=None, rope_theta=500.0,
                       rope_scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    assert config_from_hf(nested).rope_theta == 10000.0
    assert config_from_hf(hf_config(rope_parameters=None, rope_scaling=None, rope_theta=500.0)).rope_theta == 500.0
    assert config_from_hf(hf_config(rope_parameters=None, rope_scaling=None, rope_theta=...)).rope_theta == 10000.0


def test_remote_destinations_are_never_made_local_folders(tmp_path, capsys, monkeypatch):
    """`convert` made "gs://b/x" the local folder "gs:/b/x" (and s3:// too) and said "wrote";
    export_hf("gs://...") wrote the export to the local /gs/...: a Hugging Face folder is
    local only (safetensors), an s3:// destination is refused, a gs:// import is saved to the
    bucket by the checkpoint writer (which takes gs://)."""
    from jaxaccel.errors import InvalidArgumentError

    monkeypatch.chdir(tmp_path)
    source = str(tiny().save(tmp_path / "m"))
    for direction, dest, needle in (("export", "gs://bucket/x", "Hugging Face folder is written to a local folder"),
                                    ("export", "s3://bucket/x", "Hugging Face folder is written to a local folder"),
                                    ("import", "s3://bucket/x", "s3:// is not supported here")):
        code, err = run([direction, source, dest], capsys)
        assert code == 2 and needle in err and err.count("\n") == 1, (direction, dest, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no gs: or s3: folder
    with pytest.raises(InvalidArgumentError, match="written to a local folder only"):
        tiny().export_hf("gs://bucket/x")
    with pytest.raises(InvalidArgumentError, match="written to a local folder only"):
        export_hf("gs://bucket/x", CFG, None)
    assert not Path("/gs/bucket").exists()


def test_a_gs_hugging_face_folder_is_refused_in_one_line(tmp_path, monkeypatch):
    """It was read through pathlib (gs://b/x -> the local /gs/b/x): refused instead. (The
    bucket is a local folder behind an object-store path type, as in test_foundation.)"""
    from test_foundation import _ObjectStorePath

    from jaxaccel.model import checkpoint as ckpt

    tiny().export_hf(tmp_path / "bucket" / "hf")
    real = ckpt.as_path
    monkeypatch.setattr(ckpt, "as_path", lambda f: _ObjectStorePath(tmp_path / str(f)[len("gs://"):], str(f))
                        if str(f).startswith("gs://") else real(f))
    with pytest.raises(ModelLoadError, match="'gs://bucket/hf': a Hugging Face folder is read from a local folder "
                                             "only"):
        jaxaccel.load("gs://bucket/hf")


# ----------------------------------------------------------------------------- stop 43: what the files hold


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def test_a_tied_config_with_another_stored_head_loads_that_head_untied(tmp_path):
    """transformers' rule: config.json ties the head, the weights hold an lm_head.weight of other
    values, so that head is the model's. It was ignored (logits off by 5 from transformers')."""
    import warnings

    untied = tiny(0, dataclasses.replace(CFG, tie_embeddings=False))
    folder = untied.export_hf(tmp_path / "hf")
    _edit_config(folder, tie_word_embeddings=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm = jaxaccel.load(folder)
    said = [str(w.message) for w in caught if "lm_head.weight of other values" in str(w.message)]
    assert len(said) == 1 and "loading that head (untied)" in said[0], [str(w.message) for w in caught]
    assert not lm.config.tie_embeddings
    np.testing.assert_array_equal(np.asarray(lm.params["lm_head"]["kernel"]),
                                  np.asarray(untied.params["lm_head"]["kernel"]))
    ids = np.arange(1, 9)[None]
    np.testing.assert_array_equal(np.asarray(lm.logits(ids)), np.asarray(untied.logits(ids)))
    # a stored head equal to the embedding (a tied model saved with both) stays tied, silently
    tied = tiny(0, dataclasses.replace(CFG, tie_embeddings=True)).export_hf(tmp_path / "tied")
    weights = load_file(str(tied / "model.safetensors"))
    save_file({**weights, "lm_head.weight": weights["model.embed_tokens.weight"]}, str(tied / "model.safetensors"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert jaxaccel.load(tied).config.tie_embeddings
    assert [str(w.message) for w in caught] == []


def test_stored_tensors_the_config_does_not_use_are_said(tmp_path):
    import warnings

    folder = tiny(0, dataclasses.replace(CFG, n_layers=2)).export_hf(tmp_path / "hf")
    _edit_config(folder, num_hidden_layers=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert jaxaccel.load(folder).config.n_layers == 1
    said = [str(w.message) for w in caught if "not part of the model config.json describes" in str(w.message)]
    assert len(said) == 1 and ": 9 stored tensors" in said[0] and "model.layers.1." in said[0], said


def test_tensors_an_index_leaves_out_or_misplaces_are_read_from_the_listed_files(tmp_path):
    """transformers reads every tensor of the files an index lists; jaxaccel said such a tensor
    was missing from the files."""
    folder = tiny(0).export_hf(tmp_path / "hf", max_shard_bytes=2_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    shards = sorted(set(weight_map.values()))
    # two tensors whose files hold others too (so the index still lists those files)
    shared = [name for name, file in weight_map.items() if list(weight_map.values()).count(file) > 1]
    assert len(shards) > 2 and len(shared) >= 2 and weight_map[shared[0]] != weight_map[shared[-1]]
    left_out, wrong = shared[0], shared[-1]
    del weight_map[left_out]
    weight_map[wrong] = next(s for s in shards if s != weight_map[wrong])
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    lm = jaxaccel.load(folder)
    plan = {name: path for path, name, *_ in tensor_plan(CFG)}
    for path in (plan[left_out], plan[wrong], ("embed", "embedding")):
        a, b = lm.params, tiny(0).params
        for key in path:
            a, b = a[key], b[key]
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_sharded_export_removes_a_model_safetensors_that_would_load_instead(tmp_path, capsys):
    """With no config.json in the folder, an export with --force kept another model's
    model.safetensors beside its new index, and that file (which wins) loaded instead."""
    folder = tmp_path / "dest"
    folder.mkdir()
    shutil.copy(tiny(1).export_hf(tmp_path / "other") / "model.safetensors", folder)
    (folder / "notes.txt").write_text("keep")
    source = tiny(0).export_hf(tmp_path / "source")
    code, err = run(["export", str(source), str(folder), "--force", "--max-shard-size", "2KB"], capsys)
    assert code == 0, err
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    assert (folder / "notes.txt").read_text() == "keep"
    np.testing.assert_array_equal(embedding(jaxaccel.load(folder)), embedding(tiny(0)))


def test_weights_rewritten_in_place_at_their_size_are_not_replaced_without_force(tmp_path, capsys):
    """A fine-tune saved over an export's model.safetensors keeps its size; only the sizes were
    compared, so a later export replaced the fine-tuned weights without --force."""
    import os

    folder = tiny(0).export_hf(tmp_path / "hf")
    weights = load_file(str(folder / "model.safetensors"))
    tuned = {k: v + np.asarray(1, v.dtype) for k, v in weights.items()}
    before = (folder / "model.safetensors").stat()
    save_file(tuned, str(folder / "model.safetensors"), metadata={"format": "pt"})
    # a different mtime even on a file system with coarse timestamps
    os.utime(folder / "model.safetensors", ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert (folder / "model.safetensors").stat().st_size == before.st_size
    source = tiny(1).export_hf(tmp_path / "source")
    code, err = run(["export", str(source), str(folder)], capsys)
    assert code == 2 and "did not export, or changed since" in err, err
    np.testing.assert_array_equal(load_file(str(folder / "model.safetensors"))["model.norm.weight"],
                                  tuned["model.norm.weight"])


def test_a_gs_save_into_a_folder_holding_other_files_is_refused_as_a_local_one(tmp_path, monkeypatch):
    """A local save refuses a folder holding someone else's files unless overwrite=True; a gs://
    save skipped the check (and deletes the old model's files before writing). The bucket is a
    local folder behind an object-store path type, as in test_foundation."""
    from test_foundation import _ObjectStorePath

    from jaxaccel.decode.lm import check_save_destination
    from jaxaccel.errors import InvalidArgumentError
    from jaxaccel.model import checkpoint as ckpt

    real = ckpt.as_path
    monkeypatch.setattr(ckpt, "as_path", lambda f: _ObjectStorePath(tmp_path / str(f)[len("gs://"):], str(f))
                        if str(f).startswith("gs://") else real(f))
    (tmp_path / "bucket" / "run").mkdir(parents=True)
    (tmp_path / "bucket" / "run" / "metrics.jsonl").write_text("{}")
    with pytest.raises(InvalidArgumentError, match=r"destination 'gs://bucket/run' holds other files \(metrics.jsonl\)"):
        tiny().save("gs://bucket/run")
    assert [p.name for p in (tmp_path / "bucket" / "run").iterdir()] == ["metrics.jsonl"]
    # an earlier save there, or an empty or new folder: no objection
    tiny().save(tmp_path / "bucket" / "model")
    for where in ("gs://bucket/model", "gs://bucket/new"):
        check_save_destination(where)


def test_hugging_face_json_files_are_read_as_utf8_in_any_locale(tmp_path):
    """tokenizer_config.json (a chat template, an added "▁" piece) read with an ASCII locale's
    codec failed to decode, and `add_bos_token: true` was dropped silently: every prompt lost
    its BOS. JSON is UTF-8 whatever the locale."""
    import os
    import subprocess
    import sys

    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "chat_template": "\u2581{{ messages }}"}, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "config.json").write_text(json.dumps({**config_to_hf(CFG), "note": "caf\u00e9"}, ensure_ascii=False),
                                          encoding="utf-8")
    script = ("import sys; from pathlib import Path; from jaxaccel.convert.hf import hf_add_bos, read_hf_config; "
              "print(hf_add_bos(Path(sys.argv[1])), read_hf_config(Path(sys.argv[1]))['note'] == 'caf' + chr(233))")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    proc = subprocess.run([sys.executable, "-X", "utf8=0", "-c", script, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["True", "True"], proc.stdout + proc.stderr


def test_the_source_is_compared_as_the_folder_that_is_read(tmp_path, capsys, monkeypatch):
    """`import RUN RUN/model` (a finished run's model/ is what RUN loads) and a quoted `~/m`
    passed the source == destination check, and the model was rewritten in place, at a lower
    precision, without --force."""
    folder = tiny().save(tmp_path / "m")
    (tmp_path / "run").mkdir()
    shutil.copytree(folder, tmp_path / "run" / "model")
    (tmp_path / "run" / "config.yaml").write_text("model: {}\n")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "model").iterdir()}
    code, err = run(["import", str(tmp_path / "run"), str(tmp_path / "run" / "model"), "--dtype", "bfloat16"], capsys)
    assert code == 2 and f"destination must differ from the source (both are {tmp_path / 'run' / 'model'})" in err
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "model").iterdir()} == before
    monkeypatch.setenv("HOME", str(tmp_path))
    code, err = run(["export", str(folder), "~/m"], capsys)
    assert code == 2 and "destination must differ from the source" in err


def test_an_import_does_not_replace_a_trained_model_without_force(tmp_path, capsys):
    """Any jaxaccel model in the destination counted as an earlier import: a run's exported
    model (its training steps and validation figures) was replaced without --force."""
    hf = tmp_path / "hf"
    tiny().export_hf(hf)
    trained = tiny(seed=1)
    trained.info = {"trained_steps": 6, "validation_loss": 3.9}
    trained.save(tmp_path / "trained")
    code, err = run(["import", str(hf), str(tmp_path / "trained")], capsys)
    assert code == 2 and "holds a trained model (6 training steps): an import would replace it" in err
    assert jaxaccel.load(tmp_path / "trained").info["trained_steps"] == 6
    assert run(["import", str(hf), str(tmp_path / "imported")], capsys)[0] == 0
    assert run(["import", str(hf), str(tmp_path / "imported")], capsys)[0] == 0  # an earlier import: replaced
    assert run(["import", str(hf), str(tmp_path / "trained"), "--force"], capsys)[0] == 0
    assert "trained_steps" not in jaxaccel.load(tmp_path / "trained").info


@pytest.mark.parametrize("changes", [
    {"rope_parameters": None, "rope_theta": 10 ** 400},
    {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": float("inf"), "rope_theta": 1e4}},
])
def test_numbers_out_of_range_in_config_json_are_one_config_error(changes):
    """An OverflowError (a float too large, or infinity where an int goes) was a traceback."""
    with pytest.raises(ConfigError, match="a value has the wrong type or range"):
        config_from_hf(hf_config(**changes))
