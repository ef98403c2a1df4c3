"""benchmarks/pareto.py: its fronts, and a tiny run end to end."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import simulate_small

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def load_pareto():
    spec = importlib.util.spec_from_file_location("pareto", REPO / "benchmarks" / "pareto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_front_keeps_the_sizes_no_faster_size_beats():
    rows = [{"model": "a", "d": 16, "latency_ms_p50": 1.0, "captured_lift": 0.50},
            {"model": "a", "d": 32, "latency_ms_p50": 2.0, "captured_lift": 0.45},   # dominated
            {"model": "a", "d": 64, "latency_ms_p50": 3.0, "captured_lift": 0.55},
            {"model": "b", "d": 16, "latency_ms_p50": 0.5, "captured_lift": 0.40}]
    assert load_pareto().fronts(rows) == {"a": ["d16", "d64"], "b": ["d16"]}


def test_a_tiny_run_trains_scores_and_times_every_size(tmp_path):
    simulate_small(tmp_path / "data", requests=1500, n_candidates=12, list_length=4)
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "pareto.py"), "--data",
         str(tmp_path / "data"), "--models", "dnn", "--sizes", "8,16", "--latency-requests",
         "20", "--out", str(tmp_path / "pareto"), "--plot", str(tmp_path / "pareto.png")],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "pareto" / "pareto.json").read_text())
    assert [(r["model"], r["d"]) for r in rows] == [("dnn", 8), ("dnn", 16)]
    for row in rows:
        assert 0 < row["latency_ms_p50"] <= row["latency_ms_p99"] and row["batch_s"] > 0
    settings = json.loads((tmp_path / "pareto" / "dnn-d8" / "run.json").read_text())
    assert settings["config"]["dnn"]["d_model"] == 8                     # the size it says
    assert (tmp_path / "pareto.png").stat().st_size > 1000
