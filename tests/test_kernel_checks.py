"""The kernels' self-checks (`pallas_kernels.checks`) and `python -m jaxaccel.bench kernels`,
the command to run first on a TPU or GPU: here in the Pallas interpreter."""
import inspect
import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxaccel.bench import kernels
from jaxaccel.bench.__main__ import main as bench_main
from jaxaccel.cli import run_cli
from jaxaccel.pallas_kernels import checks


def run(argv, capsys):
    try:
        code = run_cli(bench_main, argv)
    except SystemExit as e:  # argument errors: exit 2 with one line
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_bench_kernels_checks_every_kernel_in_the_interpreter(capsys, tmp_path):
    code, out, err = run(["kernels", "--quick", "--json", str(tmp_path / "k.json")], capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "k.json").read_text())
    assert doc["interpreted"] and doc["backend"] == "cpu" and doc["failed"] == 0
    assert [r["kernel"] for r in doc["cases"]] == ["tree_attention", "score_keys", "sparse_attention"]
    for row in doc["cases"]:
        assert row["ok"] and 0 <= row["max_abs_error"] <= row["allowed"] < 1e-3
        assert row["kernel_ms"] is None and row["speedup"] is None  # the interpreter is no speed figure
    assert "Pallas interpreter" in out and "| score_keys | float32 |" in out


