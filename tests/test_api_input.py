"""The Python API's input checks (found by fuzzing it as a notebook user would call it): a user
mistake is one JaxaccelError line before any work and never a wrong model or lost files;
numpy inputs of valid values are accepted as the Python values they hold."""
import dataclasses

import jax
import numpy as np
import pytest

import jaxaccel
from conftest import TINY
from jaxaccel.errors import ConfigError, InvalidArgumentError, InvalidPromptError, ModelLoadError


@pytest.mark.parametrize("change,message", [
    (dict(n_layers=3), "['layer_2']['attn']['k']['kernel'] is missing"),  # was a copy of layer 1
    (dict(n_layers=1), "is not a parameter of this config"),
    (dict(d_model=64), "['embed']['embedding'] has shape [97, 32], the config gives [97, 64]"),
])
def test_from_params_refuses_params_of_another_config(tiny_params, change, message):
    with pytest.raises(InvalidArgumentError, match="params do not match the config") as e:
        jaxaccel.from_params(dataclasses.replace(TINY, **change), tiny_params)
    assert message in str(e.value)


def test_from_params_takes_a_frozen_dict(tiny_params, tiny_lm):
    import flax

    lm = jaxaccel.from_params(TINY, flax.core.freeze(tiny_params), eos_token_ids=())
    assert lm.generate([[1, 2]], max_new_tokens=3).tokens == tiny_lm.generate([[1, 2]], max_new_tokens=3).tokens


@pytest.mark.parametrize("args,kwargs,message", [
    ((TINY, {}), {}, "got an empty dict"),
    ((TINY, None), {}, "got NoneType"),
    (({"vocab_size": 97}, "P"), {}, "config must be a jaxaccel.config.ModelConfig"),
    ((TINY, "P"), {"dtype": "float32"}, "unknown argument 'dtype'"),
    ((TINY, "P"), {"eos_token_ids": "x"}, "eos_token_ids must be a list of token ids"),
    ((TINY, "P"), {"eos_token_ids": 2}, "eos_token_ids must be a list of token ids"),
    ((TINY, "P"), {"tokenizer": 5}, "tokenizer must have encode and decode methods"),
])
def test_from_params_bad_arguments(tiny_params, args, kwargs, message):
    config, params = args
    with pytest.raises(InvalidArgumentError, match=message):
        jaxaccel.from_params(config, tiny_params if params == "P" else params, **kwargs)


