"""Convert the Avito Context Ad Clicks data (Kaggle, 2015) to the request-log format.

One request per search that showed contextual ads (ObjectType 3): the candidates and the exposed
list are those ads in Position order (ties by AdID), so n = m; the feedback `click` is IsClick and
the upstream score is HistCTR. Searches are split by day, counted from the earliest search among
the requests: train = days [0, train_days - valid_days), valid = [train_days - valid_days,
train_days), test = [train_days, ...). The features and the memory behaviour are described in
docs/converters/avito.md.

The 10 GB trainSearchStream.tsv is never loaded into Python: DuckDB reads, filters, joins,
groups and sorts it out of core under `memory_limit`, spilling to a folder inside the temporary
output directory; the requests and their ads come back as Arrow batches in time order, and each
batch is turned into list columns with vectorised Arrow/NumPy operations and written at once.
Every problem in the input is a DataError that names the file, the line (1-based, the header is
line 1) and the field.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nar4rec.data.convert import ConversionReport, Counts
from nar4rec.data.format import (
    EXPOSED,
    ITEM_ID,
    REQUEST_ID,
    TIMESTAMP,
    TIMESTAMP_TYPE,
    USER_ID,
    FormatSpec,
    RequestLogWriter,
)
from nar4rec.errors import DataError, Nar4recError
from nar4rec.io import atomic_dir

SPLITS = ("train", "valid", "test")
BATCH_ROWS = 65_536  # requests per Arrow batch pulled from DuckDB

SPEC = FormatSpec(
    behaviours=("click",),
    utility_weights={"click": 1.0},
    user_cat=("logged_on", "search_location", "search_region", "search_city", "search_category",
              "search_parent_category", "user_agent", "user_agent_os", "user_device",
              "user_agent_family"),
    user_num=("has_query", "log1p_query_length", "num_search_params"),
    cand_cat=("ad_category", "ad_parent_category", "ad_location", "ad_region", "ad_city"),
    cand_num=("log1p_price", "price_missing", "log1p_title_length", "num_ad_params"),
    has_upstream_score=True,
    extra={"source": "avito-context-ad-clicks"},
)


@dataclass(frozen=True, eq=False)
class RawFile:
    """One Kaggle TSV file: the columns the converter needs and the DuckDB type of each.

    Columns of the file that are not listed are read as text and never used.
    """

    name: str
    columns: dict[str, str]
    required: bool = True


STREAM = RawFile("trainSearchStream.tsv", {
    "SearchID": "BIGINT", "AdID": "BIGINT", "Position": "INTEGER", "ObjectType": "INTEGER",
    "HistCTR": "DOUBLE", "IsClick": "INTEGER"})
SEARCH_INFO = RawFile("SearchInfo.tsv", {
    "SearchID": "BIGINT", "SearchDate": "TIMESTAMP", "UserID": "BIGINT",
    "IsUserLoggedOn": "BIGINT", "SearchQuery": "VARCHAR", "LocationID": "BIGINT",
    "CategoryID": "BIGINT", "SearchParams": "VARCHAR"})
ADS_INFO = RawFile("AdsInfo.tsv", {
    "AdID": "BIGINT", "LocationID": "BIGINT", "CategoryID": "BIGINT", "Params": "VARCHAR",
    "Price": "DOUBLE", "Title": "VARCHAR"})
USER_INFO = RawFile("UserInfo.tsv", {
    "UserID": "BIGINT", "UserAgentID": "BIGINT", "UserAgentOSID": "BIGINT",
    "UserDeviceID": "BIGINT", "UserAgentFamilyID": "BIGINT"}, required=False)
CATEGORY = RawFile("Category.tsv", {"CategoryID": "BIGINT", "ParentCategoryID": "BIGINT"},
                   required=False)
LOCATION = RawFile("Location.tsv", {
    "LocationID": "BIGINT", "RegionID": "BIGINT", "CityID": "BIGINT"}, required=False)

# Per-row checks after a successful typed read: (field, SQL predicate naming a bad row, message).
# The message may use {value}, the field's value on the first bad line.
CONTEXTUAL = "ObjectType = 3"
STREAM_CHECKS = [
    ("ObjectType", "ObjectType IS NULL", "is empty"),
    ("ObjectType", "ObjectType NOT IN (1, 2, 3)", "is {value}, expected 1, 2 or 3"),
    ("SearchID", f"{CONTEXTUAL} AND SearchID IS NULL", "is empty"),
    ("AdID", f"{CONTEXTUAL} AND AdID IS NULL", "is empty"),
    ("Position", f"{CONTEXTUAL} AND Position IS NULL", "is empty"),
    ("HistCTR", f"{CONTEXTUAL} AND HistCTR IS NULL", "is empty for a contextual ad (ObjectType 3)"),
    ("HistCTR", f"{CONTEXTUAL} AND NOT isfinite(HistCTR)", "is {value}, not a finite number"),
    ("IsClick", f"{CONTEXTUAL} AND IsClick IS NULL", "is empty for a contextual ad (ObjectType 3)"),
    ("IsClick", f"{CONTEXTUAL} AND IsClick NOT IN (0, 1)", "is {value}, expected 0 or 1"),
]
# SearchInfo and AdsInfo are checked only on the lines the requests need (these predicates
# pick them when a bad line is looked for; the tables are loaded through semi-joins).
NEEDED_SEARCH = "SearchID IN (SELECT SearchID FROM ctx_searches)"
SEARCH_CHECKS = [
    ("SearchDate", "SearchDate IS NULL", "is empty"),
    ("UserID", "UserID IS NULL", "is empty"),
]
NEEDED_AD = "AdID IN (SELECT DISTINCT AdID FROM ctx)"
AD_CHECKS = [
    ("Price", "NOT (isfinite(Price) AND Price >= 0)", "is {value}, expected a finite price >= 0"),
]

TYPE_WORDS = {"BIGINT": "an integer", "INTEGER": "an integer", "DOUBLE": "a number",
              "TIMESTAMP": "a date and time such as 2015-05-10 18:11:01.0"}


def prepare_avito(raw_dir: Path, out_dir: Path, *, train_days: int = 21, valid_days: int = 1,
                  memory_limit: str = "2GB", threads: int = 2,
                  overwrite: bool = False) -> ConversionReport:
    """Convert the Kaggle files in `raw_dir` to train/valid/test request logs in `out_dir`.

    Writes train.parquet, valid.parquet, test.parquet and summary.json, all or nothing. Raises
    DataError for a bad input file and Nar4recError for bad arguments or a failed run.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    if train_days < 1 or not 0 <= valid_days < train_days:
        raise Nar4recError(f"need train_days >= 1 and 0 <= valid_days < train_days, got "
                           f"train_days={train_days}, valid_days={valid_days}")
    if threads < 1:
        raise Nar4recError(f"threads must be >= 1, got {threads}")
    paths = _input_paths(raw_dir)
    report = ConversionReport(source=f"avito ({raw_dir})")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        work = tmp / ".duckdb"  # DuckDB's database and spill files; removed before the rename
        work.mkdir()
        try:
            with _user_errors(memory_limit), \
                    contextlib.closing(_connect(work, memory_limit, threads)) as con:
                _load(con, paths, report)
                _write_splits(con, tmp, train_days, valid_days, report)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        report.write_json(tmp / "summary.json")
    return report