def test_bench_kernels_exits_1_when_a_kernel_disagrees(capsys, tmp_path, monkeypatch):
    from jaxaccel.pallas_kernels import token_select as ts

    real = ts.sparse_attention_kernel
    monkeypatch.setattr(ts, "sparse_attention_kernel", lambda *a, **k: real(*a, **k) + 0.01)
    code, out, err = run(["kernels", "--quick", "--json", str(tmp_path / "k.json")], capsys)
    assert code == 1
    assert err.strip().splitlines()[-1] == "error: 1 of 3 kernel cases failed (see the table)"
    bad = [r for r in json.loads((tmp_path / "k.json").read_text())["cases"] if not r["ok"]]
    assert [r["kernel"] for r in bad] == ["sparse_attention"]
    assert abs(bad[0]["max_abs_error"] - 0.01) < 1e-3 and "differs from the reference by 0.01" in bad[0]["problem"]
    assert "**no**: the kernel differs" in out
    code, _, err = run(["kernels", "--runs", "0"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--runs must be >= 1" in err


def test_accelerator_grids_build_valid_cases(monkeypatch):
    """The GPU/TPU grids cannot run here: each case's arguments are bound against its builder's
    signature and its sizes checked against the backend's block / head_dim rules instead (a
    mistake would otherwise surface only on the device, where time is short)."""
    from jaxaccel.decode.tuning import kernel_constraints
    from jaxaccel.pallas_kernels import token_select as ts
    from jaxaccel.pallas_kernels.tree_attention import default_block_k as tree_block

    built = []
    for name in ("tree_attention_case", "score_keys_case", "sparse_attention_case", "splash_attention_case"):
        real = getattr(checks, name)

        def record(real=real, name=name, **kwargs):
            inspect.signature(real).bind(**kwargs)
            built.append((name, kwargs))

        monkeypatch.setattr(checks, name, record)
    for backend, quick, want in (("gpu", False, 22), ("gpu", True, 6), ("tpu", False, 28), ("tpu", True, 8)):
        built.clear()
        for build in kernels._accelerator_cases(backend, quick):
            build()
        assert len(built) == want, (backend, quick)
        assert {kwargs["dtype"] for _, kwargs in built} == {"bfloat16", "float32"}
        assert ("splash_attention_case" in {name for name, _ in built}) == (backend == "tpu")
        for name, kw in built:
            if name == "tree_attention_case":
                assert kernel_constraints(kw["head_dim"], tree_block(kw["cache_len"]), backend) is None
            elif name == "score_keys_case":
                ts._check_block("block_k", ts.default_block_k(kw["cache_len"], backend), backend, kw["head_dim"], 16)
            elif name == "sparse_attention_case":
                ts._check_block("block_k", ts.default_block_k(kw["selected"], backend), backend, kw["head_dim"], 32)
                assert kw["batch"] > 1  # a short row is part of every sparse case


def test_bfloat16_checks_pass_the_kernels_and_catch_a_small_bug():
    """At bfloat16 the check accepts the real kernels and still rejects one that forgets the
    query's own key, or a scorer that ignores the candidate mask (differences of a few
    percent of the output: the tolerance scales with the output, not with 1)."""
    from jaxaccel.pallas_kernels import token_select as ts

    small = dict(heads=4, kv_heads=2, head_dim=32, interpret=True, dtype="bfloat16")
    tree = checks.tree_attention_case(nodes=9, cache_len=96, block_k=32, **small)
    score = checks.score_keys_case(cache_len=96, block_k=32, **small)
    sparse = checks.sparse_attention_case(cache_len=96, selected=24, block_k=8, **small)
    for case in (tree, score, sparse):
        assert checks.compare(case).problem is None, case.kernel_name
    no_own_key = sparse._replace(kernel=lambda *a: ts.sparse_attention_kernel(*a[:6], block_k=8, interpret=True))
    assert "differs from the reference" in checks.compare(no_own_key).problem
    no_mask = score._replace(kernel=lambda q, k, lengths, mask: ts.score_keys_kernel(q, k, lengths, block_k=32,
                                                                                      interpret=True))
    assert "differs from the reference" in checks.compare(no_mask).problem


def test_compare_reports_failures_in_one_line():
    ok = checks.KernelCase("k", {}, "float32", lambda x: x + 1e-6, lambda x: x, (2 * jnp.ones(3),), (1e-5, 1e-4))
    result = checks.compare(ok)
    assert result.problem is None and abs(result.error - 1e-6) < 1e-7 and abs(result.allowed - 2.1e-4) < 1e-9
    assert "allowed 0.00021" in checks.compare(ok._replace(kernel=lambda x: x + 1e-3)).problem
    nan = ok._replace(kernel=lambda x: x * jnp.nan)
    assert "differs from the reference by nan" in checks.compare(nan).problem
    shape = ok._replace(kernel=lambda x: x[:2])
    assert checks.compare(shape) == checks.Comparison(None, "the kernel returned shape (2,), the reference (3,)")

    def broken(x):
        raise NotImplementedError("vector gather\nmore")

    assert checks.compare(ok._replace(kernel=broken)).problem == \
        "the kernel failed to compile or run (NotImplementedError: vector gather)"
    assert checks.compare(ok._replace(reference=broken)).problem == \
        "the reference failed (NotImplementedError: vector gather)"


def test_random_tree_masks_are_ancestor_masks():
    rng = np.random.default_rng(0)
    for n in (1, 2, 9, 33):
        mask = checks.random_tree_mask(rng, n)
        assert mask.diagonal().all() and not np.triu(mask, 1).any()  # self, and only earlier nodes
        for i in range(n):  # an ancestor's ancestors are ancestors
            for a in np.flatnonzero(mask[i]):
                assert (mask[i] | ~mask[a]).all()
        assert (mask.sum(1)[1:] >= 2).all()  # every node but the root has its parent


def test_public_ops_by_default_use_the_reference_where_the_gpu_kernel_cannot_take_the_sizes(monkeypatch):
    """use_kernel=None on GPU picked the Triton kernel whatever the sizes: head_dim 96 (a real
    model size) or a 24-slot cache raised instead of running the reference, as on CPU."""
    import jax

    from jaxaccel.pallas_kernels import token_select as ts
    from jaxaccel.pallas_kernels.tree_attention import tree_attention, tree_attention_reference

    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    b, t, h, kvh = 1, 3, 4, 2
    cases = []
    for d, s in ((96, 256), (64, 24)):
        args = (normal(b, t, h, d), normal(b, t, kvh, d), normal(b, t, kvh, d), jnp.tril(jnp.ones((1, t, t), bool)),
                normal(b, kvh, s, d), normal(b, kvh, s, d), jnp.asarray([s - 3], jnp.int32))
        cases.append((args, tree_attention_reference(*args)))
    q, k, v = normal(b, h, 96), normal(b, kvh, 256, 96), normal(b, kvh, 256, 96)
    lengths, indices = jnp.asarray([200]), jnp.asarray([np.arange(0, 64, 2)], jnp.int32)
    valid = jnp.ones(indices.shape, bool)
    scores = ts.score_keys_reference(q, k, lengths)
    attended = ts.sparse_attention_reference(q, k, v, indices, valid, lengths)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    for args, want in cases:
        np.testing.assert_array_equal(tree_attention(*args), want)
    np.testing.assert_array_equal(ts.score_keys(q, k, lengths), scores)
    np.testing.assert_array_equal(ts.sparse_attention(q, k, v, indices, valid, lengths), attended)
    with pytest.raises(Exception, match="head_dim=96 must be a power of two"):  # a forced kernel still says why
        tree_attention(*cases[0][0], use_kernel=True)
