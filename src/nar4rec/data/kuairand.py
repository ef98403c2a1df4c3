"""KuaiRand logs -> nar4rec request logs (docs/converters/kuairand.md).

A request is what one user was shown at one `time_ms`; its candidates are those videos and
negatives drawn from what other users were shown in the same time window, shuffled by a key of
the request id so that no model can read the label from where a candidate sits. The log is
staged in an on-disk DuckDB table and then processed one day at a time, in bounded chunks.
"""

from __future__ import annotations

import contextlib
import csv
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from nar4rec.data.convert import ConversionReport, Counts
from nar4rec.data.format import (
    CAND_CAT,
    CAND_NUM,
    EXPOSED,
    FEEDBACK,
    ITEM_ID,
    REQUEST_ID,
    TIMESTAMP,
    TIMESTAMP_TYPE,
    USER_CAT,
    USER_ID,
    USER_NUM,
    FormatSpec,
    RequestLogWriter,
    lists_from_flat,
)
from nar4rec.errors import DataError, Nar4recError
from nar4rec.io import atomic_dir

BEHAVIOURS = {  # our behaviour name -> log column
    "click": "is_click",
    "like": "is_like",
    "follow": "is_follow",
    "comment": "is_comment",
    "forward": "is_forward",
    "hate": "is_hate",
    "long_view": "long_view",
    "profile_enter": "is_profile_enter",
}
UTILITY_WEIGHTS = {**{b: 1.0 for b in BEHAVIOURS}, "hate": -1.0}

USER_CAT_COLUMNS = (
    "user_active_degree", "is_lowactive_period", "is_live_streamer", "is_video_author",
    "follow_user_num_range", "fans_user_num_range", "friend_user_num_range",
    "register_days_range", *(f"onehot_feat{i}" for i in range(18)),
)
USER_COUNT_COLUMNS = {  # user_num feature -> count column, stored as log1p(count)
    "log_follow": "follow_user_num",
    "log_fans": "fans_user_num",
    "log_friends": "friend_user_num",
    "log_register_days": "register_days",
}
VIDEO_CAT_COLUMNS = ("author_id", "video_type", "upload_type", "visible_status", "music_type",
                     "tag")
VIDEO_NUM_COLUMNS = {"video_duration": pa.float64(), "server_width": pa.float64(),
                     "server_height": pa.float64(), "upload_dt": pa.date32()}
LOG_TYPES = {"user_id": pa.int64(), "video_id": pa.int64(), "time_ms": pa.int64(),
             **{column: pa.float64() for column in BEHAVIOURS.values()}}

USER_NUM_FEATURES = ("known", *USER_COUNT_COLUMNS)
CAND_NUM_FEATURES = ("known", "log_duration", "has_duration", "log_aspect", "days_since_upload")

DAY_MS = 86_400_000
DAY_OFFSET_MS = 8 * 3_600_000  # KuaiRand's days are Beijing days (UTC+8)
ROWS_PER_CHUNK = 1 << 18  # log rows fetched from DuckDB at a time
DRAW_ROUNDS = 8  # rejection-sampling rounds per pool before widening it

NULL_TOKENS = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
               "1.#QNAN", "N/A", "NA", "NULL", "NaN", "n/a", "nan", "null"}


def kuairand_spec(negatives: int, window_minutes: int, seed: int) -> FormatSpec:
    return FormatSpec(
        behaviours=tuple(BEHAVIOURS),
        utility_weights=UTILITY_WEIGHTS,
        user_cat=USER_CAT_COLUMNS,
        user_num=USER_NUM_FEATURES,
        cand_cat=VIDEO_CAT_COLUMNS,
        cand_num=CAND_NUM_FEATURES,
        has_upstream_score=False,
        extra={
            "source": "kuairand",
            "exposed_order": "log file order within one (user_id, time_ms)",
            "candidate_order": "shuffled by splitmix64 keys of (seed, user_id, time_ms, slot)",
            "negatives": {"per_request": negatives, "window_minutes": window_minutes,
                          "seed": seed},
            "day": "calendar day in UTC+8",
        },
    )


