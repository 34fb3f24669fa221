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


def test_from_params_puts_host_arrays_on_the_device_once(tiny_params, tiny_lm):
    """numpy parameters become device arrays at wrapping: kept as numpy, every call copied
    them to the accelerator again."""
    lm = jaxaccel.from_params(TINY, jax.tree.map(np.asarray, tiny_params), eos_token_ids=())
    assert all(isinstance(v, jax.Array) for v in jax.tree.leaves(lm.params))
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
    # integral floats are ids in a list as in an array (the list was refused: "got float");
    # the unsigned half of the 64-bit seeds is accepted too
    assert tiny_lm.generate([1.0, 2.0], max_new_tokens=3).tokens == \
        tiny_lm.generate(np.array([1.0, 2.0]), max_new_tokens=3).tokens == tiny_lm.generate([1, 2], max_new_tokens=3).tokens
    with pytest.raises(InvalidPromptError, match="token ids must be integers, got 1.5"):
        tiny_lm.generate([1.5, 2.0], max_new_tokens=3)
    top = tiny_lm.generate([1, 2], max_new_tokens=3, temperature=1.0, seed=2**64 - 1).tokens
    assert top == tiny_lm.generate([1, 2], max_new_tokens=3, temperature=1.0, seed=-1).tokens  # modulo 2**64


@pytest.mark.parametrize("kwargs,message", [
    (dict(seed=None), "seed must be a 64-bit integer"),
    (dict(seed=1.5), "seed must be a 64-bit integer"),
    (dict(seed=2**70), "seed must be a 64-bit integer"),
    (dict(seed=2**64), "seed must be a 64-bit integer"),
    (dict(seed=-2**63 - 1), "seed must be a 64-bit integer"),
    (dict(method=["a"]), "method must be a method name"),
    (dict(temprature=0.7), "unknown option temprature for method 'autoregressive' (did you mean temperature?)"),
    (dict(top_k="5"), "top_k must be an integer >= 1, got '5'"),
    (dict(max_new_tokens=2**30), "the KV cache for "),
    (dict(method="recycling", method_input="x"), "method_input for 'recycling' must be a numeric array, got str"),
    (dict(method="recycling", method_input={"a": 1}), "method_input for 'recycling' must be a numeric array, got dict"),
    (dict(method="recycling", method_input=[[1, 2], [3]]), "must be a numeric array, got list"),  # ragged
    (dict(method_input=np.zeros((97, 8))), "method 'autoregressive' takes no method_input"),
    # ids past the vocabulary used to give silent all-zero output (NaN logits from the tree)
    (dict(method="recycling", method_input=np.full((97, 8), 97)), "holds entries that are not token ids: each must be "
                                                                   "-1 (none) or an integer in [0, 97)"),
    (dict(method="chain", draft="recycling", method_input=np.full((97, 1), -2)), "are not token ids"),
    (dict(method="recycling", method_input=np.full((97, 8), 0.7)), "are not token ids"),  # was truncated to 0
    (dict(method="recycling", method_input=np.full((97, 8), np.nan)), "are not token ids"),
    (dict(temperature=True), "temperature must be a finite number >= 0, got True"),
    (dict(temperature=1.0, top_p=True), "top_p must be in (0, 1], got True"),
    (dict(progress="yes"), "progress must be True or False"),
])
def test_bad_generate_arguments(tiny_lm, kwargs, message):
    with pytest.raises(InvalidArgumentError) as e:
        tiny_lm.generate([[1, 2]], **{"max_new_tokens": 2, **kwargs})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_method_input_on_other_devices_reuses_the_compiled_loop(tiny_lm):
    """A recycling matrix from a model on other devices (another mesh) met the loop compiled
    for the first input of that shape, and JAX refused it with a 25-line ValueError."""
    opts = dict(max_new_tokens=4, method="recycling", template=[2, 1], k=2)
    want = tiny_lm.generate([[1, 2, 3]], max_new_tokens=4).tokens
    matrix = np.full((tiny_lm.config.vocab_size, 2), -1, np.int32)
    for device in jax.devices()[:3]:
        out = tiny_lm.generate([[1, 2, 3]], method_input=jax.device_put(matrix, device), **opts)
        assert out.tokens == want


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
    for blank in ("", " "):  # accepted as one device, where the CLI's --mesh refused it
        with pytest.raises(InvalidArgumentError, match="mesh must name axes, e.g. 'tensor=4,data=2'"):
            jaxaccel.load("builtin:draft", mesh=blank)
    from jaxaccel.sharding import parse_mesh_spec

    with pytest.raises(ConfigError, match="size must be an integer, got 2.7"):
        parse_mesh_spec({"tensor": 2.7})
    with pytest.raises(ConfigError, match="names the axis 'tensor' twice"):
        parse_mesh_spec("tensor=2,tensor=1")


