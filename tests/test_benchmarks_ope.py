"""benchmarks/ope_validation.py end to end at a tiny size, and its rank correlation."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nar4rec.config import RunConfig, load_overrides
from nar4rec.runs import train_run
from nar4rec.sim.presets import preset_config
from nar4rec.sim.simulate import simulate

REPO = Path(__file__).resolve().parents[1]
SMALL_WORLD = ["n_users=500", "n_items=2000"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def validation():
    spec = importlib.util.spec_from_file_location("ope_validation",
                                                  REPO / "benchmarks" / "ope_validation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rank_correlation_handles_ties_and_constants(validation):
    assert validation.spearman(np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0, 30.0])) == 1.0
    assert validation.spearman(np.array([3.0, 2.0, 1.0]), np.array([1.0, 2.0, 3.0])) == -1.0
    assert math.isnan(validation.spearman(np.zeros(4), np.arange(4.0)))   # says nothing
    tied = validation.spearman(np.array([1.0, 1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0]))
    assert 0.9 < tied < 1.0


def test_the_validation_runs_end_to_end(tmp_path):
    """Two runs trained on a small world, fresh logs of the same world cut into two parts:
    every estimator summarised against the truth, the exploration cost, the plot."""
    config = load_overrides(preset_config("kuaishou"), None, SMALL_WORLD)
    simulate(config, 3000, 0, tmp_path / "data", progress=False)
    runs = tmp_path / "runs"
    for model in ("dnn", "edge_rerank"):
        train_run(tmp_path / "data", runs / model, model=model, progress=False,
                  config=load_overrides(RunConfig(), None, ["train.epochs=1"]))
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "ope_validation.py"), "--preset", "kuaishou",
         "--runs", str(runs), "--requests", "6000", "--temperatures", "1.0", "--chunks", "2",
         "--samples", "64", "--explore", "0.1", "--reward-model", "dnn",
         "--out", str(tmp_path / "ope"), "--plot", str(tmp_path / "ope.png"),
         *[a for s in SMALL_WORLD for a in ("--sim-set", s)]],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "ope" / "kuaishou-seed0.json").read_text())["t1"]
    assert {(r["part"], r["run"]) for r in result["records"]} == {
        (p, r) for p in (0, 1) for r in ("dnn", "edge_rerank")}
    summary = result["summary"]
    assert {"dm", "iips", "pbm", "rips"} <= set(summary)
    for name, figures in summary.items():
        assert 0 <= figures["coverage"] <= 1 and figures["rmse"] >= abs(figures["bias"]), name
    # The truth the estimates are compared with is the same for every estimator.
    truths = {(r["part"], r["run"], r["truth"]) for r in result["records"]}
    assert len(truths) == 4
    assert len(result["logging"]) == 2
    for costs in result["exploration"].values():
        assert set(costs) == {"model", "0.1"}
    assert (tmp_path / "ope.png").stat().st_size > 1000
    assert "| pbm |" in done.stdout
