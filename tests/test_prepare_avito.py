"""The Avito converter against files in the exact Kaggle layout (tests/avito_fixtures.py)."""

from __future__ import annotations

import json
import math
from datetime import UTC
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from avito_fixtures import (
    KNOWN_DATE,
    KNOWN_ORDER,
    KNOWN_SEARCH,
    KNOWN_USER,
    MISSING_AD,
    NO_CONTEXT_SEARCH,
    NO_INFO_SEARCH,
    expected_requests,
    make_avito,
    write_avito,
)
from nar4rec.data.avito import SPLITS, prepare_avito
from nar4rec.data.validate import validate_file
from nar4rec.errors import DataError, Nar4recError

TRAIN_DAYS, VALID_DAYS = 21, 1


def split_of(day: int, train_days: int = TRAIN_DAYS, valid_days: int = VALID_DAYS) -> str:
    if day < train_days - valid_days:
        return "train"
    return "valid" if day < train_days else "test"


def expected_counts(expected, **split_args) -> dict[str, tuple[int, int, int]]:
    """(requests, exposures, clicks) per split, by plain Python over the generated rows."""
    counts = {name: [0, 0, 0] for name in SPLITS}
    for search_id, day in expected.day.items():
        rows = expected.exposures[search_id]
        c = counts[split_of(day, **split_args)]
        c[0] += 1
        c[1] += len(rows)
        c[2] += sum(click for *_, click in rows)
    return {name: tuple(c) for name, c in counts.items()}


def as_tuple(counts) -> tuple[int, int, int]:
    return counts.requests, counts.exposures, counts.positives["click"]


def read_rows(out: Path) -> dict[str, list[dict]]:
    return {name: pq.read_table(out / f"{name}.parquet").to_pylist() for name in SPLITS}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """300 searches over 28 days, converted once with the defaults."""
    root = tmp_path_factory.mktemp("avito")
    data = make_avito(searches=300, seed=0)
    raw = write_avito(data, root / "raw")
    report = prepare_avito(raw, root / "out")
    return data, expected_requests(data), report, root / "out"


def test_counts_balance_and_match_an_independent_count(converted):
    data, expected, report, out = converted
    assert report.balanced()
    want = expected_counts(expected)
    assert {name: as_tuple(report.written[name]) for name in SPLITS} == want
    all_rows = [row for rows in expected.exposures.values() for row in rows]
    assert as_tuple(report.read) == (len(expected.exposures), len(all_rows),
                                     sum(click for *_, click in all_rows))
    no_info = expected.exposures[NO_INFO_SEARCH]
    assert as_tuple(report.dropped["no SearchInfo row"]) == (
        1, len(no_info), sum(click for *_, click in no_info))
    assert json.loads((out / "summary.json").read_text()) == report.as_dict()
    assert all(want[name][0] > 0 for name in SPLITS)  # every split is exercised


def test_every_output_file_is_valid(converted):
    *_, out = converted
    for name in SPLITS:
        assert validate_file(out / f"{name}.parquet") == []


def test_lists_follow_position_order_with_histctr_and_clicks(converted):
    data, expected, _, out = converted
    seen = set()
    for rows in read_rows(out).values():
        for row in rows:
            want = expected.exposures[row["request_id"]]  # sorted by (Position, AdID)
            assert row["item_id"] == [ad for _, ad, _, _ in want]
            n = len(want)
            assert row["exposed"] == list(range(n))
            np.testing.assert_array_equal(
                np.float32(row["upstream_score"]), np.float32([ctr for *_, ctr, _ in want]))
            assert row["feedback_click"] == [float(click) for *_, click in want]
            assert row["user_id"] == data.searches[row["request_id"]].user_id
            seen.add(row["request_id"])
    assert seen == set(expected.day)
    assert NO_CONTEXT_SEARCH not in seen and NO_INFO_SEARCH not in seen