def _input_paths(raw_dir: Path) -> dict[RawFile, Path | None]:
    if not raw_dir.is_dir():
        raise DataError("no such directory (expected the Kaggle Avito files)", file=str(raw_dir))
    paths: dict[RawFile, Path | None] = {}
    for raw in (STREAM, SEARCH_INFO, ADS_INFO, USER_INFO, CATEGORY, LOCATION):
        path = raw_dir / raw.name
        if not path.is_file():
            if raw.required:
                raise DataError("required file is missing", file=str(path))
            path = None
        paths[raw] = path
    return paths


def _connect(work: Path, memory_limit: str, threads: int) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(str(work / "avito.duckdb"))
    try:
        con.execute(f"SET memory_limit = {_sql_str(memory_limit)}")
    except duckdb.Error:
        con.close()
        raise Nar4recError(f"invalid memory limit {memory_limit!r} (expected e.g. '2GB')") \
            from None
    con.execute(f"SET threads = {int(threads)}")
    con.execute(f"SET temp_directory = {_sql_str(str(work / 'spill'))}")
    con.execute("SET preserve_insertion_order = false")
    con.execute("SET enable_progress_bar = false")
    return con


@contextlib.contextmanager
def _user_errors(memory_limit: str):
    """Turn what DuckDB, Arrow or the file system raise into one-line errors (no traceback)."""
    try:
        yield
    except duckdb.OutOfMemoryException as exc:
        raise Nar4recError(f"DuckDB ran out of memory under memory_limit={memory_limit} "
                           f"(raise --memory-limit): {_first_line(exc)}") from None
    except duckdb.Error as exc:
        raise Nar4recError(f"the conversion failed inside DuckDB: {_first_line(exc)}") from None
    except pa.ArrowException as exc:
        raise Nar4recError(f"the conversion failed in Arrow: {_first_line(exc)}") from None
    except OSError as exc:
        raise Nar4recError(f"the conversion failed writing its output: {exc}") from None


