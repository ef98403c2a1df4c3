"""MIND behaviours -> nar4rec request logs (docs/converters/mind.md).

A request is one impression: its candidates are the impressed news in the listed order, all of
them exposed, with one behaviour, `click`. The files are read in streamed blocks, turned into
request rows batch by batch, staged in Parquet and then sorted by time into the split files.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

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

BEHAVIOUR_FIELDS = ("impression_id", "user_id", "time", "history", "impressions")
NEWS_FIELDS = ("news_id", "category", "subcategory", "title", "abstract", "url",
               "title_entities", "abstract_entities")
TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"  # 11/13/2019 8:36:57 AM
DAY_MS = 86_400_000
BLOCK_BYTES = 1 << 24  # text read per block of behaviors.tsv
SPLITS = ("train", "valid", "test")
SPLIT_BY = ("day", "impression")

SPEC = FormatSpec(
    behaviours=("click",),
    utility_weights={"click": 1.0},
    user_cat=("top_category",),
    user_num=("log_history", "log_history_known"),
    cand_cat=("category", "subcategory"),
    cand_num=("category_share",),
    has_upstream_score=False,
    extra={"source": "mind", "time": "behaviors.tsv times, read as UTC",
           "exposed_order": "the impression's listed order; every candidate is exposed"},
)


def prepare_mind(behaviors: list[Path], news: Path, out_dir: Path, *,
                 split: str = "day", test_from: date | None = None,
                 valid_from: date | None = None, holdout: float = 0.1,
                 memory_limit: str = "2GB", threads: int = 2,
                 overwrite: bool = False) -> ConversionReport:
    """Convert MIND behaviors.tsv files and a news.tsv into train/valid/test request logs.

    `split="day"`: impressions on or after `test_from` (default: the last day in the data) go
    to test, those from `valid_from` (default: the day before `test_from`) to valid, the rest
    to train. `split="impression"`: a share `holdout` of the impressions goes to test and
    another to valid, chosen by a hash of the impression id (the same impressions whatever the
    files' order or size), all days mixed. Nothing is left in `out_dir` unless the whole
    conversion succeeds.
    """
    behaviors = [Path(p) for p in behaviors]
    news, out_dir = Path(news), Path(out_dir)
    if not behaviors:
        raise Nar4recError("mind: give at least one behaviors.tsv file")
    if threads < 1:
        raise Nar4recError("mind: threads must be >= 1")
    if split not in SPLIT_BY:
        raise Nar4recError(f"mind: split must be one of {SPLIT_BY}, not {split!r}")
    if split == "impression" and (test_from is not None or valid_from is not None):
        raise Nar4recError("mind: test_from and valid_from are days: they go with split='day'")
    if not 0.0 < holdout < 0.5:
        raise Nar4recError(f"mind: holdout must be in (0, 0.5), not {holdout}")
    if test_from is not None and valid_from is not None and valid_from > test_from:
        raise Nar4recError(f"mind: valid_from {valid_from} is after test_from {test_from}")
    for path in (*behaviors, news):
        if not path.is_file():
            raise DataError("no such file", file=str(path))

    catalogue = _News.read(news)
    report = ConversionReport(source="mind")
    report.read = Counts(positives={"click": 0})
    repeated = Counts(positives={"click": 0})
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        work = tmp / ".work"
        work.mkdir()
        try:
            staged = work / "requests.parquet"
            schema = _staging_schema()
            with pq.ParquetWriter(staged, schema) as writer:
                for file_index, path in enumerate(behaviors):
                    prefix = f"{file_index}-" if len(behaviors) > 1 else ""
                    impressions = 0
                    for batch, first_line in _behaviour_batches(path):
                        columns = _requests(batch, path, first_line, catalogue, prefix,
                                            report.read, repeated)
                        columns["_file"] = np.full(batch.num_rows, file_index, np.int16)
                        columns["_line"] = np.arange(first_line, first_line + batch.num_rows)
                        writer.write_table(pa.table(columns, schema=schema))
                        impressions += batch.num_rows
                    if impressions == 0:
                        raise DataError("the file holds no impressions", file=str(path))
            con = duckdb.connect(config={"memory_limit": memory_limit, "threads": threads,
                                         "temp_directory": str(work / "spill")})
            with contextlib.closing(con):
                con.execute("SET enable_progress_bar = false")
                where = (_by_day(con, staged, test_from, valid_from, report.notes)
                         if split == "day" else _by_impression(holdout, report.notes))
                report.written = _write_splits(con, staged, tmp, where, report.notes)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if repeated.exposures:
            report.dropped["news repeated within one impression (first kept)"] = repeated
        report.notes.append(f"{catalogue.impressed_known} of {catalogue.impressed} impressed "
                            f"news are in {news.name} (the others have null categories)")
        report.write_json(tmp / "summary.json")
    return report


def _staging_schema() -> pa.Schema:
    schema = SPEC.arrow_schema(pa.string()).remove_metadata()
    return schema.append(pa.field("_file", pa.int16())).append(pa.field("_line", pa.int64()))


def _source(staged: Path) -> str:
    return "read_parquet('{}')".format(str(staged).replace("'", "''"))


def _by_day(con: duckdb.DuckDBPyConnection, staged: Path, test_from: date | None,
            valid_from: date | None, notes: list[str]) -> dict[str, str]:
    """Each split's SQL condition on the staged rows: whole days, test last."""
    source = _source(staged)
    day = "CAST(epoch_ms(timestamp) // 86400000 AS INTEGER)"  # the UTC day, with no time zone
    first, last = con.sql(f"SELECT min({day}), max({day}) FROM {source}").fetchall()[0]
    epoch = date(1970, 1, 1)
    test_from = test_from or epoch + timedelta(days=int(last))
    valid_from = valid_from or test_from - timedelta(days=1)
    if valid_from > test_from:
        raise Nar4recError(f"mind: valid_from {valid_from} is after test_from {test_from}")
    valid_day, test_day = (valid_from - epoch).days, (test_from - epoch).days
    notes.append(f"data from {epoch + timedelta(days=int(first))} to "
                 f"{epoch + timedelta(days=int(last))}; valid from {valid_from}, "
                 f"test from {test_from}")
    return {"train": f"{day} < {valid_day}",
            "valid": f"{day} >= {valid_day} AND {day} < {test_day}",
            "test": f"{day} >= {test_day}"}


def _by_impression(holdout: float, notes: list[str]) -> dict[str, str]:
    """Each split's SQL condition: the impression id's MD5, first 32 bits read as a fraction u
    in [0, 1): test when u < holdout, valid when u < 2 * holdout, train otherwise."""
    draw = "(('0x' || md5(request_id)[1:8])::UBIGINT / 4294967296.0)"
    notes.append(f"split by impression: {holdout:.0%} to test, {holdout:.0%} to valid "
                 "(by the MD5 of the impression id), all days mixed")
    return {"train": f"{draw} >= {2 * holdout!r}",
            "valid": f"{draw} >= {holdout!r} AND {draw} < {2 * holdout!r}",
            "test": f"{draw} < {holdout!r}"}


def _write_splits(con: duckdb.DuckDBPyConnection, staged: Path, out: Path,
                  where: dict[str, str], notes: list[str]) -> dict[str, Counts]:
    """Write the staged rows into train/valid/test by each split's condition, sorted by time;
    return what each holds."""
    source = _source(staged)
    names = ", ".join(f'"{f.name}"' for f in SPEC.arrow_schema(pa.string()))
    written = {}
    for split in SPLITS:
        written[split] = Counts(positives={"click": 0})
        reader = con.sql(f"SELECT {names} FROM {source} WHERE {where[split]} "
                         f"ORDER BY timestamp, _file, _line").to_arrow_reader(65536)
        with contextlib.ExitStack() as stack:
            writer = None
            for batch in reader:
                if batch.num_rows == 0:
                    continue
                if writer is None:
                    writer = stack.enter_context(RequestLogWriter(
                        out / f"{split}.parquet", SPEC, id_type=pa.string()))
                columns = {name: batch.column(name) for name in batch.schema.names}
                writer.write(columns)
                written[split].add(Counts.of_table(batch, SPEC))
        if written[split].requests == 0:
            notes.append(f"{split}: no impression, no file written")
    return written


# --- reading the files -----------------------------------------------------------------------

def _tsv_reader(path: Path, fields: tuple[str, ...], include: tuple[str, ...],
                block_size: int = BLOCK_BYTES) -> Iterator[pa.RecordBatch]:
    """Batches of a headerless, unquoted TSV file, every column a string, in file order."""
    if path.stat().st_size == 0:
        return
    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=list(fields), block_size=block_size),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False,
                                             ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(
                column_types={f: pa.string() for f in fields}, include_columns=list(include),
                strings_can_be_null=False, quoted_strings_can_be_null=False))
        yield from reader
    except pa.ArrowInvalid as exc:
        raise _locate_bad_line(path, len(fields), exc) from None


