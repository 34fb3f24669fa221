"""An adversarial matrix of exactness checks for the decode methods that promise to reproduce
plain decoding (what the other decode test files leave out).

Corners, in combinations: a ragged batch of 3 (a padding row in the bucket of 4) holding a
1-token prompt; EOS inside an accepted draft on one row while the others continue;
max_new_tokens of 1, 2 and limits an accepted tree overshoots; prompts at and past the
model's maximum length; one-hot sampling (top_k=1, with top_p compiled in) through every
sampling verifier; same-seed reproducibility and rows independent of their batch; repeated
calls on one loaded model; top_p through trees (chi-square); SkipDecode with every layer,
TokenSelect at the exact edge of its budget, Duo-LLM all-big against the dense model and a
token-by-token router through tree verification.
Models are tiny (2 CPU cores shared with other work)."""
import dataclasses
import warnings

import jax
import numpy as np
import pytest

import jaxaccel
from conftest import ROWS, SMALL, TINY, chi2_pvalue, exact_pair_probs, perturbed, randomize
from jaxaccel.config import DuoConfig, ModelConfig
from jaxaccel.model.duo import ffn_config, init_router
from jaxaccel.model.transformer import init_params

def rng(seed):
    return np.random.default_rng(seed)


PROMPTS = [[42], rng(1).integers(1, TINY.vocab_size, 29).tolist(), [5, 9, 3, 5, 9, 3, 5]]  # batch 3, ragged
LONG = dataclasses.replace(TINY, max_seq_len=1024)  # drafts for prompts at the target's maximum length



@pytest.fixture(scope="module")
def models(tiny_params):
    """(free: no EOS; lm: EOS = the token row 1 emits 4th; drafts: close, far, identical)."""
    free = jaxaccel.from_params(TINY, tiny_params)
    eos = free.generate(PROMPTS, max_new_tokens=16).tokens[1][3]
    lm = jaxaccel.from_params(TINY, tiny_params, eos_token_ids=(eos,))
    drafts = {"close": jaxaccel.from_params(LONG, perturbed(tiny_params, 7, 0.01)),  # deep trees accepted
              "far": jaxaccel.from_params(LONG, perturbed(tiny_params, 8, 0.3)),  # most drafts rejected
              "same": jaxaccel.from_params(LONG, tiny_params)}  # every draft accepted
    return free, lm, drafts


LIMITS = (1, 2, 3, 7, 16)  # one output bucket (16): one compiled loop per method


@pytest.fixture(scope="module")
def reference(models):
    """Plain greedy of the EOS model per max_new_tokens (batch of 3)."""
    lm = models[1]
    return {n: lm.generate(PROMPTS, max_new_tokens=n).tokens for n in LIMITS}


def options(models, opts, draft):
    return dict(opts, **({} if draft is None else {"draft": models[2][draft]}))


# (method, options, draft). "same": a draft identical to the target, so every step accepts a
# whole root-to-leaf path and EOS (row 1, 4th token) and the limits 3 and 7 fall strictly
# inside an accepted path (sps: 5 tokens a step; dyspec: its deepest path).
GREEDY = [
    ("recycling", {}, None),  # "auto": the fallback's plain steps mixed with trees
    ("recycling", {"template": [3, 2, 1], "k": 3}, None),
    ("pld", {}, None),
    ("sps", {"budget": 4}, "same"),
    ("dyspec", {"budget": 6, "pops_per_round": 2}, "same"),
    ("specinfer", {"widths": [2, 2]}, "far"),
]


def ids(x):
    return "" if isinstance(x, dict) else str(x)


@pytest.mark.parametrize("method,opts,draft", GREEDY, ids=ids)
def test_greedy_ragged_batch3_eos_and_limits_inside_accepted_paths(models, reference, method, opts, draft):
    """Batch 3 (1-token prompt, ragged, a padding row in the bucket) with EOS on one row
    mid-stream while the others go on, at max_new_tokens 1, 2, 3, 7 and 16: token for token
    plain greedy, EOS kept and nothing after it."""
    lm = models[1]
    kw = options(models, opts, draft)
    eos = lm.eos_token_ids[0]
    full = reference[16]
    assert full[1][-1] == eos and len(full[1]) == 4 and any(len(row) == 16 for row in full)
    for n, want in reference.items():
        got = lm.generate(PROMPTS, max_new_tokens=n, method=method, **kw)
        assert got.tokens == want, (n, got.tokens, want)
        assert got.stats["new_tokens"] == sum(len(t) for t in want)
        assert all(eos not in row[:-1] for row in got.tokens)
    if draft == "same":
        assert got.stats["mean_accepted"] > 2.5  # whole paths were accepted


