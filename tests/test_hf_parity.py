"""Parity with Hugging Face transformers (peers extra, CPU, float32) on tiny random models
the tests build and save themselves: logits, greedy generation, and the format round trip."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the peers extra (torch + transformers)")
transformers = pytest.importorskip("transformers", reason="needs the peers extra (torch + transformers)")

import jaxaccel  # noqa: E402

pytestmark = pytest.mark.peers

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, max_position_embeddings=512, eos_token_id=3, bos_token_id=1)


def make_hf(arch: str, **overrides):
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    torch.manual_seed({"llama": 0, "qwen2": 1, "mistral": 2}[arch])
    common = {**COMMON, **overrides}
    if arch == "llama":  # untied, Llama-3.1 rope scaling
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}))
    elif arch == "qwen2":  # q/k/v bias, tied embeddings, theta 1e6
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1e6))
    else:  # sliding window shorter than the prompts
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=16))
    model = model.float().eval()
    with torch.no_grad():  # peaked logits: random-init models produce near-ties
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.15)
    return model


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def hf_pair(request, tmp_path_factory):
    model = make_hf(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, model, folder, jaxaccel.load(folder)


def test_config_and_dtype_come_from_the_checkpoint(hf_pair):
    arch, _, _, lm = hf_pair
    assert lm.config.architecture == arch and lm.config.param_dtype == "float32"
    assert lm.config.qkv_bias == (arch == "qwen2") and lm.config.tie_embeddings == (arch == "qwen2")
    assert lm.config.sliding_window == (16 if arch == "mistral" else None)
    assert lm.eos_token_ids == (3,)


def test_logits_match_transformers(hf_pair):
    _, model, _, lm = hf_pair
    x = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).logits.numpy()
    assert np.abs(lm.logits(x.numpy()) - ref).max() <= 1e-4


def test_greedy_generation_matches_transformers(hf_pair):
    _, model, _, lm = hf_pair
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 128, (n,), generator=g).tolist() for n in (5, 30, 12)]
    ours = lm.generate(prompts, max_new_tokens=64)
    for prompt, got in zip(prompts, ours.tokens):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False,
                                 eos_token_id=3, pad_token_id=0)
        theirs = out[0, len(prompt):].tolist()
        assert got == theirs
    # Without EOS every row runs all 64 tokens, still identical.
    lm_free = jaxaccel.from_params(lm.config, lm.params, eos_token_ids=())
    for prompt, got in zip(prompts, lm_free.generate(prompts, max_new_tokens=64).tokens):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, min_new_tokens=64,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        assert len(got) == 64 and got == out[0, len(prompt):].tolist()


def test_export_import_export_is_bit_identical(hf_pair, tmp_path):
    _, model, folder, lm = hf_pair
    a = lm.export_hf(tmp_path / "a")
    b = jaxaccel.load(a).export_hf(tmp_path / "b")
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # ... and the tensors are HF's own, bit for bit; transformers loads the export.
    from safetensors.numpy import load_file

    theirs, ours = load_file(str(folder / "model.safetensors")), load_file(str(a / "model.safetensors"))
    for name, value in ours.items():
        np.testing.assert_array_equal(value, theirs[name])
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(a).float().eval()
    x = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(x).logits.numpy(), model(x).logits.numpy())


def test_sharded_safetensors_with_index(hf_pair, tmp_path):
    _, model, _, lm = hf_pair
    out = lm.export_hf(tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = jaxaccel.load(out)
    x = np.random.default_rng(0).integers(0, 128, (2, 16))
    np.testing.assert_array_equal(again.logits(x), lm.logits(x))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    with torch.no_grad():
        assert np.abs(hf(torch.tensor(x)).logits.numpy() - lm.logits(x)).max() <= 1e-4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints(tmp_path, dtype):
    model = make_hf("llama").to(getattr(torch, dtype))
    model.save_pretrained(tmp_path)
    lm = jaxaccel.load(tmp_path)
    assert lm.config.param_dtype == dtype and str(lm.params["embed"]["embedding"].dtype) == dtype
    exact = jaxaccel.load(tmp_path, dtype="float32")  # the same weights, upcast exactly
    x = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    # Reload rather than model.float(): .to(dtype) also rounds HF's RoPE inv_freq buffer.
    upcast = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = upcast(x).logits.numpy()
    assert np.abs(exact.logits(x.numpy()) - ref).max() <= 1e-4
    assert np.abs(lm.logits(x.numpy()) - ref).max() <= 0.1 * np.abs(ref).max()


def test_tokenizer_json_is_used(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "<unk>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def add(a, b):\n    return a + b\n"] * 50 + ["hello world"] * 50, trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    model = make_hf("llama", vocab_size=tok.get_vocab_size())
    model.save_pretrained(tmp_path)
    tok.save(str(tmp_path / "tokenizer.json"))
    lm = jaxaccel.load(tmp_path)
    text = "def add(a, b):"
    ids = tok.encode(text).ids
    by_text = lm.generate([text], max_new_tokens=8)
    by_ids = lm.generate([ids], max_new_tokens=8)
    assert by_text.prompt_ids[0] == ids and by_text.tokens == by_ids.tokens
    assert by_text.texts[0] == tok.decode(by_ids.tokens[0], skip_special_tokens=True)


def test_hf_folder_loads_onto_a_mesh(hf_pair):
    _, _, folder, lm = hf_pair
    sharded = jaxaccel.load(folder, mesh="tensor=2,data=2")
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    assert sharded.generate(prompts, max_new_tokens=12).tokens == lm.generate(prompts, max_new_tokens=12).tokens