def _load(con: duckdb.DuckDBPyConnection, paths: dict[RawFile, Path | None],
          report: ConversionReport) -> None:
    """Read the raw files into DuckDB tables, checking each, and count what was read."""
    stream = _source(paths[STREAM], STREAM)
    _create(con, "ctx", """
        SELECT SearchID, AdID, Position, ObjectType, HistCTR, IsClick
        FROM {source}
        WHERE ObjectType IS NULL OR ObjectType NOT IN (1, 2)""", stream, STREAM_CHECKS)
    _create(con, "ctx_searches", """
        SELECT SearchID, count(*) AS exposures, sum(IsClick) AS clicks
        FROM ctx GROUP BY SearchID""")
    requests, exposures, clicks = _first_row(con, """
        SELECT count(*), coalesce(sum(exposures), 0), coalesce(sum(clicks), 0)
        FROM ctx_searches""")
    if requests == 0:
        raise DataError("no contextual ads (ObjectType 3): there is nothing to convert",
                        file=str(stream.path))
    report.read = Counts(int(requests), int(exposures), {"click": int(clicks)})

    for raw, table, key in ((CATEGORY, "categories", "CategoryID"),
                            (LOCATION, "locations", "LocationID")):
        _load_lookup(con, paths[raw], raw, table, key, f"SELECT {', '.join(raw.columns)} "
                                                       "FROM {source}")

    ads = _source(paths[ADS_INFO], ADS_INFO)
    _create(con, "ads", """
        SELECT AdID, LocationID, CategoryID, Price, length(Title) AS title_length,
               len(regexp_extract_all(coalesce(Params, ''), '(^\\{|, )\\d+:')) AS num_params
        FROM {source} AS r SEMI JOIN (SELECT DISTINCT AdID FROM ctx) AS k ON r.AdID = k.AdID
        """, ads, AD_CHECKS, NEEDED_AD)
    _check_unique(con, "ads", "AdID", ads)
    _create(con, "ad_features", """
        SELECT a.AdID,
               a.CategoryID AS ad_category, c.ParentCategoryID AS ad_parent_category,
               a.LocationID AS ad_location, l.RegionID AS ad_region, l.CityID AS ad_city,
               coalesce(ln(1 + a.Price), 0)::FLOAT AS log1p_price,
               (a.Price IS NULL)::FLOAT AS price_missing,
               ln(1 + coalesce(a.title_length, 0))::FLOAT AS log1p_title_length,
               a.num_params::FLOAT AS num_ad_params
        FROM ads AS a
        LEFT JOIN categories AS c ON c.CategoryID = a.CategoryID
        LEFT JOIN locations AS l ON l.LocationID = a.LocationID""")
    missing_ads = _first_row(con, "SELECT count(*) FROM ctx ANTI JOIN ads USING (AdID)")[0]
    if missing_ads:
        report.notes.append(f"{missing_ads} contextual-ad exposures have no AdsInfo row: "
                            "their ad features are null (price_missing = 1)")

    searches = _source(paths[SEARCH_INFO], SEARCH_INFO)
    _create(con, "searches", """
        SELECT SearchID, SearchDate, UserID, IsUserLoggedOn, LocationID, CategoryID,
               (SearchQuery IS NOT NULL)::FLOAT AS has_query,
               ln(1 + length(coalesce(SearchQuery, '')))::FLOAT AS log1p_query_length,
               len(regexp_extract_all(coalesce(SearchParams, ''), '(^\\{|, )\\d+:'))::FLOAT
                   AS num_search_params
        FROM {source} AS r SEMI JOIN ctx_searches AS k ON r.SearchID = k.SearchID
        """, searches, SEARCH_CHECKS, NEEDED_SEARCH)
    _check_unique(con, "searches", "SearchID", searches)
    _load_lookup(con, paths[USER_INFO], USER_INFO, "users", "UserID",
                 f"SELECT {', '.join(USER_INFO.columns)} FROM {{source}} AS r "
                 "SEMI JOIN (SELECT DISTINCT UserID FROM searches) AS k ON r.UserID = k.UserID")
    for raw in (USER_INFO, CATEGORY, LOCATION):
        if paths[raw] is None:
            report.notes.append(f"{raw.name} is absent: the features it gives are null")

    dropped = _first_row(con, """
        SELECT count(*), coalesce(sum(exposures), 0), coalesce(sum(clicks), 0)
        FROM ctx_searches ANTI JOIN searches USING (SearchID)""")
    if dropped[0]:
        report.dropped["no SearchInfo row"] = Counts(int(dropped[0]), int(dropped[1]),
                                                     {"click": int(dropped[2])})
    if dropped[0] == requests:
        raise DataError("no search with contextual ads has a SearchInfo row",
                        file=str(searches.path), field="SearchID")


