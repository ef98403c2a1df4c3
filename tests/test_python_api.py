"""The Python API (docs/python-api.md): the documented example as written, then the rest of a
new user's path from the same pandas DataFrame (validate, rerank from the command line, serve
and answer one request), and the errors that name the row and the column."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import nar4rec
from helpers import free_port
from nar4rec.errors import DataError
from nar4rec.serve import request_json

pd = pytest.importorskip("pandas")
DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"
LABELS = ["exposed", "feedback_click", "feedback_like"]


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The page's example, run as it stands in a fresh interpreter: (its folder, its output,
    the namespace's log DataFrame rebuilt from the written file)."""
    code = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(code) == 1, "docs/python-api.md should hold one runnable example"
    root = tmp_path_factory.mktemp("api")
    (root / "example.py").write_text(code[0])
    done = subprocess.run([sys.executable, "example.py"], cwd=root, capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return root, done.stdout


def test_the_documented_example_runs_and_says_what_it_promises(example):
    root, output = example
    lines = output.splitlines()
    assert lines[0] == "1500 requests written"
    sentences = [line for line in lines if " the logged lists: " in line
                 or " the upstream order: " in line]
    assert len(sentences) == 4                       # two models, two references each
    assert {s.split()[0] for s in sentences} == {"nar4rec", "dnn"}
    # Item ids back, not candidate indices: five distinct candidates of request r0.
    log = pq.read_table(root / "work" / "log.parquet").to_pydict()
    first = eval(lines[-1])                          # the list-of-dicts answer for r0
    assert len(first) == len(set(first)) == 5 and set(first) <= set(log["item_id"][0])
    assert lines[sentences.__len__() + 1] == str(first)    # the DataFrame answer, the same
    for split in ("train", "valid", "test"):
        assert (root / "work" / "data" / f"{split}.parquet").exists()


def test_the_users_path_continues_on_the_command_line(example, tmp_path):
    """From the same files: validate, rerank tomorrow's requests from the CLI, serve the run
    and answer one request with the same list as the Python call."""
    root, _ = example
    work = root / "work"
    done = subprocess.run([sys.executable, "-m", "nar4rec", "validate", str(work / "data")],
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.count(": ok:") == 3, done.stdout + done.stderr
    log = pq.read_table(work / "log.parquet").to_pandas()
    fresh = log.tail(4).drop(columns=LABELS + ["timestamp"])
    nar4rec.write_requests(fresh, tmp_path / "fresh.parquet")
    done = subprocess.run([sys.executable, "-m", "nar4rec", "rerank", "--run",
                           str(work / "nar4rec"), "--data", str(tmp_path / "fresh.parquet"),
                           "--out", str(tmp_path / "lists.parquet")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    from_cli = pq.read_table(tmp_path / "lists.parquet").column("items").to_pylist()
    reranker = nar4rec.load(work / "nar4rec")
    assert reranker.rerank(fresh) == from_cli

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "nar4rec", "serve", "--run",
                                str(work / "nar4rec"), "--port", str(port)],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert "http://127.0.0.1" in process.stdout.readline()
        body = request_json(pa.Table.from_pandas(fresh, preserve_index=False), 0,
                            reranker.run.space)
        for _ in range(100):
            try:
                answer = httpx.post(f"http://127.0.0.1:{port}/v1/rerank", json=body,
                                    timeout=10)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert answer.status_code == 200, answer.text
        assert answer.json()["items"] == from_cli[0]
    finally:
        process.terminate()
        process.wait(timeout=30)


def small_log(requests: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    items = np.argsort(rng.random((requests, 60)), axis=1)[:, :8]
    return pd.DataFrame({
        "request_id": [f"r{i}" for i in range(requests)],
        "user_id": rng.integers(0, 9, size=requests),
        "timestamp": pd.date_range("2026-01-01", periods=requests, freq="h"),
        "item_id": [[f"i{j}" for j in row] for row in items],
        "cand_num_price": list(rng.random((requests, 8)).astype(np.float32)),
        "upstream_score": list(rng.normal(size=(requests, 8)).astype(np.float32)),
        "exposed": [[0, 1, 2]] * requests,
        "feedback_click": list((rng.random((requests, 3)) < 0.3).astype(np.float32)),
    })


def test_write_requests_types_each_column_and_names_bad_ones(tmp_path):
    log = small_log()
    nar4rec.write_requests(log, tmp_path / "ok.parquet", utility_weights={"click": 1.0})
    schema = pq.read_schema(tmp_path / "ok.parquet")
    assert schema.field("request_id").type == pa.string()        # strings, as given
    assert schema.field("user_id").type == pa.int64()            # integers, as given
    assert schema.field("item_id").type == pa.list_(pa.string())
    forced = nar4rec.write_requests(log, tmp_path / "forced.parquet",
                                    utility_weights={"click": 1.0},
                                    id_types={"user_id": "string"})
    assert forced["requests"] == len(log)
    assert pq.read_schema(tmp_path / "forced.parquet").field("user_id").type == pa.string()
    # The same rows as a list of dicts.
    nar4rec.write_requests(log.to_dict("records"), tmp_path / "rows.parquet",
                           utility_weights={"click": 1.0})
    assert pq.read_table(tmp_path / "rows.parquet").equals(pq.read_table(tmp_path / "ok.parquet"))

    def fails(frame, field, *, row=None, **kwargs) -> str:
        target = tmp_path / "bad.parquet"
        with pytest.raises(DataError) as error:
            nar4rec.write_requests(frame, target, **{"utility_weights": {"click": 1.0},
                                                     **kwargs})
        assert error.value.field == field and error.value.row == row, str(error.value)
        assert not target.exists() and not list(tmp_path.glob(".*partial*"))
        return str(error.value)

    assert "no utility weight for behaviour click" in fails(log, "feedback_click",
                                                            utility_weights={})
    assert "unknown column" in fails(log.assign(score=1.0), "score")
    mixed = log.astype({"user_id": object})
    mixed.loc[3, "user_id"] = "u3"                               # one string among integers
    assert "'u3'" in fails(mixed, "user_id", row=3)
    repeated = log.copy()
    repeated.at[5, "item_id"] = ["i1", "i1", *log.at[5, "item_id"][2:]]
    assert "appears twice" in fails(repeated, "item_id", row=5)
    huge = log.copy()
    huge.at[7, "cand_num_price"] = np.array([1e39] + [0.0] * 7)
    assert "float32" in fails(huge, "cand_num_price", row=7)


def test_write_requests_takes_the_logging_policy(tmp_path):
    from nar4rec.propensity import pl_log_prob, pl_prefix_log_probs

    log = small_log()
    score = np.stack(log["upstream_score"])
    exposed = np.array(log["exposed"].tolist())
    log = log.assign(logging_score=log["upstream_score"], logging_temperature=0.5,
                     log_propensity=pl_log_prob(score / 0.5, exposed),
                     logging_prefix_log_propensity=list(pl_prefix_log_probs(score / 0.5,
                                                                            exposed)))
    summary = nar4rec.write_requests(log, tmp_path / "logged.parquet",
                                     utility_weights={"click": 1.0})
    assert summary["problems"] == 0
    assert {"logging_score", "logging_temperature", "logging_prefix_log_propensity"} <= set(
        pq.read_schema(tmp_path / "logged.parquet").names)
    with pytest.raises(DataError) as error:
        nar4rec.write_requests(log.drop(columns=["logging_temperature"]),
                               tmp_path / "bad.parquet", utility_weights={"click": 1.0})
    assert error.value.field == "logging_temperature"
    with pytest.raises(DataError) as error:
        nar4rec.write_requests(log.assign(logging_temperature=0.25), tmp_path / "bad.parquet",
                               utility_weights={"click": 1.0})
    assert error.value.field == "log_propensity"          # the fields disagree
    assert not (tmp_path / "bad.parquet").exists()


def test_rerank_takes_frames_and_dicts_and_names_bad_requests(example):
    root, _ = example
    reranker = nar4rec.load(root / "work" / "dnn")               # a baseline, the same calls
    log = pq.read_table(root / "work" / "log.parquet").to_pandas()
    fresh = log.head(6).drop(columns=LABELS)
    table = reranker.rerank_table(fresh)
    assert isinstance(table, pd.DataFrame)
    assert table["request_id"].tolist() == fresh["request_id"].tolist()      # input order
    assert np.isnan(table["predicted_utility"]).all()            # no list-wise evaluator
    lists = reranker.rerank(fresh.to_dict("records"))
    assert lists == table["items"].apply(list).tolist()
    for items, candidates, positions in zip(lists, fresh["item_id"], table["positions"],
                                            strict=True):
        assert items == [candidates[p] for p in positions]       # ids of those candidates
    assert reranker.rerank(fresh.iloc[::-1]) == lists[::-1]      # no dependence on the batch
    with pytest.raises(DataError) as error:
        reranker.rerank(fresh.drop(columns=["cand_cat_genre"]))
    assert error.value.field == "cand_cat_genre" and "missing" in str(error.value)
    broken = fresh.copy()
    broken.at[2, "upstream_score"] = np.array([np.nan] * len(broken.at[2, "item_id"]))
    with pytest.raises(DataError) as error:
        reranker.rerank(broken)
    assert (error.value.row, error.value.field) == (2, "upstream_score")
    beyond = fresh.copy()
    beyond.at[4, "cand_num_price"] = np.full(len(beyond.at[4, "item_id"]), -1e39)
    with pytest.raises(DataError, match="float32") as error:
        reranker.rerank(beyond)
    assert error.value.field == "cand_num_price"
    with pytest.raises(DataError, match="list of dicts"):
        reranker.rerank("r0")
