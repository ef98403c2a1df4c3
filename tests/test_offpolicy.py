"""`nar4rec ope`: a run's value estimated from logs, beside the simulator's truth."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import simulate_small
from nar4rec.cli import main
from nar4rec.config import RunConfig, load_overrides
from nar4rec.data.format import LOGGING_COLUMNS
from nar4rec.errors import DataError, Nar4recError
from nar4rec.offpolicy import ope_run
from nar4rec.runs import train_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    """Few candidates, short lists and a flat logging policy: the whole-list estimators see
    the target's lists often enough to be checked against the truth."""
    out = tmp_path_factory.mktemp("ope") / "data"
    simulate_small(out, requests=20000, n_candidates=5, list_length=2, logging_temperature=10.0)
    return out


@pytest.fixture(scope="module")
def dnn_run(small_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "dnn"
    config = load_overrides(RunConfig(), None, ["train.epochs=1", "dnn.d_model=16"])
    train_run(small_world, out, model="dnn", config=config, progress=False)
    return out


def test_estimates_agree_with_the_truth_where_their_assumptions_hold(dnn_run, small_world):
    report = ope_run(dnn_run, small_world, samples=256)
    truth = report["truth"]["model"]["utility"]
    estimates = report["estimates"]
    assert report["requests"] == 2000 and set(estimates) == {
        "dm", "ips", "snips", "iips", "pbm", "rips", "cascade_dr", "pi"}
    assert report["sources"]["list_log_prob"] == "logging_score/logging_temperature"
    for name in ("ips", "snips", "rips", "cascade_dr"):   # unbiased under the simulator
        e = estimates[name]
        assert e["skipped"] is None and e["ess"] > 20, name
        stderr = e["utility_stderr"]
        assert abs(e["utility"] - truth) < 4 * stderr, (name, e["utility"], truth, stderr)
    # The logged lists' observed mean against the simulator's truth for them.
    logged = report["logged"]
    assert logged["utility_low"] < report["truth"]["logged"]["utility"] < logged["utility_high"]


def test_streaming_in_small_batches_gives_the_same_exact_estimates(dnn_run, small_world):
    estimators = ("ips", "snips", "rips", "dm")
    whole = ope_run(dnn_run, small_world, estimators=estimators)
    parts = ope_run(dnn_run, small_world, estimators=estimators, batch_size=64)
    for name in estimators:
        assert parts["estimates"][name]["utility"] == pytest.approx(
            whole["estimates"][name]["utility"], rel=1e-6)


def strip(source, target, columns) -> None:
    """A copy of the data directory without some columns (the footer key kept)."""
    shutil.copytree(source, target)
    for split in ("train", "valid", "test"):
        path = target / f"{split}.parquet"
        table = pq.read_table(path)
        metadata = table.schema.metadata
        table = table.drop_columns([c for c in columns if c in table.column_names])
        pq.write_table(table.replace_schema_metadata(metadata), path)


def test_logs_without_the_logging_policy_fail_clearly(dnn_run, small_world, tmp_path, capsys):
    strip(small_world, tmp_path / "bare", [*LOGGING_COLUMNS, "log_propensity"])
    with pytest.raises(DataError, match="no logging-policy probabilities") as error:
        ope_run(dnn_run, tmp_path / "bare")
    assert error.value.field == "log_propensity"
    assert main(["ope", "--run", str(dnn_run), "--data", str(tmp_path / "bare")]) == 2
    err = capsys.readouterr().err
    assert "no logging-policy probabilities" in err and "Traceback" not in err
    # The direct method alone needs none of them.
    assert ope_run(dnn_run, tmp_path / "bare", estimators=("dm",))["estimates"]["dm"][
        "skipped"] is None
    # With the joint propensity only, what needs more says which column it needs.
    strip(small_world, tmp_path / "joint", LOGGING_COLUMNS)
    report = ope_run(dnn_run, tmp_path / "joint", estimators=("ips", "iips", "rips"))
    assert report["estimates"]["ips"]["skipped"] is None
    assert "logging_marginal" in report["estimates"]["iips"]["skipped"]
    assert "logging_prefix_log_propensity" in report["estimates"]["rips"]["skipped"]


def test_the_reward_model_must_predict_feedback(small_world, dnn_run, tmp_path):
    prm = tmp_path / "prm"
    config = load_overrides(RunConfig(), None, ["train.epochs=1", "prm.d_model=16"])
    train_run(small_world, prm, model="prm", config=config, progress=False)
    report = ope_run(prm, small_world, estimators=("dm", "ips"))     # its own: none
    assert report["estimates"]["dm"]["skipped"] and "prm run has no" in report["reward_model"]
    borrowed = ope_run(prm, small_world, estimators=("dm",), reward_model=dnn_run)
    assert borrowed["estimates"]["dm"]["skipped"] is None
    with pytest.raises(Nar4recError, match="cannot serve as the reward model"):
        ope_run(dnn_run, small_world, estimators=("dm",), reward_model=prm)


def test_the_command_writes_json_and_a_report(dnn_run, small_world, tmp_path, capsys):
    code = main(["ope", "--run", str(dnn_run), "--data", str(small_world), "--estimators",
                 "ips,pbm", "--max-weight", "50", "--json", str(tmp_path / "o.json"),
                 "--report", str(tmp_path / "o.md")])
    assert code == 0
    result = json.loads((tmp_path / "o.json").read_text())
    assert set(result["estimates"]) == {"ips", "pbm"} and result["max_weight"] == 50
    assert "error against the truth" in (tmp_path / "o.md").read_text()
    assert "true utility of the run's lists" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_code:
        main(["ope", "--run", str(dnn_run), "--data", str(small_world), "--estimators",
              "ips,magic"])
    assert exit_code.value.code == 2
    assert "unknown estimator 'magic'" in capsys.readouterr().err


def test_a_peaked_logger_does_not_stop_the_marginal_estimators(dnn_run, tmp_path):
    """At a low logging temperature a logged item can sit where none of the Monte Carlo
    draws put it: its marginal is floored at the samples' resolution, not taken as 0."""
    data = tmp_path / "peaked"
    simulate_small(data, requests=3000, n_candidates=20, list_length=5,
                   logging_temperature=0.05)
    report = ope_run(dnn_run, data, estimators=("iips", "pbm"), samples=8)
    for name in ("iips", "pbm"):
        assert report["estimates"][name]["skipped"] is None, report["estimates"][name]
        assert np.isfinite(report["estimates"][name]["utility"])
