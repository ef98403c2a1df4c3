"""The KuaiRand converter on a small log in the exact KuaiRand format, built from real ids."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy import stats

from nar4rec.data.format import read_spec
from nar4rec.data.kuairand import (
    BEHAVIOURS,
    candidate_order,
    prepare_kuairand,
    sample_negatives,
)
from nar4rec.data.validate import validate_file
from nar4rec.errors import DataError

LOG_HEADER = ["user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like",
              "is_follow", "is_comment", "is_forward", "is_hate", "long_view", "play_time_ms",
              "duration_ms", "profile_stay_time", "comment_stay_time", "is_profile_enter",
              "is_rand", "tab"]
BEIJING = timezone(timedelta(hours=8))
FIRST_DAY = datetime(2022, 4, 20, tzinfo=BEIJING)
DAYS = 4
HOURS = (9, 13, 20)  # the busy windows of each day
NEGATIVES = 4
WINDOW_MS = 3_600_000
MISSING_VIDEO = 10**9  # a video id that is not in the video feature file


def read_csv_rows(path: Path) -> dict[int, dict[str, str]]:
    with open(path, newline="") as fh:
        return {int(row[next(iter(row))]): row for row in csv.DictReader(fh)}


def beijing_day(time_ms: int) -> int:
    moment = datetime.fromtimestamp(time_ms / 1000, tz=BEIJING)
    return (moment.date() - FIRST_DAY.date()).days


def write_log(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, LOG_HEADER)
        writer.writeheader()
        writer.writerows(rows)


def make_log(user_ids: list[int], video_ids: list[int]) -> list[dict]:
    """Requests of 1..6 videos: 2 per user in each busy hour, one lone request, one repeat."""
    rng = np.random.default_rng(7)
    rows = []

    def request(user: int, moment: datetime, videos) -> None:
        time_ms = int(moment.timestamp() * 1000)
        for video in videos:
            flags = rng.random(len(BEHAVIOURS)) < [0.3, 0.1, 0.02, 0.05, 0.02, 0.02, 0.4, 0.05]
            row = {"user_id": user, "video_id": int(video), "date": moment.strftime("%Y%m%d"),
                   "hourmin": moment.strftime("%H00"), "time_ms": time_ms,
                   "play_time_ms": int(rng.integers(0, 60_000)), "duration_ms": 30_000,
                   "profile_stay_time": 0, "comment_stay_time": 0, "is_rand": 0, "tab": 1}
            row.update({column: int(f) for column, f in zip(BEHAVIOURS.values(), flags,
                                                            strict=True)})
            rows.append(row)

    for day in range(DAYS):
        for hour in HOURS:
            for user in user_ids:
                seconds = rng.choice(3600, size=2, replace=False)
                for second in seconds:
                    moment = FIRST_DAY + timedelta(days=day, hours=hour, seconds=int(second))
                    size = int(rng.integers(1, 7))
                    request(user, moment, rng.choice(video_ids, size=size, replace=False))
    # alone in its window: its negatives must come from the rest of the day
    request(user_ids[0], FIRST_DAY + timedelta(hours=3, minutes=5), video_ids[:3])
    # a video the feature file lacks, and a video shown twice in one request
    request(user_ids[1], FIRST_DAY + timedelta(hours=9, minutes=1, seconds=1),
            [MISSING_VIDEO, video_ids[0], video_ids[1], video_ids[0]])
    rows[-1]["is_click"] = 1
    return rows


@pytest.fixture(scope="module")
def feature_files(shared_data: Path) -> dict:
    features = shared_data / "kuairand-pure"
    return {"dir": features,
            "users": read_csv_rows(features / "user_features_pure.csv"),
            "videos": read_csv_rows(features / "video_features_basic_pure.csv")}


@pytest.fixture(scope="module")
def kuairand(feature_files: dict, tmp_path_factory) -> dict:
    features = feature_files["dir"]
    users, videos = feature_files["users"], feature_files["videos"]
    user_ids = sorted(users)[:8]
    video_ids = sorted(videos)[100:400]
    rows = make_log(user_ids, video_ids)
    folder = tmp_path_factory.mktemp("kuairand")
    half = len(rows) // 2  # two log files: requests of the first half, then the rest
    while rows[half]["time_ms"] == rows[half - 1]["time_ms"]:
        half += 1
    logs = [folder / "log_standard.csv", folder / "log_random.csv"]
    write_log(logs[0], rows[:half])
    write_log(logs[1], rows[half:])
    out = folder / "out"
    report = prepare_kuairand(logs, features / "user_features_pure.csv",
                              features / "video_features_basic_pure.csv", out,
                              negatives=NEGATIVES, test_days=1, valid_days=1, seed=3)
    tables = {split: pq.read_table(out / f"{split}.parquet").to_pylist()
              for split in ("train", "valid", "test")}
    return {"rows": rows, "report": report, "out": out, "tables": tables, "users": users,
            "videos": videos, "logs": logs, "features": features}


def requests_of_log(rows: list[dict]) -> dict[str, list[dict]]:
    grouped = defaultdict(list)
    for row in rows:
        grouped[f"{row['user_id']}-{row['time_ms']}"].append(row)
    return grouped


def all_requests(kuairand: dict) -> list[dict]:
    return [r for table in kuairand["tables"].values() for r in table]


def test_counts_balance_and_match_the_log(kuairand):
    report, rows = kuairand["report"], kuairand["rows"]
    assert report.balanced()
    assert report.read.requests == len(requests_of_log(rows))
    assert report.read.exposures == len(rows)
    for behaviour, column in BEHAVIOURS.items():
        assert report.read.positives[behaviour] == sum(r[column] for r in rows)
    dropped = report.dropped["video repeated within one request (first kept)"]
    assert (dropped.requests, dropped.exposures, dropped.positives["click"]) == (0, 1, 1)
    assert report.written_total.exposures == len(rows) - 1
    assert sum(len(t) for t in kuairand["tables"].values()) == report.read.requests
    assert (kuairand["out"] / "summary.json").is_file()
    assert sorted(p.name for p in kuairand["out"].iterdir()) == [
        "summary.json", "test.parquet", "train.parquet", "valid.parquet"]


def test_outputs_validate(kuairand):
    for split in ("train", "valid", "test"):
        path = kuairand["out"] / f"{split}.parquet"
        assert validate_file(path) == []
        spec = read_spec(path)
        assert spec.utility_weights["hate"] == -1.0 and not spec.has_upstream_score


def exposed_items(request: dict) -> list[str]:
    return [request["item_id"][i] for i in request["exposed"]]


def test_exposed_lists_and_feedback_follow_the_log(kuairand):
    """The shuffle loses no exposure and no feedback: each request's exposed videos, in log
    order, carry their own row's behaviours."""
    log = requests_of_log(kuairand["rows"])
    for request in all_requests(kuairand):
        shown = log[request["request_id"]]
        videos = list(dict.fromkeys(str(r["video_id"]) for r in shown))  # first of a repeat
        assert exposed_items(request) == videos
        assert len(set(request["exposed"])) == len(videos)
        assert request["user_id"] == str(shown[0]["user_id"])
        first = {}
        for r in shown:
            first.setdefault(str(r["video_id"]), r)
        for behaviour, column in BEHAVIOURS.items():
            assert request[f"feedback_{behaviour}"] == [first[v][column] for v in videos]