def test_what_a_model_folder_cannot_hold_is_refused_before_anything_is_written(tiny_lm, tmp_path):
    """from_params takes any encode/decode tokenizer and any info: save raised AttributeError /
    TypeError tracebacks after writing the params, and left them in a staging folder. A
    `builtin:` destination was written as a folder load() never reads."""
    from jaxaccel.errors import CheckpointError

    class Tok:
        def encode(self, text):
            return [1]

        def decode(self, ids):
            return ""

    for lm, match in ((jaxaccel.from_params(tiny_lm.config, tiny_lm.params, tokenizer=Tok()), "no save\(folder\)"),
                      (jaxaccel.from_params(tiny_lm.config, tiny_lm.params, info={"n": np.int64(3)}),
                       "info cannot be saved as JSON")):
        folder = tmp_path / match[:4]
        with pytest.raises(CheckpointError, match=match) as e:
            lm.save(folder)
        assert "\n" not in str(e.value) and not folder.exists()
    with pytest.raises(InvalidArgumentError, match="names a built-in model"):
        tiny_lm.save("builtin:draft")


def test_save_keeps_what_is_not_its_own_and_an_earlier_model_when_it_fails(tiny_lm, tmp_path, monkeypatch):
    """Found by an API audit: a `params/` folder of the user's was deleted (it has our name but
    no jaxaccel.json beside it); a save that failed half-way (a full disk) had already deleted
    the model it was replacing; a re-save of a model without a tokenizer kept the old one's."""
    theirs = tmp_path / "theirs"
    (theirs / "params").mkdir(parents=True)
    (theirs / "params" / "mydata.bin").write_text("keep")
    with pytest.raises(InvalidArgumentError, match=r"holds other files \(params\)"):
        tiny_lm.save(theirs)
    assert (theirs / "params" / "mydata.bin").read_text() == "keep"
    # an Orbax checkpoint of theirs as params/ too (it was taken for a jaxaccel save killed
    # before its marker, and replaced: a killed local save leaves only its staging folder)
    import orbax.checkpoint as ocp

    orbax_dir = tmp_path / "orbax"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(orbax_dir / "params", {"mine": np.arange(3.0)})
    before = sorted(p.name for p in (orbax_dir / "params").iterdir())
    with pytest.raises(InvalidArgumentError, match=r"holds other files \(params\)"):
        tiny_lm.save(orbax_dir)
    assert sorted(p.name for p in (orbax_dir / "params").iterdir()) == before

    from jaxaccel.errors import CheckpointError

    folder = tiny_lm.save(tmp_path / "ckpt")
    want = tiny_lm.generate([[1, 2]], max_new_tokens=3).tokens

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(ocp.StandardCheckpointer, "save", full_disk)
        with pytest.raises(CheckpointError, match="No space left on device.*left as it was") as e:
            tiny_lm.save(folder)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "orbax", "theirs"]  # no staging folder left behind
    assert jaxaccel.load(folder).generate([[1, 2]], max_new_tokens=3).tokens == want

    # a re-save replaces every file of the old model: no stale tokenizer survives it
    (folder / "tokenizer.model").write_bytes(b"an older model's tokenizer")
    (folder / "notes.txt").write_text("mine")
    tiny_lm.save(folder, overwrite=True)
    assert not (folder / "tokenizer.model").exists() and (folder / "notes.txt").read_text() == "mine"
    assert jaxaccel.load(folder).tokenizer is None

    # through a link to the folder; a params/ without a marker is not taken for ours (a killed
    # local save leaves only its staging folder): refused, written over only with overwrite
    link = tmp_path / "link"
    link.symlink_to(folder, target_is_directory=True)
    tiny_lm.save(link, overwrite=True)
    assert jaxaccel.load(folder).generate([[1, 2]], max_new_tokens=3).tokens == want
    assert sorted(p.name for p in folder.iterdir()) == ["jaxaccel.json", "notes.txt", "params"]
    (folder / "jaxaccel.json").unlink()
    (folder / "notes.txt").unlink()
    with pytest.raises(InvalidArgumentError, match=r"holds other files \(params\)"):
        tiny_lm.save(folder)
    tiny_lm.save(folder, overwrite=True)
    assert jaxaccel.load(folder).generate([[1, 2]], max_new_tokens=3).tokens == want

    (tmp_path / "a_file").write_text("x")
    with pytest.raises(CheckpointError, match="cannot write the model to") as e:
        tiny_lm.save(tmp_path / "a_file" / "below")
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="cannot write the Hugging Face export to"):
        tiny_lm.export_hf(tmp_path / "a_file" / "below")


