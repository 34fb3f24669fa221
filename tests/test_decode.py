"""The decode engine: exact greedy, per-row EOS and lengths, sampling distributed as the
model's own distribution, compile caching, and a typed error for every bad argument."""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

import jaxaccel
from conftest import TINY, reference_greedy
from jaxaccel.decode.sampling import filtered_logits, make_sampling
from jaxaccel.errors import InvalidArgumentError, InvalidPromptError

PROMPTS = [[5, 17, 33], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [42], [7, 7, 7, 7]]


@contextlib.contextmanager
def prefill_chunk(lm, chunk):
    """`lm` prefills `chunk` tokens per forward inside the block (the session fixture other
    files share gets its own value back after it)."""
    before, lm.prefill_chunk = lm.prefill_chunk, chunk
    try:
        yield
    finally:
        lm.prefill_chunk = before


def test_greedy_equals_full_recompute_batch1_and_ragged_batch(tiny_lm):
    with prefill_chunk(tiny_lm, 8):  # the 21-token prompt then takes 3 prefill chunks
        batched = tiny_lm.generate(PROMPTS, max_new_tokens=24)
        single = tiny_lm.generate([PROMPTS[1]], max_new_tokens=24)
    for prompt, got in zip(PROMPTS, batched.tokens):
        assert got == reference_greedy(tiny_lm, prompt, 24)
    assert single.tokens[0] == batched.tokens[1]
    s = batched.stats
    assert s["new_tokens"] == 4 * 24 and s["steps"] == 24 and s["target_forwards"] == 24
    assert s["mean_accepted"] == 1.0 and s["tokens_per_s"] > 0 and s["decode_s"] > 0
    assert 0 < s["prefill_s"] < s["decode_s"]  # part of it: the rest is the decode loop
    assert s["decode_phase_tokens_per_s"] == s["new_tokens"] / (s["decode_s"] - s["prefill_s"]) > s["tokens_per_s"]


def test_eos_ends_each_row_where_plain_decoding_would(tiny_params):
    free = jaxaccel.from_params(TINY, tiny_params, eos_token_ids=())
    ref = [reference_greedy(free, p, 20) for p in PROMPTS]
    eos = ref[0][2]
    assert eos not in ref[0][:2]
    lm = jaxaccel.from_params(TINY, tiny_params, eos_token_ids=(eos,))
    out = lm.generate(PROMPTS, max_new_tokens=20)
    for r, got in zip(ref, out.tokens):
        expected = r[:r.index(eos) + 1] if eos in r else r
        assert got == expected
    assert out.tokens[0] == ref[0][:3]


def test_max_new_tokens_and_compile_cache(tiny_lm):
    a = tiny_lm.generate(PROMPTS[:2], max_new_tokens=20)
    n_compiled = len(tiny_lm._compiled)
    b = tiny_lm.generate(PROMPTS[:2], max_new_tokens=30)  # same 32-token bucket
    c = tiny_lm.generate([PROMPTS[1], PROMPTS[3]], max_new_tokens=25)  # same buckets
    assert [len(t) for t in a.tokens] == [20, 20] and [len(t) for t in b.tokens] == [30, 30]
    assert b.tokens[0][:20] == a.tokens[0]
    assert b.stats["compile_s"] == 0.0 and c.stats["compile_s"] == 0.0
    d = tiny_lm.generate(PROMPTS[:2], max_new_tokens=20, temperature=0.5, seed=1)
    e = tiny_lm.generate(PROMPTS[:2], max_new_tokens=20, temperature=0.9, seed=2)  # values are traced
    assert e.stats["compile_s"] == 0.0 and d.stats["compile_s"] > 0
    assert len(tiny_lm._compiled) == n_compiled + 1


