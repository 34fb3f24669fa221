"""Duo-LLM's routers and oracles (jaxaccel.model.duo routers, jaxaccel.experiments.duo): the
soft router tends to the hard one as the temperature falls, the budget loss moves P(big)
toward the budget, the exhaustive oracle equals a brute force over separately computed
patterns, the beam oracle matches it when wide enough, and bad input is one line."""
import functools
import itertools
from pathlib import Path
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaccel.config import DuoConfig, ModelConfig
from jaxaccel.errors import InvalidArgumentError
from jaxaccel.experiments import duo as exp
from jaxaccel.model.duo import BIG, SMALL, init_router, scale_router
from jaxaccel.model.options import ExecutionPlan
from jaxaccel.model.transformer import forward, init_params, stack_layers

# 3 layers: 2^3 = 8 patterns, 3^3 = 27 with skip — small enough to brute-force in the test.
TOY = ModelConfig(vocab_size=48, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64,
                  init_std=0.15, duo=DuoConfig(enabled=True))


@pytest.fixture(scope="module")
def toy():
    params = init_params(TOY, jax.random.key(0), "unrolled")
    rows = np.asarray(jax.random.randint(jax.random.key(1), (4, 13), 0, TOY.vocab_size), np.int32)
    return params, rows


@pytest.fixture(scope="module")
def scorer(toy):
    params, rows = toy
    return exp.Scorer(params, TOY, rows, batch=8)


def with_random_router(params, config, seed=0, scale=1.0):
    full, rconfig = init_router(params, config)
    keys = iter(jax.random.split(jax.random.key(seed), config.n_layers))
    for i in range(config.n_layers):
        full[f"layer_{i}"]["duo"]["router"] = {"kernel": scale * jax.random.normal(next(keys), (config.d_model, 2)),
                                               "bias": jnp.zeros((2,), jnp.float32)}
    return full, rconfig


def brute_force_losses(params, rows, pattern):
    """Per-token CE under one pattern: a forward per row, routes [L] for the whole row."""
    out = []
    for row in rows:
        logits, _ = forward(params, TOY, jnp.asarray(row[None, :-1]), plan=ExecutionPlan(routes=jnp.asarray(pattern)))
        logp = jax.nn.log_softmax(logits[0], -1)
        out.append(-np.asarray(logp)[np.arange(len(row) - 1), row[1:]])
    return np.concatenate(out)


def test_exhaustive_oracle_equals_a_brute_force_over_patterns(toy, scorer):
    params, rows = toy
    patterns = exp.all_patterns(3, with_skip=True)
    assert patterns.shape == (27, 3) and len({tuple(p) for p in patterns}) == 27
    losses = scorer.patterns(patterns)
    brute = {p: brute_force_losses(params, rows, p) for p in itertools.product((0, 1, 2), repeat=3)}
    np.testing.assert_allclose(losses, np.stack([brute[tuple(p)] for p in patterns]), atol=2e-5)
    for budget in range(4):
        for exact in (False, True):
            loss, index = exp.oracle(losses, patterns, budget, exact=exact)
            ok = [p for p in brute if (sum(r == BIG for r in p) == budget if exact else sum(r == BIG for r in p) <= budget)]
            want = np.min(np.stack([brute[p] for p in ok]), axis=0)
            np.testing.assert_allclose(loss, want, atol=2e-5)
            bigs = [sum(r == BIG for r in patterns[i]) for i in index]
            assert all(n == budget for n in bigs) if exact else all(n <= budget for n in bigs)
            fixed = exp.best_fixed(losses, patterns, budget, exact=exact)
            assert np.isclose(losses[fixed].mean(), min(brute[p].mean() for p in ok), atol=2e-5)
    # more budget never hurts the "at most" oracle
    curve = [exp.oracle(losses, patterns, b)[0].mean() for b in range(4)]
    assert all(a >= b - 1e-6 for a, b in zip(curve, curve[1:]))


