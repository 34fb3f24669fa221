"""SkipDecode: the schedule, the decode method (exactness, real skipping, the link to the
teacher-forced training forward) and the trainer's schedule fine-tune."""
import dataclasses
import json
import shutil
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxaccel
from jaxaccel.cli import run_cli
from jaxaccel.config import ModelConfig, from_dict
from jaxaccel.decode.__main__ import main as decode_main
from jaxaccel.decode.engine import generate_loop, prefill_cache
from jaxaccel.decode.sampling import make_sampling
from jaxaccel.decode.skipdecode import SkipDecode
from jaxaccel.errors import ConfigError, InvalidArgumentError
from jaxaccel.experiments import plots
from jaxaccel.model.options import ExecutionPlan
from jaxaccel.model.skip import SkipSchedule
from jaxaccel.model.transformer import ModelHandle, forward, init_params
from jaxaccel.train.config import RunConfig
from jaxaccel.train.loop import train

CFG = ModelConfig(vocab_size=96, d_model=32, n_layers=6, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=128)


@pytest.fixture(scope="module")
def lm():
    # A larger init scale than training's 0.02 makes the random model's greedy choices
    # depend on every layer, so a wrong layer set changes tokens.
    cfg = dataclasses.replace(CFG, init_std=0.2)
    return jaxaccel.from_params(cfg, init_params(cfg, jax.random.key(3)))


def prompts(n, seed=0, lo=3, hi=12):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, CFG.vocab_size, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


# ----------------------------------------------------------------------------- the schedule


def test_schedule_is_monotone_batch_uniform_and_keeps_the_top_layers():
    s = SkipSchedule(n_layers=12, min_layers=3, max_layers=10, max_length=100, warmup_layers=1)
    h = s.layers_np(np.arange(200), 80)
    assert h[0] == 10 and h[80:].tolist() == [3] * 120 and np.all(np.diff(h) <= 0)
    np.testing.assert_array_equal(np.asarray(s.layers(jnp.arange(200), 80)), h)
    act = np.asarray(s.active(jnp.array([12, 10, 3, 2])))
    assert act[0].all()
    np.testing.assert_array_equal(np.flatnonzero(act[1]), [0, 3, 4, 5, 6, 7, 8, 9, 10, 11])
    np.testing.assert_array_equal(np.flatnonzero(act[2]), [0, 10, 11])
    np.testing.assert_array_equal(np.flatnonzero(act[3]), [0, 11])
    # Nested: a later token's layers are a subset of every earlier token's.
    per_token = np.asarray(s.token_active(jnp.arange(100)[None], jnp.array([20])))[0]
    assert per_token[:20].all()
    assert np.all(per_token[1:] <= per_token[:-1])


