"""gcp/ and colab/ are shipped, so they are tested: the pod launcher's dry run, and the
notebook's code cells (minus shell lines) executed top to bottom."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_tpu_pod_dry_run_creates_runs_everywhere_and_deletes():
    proc = subprocess.run([sys.executable, str(ROOT / "gcp" / "tpu_pod.py"), "all", "--name", "pod", "--zone",
                           "us-central2-b", "--accelerator-type", "v4-32", "--command", "python -m jaxaccel.decode",
                           "--dry-run"], capture_output=True, text=True, check=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert "tpu-vm create pod" in lines[0] and "--accelerator-type=v4-32" in lines[0]
    assert lines[1].startswith("+ git -C") and "archive" in lines[1]
    assert all("--worker=all" in line for line in lines[2:5])
    assert "cd ~/jaxaccel && python -m jaxaccel.decode" in lines[4]
    assert "tpu-vm delete pod" in lines[-1] and "--quiet" in lines[-1]
    keep = subprocess.run([sys.executable, str(ROOT / "gcp" / "tpu_pod.py"), "all", "--name", "pod", "--zone", "z",
                           "--keep", "--dry-run"], capture_output=True, text=True, check=True)
    assert "delete" not in keep.stdout


def run_notebook(name: str) -> dict:
    nb = json.loads((ROOT / "colab" / name).read_text())
    namespace: dict = {}
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        code = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("!", "%")))
        exec(compile(code, name, "exec"), namespace)
    return namespace


def test_colab_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_notebook("quickstart.ipynb")
    assert namespace["result"].stats["new_tokens"] > 0
    assert namespace["reloaded_tokens"] == namespace["result"].tokens


@pytest.mark.slow
def test_speculative_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_notebook("speculative.ipynb")  # asserts losslessness itself
    assert set(namespace["results"]) == set(namespace["runs"])
    assert namespace["results"]["dyspec, budget 16"]["mean_accepted"] > 1.5


@pytest.mark.slow
def test_skipdecode_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_notebook("skipdecode.ipynb")  # asserts the full schedule is exact itself
    assert namespace["skip"].stats["mean_layers_per_step"] < namespace["lm"].config.n_layers
    assert namespace["agreement"] > 0.2


@pytest.mark.slow
def test_duo_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_notebook("duo.ipynb")  # asserts all-big routes == the dense big model itself
    oracle, fixed = namespace["oracle"], namespace["fixed"]
    assert oracle[1] < fixed[1] and oracle[-1] <= namespace["all_big"] + 1e-6  # per-token choice beats one pattern


@pytest.mark.slow
def test_long_context_notebook_runs(tmp_path, monkeypatch):
    """With the shipped builtin:longctx (trained at 256 tokens), TokenSelect finds the passkeys
    at 16x the trained length and full attention loses them (the notebook also asserts that
    TokenSelect is full attention when everything fits)."""
    monkeypatch.chdir(tmp_path)
    namespace = run_notebook("long_context.ipynb")
    accuracy, lengths = namespace["accuracy"], namespace["LENGTHS"]
    assert lengths[-1] == 16 * namespace["TRAINED"] == 4096
    assert accuracy["TokenSelect"][-1] >= 0.75 and accuracy["full attention"][-1] <= 0.25
    assert accuracy["full attention"][0] >= 0.75  # at the trained length the model itself retrieves