def _load_lookup(con, path: Path | None, raw: RawFile, table: str, key: str,
                 select: str) -> None:
    """A small lookup table (users, categories, locations); empty when its file is absent."""
    if path is None:
        columns = ", ".join(f"{name} {kind}" for name, kind in raw.columns.items())
        con.execute(f"CREATE TABLE {table} ({columns})")
        return
    source = _source(path, raw)
    _create(con, table, select, source, [(key, f"{key} IS NULL", "is empty")])
    _check_unique(con, table, key, source)


@dataclass(frozen=True)
class Source:
    """A raw file as DuckDB reads it: every column named from the header, typed as needed."""

    path: Path
    raw: RawFile
    header: tuple[str, ...]

    def sql(self, rejects: str | None = None) -> str:
        """The read_csv(...) call; with `rejects`, unreadable lines go to that table."""
        columns = ", ".join(f"{_sql_str(name)}: {_sql_str(self.raw.columns.get(name, 'VARCHAR'))}"
                            for name in self.header)
        options = [_sql_str(str(self.path)), "delim = '\t'", "header = true", "quote = ''",
                   "escape = ''", "auto_detect = false", f"columns = {{{columns}}}"]
        if rejects:
            options += ["store_rejects = true", f"rejects_table = '{rejects}'",
                        f"rejects_scan = '{rejects}_scan'", "rejects_limit = 100"]
        return f"read_csv({', '.join(options)})"


def _source(path: Path, raw: RawFile) -> Source:
    """Check the header line of a raw file: every needed column must be there."""
    try:
        with path.open("rb") as f:
            first = f.readline()
    except OSError as exc:
        raise DataError(f"cannot read ({exc.strerror})", file=str(path)) from None
    header = first.decode("utf-8-sig", errors="replace").rstrip("\r\n").split("\t")
    if not first.strip():
        raise DataError("the file is empty: expected a header line", file=str(path), row=1)
    for name in raw.columns:
        if name not in header:
            raise DataError(f"the header has no column '{name}' (it has: {', '.join(header)})",
                            file=str(path), row=1, field=name)
    if len(set(header)) != len(header):
        raise DataError("the header names a column twice", file=str(path), row=1)
    return Source(path, raw, tuple(header))


def _create(con, table: str, select: str, source: Source | None = None,
            checks: list[tuple[str, str, str]] = (), needed: str = "true") -> None:
    """CREATE TABLE `table` AS `select`, where {source} in `select` reads `source`.

    Then raise the first line DuckDB could not read, or the first line failing one of `checks`
    (run on the new table, then located by reading the lines of the file that are `needed`).
    """
    rejects = f"rejects_{table}"
    if source is not None:
        select = select.replace("{source}", source.sql(rejects=rejects))
    con.execute(f"CREATE TABLE {table} AS {select}")
    if source is None:
        return
    first = _first_row(con, f"""
        SELECT line, column_idx, column_name, error_type, csv_line, error_message
        FROM {rejects} ORDER BY line, column_idx LIMIT 1""")
    if first is not None:
        raise _reject_error(source, *first)
    if not checks:
        return
    failing = _first_row(con, "SELECT " + ", ".join(
        f"count(*) FILTER (WHERE {predicate})" for _, predicate, _ in checks)
        + f" FROM {table}")
    failing = [check for check, count in zip(checks, failing, strict=True) if count]
    if failing:
        raise _first_bad_line(con, source, failing, needed)


