"""Split one request log by time into the train/valid/test files of a data directory.

`nar4rec split` runs this. The log is read twice, never whole: first its `timestamp` column
alone, to place the two cuts; then row group by row group, each row going to its split's
Parquet writer. The splits keep the log's schema and `nar4rec` metadata, and its row order
within each split (they are not sorted by time).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nar4rec.config import SUMMARY_FILE, dataset_of
from nar4rec.data.convert import ConversionReport, Counts
from nar4rec.data.format import (
    CAND_CAT,
    ITEM_ID,
    METADATA_KEY,
    REQUEST_ID,
    TIMESTAMP,
    USER_CAT,
    USER_ID,
    FormatSpec,
    folder_files,
    open_parquet,
)
from nar4rec.errors import DataError, Nar4recError
from nar4rec.io import atomic_dir

SPLITS = ("train", "valid", "test")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
UNITS_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
TIES = "requests at a cut's timestamp go to the later split"


@dataclass(frozen=True)
class Cut:
    """Where a split starts: the first timestamp it holds (in the log's time unit), and how it
    was chosen ("given", or the quantile of the requests it was read at)."""

    value: int
    how: str


def split_by_time(source: str | os.PathLike, out_dir: str | os.PathLike, *,
                  valid: float = 0.1, test: float = 0.1,
                  valid_from: datetime | date | None = None,
                  test_from: datetime | date | None = None,
                  overwrite: bool = False, row_group_size: int = 16384) -> dict:
    """Write out_dir/train.parquet, valid.parquet, test.parquet and summary.json from one log.

    A request goes to train if its timestamp is before `valid_from`, to test if it is at or
    after `test_from`, else to valid: requests at a cut's timestamp go to the later split.
    Without `test_from`, it is the timestamp of the first request of the last `test` share of
    the requests, in time order (the 1 - test quantile); without `valid_from`, that of the first
    of the `valid` share of the requests just before test (the 1 - valid - test quantile when
    test_from is not given either). Ties at a cut can make the earlier split a little smaller
    than its share. Within a split, rows keep the log's order.

    Memory: the timestamp column (8 bytes a request), one row group of the log, and up to
    `row_group_size` rows per split waiting to be written; the rest of the log is streamed.
    Everything is written into a temporary folder renamed to `out_dir` when complete, so a
    failure leaves nothing behind.

    Args:
        source: a request log (docs/data-format.md): one Parquet file, or a folder of Parquet
            part files with one schema, read in name order.
        out_dir: the data directory to write; an existing non-empty one is an error unless
            `overwrite`.
        valid, test: the shares of the requests that go to valid and test, each in (0, 1),
            together below 1; a share given by a date instead is not used.
        valid_from, test_from: the cuts as times (a date is its midnight; a time without an
            offset is UTC). valid_from must be before test_from.
        row_group_size: rows per row group of the outputs.
    Returns:
        summary.json's content: the counts read and written per split (requests, exposures,
        positives), the cuts, and each split's first and last timestamp.
    """
    source, out_dir = Path(source), Path(out_dir)
    for name, share in (("valid", valid), ("test", test)):
        if not 0 < share < 1:
            raise Nar4recError(f"{name} must be a share of the requests in (0, 1), got {share}")
    if valid + test >= 1:
        raise Nar4recError(f"valid + test must be below 1 to leave requests to train, got "
                           f"valid={valid} + test={test}")
    if row_group_size < 1:
        raise Nar4recError(f"row_group_size must be >= 1, got {row_group_size}")
    given = {"valid_from": _utc(valid_from), "test_from": _utc(test_from)}
    if None not in given.values() and given["valid_from"] >= given["test_from"]:
        raise Nar4recError(f"valid_from ({given['valid_from'].isoformat()}) must be before "
                           f"test_from ({given['test_from'].isoformat()})")
    files = _log_files(source)
    if out_dir.resolve() == source.resolve() or out_dir.resolve() in source.resolve().parents:
        raise Nar4recError(f"{out_dir}: the log {source} is inside the output directory; "
                           "write the splits elsewhere")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        summary = _write_splits(files, source, tmp, valid, test, given, row_group_size)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _write_splits(files: list[Path], source: Path, tmp: Path, valid: float, test: float,
                  given: dict[str, datetime | None], row_group_size: int) -> dict:
    """Place the cuts, write tmp/SPLIT.parquet for each split; return the summary."""
    parquets, schema, spec = _open_log(files)
    unit = schema.field(TIMESTAMP).type.unit
    cuts = _cuts(_read_timestamps(parquets, files), unit, valid, test, given, source)
    dataset = dataset_of(source if source.is_dir() else source.parent)
    report = ConversionReport(source=f"{dataset} (split of {source})" if dataset
                              else f"split of {source}")
    report.written = {split: Counts() for split in SPLITS}
    report.notes.append(f"{TIES}; rows keep the log's order within a split")
    first: dict[str, int | None] = {split: None for split in SPLITS}
    last: dict[str, int | None] = {split: None for split in SPLITS}
    writers = {split: _SplitWriter(tmp / f"{split}.parquet", schema, row_group_size)
               for split in SPLITS}
    try:
        for parquet, path in zip(parquets, files, strict=True):
            for group in _row_groups(parquet, path):
                report.read.add(Counts.of_table(group, spec))
                ts = _as_int64(group.column(TIMESTAMP))
                which = (ts >= cuts["valid_from"].value).astype(np.int8) \
                    + (ts >= cuts["test_from"].value)                   # 0, 1, 2: the split
                for index, split in enumerate(SPLITS):
                    rows = which == index
                    if not rows.any():
                        continue
                    part = group.filter(pa.array(rows))
                    report.written[split].add(Counts.of_table(part, spec))
                    writers[split].write(part)
                    low, high = int(ts[rows].min()), int(ts[rows].max())
                    first[split] = low if first[split] is None else min(first[split], low)
                    last[split] = high if last[split] is None else max(last[split], high)
        for writer in writers.values():
            writer.close()
    except BaseException:
        for writer in writers.values():
            writer.abandon()
        raise
    return {
        **report.as_dict(),
        "log": str(source),
        "cuts": {name: {"time": _iso(cut.value, unit), "chosen": cut.how}
                 for name, cut in cuts.items()},
        "splits": {split: {"requests": report.written[split].requests,
                           "first": _iso(first[split], unit), "last": _iso(last[split], unit)}
                   for split in SPLITS},
    }


def _utc(moment: datetime | date | None) -> datetime | None:
    """A cut as an aware datetime: a date is its midnight, a naive time is UTC."""
    if moment is None:
        return None
    if not isinstance(moment, datetime):
        moment = datetime(moment.year, moment.month, moment.day)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _log_files(source: Path) -> list[Path]:
    """The log's files: `source`, or the .parquet files of the folder `source` in name order,
    but for names starting with "_" or "." (what Spark and pyarrow.dataset skip too)."""
    if source.is_dir():
        files = folder_files(source)
        if not files:
            raise DataError("no .parquet files in this directory", file=str(source))
        return files
    if not source.exists():
        raise DataError("no such file or directory", file=str(source))
    return [source]


def _open_log(files: list[Path]) -> tuple[list[pq.ParquetFile], pa.Schema, FormatSpec]:
    """Open every part, check that it is a log with timestamps and the first part's columns
    and format metadata. Returns the files, the schema to write (the first part's, with the
    `nar4rec` metadata key, made from the spec where the part has none) and the spec."""
    parquets, schema, spec = [], None, None
    for path in files:
        parquet = open_parquet(path)
        part_schema = parquet.schema_arrow
        part_spec = FormatSpec.from_schema(part_schema, path)
        if TIMESTAMP not in part_schema.names:
            raise DataError("required column is missing: split needs each request's time (a "
                            "request file to rerank has none; split the log it came from)",
                            file=str(path), field=TIMESTAMP)
        part_spec.require_labels(path)
        field = part_schema.field(TIMESTAMP)
        if not pa.types.is_timestamp(field.type):
            raise DataError(f"expected a timestamp column, got {field.type}", file=str(path),
                            field=TIMESTAMP)
        if schema is None:
            schema, spec = part_schema, part_spec
            if METADATA_KEY not in (schema.metadata or {}):
                metadata = {**(schema.metadata or {}),
                            METADATA_KEY: json.dumps(spec.metadata()).encode()}
                schema = schema.with_metadata(metadata)
        elif not part_schema.equals(schema, check_metadata=False):
            raise DataError(f"its columns differ from those of {files[0]}: "
                            f"{_difference(part_schema, schema)}", file=str(path))
        elif part_spec.metadata() != spec.metadata():
            raise DataError(f"its format metadata differs from that of {files[0]}",
                            file=str(path), field="nar4rec")
        parquets.append(parquet)
    return parquets, schema, spec


def _difference(schema: pa.Schema, expected: pa.Schema) -> str:
    """How a part's columns differ from the first part's, in a few words."""
    missing = [name for name in expected.names if name not in schema.names]
    if missing:
        return f"no column {', '.join(missing)}"
    extra = [name for name in schema.names if name not in expected.names]
    if extra:
        return f"an extra column {', '.join(extra)}"
    for field in schema:
        other = expected.field(field.name)
        if not field.equals(other):
            return f"column {field.name} is {field.type}{'' if field.nullable else ' not null'}" \
                f", not {other.type}{'' if other.nullable else ' not null'}"
    return f"the columns are in another order: {', '.join(schema.names)}"


def _row_groups(parquet: pq.ParquetFile, path: Path,
                columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The file's rows, one row group at a time (pyarrow's iter_batches reads ahead and holds
    several); a row group that cannot be read is a DataError."""
    for group in range(parquet.num_row_groups):
        try:
            yield parquet.read_row_group(group, columns=columns)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"cannot read row group {group} ({exc})", file=str(path)) from None