def test_time_split_puts_each_day_in_its_file_in_time_order(converted):
    _, expected, _, out = converted
    first = min(expected.day, key=lambda s: (expected.day[s], s))
    for name, rows in read_rows(out).items():
        assert rows, name
        keys = [(row["timestamp"], row["request_id"]) for row in rows]
        assert keys == sorted(keys)
        for row in rows:
            assert split_of(expected.day[row["request_id"]]) == name
    assert first in {row["request_id"] for row in read_rows(out)["train"]}


def test_a_known_search_end_to_end(converted):
    data, expected, _, out = converted
    rows = read_rows(out)[split_of(expected.day[KNOWN_SEARCH])]
    [row] = [r for r in rows if r["request_id"] == KNOWN_SEARCH]
    assert row["user_id"] == KNOWN_USER
    assert row["timestamp"] == KNOWN_DATE.replace(tzinfo=UTC)
    assert row["item_id"] == KNOWN_ORDER  # 7001 and 7002 tie at Position 1, 7003 is at 7
    assert row["upstream_score"] == pytest.approx([0.003, 0.1, 0.012345])
    assert row["feedback_click"] == [0.0, 0.0, 1.0]
    user = {k[len("user_cat_"):]: v for k, v in row.items() if k.startswith("user_cat_")}
    assert user == {"logged_on": 1, "search_location": 102, "search_region": 100,
                    "search_city": 1021, "search_category": 11, "search_parent_category": 1,
                    "user_agent": 11, "user_agent_os": 12, "user_device": 13,
                    "user_agent_family": 14}
    assert row["user_num_has_query"] == 1.0
    assert row["user_num_log1p_query_length"] == pytest.approx(math.log1p(len('диван "угловой"')))
    assert row["user_num_num_search_params"] == 2.0
    assert row["cand_cat_ad_category"] == [10, 20, 21]
    assert row["cand_cat_ad_parent_category"] == [1, 2, 2]
    assert row["cand_cat_ad_location"] == [101, None, 201]  # 7002 has an empty LocationID
    assert row["cand_cat_ad_region"] == [100, None, 200]
    assert row["cand_cat_ad_city"] == [1011, None, 2011]
    assert row["cand_num_log1p_price"] == pytest.approx([math.log1p(15000), 0.0, 0.0])
    assert row["cand_num_price_missing"] == [0.0, 1.0, 0.0]  # 7003's price is 0.0, not empty
    assert row["cand_num_log1p_title_length"] == pytest.approx(
        [math.log1p(len('Кровать "Аскона" 160x200')), math.log1p(len("Диван 'Честер'")), 0.0])
    assert row["cand_num_num_ad_params"] == [1.0, 0.0, 0.0]


def test_an_ad_without_adsinfo_keeps_its_exposure_with_null_features(converted):
    _, _, report, out = converted
    rows = [r for rs in read_rows(out).values() for r in rs if MISSING_AD in r["item_id"]]
    assert len(rows) == 1
    i = rows[0]["item_id"].index(MISSING_AD)
    assert rows[0]["cand_cat_ad_category"][i] is None
    assert rows[0]["cand_num_price_missing"][i] == 1.0
    assert any("no AdsInfo row" in note for note in report.notes)


def test_other_split_days_and_absent_optional_files(tmp_path):
    data = make_avito(searches=200, seed=3)
    raw = write_avito(data, tmp_path / "raw", optional=False)
    report = prepare_avito(raw, tmp_path / "out", train_days=10, valid_days=3)
    want = expected_counts(expected_requests(data), train_days=10, valid_days=3)
    assert {name: as_tuple(report.written[name]) for name in SPLITS} == want
    assert report.balanced()
    rows = [r for rs in read_rows(tmp_path / "out").values() for r in rs]
    assert all(r["user_cat_user_agent"] is None and r["user_cat_search_region"] is None
               and set(r["cand_cat_ad_parent_category"]) == {None} for r in rows)
    assert any(r["user_cat_search_location"] is not None for r in rows)
    assert sum("is absent" in note for note in report.notes) == 3


