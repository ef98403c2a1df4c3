"""Baselines through the run pipeline, and `nar4rec compare`'s tables."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import simulate_small
from nar4rec import cli
from nar4rec.compare import compare, format_tables, relative_change, write_report
from nar4rec.config import PAPER_SETTINGS, RunConfig, dataset_of, dataset_settings, load_overrides
from nar4rec.errors import Nar4recError
from nar4rec.evaluation import evaluate_run
from nar4rec.report import NDCG_NOTE
from nar4rec.runs import load_run, read_run, rerank_file, train_run

TINY = ["train.epochs=1", "train.steps_per_epoch=6", "evaluator_train.epochs=1",
        "evaluator_train.steps_per_epoch=6", "train.batch_size=64",
        "evaluator_train.batch_size=64", "generator.d_model=16", "evaluator.d_model=16",
        "dnn.d_model=16", "dcn.d_model=16"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "data"
    simulate_small(out, requests=1500, n_candidates=12, list_length=4)
    return out


def tiny_config():
    return load_overrides(RunConfig(), None, TINY)


def test_the_command_line_reads_the_registry_without_torch():
    """`nar4rec --help` and argument errors come before torch is imported: the registry the
    parser reads holds names and strings only."""
    import subprocess
    import sys

    code = ("import sys, nar4rec.cli, nar4rec.registry; "
            "nar4rec.cli.build_parser(); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr


def test_a_baseline_trains_evaluates_and_reranks_as_a_run(data, tmp_path):
    run = tmp_path / "dnn"
    info = train_run(data, run, model="dnn", config=tiny_config(), progress=False)
    assert set(info["phases"]) == {"model"} and (run / "model" / "best.pt").exists()
    assert set(info["config"]) == {"dnn", "train", "features"}     # only what it uses
    assert load_run(run).system.model.config.list_length == 4
    report = evaluate_run(run, data)
    assert report["model"] == "dnn" and report["protocol"] == "exposure (n > m)"
    metrics = report["metrics"]
    assert 0 <= metrics["recall@6"] <= 1 and "logloss" not in metrics   # no exposure probability
    assert set(report["variants"]) == {"dnn", "logging", "upstream", "oracle"}
    assert report["variants"]["oracle"]["utility"] >= report["variants"]["dnn"]["utility"]
    count = rerank_file(run, data / "test.parquet", tmp_path / "lists.parquet")
    table = pq.read_table(tmp_path / "lists.parquet")
    assert table.num_rows == count and all(len(items) == 4 for items in
                                           table.column("items").to_pylist())


def test_relative_change_and_its_interval():
    rng = np.random.default_rng(0)
    reference = rng.poisson(3.0, size=4000).astype(float)
    doubled = relative_change(2 * reference, reference)
    assert doubled["change"] == pytest.approx(1.0)
    assert doubled["ci95"] == pytest.approx([1.0, 1.0])              # no noise, no width
    noisy = reference * 1.1 + rng.normal(0, 1, size=4000)
    change = relative_change(noisy, reference)
    low, high = change["ci95"]
    assert low < change["change"] < high
    assert change["change"] == pytest.approx(noisy.mean() / reference.mean() - 1)
    # Its coverage: over repeated samples the interval holds the true change about 95% of the
    # time (true change 0.1: values = 1.1 * reference + zero-mean noise).
    covered = 0
    for _ in range(200):
        base = rng.poisson(3.0, size=500).astype(float)
        ci = relative_change(1.1 * base + rng.normal(0, 1, size=500), base)["ci95"]
        covered += ci[0] <= 0.1 <= ci[1]
    assert 0.88 <= covered / 200 <= 0.99


def test_compare_lays_out_every_table(data, tmp_path):
    models = ("nar4rec", "edge_rerank", "dnn")
    result = compare(data, tmp_path / "runs", models=models, seeds=2, config=tiny_config(),
                     time_batch=32, progress=False, log=lambda _: None)
    # NAR4Rec at the paper's settings (configs/paper.toml) is a row beside the defaults
    assert [row["model"] for row in result["rows"]] == ["nar4rec", "nar4rec_paper",
                                                         "edge_rerank", "dnn"]
    for row in result["rows"]:
        assert len(row["per_seed"]) == 2
        for key in ("recall@6", "recall@10", "utility", "captured_lift",
                    "train_s_per_batch", "infer_s_per_batch"):
            assert key in row["metrics"], (row["model"], key)
        assert row["metrics"]["utility"] == pytest.approx(
            np.mean([s["utility"] for s in row["per_seed"]]))
    table5 = result["table5"]
    assert table5["reference"] == "edge_rerank"
    reference_row = next(r for r in table5["rows"] if r["model"] == "edge_rerank")
    assert all(v["change"] == pytest.approx(0.0, abs=1e-12)
               for v in reference_row["relative"].values())
    oracle_row = next(r for r in table5["rows"] if r["model"] == "oracle")
    assert oracle_row["utility_relative"]["change"] >= 0
    assert [r["training"].split()[0] for r in result["table6"]] == ["vanilla", "unlikelihood"]
    for name in ("nar4rec_paper", "nar4rec_vanilla"):    # Table 6 at the paper's settings
        recorded = read_run(tmp_path / "runs" / "seed0" / name)["config"]
        for key, value in PAPER_SETTINGS.items():
            section, setting = key.split(".")
            recorded_value = recorded[section][setting]
            assert (list(recorded_value) == list(value) if isinstance(value, tuple)
                    else recorded_value == value), (name, key)
    assert len(result["table7"]) == 6
    # Seed 1 trains different models than seed 0.
    assert result["rows"][0]["per_seed"][0] != result["rows"][0]["per_seed"][1]
    # Every model against the logged lists and the upstream order, over both seeds' requests.
    assert set(result["references"]) == {"logged", "upstream"}
    for row in result["rows"]:
        assert [(v["reference"], v["metric"]) for v in row["verdicts"]] == [
            ("logged", "utility"), ("upstream", "utility")]
        verdict = row["verdicts"][1]
        assert verdict["requests"] == 2 * result["requests"]
        assert verdict["model_value"] == pytest.approx(row["metrics"]["utility"])
        assert verdict["reference_value"] == pytest.approx(
            result["references"]["upstream"]["utility"])
    write_report(result, tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    assert "| *upstream order* |" in text and "| *logged lists* |" in text
    assert all(v["sentence"] in text for row in result["rows"] for v in row["verdicts"])
    for title in ("Table 3 style", "Table 4 style", "Table 5 style", "Table 6", "Table 7"):
        assert title in text
    assert (tmp_path / "report-lifts.png").stat().st_size > 1000
    # --resume reuses every finished run: the same tables again, nothing retrained.
    stamp = (tmp_path / "runs" / "seed0" / "dnn" / "model" / "best.pt").stat().st_mtime_ns
    again = compare(data, tmp_path / "runs", models=models, seeds=2, config=tiny_config(),
                    time_batch=32, resume=True, progress=False, log=lambda _: None)
    assert (tmp_path / "runs" / "seed0" / "dnn" / "model" / "best.pt").stat().st_mtime_ns \
        == stamp
    assert again["rows"][0]["metrics"]["utility"] == result["rows"][0]["metrics"]["utility"]


def test_resume_refuses_runs_trained_with_other_settings(data, tmp_path):
    """--resume reuses a finished run only if it was trained with the settings asked for now:
    a runs folder from older defaults or another --config is refused, naming the table."""
    compare(data, tmp_path / "runs", models=("dnn",), config=tiny_config(), time_batch=32,
            progress=False, log=lambda _: None)
    other = load_overrides(tiny_config(), None, ["dnn.hidden=[8]"])
    with pytest.raises(Nar4recError, match="trained with other 'dnn' settings"):
        compare(data, tmp_path / "runs", models=("dnn",), config=other, time_batch=32,
                resume=True, progress=False, log=lambda _: None)
    # the same settings again: reused
    again = compare(data, tmp_path / "runs", models=("dnn",), config=tiny_config(),
                    time_batch=32, resume=True, progress=False, log=lambda _: None)
    assert again["rows"][0]["model"] == "dnn"


def test_compare_command_and_its_errors(data, tmp_path, capsys):
    out = tmp_path / "cmp.json"
    code = cli.main(["compare", "--data", str(data), "--models", "dnn,dcn", "--json", str(out),
                     "--quiet", *[a for s in TINY for a in ("--set", s)]])
    assert code == 0
    result = json.loads(out.read_text())
    assert [r["model"] for r in result["rows"]] == ["dnn", "dcn"]
    assert result["table5"]["reference"] == "logging"                # no edge_rerank compared
    assert "| dcn |" in capsys.readouterr().out
    assert (tmp_path / "cmp-runs" / "seed0" / "dcn" / "run.json").exists()
    code = cli.main(["compare", "--data", str(data), "--models", "dnn,nope", "--json",
                     str(tmp_path / "x.json")])
    assert code == 2 and "unknown model 'nope'" in capsys.readouterr().err
    code = cli.main(["compare", "--data", str(data), "--models", "dnn", "--json", str(out)])
    assert code == 2 and "--resume" in capsys.readouterr().err       # runs exist already


def test_avito_data_train_at_the_papers_batch_size_unless_set(data, tmp_path):
    """The paper trains on Avito at batch 1024 (section 5.1), elsewhere at 256; `--set`
    still wins."""
    avito = tmp_path / "avito"
    simulate_small(avito, preset="avito", requests=1500)
    assert dataset_of(avito) == "avito" and dataset_of(data) == "kuaishou"
    assert dataset_settings(data) == {}
    rows = pq.read_metadata(avito / "train.parquet").num_rows
    quick = ["--model", "evaluator", "--data", str(avito), "--quiet", "--set",
             "evaluator_train.epochs=1", "--set", "evaluator.d_model=16"]

    def trained(run) -> tuple[int, int]:
        """The run's evaluator batch size, and the steps of its one epoch."""
        info = json.loads((run / "run.json").read_text())
        epoch = json.loads((run / "evaluator" / "metrics.jsonl").read_text().splitlines()[0])
        return info["config"]["evaluator_train"]["batch_size"], epoch["step"]

    assert cli.main(["train", "--out", str(tmp_path / "default"), *quick]) == 0
    assert trained(tmp_path / "default") == (1024, -(-rows // 1024))
    assert cli.main(["train", "--out", str(tmp_path / "set"), *quick,
                     "--set", "evaluator_train.batch_size=64"]) == 0
    assert trained(tmp_path / "set") == (64, -(-rows // 64))
    # `nar4rec compare` too, under --set.
    assert cli.main(["compare", "--data", str(avito), "--models", "dnn", "--json",
                     str(tmp_path / "cmp.json"), "--quiet", "--set", "train.epochs=1",
                     "--set", "dnn.d_model=16"]) == 0
    run = read_run(tmp_path / "cmp-runs" / "seed0" / "dnn")
    assert run["config"]["train"]["batch_size"] == 1024
    # Its Table 2 says which NDCG mean it shows; the JSON has both.
    result = json.loads((tmp_path / "cmp.json").read_text())
    assert {"ndcg", "ndcg_all_requests"} <= set(result["rows"][0]["metrics"])
    assert NDCG_NOTE in format_tables(result)


def test_dataset_of_reads_a_converters_summary(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"source": "avito (/data/raw)"}))
    assert dataset_of(tmp_path) == "avito"
    assert dataset_settings(tmp_path) == {"train.batch_size": 1024,
                                          "evaluator_train.batch_size": 1024}
    (tmp_path / "summary.json").write_text(json.dumps({"source": "mind"}))
    assert dataset_of(tmp_path) == "mind" and dataset_settings(tmp_path) == {}
    (tmp_path / "summary.json").unlink()
    assert dataset_of(tmp_path) is None and dataset_settings(tmp_path) == {}