def _reject_error(source: Source, line: int, column_idx: int, column: str, error_type: str,
                  csv_line: str, message: str) -> DataError:
    """A DataError for a line DuckDB could not read with the expected types."""
    fields = (csv_line or "").split("\t")
    expected = len(source.header)
    if error_type == "CAST":
        index = source.header.index(column) if column in source.header else -1
        value = fields[index] if 0 <= index < len(fields) else ""
        kind = source.raw.columns.get(column, "VARCHAR")
        text = f"cannot read {value!r} as {TYPE_WORDS.get(kind, kind)}"
    elif error_type == "MISSING COLUMNS":
        text = (f"the line has {len(fields)} fields, the header {expected} "
                "(is the file truncated?)")
    elif error_type == "TOO MANY COLUMNS":
        text = f"the line has more fields than the header's {expected}"
    else:
        text = f"cannot be read: {_first_line(message)}"
    return DataError(text, file=str(source.path), row=int(line), field=column or None)


def _first_bad_line(con, source: Source, checks: list[tuple[str, str, str]],
                    needed: str) -> DataError:
    """Read the file again, numbering its lines, to find the first line failing a check."""
    fields = sorted({name for name, _, _ in checks})
    flags = ", ".join(f"coalesce({predicate}, false) AS bad_{i}"
                      for i, (_, predicate, _) in enumerate(checks))
    values = ", ".join(f"{name}::VARCHAR AS value_{name}" for name in fields)
    anywhere = " OR ".join(f"bad_{i}" for i in range(len(checks)))
    con.execute("SET preserve_insertion_order = true")
    row = _first_row(con, f"""
        SELECT * FROM (
            SELECT line, {flags}, {values}
            FROM (SELECT row_number() OVER () + 1 AS line, * FROM {source.sql()})
            WHERE {needed}
        ) WHERE {anywhere} ORDER BY line LIMIT 1""")
    con.execute("SET preserve_insertion_order = false")
    if row is None:  # cannot happen: the same predicates matched the loaded rows
        name, _, message = checks[0]
        return DataError(message.format(value="?"), file=str(source.path), field=name)
    line, bad, value = row[0], row[1:1 + len(checks)], row[1 + len(checks):]
    name, _, message = next(c for c, is_bad in zip(checks, bad, strict=True) if is_bad)
    return DataError(message.format(value=value[fields.index(name)]), file=str(source.path),
                     row=int(line), field=name)


def _check_unique(con, table: str, key: str, source: Source) -> None:
    """Each id may have one line: a repeated id would duplicate exposures and clicks."""
    repeated = _first_row(con, f"SELECT {key} FROM {table} GROUP BY {key} HAVING count(*) > 1 "
                           "LIMIT 1")
    if repeated is None:
        return
    con.execute("SET preserve_insertion_order = true")
    lines = [line for (line,) in con.execute(f"""
        SELECT line FROM (SELECT row_number() OVER () + 1 AS line, {key} FROM {source.sql()})
        WHERE {key} = ? ORDER BY line LIMIT 2""", [repeated[0]]).fetchall()]
    con.execute("SET preserve_insertion_order = false")
    first, second = (lines + [None, None])[:2]
    raise DataError(f"{key} {repeated[0]} is repeated (first on line {first})",
                    file=str(source.path), row=second, field=key)