def test_an_empty_split_gets_no_file(tmp_path):
    data = make_avito(searches=100, seed=7)
    raw = write_avito(data, tmp_path / "raw")
    report = prepare_avito(raw, tmp_path / "out", train_days=40, valid_days=5)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.json",
                                                                     "train.parquet"]
    assert report.written["valid"].requests == report.written["test"].requests == 0
    assert report.written["train"].requests > 0 and report.balanced()
    assert "test: no request, no file written" in report.notes


def test_overwrite_replaces_an_existing_output(tmp_path):
    raw = write_avito(make_avito(searches=50, seed=1), tmp_path / "raw")
    prepare_avito(raw, tmp_path / "out")
    with pytest.raises(Nar4recError, match="not empty"):
        prepare_avito(raw, tmp_path / "out")
    report = prepare_avito(raw, tmp_path / "out", overwrite=True)
    assert report.balanced() and (tmp_path / "out" / "train.parquet").exists()
    assert not (tmp_path / "out" / ".duckdb").exists()


# Bad inputs: each names the file, the line (header = line 1) and the field, and leaves no output.

STREAM = "trainSearchStream.tsv"


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")


def first_line(path: Path, predicate) -> int:
    """The 1-based number of the first data line whose fields satisfy `predicate`."""
    lines = lines_of(path)
    return next(i + 1 for i, line in enumerate(lines[1:], start=1)
                if line and predicate(line.split("\t")))


def set_field(path: Path, line: int, column: int, value: str) -> None:
    lines = lines_of(path)
    fields = lines[line - 1].split("\t")
    fields[column] = value
    lines[line - 1] = "\t".join(fields)
    path.write_text("\n".join(lines), encoding="utf-8")


def contextual(fields: list[str]) -> bool:
    return fields[3] == "3"


def bad_value(file: str, column: int, value: str, which=contextual):
    def corrupt(raw: Path) -> tuple[int, str]:
        line = first_line(raw / file, which)
        set_field(raw / file, line, column, value)
        return line, value
    return corrupt


def truncate_stream(raw: Path) -> tuple[int, str]:
    path = raw / STREAM
    text = path.read_text(encoding="utf-8").rstrip("\n")
    last = text.rsplit("\n", 1)[1]
    cut = len(text) - len(last) + len("\t".join(last.split("\t")[:3]))
    path.write_text(text[:cut], encoding="utf-8")
    return len(text.split("\n")), "truncated"


def rename_header(file: str, old: str, new: str):
    def corrupt(raw: Path) -> tuple[int, str]:
        path = raw / file
        lines = lines_of(path)
        lines[0] = lines[0].replace(old, new)
        path.write_text("\n".join(lines), encoding="utf-8")
        return 1, f"no column '{old}'"
    return corrupt


def repeat_search(raw: Path) -> tuple[int, str]:
    path = raw / "SearchInfo.tsv"
    lines = lines_of(path)
    known = next(line for line in lines if line.startswith(f"{KNOWN_SEARCH}\t"))
    lines.insert(len(lines) - 1, known)  # before the final empty string
    path.write_text("\n".join(lines), encoding="utf-8")
    return len(lines) - 1, "repeated"


def is_known_search(fields: list[str]) -> bool:
    return fields[0] == str(KNOWN_SEARCH)