def prepare_kuairand(logs: list[Path], users: Path, videos: Path, out_dir: Path, *,
                     negatives: int = 24, window_minutes: int = 60, test_days: int = 7,
                     valid_days: int = 2, seed: int = 0, memory_limit: str = "2GB",
                     threads: int = 2, overwrite: bool = False) -> ConversionReport:
    """Convert KuaiRand logs and feature files into train/valid/test request logs in `out_dir`.

    Every exposed video of a request is kept (the exposed list in log file order), with up to
    `negatives` videos that other users were shown in the same `window_minutes` window; the
    candidates are shuffled by `candidate_order`, so their order carries no label. The last
    `test_days` days go to test, the `valid_days` before them to valid, the rest to train.
    Nothing is left in `out_dir` unless the whole conversion succeeds.
    """
    logs = [Path(p) for p in logs]
    users, videos, out_dir = Path(users), Path(videos), Path(out_dir)
    if not logs:
        raise Nar4recError("kuairand: give at least one log file")
    for name, value in (("negatives", negatives), ("test_days", test_days),
                        ("valid_days", valid_days), ("seed", seed)):
        if value < 0:
            raise Nar4recError(f"kuairand: {name} must be >= 0, got {value}")
    if window_minutes < 1 or threads < 1:
        raise Nar4recError("kuairand: window_minutes and threads must be >= 1")
    for path in (*logs, users, videos):
        if not path.is_file():
            raise DataError("no such file", file=str(path))
    for path in logs:
        _require_columns(path, _header(path), LOG_TYPES)
    _require_columns(users, _header(users),
                     ("user_id", *USER_CAT_COLUMNS, *USER_COUNT_COLUMNS.values()))
    _require_columns(videos, _header(videos),
                     ("video_id", *VIDEO_CAT_COLUMNS, *VIDEO_NUM_COLUMNS))

    spec = kuairand_spec(negatives, window_minutes, seed)
    report = ConversionReport(source="kuairand")
    window_ms = window_minutes * 60_000
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        work = tmp / ".work"
        work.mkdir()
        try:
            con = duckdb.connect(str(work / "exposures.duckdb"), config={
                "memory_limit": memory_limit, "threads": threads,
                "temp_directory": str(work / "spill"), "preserve_insertion_order": False})
            with contextlib.closing(con):
                con.execute("SET enable_progress_bar = false")
                _stage_logs(con, logs, window_ms)
                report.read = _read_counts(con)
                video_ids = _distinct(con, "video_id")
                user_ids = _distinct(con, "user_id")
                user_features = _read_features(
                    users, "user_id", user_ids, USER_CAT_COLUMNS,
                    {c: pa.float64() for c in USER_COUNT_COLUMNS.values()})
                video_features = _read_features(videos, "video_id", video_ids,
                                                VIDEO_CAT_COLUMNS, VIDEO_NUM_COLUMNS)
                converter = _Converter(spec, negatives, window_ms, seed, user_ids, video_ids,
                                       user_features, video_features)
                converter.run(con, tmp, test_days, valid_days)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        report.written = converter.written
        if converter.duplicates.exposures:
            report.dropped["video repeated within one request (first kept)"] = \
                converter.duplicates
        report.notes.extend(converter.notes())
        report.notes.extend(
            f"{split}: no request, no file written"
            for split, counts in converter.written.items() if counts.requests == 0)
        missing_users = int((user_features.row_of < 0).sum())
        missing_videos = int((video_features.row_of < 0).sum())
        if missing_users or missing_videos:
            report.notes.append(
                f"{missing_users} users and {missing_videos} videos of the log are missing "
                "from the feature files: kept, with null categorical features and known = 0")
        report.write_json(tmp / "summary.json")
    return report


# --- reading and checking the CSV files ------------------------------------------------------

def _header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        first = fh.readline()
    if not first.strip():
        raise DataError("the file is empty: no header line", file=str(path), row=1)
    return next(csv.reader([first]))


def _require_columns(path: Path, header: list[str], columns) -> None:
    for name in columns:
        if name not in header:
            raise DataError("column is missing from the header", file=str(path), row=1,
                            field=name)