def _write_splits(con, out: Path, train_days: int, valid_days: int,
                  report: ConversionReport) -> None:
    """Stream the requests in time order, attach their contextual ads, write the three splits.

    The two tables from _sort_requests_and_ads are read side by side: the ads of a batch of
    requests are the next sum(n) ad rows.
    """
    first_day = _first_row(con, "SELECT min(SearchDate)::DATE FROM searches")[0]
    _sort_requests_and_ads(con, first_day)
    bounds = np.array([train_days - valid_days, train_days])  # first day of valid, of test
    for name in SPLITS:
        report.written[name] = Counts(0, 0, {"click": 0})
    ad_cursor = con.cursor()  # a second connection, to read both tables at once
    with contextlib.ExitStack() as stack:
        stack.callback(ad_cursor.close)
        writers: dict[str, RequestLogWriter] = {}  # opened on a split's first request
        ad_rows = _RowBuffer(_arrow_batches(ad_cursor.sql("FROM ad_rows"), BATCH_ROWS))
        for batch in _arrow_batches(con.sql("FROM request_rows"), BATCH_ROWS):
            lengths = batch.column("n").to_numpy().astype(np.int64)
            table = _requests_table(batch, lengths, ad_rows.take(int(lengths.sum())))
            split = np.searchsorted(bounds, batch.column("day").to_numpy(), side="right")
            for index, name in enumerate(SPLITS):
                part = table.filter(pa.array(split == index))
                if part.num_rows == 0:
                    continue
                if name not in writers:
                    writers[name] = stack.enter_context(
                        RequestLogWriter(out / f"{name}.parquet", SPEC))
                writers[name].write({f.name: part.column(f.name) for f in writers[name].schema})
                report.written[name].add(Counts.of_table(part, SPEC))
        if ad_rows.take_rest():
            raise Nar4recError("internal error: contextual ads left over after the last request")
    for name in SPLITS:
        if report.written[name].requests == 0:
            report.notes.append(f"{name}: no request, no file written")
    report.notes.append(f"day 0 = {first_day}; train = days [0, {train_days - valid_days}), "
                        f"valid = [{train_days - valid_days}, {train_days}), "
                        f"test = [{train_days}, ...)")


def _sort_requests_and_ads(con, first_day) -> None:
    """Two tables stored in the same order, by (SearchDate, SearchID).

    request_rows: one row per request with its features and n, its number of contextual ads;
    ad_rows: one row per contextual ad, by (Position, AdID) within a request. Sorting rows is
    several times faster in DuckDB than an ordered list() aggregate per search. Each join and
    each sort runs alone, so that none waits for memory another holds, and tables are dropped
    as soon as they are used up, so that the database file stays small. With
    preserve_insertion_order on, the tables keep their sorted order and are read back in it.
    """
    con.execute("SET preserve_insertion_order = true")
    con.execute(f"""
        CREATE TABLE request_rows AS
        SELECT s.SearchID AS {REQUEST_ID}, s.UserID AS {USER_ID},
               epoch_ms(s.SearchDate) AS timestamp_ms,
               date_diff('day', DATE '{first_day}', s.SearchDate::DATE) AS day,
               n.exposures AS n,
               {", ".join(f"{expr} AS {name}" for name, expr in _request_columns().items())}
        FROM searches AS s
        JOIN ctx_searches AS n ON n.SearchID = s.SearchID
        LEFT JOIN users AS u ON u.UserID = s.UserID
        LEFT JOIN locations AS l ON l.LocationID = s.LocationID
        LEFT JOIN categories AS c ON c.CategoryID = s.CategoryID
        ORDER BY s.SearchDate, s.SearchID""")
    con.execute("SET preserve_insertion_order = false")
    con.execute("""
        CREATE TABLE ctx_dated AS
        SELECT s.SearchDate, c.SearchID, c.Position, c.AdID, c.HistCTR, c.IsClick
        FROM ctx AS c JOIN searches AS s ON s.SearchID = c.SearchID""")
    con.execute("DROP TABLE ctx; DROP TABLE searches; DROP TABLE users; CHECKPOINT")
    con.execute("SET preserve_insertion_order = true")
    con.execute(f"""
        CREATE TABLE ad_rows AS
        SELECT c.SearchID,
               {", ".join(f"{expr} AS {name}" for name, expr in _candidate_columns().items())}
        FROM ctx_dated AS c
        LEFT JOIN ad_features AS a ON a.AdID = c.AdID
        ORDER BY c.SearchDate, c.SearchID, c.Position, c.AdID""")
    con.execute("DROP TABLE ctx_dated; CHECKPOINT")