BAD_INPUTS = {
    "non-numeric AdID": (STREAM, "AdID", bad_value(STREAM, 1, "12a")),
    "non-numeric SearchID on a regular ad": (
        STREAM, "SearchID", bad_value(STREAM, 0, "x1", which=lambda f: f[3] == "1")),
    "non-numeric Position": (STREAM, "Position", bad_value(STREAM, 2, "first")),
    "non-numeric ObjectType": (STREAM, "ObjectType", bad_value(STREAM, 3, "three")),
    "non-numeric HistCTR": (STREAM, "HistCTR", bad_value(STREAM, 4, "0,05")),
    "NaN HistCTR": (STREAM, "HistCTR", bad_value(STREAM, 4, "nan")),
    "infinite HistCTR": (STREAM, "HistCTR", bad_value(STREAM, 4, "inf")),
    "empty HistCTR on a contextual ad": (STREAM, "HistCTR", bad_value(STREAM, 4, "")),
    "IsClick 2": (STREAM, "IsClick", bad_value(STREAM, 5, "2")),
    "ObjectType 4": (STREAM, "ObjectType", bad_value(STREAM, 3, "4")),
    "truncated stream": (STREAM, "ObjectType", truncate_stream),
    "missing column": ("SearchInfo.tsv", "UserID",
                       rename_header("SearchInfo.tsv", "UserID", "UserId")),
    "bad SearchDate": ("SearchInfo.tsv", "SearchDate",
                       bad_value("SearchInfo.tsv", 1, "10/05/2015", which=is_known_search)),
    "empty UserID": ("SearchInfo.tsv", "UserID",
                     bad_value("SearchInfo.tsv", 3, "", which=is_known_search)),
    "repeated SearchID": ("SearchInfo.tsv", "SearchID", repeat_search),
    "negative Price": ("AdsInfo.tsv", "Price",
                       bad_value("AdsInfo.tsv", 4, "-5.0", which=lambda f: f[0] == "7001")),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_file_line_and_field_and_leaves_nothing(tmp_path, case):
    file, field, corrupt = BAD_INPUTS[case]
    raw = write_avito(make_avito(searches=40, seed=2), tmp_path / "raw")
    line, hint = corrupt(raw)
    with pytest.raises(DataError) as caught:
        prepare_avito(raw, tmp_path / "out")
    error = caught.value
    assert (Path(error.file).name, error.row, error.field) == (file, line, field), str(error)
    assert hint in str(error)
    assert f"row {line}" in str(error) and file in str(error)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no output, no temp dir


def test_missing_required_file_and_no_contextual_ads(tmp_path):
    data = make_avito(searches=30, seed=4)
    raw = write_avito(data, tmp_path / "raw")
    (raw / "AdsInfo.tsv").unlink()
    with pytest.raises(DataError, match="required file is missing") as caught:
        prepare_avito(raw, tmp_path / "out")
    assert Path(caught.value.file).name == "AdsInfo.tsv"

    data.stream = [row for row in data.stream if row[3] != 3]
    raw = write_avito(data, tmp_path / "raw")
    with pytest.raises(DataError, match="no contextual ads") as caught:
        prepare_avito(raw, tmp_path / "out")
    assert Path(caught.value.file).name == STREAM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


@pytest.mark.parametrize("arguments", [{"memory_limit": "lots"}, {"train_days": 0},
                                       {"valid_days": 21}, {"threads": 0}])
def test_bad_arguments_are_one_line_errors(tmp_path, arguments):
    raw = write_avito(make_avito(searches=20, seed=6), tmp_path / "raw")
    with pytest.raises(Nar4recError) as caught:
        prepare_avito(raw, tmp_path / "out", **arguments)
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_a_tiny_memory_limit_still_converts_every_click(tmp_path):
    """About 220k stream rows under memory_limit=100MB, about the smallest workable limit.

    At this size DuckDB hardly needs to spill; docs/converters/avito.md records runs that do.
    """
    data = make_avito(searches=45_000, seed=5)
    raw = write_avito(data, tmp_path / "raw")
    report = prepare_avito(raw, tmp_path / "out", memory_limit="100MB", threads=2)
    expected = expected_requests(data)
    assert report.balanced()
    assert {name: as_tuple(report.written[name]) for name in SPLITS} == expected_counts(expected)
    for name in SPLITS:
        assert validate_file(tmp_path / "out" / f"{name}.parquet") == []
