"""`nar4rec split`: one log by time into train/valid/test, streamed, all or nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import simulate_small
from nar4rec.cli import main
from nar4rec.config import dataset_of
from nar4rec.data.format import (
    CAND_NUM,
    EXPOSED,
    FEEDBACK,
    ITEM_ID,
    REQUEST_ID,
    TIMESTAMP,
    TIMESTAMP_TYPE,
    UPSTREAM_SCORE,
    USER_ID,
    FormatSpec,
    RequestLogWriter,
    list_array,
    read_spec,
)
from nar4rec.data.split import split_by_time
from nar4rec.data.validate import check_file
from nar4rec.errors import DataError, Nar4recError

SPLITS = ("train", "valid", "test")
START_MS = 1_709_251_200_000                 # 2024-03-01T00:00:00Z
MINUTE_MS = 60_000
SPEC = FormatSpec(behaviours=("click",), utility_weights={"click": 1.0}, cand_num=("price",),
                  extra={"source": "a test"})


def write_log(path, timestamps_ms, *, row_group_size: int = 16384, candidates: int = 4,
              labels: bool = True) -> None:
    """A valid log (or request file to rerank) with request_id = row and these timestamps."""
    rows = len(timestamps_ms)
    rng = np.random.default_rng(0)
    items = np.argsort(rng.random((rows, candidates + 3)), axis=1)[:, :candidates]
    columns = {
        REQUEST_ID: np.arange(rows), USER_ID: rng.integers(0, 50, rows),
        TIMESTAMP: pa.array(np.asarray(timestamps_ms, dtype=np.int64), TIMESTAMP_TYPE),
        ITEM_ID: list_array(items),
        CAND_NUM + "price": list_array(rng.random((rows, candidates)).astype(np.float32)),
        UPSTREAM_SCORE: list_array(rng.random((rows, candidates)).astype(np.float32)),
        EXPOSED: list_array(np.tile([1, 0], (rows, 1)).astype(np.int32)),
        FEEDBACK + "click": list_array((rng.random((rows, 2)) < 0.3).astype(np.float32)),
    }
    with RequestLogWriter(path, SPEC, row_group_size=row_group_size, labels=labels) as writer:
        writer.write(columns)


def shuffled_minutes(rows: int, minutes: int, seed: int = 0) -> np.ndarray:
    """Timestamps in log order that is not time order, about rows / minutes per minute."""
    rng = np.random.default_rng(seed)
    return START_MS + rng.integers(0, minutes, rows) * MINUTE_MS


def read(out, split: str) -> pa.Table:
    return pq.read_table(out / f"{split}.parquet")


def ms(table: pa.Table) -> np.ndarray:
    return table.column(TIMESTAMP).cast(pa.int64()).to_numpy()


def at(moment: datetime) -> int:
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    """1,000 requests over 300 minutes (ties: about 3 a minute), not in time order, in row
    groups of 64."""
    path = tmp_path_factory.mktemp("log") / "log.parquet"
    write_log(path, shuffled_minutes(1000, 300), row_group_size=64)
    return path


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    data = tmp_path_factory.mktemp("sim") / "data"
    simulate_small(data, requests=500)
    return data


def test_the_splits_partition_the_log_in_time_order(log, tmp_path):
    out = tmp_path / "data"
    summary = split_by_time(log, out)
    source = pq.read_table(log)
    tables = {split: read(out, split) for split in SPLITS}
    ids = np.concatenate([t.column(REQUEST_ID).to_numpy() for t in tables.values()])
    assert np.array_equal(np.sort(ids), source.column(REQUEST_ID).to_numpy())   # each once
    times = {split: ms(t) for split, t in tables.items()}
    assert times["train"].max() < times["valid"].min()
    assert times["valid"].max() < times["test"].min()
    # The shares, up to the requests that share the minute at a cut.
    sizes = {split: t.num_rows for split, t in tables.items()}
    assert abs(sizes["test"] - 100) <= 8 and abs(sizes["valid"] - 100) <= 8
    # Within a split, rows keep the log's order (request_id is the row of the log).
    for table in tables.values():
        assert np.all(np.diff(table.column(REQUEST_ID).to_numpy()) > 0)
    # The cuts are the first timestamps of valid and test, and the summary says so.
    assert summary["cuts"]["valid_from"]["time"] == summary["splits"]["valid"]["first"]
    assert summary["cuts"]["test_from"]["chosen"] == "the 0.9 quantile"
    assert summary["splits"]["test"]["requests"] == sizes["test"]
    assert summary["read"]["requests"] == 1000 and summary["balanced"]
    assert json.loads((out / "summary.json").read_text()) == summary


def test_ties_at_a_cut_go_to_the_later_split(tmp_path):
    minutes = np.array([0, 1, 2, 3, 4, 5, 6, 7, 7, 7])
    write_log(tmp_path / "log.parquet", START_MS + minutes[::-1] * MINUTE_MS)
    # test: the last 2 of 10 requests start at minute 7, which the request before shares.
    split_by_time(tmp_path / "log.parquet", tmp_path / "data", valid=0.1, test=0.2)
    assert [read(tmp_path / "data", s).num_rows for s in SPLITS] == [6, 1, 3]
    assert set(ms(read(tmp_path / "data", "test"))) == {START_MS + 7 * MINUTE_MS}


def test_format_and_metadata_survive(simulated, tmp_path):
    log = simulated / "train.parquet"
    out = tmp_path / "data"
    split_by_time(log, out, row_group_size=100)
    source = pq.ParquetFile(log).schema_arrow
    for split in SPLITS:
        path = out / f"{split}.parquet"
        assert pq.ParquetFile(path).schema_arrow.equals(source, check_metadata=True)
        assert read_spec(path) == read_spec(log)
        assert read_spec(path).extra == read_spec(log).extra
        assert check_file(path).ok, check_file(path).problems[:3]
    # The summary names the data set the log came from, so `train` picks its settings.
    assert dataset_of(out) == "kuaishou"


def test_explicit_times(log, tmp_path):
    valid_from = datetime(2024, 3, 1, 3, 0)                       # naive: UTC
    test_from = datetime(2024, 3, 1, 6, 30, tzinfo=timezone(timedelta(hours=2)))   # 04:30 UTC
    summary = split_by_time(log, tmp_path / "data", valid_from=valid_from, test_from=test_from)
    times = {split: ms(read(tmp_path / "data", split)) for split in SPLITS}
    assert times["train"].max() < at(valid_from.replace(tzinfo=UTC)) <= times["valid"].min()
    assert times["valid"].max() < at(test_from) <= times["test"].min()
    assert summary["cuts"]["test_from"] == {"time": "2024-03-01T04:30:00.000Z",
                                            "chosen": "given"}
    # A cut between two requests' times: the later one starts the split.
    cut = datetime(2024, 3, 1, 2, 0, 30, tzinfo=UTC)
    split_by_time(log, tmp_path / "data", valid_from=cut, overwrite=True)
    source = ms(pq.read_table(log))
    assert ms(read(tmp_path / "data", "valid")).min() == source[source >= at(cut)].min()
    assert ms(read(tmp_path / "data", "train")).max() == source[source < at(cut)].max()


def test_a_cut_between_two_milliseconds(tmp_path):
    write_log(tmp_path / "log.parquet", START_MS + np.arange(10))
    start = datetime(2024, 3, 1, tzinfo=UTC)
    split_by_time(tmp_path / "log.parquet", tmp_path / "data",
                  valid_from=start + timedelta(microseconds=4500),
                  test_from=start + timedelta(milliseconds=7))
    assert [read(tmp_path / "data", s).num_rows for s in SPLITS] == [5, 2, 3]


@pytest.mark.parametrize("unit", ["us", "ns"])
def test_any_timestamp_unit(log, tmp_path, unit):
    """The log's time unit is kept (Parquet has no seconds), and the splits are those of the
    same times in milliseconds."""
    table = pq.read_table(log)
    with_timestamps(log, tmp_path / "log.parquet",
                    table.column(TIMESTAMP).cast(pa.timestamp(unit, tz="UTC")))
    cut = datetime(2024, 3, 1, 2, 0, 0, 500_000, tzinfo=UTC)
    summaries = {}
    for name, path in (("ms", log), (unit, tmp_path / "log.parquet")):
        summaries[name] = split_by_time(path, tmp_path / name, valid_from=cut)
    for split in SPLITS:
        ours, theirs = read(tmp_path / unit, split), read(tmp_path / "ms", split)
        assert ours.schema.field(TIMESTAMP).type == pa.timestamp(unit, tz="UTC")
        assert ours.column(REQUEST_ID).equals(theirs.column(REQUEST_ID))
        # Times are printed to the log's precision (at most the microsecond).
        ours, theirs = summaries[unit]["splits"][split], summaries["ms"]["splits"][split]
        assert ours["first"][:19] == theirs["first"][:19] and ours["first"].endswith("Z")
        assert len(ours["first"]) == len("2024-03-01T02:01:00.000000Z")


def test_only_test_from_given_keeps_the_valid_share_before_it(log, tmp_path):
    test_from = datetime(2024, 3, 1, 4, 0, tzinfo=UTC)
    summary = split_by_time(log, tmp_path / "data", valid=0.2, test_from=test_from)
    times = {split: ms(read(tmp_path / "data", split)) for split in SPLITS}
    assert times["valid"].max() < at(test_from) <= times["test"].min()
    assert abs(len(times["valid"]) - 200) <= 8
    assert summary["cuts"]["valid_from"]["chosen"].startswith("the first of the last 0.2")


def test_row_groups_change_nothing_but_the_row_groups(tmp_path):
    """Streaming: the log read in row groups of 7 and written in row groups of 5 gives the
    tables that one row group in and out gives."""
    timestamps = shuffled_minutes(300, 50, seed=1)
    write_log(tmp_path / "one.parquet", timestamps)
    write_log(tmp_path / "many.parquet", timestamps, row_group_size=7)
    split_by_time(tmp_path / "one.parquet", tmp_path / "one")
    split_by_time(tmp_path / "many.parquet", tmp_path / "many", row_group_size=5)
    assert pq.ParquetFile(tmp_path / "many.parquet").num_row_groups == 43
    for split in SPLITS:
        assert read(tmp_path / "many", split).equals(read(tmp_path / "one", split))
        groups = pq.ParquetFile(tmp_path / "many" / f"{split}.parquet").metadata
        sizes = [groups.row_group(g).num_rows for g in range(groups.num_row_groups)]
        assert all(size == 5 for size in sizes[:-1]) and 0 < sizes[-1] <= 5


MEASURE = """
import sys
import pyarrow as pa
from nar4rec.data.split import split_by_time
split_by_time(sys.argv[1], sys.argv[2], row_group_size=250)
print(pa.default_memory_pool().max_memory())
"""


def test_the_log_is_streamed_not_loaded(tmp_path):
    """In a fresh process, the most memory Arrow ever holds while splitting a 30 MB log is a
    small part of it (row groups of 250 requests), where reading it whole would take it all."""
    write_log(tmp_path / "log.parquet", shuffled_minutes(20_000, 2000), candidates=100,
              row_group_size=250)
    whole = pq.read_table(tmp_path / "log.parquet").nbytes
    done = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "log.parquet"),
                           str(tmp_path / "data")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    peak = int(done.stdout)
    assert whole > 25_000_000
    assert peak < whole / 4, (peak, whole)


def test_a_folder_of_parts_is_one_log(log, tmp_path):
    table = pq.read_table(log)
    parts = tmp_path / "parts"
    parts.mkdir()
    for index, start in enumerate(range(0, table.num_rows, 400)):
        pq.write_table(table.slice(start, 400), parts / f"part-{index:03}.parquet")
    (parts / "_SUCCESS").write_text("")
    pq.write_table(table.slice(0, 3), parts / ".part-000.parquet.partial.parquet")  # hidden
    split_by_time(log, tmp_path / "whole")
    summary = split_by_time(parts, tmp_path / "data")
    for split in SPLITS:
        assert read(tmp_path / "data", split).equals(read(tmp_path / "whole", split))
    assert summary["read"]["requests"] == 1000
    # A part with other columns, or other behaviours or weights, is named.
    pq.write_table(table.drop_columns([UPSTREAM_SCORE]).slice(0, 5), parts / "part-999.parquet")
    with pytest.raises(DataError, match="part-999.parquet: its columns differ from those of "
                       ".*part-000.parquet: no column upstream_score$"):
        split_by_time(parts, tmp_path / "other")
    weights = FormatSpec(behaviours=("click",), utility_weights={"click": 2.0}, cand_num=("price",),
                         extra={"source": "a test"}).arrow_schema().metadata
    pq.write_table(table.slice(0, 5).replace_schema_metadata(weights), parts / "part-999.parquet")
    with pytest.raises(DataError, match="part-999.parquet: field 'nar4rec': its format metadata "
                       "differs from that of .*part-000.parquet$"):
        split_by_time(parts, tmp_path / "other")
    assert not (tmp_path / "other").exists()


def with_timestamps(log, path, column: pa.Array) -> None:
    """The log, its timestamp column replaced (a nullable field, the same metadata)."""
    table = pq.read_table(log)
    index = table.schema.get_field_index(TIMESTAMP)
    table = table.set_column(index, pa.field(TIMESTAMP, column.type), column)
    pq.write_table(table, path, row_group_size=64)


def error_cases(log, tmp_path):
    """(what, call, error class, text the message must hold); each names its field."""
    table = pq.read_table(log)
    nulls = table.column(TIMESTAMP).to_pylist()
    nulls[700] = None
    with_timestamps(log, tmp_path / "nulls.parquet", pa.array(nulls, TIMESTAMP_TYPE))
    with_timestamps(log, tmp_path / "ints.parquet", table.column(TIMESTAMP).cast(pa.int64()))
    write_log(tmp_path / "rerank.parquet", np.zeros(5), labels=False)
    pq.write_table(pq.read_table(tmp_path / "rerank.parquet").drop_columns([TIMESTAMP]),
                   tmp_path / "untimed.parquet")
    pq.write_table(table.drop_columns([TIMESTAMP]), tmp_path / "untimed-log.parquet")
    write_log(tmp_path / "same.parquet", np.full(50, START_MS))
    write_log(tmp_path / "few.parquet", shuffled_minutes(4, 4))
    write_log(tmp_path / "none.parquet", np.zeros(0))
    (tmp_path / "empty").mkdir()
    return [
        ("untimed request file", tmp_path / "untimed.parquet", {}, DataError,
         "untimed.parquet: field 'timestamp': required column is missing: split needs each "
         "request's time (a request file to rerank has none"),
        ("untimed log", tmp_path / "untimed-log.parquet", {}, DataError,
         "field 'timestamp': required column is missing"),
        ("request file", tmp_path / "rerank.parquet", {}, DataError,
         "field 'exposed': required column is missing (a request file to rerank"),
        ("null timestamp", tmp_path / "nulls.parquet", {}, DataError,
         "nulls.parquet: row 700: field 'timestamp': is null"),
        ("integer timestamp", tmp_path / "ints.parquet", {}, DataError,
         "field 'timestamp': expected a timestamp column, got int64"),
        ("valid 0", log, {"valid": 0.0}, Nar4recError, "valid must be a share"),
        ("test 1", log, {"test": 1.0}, Nar4recError, "test must be a share"),
        ("shares 1", log, {"valid": 0.5, "test": 0.5}, Nar4recError,
         "valid + test must be below 1"),
        ("valid after test", log, {"valid_from": date(2024, 3, 2), "test_from": date(2024, 3, 1)},
         Nar4recError, "valid_from (2024-03-02T00:00:00+00:00) must be before test_from"),
        ("all ties", tmp_path / "same.parquet", {}, DataError,
         "field 'timestamp': the train split would be empty: none of the 50 requests is "
         "before valid_from 2024-03-01T00:00:00.000Z (the 0.8 quantile)"),
        ("share of too few", tmp_path / "few.parquet", {}, DataError,
         "field 'timestamp': the valid split would be empty: valid=0.1 of 4 requests rounds "
         "to no request"),
        ("test after the log", log, {"test_from": date(2024, 3, 2)}, DataError,
         "field 'timestamp': the test split would be empty: none of the 1,000 requests is at "
         "or after test_from 2024-03-02T00:00:00.000Z (given)"),
        ("valid before the log", log, {"valid_from": date(2024, 2, 1)}, DataError,
         "the train split would be empty"),
        ("no requests", tmp_path / "none.parquet", {}, DataError,
         "none.parquet: the log has no requests"),
        ("empty folder", tmp_path / "empty", {}, DataError,
         "empty: no .parquet files in this directory"),
        ("no log", tmp_path / "nowhere.parquet", {}, DataError, "no such file or directory"),
    ]


def test_errors_name_the_field_and_leave_nothing(log, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    for what, source, options, error, text in error_cases(log, inputs):
        with pytest.raises(error) as raised:
            split_by_time(source, outputs / "data", **options)
        assert text in str(raised.value), what
        assert list(outputs.iterdir()) == [], what      # no data/, no .partial left over


def test_a_failure_while_writing_leaves_nothing(log, tmp_path, monkeypatch):
    calls = []

    def write(self, rows):
        calls.append(rows.num_rows)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        self.pending.append(rows)
        self.pending_rows += rows.num_rows

    monkeypatch.setattr("nar4rec.data.split._SplitWriter.write", write)
    with pytest.raises(OSError, match="No space left"):
        split_by_time(log, tmp_path / "out" / "data", row_group_size=10)
    assert list((tmp_path / "out").iterdir()) == []


def test_an_existing_output_is_kept_unless_overwrite(log, tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(Nar4recError, match="not empty"):
        split_by_time(log, out)
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    split_by_time(log, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["summary.json", "test.parquet",
                                                    "train.parquet", "valid.parquet"]
    # A log inside the output would be deleted by --overwrite: refused.
    inside = out / "log.parquet"
    inside.write_bytes(log.read_bytes())
    with pytest.raises(Nar4recError, match="inside the output directory"):
        split_by_time(inside, out, overwrite=True)
    assert inside.exists()


def test_cli_end_to_end(simulated, tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["split", str(simulated / "train.parquet"), "--out", str(out),
                 "--valid", "0.2", "--test", "0.25"]) == 0
    lines = capsys.readouterr().out.splitlines()
    summary = json.loads((out / "summary.json").read_text())
    assert len(lines) == 4 and lines[-1].startswith(f"wrote {out}/: train.parquet")
    for line, split in zip(lines, SPLITS, strict=False):
        info = summary["splits"][split]
        assert line == f"{split}: {info['requests']:,} requests, {info['first']} to " \
                       f"{info['last']}"
    assert abs(summary["splits"]["test"]["requests"] - 100) <= 2    # 400 requests in train
    assert main(["validate", str(out)]) == 0
    capsys.readouterr()
    # Explicit times, and an error: one line naming the file and field, exit 2.
    assert main(["split", str(simulated / "train.parquet"), "--out", str(out), "--overwrite",
                 "--valid-from", "2024-03-10", "--test-from", "2024-03-20T12:00"]) == 0
    assert capsys.readouterr().out.startswith("train: ")
    assert main(["split", str(simulated / "train.parquet"), "--out", str(tmp_path / "late"),
                 "--test-from", "2030-01-01"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nar4rec: error: ") and "field 'timestamp': the test split" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "late").exists()
    with pytest.raises(SystemExit):
        main(["split", str(simulated / "train.parquet"), "--out", str(out),
              "--test-from", "next week"])
    assert "expected a date YYYY-MM-DD" in capsys.readouterr().err