def test_exposed_positions_are_spread_evenly(kuairand):
    """Where the exposed videos sit among the candidates carries no label: their mean index is
    (n-1)/2 within 4 standard errors, and the quarters of the list hold them as often as a
    uniform shuffle would (chi-square, p > 0.001). The exposed-first order gave z = -29.7."""
    requests = all_requests(kuairand)
    deviation = variance = 0.0
    observed, expected = np.zeros(4), np.zeros(4)
    for request in requests:
        n, m = len(request["item_id"]), len(request["exposed"])
        deviation += sum(request["exposed"]) - m * (n - 1) / 2
        variance += m * (n * n - 1) / 12 * (n - m) / (n - 1)  # m of n slots, no replacement
        quarter = 4 * np.arange(n) // n
        observed += np.bincount(quarter[request["exposed"]], minlength=4)
        expected += m * np.bincount(quarter, minlength=4) / n
    assert len(requests) > 150 and observed.sum() > 500
    assert abs(deviation / math.sqrt(variance)) < 4
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_negatives_come_from_other_users_in_the_window(kuairand):
    shown_in = defaultdict(set)  # window -> {(user, video)}
    for row in kuairand["rows"]:
        shown_in[row["time_ms"] // WINDOW_MS].add((row["user_id"], str(row["video_id"])))

    def shown_to_others(windows, user: int, exposed: set[str]) -> set[str]:
        return {v for w in windows for u, v in shown_in[w] if u != user} - exposed

    requests = all_requests(kuairand)
    from_window = alone = 0
    for request in requests:
        user, time_ms = (int(part) for part in request["request_id"].split("-"))
        exposed = set(exposed_items(request))
        negatives = [v for v in request["item_id"] if v not in exposed]
        assert len(negatives) == NEGATIVES
        assert len(set(request["item_id"])) == len(request["item_id"])
        window = shown_to_others([time_ms // WINDOW_MS], user, exposed)
        day_start = int((FIRST_DAY + timedelta(days=beijing_day(time_ms))).timestamp() * 1000)
        day_windows = range(day_start // WINDOW_MS - 1,
                            (day_start + 86_400_000 - 1) // WINDOW_MS + 2)
        assert set(negatives) <= shown_to_others(day_windows, user, exposed)
        if len(window) >= 3 * NEGATIVES:
            assert set(negatives) <= window
            from_window += 1
        alone += not window
    assert alone == 1  # the lone request drew from the rest of its day
    assert from_window == len(requests) - 1


def test_features_match_the_feature_files(kuairand):
    users, videos = kuairand["users"], kuairand["videos"]
    requests = all_requests(kuairand)
    request = next(r for r in requests if "1000000000" not in r["item_id"])
    user = users[int(request["user_id"])]
    assert request["user_cat_user_active_degree"] == user["user_active_degree"]
    assert request["user_cat_fans_user_num_range"] == user["fans_user_num_range"]
    assert request["user_cat_onehot_feat4"] == str(int(float(user["onehot_feat4"])))
    assert request["user_num_log_fans"] == pytest.approx(math.log1p(float(user["fans_user_num"])))
    assert request["user_num_known"] == 1.0
    time = request["timestamp"].astimezone(UTC)
    for position, item in enumerate(request["item_id"]):
        video = videos[int(item)]
        assert request["cand_cat_author_id"][position] == video["author_id"]
        assert request["cand_cat_upload_type"][position] == video["upload_type"]
        assert request["cand_cat_tag"][position] == (video["tag"].split(",")[0] or None)
        assert request["cand_cat_music_type"][position] == (
            str(int(float(video["music_type"]))) if video["music_type"] else None)
        duration = float(video["video_duration"] or "nan")
        assert request["cand_num_has_duration"][position] == float(not math.isnan(duration))
        assert request["cand_num_log_duration"][position] == pytest.approx(
            0.0 if math.isnan(duration) else math.log1p(duration / 1000), rel=1e-5)
        assert request["cand_num_log_aspect"][position] == pytest.approx(
            math.log(float(video["server_height"]) / float(video["server_width"])), abs=1e-5)
        upload = datetime.fromisoformat(video["upload_dt"]).replace(tzinfo=BEIJING)
        assert request["cand_num_days_since_upload"][position] == pytest.approx(
            (time - upload).total_seconds() / 86400, rel=1e-5)

    unknown = next(r for r in requests if "1000000000" in r["item_id"])
    at = unknown["item_id"].index("1000000000")
    assert unknown["cand_cat_author_id"][at] is None
    assert unknown["cand_num_known"][at] == 0.0 and unknown["cand_num_log_duration"][at] == 0.0


def test_split_by_day(kuairand):
    expected = {"train": {0, 1}, "valid": {2}, "test": {3}}
    for split, table in kuairand["tables"].items():
        days = {beijing_day(int(r["timestamp"].timestamp() * 1000)) for r in table}
        assert days == expected[split]
        times = [r["timestamp"] for r in table]
        assert times == sorted(times)


def convert_again(kuairand: dict, out: Path, logs: list[Path], seed: int = 3) -> dict:
    features = kuairand["features"]
    prepare_kuairand(logs, features / "user_features_pure.csv",
                     features / "video_features_basic_pure.csv", out, negatives=NEGATIVES,
                     test_days=1, valid_days=1, seed=seed)
    return {split: pq.read_table(out / f"{split}.parquet").to_pylist()
            for split in ("train", "valid", "test")}


def test_conversion_is_deterministic_and_ignores_file_order(kuairand, tmp_path):
    """The same rows give the same files: converted again, in the other file order, or as one
    file (samples and candidate order included); another seed shuffles differently."""
    assert convert_again(kuairand, tmp_path / "again", kuairand["logs"]) == kuairand["tables"]
    reversed_logs = kuairand["logs"][::-1]
    assert convert_again(kuairand, tmp_path / "reversed", reversed_logs) == kuairand["tables"]
    single = tmp_path / "log_all.csv"
    write_log(single, kuairand["rows"])
    assert convert_again(kuairand, tmp_path / "single", [single]) == kuairand["tables"]
    other = convert_again(kuairand, tmp_path / "seed4", kuairand["logs"], seed=4)
    assert [r["exposed"] for r in other["train"]] != \
        [r["exposed"] for r in kuairand["tables"]["train"]]


def test_candidate_order_depends_on_the_request_alone():
    """candidate_order permutes within each request, the same way whatever the chunk."""
    rng = np.random.default_rng(1)
    user = rng.integers(0, 1000, size=50)
    time_ms = 1_650_000_000_000 + rng.integers(0, 10**9, size=50)
    lengths = rng.integers(1, 30, size=50)
    whole = candidate_order(3, user, time_ms, lengths)
    first = np.r_[0, np.cumsum(lengths)[:-1]]
    request = np.repeat(np.arange(50), lengths)
    assert sorted(whole.tolist()) == list(range(int(lengths.sum())))
    assert (request[whole] == request).all()  # every slot takes a candidate of its request
    halves = [candidate_order(3, user[part], time_ms[part], lengths[part]) + first[part][0]
              for part in (slice(0, 20), slice(20, 50))]
    assert np.array_equal(np.concatenate(halves), whole)
    shifted = candidate_order(3, user[::-1], time_ms[::-1], lengths[::-1])
    last = shifted[:lengths[-1]] - shifted[:lengths[-1]].min()
    assert np.array_equal(last, whole[first[-1]:] - first[-1])
    assert not np.array_equal(candidate_order(4, user, time_ms, lengths), whole)


def test_sample_negatives_on_a_tiny_pool():
    rng = np.random.default_rng(0)
    # request 0 (user 1, bucket 5) shows video 0; the pool holds videos 0..3 of users 1 and 2
    negatives, stage = sample_negatives(
        rng, 3, user=np.array([1]), bucket=np.array([5]), exposed_request=np.array([0]),
        exposed_video=np.array([0]), pool_bucket=np.array([4, 5, 5, 5, 9]),
        pool_user=np.array([2, 2, 1, 2, 2]), pool_video=np.array([3, 0, 1, 2, 4]), rounds=64)
    # window: only video 2 (0 is exposed, 1 is the user's own); then 3 from bucket 4; then 4
    assert negatives.tolist() == [[2, 3, 4]]
    assert stage.tolist() == [[1, 2, 3]]


USER_HEADER = ["user_id", "user_active_degree", "is_lowactive_period", "is_live_streamer",
               "is_video_author", "follow_user_num", "follow_user_num_range", "fans_user_num",
               "fans_user_num_range", "friend_user_num", "friend_user_num_range",
               "register_days", "register_days_range", *(f"onehot_feat{i}" for i in range(18))]
VIDEO_HEADER = ["video_id", "author_id", "video_type", "upload_dt", "upload_type",
                "visible_status", "video_duration", "server_width", "server_height", "music_id",
                "music_type", "tag"]


@pytest.fixture()
def small_inputs(tmp_path: Path) -> dict:
    """Hand-made feature files in the KuaiRand format and a log over them: no shared data."""
    users, videos = tmp_path / "users.csv", tmp_path / "videos.csv"
    user_rows = [[u, "full_active", 0, 1, 0, 12, '"(10,50]"', 150, '"[100,1k)"', 3, '"[1,5)"',
                  400, "365-730", *range(18)] for u in range(3)]
    video_rows = [[v, 1000 + v, "NORMAL", "2022-04-10", "Web", "0.0", "15000.0" if v % 7 else "",
                   "720.0", "1280.0", 55, "9.0", f'"{v % 5},{v % 3}"'] for v in range(50)]
    for path, header, rows in ((users, USER_HEADER, user_rows),
                               (videos, VIDEO_HEADER, video_rows)):
        path.write_text("\n".join(",".join(map(str, r)) for r in [header, *rows]) + "\n")
    return {"rows": make_log([0, 1, 2], list(range(50)))[:40], "dir": tmp_path,
            "users": users, "videos": videos}


def run_on(inputs: dict, text: str | None = None, **paths) -> Path:
    log = inputs["dir"] / "log.csv"
    if text is None:
        write_log(log, inputs["rows"])
    else:
        log.write_text(text)
    out = inputs["dir"] / "out"
    prepare_kuairand(paths.get("logs", [log]), paths.get("users", inputs["users"]),
                     paths.get("videos", inputs["videos"]), out, negatives=2)
    return out


def log_text(rows: list[dict], header: list[str] = LOG_HEADER) -> str:
    lines = [",".join(header)]
    lines += [",".join(str(r.get(c, 0)) for c in header) for r in rows]
    return "\n".join(lines) + "\n"


def expect_error(inputs: dict, text: str | None, file: str, row: int | None,
                 field: str | None, **paths) -> None:
    with pytest.raises(DataError) as caught:
        run_on(inputs, text, **paths)
    error = caught.value
    assert (Path(error.file).name, error.row, error.field) == (file, row, field), str(error)
    assert not (inputs["dir"] / "out").exists()
    assert [p.name for p in inputs["dir"].iterdir()
            if p.name.startswith(".out")] == []  # no temporary output left behind


def test_small_log_converts(small_inputs):
    out = run_on(small_inputs)
    assert all(validate_file(p) == [] for p in out.glob("*.parquet"))
    request = pq.read_table(out / "test.parquet").slice(0, 1).to_pylist()[0]  # one day: test
    videos = [int(v) for v in request["item_id"]]
    assert request["cand_cat_author_id"] == [str(1000 + v) for v in videos]
    assert request["cand_cat_visible_status"] == ["0"] * len(videos)  # "0.0" -> "0"
    assert request["cand_cat_tag"] == [str(v % 5) for v in videos]
    assert request["cand_num_has_duration"] == [float(v % 7 != 0) for v in videos]
    assert request["user_cat_fans_user_num_range"] == "[100,1k)"


def test_missing_file(small_inputs):
    expect_error(small_inputs, None, "nope.csv", None, None,
                 logs=[small_inputs["dir"] / "nope.csv"])


def test_missing_column(small_inputs):
    header = [c for c in LOG_HEADER if c != "is_like"]
    expect_error(small_inputs, log_text(small_inputs["rows"], header), "log.csv", 1, "is_like")


def test_non_numeric_id(small_inputs):
    rows = [dict(r) for r in small_inputs["rows"]]
    rows[3]["user_id"] = "u17"
    expect_error(small_inputs, log_text(rows), "log.csv", 5, "user_id")


def test_non_numeric_time(small_inputs):
    rows = [dict(r) for r in small_inputs["rows"]]
    rows[10]["time_ms"] = ""
    expect_error(small_inputs, log_text(rows), "log.csv", 12, "time_ms")


def test_behaviour_not_binary(small_inputs):
    rows = [dict(r) for r in small_inputs["rows"]]
    rows[2]["is_click"] = 2
    expect_error(small_inputs, log_text(rows), "log.csv", 4, "is_click")
    rows[2]["is_click"] = "yes"
    expect_error(small_inputs, log_text(rows), "log.csv", 4, "is_click")


def test_wrong_number_of_fields(small_inputs):
    lines = log_text(small_inputs["rows"]).splitlines()
    lines[6] = lines[6] + ",extra"
    expect_error(small_inputs, "\n".join(lines) + "\n", "log.csv", 7, None)


def test_empty_log(small_inputs):
    expect_error(small_inputs, ",".join(LOG_HEADER) + "\n", "log.csv", None, None)
    expect_error(small_inputs, "", "log.csv", 1, None)


def test_bad_feature_file(small_inputs):
    videos = small_inputs["dir"] / "videos.csv"
    lines = small_inputs["videos"].read_text().splitlines()
    videos.write_text("\n".join([lines[0].replace("author_id", "author")] + lines[1:]) + "\n")
    expect_error(small_inputs, None, "videos.csv", 1, "author_id", videos=videos)
    lines[20] = "x" + lines[20]
    videos.write_text("\n".join(lines) + "\n")
    expect_error(small_inputs, None, "videos.csv", 21, "video_id", videos=videos)
    lines[20] = lines[20][1:].replace("2022-04-10", "10/04/2022")
    videos.write_text("\n".join(lines) + "\n")
    expect_error(small_inputs, None, "videos.csv", 21, "upload_dt", videos=videos)
    lines[20] = lines[3]
    videos.write_text("\n".join(lines) + "\n")
    expect_error(small_inputs, None, "videos.csv", 21, "video_id", videos=videos)