@pytest.mark.parametrize("length", [254, 300])
def test_prompts_at_and_past_the_maximum_length(models, length):
    """The longest prompt 2 tokens short of max_seq_len (256), and past it, beside a 1-token
    prompt: tree nodes past the maximum length still decode exactly as plain."""
    lm = models[1]
    r = rng(length)
    ps = [r.integers(1, TINY.vocab_size, length).tolist(), [3], r.integers(1, TINY.vocab_size, 17).tolist()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # positions past the trained length: one warning per call
        want = lm.generate(ps, max_new_tokens=9).tokens
        for method, opts, draft in [("recycling", {"template": [3, 2, 1], "k": 3}, None), ("sps", {"budget": 5}, "close")]:
            got = lm.generate(ps, max_new_tokens=9, method=method, **options(models, opts, draft))
            assert got.tokens == want, (method, got.tokens, want)


@pytest.mark.parametrize("method,opts,draft", [("recycling", {"template": [3, 2, 1], "k": 3}, None),
                                               ("specinfer", {"widths": [3, 2]}, "close")], ids=ids)
def test_one_hot_sampling_is_greedy_and_samples_are_seeded_per_row(models, reference, method, opts, draft):
    """At top_k=1 the target distribution is one-hot: the sampling verifiers (deterministic
    drafts; a draft whose q comes through the same top-k/top-p filters) must then emit plain
    greedy exactly, EOS row included. In the same compiled mode (top_k, top_p traced) the same
    seed gives the same samples twice, a row's samples do not depend on the rest of its
    batch (checked for the draft model: its Gumbel draws are per row), and another seed gives
    other samples."""
    lm = models[1]
    kw = options(models, opts, draft)
    one_hot = lm.generate(PROMPTS, max_new_tokens=16, method=method, temperature=0.7, top_k=1, top_p=0.9, seed=3, **kw)
    assert one_hot.tokens == reference[16]
    run = lambda ps, seed: lm.generate(ps, max_new_tokens=16, method=method, temperature=1.0, top_k=40,  # noqa: E731
                                       top_p=0.9, seed=seed, **kw).tokens
    first = run(PROMPTS, 5)
    assert run(PROMPTS, 5) == first
    if draft is not None:
        assert run(PROMPTS[:1], 5)[0] == first[0]
    assert run(PROMPTS, 6) != first


# ----------------------------------------------------------------------------- top_p through trees


@pytest.fixture(scope="module")
def small_pair():
    params = randomize(init_params(SMALL, jax.random.key(3), "unrolled"), seed=4, scale=0.15)
    target = jaxaccel.from_params(SMALL, params)
    return target, jaxaccel.from_params(SMALL, perturbed(params, 8, 0.3))


@pytest.mark.parametrize("method,opts", [("recycling", {"template": [3, 2], "k": 3}), ("specinfer", {"widths": [3, 2]})])
def test_top_p_through_trees_keeps_the_target_distribution(small_pair, method, opts):
    """top_p (only top_k was checked through trees): deterministic drafts (a warm recycling
    matrix) and a draft model whose q is top-p filtered too (tokens outside the target's
    nucleus get drafted and must be rejected). Chi-square of the first two tokens, p < 1e-4 fails."""
    target, draft = small_pair
    prompt = [1, 4, 2]
    kw = dict(opts)
    if method == "recycling":
        rng = np.random.default_rng(5)
        kw["method_input"] = np.stack([rng.permutation(SMALL.vocab_size)[:3]
                                       for _ in range(SMALL.vocab_size)]).astype(np.int32)
    else:
        kw["draft"] = draft
    expected = exact_pair_probs(target, prompt, 1.0, top_p=0.75)
    assert (expected == 0).any()  # the nucleus cuts tokens here
    out = target.generate([prompt] * ROWS, max_new_tokens=2, method=method, temperature=1.0, top_p=0.75, seed=13, **kw)
    assert chi2_pvalue([t[:2] for t in out.tokens], expected) > 1e-4
    assert out.stats["mean_accepted"] > 1.2


# ----------------------------------------------------------------------------- repeated calls


def test_repeated_calls_leak_no_state(models, reference):
    """Hot-started recycling calls in between do not change a later cold call (the matrix is
    carried only with hot_start=True), and every call stays exact."""
    lm = models[1]
    opts = dict(max_new_tokens=16, method="recycling", template=[3, 2, 1], k=3)
    cold = lm.generate(PROMPTS, **opts)
    lm.generate(PROMPTS, hot_start=True, **opts)
    warm = lm.generate(PROMPTS, hot_start=True, **opts)
    again = lm.generate(PROMPTS, **opts)
    assert warm.tokens == cold.tokens == again.tokens == reference[16]
    assert again.stats["steps"] == cold.stats["steps"] and again.stats["mean_accepted"] == cold.stats["mean_accepted"]


# ----------------------------------------------------------------------------- SkipDecode


SKIP_CFG = ModelConfig(vocab_size=96, d_model=32, n_layers=6, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=128,
                       init_std=0.2)


def test_skipdecode_with_every_layer_equals_autoregressive_sampled_and_short():
    """min_layers = max_layers = n_layers: ragged batch 3 with a 1-token prompt and an EOS
    row, max_new_tokens 1, 2 and 16, greedy and sampled (same seed: the same samples)."""
    params = init_params(SKIP_CFG, jax.random.key(3))
    r = rng(2)
    ps = [[7], r.integers(1, 96, 40).tolist(), r.integers(1, 96, 9).tolist()]
    eos = jaxaccel.from_params(SKIP_CFG, params).generate(ps, max_new_tokens=16).tokens[2][4]
    lm = jaxaccel.from_params(SKIP_CFG, params, eos_token_ids=(eos,))
    greedy = lm.generate(ps, max_new_tokens=16).tokens
    assert greedy[2][-1] == eos and len(greedy[2]) <= 5 and len(greedy[1]) == 16
    for n in (1, 2, 16):
        for samp in ({}, dict(temperature=0.8, top_p=0.9, seed=4)):
            want = lm.generate(ps, max_new_tokens=n, **samp).tokens
            got = lm.generate(ps, max_new_tokens=n, method="skipdecode", min_layers=6, max_layers=6, max_length=64,
                              **samp)
            assert got.tokens == want, (n, samp)
            assert got.stats["mean_layers_per_step"] == SKIP_CFG.n_layers


# ----------------------------------------------------------------------------- TokenSelect


TS_CFG = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=128)
TS_BUDGET = dict(k=16, n_init=4, n_local=8, chunk=8)  # 28 keys; prefill chunks of 8


