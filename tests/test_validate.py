"""The format's invariants: every kind of bad row is reported with its row and field."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import plackett_luce_log, simulate_small
from nar4rec.cli import main
from nar4rec.data.format import METADATA_KEY, read_spec
from nar4rec.data.validate import check_file, validate_file


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "data"
    simulate_small(out, requests=600)
    return out


def rewrite(table: pa.Table, path, column: str, values: list) -> None:
    """Write `table` with one column replaced, keeping the schema and its metadata."""
    index = table.schema.get_field_index(column)
    field = table.schema.field(index)
    table = table.set_column(index, field, pa.array(values, type=field.type))
    pq.write_table(table, path)


def problems_of(path) -> set[tuple[int | None, str | None]]:
    return {(p.row, p.field) for p in validate_file(path)}


def test_simulated_file_is_valid_and_summary_counts_are_independent(data, tmp_path):
    path = data / "valid.parquet"
    report = check_file(path)
    assert report.ok
    table = pq.read_table(path)
    assert report.counts.requests == table.num_rows
    assert report.counts.exposures == sum(len(x) for x in table.column("exposed").to_pylist())
    for behaviour, count in report.counts.positives.items():
        values = table.column(f"feedback_{behaviour}").to_pylist()
        assert count == sum(v != 0 for row in values for v in row)
    assert main(["validate", str(path), "--json", str(tmp_path / "s.json")]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["requests"] == report.counts.requests
    assert summary["positives"] == report.counts.positives


@pytest.mark.parametrize("row", [0, 17])
def test_bad_exposed_lists_are_located(data, tmp_path, row):
    table = pq.read_table(data / "valid.parquet")
    exposed = table.column("exposed").to_pylist()
    bad = tmp_path / "bad.parquet"

    exposed_range = [list(x) for x in exposed]
    exposed_range[row][2] = 60
    rewrite(table, bad, "exposed", exposed_range)
    assert problems_of(bad) == {(row, "exposed")}

    repeated = [list(x) for x in exposed]
    repeated[row][3] = repeated[row][1]
    rewrite(table, bad, "exposed", repeated)
    assert problems_of(bad) == {(row, "exposed")}

    negative = [list(x) for x in exposed]
    negative[row][0] = -1
    rewrite(table, bad, "exposed", negative)
    assert problems_of(bad) == {(row, "exposed")}
    messages = [p.message for p in validate_file(bad)]
    assert len(messages) == 1 and "outside" in messages[0]   # not also "the same twice"


def test_lengths_numbers_and_m_greater_than_n(data, tmp_path):
    table = pq.read_table(data / "valid.parquet")
    bad = tmp_path / "bad.parquet"

    likes = table.column("feedback_like").to_pylist()
    likes[5] = likes[5] + [0.0]
    rewrite(table, bad, "feedback_like", likes)
    assert problems_of(bad) == {(5, "feedback_like")}

    views = table.column("feedback_view").to_pylist()
    views[9][0] = float("nan")
    views[11][1] = float("inf")
    rewrite(table, bad, "feedback_view", views)
    assert problems_of(bad) == {(9, "feedback_view"), (11, "feedback_view")}

    numbers = table.column("user_num_log_activity").to_pylist()
    numbers[3] = float("nan")
    rewrite(table, bad, "user_num_log_activity", numbers)
    assert problems_of(bad) == {(3, "user_num_log_activity")}

    # Row 4 keeps 3 candidates but still shows 6: m > n (and its candidate lists are short).
    short = {}
    for name in table.column_names:
        if pa.types.is_list(table.schema.field(name).type) and name != "exposed" \
                and not name.startswith("feedback_"):
            values = table.column(name).to_pylist()
            values[4] = values[4][:3]
            short[name] = values
    for name, values in short.items():
        index = table.schema.get_field_index(name)
        table = table.set_column(index, table.schema.field(index),
                                 pa.array(values, type=table.schema.field(index).type))
    pq.write_table(table, bad)
    messages = [p for p in validate_file(bad) if p.row == 4 and p.field == "exposed"]
    assert any("m > n" in p.message for p in messages)
    assert all(p.row == 4 for p in validate_file(bad))


def test_schema_problems(data, tmp_path):
    table = pq.read_table(data / "valid.parquet")
    missing = tmp_path / "missing.parquet"
    pq.write_table(table.drop_columns(["exposed"]), missing)
    assert problems_of(missing) == {(None, "exposed")}

    wrong = tmp_path / "wrong.parquet"
    index = table.schema.get_field_index("user_num_log_activity")
    as_text = table.set_column(index, pa.field("user_num_log_activity", pa.string()),
                               pa.array(["x"] * table.num_rows))
    pq.write_table(as_text, wrong)
    assert problems_of(wrong) == {(None, "user_num_log_activity")}

    unknown = tmp_path / "unknown.parquet"
    pq.write_table(table.append_column("feedback_share", table.column("feedback_like")), unknown)
    assert problems_of(unknown) == {(None, "feedback_share")}

    no_meta = tmp_path / "no_meta.parquet"
    pq.write_table(table.replace_schema_metadata({}), no_meta)
    assert [p.field for p in validate_file(no_meta)] == [None]

    empty = tmp_path / "empty.parquet"
    pq.write_table(table.slice(0, 0), empty)
    assert "no requests" in validate_file(empty)[0].message

    meta = json.loads(table.schema.metadata[METADATA_KEY])
    meta["utility_weights"]["like"] = "a lot"
    bad_weight = tmp_path / "bad_weight.parquet"
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta)}), bad_weight)
    assert problems_of(bad_weight) == {(None, "nar4rec.utility_weights")}


def test_repeated_request_ids(data, tmp_path):
    table = pq.read_table(data / "valid.parquet")
    ids = table.column("request_id").to_pylist()
    ids[7] = ids[2]
    bad = tmp_path / "bad.parquet"
    rewrite(table, bad, "request_id", ids)
    assert problems_of(bad) == {(2, "request_id"), (7, "request_id")}


def test_truncated_and_missing_files_fail_cleanly(data, tmp_path):
    truncated = tmp_path / "truncated.parquet"
    raw = (data / "valid.parquet").read_bytes()
    truncated.write_bytes(raw[: len(raw) // 2])
    assert len(validate_file(truncated)) == 1
    for path in (truncated, tmp_path / "nothing.parquet"):
        done = subprocess.run([sys.executable, "-m", "nar4rec", "validate", str(path)],
                              capture_output=True, text=True)
        assert done.returncode != 0
        assert str(path) in done.stderr
        assert "Traceback" not in done.stderr


def test_cli_reports_every_problem_and_exits_1(data, tmp_path):
    table = pq.read_table(data / "valid.parquet")
    exposed = [list(x) for x in table.column("exposed").to_pylist()]
    for row in (1, 4, 9):
        exposed[row][0] = 99
    bad = tmp_path / "bad.parquet"
    rewrite(table, bad, "exposed", exposed)
    done = subprocess.run([sys.executable, "-m", "nar4rec", "validate", str(bad)],
                          capture_output=True, text=True)
    assert done.returncode == 1
    for row in (1, 4, 9):
        assert f"{bad}: row {row}: field 'exposed'" in done.stderr
    assert read_spec(bad).behaviours == ("view", "like", "follow", "long_view", "complete_view")
    assert np.isfinite(read_spec(bad).weights).all()


def with_column(table: pa.Table, column: str, values: list, value_type: pa.DataType) -> pa.Table:
    """`table` with one column replaced by `values` of another type, keeping the metadata."""
    index = table.schema.get_field_index(column)
    return table.set_column(index, pa.field(column, value_type), pa.array(values, value_type))


def test_float64_values_beyond_float32s_range_are_located(data, tmp_path):
    # A float64 column can hold finite numbers that the models' float32 cannot.
    table = pq.read_table(data / "valid.parquet")
    user = table.column("user_num_log_activity").to_pylist()
    user[3], user[4] = 1e39, -3.4e38                     # beyond; within (float32 max 3.40e38)
    duration = table.column("cand_num_duration").to_pylist()
    duration[6][2] = -1e300
    scores = table.column("upstream_score").to_pylist()
    scores[8][0] = 5e38
    propensity = table.column("log_propensity").to_pylist()
    propensity[10] = -1e39
    table = with_column(table, "user_num_log_activity", user, pa.float64())
    table = with_column(table, "cand_num_duration", duration, pa.list_(pa.float64()))
    table = with_column(table, "upstream_score", scores, pa.list_(pa.float64()))
    table = with_column(table, "log_propensity", propensity, pa.float64())
    bad = tmp_path / "bad.parquet"
    pq.write_table(table, bad)
    problems = validate_file(bad)
    assert {(p.row, p.field) for p in problems} == {
        (3, "user_num_log_activity"), (6, "cand_num_duration"), (8, "upstream_score"),
        (10, "log_propensity")}
    assert all("beyond float32's range" in p.message for p in problems)


def test_a_repeated_candidate_is_located(data, tmp_path):
    # A list cannot show one item twice, so a request's candidates are distinct items (the
    # service refuses a repeat too: test_serve.py).
    table = pq.read_table(data / "valid.parquet")
    items = table.column("item_id").to_pylist()
    items[6][4] = items[6][1]
    items[9][7] = items[9][2] = items[9][0]
    bad = tmp_path / "bad.parquet"
    rewrite(table, bad, "item_id", items)
    problems = validate_file(bad)
    assert [(p.row, p.field) for p in problems] == [(6, "item_id"), (9, "item_id")]
    assert f"item id {items[6][1]!r} appears twice" in problems[0].message
    as_text = with_column(table, "item_id", [[f"v{i}" for i in row] for row in items],
                          pa.list_(pa.string()))
    pq.write_table(as_text, bad)
    assert [(p.row, p.field) for p in validate_file(bad)] == [(6, "item_id"), (9, "item_id")]


LOGGING = ("logging_score", "logging_temperature", "logging_marginal",
           "logging_prefix_log_propensity")


def test_logs_without_logging_columns_stay_valid(data, tmp_path):
    table = pq.read_table(data / "valid.parquet")
    assert {"logging_score", "logging_temperature",
            "logging_prefix_log_propensity"} <= set(table.column_names)
    old = tmp_path / "old.parquet"
    pq.write_table(table.drop_columns([c for c in LOGGING if c in table.column_names]), old)
    assert validate_file(old) == []
    assert not read_spec(old).has_logging


def test_logging_columns_are_checked_row_by_row(tmp_path):
    good = tmp_path / "good.parquet"
    table = plackett_luce_log(good)
    assert validate_file(good) == []                      # the last row's policy unknown
    spec = read_spec(good)
    assert spec.has_logging_score and spec.has_logging_marginal and spec.has_logging_prefix
    bad = tmp_path / "bad.parquet"

    def problems_with(column: str, change) -> set[tuple[int | None, str | None]]:
        values = table.column(column).to_pylist()
        change(values)
        rewrite(table, bad, column, values)
        return problems_of(bad)

    def shorter(values):
        values[1] = values[1][:4]

    def zero(values):
        values[2] = 0.0

    def one_null(values):
        values[0] = None

    def off(values):
        values[3] -= 0.01

    assert problems_with("logging_score", shorter) == {(1, "logging_score")}
    assert problems_with("logging_temperature", zero) == {(2, "logging_temperature")}
    assert problems_with("logging_temperature", one_null) == {(0, "logging_temperature")}
    # the fields disagree: log_propensity is not the scores' probability of the list
    assert problems_with("log_propensity", off) == {(3, "log_propensity"),
                                                   (3, "logging_prefix_log_propensity")}

    def prefix_grows(values):
        values[1][1] = values[1][0] + 0.5

    def prefix_positive(values):
        values[2][0] = 0.3

    def prefix_other_policy(values):
        values[0][0] -= 0.1                               # still <= 0 and non-increasing

    def prefix_long(values):
        values[4] = values[4] + [values[4][-1]]

    assert problems_with("logging_prefix_log_propensity", prefix_grows) == {
        (1, "logging_prefix_log_propensity")}
    assert problems_with("logging_prefix_log_propensity", prefix_positive) == {
        (2, "logging_prefix_log_propensity")}
    assert problems_with("logging_prefix_log_propensity", prefix_other_policy) == {
        (0, "logging_prefix_log_propensity")}
    assert problems_with("logging_prefix_log_propensity", prefix_long) == {
        (4, "logging_prefix_log_propensity")}

    exposed = table.column("exposed").to_pylist()

    def column_sum(values):
        values[1][0][0] += 0.1                            # position 0 sums to 1.1

    def unreachable(values):                              # the shown item: probability 0
        shown, other = exposed[4][0], 1 - exposed[4][0]
        values[4][shown][0], values[4][other][0] = 0.0, 1.0

    def above_one(values):
        values[2][0][1] = 1.5

    def too_many_positions(values):
        values[3][0] = values[3][0] + [0.0]

    def a_nan(values):
        values[0][2][1] = float("nan")

    for change, row in ((column_sum, 1), (unreachable, 4), (above_one, 2),
                        (too_many_positions, 3), (a_nan, 0)):
        assert problems_with("logging_marginal", change) == {(row, "logging_marginal")}, \
            change.__name__
    messages = [p.message for p in validate_file(bad)]
    assert messages == ["has a value that is not finite (NaN or infinite)"]

    rows_over_one = table.column("logging_marginal").to_pylist()
    rows_over_one[4] = [[1.0, 1.0], [0.0, 0.0]]           # candidate 0 at both positions
    rewrite(table, bad, "logging_marginal", rows_over_one)
    assert any("sum to more than 1" in p.message for p in validate_file(bad))

    # both or neither of the Plackett-Luce columns; a file with any logging_ column is a log
    pq.write_table(table.drop_columns(["logging_temperature"]), bad)
    assert problems_of(bad) == {(None, "logging_temperature")}
    pq.write_table(table.drop_columns(["exposed", "feedback_click", "log_propensity",
                                       "logging_marginal", "logging_prefix_log_propensity"]),
                   bad)
    assert problems_of(bad) == {(None, "feedback_click")}       # its labels are missing