def test_beam_oracle_matches_the_exhaustive_one_when_wide_and_bounds_it_when_narrow(scorer):
    patterns = exp.all_patterns(3)
    losses = scorer.patterns(patterns)
    index = {tuple(p): i for i, p in enumerate(patterns)}
    calls = []

    def evaluate(ps):
        calls.append(len(ps))
        return losses[[index[tuple(p)] for p in ps]]

    wide_p, wide_l = exp.beam_oracle(evaluate, 3, width=8)
    assert len(wide_p) == 8 and sum(calls) == 8  # every pattern once, none twice
    for b in range(4):
        np.testing.assert_allclose(exp.oracle(wide_l, wide_p, b)[0], exp.oracle(losses, patterns, b)[0])
    narrow_p, narrow_l = exp.beam_oracle(evaluate, 3, width=1)  # greedy: one pattern per budget kept
    assert len(narrow_p) == 1 + 3 + 2 + 1
    for b in range(4):
        assert np.all(exp.oracle(narrow_l, narrow_p, b)[0] >= exp.oracle(losses, patterns, b)[0] - 1e-6)


def test_random_routes_give_each_token_exactly_b_big_layers():
    routes = exp.random_budget_routes(np.random.default_rng(0), (3, 50), 8, 3)
    assert routes.shape == (3, 50, 8) and set(np.unique(routes)) == {BIG, SMALL}
    assert np.all(np.sum(routes == BIG, axis=-1) == 3)
    assert 0.2 < np.mean(routes[..., 0] == BIG) < 0.55  # every layer takes its share (3 / 8)


def test_soft_routing_tends_to_hard_routing_as_the_temperature_falls(toy):
    params, rows = toy
    rparams, rcfg = with_random_router(params, TOY)
    x = jnp.asarray(rows[:, :-1])
    hard, _, aux = forward(rparams, rcfg, x, return_aux=True)
    chosen = jnp.moveaxis(jnp.argmax(aux["duo_router_logits"], -1), 0, -1)  # [B, T, L]: 0 big, 1 small
    forced, _ = forward(rparams, rcfg, x, plan=ExecutionPlan(routes=chosen.astype(jnp.int32)))
    np.testing.assert_allclose(hard, forced, atol=1e-5)  # hard = the router's argmax as forced routes
    assert 0.0 < float(jnp.mean(aux["duo_p_big"])) < 1.0  # a random router mixes both
    gaps = [float(jnp.max(jnp.abs(forward(scale_router(rparams, 1.0 / tau), rcfg, x,
                                          plan=ExecutionPlan(soft_routes=True))[0] - hard)))
            for tau in (1.0, 1e-4)]
    assert gaps[0] > 1e-2 and gaps[-1] < 1e-4  # soft differs from hard at tau 1, equals it as tau -> 0
    # a scanned layout sows the same per-layer statistics
    _, _, aux_scanned = forward(stack_layers(rparams, rcfg), rcfg, x, return_aux=True)
    np.testing.assert_allclose(aux_scanned["duo_p_big"], aux["duo_p_big"], atol=1e-6)
    np.testing.assert_allclose(aux_scanned["duo_router_logits"], aux["duo_router_logits"], atol=1e-5)


@pytest.mark.parametrize("budget", [0.5, 2.5])
def test_the_budget_loss_moves_p_big_toward_the_budget(toy, budget):
    params, rows = toy
    rparams, rcfg, curve = exp.train_router(params, TOY, rows, budget, steps=30, batch=4, alpha=100.0, lr=0.1,
                                            tau_start=1.0, tau_end=1.0)
    _, _, aux = forward(rparams, rcfg, jnp.asarray(rows[:, :-1]), plan=ExecutionPlan(soft_routes=True),
                        return_aux=True)
    start = 0.5 * TOY.n_layers  # zero-initialised routers: P(big) = 1/2 in every layer
    moved = float(jnp.sum(aux["duo_p_big"]))
    assert abs(moved - budget) < 0.5 * abs(start - budget), (moved, budget)
    assert curve[-1] < curve[0]


def test_router_training_starts_from_zero_even_on_a_model_with_routers(toy):
    """As documented (P(big) = 1/2 at the start), not from the router a model ships with
    (builtin:duo has one): with lr 0 the trained routers are the start."""
    params, rows = toy
    rparams, rcfg = with_random_router(params, TOY, seed=1, scale=2.0)
    out, _, _ = exp.train_router(rparams, rcfg, rows, 1.5, steps=1, batch=2, lr=0.0)
    routers = [out[f"layer_{i}"]["duo"]["router"] for i in range(TOY.n_layers)]
    assert all(float(jnp.max(jnp.abs(leaf))) == 0.0 for leaf in jax.tree.leaves(routers))


