"""Reference rows in every evaluation: the logged lists and the upstream order beside the
model, and a verdict in words on whether the model beats them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import simulate_small
from nar4rec.cli import main
from nar4rec.config import RunConfig, load_overrides
from nar4rec.evaluation import LOGGED, UPSTREAM, evaluate_run, verdicts
from nar4rec.report import format_evaluation, write_report
from nar4rec.runs import train_run
from nar4rec.sim.world import TRUTH_DIR

pytestmark = pytest.mark.usefixtures("one_thread")
M = 5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A world whose ranking stage sees the truth without noise: its top m is hard to beat."""
    out = tmp_path_factory.mktemp("sharp") / "data"
    simulate_small(out, requests=2000, n_candidates=20, list_length=M, upstream_noise=0.0)
    return out


@pytest.fixture(scope="module")
def barely_trained(data, tmp_path_factory):
    """DNN after a handful of steps: the user of the issue, whose model trails the upstream
    order without anything saying so."""
    out = tmp_path_factory.mktemp("runs") / "dnn"
    config = load_overrides(RunConfig(), None, ["train.epochs=1", "train.steps_per_epoch=3",
                                                "dnn.d_model=16"])
    train_run(data, out, model="dnn", config=config, progress=False)
    return out


def test_verdicts_say_better_worse_or_level():
    rng = np.random.default_rng(0)
    base = rng.normal(size=2000)
    for shift, expected in ((0.5, "better"), (-0.5, "worse"), (0.0, "level")):
        model = base + shift + 0.01 * rng.normal(size=2000) if shift else base.copy()
        model[:3] = np.nan                                     # requests that do not count
        found = verdicts({"utility": {"model": model, LOGGED: base, UPSTREAM: base - 1.0}},
                         model="m", list_length=M, simulated=True, exposure=True)
        logged = next(v for v in found if v["reference"] == LOGGED)
        assert logged["verdict"] == expected and logged["requests"] == 1997
        low, high = logged["ci95"]
        assert low <= logged["difference"] <= high
        assert ("WORSE" in logged["sentence"]) == (expected == "worse")
    # Without a simulator: NDCG against the logged lists, click recall against the upstream.
    found = verdicts({"ndcg": {"model": base, LOGGED: base - 0.1},
                      f"click_recall@{M}": {"model": base, UPSTREAM: base + 0.1}},
                     model="m", list_length=M, simulated=False, exposure=True)
    assert [(v["reference"], v["metric"], v["verdict"]) for v in found] == [
        (LOGGED, "ndcg", "better"), (UPSTREAM, f"click_recall@{M}", "worse")]


def test_a_model_worse_than_the_upstream_order_says_so(barely_trained, data, tmp_path):
    report = evaluate_run(barely_trained, data, per_request=True)
    references = report["references"]
    assert set(references) == {LOGGED, UPSTREAM}
    # The upstream top m, as the simulator scores it, is a list of its own.
    assert references[UPSTREAM]["utility"] == pytest.approx(
        report["variants"]["upstream"]["utility"])
    assert references[LOGGED]["utility"] == pytest.approx(report["metrics"]["logging_utility"])
    # By definition the logged lists are the exposed items and hold every click.
    assert references[LOGGED][f"recall@{M}"] == pytest.approx(1.0)
    assert references[LOGGED][f"click_recall@{M}"] == pytest.approx(1.0)
    # The upstream order's recall recomputed from the file.
    table = pq.read_table(data / "test.parquet", columns=["upstream_score", "exposed"])
    recalls = []
    for scores, exposed in zip(table.column("upstream_score").to_pylist(),
                               table.column("exposed").to_pylist(), strict=True):
        top = set(np.argsort(-np.asarray(scores), kind="stable")[:M].tolist())
        recalls.append(len(top & set(exposed)) / len(exposed))
    assert references[UPSTREAM][f"recall@{M}"] == pytest.approx(np.mean(recalls))
    upstream = next(v for v in report["verdicts"] if v["reference"] == UPSTREAM)
    assert upstream["metric"] == "utility" and upstream["verdict"] == "worse"
    assert upstream["model_value"] == pytest.approx(report["metrics"]["utility"])
    text = format_evaluation(report)
    assert f"dnn is WORSE than the upstream top {M}" in text
    assert "upstream order" in text.splitlines()[1]          # the reference column
    write_report(report | {"per_request": None, "per_request_metrics": None},
                 tmp_path / "r.md")
    markdown = (tmp_path / "r.md").read_text()
    assert "## Against the references" in markdown and "WORSE" in markdown


def test_without_a_simulator_the_report_compares_offline_figures(barely_trained, data,
                                                                 tmp_path):
    logs = tmp_path / "logs"
    shutil.copytree(data, logs, ignore=shutil.ignore_patterns(TRUTH_DIR))
    code = main(["evaluate", "--run", str(barely_trained), "--data", str(logs), "--json",
                 str(tmp_path / "e.json"), "--report", str(tmp_path / "e.md")])
    assert code == 0
    report = json.loads((tmp_path / "e.json").read_text())
    assert "variants" not in report and "utility" not in report["metrics"]
    assert [(v["reference"], v["metric"]) for v in report["verdicts"]] == [
        (LOGGED, "ndcg"), (UPSTREAM, f"click_recall@{M}")]
    for verdict in report["verdicts"]:
        assert verdict["verdict"] in ("better", "worse", "level")
    markdown = (tmp_path / "e.md").read_text()
    # Each metric explained in a line, the list length's recall next to the paper's 6 and 10.
    for name in ("ndcg", "recall@6", "recall@10", f"recall@{M}", f"click_recall@{M}"):
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {name} |"))
        assert row.rstrip(" |").split("|")[-1].strip(), name
    assert "only for the items that were shown" in markdown