def test_schedule_rounds_exactly_and_the_same_everywhere():
    """h is computed in integers: numpy (plots, means), jnp scalars (decoding) and jnp
    [batch, T] masks (training) agree with exact rational rounding, .5 ties included."""
    from fractions import Fraction

    s = SkipSchedule(n_layers=12, min_layers=3, max_layers=9, max_length=256)
    span = 192
    exact = [int((Fraction(9 * (span - i) + 3 * i, span) + Fraction(1, 2)) // 1) for i in range(span)]
    assert exact[80] == 7 and s.layers_np(np.arange(span), span).tolist() == exact  # 9 - 6 * 80/192 = 6.5
    assert [int(s.layers(i, span)) for i in (80, 176)] == [exact[80], exact[176]]
    per_token = np.asarray(s.token_active(jnp.arange(64 + span)[None], jnp.array([64])))[0, 64:].sum(-1)
    assert per_token.tolist() == exact
    assert abs(s.mean_layers(span, 96) - np.mean(exact[:96])) < 1e-12


@pytest.mark.parametrize("speedup,expect", [(1, (12, 12)), (2, (9, 3)), (3, (6, 2))])
def test_speedup_picks_a_schedule_with_that_mean(speedup, expect):
    s = SkipSchedule.for_speedup(12, speedup, max_length=256)
    assert (s.max_layers, s.min_layers) == expect
    assert abs(s.mean_layers(2000) - 12 / speedup) < 0.1


@pytest.mark.parametrize("options,match", [
    ({"min_layers": 5, "max_layers": 3}, "min_layers .5. > max_layers"),
    ({"min_layers": 2, "max_layers": 7}, r"max_layers must be an integer in .* = \[2, 6\], got 7"),
    ({"min_layers": 1, "max_layers": 4}, r"min_layers must be .* = \[2, 6\], got 1"),
    ({"warmup_layers": 3, "min_layers": 3, "max_layers": 5}, r"min_layers must be .* = \[4, 6\], got 3"),
    ({"warmup_layers": 6}, r"^warmup_layers \(6\) must be below n_layers \(6\)"),
    ({"speedup": 0.5}, "speedup must be a number >= 1"),
    ({"speedup": 4}, "speedup 4 is unreachable"),
    ({"speedup": 2, "max_layers": 4}, "either speedup or min_layers"),
    # warmup_layers is checked before `speedup` uses it (was a TypeError, or "unreachable")
    ({"speedup": 2, "warmup_layers": "abc"}, r"^warmup_layers must be an integer >= 0, got 'abc'$"),
    ({"speedup": 2, "warmup_layers": 1.5}, r"^warmup_layers must be an integer >= 0, got 1\.5$"),
    ({"speedup": 1, "warmup_layers": 6}, r"^warmup_layers \(6\) must be below n_layers \(6\)"),
    ({"max_length": 1}, "max_length must be an integer >= 2"),
    # max_layers alone: min_layers defaults to it, but the message names the option given
    ({"max_layers": 7}, r"^max_layers must be an integer in .* = \[2, 6\], got 7$"),
    ({"max_layers": 7, "min_layers": 3}, r"^max_layers must be an integer in .* = \[2, 6\], got 7$"),
    ({"min_layers": 7}, r"^min_layers must be an integer in .* = \[2, 6\], got 7$"),
    # no O(max_length) memory: a MemoryError before the bound
    ({"max_length": 10 ** 12}, r"^max_length must be an integer >= 2 and <= 16777216, got 1000000000000$"),
    ({"max_length": 2 ** 24 + 1}, r"^max_length must be an integer >= 2 and <= 16777216, got 16777217$"),
    ({"max_length": True}, r"^max_length must be an integer >= 2 and <= 16777216, got True$"),
    ({"max_length": 64.0}, r"^max_length must be an integer >= 2 and <= 16777216, got 64\.0$"),
])
def test_bad_schedules_are_one_line_errors(lm, options, match):
    with pytest.raises(InvalidArgumentError, match=match) as err:
        lm.generate([[1, 2, 3]], max_new_tokens=4, method="skipdecode", **options)
    assert "\n" not in str(err.value)


def test_max_length_bound_keeps_the_rule_exact_and_checks_cheaply():
    """Up to its bound h(i) is exact in int32 (jnp and numpy alike); the bound shrinks for deep
    models so (2 * max_layers + 1) * span never overflows; building never allocates O(span)."""
    import time
    import tracemalloc
    from fractions import Fraction

    from jaxaccel.model.skip import MAX_LENGTH, max_length_limit

    assert max_length_limit(6) == MAX_LENGTH == 2 ** 24 and max_length_limit(200) == (2 ** 31 - 1) // 401
    for n, hi, lo, span in [(6, 6, 2, MAX_LENGTH), (200, 200, 2, max_length_limit(200))]:
        tracemalloc.start()
        t0 = time.perf_counter()
        s = SkipSchedule(n_layers=n, min_layers=lo, max_layers=hi, max_length=span)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 1 << 20 and time.perf_counter() - t0 < 1.0
        i = np.array([0, 1, span // 3, span // 2, span - 1, span, span + 5])
        exact = [int((Fraction(hi * (span - k) + lo * k, span) + Fraction(1, 2)) // 1) if k < span else lo
                 for k in i.tolist()]
        assert s.layers_np(i, span).tolist() == exact
        assert np.asarray(s.layers(jnp.asarray(i), span)).tolist() == exact
    with pytest.raises(InvalidArgumentError, match=rf"^max_length must be an integer >= 2 and <= {(2**31 - 1) // 401}"):
        SkipSchedule(n_layers=200, min_layers=2, max_layers=200, max_length=max_length_limit(200) + 1)
    # numpy scalars of valid values are fine
    s = SkipSchedule.build(6, speedup=np.float32(2.0), max_length=np.int64(64))
    assert s == SkipSchedule.for_speedup(6, 2, max_length=64)


def test_max_length_must_exceed_the_prompt(lm):
    with pytest.raises(InvalidArgumentError, match=r"max_length \(8\) must exceed the longest prompt \(9 tokens\)"):
        lm.generate([[1] * 4, [2] * 9], max_new_tokens=4, method="skipdecode", max_length=8, speedup=2)


def test_a_constant_depth_takes_any_prompt_length(lm):
    """Every layer (no options, no trained schedule) or a constant depth has no span to check:
    a prompt at or past max_length (here the model's max_seq_len, 128) decodes like
    autoregressive / at that depth."""
    long = prompts(1, seed=5, lo=130, hi=131)
    with pytest.warns(UserWarning, match="maximum length 128"):
        ref = lm.generate(long, max_new_tokens=4)
    with pytest.warns(UserWarning, match="maximum length 128"):
        got = lm.generate(long, max_new_tokens=4, method="skipdecode")
    assert got.tokens == ref.tokens and got.stats["mean_layers_per_step"] == CFG.n_layers
    with pytest.warns(UserWarning, match="maximum length 128"):
        fixed = lm.generate(long, max_new_tokens=4, method="skipdecode", min_layers=3, max_layers=3)
    assert fixed.stats["mean_layers_per_step"] == (CFG.n_layers + 3 * 3) / 4  # step 0 runs every layer
    # ... unless the caller gives a max_length the prompt already reaches
    for constant in (dict(min_layers=3, max_layers=3), dict()):
        with pytest.raises(InvalidArgumentError, match=r"^max_length \(100\) must exceed the longest prompt"):
            lm.generate(long, max_new_tokens=4, method="skipdecode", max_length=100, **constant)


def test_a_one_layer_model_decodes_with_the_defaults():
    cfg = dataclasses.replace(CFG, n_layers=1, init_std=0.2)
    one = jaxaccel.from_params(cfg, init_params(cfg, jax.random.key(1)))
    ps = prompts(2, seed=6)
    got = one.generate(ps, max_new_tokens=6, method="skipdecode")
    assert got.tokens == one.generate(ps, max_new_tokens=6).tokens and got.stats["mean_layers_per_step"] == 1
    # an explicit schedule is still checked as given
    with pytest.raises(InvalidArgumentError, match=r"^warmup_layers \(1\) must be below n_layers \(1\)"):
        one.generate(ps, max_new_tokens=6, method="skipdecode", warmup_layers=1)


def test_cli_bad_schedule_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(decode_main, ["--model", "builtin:default", "--method", "skipdecode", "--option", "min_layers=3",
                              "--option", "max_layers=2", "--max-new-tokens", "4", "--prompt", "def f():"])
    rc = exit_info.value.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "min_layers" in err[0]


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("batch,dispatch", [(1, "cond"), (4, "cond"), (4, "switch")])
def test_full_schedule_equals_autoregressive(lm, batch, dispatch):
    ps = prompts(batch, seed=batch)
    ref = lm.generate(ps, max_new_tokens=24)
    got = lm.generate(ps, max_new_tokens=24, method="skipdecode", max_length=64, dispatch=dispatch)
    assert got.tokens == ref.tokens
    assert got.stats["mean_layers_per_step"] == CFG.n_layers


def test_full_schedule_equals_autoregressive_in_bfloat16():
    """A constant depth takes the static programs: at every layer, the very forward of
    autoregressive. Under lax.cond a bfloat16 layer rounded differently, and the shipped
    bfloat16 model's greedy tokens drifted from autoregressive's after about 20."""
    cfg = dataclasses.replace(CFG, init_std=0.2, dtype="bfloat16", param_dtype="bfloat16")
    lm16 = jaxaccel.from_params(cfg, init_params(cfg, jax.random.key(5)))
    ps = prompts(4, seed=11)
    ref = lm16.generate(ps, max_new_tokens=40)
    for opts in (dict(), dict(min_layers=CFG.n_layers, max_layers=CFG.n_layers, max_length=64)):
        assert lm16.generate(ps, max_new_tokens=40, method="skipdecode", **opts).tokens == ref.tokens


def test_switch_dispatch_equals_cond(lm):
    ps = prompts(3, seed=9)
    opts = dict(method="skipdecode", min_layers=2, max_layers=5, max_length=30, max_new_tokens=28)
    cond = lm.generate(ps, **opts)
    assert lm.generate(ps, dispatch="switch", **opts).tokens == cond.tokens
    assert cond.tokens != lm.generate(ps, max_new_tokens=28).tokens


def teacher_forced_argmax(lm, prompt, generated, schedule):
    """Greedy choices of the *training* forward under the schedule (per-token layer masks,
    no cache): what the schedule fine-tune optimises."""
    seq = jnp.asarray([prompt + generated[:-1]])
    plan = ExecutionPlan(active=schedule.token_active(jnp.arange(seq.shape[1])[None], jnp.array([len(prompt)])))
    logits, _ = forward(lm.params, lm.config, seq, plan=plan)
    return np.asarray(jnp.argmax(logits[0, len(prompt) - 1:], -1)).tolist()


def test_decoding_matches_the_teacher_forced_training_forward(lm):
    """Step t runs the t-th token with the layers the training forward gives that position:
    the K/V each step reads are exactly the ones the per-token-mask forward computes."""
    schedule = SkipSchedule(CFG.n_layers, min_layers=2, max_layers=5, max_length=40, warmup_layers=1)
    for p in prompts(3, seed=7):
        out = lm.generate([p], max_new_tokens=36, method="skipdecode", min_layers=2, max_layers=5, max_length=40)
        gen = out.tokens[0]
        assert teacher_forced_argmax(lm, p, gen, schedule) == gen
        full = lm.generate([p], max_new_tokens=36).tokens[0]
        assert gen != full  # skipping changed the model: the test above is not vacuous
    assert out.stats["mean_layers_per_step"] < 4


class PoisonSkipped(SkipDecode):
    """SkipDecode that, after each step, fills the K/V slot it just skipped in every skipped
    layer with NaN: garbage standing for "never computed". Any later read of one would
    poison the logits (greedy argmax of NaN logits is token 0)."""

    def step(self, state, ctx):
        schedule = self._require(ctx)
        on = schedule.active(self.layers_at_step(state.step, state.method_state.span, schedule))
        slot, rows = state.cache_len, jnp.arange(state.cache_len.shape[0])
        state = super().step(state, ctx)
        poison = lambda a, i: a.at[rows, :, slot].set(jnp.where(on[i], a[rows, :, slot], jnp.nan))  # noqa: E731
        return state._replace(cache=tuple(type(kv)(poison(kv.k, i), poison(kv.v, i))
                                          for i, kv in enumerate(state.cache)))


def test_skipped_kv_slots_are_never_read(lm):
    ps = prompts(4, seed=11)
    opts = dict(min_layers=2, max_layers=4, max_length=30, warmup_layers=1)
    ref = lm.generate(ps, max_new_tokens=20, method="skipdecode", **opts)
    method = PoisonSkipped(**opts)
    method.check(lm.config)
    handle = ModelHandle(lm.params, lm.config)
    tokens = jnp.zeros((4, 64), jnp.int32)
    for i, p in enumerate(ps):
        tokens = tokens.at[i, :len(p)].set(jnp.asarray(p))
    lens = jnp.asarray([len(p) for p in ps], jnp.int32)
    mode, sampling = make_sampling(0.0, None, None)
    loop = jax.jit(lambda h, c: generate_loop(h, c, tokens, lens, jnp.ones(4, bool), jnp.int32(20), sampling,
                                              jax.vmap(jax.random.key)(jnp.arange(4)), None, method=method,
                                              mode=mode, eos_ids=(), out_len=32))
    out = loop(handle, prefill_cache(handle, tokens, lens, cache_len=64, chunk=16))
    assert np.asarray(out.tokens)[:, :20].tolist() == ref.tokens
    assert ref.stats["mean_layers_per_step"] < 4
    nan_layers = [i for i, kv in enumerate(out.cache) if np.isnan(np.asarray(kv.k)).any()]
    assert nan_layers == [1, 2, 3, 4]  # every layer but the warm-up and the top one was skipped at some step


def test_eos_ends_rows_where_plain_decoding_would(lm):
    ps = prompts(3, seed=5)
    opts = dict(max_new_tokens=16, method="skipdecode", max_length=32, speedup=2)
    free = lm.generate(ps, **opts).tokens
    eos = free[1][5]
    lm2 = jaxaccel.from_params(lm.config, lm.params, eos_token_ids=[eos])
    out = lm2.generate(ps, **opts).tokens
    for row, full in zip(out, free):  # each row: the free run cut after its first EOS
        assert row == (full[:full.index(eos) + 1] if eos in full else full)
    assert len(out[1]) <= 6


def test_sampling_is_seeded_and_top_k_1_is_greedy(lm):
    ps = prompts(3, seed=6)
    opts = dict(max_new_tokens=16, method="skipdecode", max_length=32, speedup=2)
    sampled = [lm.generate(ps, temperature=0.8, top_k=20, top_p=0.9, seed=1, **opts).tokens for _ in range(2)]
    assert sampled[0] == sampled[1]
    assert sampled[0] != lm.generate(ps, temperature=0.8, top_k=20, top_p=0.9, seed=2, **opts).tokens
    assert lm.generate(ps, temperature=0.8, top_k=1, **opts).tokens == lm.generate(ps, **opts).tokens


def test_a_clash_with_the_trained_schedule_names_where_the_other_value_came_from(lm):
    tuned = jaxaccel.from_params(lm.config, lm.params, info={"skip_schedule": {"min_layers": 3, "max_layers": 5}})
    with pytest.raises(InvalidArgumentError, match=r"^min_layers \(3\) > max_layers \(2\).*\(min_layers=3 from the "
                                                   r"model's trained schedule; give them too to override\)$"):
        tuned.generate([[1, 2, 3]], max_new_tokens=2, method="skipdecode", max_layers=2)


def test_bench_reports_the_schedule_the_method_runs(lm):
    """A model fine-tuned with 2 warm-up layers: the bench described (and sized its step-cost
    depths by) a 1-warm-up schedule it never ran."""
    from jaxaccel.bench.skipdecode import method_schedule

    tuned = jaxaccel.from_params(lm.config, lm.params, info={"skip_schedule": {"warmup_layers": 2, "max_length": 40}})
    schedule = method_schedule(tuned, 2, 40)
    ran = tuned.generate(prompts(1, lo=8, hi=9), max_new_tokens=4, method="skipdecode", speedup=2, max_length=40)
    assert schedule.warmup_layers == 2 and schedule.describe() == ran.stats["schedule"]


# ----------------------------------------------------------------------------- fine-tuning


def run_cfg(tmp, mesh=None, steps=4, init_from=None, **skip):
    return from_dict(RunConfig, {
        "model": {"vocab_size": 64, "d_model": 32, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 64},
        "data": {"corpus": "synthetic"},
        "train": {"steps": steps, "batch_size": 8, "seq_len": 32, "log_every": 2, "eval_every": 0, "progress": False,
                  "peak_flops": 1e11, "init_from": init_from,
                  "skip_schedule": {"prompt_min": 4, "prompt_max": 12, **skip}},
        "optim": {"lr": 1e-2, "warmup_steps": 1}, "checkpoint": {"every_steps": 2, "keep": 3},
        "mesh": {"data": 1, **(mesh or {})}, "output_dir": str(tmp), "tensorboard": False})


def losses(folder):
    return [json.loads(line)["loss"] for line in open(Path(folder) / "metrics.jsonl") if '"loss"' in line]


def test_schedule_fine_tune_starts_from_a_model_and_shards(tmp_path):
    train(run_cfg(tmp_path / "base", steps=6))  # plain training: the init_from source
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    train(run_cfg(single, speedup=2, max_length=32, init_from=str(tmp_path / "base")))
    train(run_cfg(sharded, {"data": 2, "fsdp": 2, "tensor": 2}, speedup=2, max_length=32,
                  init_from=str(tmp_path / "base" / "model")))
    np.testing.assert_allclose(losses(sharded), losses(single), rtol=2e-5)
    base = losses(tmp_path / "base")
    assert losses(single)[0] < base[0]  # it started from the trained base, not from scratch
    # The exported model remembers its schedule: method="skipdecode" alone decodes with it.
    tuned = jaxaccel.load(single / "model")
    trained = run_cfg(single, speedup=2, max_length=32).skip_schedule()[0]
    out = tuned.generate([[1, 2, 3]], max_new_tokens=4, method="skipdecode")
    assert out.stats["schedule"] == trained.describe()
    # so does the run itself before its export (still going, or killed): its checkpoint's meta
    # carries the schedule (a run folder used to decode with every layer, silently)
    shutil.rmtree(single / "model")
    from_run = jaxaccel.load(single)
    assert from_run.info["skip_schedule"] == tuned.info["skip_schedule"] and from_run.info["trained_steps"] == 4
    assert from_run.generate([[1, 2, 3]], max_new_tokens=4, method="skipdecode").stats["schedule"] == trained.describe()
    assert jaxaccel.load(tmp_path / "base").generate([[1, 2, 3]], max_new_tokens=4, method="skipdecode"
                                                     ).stats["mean_layers_per_step"] == 4


def test_bad_fine_tune_configs(tmp_path):
    with pytest.raises(ConfigError, match="train.skip_schedule: speedup 3.0 is unreachable"):
        train(run_cfg(tmp_path / "a", speedup=3))
    with pytest.raises(ConfigError, match=r"max_length \(10\) must exceed prompt_max \(12\)"):
        train(run_cfg(tmp_path / "b", max_layers=4, min_layers=2, max_length=10))
    with pytest.raises(ConfigError, match="init_from.*neither a jaxaccel model nor a training run"):
        train(run_cfg(tmp_path / "c", init_from=str(tmp_path)))
    # far beyond any context: a one-line refusal, not a MemoryError from checking the schedule
    with pytest.raises(ConfigError, match=r"^train\.skip_schedule: max_length must be an integer >= 2 and <= "
                                          r"16777216, got 1000000000000$"):
        train(run_cfg(tmp_path / "d", max_layers=4, min_layers=2, max_length=10 ** 12))
    with pytest.raises(ConfigError, match=r"^train\.skip_schedule: max_layers must be an integer in .*, got 5$"):
        train(run_cfg(tmp_path / "e", max_layers=5))
    assert not any((tmp_path / d).exists() for d in "de")
    with pytest.raises(ConfigError, match=r"not both \(over a config that sets speedup, add "
                                          r"train\.skip_schedule\.speedup=null\)$"):
        train(run_cfg(tmp_path / "g", speedup=2, min_layers=2))
    prefix = run_cfg(tmp_path / "f", max_layers=4, min_layers=2, max_length=32)
    prefix = dataclasses.replace(prefix, data=dataclasses.replace(prefix.data, corpus="stdlib", objective="prefix_lm"))
    with pytest.raises(ConfigError, match=r"^train\.skip_schedule needs data\.objective: causal .*'prefix_lm'$"):
        train(prefix)


# ----------------------------------------------------------------------------- the experiment, at toy size


def test_experiment_scores_plots_and_reports(lm, tmp_path):
    from jaxaccel.experiments import skipdecode as exp

    rows = np.random.default_rng(0).integers(1, CFG.vocab_size, size=(6, 41)).astype(np.int32)
    sch = SkipSchedule(CFG.n_layers, min_layers=2, max_layers=5, max_length=40)
    full = exp.teacher_forced(lm.params, lm.config, rows, 8, None, batch=4)
    skip = exp.teacher_forced(lm.params, lm.config, rows, 8, sch, batch=4)
    assert full["tokens"] == skip["tokens"] == 6 * 33
    # By hand: the schedule's forward, the positions after the prompt, mean cross entropy.
    plan = ExecutionPlan(active=sch.token_active(jnp.broadcast_to(jnp.arange(40), (6, 40)), jnp.full((6,), 8)))
    logits, _ = forward(lm.params, lm.config, jnp.asarray(rows[:, :-1]), plan=plan)
    logp = jax.nn.log_softmax(logits[:, 7:], -1)
    ce = -np.take_along_axis(np.asarray(logp), rows[:, 8:, None], -1).mean()
    assert abs(skip["loss"] - ce) < 1e-4 and skip["loss"] != full["loss"]
    assert exp.agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]]) == {"token_agreement": 0.75, "common_prefix": 2.0}
    assert exp.shallow_layers(SkipSchedule.for_speedup(12, 2, max_length=256), 192) == 6
    speeds = {"batch1": 100.0, "batch8": 400.0}
    part = lambda m, **kw: {**m, "token_agreement": 0.5, "common_prefix": 3.0, "perplexity_rise": 0.1, **kw}  # noqa
    results = {"n_layers": CFG.n_layers, "new_tokens": 32, "full": {**full, "tokens_per_s": speeds},
               "speedups": [{"speedup": 2, "max_layers": 5, "min_layers": 2, "mean_layers": 3.5,
                             "layers_per_step": sch.layers_np(np.arange(32), 32).tolist(),
                             "skipdecode": part(skip, tokens_per_s={"batch1": 180.0, "batch8": 700.0},
                                                speedup_batch1=1.8, speedup_batch8=1.75),
                             "no_finetune": part(skip), "shallow": part(full, n_layers=3, tokens_per_s=speeds),
                             "skipdecode_best": False}]}
    drawn, save = [], plots.save_figure
    with mock.patch.object(plots, "save_figure", side_effect=lambda plt, fig, axes, path: drawn.append(axes)
                           or save(plt, fig, axes, path)):
        paths = exp.plot(results, tmp_path)
    assert all(p.stat().st_size > 1000 for p in paths)
    # each point sits at its own nominal speedup: layers over the schedule's mean, or the shallow model's
    x = {line.get_label(): list(line.get_xdata()) for line in drawn[0][0].get_lines()}
    assert x == {"skipdecode": [1, CFG.n_layers / 3.5], "no_finetune": [1, CFG.n_layers / 3.5],
                 "shallow": [1, CFG.n_layers / 3]}
    table = exp.markdown(results)
    assert "| 2x | **SkipDecode** | 5→2 (mean 3.50) |" in table and "1.80x" in table
    assert exp.summary(results) == ["2x: perplexity +10.0% vs full, tokens/s 1.80x at batch1, 1.75x at batch8; "
                                    "beats both baselines: no"]
    assert "decode loop" not in table  # results written before the decode-loop figures still report
    # With the decode loop timed alone (prefill excluded) too:
    results["full"]["decode_phase_tokens_per_s"] = {"batch1": 120.0, "batch8": 500.0}
    sd = results["speedups"][0]["skipdecode"]
    sd.update(decode_phase_tokens_per_s={"batch1": 264.0, "batch8": 1000.0}, decode_phase_speedup_batch1=2.2,
              decode_phase_speedup_batch8=2.0)
    table = exp.markdown(results)
    assert "decode loop vs full (batch8)" in table and "| 1.80x | 1.75x | 2.20x | 2.00x |" in table
    assert exp.summary(results)[0].endswith("1.75x at batch8 (decode loop alone: 2.20x, 2.00x); "
                                            "beats both baselines: no")


@pytest.mark.slow
def test_experiment_run_end_to_end_at_toy_size(tmp_path):
    """`experiments skipdecode`'s run(): the fine-tunes from its configs (and their reuse),
    the shallow baseline, quality, and speed end to end and of the decode loop alone."""

    import yaml

    from jaxaccel.experiments import skipdecode as exp

    from conftest import toy_corpus

    corpus = toy_corpus(tmp_path / "corpus")
    model = {"vocab_size": 400, "d_model": 32, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 64,
             "max_seq_len": 64}
    data = {"corpus": str(corpus / "*.py"), "vocab_size": 400, "num_sentinels": 8, "validation_fraction": 0.25,
            "cache_dir": str(tmp_path / "cache")}
    common = {"model": model, "data": data, "optim": {"lr": 1e-2, "warmup_steps": 1}, "tensorboard": False,
              "checkpoint": {"every_steps": 2, "keep": 1}, "mesh": {"data": 1}}
    train_ = {"steps": 2, "batch_size": 4, "seq_len": 32, "eval_every": 0, "eval_batches": 2, "log_every": 1,
              "peak_flops": 1e11}  # the experiment scores held-out files itself: the trainer's eval is a formality
    train(from_dict(RunConfig, {**common, "train": {**train_, "progress": False}, "output_dir": str(tmp_path / "base")}))
    configs = tmp_path / "configs"
    configs.mkdir()
    skip = {"speedup": 2, "max_length": 32, "prompt_min": 4, "prompt_max": 12}
    for name, extra in (("1x", {}), ("2x", {"skip_schedule": skip})):
        (configs / f"skipdecode-{name}.yaml").write_text(yaml.safe_dump({**common, "train": {**train_, **extra}}))
    kw = dict(base=str(tmp_path / "base"), root=str(tmp_path / "runs"), configs=str(configs), speedups=(2,),
              prompt_tokens=8, max_length=32, eval_rows=4, files=2, batches=(1, 2), runs=1)
    logged = []
    res = exp.run(**kw, log=logged.append)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["1x", "2x", "shallow-2layers"]
    assert sum(line.startswith("fine-tuning") for line in logged) == 3
    (row,) = res["speedups"]
    assert row["schedule"] == SkipSchedule.for_speedup(4, 2, max_length=32).describe()
    for part in ("skipdecode", "no_finetune", "shallow"):
        assert np.isfinite(row[part]["perplexity"]) and row[part]["tokens"] == res["eval_rows"] * 25
    assert res["eval_tokens_per_row"] == 25  # the 24 generated tokens and the one after the last
    for name in ("skipdecode", "shallow"):
        for b in ("batch1", "batch2"):
            assert row[name]["tokens_per_s"][b] > 0 and row[name]["decode_phase_tokens_per_s"][b] > 0
            assert row[name][f"decode_phase_speedup_{b}"] == pytest.approx(
                row[name]["decode_phase_tokens_per_s"][b] / res["full"]["decode_phase_tokens_per_s"][b])
    assert "decode loop vs full (batch2)" in exp.markdown(res)
    logged.clear()
    exp.run(**{**kw, "batches": (1,)}, log=logged.append)  # the fine-tunes are found, not redone
    assert not any(line.startswith("fine-tuning") for line in logged)


def test_generated_only_loss_is_the_mean_over_the_tokens_it_sums():
    """The train step's loss under `loss: generated` is the mean cross entropy of exactly the
    tokens after each row's boundary (its normalizer counts those, not every target)."""
    import optax

    from jaxaccel.train.step import TrainState, make_optimizer, lr_schedule, train_step, with_skip_boundary
    from jaxaccel.train.config import OptimConfig

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    params = init_params(cfg, jax.random.key(0))
    rows, t = 4, 32
    x = jax.random.randint(jax.random.key(1), (rows, t + 1), 1, 64)
    batch = {"inputs": x[:, :-1], "targets": x[:, 1:], "loss_mask": jnp.ones((rows, t), jnp.float32),
             "segment_ids": jnp.ones((rows, t), jnp.int32), "positions": jnp.broadcast_to(jnp.arange(t), (rows, t)),
             "bidirectional": jnp.zeros((rows, t), bool)}
    skip = (SkipSchedule(4, min_layers=2, max_layers=3, max_length=32), 4, 12, True)
    opt_cfg = OptimConfig(lr=1e-3, warmup_steps=1)
    optimizer = make_optimizer(opt_cfg, 10)
    state = TrainState(jnp.int32(0), params, optimizer.init(params), jax.random.key(5))
    step = jax.jit(lambda st, b: train_step(st, b, model_cfg=cfg, optimizer=optimizer,
                                            schedule=lr_schedule(opt_cfg, 10), grad_accum=1, dropout=False,
                                            remat=False, attention="dense", skip=skip))
    _, metrics = step(state, batch)
    _, step_rng = jax.random.split(state.rng)
    b = with_skip_boundary(skip, batch, jax.random.fold_in(step_rng, 17))
    plan = ExecutionPlan(active=skip[0].token_active(b["positions"], b["skip_boundary"]))
    logits, _ = forward(params, cfg, batch["inputs"], batch["positions"], plan=plan)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = np.asarray(b["loss_mask"])
    assert 0 < mask.sum() < rows * t
    np.testing.assert_allclose(float(metrics["loss"]), float((ce * mask).sum() / mask.sum()), rtol=1e-5)


def test_experiment_cli_checks_prompt_tokens_before_any_work(capsys, tmp_path):
    from jaxaccel.experiments.__main__ import main as experiments_main

    with pytest.raises(SystemExit) as exit_info:
        run_cli(experiments_main, ["skipdecode", "--base", str(tmp_path), "--prompt-tokens", "0", "--out",
                                   str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "prompt tokens and batches must be >= 1" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_the_experiment_reuses_a_fine_tune_only_if_it_was_made_with_the_same_settings(tmp_path, monkeypatch):
    import yaml

    from jaxaccel.config import to_dict
    from jaxaccel.experiments import skipdecode as exp
    from jaxaccel.experiments.results import SweepError

    config = tmp_path / "skipdecode-2x.yaml"
    config.write_text(yaml.safe_dump(to_dict(run_cfg(tmp_path / "unused", speedup=2, max_length=32))))
    out = tmp_path / "2x"
    (out / "model").mkdir(parents=True)
    (out / "model" / "jaxaccel.json").write_text("{}")  # a finished fine-tune, as far as the folder shows
    planned = run_cfg(out, speedup=2, max_length=32, init_from="runs/deep")
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(planned)))
    monkeypatch.setattr("jaxaccel.train.loop.train", lambda cfg: pytest.fail("a finished fine-tune was retrained"))
    assert exp.fine_tune(config, out, "runs/deep", log=lambda s: None) == out / "model"
    assert exp.fine_tune(config, out, "runs/deep/", log=lambda s: None) == out / "model"  # the same folder
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(run_cfg(out, speedup=2, max_length=32,
                                                                     init_from="runs/deep/"))))
    assert exp.fine_tune(config, out, "runs/deep", log=lambda s: None) == out / "model"  # saved before normalising
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(planned)))
    with pytest.raises(SweepError, match=r"2x holds a fine-tune made with other settings \(train.init_from is "
                                         r"'runs/deep' there, 'runs/other' now\); move it away"):
        exp.fine_tune(config, out, "runs/other", log=lambda s: None)
    (out / "config.yaml").unlink()
    with pytest.raises(SweepError, match="it has no readable config.yaml"):
        exp.fine_tune(config, out, "runs/deep", log=lambda s: None)


def test_heldout_rows_read_the_configured_text_field(tmp_path):
    """The held-out reader opened the corpus with the default field ("text"): a JSONL corpus
    whose documents are in another field was scored on the wrong text, or refused."""
    import json

    from conftest import toy_corpus
    from jaxaccel.data.config import DataConfig
    from jaxaccel.experiments.skipdecode import heldout_rows

    files = sorted(toy_corpus(tmp_path / "corpus").glob("*.py"))
    with open(tmp_path / "docs.jsonl", "w") as f:
        for p in files:
            f.write(json.dumps({"content": p.read_text(), "text": "x"}) + "\n")
    cfg = DataConfig(corpus=str(tmp_path / "docs.jsonl"), text_field="content", vocab_size=400, num_sentinels=8,
                     validation_fraction=0.25, cache_dir=str(tmp_path / "cache"))
    rows = heldout_rows(cfg, 16, 8)
    assert rows.shape == (8, 17) and len(set(rows.ravel().tolist())) > 20  # code, not "x"