def test_audit_findings_sampling_seeds_eos_logits_and_params(tiny_lm, tiny_params):
    """An API audit's silent wrong results, each fixed: temperatures too small for float32
    (logits / T overflowed to NaN and every token was 0) are greedy; seeds 2**32 apart sampled
    the same tokens; a new `eos_token_ids` was ignored by the already-compiled loop; `logits`
    read -1 as the last token and ids past the vocabulary as NaN rows; integer parameters and
    out-of-vocabulary EOS ids made models that could not work."""
    greedy = tiny_lm.generate([[1, 2]], max_new_tokens=6).tokens
    assert tiny_lm.generate([[1, 2]], max_new_tokens=6, temperature=1e-39, seed=3).tokens == greedy
    assert tiny_lm.generate([[1, 2]], max_new_tokens=6, temperature=1.0, top_k=2**40).tokens == \
        tiny_lm.generate([[1, 2]], max_new_tokens=6, temperature=1.0).tokens  # top_k past the vocabulary: no filter
    sampled = {s: tiny_lm.generate([[1, 2]], max_new_tokens=8, temperature=1.0, seed=s).tokens
               for s in (0, 2**32, 1, 2**32 + 1, -1, 2**32 - 1)}
    assert len({str(t) for t in sampled.values()}) == len(sampled)

    lm = jaxaccel.from_params(TINY, tiny_params, eos_token_ids=())
    free = lm.generate([[5, 6, 7]], max_new_tokens=12).tokens[0]
    stop = next(t for t in free[2:] if t not in free[:2])
    lm.eos_token_ids = (stop,)
    assert lm.generate([[5, 6, 7]], max_new_tokens=12).tokens[0] == free[:free.index(stop) + 1]

    with pytest.raises(InvalidPromptError, match="token id -1 is outside the vocabulary"):
        tiny_lm.logits([[1, -1]])
    with pytest.raises(InvalidPromptError, match="token id 97 is outside the vocabulary"):
        tiny_lm.logits(np.array([[1, 97]]))
    with pytest.raises(InvalidPromptError, match=r"rows of equal length, got lengths \[1, 2\]"):
        tiny_lm.logits([[1, 2], [3]])
    with pytest.raises(InvalidPromptError, match="token ids must be integers, got 1.7"):
        tiny_lm.logits([[1.7]])
    assert tiny_lm.logits(np.array([[1, 2, 3]])).shape == (1, 3, 97)
    with pytest.warns(UserWarning, match="rows of 257 tokens run past the model's maximum length 256"):
        assert tiny_lm.logits(np.ones((1, 257), np.int32)).shape == (1, 257, 97)  # as generate warns

    ints = jax.tree.map(lambda x: np.asarray(x).astype(np.int32), tiny_params)
    with pytest.raises(InvalidArgumentError, match="params must be floating-point arrays"):
        jaxaccel.from_params(TINY, ints)
    with pytest.raises(InvalidArgumentError, match="special token id 500 is outside the model's vocabulary of 97"):
        jaxaccel.from_params(TINY, tiny_params, eos_token_ids=[500])


def test_memory_pre_check_counts_the_prefill_scores(tiny_lm, monkeypatch):
    """max_new_tokens=10**7 on the tiny model: a 4.8 GB cache (18,874,368 slots), but one
    prefill chunk's scores over it are ~77 GB; with 20 GB of memory the cache alone would
    pass, the request not."""
    from jaxaccel.decode import lm as lm_module

    monkeypatch.setattr(lm_module, "_device_memory", lambda: (20e9, None))
    with pytest.raises(InvalidArgumentError, match=r"18874368 positions x batch 1 \(4.8 GB and its prefill's "
                                                   r"attention scores 77.3 GB\)"):
        tiny_lm.generate([[1, 2]], max_new_tokens=10**7)
    tiny_lm._check_cache_fits(1, 18_874_368)  # the cache alone fits (TokenSelect's prefill reads no more)