def _csv_batches(path: Path, column_types: dict[str, pa.DataType],
                 block_size: int = 1 << 24) -> Iterator[pa.RecordBatch]:
    """The named columns of a CSV file with a header, typed, in file order."""
    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=block_size),
            parse_options=pacsv.ParseOptions(ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(column_types=column_types,
                                                 include_columns=list(column_types),
                                                 strings_can_be_null=True))
        yield from reader
    except pa.ArrowInvalid as exc:
        raise _locate_bad_row(path, column_types, exc) from None


def _parses(value: str, type_: pa.DataType) -> bool:
    if value in NULL_TOKENS or pa.types.is_string(type_):
        return True
    if pa.types.is_integer(type_):
        return re.fullmatch(r"[+-]?\d+", value) is not None
    if pa.types.is_date(type_):
        return re.fullmatch(r"\d{4}-\d{2}-\d{2}", value) is not None
    try:
        float(value)
    except ValueError:
        return False
    return True


def _describe(type_: pa.DataType) -> str:
    if pa.types.is_integer(type_):
        return "an integer"
    if pa.types.is_date(type_):
        return "a date (YYYY-MM-DD)"
    return "a number"


def _locate_bad_row(path: Path, column_types: dict[str, pa.DataType],
                    exc: Exception) -> DataError:
    """Find the line pyarrow could not read (slow, used only once the read has failed)."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        index = {name: i for i, name in enumerate(header)}
        for row in reader:
            if len(row) != len(header):
                return DataError(f"expected {len(header)} comma-separated fields, found "
                                 f"{len(row)}", file=str(path), row=reader.line_num)
            for name, type_ in column_types.items():
                value = row[index[name]]
                if not _parses(value, type_):
                    return DataError(f"{value!r} is not {_describe(type_)}", file=str(path),
                                     row=reader.line_num, field=name)
    return DataError(f"cannot read as CSV ({exc})", file=str(path))


def _first_bad(path: Path, bad: np.ndarray, rows_before: int, field: str,
               message: str) -> None:
    """Raise for the first True of `bad`, a mask over a batch that starts after `rows_before`."""
    hits = np.flatnonzero(bad)
    if len(hits):
        raise DataError(message, file=str(path), row=rows_before + int(hits[0]) + 2,
                        field=field)


# --- staging the log in DuckDB ---------------------------------------------------------------

def _stage_logs(con: duckdb.DuckDBPyConnection, logs: list[Path], window_ms: int) -> None:
    """Check every log row and copy it into the DuckDB table `exposures`."""
    behaviour_columns = ", ".join(f'"{b}" TINYINT' for b in BEHAVIOURS)
    con.execute(f"CREATE TABLE exposures (file SMALLINT, line BIGINT, user_id BIGINT, "
                f"video_id BIGINT, time_ms BIGINT, day BIGINT, bucket BIGINT, "
                f"{behaviour_columns})")
    for file_index, path in enumerate(logs):
        rows = 0
        for batch in _csv_batches(path, LOG_TYPES):
            problems = []  # (row in the batch, field, message): the first one is raised
            for name in ("user_id", "video_id", "time_ms"):
                hits = np.flatnonzero(batch.column(name).is_null().to_numpy(zero_copy_only=False))
                if len(hits):
                    problems.append((int(hits[0]), name, "empty value, expected an integer"))
            for column in BEHAVIOURS.values():
                values = batch.column(column).to_numpy(zero_copy_only=False)
                hits = np.flatnonzero(~((values == 0) | (values == 1)))
                if len(hits):
                    value = batch.column(column)[int(hits[0])].as_py()
                    problems.append((int(hits[0]), column, "empty value, expected 0 or 1"
                                     if value is None else f"{value:g} is not 0 or 1"))
            if problems:
                row, field, message = min(problems)
                raise DataError(message, file=str(path), row=rows + row + 2, field=field)
            columns = {"file": np.full(batch.num_rows, file_index, dtype=np.int16),
                       "line": np.arange(rows + 2, rows + 2 + batch.num_rows)}
            for name in ("user_id", "video_id", "time_ms"):
                columns[name] = batch.column(name).to_numpy()
            columns["day"] = (columns["time_ms"] + DAY_OFFSET_MS) // DAY_MS
            columns["bucket"] = columns["time_ms"] // window_ms
            for behaviour, column in BEHAVIOURS.items():
                columns[behaviour] = batch.column(column).to_numpy().astype(np.int8)
            con.register("staged", pa.table(columns))
            con.execute("INSERT INTO exposures SELECT * FROM staged")
            con.unregister("staged")
            rows += batch.num_rows
        if rows == 0:
            raise DataError("the log has no rows", file=str(path))


def _read_counts(con: duckdb.DuckDBPyConnection) -> Counts:
    positives = ", ".join(f'count(*) FILTER (WHERE "{b}" <> 0)' for b in BEHAVIOURS)
    exposures, *clicks = con.sql(f"SELECT count(*), {positives} FROM exposures").fetchall()[0]
    (requests,) = con.sql(
        "SELECT count(*) FROM (SELECT DISTINCT user_id, time_ms FROM exposures)").fetchall()[0]
    return Counts(int(requests), int(exposures),
                  {b: int(c) for b, c in zip(BEHAVIOURS, clicks, strict=True)})


def _distinct(con: duckdb.DuckDBPyConnection, column: str) -> np.ndarray:
    """The sorted distinct values of an id column of `exposures`."""
    return con.sql(f"SELECT DISTINCT {column} AS v FROM exposures ORDER BY v").fetchnumpy()["v"]


# --- feature files ---------------------------------------------------------------------------

@dataclass
class _Features:
    """The feature-file rows of the users (or videos) seen in the log.

    Entity e (the index of its id in the log's sorted distinct ids) has its features in row
    `row_of[e]`, or none when `row_of[e]` is -1.
    """

    row_of: np.ndarray
    categorical: dict[str, pa.DictionaryArray]
    numeric: dict[str, np.ndarray]

    def category(self, name: str, entities: np.ndarray) -> pa.Array:
        """Strings of categorical feature `name`, null where unknown."""
        rows = self.row_of[entities]
        return self.categorical[name].take(pa.array(rows, mask=rows < 0)).dictionary_decode()

    def number(self, name: str, entities: np.ndarray) -> np.ndarray:
        """Values of numeric column `name` as float64, NaN where unknown."""
        rows = self.row_of[entities]
        values = self.numeric[name]
        if len(values) == 0:
            return np.full(len(rows), np.nan)
        return np.where(rows >= 0, values[np.maximum(rows, 0)].astype(np.float64), np.nan)


def _canonical_category(values: pa.Array) -> pa.Array:
    """Categories as strings: "1.0" and "1" are the same value; empty is null."""
    values = pc.utf8_trim_whitespace(values)
    values = pc.replace_substring_regex(values, r"^(-?\d+)\.0+$", r"\1")
    return pc.if_else(pc.equal(values, ""), pa.scalar(None, pa.string()), values)


def _read_features(path: Path, key: str, wanted: np.ndarray, categorical: tuple[str, ...],
                   numeric: dict[str, pa.DataType]) -> _Features:
    """Read the rows of `path` whose `key` is in `wanted` (sorted ids), streaming the file."""
    types = {key: pa.int64(), **{c: pa.string() for c in categorical}, **numeric}
    row_of = np.full(len(wanted), -1, dtype=np.int32)
    cat_chunks: dict[str, list[pa.Array]] = {c: [] for c in categorical}
    num_chunks: dict[str, list[np.ndarray]] = {c: [] for c in numeric}
    rows = kept = 0
    for batch in _csv_batches(path, types):
        ids = batch.column(key)
        _first_bad(path, ids.is_null().to_numpy(zero_copy_only=False), rows, key,
                   "empty value, expected an integer")
        ids = ids.to_numpy()
        entity = np.minimum(np.searchsorted(wanted, ids), max(len(wanted) - 1, 0))
        keep = (wanted[entity] == ids) if len(wanted) else np.zeros(len(ids), dtype=bool)
        keep_rows = np.flatnonzero(keep)
        entity = entity[keep_rows]
        repeated = (row_of[entity] >= 0) | ~_first_occurrences(entity)
        if repeated.any():
            at = int(keep_rows[np.flatnonzero(repeated)[0]])
            raise DataError(f"{key} {ids[at]} appears more than once", file=str(path),
                            row=rows + at + 2, field=key)
        row_of[entity] = kept + np.arange(len(entity))
        taken = batch.take(pa.array(keep_rows, pa.int64()))
        for c in categorical:
            if c == "tag":  # several tag ids "39,68": keep the first
                first_tag = pc.list_element(pc.split_pattern(taken.column(c), ","), 0)
                cat_chunks[c].append(_canonical_category(first_tag).dictionary_encode())
            else:
                cat_chunks[c].append(_canonical_category(taken.column(c)).dictionary_encode())
        for c, type_ in numeric.items():
            column = taken.column(c)
            if pa.types.is_date(type_):
                column = column.cast(pa.int32()).cast(pa.float64())
            num_chunks[c].append(column.to_numpy(zero_copy_only=False).astype(np.float32))
        rows += batch.num_rows
        kept += len(entity)
    empty = pa.array([], pa.string()).dictionary_encode()
    return _Features(
        row_of=row_of,
        categorical={c: pa.chunked_array(chunks or [empty]).unify_dictionaries().combine_chunks()
                     for c, chunks in cat_chunks.items()},
        numeric={c: np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
                 for c, chunks in num_chunks.items()},
    )


# --- requests, negatives, features -----------------------------------------------------------

def sample_negatives(rng: np.random.Generator, count: int, user: np.ndarray,
                     bucket: np.ndarray, exposed_request: np.ndarray, exposed_video: np.ndarray,
                     pool_bucket: np.ndarray, pool_user: np.ndarray, pool_video: np.ndarray,
                     rounds: int = DRAW_ROUNDS) -> tuple[np.ndarray, np.ndarray]:
    """Draw up to `count` negative videos per request from a pool of exposures.

    Args:
        user, bucket: (R,) each request's user and time bucket.
        exposed_request, exposed_video: (E,) the exposed videos (dense ids) of each request.
        pool_bucket, pool_user, pool_video: (P,) exposures to draw from, sorted by bucket.

    A draw picks one pool exposure uniformly (so a video is drawn in proportion to how often it
    was shown) and is rejected when that exposure is the request's own user's, when the video
    is exposed in the request or when it is already drawn for it. Pools widen after `rounds`
    rounds of draws: the request's bucket, then buckets b-1..b+1, then the whole pool.

    Returns:
        negatives: (R, count) dense video ids, nearest pool first, then -1 where none could
            be drawn.
        stage: (R, count) 1, 2 or 3: the pool each negative came from (0 where none).
    """
    requests = len(user)
    negatives = np.full((requests, count), -1, dtype=np.int64)
    stage = np.zeros((requests, count), dtype=np.int8)
    if count == 0 or requests == 0 or len(pool_video) == 0:
        return negatives, stage
    width = int(max(pool_video.max(), exposed_video.max(initial=0))) + 1
    exposed_keys = np.sort(exposed_request * width + exposed_video)
    ranges = [
        (np.searchsorted(pool_bucket, bucket, "left"),
         np.searchsorted(pool_bucket, bucket, "right")),
        (np.searchsorted(pool_bucket, bucket - 1, "left"),
         np.searchsorted(pool_bucket, bucket + 1, "right")),
        (np.zeros(requests, dtype=np.int64), np.full(requests, len(pool_video))),
    ]
    for level, (low, high) in enumerate(ranges, start=1):
        for _ in range(rounds):
            rows, slots = np.nonzero(negatives < 0)
            drawable = high[rows] > low[rows]
            rows, slots = rows[drawable], slots[drawable]
            if len(rows) == 0:
                break
            size = high[rows] - low[rows]
            picks = low[rows] + np.minimum((rng.random(len(rows)) * size).astype(np.int64),
                                           size - 1)
            videos = pool_video[picks]
            keys = rows * width + videos
            ok = ((pool_user[picks] != user[rows]) & ~_is_in_sorted(keys, exposed_keys)
                  & ~(negatives[rows] == videos[:, None]).any(axis=1))
            candidates = np.flatnonzero(ok)
            accepted = candidates[_first_occurrences(keys[candidates])]  # one draw per video
            negatives[rows[accepted], slots[accepted]] = videos[accepted]
            stage[rows[accepted], slots[accepted]] = level
    order = np.argsort(np.where(negatives < 0, 4, stage), axis=1, kind="stable")  # nearest first
    return (np.take_along_axis(negatives, order, axis=1),
            np.take_along_axis(stage, order, axis=1))


def candidate_order(seed: int, user: np.ndarray, time_ms: np.ndarray,
                    lengths: np.ndarray) -> np.ndarray:
    """A permutation of each request's candidates keyed by (seed, request id), no label.

    Args:
        seed: the conversion's seed.
        user, time_ms: (R,) int64, each request's user and time (together its id).
        lengths: (R,) n per request; the candidates lie request after request.

    Returns:
        (sum n,) for each new flat slot, the flat index of the candidate it takes. Slot j of a
        request is sorted by the top 40 bits of a splitmix64 key of (seed, user, time_ms, j)
        (a tie, under one request in 10^9, keeps slot order): the permutation depends on the
        request id and n alone, not on the chunk, the file order or which candidates were
        exposed.
    """
    request = np.repeat(np.arange(len(lengths)), lengths)                   # (sum n,)
    slot = np.arange(len(request)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    key = _splitmix64(np.full(len(lengths), seed, dtype=np.int64).view(np.uint64))
    key = _splitmix64(key ^ np.asarray(user, dtype=np.int64).view(np.uint64))
    key = _splitmix64(key ^ np.asarray(time_ms, dtype=np.int64).view(np.uint64))  # (R,)
    slot_key = _splitmix64(key[request] ^ slot.astype(np.uint64)) >> np.uint64(24)  # 40 bits
    if len(lengths) > 1 << 24:
        return np.lexsort((slot_key, request))
    # the same order by one sort, several times faster: the request above the key's 40 bits
    return np.argsort((request.astype(np.uint64) << np.uint64(40)) | slot_key, kind="stable")


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of uint64 values (a bijection that mixes every bit)."""
    values = values + np.uint64(0x9E3779B97F4A7C15)
    values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def _is_in_sorted(values: np.ndarray, sorted_values: np.ndarray) -> np.ndarray:
    """Whether each of `values` is in `sorted_values` (binary search, no hashing)."""
    if len(sorted_values) == 0:
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_values, values), len(sorted_values) - 1)
    return sorted_values[at] == values