def _candidate_columns() -> dict[str, str]:
    """List column -> SQL over the contextual ad `c` and its features `a`."""
    return {
        ITEM_ID: "c.AdID",
        "upstream_score": "c.HistCTR::FLOAT",
        "feedback_click": "c.IsClick::FLOAT",
        **{f"cand_cat_{name}": f"a.{name}" for name in SPEC.cand_cat},
        "cand_num_log1p_price": "coalesce(a.log1p_price, 0)",
        "cand_num_price_missing": "coalesce(a.price_missing, 1)",
        "cand_num_log1p_title_length": "coalesce(a.log1p_title_length, 0)",
        "cand_num_num_ad_params": "coalesce(a.num_ad_params, 0)",
    }


def _request_columns() -> dict[str, str]:
    """Request column -> SQL over the search `s`, its user `u`, location `l`, category `c`."""
    return {
        "user_cat_logged_on": "s.IsUserLoggedOn",
        "user_cat_search_location": "s.LocationID",
        "user_cat_search_region": "l.RegionID",
        "user_cat_search_city": "l.CityID",
        "user_cat_search_category": "s.CategoryID",
        "user_cat_search_parent_category": "c.ParentCategoryID",
        "user_cat_user_agent": "u.UserAgentID",
        "user_cat_user_agent_os": "u.UserAgentOSID",
        "user_cat_user_device": "u.UserDeviceID",
        "user_cat_user_agent_family": "u.UserAgentFamilyID",
        "user_num_has_query": "s.has_query",
        "user_num_log1p_query_length": "s.log1p_query_length",
        "user_num_num_search_params": "s.num_search_params",
    }


def _requests_table(requests: pa.RecordBatch, lengths: np.ndarray, ads: pa.Table) -> pa.Table:
    """Requests (one row each) and their ads (sum(lengths) rows, in order) -> the log's columns."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    ad_search = ads.column("SearchID").to_numpy()
    if not np.array_equal(ad_search, np.repeat(requests.column(REQUEST_ID).to_numpy(), lengths)):
        raise Nar4recError("internal error: the contextual ads and the requests are out of step")
    columns = {name: requests.column(name) for name in (REQUEST_ID, USER_ID)}
    columns[TIMESTAMP] = pc.cast(requests.column("timestamp_ms"), pa.int64()).view(TIMESTAMP_TYPE)
    columns.update({name: requests.column(name) for name in _request_columns()})
    offsets_array = pa.array(offsets, pa.int32())
    for name in _candidate_columns():
        columns[name] = pa.ListArray.from_arrays(offsets_array, ads.column(name).combine_chunks())
    exposed = np.arange(offsets[-1], dtype=np.int32) - np.repeat(offsets[:-1], lengths)
    columns[EXPOSED] = pa.ListArray.from_arrays(offsets_array, pa.array(exposed, pa.int32()))
    return pa.table(columns)


class _RowBuffer:
    """Hands out the rows of a stream of record batches, `count` at a time, in order."""

    def __init__(self, batches) -> None:
        self._batches = iter(batches)
        self._pending: list[pa.RecordBatch] = []
        self._size = 0
        self._schema: pa.Schema | None = None

    def take(self, count: int) -> pa.Table:
        while self._size < count:
            batch = next(self._batches, None)
            if batch is None:
                raise Nar4recError("internal error: fewer contextual ads than the requests need")
            self._schema = batch.schema
            self._pending.append(batch)
            self._size += batch.num_rows
        table = pa.Table.from_batches(self._pending, schema=self._schema)
        self._pending = table.slice(count).to_batches()
        self._size -= count
        return table.slice(0, count)

    def take_rest(self) -> int:
        """Read the stream to its end; the number of rows that were never taken."""
        return self._size + sum(batch.num_rows for batch in self._batches)


def _arrow_batches(relation, rows: int):
    """Stream a DuckDB relation as Arrow record batches of at most `rows` rows."""
    reader = (relation.to_arrow_reader(rows) if hasattr(relation, "to_arrow_reader")
              else relation.fetch_record_batch(rows))
    yield from reader


def _first_row(con, sql: str, parameters: list | None = None) -> tuple | None:
    """The first row of a query (reading the result to its end, as DuckDB requires)."""
    rows = con.execute(sql, parameters).fetchall()
    return rows[0] if rows else None


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _first_line(exc: BaseException | str) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
