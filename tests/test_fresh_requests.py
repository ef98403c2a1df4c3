"""Reranking fresh requests: a request file holds only what the ranking stage knows.

A test split is written again without its logged lists, feedback and propensities (the
library's writer, `labels=False`); every registered model, trained a few steps, reranks it
into the lists it gives for the full file. A missing column the model needs is one line naming
the file and the column; training refuses such a file; `validate` accepts it and says what it is.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers import simulate_small, train_every_model
from nar4rec.cli import main
from nar4rec.data.features import FeatureSpace
from nar4rec.data.format import METADATA_KEY, RequestLogWriter, read_spec
from nar4rec.data.loader import RequestLoader
from nar4rec.data.validate import check_file
from nar4rec.errors import DataError
from nar4rec.registry import MODELS
from nar4rec.runs import load_run, rerank_file

pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = ("exposed", "log_propensity", "logging_score", "logging_temperature",
          "logging_marginal", "logging_prefix_log_propensity")    # with every feedback_ column


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("fresh") / "data"
    simulate_small(out, requests=600, n_candidates=12, list_length=4)
    return out


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    return train_every_model(data, tmp_path_factory.mktemp("runs"), steps=2)


@pytest.fixture(scope="module")
def fresh(data, tmp_path_factory):
    """The test split as a request file to rerank, written by the library's writer."""
    path = tmp_path_factory.mktemp("requests") / "fresh.parquet"
    table = pq.read_table(data / "test.parquet")
    with RequestLogWriter(path, read_spec(data / "test.parquet"), labels=False) as writer:
        writer.write({name: table.column(name) for name in table.column_names})
    return path


@pytest.fixture(scope="module")
def bare(fresh, tmp_path_factory):
    """The least a request file to rerank holds: no timestamp, no behaviours declared."""
    path = tmp_path_factory.mktemp("bare") / "bare.parquet"
    table = pq.read_table(fresh).drop_columns(["timestamp"])
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    bare = {"format": meta["format"], "version": meta["version"]}
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(bare)}), path)
    return path


def without(path, columns, out) -> None:
    """`path` written to `out` without `columns`, keeping the schema's metadata."""
    table = pq.read_table(path)
    pq.write_table(table.drop_columns(list(columns)), out)


def numbers(table: pa.Table, name: str) -> np.ndarray:
    """A number column's values, list columns flattened."""
    column = table.column(name).combine_chunks()
    if pa.types.is_list(column.type):
        column = column.flatten()
    return column.to_numpy(zero_copy_only=False)


def test_the_writer_leaves_out_labels_and_keeps_the_format_key(data, fresh):
    schema = pq.read_schema(fresh)
    assert not [n for n in schema.names if n in LABELS or n.startswith("feedback_")]
    assert {"request_id", "user_id", "item_id", "upstream_score"} <= set(schema.names)
    meta = json.loads(schema.metadata[METADATA_KEY])
    assert meta["format"] == "nar4rec-requests"
    assert not read_spec(fresh).has_labels and read_spec(data / "test.parquet").has_labels


def test_batches_of_a_request_file_are_those_of_the_full_file_without_labels(data, fresh,
                                                                             runs):
    space = load_run(runs / "dnn").space
    ours = next(iter(RequestLoader([fresh], space, batch_size=64, labels=False)))
    full = next(iter(RequestLoader([data / "test.parquet"], space, batch_size=64,
                                   labels=False)))
    assert (ours.request_id == full.request_id).all()
    for name in ("user_cat", "user_num", "cand_cat", "cand_num", "upstream_score", "cand_mask",
                 "exposed", "exposed_mask", "feedback"):
        assert torch.equal(getattr(ours, name), getattr(full, name)), name
    assert ours.exposed.shape == (len(ours), 1) and not ours.exposed_mask.any()
    assert ours.feedback.shape == (len(ours), 1, len(space.behaviours))
    assert not ours.feedback.any()


@pytest.mark.parametrize("model", list(MODELS))
def test_every_model_reranks_a_request_file_as_the_full_file(model, data, fresh, runs,
                                                             tmp_path):
    full = rerank_file(runs / model, data / "test.parquet", tmp_path / "full.parquet")
    assert rerank_file(runs / model, fresh, tmp_path / "fresh.parquet") == full > 0
    expected = pq.read_table(tmp_path / "full.parquet")
    got = pq.read_table(tmp_path / "fresh.parquet")
    for name in ("request_id", "items", "positions"):
        assert got.column(name).to_pylist() == expected.column(name).to_pylist(), name
    for name in ("scores", "predicted_utility"):
        np.testing.assert_array_equal(numbers(got, name), numbers(expected, name))


def test_rerank_command_reranks_a_request_file(data, bare, runs, tmp_path):
    out = tmp_path / "lists.parquet"
    done = subprocess.run([sys.executable, "-m", "nar4rec", "rerank", "--run",
                           str(runs / "nar4rec"), "--data", str(bare), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "reranked 60 requests" in done.stdout
    rerank_file(runs / "nar4rec", data / "test.parquet", tmp_path / "full.parquet")
    assert pq.read_table(out).column("items").to_pylist() == \
        pq.read_table(tmp_path / "full.parquet").column("items").to_pylist()


@pytest.mark.parametrize("column", ["cand_num_duration", "upstream_score", "user_cat_segment"])
def test_a_missing_column_the_model_needs_is_one_line(column, fresh, runs, tmp_path):
    lacking = tmp_path / "lacking.parquet"
    without(fresh, [column], lacking)
    with pytest.raises(DataError, match=f"'{column}', which the training files had"):
        rerank_file(runs / "dnn", lacking, tmp_path / "lists.parquet")
    done = subprocess.run([sys.executable, "-m", "nar4rec", "rerank", "--run",
                           str(runs / "nar4rec"), "--data", str(lacking), "--out",
                           str(tmp_path / "lists.parquet")], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(lacking) in lines[0] and f"'{column}'" in lines[0], lines
    assert not (tmp_path / "lists.parquet").exists()


def test_training_and_evaluation_refuse_a_request_file(fresh, runs):
    space = load_run(runs / "dnn").space
    for read in (lambda: RequestLoader([fresh], space), lambda: FeatureSpace.fit([fresh])):
        with pytest.raises(DataError, match="field 'exposed': required column is missing") \
                as error:
            read()
        assert str(fresh) in str(error.value)


def test_validate_accepts_a_request_file_and_says_so(fresh, bare, tmp_path, capsys):
    report = check_file(fresh)
    assert report.ok and not report.has_labels
    summary = report.summary()
    assert summary["kind"] == "requests to rerank" and summary["requests"] == 60
    assert summary["exposures"] == 0 and summary["list_length"] == {"min": None, "max": None}
    assert main(["validate", str(fresh)]) == 0
    assert "ok: a request file to rerank" in capsys.readouterr().out

    assert check_file(bare).ok

    # Its candidates are still checked, and the format key is still required.
    table = pq.read_table(bare)
    scores = table.column("upstream_score").to_pylist()
    scores[3] = scores[3][:2]
    index = table.schema.get_field_index("upstream_score")
    short = table.set_column(index, table.schema.field(index),
                             pa.array(scores, table.schema.field(index).type))
    pq.write_table(short, tmp_path / "short.parquet")
    assert {(p.row, p.field) for p in check_file(tmp_path / "short.parquet").problems} == \
        {(3, "upstream_score")}
    pq.write_table(table.replace_schema_metadata({}), tmp_path / "no_key.parquet")
    assert "no 'nar4rec' key" in check_file(tmp_path / "no_key.parquet").problems[0].message