def test_tokenselect_is_exact_up_to_the_edge_of_its_budget():
    """The last step of the longest row attends over exactly n_init + k + n_local cached keys
    (prompt 14 + 16 new - 2 = 28): still every key, so greedy and same-seed sampling equal
    autoregressive, compact and original positions alike, with a 1-token prompt in the batch;
    one prompt token more and the selection starts (lookups > 0)."""
    lm = jaxaccel.from_params(TS_CFG, randomize(init_params(TS_CFG, jax.random.key(0), "unrolled")),
                              eos_token_ids=())
    r = rng(3)
    ps = [r.integers(1, 97, n).tolist() for n in (14, 1, 5)]
    for samp, all_positions in (({}, ("compact", "original")), (dict(temperature=0.9, top_k=20, seed=2), ("compact",))):
        want = lm.generate(ps, max_new_tokens=16, **samp).tokens
        for positions in all_positions:
            got = lm.generate(ps, max_new_tokens=16, method="tokenselect", positions=positions, **TS_BUDGET, **samp)
            assert got.tokens == want, (samp, positions)
            assert got.stats["selection_lookups"] == 0
    over = lm.generate([ps[0] + [3]] + ps[1:], max_new_tokens=16, method="tokenselect", **TS_BUDGET)
    assert over.stats["selection_lookups"] > 0
    # a 29-token prompt in prefill chunks of 8, one token generated from a 28-key cache
    p29 = [r.integers(1, 97, 29).tolist()] + ps[1:]
    assert lm.generate(p29, max_new_tokens=1, method="tokenselect", **TS_BUDGET).tokens == \
        lm.generate(p29, max_new_tokens=1).tokens


# ----------------------------------------------------------------------------- Duo-LLM


DUO = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64,
                  init_std=0.1, duo=DuoConfig(enabled=True))


def test_duo_all_big_equals_the_dense_model_and_router_trees_are_lossless():
    """Every layer routed big (no routes, "big", "BB") decodes as the plain model holding the
    big FFNs — autoregressive, through trees and under SkipDecode, greedy and sampled; a
    router that routes token by token is lossless through tree verification too."""
    params = init_params(DUO, jax.random.key(0), "unrolled")
    dense_params = dict(params)
    for i in range(DUO.n_layers):
        layer = dict(params[f"layer_{i}"])
        layer["mlp"] = layer.pop("duo")["big"]
        dense_params[f"layer_{i}"] = layer
    dense = jaxaccel.from_params(ffn_config(DUO, "big"), dense_params)
    duo = jaxaccel.from_params(DUO, params)
    ps = [[3], rng(4).integers(1, 64, 20).tolist(), [5, 6, 5, 6, 5, 6]]
    want = dense.generate(ps, max_new_tokens=16).tokens
    for routes, method, opts in ((None, "autoregressive", {}), ("big", "recycling", {"template": [3, 2], "k": 3}),
                                 ("BB", "skipdecode", dict(min_layers=2, max_layers=2, max_length=60))):
        got = duo.generate(ps, max_new_tokens=16, routes=routes, method=method, **opts).tokens
        assert got == want, (routes, method)
    assert duo.generate(ps, max_new_tokens=16, routes="big", temperature=1.0, seed=9).tokens == \
        dense.generate(ps, max_new_tokens=16, temperature=1.0, seed=9).tokens
    rparams, rcfg = init_router(params, DUO)
    for i in range(DUO.n_layers):
        router = rparams[f"layer_{i}"]["duo"]["router"]
        router["kernel"] = jax.random.normal(jax.random.key(i), router["kernel"].shape)
    routed = jaxaccel.from_params(rcfg, rparams)
    plain = routed.generate(ps, max_new_tokens=16).tokens
    assert plain != want  # the router sends some tokens to the small FFN
    assert routed.generate(ps, max_new_tokens=16, method="recycling", template=[3, 2], k=3).tokens == plain