@pytest.mark.parametrize("prompts,message", [
    (b"abc", "prompts are bytes"),
    ([b"abc"], "prompt 0 is bytes"),
    ([[True, False]], "token ids must be integers, got True"),
    ([["1", "2"]], "token ids must be integers, got '1'"),
    ([[1.0, float("inf")]], "token ids must be integers, got inf"),
    ({"a": 1}, "got dict"),
    (np.zeros((2, 2, 2), np.int32), "must be 1-D (one prompt) or 2-D (a batch)"),
])
def test_bad_prompts(tiny_lm, prompts, message):
    with pytest.raises(InvalidPromptError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_lm.generate(prompts, max_new_tokens=2)


def test_numpy_inputs_read_as_the_values_they_hold(tiny_lm):
    expected = tiny_lm.generate([[1, 2, 3], [4, 5, 6]], max_new_tokens=3, temperature=0.7, top_k=5, top_p=0.9,
                                seed=3).tokens
    for prompts in (np.array([[1, 2, 3], [4, 5, 6]], np.int64), jax.numpy.array([[1, 2, 3], [4, 5, 6]])):
        out = tiny_lm.generate(prompts, max_new_tokens=3, temperature=np.float32(0.7), top_k=np.int64(5),
                               top_p=np.float32(0.9), seed=np.int64(3))
        assert out.tokens == expected
    assert tiny_lm.generate([jax.numpy.array([1, 2, 3])], max_new_tokens=3).tokens == \
        tiny_lm.generate(np.array([1, 2, 3]), max_new_tokens=3).tokens == \
        tiny_lm.generate([np.int64(1), np.int64(2), np.int64(3)], max_new_tokens=3).tokens == \
        tiny_lm.generate([1, 2, 3], max_new_tokens=3).tokens
    torch = pytest.importorskip("torch")  # other array types with __array__ / __index__ read the same
    assert tiny_lm.generate([torch.tensor([1, 2, 3])], max_new_tokens=3).tokens == \
        tiny_lm.generate(list(jax.numpy.array([1, 2, 3])), max_new_tokens=3).tokens == \
        tiny_lm.generate([1, 2, 3], max_new_tokens=3).tokens
    assert tiny_lm.generate([1, 2], max_new_tokens=3, temperature=1.0, seed=jax.numpy.int32(5)).tokens == \
        tiny_lm.generate([1, 2], max_new_tokens=3, temperature=1.0, seed=5).tokens
    same = [tiny_lm.generate([[1, 2]], max_new_tokens=4, method="recycling", template=t).tokens
            for t in ([2, 2], np.array([2, 2]))]
    assert same[0] == same[1]


@pytest.mark.parametrize("kwargs,message", [
    (dict(seed=None), "seed must be an integer"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(seed=2**70), "seed must be an integer"),
    (dict(method=["a"]), "method must be a method name"),
    (dict(temprature=0.7), "unknown option temprature for method 'autoregressive' (did you mean temperature?)"),
    (dict(top_k="5"), "top_k must be an integer >= 1, got '5'"),
    (dict(max_new_tokens=10**12), "the KV cache for "),
    (dict(method="recycling", method_input="x"), "method_input for 'recycling' must be numeric arrays, got str"),
])
def test_bad_generate_arguments(tiny_lm, kwargs, message):
    with pytest.raises(InvalidArgumentError) as e:
        tiny_lm.generate([[1, 2]], **{"max_new_tokens": 2, **kwargs})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_save_and_export_never_write_over_other_files(tiny_lm, tmp_path):
    folder = tmp_path / "mine"
    (folder / "params").mkdir(parents=True)
    (folder / "params" / "data.txt").write_text("keep")
    (folder / "model_weights_mine.safetensors").write_text("keep")
    with pytest.raises(InvalidArgumentError, match="holds other files .*pass overwrite=True"):
        tiny_lm.save(folder)
    with pytest.raises(InvalidArgumentError, match="holds other files"):
        tiny_lm.export_hf(folder)
    assert (folder / "params" / "data.txt").read_text() == "keep"
    assert (folder / "model_weights_mine.safetensors").read_text() == "keep"
    assert not (folder / "config.json").exists()
    # A folder holding only an earlier save / export is replaced; overwrite=True writes beside other files.
    again = tiny_lm.save(tiny_lm.save(tmp_path / "ckpt"))
    assert jaxaccel.load(again).generate([[1, 2]], max_new_tokens=3).tokens == \
        tiny_lm.generate([[1, 2]], max_new_tokens=3).tokens
    tiny_lm.export_hf(tiny_lm.export_hf(tmp_path / "hf"))
    tiny_lm.export_hf(folder, overwrite=True)
    assert (folder / "config.json").is_file() and (folder / "params" / "data.txt").read_text() == "keep"
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(InvalidArgumentError, match="is a file, not a folder"):
        tiny_lm.export_hf(tmp_path / "a_file")
    with pytest.raises(InvalidArgumentError, match="max_shard_bytes must be an integer >= 1, got '2GB'"):
        tiny_lm.export_hf(tmp_path / "x", max_shard_bytes="2GB")
    with pytest.raises(InvalidArgumentError, match="the destination must be a folder path"):
        tiny_lm.save(None)


def test_load_and_mesh_arguments():
    with pytest.raises(ModelLoadError, match="a model path .* is needed, got 5"):
        jaxaccel.load(5)
    from jax.sharding import Mesh

    with pytest.raises(InvalidArgumentError, match="it lacks fsdp, tensor, expert"):
        jaxaccel.load("builtin:draft", mesh=Mesh(np.array(jax.devices()[:1]), ("data",)))
    from jaxaccel.sharding import parse_mesh_spec

    with pytest.raises(ConfigError, match="size must be an integer, got 2.7"):
        parse_mesh_spec({"tensor": 2.7})
    with pytest.raises(ConfigError, match="names the axis 'tensor' twice"):
        parse_mesh_spec("tensor=2,tensor=1")