def test_router_training_runs_the_soft_router_at_its_temperature(toy):
    """The CE objective at temperature tau is that of the router scaled by 1 / tau. The scaling
    missed the routers (split from the model, they hold no "router" key), so every router was
    trained at tau 1 whatever the annealing said."""
    params, rows = toy
    rparams, rcfg = with_random_router(params, TOY, seed=2, scale=0.5)
    routers, rest = exp.split_router(rparams)
    sharper = jax.tree.map(lambda a: 20.0 * a, routers)
    step, opt = exp._router_step(rcfg, 0.0, 10.0)
    x, y = jnp.asarray(rows[:, :-1]), jnp.asarray(rows[:, 1:])

    def loss(r, tau):
        return float(step(r, opt.init(r), rest, x, y, jnp.float32(tau), jnp.float32(0.5), None)[2])

    at_005, at_1 = loss(routers, 0.05), loss(routers, 1.0)
    assert at_005 != at_1
    np.testing.assert_allclose(at_005, loss(sharper, 1.0), rtol=1e-5)


def test_an_imitating_router_learns_the_routes_it_is_shown(toy):
    params, rows = toy
    target = np.broadcast_to(np.asarray([BIG, SMALL, BIG], np.int32), (rows.shape[0], rows.shape[1] - 1, 3)).copy()
    rparams, rcfg, _ = exp.train_router(params, TOY, rows, 2, steps=40, batch=4, lr=0.1, targets=target)
    big = exp.router_big_layers(rparams, rcfg, rows)
    assert np.mean(big == 2) > 0.9  # two big layers per token, as shown
    _, _, aux = forward(rparams, rcfg, jnp.asarray(rows[:, :-1]), return_aux=True)
    np.testing.assert_allclose(aux["duo_p_big"], [1.0, 0.0, 1.0], atol=0.1)


def test_counting_router_big_layers_without_a_router_is_a_clear_error(toy):
    from jaxaccel.errors import InvalidArgumentError

    params, rows = toy
    with pytest.raises(InvalidArgumentError, match="needs a Duo model with a router"):
        exp.router_big_layers(params, TOY, rows)


def test_oracle_plan_auto_falls_back_instead_of_refusing():
    """--oracle auto at 10 layers with --skip-rows: 2^10 fits, 3^10 does not -> exhaustive
    big/small oracle without the 3^L part (the docs' promise); exhaustive refuses it."""
    assert exp.oracle_plan("auto", 10, skip_rows=2) == (True, False)
    assert exp.oracle_plan("auto", 9, skip_rows=2) == (True, True)
    assert exp.oracle_plan("auto", 9, skip_rows=0) == (True, False)
    assert exp.oracle_plan("auto", 15, skip_rows=2) == (False, False)  # beam
    assert exp.oracle_plan("beam", 4, skip_rows=2) == (False, False)
    with pytest.raises(InvalidArgumentError, match=r"3\^10 = 59,049 patterns exceeds"):
        exp.oracle_plan("exhaustive", 10, skip_rows=2)
    with pytest.raises(InvalidArgumentError, match=r"2\^15"):
        exp.oracle_plan("exhaustive", 15, skip_rows=0)
    with pytest.raises(InvalidArgumentError, match="oracle must be auto, exhaustive or beam"):
        exp.oracle_plan("greedy", 4, skip_rows=0)


def test_bad_input_is_one_line(toy):
    params, rows = toy
    with pytest.raises(InvalidArgumentError, match=r"3\^11 = 177,147 patterns exceeds the limit of 20,000; use the beam"):
        exp.all_patterns(11, with_skip=True)
    assert exp.all_patterns(9, with_skip=True).shape == (19683, 9)
    for budget in (-1, 4):
        with pytest.raises(InvalidArgumentError, match=rf"budget must be in \[0, 3\] big layers, got {budget}"):
            exp.train_router(params, TOY, rows, budget, steps=1)
    with pytest.raises(InvalidArgumentError, match="plan.soft_routes needs a Duo-LLM model with a router"):
        forward(params, TOY, jnp.asarray(rows[:, :-1]), plan=ExecutionPlan(soft_routes=True))
    dense = replace(TOY, duo=DuoConfig())
    with pytest.raises(InvalidArgumentError, match="a router needs a Duo-LLM model"):
        init_router(init_params(dense, jax.random.key(0), "unrolled"), dense)


