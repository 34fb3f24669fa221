"""colab/token_crisis.ipynb runs top to bottom (code cells minus shell lines, as in
test_launchers): its 3-point repetition sweep (1, 4 and 16 epochs over the same training
tokens) trains, the results file it loads holds three finished runs with finite losses, the
plot shows them, and the scaling-law prediction covers the same points.

Only structure is checked. Whether 16 epochs come out worse than 1 at this toy size is what
the notebook shows, not something a test of a 128-step run can promise."""
import math

import pytest

from test_launchers import run_notebook


@pytest.mark.slow
def test_token_crisis_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = run_notebook("token_crisis.ipynb")
    total, epochs = ns["TOTAL_TOKENS"], ns["EPOCHS"]
    assert epochs == [1, 4, 16]

    results = ns["results"]
    assert results["sweep"] == ns["sweep"]["name"]
    runs = results["runs"]
    assert len(runs) == 3
    assert sorted(r["settings"]["data.epochs"] for r in runs) == epochs
    steps = {r["steps"] for r in runs}
    assert len(steps) == 1 and steps.pop() > 0  # the same budget: the same number of steps
    for r in runs:
        e = r["settings"]["data.epochs"]
        assert r["status"] == "done", r.get("error")
        assert r["settings"]["data.unique_tokens"] == total // e
        assert r["unique_tokens"] == total // e and r["total_tokens"] == total
        assert (tmp_path / r["folder"] / "sweep_result.json").is_file()
        for figure in (r["final"]["eval_loss"], r["best"]["eval_loss"], r["final"]["train_loss"]):
            assert figure is not None and math.isfinite(figure)
        assert r["curve"]["eval_step"] and all(math.isfinite(v) for v in r["curve"]["eval_loss"])

    final_losses = ns["final_losses"]
    assert sorted(final_losses) == epochs
    by_epochs = {r["settings"]["data.epochs"]: r for r in runs}
    assert all(final_losses[e] == by_epochs[e]["final"]["eval_loss"] for e in epochs)

    # The plot: final validation loss against epochs, and one curve per run.
    ax_final, ax_curves = ns["fig"].axes[:2]
    (line,) = ax_final.lines
    assert list(line.get_xdata()) == epochs
    assert list(line.get_ydata()) == [final_losses[e] for e in epochs]
    assert len(ax_curves.lines) == 3

    # Muennighoff et al.: the law's own ordering is deterministic (less effective data, more loss).
    predictions = ns["predictions"]
    assert sorted(predictions) == epochs and all(math.isfinite(v) for v in predictions.values())
    assert predictions[1] < predictions[4] < predictions[16]