def test_sampling_is_reproducible_and_filters_collapse_to_greedy(tiny_lm):
    greedy = tiny_lm.generate(PROMPTS, max_new_tokens=12)
    s1 = tiny_lm.generate(PROMPTS, max_new_tokens=12, temperature=1.0, seed=3)
    s2 = tiny_lm.generate(PROMPTS, max_new_tokens=12, temperature=1.0, seed=3)
    s3 = tiny_lm.generate(PROMPTS, max_new_tokens=12, temperature=1.0, seed=4)
    assert s1.tokens == s2.tokens and s1.tokens != s3.tokens
    assert tiny_lm.generate(PROMPTS, max_new_tokens=12, temperature=1.0, top_k=1, seed=5).tokens == greedy.tokens
    assert tiny_lm.generate(PROMPTS, max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=5).tokens == greedy.tokens
    # A row's randomness does not depend on the rest of its batch.
    alone = tiny_lm.generate([PROMPTS[0]], max_new_tokens=12, temperature=1.0, seed=3)
    assert alone.tokens[0] == s1.tokens[0]


def numpy_filtered_probs(logits, temperature, top_k, top_p):
    """Independent reference of HF's order: temperature, top-k, top-p (ties kept: with the k-th
    logit by top-k; with the last token top-p keeps, by top-p)."""
    z = logits / temperature
    if top_k is not None:
        kth = np.sort(z)[::-1][top_k - 1]
        z = np.where(z < kth, -np.inf, z)
    if top_p is not None:
        order = np.argsort(-z, kind="stable")
        p = np.exp(z[order] - z[order][0])
        p /= p.sum()
        mass_before = np.cumsum(p) - p
        z = np.where(z < z[order][mass_before < top_p].min(), -np.inf, z)
    p = np.exp(z - z.max())
    return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, 8, None), (1.3, None, 0.8), (0.9, 20, 0.9)])
def test_filtered_distribution_matches_reference(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(3, 97)).astype(np.float32) * 2
    mode, params = make_sampling(temperature, top_k, top_p)
    ours = np.asarray(jax.nn.softmax(filtered_logits(logits, mode, params), axis=-1))
    for row in range(3):
        np.testing.assert_allclose(ours[row], numpy_filtered_probs(logits[row].astype(np.float64), temperature, top_k,
                                                                     top_p), atol=1e-6)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.9, 20, 0.9), (1.0, 2, 0.6), (0.7, 5, 0.5), (1.0, 1, 0.3)])
def test_top_k_ties_reach_top_p(temperature, top_k, top_p):
    """Top-k keeps every token tied with the k-th logit (common in bfloat16), but top-p
    measured its mass over the first k sorted entries only: each probability too large, the
    cut too early ([2, 1, 1, 0] at top_k=2, top_p=0.6 kept token 0 alone, mass 0.58 < 0.6)."""
    rng = np.random.default_rng(1)
    ties = rng.integers(-3, 3, size=(3, 97))
    logits = np.concatenate([[[2.0, 1.0, 1.0, 0.0] + [-9.0] * 93], ties]).astype(np.float32)
    mode, params = make_sampling(temperature, top_k, top_p)
    ours = np.asarray(jax.nn.softmax(filtered_logits(logits, mode, params), axis=-1))
    for row in range(len(logits)):
        np.testing.assert_allclose(ours[row], numpy_filtered_probs(logits[row].astype(np.float64), temperature, top_k,
                                                                     top_p), atol=1e-6)
    if (top_k, top_p) == (2, 0.6):
        assert np.flatnonzero(ours[0]).tolist() == [0, 1, 2]