def _first_occurrences(keys: np.ndarray) -> np.ndarray:
    """A mask of the first occurrence of each key, in order."""
    order = np.argsort(keys, kind="stable")
    first = np.ones(len(keys), dtype=bool)
    first[order[1:]] = keys[order[1:]] != keys[order[:-1]]
    return first


def _log1p(values: np.ndarray) -> np.ndarray:
    return np.log1p(np.maximum(np.nan_to_num(values, nan=0.0), 0.0)).astype(np.float32)


class _Converter:
    """Turn the staged log into request rows, one day and one chunk at a time."""

    def __init__(self, spec: FormatSpec, negatives: int, window_ms: int, seed: int,
                 user_ids: np.ndarray, video_ids: np.ndarray, users: _Features,
                 videos: _Features) -> None:
        self.spec = spec
        self.negatives = negatives
        self.window_ms = window_ms
        self.seed = seed
        self.user_ids = user_ids
        self.video_ids = video_ids
        self.users = users
        self.videos = videos
        self.written = {split: Counts(positives={b: 0 for b in BEHAVIOURS})
                        for split in ("train", "valid", "test")}
        self.duplicates = Counts(positives={b: 0 for b in BEHAVIOURS})
        self.stage_counts = np.zeros(4, dtype=np.int64)
        self.short_requests = 0

    def notes(self) -> list[str]:
        drawn = self.stage_counts
        notes = [f"negatives drawn: {drawn[1]} from the request's window, {drawn[2]} from the "
                 f"neighbouring windows, {drawn[3]} from the rest of the day"]
        if self.short_requests:
            notes.append(f"{self.short_requests} requests have fewer than {self.negatives} "
                         "negatives: their pools ran out of eligible videos")
        return notes

    def run(self, con: duckdb.DuckDBPyConnection, out: Path, test_days: int,
            valid_days: int) -> None:
        days = con.sql("SELECT DISTINCT day FROM exposures ORDER BY day").fetchnumpy()["day"]
        last = int(days[-1])
        with contextlib.ExitStack() as stack:
            writers: dict[str, RequestLogWriter] = {}
            for day in days.tolist():
                if day > last - test_days:
                    split = "test"
                elif day > last - test_days - valid_days:
                    split = "valid"
                else:
                    split = "train"
                rng = np.random.default_rng([self.seed, day - int(days[0])])
                pool = self._pool(con, day)
                for rows in self._day_rows(con, day):
                    columns = self._requests(rows, pool, rng)
                    counts = Counts.of_table(pa.table(columns), self.spec)
                    if split not in writers:
                        writers[split] = stack.enter_context(RequestLogWriter(
                            out / f"{split}.parquet", self.spec, id_type=pa.string()))
                    writers[split].write(columns)
                    self.written[split].add(counts)

    def _pool(self, con: duckdb.DuckDBPyConnection, day: int) -> dict[str, np.ndarray]:
        """Every exposure of the day and of one window either side, in time order."""
        first = (day * DAY_MS - DAY_OFFSET_MS) // self.window_ms - 1
        last = ((day + 1) * DAY_MS - DAY_OFFSET_MS - 1) // self.window_ms + 1
        pool = con.sql(f"SELECT bucket, user_id, video_id FROM exposures "
                       f"WHERE bucket BETWEEN {first} AND {last} "
                       f"ORDER BY time_ms, user_id, file, line").fetchnumpy()
        return {"bucket": np.asarray(pool["bucket"]), "user": np.asarray(pool["user_id"]),
                "video": np.searchsorted(self.video_ids, np.asarray(pool["video_id"]))}

    def _day_rows(self, con: duckdb.DuckDBPyConnection,
                  day: int) -> Iterator[dict[str, np.ndarray]]:
        """The day's log rows in (time, user, file order), cut between whole requests."""
        names = ["user_id", "time_ms", "video_id", *BEHAVIOURS]
        selected = ", ".join(f'"{n}"' for n in names)
        reader = con.sql(f"SELECT {selected} FROM exposures WHERE day = {day} "
                         f"ORDER BY time_ms, user_id, file, line").to_arrow_reader(ROWS_PER_CHUNK)
        carry: dict[str, np.ndarray] | None = None
        for batch in reader:
            rows = {n: batch.column(n).to_numpy(zero_copy_only=False) for n in names}
            if carry is not None:
                rows = {n: np.concatenate([carry[n], rows[n]]) for n in names}
            user, time = rows["user_id"], rows["time_ms"]
            starts = np.flatnonzero((user[1:] != user[:-1]) | (time[1:] != time[:-1])) + 1
            if len(starts) == 0:
                carry = rows
                continue
            cut = int(starts[-1])
            yield {n: v[:cut] for n, v in rows.items()}
            carry = {n: v[cut:] for n, v in rows.items()}
        if carry is not None and len(carry["user_id"]):
            yield carry

    def _requests(self, rows: dict[str, np.ndarray], pool: dict[str, np.ndarray],
                  rng: np.random.Generator) -> dict[str, pa.Array]:
        """Request-log columns for the log rows of whole requests."""
        user, time = rows["user_id"], rows["time_ms"]
        new_request = np.r_[True, (user[1:] != user[:-1]) | (time[1:] != time[:-1])]
        request_of_row = np.cumsum(new_request) - 1
        starts = np.flatnonzero(new_request)
        requests = len(starts)
        request_user, request_time = user[starts], time[starts]
        video = np.searchsorted(self.video_ids, rows["video_id"])

        width = len(self.video_ids) + 1
        repeated = ~_first_occurrences(request_of_row * width + video)
        if repeated.any():
            self.duplicates.exposures += int(repeated.sum())
            for b in BEHAVIOURS:
                self.duplicates.positives[b] += int((rows[b][repeated] != 0).sum())
            keep = ~repeated
            request_of_row, video = request_of_row[keep], video[keep]
            rows = {b: rows[b][keep] for b in BEHAVIOURS}
        shown = np.bincount(request_of_row, minlength=requests)  # m per request

        negatives, stage = sample_negatives(
            rng, self.negatives, request_user, request_time // self.window_ms,
            request_of_row, video, pool["bucket"], pool["user"], pool["video"])
        drawn = (negatives >= 0).sum(axis=1)
        self.stage_counts += np.bincount(stage.reshape(-1), minlength=4)
        self.short_requests += int((drawn < self.negatives).sum())

        # candidates: the exposed videos in log order, then the negatives, then shuffled
        lengths = shown + drawn  # n per request
        first = np.r_[0, np.cumsum(lengths)[:-1]]
        first_exposed = np.r_[0, np.cumsum(shown)[:-1]]
        position = np.arange(len(video)) - first_exposed[request_of_row]
        candidate = np.empty(int(lengths.sum()), dtype=np.int64)
        candidate[first[request_of_row] + position] = video
        negative_rows, negative_slots = np.nonzero(negatives >= 0)
        candidate[first[negative_rows] + shown[negative_rows] + negative_slots] = \
            negatives[negative_rows, negative_slots]
        order = candidate_order(self.seed, request_user, request_time, lengths)  # new -> old
        new_slot = np.empty_like(order)
        new_slot[order] = np.arange(len(order))                                  # old -> new
        candidate = candidate[order]
        exposed_at = new_slot[first[request_of_row] + position] - first[request_of_row]
        candidate_request = np.repeat(np.arange(requests), lengths)
        candidate_time = request_time[candidate_request]

        user_entity = np.searchsorted(self.user_ids, request_user)
        user_ids = pc.cast(pa.array(request_user), pa.string())
        columns: dict[str, pa.Array] = {
            REQUEST_ID: pc.binary_join_element_wise(
                user_ids, pc.cast(pa.array(request_time), pa.string()), "-"),
            USER_ID: user_ids,
            TIMESTAMP: pa.array(request_time, TIMESTAMP_TYPE),
            ITEM_ID: lists_from_flat(lengths, pc.cast(pa.array(self.video_ids[candidate]),
                                                  pa.string())),
            EXPOSED: lists_from_flat(shown, pa.array(exposed_at, pa.int32())),
        }
        for name in USER_CAT_COLUMNS:
            columns[USER_CAT + name] = self.users.category(name, user_entity)
        columns[USER_NUM + "known"] = (self.users.row_of[user_entity] >= 0).astype(np.float32)
        for feature, column in USER_COUNT_COLUMNS.items():
            columns[USER_NUM + feature] = _log1p(self.users.number(column, user_entity))
        for name in VIDEO_CAT_COLUMNS:
            columns[CAND_CAT + name] = lists_from_flat(lengths,
                                                   self.videos.category(name, candidate))
        for name, values in self._video_numbers(candidate, candidate_time).items():
            columns[CAND_NUM + name] = lists_from_flat(lengths, pa.array(values, pa.float32()))
        for b in BEHAVIOURS:
            columns[FEEDBACK + b] = lists_from_flat(shown, pa.array(rows[b], pa.float32()))
        return columns

    def _video_numbers(self, video: np.ndarray, time_ms: np.ndarray) -> dict[str, np.ndarray]:
        """Numeric candidate features, 0 where the feature file has no value."""
        duration = self.videos.number("video_duration", video)
        width = self.videos.number("server_width", video)
        height = self.videos.number("server_height", video)
        upload_day = self.videos.number("upload_dt", video)
        upload_ms = upload_day * DAY_MS - DAY_OFFSET_MS  # midnight in UTC+8
        with np.errstate(divide="ignore", invalid="ignore"):
            aspect = np.log(height / width)
        return {
            "known": (self.videos.row_of[video] >= 0).astype(np.float32),
            "log_duration": _log1p(duration / 1000.0),
            "has_duration": np.isfinite(duration).astype(np.float32),
            "log_aspect": np.where(np.isfinite(aspect), aspect, 0.0).astype(np.float32),
            "days_since_upload": np.nan_to_num((time_ms - upload_ms) / DAY_MS,
                                               nan=0.0).astype(np.float32),
        }