def test_the_experiment_cli_rejects_bad_input_before_loading(capsys, tmp_path):
    from jaxaccel.experiments.__main__ import main
    from jaxaccel.cli import run_cli

    cases = [(["duo", "--model", str(tmp_path / "none")], "does not exist (train it: python -m jaxaccel.train "
                                                            "configs/duo.yaml)"),
             (["duo", "--router-budgets", "1,x"], "--router-budgets '1,x': expected a comma-separated list of integers"),
             (["duo", "--eval-rows", "1"], "--eval-rows must be >= 2")]
    # an output folder holding a sweep's results: this experiment would rewrite the file when it ends
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "results.json").write_text('{"format": "jaxaccel-sweep-results", "runs": []}')
    for command in ("duo", "skipdecode"):
        cases.append(([command, "--out", str(tmp_path / "sweep")],
                      f"results.json is not a {command} experiment's results file; choose another --out folder"))
    from jaxaccel.experiments.__main__ import _check_results_owner

    docs = Path(__file__).resolve().parents[1] / "docs"
    for command in ("duo", "skipdecode"):  # the committed runs, written before the files named their experiment
        assert (docs / command / "results.json").is_file()
        _check_results_owner(docs / command / "results.json", command)
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_:
            run_cli(main, argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@functools.partial(jax.jit, static_argnums=1)
def _uncached_logits(params, cfg, tokens, routes):
    return forward(params, cfg, tokens, plan=None if routes is None else ExecutionPlan(routes=routes))[0]


def uncached_greedy(params, cfg, prompt, n, routes=None):
    """Greedy tokens by the full uncached forward at every step (the router's own routes, or
    `routes` for every token), over one padded width: causal, so the right padding never
    changes the logits read, and one compiled program serves every step."""
    seq, width = list(prompt), len(prompt) + n
    for _ in range(n):
        logits = _uncached_logits(params, cfg, jnp.asarray([seq + [0] * (width - len(seq))]), routes)
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt):]


def test_a_model_with_routers_saves_loads_fuses_and_decodes_with_its_routes(toy, tmp_path):
    import jaxaccel

    params, rows = toy
    rparams, rcfg = with_random_router(params, TOY, seed=3, scale=2.0)
    lm = jaxaccel.from_params(rcfg, rparams, eos_token_ids=())
    back = jaxaccel.load(lm.save(tmp_path / "m"))
    assert back.config.duo.router
    prompts = [rows[0, :5].tolist(), rows[1, :3].tolist()]
    out = back.generate(prompts, max_new_tokens=6)
    # greedy with the router's hard routes == recomputing the uncached forward (router routes) each step
    for prompt, got in zip(prompts, out.tokens):
        assert got == uncached_greedy(rparams, rcfg, prompt, 6)
    # a fixed mixed pattern (static: each layer traces only its FFN; skip adds nothing) == the
    # uncached forward under the same routes as an array, recomputed each step
    for routes, as_array in (("BS-", [BIG, SMALL, 2]), ([1, 0, 1], [SMALL, BIG, SMALL])):
        fixed = back.generate(prompts, max_new_tokens=5, routes=routes)
        for prompt, got in zip(prompts, fixed.tokens):
            assert got == uncached_greedy(rparams, rcfg, prompt, 5, jnp.asarray(as_array)), routes
    # "_" is skip too (a command-line pattern may start with it); numpy and jax arrays are patterns
    for same in ("_SB", "-sb", np.asarray([2, 1, 0]), jnp.asarray([2, 1, 0])):
        assert back.generate(prompts, max_new_tokens=3, routes=same).tokens == \
            back.generate(prompts, max_new_tokens=3, routes="-SB").tokens, same
    for bad, message in (("BB", r"one of B/S/- \(or _ for skip\) per layer \(3 letters\), got 'BB'"),
                         ([0, 1, 5], r"3 integers in 0 \(big\), 1 \(small\), 2 \(skip\)"),
                         ([0.5, 1, 1], "3 integers"), (7, "3 integers"),
                         (np.zeros((2, 3), np.int32), r"got an array of shape \[2, 3\] and dtype int32$")):
        with pytest.raises(InvalidArgumentError, match=message) as err:
            back.generate(prompts, max_new_tokens=2, routes=bad)
        assert "\n" not in str(err.value)


