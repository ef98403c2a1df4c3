"""benchmarks/hyperparameters.py end to end at a tiny size: every panel, reuse, the figures."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location(
        "hyperparameters", REPO / "benchmarks" / "hyperparameters.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module             # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_list_scores_rank_placed_candidates_and_ignore_no_item(script):
    lists = torch.tensor([[2, 0, -1]])
    assert script.list_scores(lists, 4).tolist() == [[2.0, 0.0, 3.0, 0.0]]


def test_hyperparameters_runs_every_panel_and_reuses_its_runs(script, tmp_path, capsys):
    out = tmp_path / "hp"
    argv = ["--preset", "kuaishou", "--requests", "600", "--seeds", "0", "--out", str(out),
            "--lrs", "1e-3", "--batch-sizes", "256", "--epochs", "1", "--omegas", "0.01,0.1",
            "--rhos", "0.5", "--alphas", "0,0.6", "--ks", "2,0",
            "--set", "train.epochs=1", "--set", "evaluator_train.epochs=1",
            "--set", "train.steps_per_epoch=2", "--set", "evaluator_train.steps_per_epoch=2"]
    script.main(argv)
    result = json.loads((out / script.RESULTS_FILE).read_text())
    runs = sorted(p.name for p in (out / "kuaishou-0").iterdir() if p.name != "data")
    assert runs == ["nar4rec-default", "nar4rec-omega=0.1", "pier-default"]
    points = result["points"]
    assert {p["parameter"] for p in points} == {"lr", "batch", "epochs", "omega", "rho", "alpha"}
    assert len([p for p in points if p["parameter"] == "alpha"]) == 4
    alpha_zero = {p["line"]: p["captured_lift"] for p in points
                  if p["parameter"] == "alpha" and p["value"] == 0}
    assert len(set(alpha_zero.values())) == 1          # alpha 0 is greedy whatever k
    assert all(p["offline"] == p["offline"] for p in points)   # no nan
    assert (out / "fig3.png").stat().st_size > 0 and (out / "fig4.png").stat().st_size > 0
    assert "### Fig. 4: alpha" in capsys.readouterr().out

    stamp = (out / "kuaishou-0" / "pier-default" / "run.json").stat().st_mtime_ns
    script.main(argv)                                  # everything reused
    assert (out / "kuaishou-0" / "pier-default" / "run.json").stat().st_mtime_ns == stamp
    assert json.loads((out / script.RESULTS_FILE).read_text())["points"] == points
    with pytest.raises(SystemExit, match="other settings"):
        script.main([*argv, "--set", "generator.rho=0.4"])