def _locate_bad_line(path: Path, fields: int, exc: Exception) -> DataError:
    """Find the line pyarrow could not split (slow, used only once the read has failed)."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line, text in enumerate(fh, start=1):
            found = len(text.rstrip("\r\n").split("\t"))
            if found != fields:
                return DataError(f"expected {fields} tab-separated fields, found {found}",
                                 file=str(path), row=line)
    return DataError(f"cannot read as tab-separated text ({exc})", file=str(path))


def _behaviour_batches(path: Path) -> Iterator[tuple[pa.RecordBatch, int]]:
    """Batches of behaviors.tsv with the line number of each batch's first row."""
    line = 1
    for batch in _tsv_reader(path, BEHAVIOUR_FIELDS, BEHAVIOUR_FIELDS):
        yield batch, line
        line += batch.num_rows


class _News:
    """news.tsv's category and subcategory by news id; counts the impressed ids it knows."""

    def __init__(self, ids: pa.Array, category: pa.Array, subcategory: pa.Array) -> None:
        first = pc.equal(pc.index_in(ids, value_set=ids), pa.array(np.arange(len(ids))))
        self.ids = ids.filter(first)  # a repeated id keeps its first row
        self.category = category.filter(first)
        self.subcategory = subcategory.filter(first)
        categories = pc.unique(self.category.drop_null()).sort()
        self.categories = categories  # code c is the c-th category in sorted order
        self.category_code = pc.index_in(self.category, value_set=categories).fill_null(
            -1).to_numpy(zero_copy_only=False).astype(np.int64)
        self.impressed = 0  # impressed news looked up so far
        self.impressed_known = 0  # ... of which news.tsv has a row

    @classmethod
    def read(cls, path: Path) -> _News:
        table = pa.Table.from_batches(list(_tsv_reader(path, NEWS_FIELDS, NEWS_FIELDS[:3])))
        if table.num_rows == 0:
            raise DataError("the file holds no news", file=str(path))
        empty = pc.equal(pc.utf8_length(table.column("news_id")), 0).to_numpy(
            zero_copy_only=False)
        if empty.any():
            raise DataError("empty news id", file=str(path), row=int(np.argmax(empty)) + 1,
                            field="news_id")

        def null_if_empty(column: pa.ChunkedArray) -> pa.Array:
            column = column.combine_chunks()
            return pc.if_else(pc.equal(column, ""), pa.scalar(None, pa.string()), column)

        return cls(table.column("news_id").combine_chunks(), null_if_empty(table["category"]),
                   null_if_empty(table["subcategory"]))

    def rows(self, news_ids: pa.Array) -> pa.Array:
        """The row of each id in this table, null when unknown."""
        return pc.index_in(news_ids, value_set=self.ids)

    def codes(self, rows: pa.Array) -> np.ndarray:
        """Category codes of table rows (null rows and unknown categories give -1)."""
        row = rows.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        if len(self.category_code) == 0:
            return np.full(len(row), -1, dtype=np.int64)
        return np.where(row >= 0, self.category_code[np.maximum(row, 0)], -1)