def test_a_huge_temperature_keeps_top_k_and_minus_inf():
    """Past ~3e38 the temperature was float32 inf (or flushed the scaled logits to ties): top_k=1
    sampled uniformly, and -inf logits became NaN (-inf / inf)."""
    logits = np.array([[3.0, 1.0, -np.inf, 0.5]], np.float32)
    for temperature in (1e38, 3e38, 1e39, 1e300):
        mode, params = make_sampling(temperature, 1, None)
        assert np.asarray(jax.nn.softmax(filtered_logits(logits, mode, params), axis=-1)).tolist() == [[1, 0, 0, 0]]
        mode, params = make_sampling(temperature, None, None)
        probs = np.asarray(jax.nn.softmax(filtered_logits(logits, mode, params), axis=-1))
        np.testing.assert_allclose(probs, [[1 / 3, 1 / 3, 0, 1 / 3]], atol=1e-6)  # the limit: uniform on the finite


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.8, 10, 0.9)])
def test_sampled_first_token_is_distributed_as_the_model(tiny_lm, temperature, top_k, top_p):
    """2048 independent rows, one prompt: the first sampled token's histogram against the
    model's filtered next-token distribution (chi-square, p > 0.001)."""
    n = 2048
    prompt = PROMPTS[0]
    with prefill_chunk(tiny_lm, 8):  # the default 128 ran 126 padding tokens a row: ~90% of the time
        out = tiny_lm.generate([prompt] * n, max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p,
                               seed=11)
    first = np.array([t[0] for t in out.tokens])
    probs = numpy_filtered_probs(tiny_lm.logits([prompt])[0, -1].astype(np.float64), temperature, top_k, top_p)
    assert probs[first].min() > 0  # never a filtered token
    support = probs > 0
    expected = probs[support] * n
    observed = np.bincount(first, minlength=len(probs))[support]
    # Pool rare categories so every expected count is >= 5.
    order = np.argsort(expected)
    exp_s, obs_s = expected[order], observed[order]
    cut = np.searchsorted(np.cumsum(exp_s), 5.0)
    exp_p = np.concatenate([[exp_s[:cut + 1].sum()], exp_s[cut + 1:]])
    obs_p = np.concatenate([[obs_s[:cut + 1].sum()], obs_s[cut + 1:]])
    assert sps.chisquare(obs_p, exp_p).pvalue > 1e-3


def test_contexts_past_max_seq_len_run_with_one_warning(tiny_lm):
    """The cache is sized from the request: a context past the trained maximum length runs
    (positions the model never saw — the TokenSelect extrapolation experiment), said once."""
    with pytest.warns(UserWarning, match="runs past the model's maximum length 256") as record:
        out = tiny_lm.generate([[1] * 200], max_new_tokens=100)
    assert len(record) == 1 and len(out.tokens[0]) == 100


@pytest.mark.parametrize("method,kwargs", [("autoregressive", {}), ("autoregressive", dict(temperature=0.8, seed=3)),
                                           ("recycling", {})])
def test_progress_display_decodes_in_parts_the_same_tokens(tiny_params, capsys, method, kwargs):
    """With a progress bar the loop runs in parts (no host callback inside it, which kept the
    program out of the persistent compilation cache): the same tokens as one call, early EOS
    rows and a method's carried state included."""
    lm = jaxaccel.from_params(TINY, tiny_params, eos_token_ids=())
    whole = lm.generate(PROMPTS[:2], max_new_tokens=100, method=method, **kwargs)
    lm.eos_token_ids = (whole.tokens[0][40],)  # row 0 ends early, row 1 (most likely) later
    whole = lm.generate(PROMPTS[:2], max_new_tokens=100, method=method, **kwargs)
    capsys.readouterr()
    parts = lm.generate(PROMPTS[:2], max_new_tokens=100, method=method, progress=True, **kwargs)
    assert parts.tokens == whole.tokens and len(parts.tokens[0]) <= 41
    assert parts.stats["steps"] == whole.stats["steps"]
    assert "tok" in capsys.readouterr().err
    assert any(key[-1] == "carry" for key in lm._compiled)  # it did go on from a carry
    for key, program in lm._compiled.items():
        assert "callback" not in program.as_text(), key


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(prompts=[]), InvalidPromptError, "no prompts"),
    (dict(prompts=[[]]), InvalidPromptError, "prompt 0 is empty"),
    (dict(prompts=[[1], [3, 97]]), InvalidPromptError, r"prompt 1: token id 97 is outside the vocabulary \(0..96\)"),
    (dict(prompts=[[-1]]), InvalidPromptError, "outside the vocabulary"),
    (dict(prompts=["hello"]), InvalidPromptError, "no tokenizer"),
    (dict(temperature=-0.1), InvalidArgumentError, "temperature must be a finite number >= 0"),
    (dict(top_p=0.0), InvalidArgumentError, r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), InvalidArgumentError, r"top_p must be in \(0, 1\]"),
    (dict(top_k=0), InvalidArgumentError, "top_k must be an integer >= 1"),
    (dict(max_new_tokens=0), InvalidArgumentError, "max_new_tokens must be an integer in \\[1, 2\\*\\*30\\]"),
    (dict(max_new_tokens=10**320), InvalidArgumentError, "max_new_tokens must be an integer in"),  # OverflowError before
    (dict(method="beam"), InvalidArgumentError, "unknown method 'beam'; valid methods: autoregressive"),
    (dict(tree_size=3), InvalidArgumentError, "unknown option tree_size for method 'autoregressive'"),
])
def test_bad_generate_arguments_raise_typed_errors(tiny_lm, kwargs, error, match):
    kwargs = {"prompts": [[1, 2]], **kwargs}
    with pytest.raises(error, match=match):
        tiny_lm.generate(**kwargs)


