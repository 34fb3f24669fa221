"""The seams the methods build on: the model handle, typed forward arguments, the tree
kernel's self-check, training runs read for decoding (parameters only), gs:// model paths,
prefill chunks that do not divide the prompt bucket, and typed errors for method inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxaccel
from conftest import TINY
from jaxaccel.decode import tuning
from jaxaccel.errors import InvalidArgumentError
from jaxaccel.model.options import DENSE, TokenSelectAttention, TreeKernelAttention
from jaxaccel.model.transformer import ModelHandle, forward, init_cache, init_params

PROMPTS = [[5, 9, 14, 3, 7] * 22, [11, 2, 8]]  # 110 and 3 tokens: a 128-slot cache with 12 new tokens


def test_handle_is_a_pytree_whose_leaves_are_the_params(tiny_params):
    handle = ModelHandle(tiny_params, TINY, {"vocab_major_logits": True})
    leaves, treedef = jax.tree.flatten(handle)
    assert len(leaves) == len(jax.tree.leaves(tiny_params))
    again = jax.tree.unflatten(treedef, leaves)
    assert again.config == TINY and dict(again.defaults) == {"vocab_major_logits": True}
    x = jnp.asarray([[1, 2, 3, 4]])
    logits = jax.jit(lambda m, t: m.forward(t)[0])(handle, x)
    np.testing.assert_allclose(logits, forward(tiny_params, TINY, x)[0], atol=1e-5)
    cache = handle.init_cache(2, 32)
    assert cache[0].k.shape == init_cache(TINY, 2, 32)[0].k.shape


def test_prefill_chunk_that_does_not_divide_the_padded_prompt(tiny_params):
    """Chunks of 48 over a 128-slot prompt: the third chunk would run past the end (a clamped
    dynamic_slice re-reads earlier tokens and writes wrong K/V) unless the prompt is padded."""
    from conftest import reference_greedy

    lm = jaxaccel.from_params(TINY, tiny_params)
    ref = [reference_greedy(lm, p, 12) for p in PROMPTS]
    assert lm.generate(PROMPTS, max_new_tokens=12).tokens == ref
    for chunk in (48, 40, 7):  # 128 % chunk != 0
        odd = jaxaccel.from_params(TINY, tiny_params)
        odd.prefill_chunk = chunk
        assert odd.generate(PROMPTS, max_new_tokens=12).tokens == ref, chunk


def test_tree_kernel_self_check_accepts_a_good_kernel_and_falls_back_from_a_bad_one(monkeypatch, capsys):
    tuning._kernel_checked.cache_clear()
    tuning._warn_once.cache_clear()
    good = tuning.tree_attention_policy(TINY, 5, 64, sharded=False, interpret=True)
    assert good == TreeKernelAttention(interpret=True, block_k=64)
    assert tuning.tree_attention_policy(TINY, 5, 64, sharded=True, interpret=True) == DENSE  # Pallas under a mesh
    assert tuning.tree_attention_policy(TINY, 5, 64, sharded=False, backend="cpu") == DENSE

    from jaxaccel.pallas_kernels import tree_attention as kernels

    real = kernels.tree_attention_kernel
    monkeypatch.setattr(kernels, "tree_attention_kernel", lambda *a, **k: real(*a, **k) + 1.0)  # wrong numbers
    tuning._kernel_checked.cache_clear()
    assert tuning.tree_attention_policy(TINY, 6, 64, sharded=False, interpret=True) == DENSE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "differs from the reference" in err and "warning:" in err

    def broken(*a, **k):
        raise RuntimeError("Mosaic lowering failed: unsupported shape\nlong details")

    monkeypatch.setattr(kernels, "tree_attention_kernel", broken)
    tuning._kernel_checked.cache_clear()
    assert tuning.tree_attention_policy(TINY, 7, 64, sharded=False, interpret=True) == DENSE
    assert "failed to compile or run (RuntimeError: Mosaic lowering failed" in capsys.readouterr().err
    tuning._kernel_checked.cache_clear()


def test_token_select_kernels_are_checked_on_first_use_and_fall_back(monkeypatch, capsys):
    """TokenSelect's kernels get the tree kernel's treatment: on TPU/GPU (here: the Pallas
    interpreter) they run once they matched their references on the request's shape; a
    kernel that is wrong, fails to compile or cannot take the sizes falls back to the
    references with a one-line warning; CPU and a device mesh use the references."""
    from jaxaccel.pallas_kernels import token_select as ts

    tuning._token_select_checked.cache_clear()
    tuning._warn_once.cache_clear()
    policy = TokenSelectAttention(k=8, n_init=2, n_local=4, interpret=True)  # budget 14
    assert tuning.token_select_policy(policy, TINY, 64, sharded=False).use_kernel is True
    assert tuning.token_select_policy(policy, TINY, 64, sharded=True).use_kernel is False  # Pallas under a mesh
    assert tuning.token_select_policy(policy, TINY, 14, sharded=False).use_kernel is False  # never selects
    on_cpu = TokenSelectAttention(k=8, n_init=2, n_local=4)
    assert tuning.token_select_policy(on_cpu, TINY, 64, sharded=False, backend="cpu").use_kernel is False
    forced = TokenSelectAttention(k=8, n_init=2, n_local=4, use_kernel=True)  # the caller's choice stands
    assert tuning.token_select_policy(forced, TINY, 64, sharded=False, backend="cpu") is forced
    assert capsys.readouterr().err == ""

    real = ts.score_keys_kernel
    monkeypatch.setattr(ts, "score_keys_kernel", lambda *a, **k: real(*a, **k) * 2.0)  # wrong votes
    tuning._token_select_checked.cache_clear()
    assert tuning.token_select_policy(policy, TINY, 96, sharded=False).use_kernel is False
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: tokenselect: score_keys: the kernel differs")
    monkeypatch.setattr(ts, "score_keys_kernel", real)

    def broken(*a, **k):
        raise RuntimeError("Triton compilation failed\nlong details")

    monkeypatch.setattr(ts, "sparse_attention_kernel", broken)
    tuning._token_select_checked.cache_clear()
    assert tuning.token_select_policy(policy, TINY, 128, sharded=False).use_kernel is False
    assert "sparse_attention: the kernel failed to compile or run (RuntimeError: Triton compilation failed)" in \
        capsys.readouterr().err
    monkeypatch.undo()

    # TPU's DMA gather (never run on a TPU) failing its check falls back to the XLA-gather
    # kernel, not straight to the references (here Pallas's TPU interpreter stands in)
    def broken_dma(*a, gather=None, **k):
        if gather == "dma":
            raise RuntimeError("Mosaic failed\nlong details")
        return real_sparse(*a, gather=gather, **k)

    real_sparse = ts.sparse_attention_kernel
    monkeypatch.setattr(ts, "sparse_attention_kernel", broken_dma)
    tuning._token_select_checked.cache_clear()
    dma = TokenSelectAttention(k=8, n_init=2, n_local=4, interpret=True, gather="dma")
    chosen = tuning.token_select_policy(dma, TINY, 64, sharded=False)
    assert (chosen.use_kernel, chosen.gather) == (True, "xla")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "failed to compile or run (RuntimeError: Mosaic failed); using the kernels " \
                                    "with gather='xla'" in err, err
    monkeypatch.setattr(ts, "sparse_attention_kernel", broken)  # neither gather runs: the references
    tuning._token_select_checked.cache_clear()
    tuning._warn_once.cache_clear()
    assert tuning.token_select_policy(dma, TINY, 96, sharded=False).use_kernel is False
    assert "Triton compilation failed); using the jnp references" in capsys.readouterr().err
    tuning._token_select_checked.cache_clear()
    # a head_dim the GPU kernels cannot take (TINY's 8) is a reason, found before anything runs
    assert "head_dim must be a power of two >= 16" in tuning._token_select_checked(
        "gpu", 4, 2, 8, "float32", 64, 14, "compact", False)
    tuning._token_select_checked.cache_clear()


def test_generate_makes_tokenselects_kernel_choice_for_the_request(tiny_params, monkeypatch):
    """The engine resolves the policy the method leaves open for the request's cache length,
    on the model's mesh, and what it decides is what runs: a decision for the kernels (here
    the interpreter, standing in for a GPU) runs them in the prefill and in the steps."""
    import dataclasses

    from jaxaccel.pallas_kernels import token_select as ts

    seen, calls = [], {"score": 0, "sparse": 0}
    real = tuning.token_select_policy

    def spy(policy, config, cache_len, *, sharded, backend=None):
        out = real(policy, config, cache_len, sharded=sharded, backend=backend)
        seen.append((policy.use_kernel, cache_len, sharded, out.use_kernel))
        return dataclasses.replace(out, use_kernel=True, interpret=True)

    def counting(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(tuning, "token_select_policy", spy)
    monkeypatch.setattr(ts, "score_keys_kernel", counting("score", ts.score_keys_kernel))
    monkeypatch.setattr(ts, "sparse_attention_kernel", counting("sparse", ts.sparse_attention_kernel))
    lm = jaxaccel.from_params(TINY, tiny_params)
    options = dict(k=8, n_init=2, n_local=4, chunk=64, cache_threshold=None)
    out = lm.generate(PROMPTS, max_new_tokens=12, method="tokenselect", **options)
    assert seen == [(None, 128, False, False)] * 2  # prefill's policy and the steps', on CPU: the references
    assert calls["score"] > 0 and calls["sparse"] > 0  # traced into the programs: the decision reached them
    monkeypatch.setattr(tuning, "token_select_policy", real)
    assert out.tokens == jaxaccel.from_params(TINY, tiny_params).generate(
        PROMPTS, max_new_tokens=12, method="tokenselect", **options).tokens  # kernels == references


def test_kernel_size_constraints_are_checked_up_front():
    assert tuning.kernel_constraints(64, 128, "gpu") is None
    assert "head_dim=48" in tuning.kernel_constraints(48, 128, "gpu")
    assert "block_k=24" in tuning.kernel_constraints(64, 24, "gpu")
    assert tuning.kernel_constraints(48, 128, "tpu") is None
    # the whole cache as one block (no multiple of 8 divides 100), as the kernel itself allows; not below 8 slots
    assert tuning.kernel_constraints(64, 100, "tpu", cache_len=100) is None
    assert "nor the whole cache" in tuning.kernel_constraints(64, 4, "tpu", cache_len=4)
    assert "block_k=100" in tuning.kernel_constraints(64, 100, "tpu")


def test_recycling_matrix_fed_back_with_another_batch_size_is_a_typed_error(tiny_params):
    lm = jaxaccel.from_params(TINY, tiny_params)
    out = lm.generate([[1, 2, 3]] * 4, max_new_tokens=4, method="recycling")
    with pytest.raises(InvalidArgumentError, match="has 4 rows but this call decodes a batch of 2"):
        lm.generate([[1, 2, 3]] * 2, max_new_tokens=4, method="recycling", method_input=out.method_output)
    shared = np.asarray(out.method_output)[0]  # one row's matrix is shared by any batch
    assert len(lm.generate([[1, 2, 3]] * 2, max_new_tokens=4, method="recycling", method_input=shared).tokens) == 2


def test_chain_longer_than_the_vocabulary_is_a_typed_error_and_a_short_one_works():
    from jaxaccel.config import replace

    small = replace(TINY, vocab_size=6)
    lm = jaxaccel.from_params(small, init_params(small, jax.random.key(0), "unrolled"))
    for draft in ("random", "recycling"):
        with pytest.raises(InvalidArgumentError, match="k=7 is larger than the vocabulary"):
            lm.generate([[1, 2]], max_new_tokens=4, method="chain", draft=draft, k=7)
    ref = lm.generate([[1, 2]], max_new_tokens=6).tokens
    assert lm.generate([[1, 2]], max_new_tokens=6, method="chain", draft="recycling", k=5).tokens == ref


class _ObjectStorePath:
    """A path object like etils' gs:// paths: it works through its methods, but its file-system
    name is not a local file (pathlib.Path(p) or open(str(p)) would miss the object)."""

    def __init__(self, local, name):
        self._local, self._name = local, name

    def __truediv__(self, part):
        return _ObjectStorePath(self._local / part, f"{self._name}/{part}")

    def __str__(self):
        return self._name

    __fspath__ = __str__

    def __getattr__(self, attr):  # is_file, exists, read_bytes, read_text, ...
        return getattr(self._local, attr)


def test_tokenizers_read_through_the_path_object(tmp_path):
    from jaxaccel.decode.lm import DEFAULT_MODEL_DIR
    from jaxaccel.tokenizer import load_tokenizer

    (tmp_path / "tokenizer.model").write_bytes((DEFAULT_MODEL_DIR / "tokenizer.model").read_bytes())
    remote = _ObjectStorePath(tmp_path, "gs://bucket/model")
    tok = load_tokenizer(remote, add_bos=True)
    local = load_tokenizer(tmp_path, add_bos=True)
    assert tok is not None and tok.encode("def fib(n):") == local.encode("def fib(n):")
    tok.save(tmp_path / "copy" if (tmp_path / "copy").mkdir() is None else None)
    assert (tmp_path / "copy" / "tokenizer.model").read_bytes() == (tmp_path / "tokenizer.model").read_bytes()


def test_gs_model_paths_are_never_turned_into_local_paths(tmp_path, tiny_lm, monkeypatch):
    """A gs:// folder goes through the object-store path type end to end (a pathlib.Path would
    turn gs://bucket into gs:/bucket): here the store is a local folder behind the same seam."""
    from jaxaccel.model import checkpoint as ckpt

    tiny_lm.save(tmp_path / "bucket" / "model")
    real = ckpt.as_path
    seen = []

    def fake_as_path(folder):
        text = str(folder)
        if text.startswith("gs://"):
            seen.append(text)
            return real(tmp_path / text[len("gs://"):])
        return real(folder)

    monkeypatch.setattr(ckpt, "as_path", fake_as_path)
    lm = jaxaccel.load("gs://bucket/model")
    assert seen and seen[0] == "gs://bucket/model"
    assert lm.generate([[1, 2, 3]], max_new_tokens=5).tokens == tiny_lm.generate([[1, 2, 3]], max_new_tokens=5).tokens


