"""benchmarks/learning_curves.py end to end at a tiny size, and its interval."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nar4rec import metrics

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def learning_curves():
    spec = importlib.util.spec_from_file_location(
        "learning_curves", REPO / "benchmarks" / "learning_curves.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module             # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_one_seed_interval_is_the_captured_lift(learning_curves):
    rng = np.random.default_rng(0)
    logging = rng.normal(10, 1, 500)
    oracle = logging + rng.uniform(2, 4, 500)
    method = logging + rng.normal(1, 1, 500)
    stats = learning_curves.ratio_interval((method - logging)[None], oracle - logging)
    assert stats["value"] == pytest.approx(metrics.captured_lift(method, logging, oracle))
    low, high = stats["ci95"]
    assert low < stats["value"] < high and high - low < 0.2


def test_curves_end_to_end_and_resumed(learning_curves, tmp_path, capsys):
    argv = ["--preset", "kuaishou", "--sizes", "1000,2000", "--models", "nar4rec,dnn",
            "--list-aware", str(REPO / "configs" / "list-aware.toml"), "--out", str(tmp_path),
            "--set", "train.epochs=1", "--set", "evaluator_train.epochs=1",
            "--set", "generator.evaluator_lists=4"]
    assert learning_curves.main(argv) == 0
    result = json.loads((tmp_path / "kuaishou" / "curves.json").read_text())
    assert [p["train_requests"] for p in result["points"]] == [800, 1600]
    for point in result["points"]:
        assert point["best_baseline"] == "dnn"
        assert set(point["models"]) == {"nar4rec", "dnn", "nar4rec_list_aware"}
        for entry in point["models"].values():
            low, high = entry["captured_lift"]["ci95"]
            assert low <= entry["captured_lift"]["value"] <= high
            assert entry["seeds"][0]["train"]["seconds"] >= 0
        assert point["models"]["dnn"]["against_best_baseline"]["value"] == 0
    aware = json.loads((tmp_path / "kuaishou" / "n1000" / "seed0" / "nar4rec_list_aware"
                        / "run.json").read_text())
    assert aware["config"]["evaluator"]["causal"] and aware["config"]["train"]["epochs"] == 1
    assert (tmp_path / "kuaishou" / "curves.png").stat().st_size > 0
    assert "against the best baseline" in capsys.readouterr().out

    started = time.perf_counter()               # everything is reused the second time
    assert learning_curves.main(argv) == 0
    assert time.perf_counter() - started < 15
    again = json.loads((tmp_path / "kuaishou" / "curves.json").read_text())
    assert again["points"][0]["models"] == result["points"][0]["models"]