# --- building requests -----------------------------------------------------------------------

def _fail(path: Path, first_line: int, bad: np.ndarray, field: str | None, message) -> None:
    """Raise for the first True of `bad` (a mask over a batch's rows)."""
    hits = np.flatnonzero(bad)
    if len(hits):
        row = int(hits[0])
        raise DataError(message(row), file=str(path), row=first_line + row, field=field)


def _split_tokens(column: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Space-separated tokens of each row (empty tokens dropped) and each token's row."""
    tokens = pc.split_pattern(column, " ")
    flat = pc.list_flatten(tokens)
    rows = pc.list_parent_indices(tokens).to_numpy(zero_copy_only=False).astype(np.int64)
    keep = pc.greater(pc.utf8_length(flat), 0)
    return flat.filter(keep), rows[keep.to_numpy(zero_copy_only=False)]


def _requests(batch: pa.RecordBatch, path: Path, first_line: int, news: _News, prefix: str,
              read: Counts, repeated: Counts) -> dict[str, pa.Array | np.ndarray]:
    """Request-log columns for a batch of impressions; counts what was read and dropped."""
    requests = batch.num_rows
    column = {f: batch.column(f) for f in BEHAVIOUR_FIELDS}
    lengths = {f: pc.utf8_length(column[f]).to_numpy(zero_copy_only=False) for f in column}
    _fail(path, first_line, sum(lengths.values()) == 0, None, lambda _: "empty line")
    for field in ("impression_id", "user_id"):
        _fail(path, first_line, lengths[field] == 0, field, lambda _: "empty value")
    moments = pc.strptime(column["time"], format=TIME_FORMAT, unit="ms", error_is_null=True)
    _fail(path, first_line, moments.is_null().to_numpy(zero_copy_only=False), "time",
          lambda r: f"{column['time'][r].as_py()!r} is not a time like "
                    "'11/13/2019 8:36:57 AM'")
    time_ms = moments.cast(pa.int64()).to_numpy(zero_copy_only=False)

    tokens, token_row = _split_tokens(column["impressions"])
    _fail(path, first_line, np.bincount(token_row, minlength=requests) == 0, "impressions",
          lambda _: "no impressed news")
    well_formed = pc.match_substring_regex(tokens, r"^\S+-[01]$").to_numpy(
        zero_copy_only=False)

    def token_error(r: int) -> str:
        token = tokens[int(np.flatnonzero(~well_formed & (token_row == r))[0])].as_py()
        news_id, dash, label = token.rpartition("-")
        if dash and news_id:
            return f"label {label!r} of {token!r} is not 0 or 1"
        return (f"{token!r} is not NEWSID-LABEL (labels 0 or 1; the unlabelled MIND test "
                "set cannot be converted)")

    bad_rows = np.zeros(requests, dtype=bool)
    bad_rows[token_row[~well_formed]] = True
    _fail(path, first_line, bad_rows, "impressions", token_error)

    item = pc.replace_substring_regex(tokens, r"-[01]$", "")
    click = pc.ends_with(tokens, "-1").to_numpy(zero_copy_only=False).astype(np.float32)
    read.add(Counts(requests, len(tokens), {"click": int(click.sum())}))

    codes = pc.dictionary_encode(item).indices.to_numpy(zero_copy_only=False).astype(np.int64)
    keys = token_row * (int(codes.max(initial=0)) + 1) + codes
    order = np.argsort(keys, kind="stable")
    again = np.zeros(len(keys), dtype=bool)
    again[order[1:]] = keys[order[1:]] == keys[order[:-1]]
    if again.any():
        repeated.add(Counts(0, int(again.sum()), {"click": int(click[again].sum())}))
        keep = ~again
        item, click, token_row = item.filter(pa.array(keep)), click[keep], token_row[keep]
    lengths = np.bincount(token_row, minlength=requests)
    position = np.arange(len(token_row)) - np.r_[0, np.cumsum(lengths)[:-1]][token_row]

    item_rows = news.rows(item)
    news.impressed_known += len(item_rows) - item_rows.null_count
    news.impressed += len(item_rows)
    item_code = news.codes(item_rows)

    history, history_row = _split_tokens(column["history"])
    history_code = news.codes(news.rows(history))
    known = history_code >= 0
    history_length = np.bincount(history_row, minlength=requests)
    known_length = np.bincount(history_row[known], minlength=requests)

    # (request, category) pairs of the known history, with their counts
    width = max(len(news.categories), 1)
    pairs, pair_count = np.unique(history_row[known] * width + history_code[known],
                                  return_counts=True)
    pair_row, pair_code = pairs // width, pairs % width
    top = np.full(requests, -1, dtype=np.int64)
    share = np.zeros(len(token_row), dtype=np.float32)
    if len(pairs):
        order = np.lexsort((pair_code, -pair_count, pair_row))  # most frequent, then by name
        first = order[np.r_[True, pair_row[order][1:] != pair_row[order][:-1]]]
        top[pair_row[first]] = pair_code[first]
        candidate_key = token_row * width + item_code
        at = np.minimum(np.searchsorted(pairs, candidate_key), len(pairs) - 1)
        found = (item_code >= 0) & (pairs[at] == candidate_key)
        share[found] = pair_count[at[found]] / known_length[token_row[found]]

    request_id = column["impression_id"]
    if prefix:
        request_id = pc.binary_join_element_wise(prefix, request_id, "")
    return {
        REQUEST_ID: request_id,
        USER_ID: column["user_id"],
        TIMESTAMP: pa.array(time_ms, TIMESTAMP_TYPE),
        USER_CAT + "top_category": news.categories.take(pa.array(top, mask=top < 0)),
        USER_NUM + "log_history": np.log1p(history_length).astype(np.float32),
        USER_NUM + "log_history_known": np.log1p(known_length).astype(np.float32),
        ITEM_ID: lists_from_flat(lengths, item),
        CAND_CAT + "category": lists_from_flat(lengths, news.category.take(item_rows)),
        CAND_CAT + "subcategory": lists_from_flat(lengths, news.subcategory.take(item_rows)),
        CAND_NUM + "category_share": lists_from_flat(lengths, pa.array(share, pa.float32())),
        EXPOSED: lists_from_flat(lengths, pa.array(position, pa.int32())),
        FEEDBACK + "click": lists_from_flat(lengths, pa.array(click, pa.float32())),
    }