def test_an_unreachable_gs_model_path_is_one_line(monkeypatch):
    """The object store's own exception (a TensorFlow/gcsfs traceback) becomes one line."""
    from jaxaccel.errors import ModelLoadError
    from jaxaccel.model import checkpoint as ckpt

    class Unreachable:
        def __str__(self):
            return "gs://no-such-bucket/model"

        def exists(self):
            raise RuntimeError("Could not resolve host: storage.googleapis.com\n  (and a long traceback)")

    real = ckpt.as_path
    monkeypatch.setattr(ckpt, "as_path", lambda f: Unreachable() if str(f).startswith("gs://") else real(f))
    with pytest.raises(ModelLoadError, match=r"model path 'gs://no-such-bucket/model' cannot be read "
                                             r"\(RuntimeError: Could not resolve host: storage.googleapis.com\)") as e:
        jaxaccel.load("gs://no-such-bucket/model")
    assert "\n" not in str(e.value)


def test_model_urls_other_than_gs_are_refused_not_made_local_folders(tmp_path, tiny_lm, monkeypatch):
    from jaxaccel.errors import CheckpointError, ModelLoadError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=r"model path 's3://bucket/model': s3:// is not supported here; it must "
                                             r"be a local folder or gs://"):
        jaxaccel.load("s3://bucket/model")
    for write in (tiny_lm.save, tiny_lm.export_hf):
        with pytest.raises(CheckpointError, match=r"'s3://bucket/model': s3:// is not supported"):
            write("s3://bucket/model")
    assert not any(tmp_path.iterdir())  # no local "s3:" folder