def test_memory_pre_check_counts_what_the_device_already_holds(tiny_lm, monkeypatch):
    """The cache must fit next to the model: on CPU the parameters share the RAM (tiny: 30 KB),
    on an accelerator everything its allocator has in use counts, read at every call."""
    from jaxaccel.decode import lm as lm_module

    cache = 2 * TINY.n_layers * TINY.n_kv_heads * TINY.resolved_head_dim * 4 * 1000  # batch 1, 1000 slots
    params = lm_module._bytes_resident(tiny_lm.params)
    assert params == 4 * sum(np.size(x) for x in jax.tree.leaves(tiny_lm.params))
    monkeypatch.setattr(lm_module, "_device_memory", lambda: (cache + params, None))
    tiny_lm._check_cache_fits(1, 1000)
    monkeypatch.setattr(lm_module, "_device_memory", lambda: (cache + params - 1, None))
    with pytest.raises(InvalidArgumentError, match=r"more than the 0.0 GB this machine has left .* already in use"):
        tiny_lm._check_cache_fits(1, 1000)
    # a draft model's cache and parameters count too, both
    monkeypatch.setattr(lm_module, "_device_memory", lambda: (2 * cache + 2 * params, None))
    tiny_lm._check_cache_fits(1, 1000, draft=tiny_lm)
    for short in (1, params):  # one byte short, or the draft's parameters not counted
        monkeypatch.setattr(lm_module, "_device_memory", lambda: (2 * cache + 2 * params - short, None))
        with pytest.raises(InvalidArgumentError, match=r"already in use"):
            tiny_lm._check_cache_fits(1, 1000, draft=tiny_lm)
    monkeypatch.setattr(lm_module, "_device_memory", lambda: (cache + 5000, 5000))  # accelerator: its own count
    tiny_lm._check_cache_fits(1, 1000)
    monkeypatch.setattr(lm_module, "_device_memory", lambda: (cache + 5000, 5001))
    with pytest.raises(InvalidArgumentError, match=r"GB per device, more than the 0.0 GB this device has left"):
        tiny_lm._check_cache_fits(1, 1000)


def test_device_memory_in_use_is_read_at_every_call(monkeypatch):
    """The allocator's bytes in use change as models are loaded and freed: a cached first
    reading would pass requests that no longer fit and refuse ones that do."""
    from jaxaccel.decode import lm as lm_module

    readings = iter([{"bytes_limit": 100, "bytes_in_use": 10}, {"bytes_limit": 100, "bytes_in_use": 60}])

    class Device:
        def memory_stats(self):
            return next(readings)

    monkeypatch.setattr(jax, "local_devices", lambda: [Device()])
    assert lm_module._device_memory() == (100, 10)
    assert lm_module._device_memory() == (100, 60)


def test_a_recycling_chain_takes_its_own_matrix_back(tiny_lm):
    first = tiny_lm.generate([[1, 2, 3]], max_new_tokens=8, method="chain", draft="recycling")
    again = tiny_lm.generate([[1, 2, 3]], max_new_tokens=8, method="chain", draft="recycling",
                             method_input=first.method_output)
    assert again.tokens == first.tokens == tiny_lm.generate([[1, 2, 3]], max_new_tokens=8).tokens


def test_a_checkpoint_with_another_models_tokenizer_warns_and_a_newer_format_is_refused(tiny_lm, tmp_path):
    import json

    from jaxaccel.errors import CheckpointError

    folder = tiny_lm.save(tmp_path / "ckpt")
    jaxaccel.load("builtin:default").tokenizer.save(folder)  # 4096 pieces beside a 97-token model
    with pytest.warns(UserWarning, match="the tokenizer has 4096 pieces but the model's vocabulary is 97"):
        jaxaccel.load(folder)
    (folder / "tokenizer.model").unlink()
    meta = json.loads((folder / "jaxaccel.json").read_text())
    for change, message in (({"version": 999}, "format version 999 is not one this jaxaccel reads"),
                            ({"add_bos": "false"}, "add_bos must be true or false"),
                            ({"eos_token_ids": [500]}, "special token id 500 is outside")):
        (folder / "jaxaccel.json").write_text(json.dumps({**meta, **change}))
        with pytest.raises(CheckpointError, match=message):
            jaxaccel.load(folder)


def test_logits_of_many_lengths_compile_one_program_per_bucket_and_match_the_exact_forward(tiny_params):
    """Each distinct row length compiled (and kept) its own program: a perplexity loop over
    texts of 30 lengths made 30 compiles and grew the process by ~8 MB each."""
    import jax.numpy as jnp

    from jaxaccel.model.transformer import forward

    lm = jaxaccel.from_params(TINY, tiny_params, eos_token_ids=())
    rng = np.random.default_rng(0)
    for length in (1, 7, 40, 127, 128):
        rows = rng.integers(0, TINY.vocab_size, (2, length))
        exact = np.asarray(forward(tiny_params, TINY, jnp.asarray(rows, jnp.int32))[0])
        got = lm.logits(rows)
        assert got.shape == (2, length, TINY.vocab_size)
        np.testing.assert_allclose(got, exact, rtol=2e-5, atol=2e-5)

    def programs():
        return sum(fn._cache_size() for key, fn in lm._compiled.items() if key[0] == "logits")

    assert programs() == 1  # all five lengths in the 128 bucket
    lm.logits(rng.integers(0, TINY.vocab_size, (2, 129)))
    assert programs() == 2