def test_a_static_route_tuple_works_under_jit(toy):
    """An ExecutionPlan is a pytree: under jit a tuple of ints arrives as tracers, which the
    value check must leave alone (it raised TracerArrayConversionError)."""
    params, rows = toy
    x = jnp.asarray(rows[:2, :-1])
    jitted = jax.jit(lambda p, r: forward(p, TOY, x, plan=ExecutionPlan(routes=r))[0])
    got = jitted(params, (SMALL, 2, BIG))
    want, _ = forward(params, TOY, x, plan=ExecutionPlan(routes=jnp.asarray([SMALL, 2, BIG])))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_the_benchmark_counts_the_routers_big_layers_over_every_prompt_it_times(toy, monkeypatch):
    """`bench duo`'s router row: big layers per token over all the prompts timed (it counted
    the first batch only: batch 1 described one prompt), so batch sizes agree."""
    import jaxaccel
    from jaxaccel.bench import duo as bench_duo

    params, rows = toy
    rparams, rcfg = with_random_router(params, TOY, seed=5, scale=3.0)
    lm = jaxaccel.from_params(rcfg, rparams, eos_token_ids=(1,))
    prompts = [rows[i, :5].tolist() for i in range(4)]
    monkeypatch.setattr(jaxaccel, "load", lambda model: lm)
    monkeypatch.setattr(bench_duo, "heldout_prompts", lambda lm, files, n: prompts)
    result = bench_duo.run("toy", [1, 4], new_tokens=4, runs=1, files=4, prompt_tokens=5)
    assert lm.eos_token_ids == ()  # every row decodes all its tokens: an EOS would leave a slot idle but timed
    router = {r["batch"]: r["big_layers"] for r in result["rows"] if r["routes"] == "router"}
    whole = lm.generate(prompts, max_new_tokens=4)
    expect = bench_duo.big_layers(lm, whole.prompt_ids, whole.tokens, None)
    first = lm.generate(prompts[:1], max_new_tokens=4)
    assert bench_duo.big_layers(lm, first.prompt_ids, first.tokens, None) != pytest.approx(expect)  # it matters
    assert router[1] == pytest.approx(expect) and router[4] == pytest.approx(expect)


def test_calibration_puts_a_hard_router_on_its_budget(toy):
    params, rows = toy
    rparams, rcfg = with_random_router(params, TOY, seed=5)
    for budget in (0.75, 2.0):
        calibrated, delta = exp.calibrate_router(rparams, rcfg, rows, budget)
        realized = float(np.mean(exp.router_big_layers(calibrated, rcfg, rows)))
        assert abs(realized - budget) < 0.15, (budget, realized, delta)


def test_skipdecode_keeps_the_routes_of_the_call(toy):
    """A method with its own plan (SkipDecode's layers) decodes under the call's routes too:
    the full-depth schedule with a fixed pattern == autoregressive with that pattern."""
    import jaxaccel

    params, rows = toy
    lm = jaxaccel.from_params(TOY, params, eos_token_ids=())
    prompts = [rows[0, :4].tolist(), rows[2, :6].tolist()]
    plain = lm.generate(prompts, max_new_tokens=6, routes="S-B")
    skip = lm.generate(prompts, max_new_tokens=6, routes="S-B", method="skipdecode", min_layers=3, max_layers=3,
                       max_length=16)
    assert skip.tokens == plain.tokens
    assert plain.tokens != lm.generate(prompts, max_new_tokens=6).tokens  # the routes change the output