def test_cache_buckets_are_few_below_8k_and_tight_above_it():
    from jaxaccel.decode.lm import FINE_BUCKETS_FROM, cache_bucket

    sizes = sorted({cache_bucket(n) for n in range(1, 300_000, 7)})
    assert sizes[:8] == [128, 192, 256, 384, 512, 768, 1024, 1536]
    for n in range(128, 300_000, 13):
        size = cache_bucket(n)
        assert size >= n and (size - n) / size < (1 / 3 if size <= FINE_BUCKETS_FROM else 1 / 8)
        assert size % (64 if size < FINE_BUCKETS_FROM else 1024) == 0  # kernel key blocks divide it
    assert cache_bucket(65_536 + 32) == 73_728 and cache_bucket(131_072 + 32) == 147_456  # were 96K and 192K
    assert len([s for s in sizes if s <= 8192]) == 13  # 2 per octave up to 8K: few programs for short prompts


def test_a_top_p_below_float32s_normal_range_keeps_the_top_token():
    """top_p = 1e-44 rounds to 0 in float32: every token was filtered, the probabilities NaN and
    every sampled token 0. At least one token is always kept."""
    from jaxaccel.decode.sampling import make_sampling, target_probs

    logits = jnp.asarray([[0.1, 2.0, -1.0, 0.5]])
    for top_p in (1e-44, 1e-30, 0.01):
        mode, params = make_sampling(1.0, None, top_p)
        np.testing.assert_array_equal(np.asarray(target_probs(logits, mode, params)), [[0.0, 1.0, 0.0, 0.0]])


def test_a_tokenizer_that_encodes_to_an_array_is_read_as_ids(tiny_lm):
    import jaxaccel

    class ArrayTokenizer:
        vocab_size = 97

        def encode(self, text):
            return np.asarray([1, 2, 3], np.int64)

        def decode(self, ids):
            return " ".join(map(str, ids))

    lm = jaxaccel.from_params(tiny_lm.config, tiny_lm.params, tokenizer=ArrayTokenizer())
    out = lm.generate(["hello"], max_new_tokens=2)
    assert out.prompt_ids == [[1, 2, 3]] and all(type(t) is int for t in out.prompt_ids[0])
    assert out.tokens == tiny_lm.generate([[1, 2, 3]], max_new_tokens=2).tokens


def test_method_input_is_checked_before_a_draft_is_loaded(tiny_lm, monkeypatch):
    """A method_input the method does not take was refused only after the draft model was
    loaded and its acceptance measured (seconds)."""
    monkeypatch.setattr(type(tiny_lm), "_draft_model", lambda self, decoder: pytest.fail("the draft was loaded"))
    with pytest.raises(InvalidArgumentError, match="method 'sequoia' takes no method_input"):
        tiny_lm.generate([[1, 2]], max_new_tokens=2, method="sequoia", method_input=[1])