def _as_int64(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A timestamp column as int64 counts of its own unit since the epoch."""
    return np.asarray(column.cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)


def _read_timestamps(parquets: list[pq.ParquetFile], files: list[Path]) -> np.ndarray:
    """Every request's timestamp (the log's unit), in one int64 array; a null is a DataError
    naming its file and row."""
    total = sum(p.metadata.num_rows for p in parquets)
    timestamps = np.empty(total, dtype=np.int64)
    filled = 0
    for parquet, path in zip(parquets, files, strict=True):
        row = 0
        for group in _row_groups(parquet, path, [TIMESTAMP]):
            column = group.column(0)
            if column.null_count:
                null = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
                raise DataError("is null: every request needs a time to be split by",
                                file=str(path), row=row + null, field=TIMESTAMP)
            timestamps[filled:filled + len(group)] = _as_int64(column)
            filled += len(group)
            row += len(group)
    return timestamps[:filled]


def _cuts(timestamps: np.ndarray, unit: str, valid: float, test: float,
          given: dict[str, datetime | None], source: Path) -> dict[str, Cut]:
    """The first timestamp of valid and of test; a split that would be empty is a DataError
    saying which and why. Sorts `timestamps` in place."""
    total = len(timestamps)
    if total == 0:
        raise DataError("the log has no requests", file=str(source))
    shares = {"valid": valid, "test": test}
    for split, share in shares.items():
        if given[f"{split}_from"] is None and round(total * share) == 0:
            raise DataError(f"the {split} split would be empty: {split}={share} of "
                            f"{total:,} requests rounds to no request (give a larger share "
                            f"or {split}_from)", file=str(source), field=TIMESTAMP)
    ordered = timestamps
    ordered.sort()
    if given["test_from"] is not None:
        test_cut = Cut(_to_unit(given["test_from"], unit), "given")
    else:
        test_cut = Cut(int(ordered[total - round(total * test)]), f"the {1 - test:.4g} quantile")
    before_test = int(np.searchsorted(ordered, test_cut.value, side="left"))
    if given["valid_from"] is not None:
        valid_cut = Cut(_to_unit(given["valid_from"], unit), "given")
    else:
        how = f"the {1 - valid - test:.4g} quantile" if given["test_from"] is None else \
            f"the first of the last {valid:.4g} of the requests before test_from"
        position = before_test - round(total * valid)
        valid_cut = Cut(int(ordered[max(position, 0)]) if before_test else test_cut.value, how)
    cuts = {"valid_from": valid_cut, "test_from": test_cut}
    starts = np.searchsorted(ordered, [valid_cut.value, test_cut.value], side="left")
    sizes = dict(zip(SPLITS, np.diff([0, *starts, total]).tolist(), strict=True))
    for split, size in sizes.items():
        if size <= 0:
            valid_from, test_from = (f"{name} {_iso(cut.value, unit)} ({cut.how})"
                                     for name, cut in cuts.items())
            where = {"train": f"before {valid_from}",
                     "valid": f"at or after {valid_from} and before {test_from}",
                     "test": f"at or after {test_from}"}[split]
            raise DataError(
                f"the {split} split would be empty: none of the {total:,} requests is {where}; "
                f"the log runs from {_iso(int(ordered[0]), unit)} to "
                f"{_iso(int(ordered[-1]), unit)}, and {TIES}", file=str(source), field=TIMESTAMP)
    return cuts


def _to_unit(moment: datetime, unit: str) -> int:
    """The first count of `unit` since the epoch at or after `moment` (so that a request
    goes to the later split exactly when its time is at or after the cut)."""
    micros = (moment - EPOCH) // timedelta(microseconds=1)
    per_second = UNITS_PER_SECOND[unit]
    if per_second >= 1_000_000:
        return micros * (per_second // 1_000_000)
    step = 1_000_000 // per_second
    return -(-micros // step)


def _iso(value: int | None, unit: str) -> str | None:
    """A timestamp in the log's unit as ISO 8601 in UTC, to the log's precision (at most the
    microsecond): 2024-03-01T00:00:15.121Z."""
    if value is None:
        return None
    per_second = UNITS_PER_SECOND[unit]
    micros = value * (1_000_000 // per_second) if per_second <= 1_000_000 \
        else value // (per_second // 1_000_000)
    precision = {"s": "seconds", "ms": "milliseconds"}.get(unit, "microseconds")
    moment = EPOCH + timedelta(microseconds=micros)
    return moment.isoformat(timespec=precision).replace("+00:00", "Z")


class _SplitWriter:
    """One split's Parquet file: rows gather until a row group is full, so row groups have
    `row_group_size` rows whatever the order of the log."""

    def __init__(self, path: Path, schema: pa.Schema, row_group_size: int) -> None:
        # Dictionary pages for ids and categories, as RequestLogWriter writes them.
        dictionary = [f.name for f in schema if f.name in (REQUEST_ID, USER_ID, ITEM_ID)
                      or f.name.startswith((USER_CAT, CAND_CAT))]
        self.schema = schema
        self.row_group_size = row_group_size
        self.writer = pq.ParquetWriter(path, schema, compression="zstd",
                                       use_dictionary=dictionary)
        self.pending: list[pa.Table] = []
        self.pending_rows = 0

    def write(self, rows: pa.Table) -> None:
        self.pending.append(rows)
        self.pending_rows += rows.num_rows
        if self.pending_rows >= self.row_group_size:
            self._flush(whole_groups=True)

    def _flush(self, whole_groups: bool) -> None:
        """Write what is pending (only whole row groups if `whole_groups`; the rest waits)."""
        if not self.pending_rows:
            return
        table = pa.concat_tables(self.pending)
        rows = table.num_rows - table.num_rows % self.row_group_size if whole_groups \
            else table.num_rows
        self.writer.write_table(table.slice(0, rows), row_group_size=self.row_group_size)
        self.pending = [table.slice(rows)]
        self.pending_rows = table.num_rows - rows

    def close(self) -> None:
        """Write the last, partial row group and the file's footer."""
        self._flush(whole_groups=False)
        self.writer.close()

    def abandon(self) -> None:
        """Close the file without writing what is pending (its folder is being removed)."""
        with contextlib.suppress(Exception):
            self.writer.close()