def test_the_duo_benchmark_rejects_bad_input_in_one_line(capsys, tmp_path):
    from jaxaccel.bench.__main__ import main
    from jaxaccel.cli import run_cli

    for argv, message in ((["duo", "--runs", "0"], "batches, runs, files, new tokens and prompt tokens must be >= 1"),
                          (["duo", "--model", str(tmp_path / "none")], "does not exist")):
        with pytest.raises(SystemExit) as exit_:
            run_cli(main, argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_experiment_runs_end_to_end_at_toy_size(tmp_path, capsys):
    """`python -m jaxaccel.experiments duo` on a 3-layer Duo model trained for 2 steps on a toy
    corpus: the exhaustive run (with the 3^L part and a saved router that loads and decodes)
    and the beam run both write their results, Markdown and plots."""
    import json

    import yaml

    import jaxaccel
    from jaxaccel.config import from_dict
    from jaxaccel.cli import run_cli
    from jaxaccel.experiments.__main__ import main as experiments_main
    from jaxaccel.train.config import RunConfig
    from jaxaccel.train.loop import train

    from conftest import toy_corpus

    corpus = toy_corpus(tmp_path / "corpus")
    model = {"vocab_size": 400, "d_model": 32, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 64,
             "max_seq_len": 64, "duo": {"enabled": True, "small_ratio": 4, "p_big": 0.5}}
    data = {"corpus": str(corpus / "*.py"), "vocab_size": 400, "num_sentinels": 8, "validation_fraction": 0.25,
            "cache_dir": str(tmp_path / "cache")}
    config = {"model": model, "data": data, "optim": {"lr": 1e-2, "warmup_steps": 1}, "tensorboard": False,
              "checkpoint": {"every_steps": 2, "keep": 1}, "mesh": {"data": 1}, "output_dir": str(tmp_path / "duo"),
              "train": {"steps": 2, "batch_size": 4, "seq_len": 32, "eval_every": 0, "eval_batches": 2,
                        "log_every": 1, "peak_flops": 1e11, "progress": False}}
    train(from_dict(RunConfig, config))
    (tmp_path / "duo.yaml").write_text(yaml.safe_dump(config))
    common = ["duo", "--model", str(tmp_path / "duo"), "--config", str(tmp_path / "duo.yaml"), "--eval-rows", "4",
              "--seq-len", "16", "--router-budgets", "1", "--router-steps", "2", "--random-draws", "2",
              "--batch", "4"]
    # --skip-rows 5 asks more windows than the test half's 2: the results say how many were scored
    for mode, extra in (("exhaustive", ["--skip-rows", "5", "--save-router", str(tmp_path / "router")]),
                        ("beam", ["--oracle", "beam", "--beam-width", "2"])):
        out = tmp_path / mode
        assert run_cli(experiments_main, [*common, *extra, "--out", str(out)]) == 0, capsys.readouterr().err
        res = json.loads((out / "results.json").read_text())
        assert res["oracle_mode"] == mode and res["budgets"] == [0, 1, 2, 3]
        assert all(np.isfinite(v) for v in res["curves"]["oracle"]) and len(res["routers"]) == 2
        # exactly 3 of 3 big is all big; "at most b big" only gets better with b, and no fixed pattern
        # beats the per-token oracle at its budget
        curves = res["curves"]
        assert curves["oracle_exact"][3] == pytest.approx(res["all_big"])
        assert all(a >= b - 1e-6 for a, b in zip(curves["oracle"], curves["oracle"][1:]))
        assert all(o <= f + 1e-6 for o, f in zip(curves["oracle"], curves["fixed"]))
        # the oracle's routes run together: at b = 0 there is one pattern (all small), so no
        # context changes; past it, a figure for every budget, in results.md too
        assert len(curves["oracle_run"]) == 4 and curves["oracle_run"][0] == pytest.approx(res["all_small"], rel=1e-5)
        assert all(np.isfinite(curves["oracle_run"]))
        assert "per-token routes, run" in (out / "results.md").read_text()
        assert (res["with_skip"] is not None) == (mode == "exhaustive")
        if res["with_skip"] is not None:
            assert res["with_skip"]["rows"] == 2 and res["with_skip"]["tokens"] == 2 * 16
        assert (out / "results.md").read_text().strip() and list(out.glob("*.png"))
    routed = jaxaccel.load(str(tmp_path / "router"))
    assert routed.config.duo.router and routed.generate([[5, 6, 7]], max_new_tokens=3).stats["new_tokens"] == 3
    # a --config whose vocabulary is not the model's: its held-out text would be scored as
    # another vocabulary's ids (every figure meaningless, exit 0)
    (tmp_path / "other.yaml").write_text(yaml.safe_dump({**config, "data": {**data, "vocab_size": 380}}))
    other = [str(tmp_path / "other.yaml") if a == str(tmp_path / "duo.yaml") else a for a in common]
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:  # (run_cli: one `error:` line, exit 2)
        run_cli(experiments_main, [*other, "--out", str(tmp_path / "mismatch")])
    err = capsys.readouterr().err
    assert refused.value.code == 2
    assert "the data config's vocabulary (380 pieces) is not the model's (400 pieces)" in err and err.count("\n") == 1
