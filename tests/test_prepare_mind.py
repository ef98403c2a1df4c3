"""The MIND converter on the real MIND sample, and on small hand-written bad files."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
from collections import Counter
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy import stats

from nar4rec.data.format import read_spec
from nar4rec.data.mind import prepare_mind
from nar4rec.data.validate import validate_file
from nar4rec.errors import DataError, Nar4recError

SPLITS = ("train", "valid", "test")


def parse_behaviors(path: Path) -> list[dict]:
    """behaviors.tsv read with plain Python: the oracle the converter is checked against."""
    impressions = []
    for line in path.read_text().splitlines():
        impression_id, user, time, history, shown = line.split("\t")
        tokens = [token.rsplit("-", 1) for token in shown.split(" ")]
        impressions.append({
            "id": impression_id, "user": user,
            "time": datetime.strptime(time, "%m/%d/%Y %I:%M:%S %p"),
            "history": history.split(" ") if history else [],
            "items": [news for news, _ in tokens],
            "clicks": [float(label) for _, label in tokens],
        })
    return impressions


def parse_news(path: Path) -> dict[str, tuple[str, str]]:
    news = {}
    for line in path.read_text().splitlines():
        fields = line.split("\t")
        news.setdefault(fields[0], (fields[1], fields[2]))
    return news


@pytest.fixture(scope="module")
def mind(shared_data: Path, tmp_path_factory) -> dict:
    sample = shared_data / "mind-sample"
    out = tmp_path_factory.mktemp("mind") / "out"
    report = prepare_mind([sample / "behaviors.tsv"], sample / "news.tsv", out)
    rows = {split: pq.read_table(out / f"{split}.parquet").to_pylist() for split in SPLITS}
    return {"report": report, "out": out, "rows": rows, "sample": sample,
            "impressions": parse_behaviors(sample / "behaviors.tsv"),
            "news": parse_news(sample / "news.tsv")}


def test_counts_balance_and_match_a_plain_count(mind):
    report, impressions = mind["report"], mind["impressions"]
    assert report.balanced()
    assert report.read.requests == len(impressions) == 4032
    assert report.read.exposures == sum(len(i["items"]) for i in impressions)
    assert report.read.positives["click"] == sum(sum(i["clicks"]) for i in impressions)
    total = report.written_total
    assert (total.requests, total.exposures, total.positives) == (
        report.read.requests, report.read.exposures, report.read.positives)
    assert report.dropped == {}


def test_outputs_validate(mind):
    for split in SPLITS:
        path = mind["out"] / f"{split}.parquet"
        assert validate_file(path) == []
        assert read_spec(path).utility_weights == {"click": 1.0}


def test_a_known_impression(mind):
    first = mind["impressions"][0]  # 58376 U81994 11/12/2019 2:14:46 PM: the day before the last
    row = next(r for r in mind["rows"]["valid"] if r["request_id"] == "58376")
    assert row["user_id"] == "U81994" == first["user"]
    assert row["timestamp"].replace(tzinfo=None) == datetime(2019, 11, 12, 14, 14, 46)
    assert row["item_id"] == first["items"]
    assert row["item_id"][:3] == ["N43266", "N58363", "N6975"]
    assert row["exposed"] == list(range(len(first["items"])))
    assert row["feedback_click"] == first["clicks"]
    assert row["feedback_click"][2] == 1.0


def test_features_match_an_independent_computation(mind):
    news = mind["news"]
    by_id = {i["id"]: i for i in mind["impressions"]}
    known_candidates = 0
    for row in (r for rows in mind["rows"].values() for r in rows):
        impression = by_id[row["request_id"]]
        categories = [news.get(n, (None, None)) for n in impression["items"]]
        assert row["cand_cat_category"] == [c for c, _ in categories]
        assert row["cand_cat_subcategory"] == [s for _, s in categories]
        history = Counter(news[n][0] for n in impression["history"] if n in news)
        known = sum(history.values())
        assert row["user_num_log_history"] == pytest.approx(
            math.log1p(len(impression["history"])))
        assert row["user_num_log_history_known"] == pytest.approx(math.log1p(known))
        top = min(history.items(), key=lambda kv: (-kv[1], kv[0]))[0] if history else None
        assert row["user_cat_top_category"] == top
        shares = [history[c] / known if c is not None and known else 0.0
                  for c, _ in categories]
        assert row["cand_num_category_share"] == pytest.approx(shares, abs=1e-6)
        known_candidates += sum(c is not None for c, _ in categories)
    assert known_candidates > 0  # the sample covers a few percent of the impressed news


def test_clicks_are_spread_evenly_over_the_listed_order(mind):
    """The candidates keep the impression's listed order (the logging policy's, m = n), which
    carries no label on the sample: the clicks' mean index is (n-1)/2 within 4 standard errors
    (z = -1.2) and the list's quarters hold them as a uniform order would (chi-square, p 0.57).
    A converter that put clicked news first or last would fail here."""
    deviation = variance = 0.0
    observed, expected = np.zeros(4), np.zeros(4)
    for row in (r for rows in mind["rows"].values() for r in rows):
        n = len(row["item_id"])
        assert row["exposed"] == list(range(n))
        clicked = np.flatnonzero(row["feedback_click"])
        k = len(clicked)
        deviation += clicked.sum() - k * (n - 1) / 2
        variance += k * (n * n - 1) / 12 * (n - k) / max(n - 1, 1)  # k of n, no replacement
        quarter = 4 * np.arange(n) // n
        observed += np.bincount(quarter[clicked], minlength=4)
        expected += k * np.bincount(quarter, minlength=4) / n
    assert observed.sum() == mind["report"].read.positives["click"]
    assert abs(deviation / math.sqrt(variance)) < 4
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_split_by_date(mind):
    days = {split: {r["timestamp"].date() for r in rows} for split, rows in mind["rows"].items()}
    assert days["test"] == {date(2019, 11, 13)}
    assert days["valid"] == {date(2019, 11, 12)}
    assert days["train"] == {date(2019, 11, 9), date(2019, 11, 10), date(2019, 11, 11)}
    for rows in mind["rows"].values():
        times = [r["timestamp"] for r in rows]
        assert times == sorted(times)


def test_split_dates_given(mind, tmp_path):
    sample = mind["sample"]
    report = prepare_mind([sample / "behaviors.tsv"], sample / "news.tsv", tmp_path / "out",
                          test_from=date(2019, 11, 12), valid_from=date(2019, 11, 10))
    per_day = Counter(i["time"].date() for i in mind["impressions"])
    assert report.written["test"].requests == per_day[date(2019, 11, 12)] + per_day[
        date(2019, 11, 13)]
    assert report.written["valid"].requests == per_day[date(2019, 11, 10)] + per_day[
        date(2019, 11, 11)]
    assert report.written["train"].requests == per_day[date(2019, 11, 9)]


def test_split_by_impression(mind, tmp_path):
    """Each impression goes where the first 32 bits of its id's MD5, as a fraction, say;
    every day is in every split and each split file stays in time order."""
    sample = mind["sample"]
    report = prepare_mind([sample / "behaviors.tsv"], sample / "news.tsv", tmp_path / "out",
                          split="impression", holdout=0.15)
    assert report.balanced()
    for split in SPLITS:
        rows = pq.read_table(tmp_path / "out" / f"{split}.parquet").to_pylist()
        draws = [int(hashlib.md5(r["request_id"].encode()).hexdigest()[:8], 16) / 2**32
                 for r in rows]
        low, high = {"test": (0.0, 0.15), "valid": (0.15, 0.3), "train": (0.3, 1.0)}[split]
        assert all(low <= u < high for u in draws), split
        assert len(rows) == pytest.approx((high - low) * len(mind["impressions"]), rel=0.15)
        assert {r["timestamp"].date() for r in rows} == {
            i["time"].date() for i in mind["impressions"]}
        times = [r["timestamp"] for r in rows]
        assert times == sorted(times)
    with pytest.raises(Nar4recError, match="go with split='day'"):
        prepare_mind([sample / "behaviors.tsv"], sample / "news.tsv", tmp_path / "bad",
                     split="impression", test_from=date(2019, 11, 12))
    with pytest.raises(Nar4recError, match="holdout must be in"):
        prepare_mind([sample / "behaviors.tsv"], sample / "news.tsv", tmp_path / "bad",
                     split="impression", holdout=0.5)
    assert not (tmp_path / "bad").exists()


# --- small hand-written files: no shared data needed ------------------------------------------

NEWS = ("N1\tsports\tsoccer\tA title\tAn abstract\thttps://x\t[]\t[]\n"
        "N2\tnews\tnewsus\tTitle \"quoted\"\t\thttps://y\t[]\t[]\n")
GOOD = [
    "1\tU1\t11/13/2019 8:36:57 AM\tN1 N2 N9\tN1-1 N2-0 N3-0",
    "2\tU2\t11/12/2019 11:02:01 PM\t\tN2-0 N1-1",
    "3\tU1\t11/11/2019 1:00:00 PM\tN2\tN3-1 N1-0 N2-0 N4-1",
]


def write(folder: Path, lines: list[str], news: str = NEWS) -> tuple[Path, Path]:
    behaviors, news_path = folder / "behaviors.tsv", folder / "news.tsv"
    behaviors.write_text("".join(line + "\n" for line in lines))
    news_path.write_text(news)
    return behaviors, news_path


def test_small_files(tmp_path):
    behaviors, news = write(tmp_path, GOOD)
    report = prepare_mind([behaviors], news, tmp_path / "out")
    assert report.balanced() and report.read.exposures == 9 and report.read.positives == {
        "click": 4}
    test = pq.read_table(tmp_path / "out" / "test.parquet").to_pylist()
    assert [r["request_id"] for r in test] == ["1"]
    assert test[0]["user_cat_top_category"] == "news"  # one sports, one news: the first by name
    assert test[0]["cand_num_category_share"] == pytest.approx([0.5, 0.5, 0.0])
    assert test[0]["cand_cat_subcategory"] == ["soccer", "newsus", None]
    for path in (tmp_path / "out").glob("*.parquet"):
        assert validate_file(path) == []


def test_several_files_and_repeated_news(tmp_path):
    (tmp_path / "a").mkdir()
    first, news = write(tmp_path / "a", GOOD[:2])
    second = tmp_path / "more.tsv"
    second.write_text("1\tU3\t11/13/2019 9:00:00 AM\tN1\tN1-1 N2-0 N1-0\n")
    report = prepare_mind([first, second], news, tmp_path / "out")
    assert report.balanced()
    dropped = report.dropped["news repeated within one impression (first kept)"]
    assert (dropped.requests, dropped.exposures, dropped.positives["click"]) == (0, 1, 0)
    test = pq.read_table(tmp_path / "out" / "test.parquet").to_pylist()
    assert [r["request_id"] for r in test] == ["0-1", "1-1"]
    assert test[1]["item_id"] == ["N1", "N2"]


@pytest.mark.parametrize("line, field, message", [
    ("4\tU1\t11/13/2019 8:36:57 AM\t\tN1-1 N2-2", "impressions", "label '2'"),
    ("4\tU1\t11/13/2019 8:36:57 AM\t\tN1-1 N2", "impressions", "'N2' is not NEWSID-LABEL"),
    ("4\tU1\t11/13/2019 8:36:57 AM\t\t", "impressions", "no impressed news"),
    ("4\tU1\t2019-11-13 08:36:57\t\tN1-1", "time", "is not a time"),
    ("4\tU1\t13/45/2019 8:36:57 AM\t\tN1-1", "time", "is not a time"),
    ("4\t\t11/13/2019 8:36:57 AM\t\tN1-1", "user_id", "empty value"),
    ("4\tU1\t11/13/2019 8:36:57 AM\tN1-1", None, "expected 5 tab-separated fields, found 4"),
    ("4\tU1\t11/13/2019 8:36:57 AM\t\tN1-1\textra", None, "found 6"),
    ("", None, "empty line"),
])
def test_bad_line(tmp_path, line, field, message):
    behaviors, news = write(tmp_path, [*GOOD[:2], line, GOOD[2]])
    with pytest.raises(DataError) as caught:
        prepare_mind([behaviors], news, tmp_path / "out")
    error = caught.value
    assert (error.file, error.row, error.field) == (str(behaviors), 3, field)
    assert message in error.message
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_bad_files(tmp_path):
    behaviors, news = write(tmp_path, GOOD)
    with pytest.raises(DataError, match="no such file"):
        prepare_mind([tmp_path / "missing.tsv"], news, tmp_path / "out")
    behaviors.write_text("")
    with pytest.raises(DataError, match="no impressions"):
        prepare_mind([behaviors], news, tmp_path / "out")
    behaviors, news = write(tmp_path, GOOD, news=NEWS + "N3\tsports\n")
    with pytest.raises(DataError) as caught:
        prepare_mind([behaviors], news, tmp_path / "out")
    assert (caught.value.file, caught.value.row) == (str(news), 3)
    assert not (tmp_path / "out").exists()


def test_the_command_splits_by_impression(tmp_path):
    behaviors, news = write(tmp_path, GOOD)
    command = [sys.executable, "-m", "nar4rec", "prepare", "mind", "--behaviors", str(behaviors),
               "--news", str(news)]
    done = subprocess.run([*command, "--out", str(tmp_path / "out"), "--split", "impression",
                           "--holdout", "0.3"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "split by impression: 30% to test, 30% to valid" in done.stdout
    written = sum(pq.read_metadata(p).num_rows for p in (tmp_path / "out").glob("*.parquet"))
    assert written == len(GOOD)
    done = subprocess.run([*command, "--out", str(tmp_path / "bad"), "--split", "impression",
                           "--test-from", "2019-11-12"], capture_output=True, text=True)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "test_from and valid_from are days" in done.stderr
    assert not (tmp_path / "bad").exists()