def test_a_live_training_run_loads_its_parameters_only_into_the_decode_sharding(tmp_path, recwarn):
    import shutil

    from jaxaccel.config import from_dict
    from jaxaccel.train.config import RunConfig
    from jaxaccel.train.loop import train

    model = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 64}
    cfg = from_dict(RunConfig, {
        "model": model, "data": {"corpus": "synthetic"},
        "train": {"steps": 4, "batch_size": 8, "seq_len": 32, "log_every": 2, "eval_every": 0, "progress": False,
                  "peak_flops": 1e11},
        "checkpoint": {"every_steps": 4, "keep": 2}, "mesh": {"data": 1, "fsdp": 2}, "output_dir": str(tmp_path / "run"),
        "tensorboard": False})
    train(cfg)
    finished = jaxaccel.load(tmp_path / "run" / "model")
    shutil.rmtree(tmp_path / "run" / "model")  # as if the run were still going: only checkpoints/
    live = jaxaccel.load(tmp_path / "run", mesh="tensor=2,fsdp=2")
    assert live.info["trained_steps"] == 4
    for a, b in zip(jax.tree.leaves(finished.params), jax.tree.leaves(live.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    qkv = live.params["layer_0"]["attn"]["qkv"]["kernel"]  # [d, kv_heads, g + 2, head_dim]
    assert qkv.sharding.spec[1] == "tensor" and len(qkv.sharding.device_set) == 4
    prompt = [[1, 2, 3, 4]]
    assert live.generate(prompt, max_new_tokens=6).tokens == finished.generate(prompt, max_new_tokens=6).tokens
    # no mesh: one device, whatever mesh the run trained on (here fsdp=2)
    local = jaxaccel.load(tmp_path / "run")
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(local.params))
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(finished.params))
    assert not [w for w in recwarn if "donated" in str(w.message)]  # the loop updates the prefilled cache in place
    # config.yaml edited after the run: named, not "no readable checkpoint" after every step failed
    from jaxaccel.errors import CheckpointError

    config_yaml = tmp_path / "run" / "config.yaml"
    config_yaml.write_text(config_yaml.read_text().replace("ffn_dim: 64", "ffn_dim: 96"))
    with pytest.raises(CheckpointError, match=r"checkpoint step 4 of .*run does not match the model in config.yaml: "
                                              r"layers/mlp/down/kernel has shape \(2, 64, 32\), this config expects "
                                              r"\(2, 96, 32\)$"):
        jaxaccel.load(tmp_path / "run")
