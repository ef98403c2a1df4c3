"""Check a request-log file against the format and its invariants, row by row, vectorised."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nar4rec.data.convert import Counts
from nar4rec.data.format import (
    CAND_CAT,
    CAND_NUM,
    EXPOSED,
    FEEDBACK,
    FLOAT32_MAX,
    ITEM_ID,
    LOG_PROPENSITY,
    LOGGING_MARGINAL,
    LOGGING_PREFIX,
    LOGGING_SCORE,
    LOGGING_TEMPERATURE,
    REQUEST_ID,
    TIMESTAMP,
    UPSTREAM_SCORE,
    USER_CAT,
    USER_ID,
    USER_NUM,
    FormatSpec,
    open_parquet,
)
from nar4rec.errors import DataError
from nar4rec.propensity import pl_log_prob, pl_prefix_log_probs

BEYOND_FLOAT32 = f"has a value beyond float32's range (|x| > {FLOAT32_MAX:.8g})"


@dataclass(frozen=True)
class Problem:
    """One violation of the format: where it is and what is wrong."""

    file: str
    row: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        return str(DataError(self.message, file=self.file, row=self.row, field=self.field))


@dataclass
class FileReport:
    """The problems found in a file and, when it could be read, its summary counts.

    has_labels: False for a request file to rerank (no logged lists, no feedback).
    """

    file: str
    has_labels: bool = True
    problems: list[Problem] = field(default_factory=list)
    counts: Counts = field(default_factory=Counts)
    min_candidates: int | None = None
    max_candidates: int | None = None
    min_list_length: int | None = None
    max_list_length: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict:
        return {
            "kind": "request log" if self.has_labels else "requests to rerank",
            **self.counts.as_dict(),
            "candidates": {"min": self.min_candidates, "max": self.max_candidates},
            "list_length": {"min": self.min_list_length, "max": self.max_list_length},
            "problems": len(self.problems),
        }


def _is_id(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or pa.types.is_integer(t)


def _is_list_of(t: pa.DataType, predicate) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)
            or pa.types.is_fixed_size_list(t)) and predicate(t.value_type)


def _expected_types(spec: FormatSpec) -> dict[str, tuple[str, object]]:
    """Column name -> (description, type predicate)."""
    expected = {
        REQUEST_ID: ("int64 or string", _is_id),
        USER_ID: ("int64 or string", _is_id),
        TIMESTAMP: ("timestamp", pa.types.is_timestamp),
        ITEM_ID: ("list of int64 or string", lambda t: _is_list_of(t, _is_id)),
    }
    if spec.has_labels:
        expected[EXPOSED] = ("list of integers", lambda t: _is_list_of(t, pa.types.is_integer))
    for f in spec.user_cat:
        expected[USER_CAT + f] = ("int64 or string", _is_id)
    for f in spec.user_num:
        expected[USER_NUM + f] = ("number", _is_number)
    for f in spec.cand_cat:
        expected[CAND_CAT + f] = ("list of int64 or string", lambda t: _is_list_of(t, _is_id))
    for f in spec.cand_num:
        expected[CAND_NUM + f] = ("list of numbers", lambda t: _is_list_of(t, _is_number))
    if spec.has_upstream_score:
        expected[UPSTREAM_SCORE] = ("list of numbers", lambda t: _is_list_of(t, _is_number))
    for b in spec.behaviours if spec.has_labels else ():
        expected[FEEDBACK + b] = ("list of numbers", lambda t: _is_list_of(t, _is_number))
    if spec.has_log_propensity:
        expected[LOG_PROPENSITY] = ("number", _is_number)
    if spec.has_logging_score:
        expected[LOGGING_SCORE] = ("list of numbers", lambda t: _is_list_of(t, _is_number))
        expected[LOGGING_TEMPERATURE] = ("number", _is_number)
    if spec.has_logging_marginal:
        expected[LOGGING_MARGINAL] = ("list of lists of numbers", lambda t: _is_list_of(
            t, lambda v: _is_list_of(v, _is_number)))
    if spec.has_logging_prefix:
        expected[LOGGING_PREFIX] = ("list of numbers", lambda t: _is_list_of(t, _is_number))
    return expected


def check_file(path: str | os.PathLike) -> FileReport:
    """Validate one Parquet request log; every problem is reported with its row and field."""
    path = Path(path)
    report = FileReport(file=str(path))
    try:
        parquet = open_parquet(path)
        spec = FormatSpec.from_schema(parquet.schema_arrow, path)
    except DataError as exc:
        report.problems.append(Problem(str(path), exc.row, exc.field, exc.message))
        return report
    report.has_labels = spec.has_labels

    schema = parquet.schema_arrow
    expected = _expected_types(spec)
    for name in schema.names:
        if name in expected:
            description, predicate = expected[name]
            if not predicate(schema.field(name).type):
                report.problems.append(Problem(
                    str(path), None, name,
                    f"has type {schema.field(name).type}, expected {description}"))
        else:
            report.problems.append(Problem(str(path), None, name, "unknown column"))
    if report.problems:
        return report
    if parquet.metadata.num_rows == 0:
        report.problems.append(Problem(str(path), None, None, "the file holds no requests"))
        return report

    seen_ids: list[pa.Array] = []
    offset = 0
    for group in range(parquet.metadata.num_row_groups):
        try:
            table = parquet.read_row_group(group)
        except (pa.ArrowException, OSError) as exc:
            report.problems.append(Problem(
                str(path), offset, None,
                f"cannot read row group {group} (rows from {offset} on): {exc}"))
            return report
        for batch in table.to_batches(max_chunksize=65536):
            _check_batch(batch, spec, offset, report)
            seen_ids.append(batch.column(REQUEST_ID))
            offset += batch.num_rows
    _check_repeated_ids(pa.chunked_array(seen_ids), report)
    return report


def check_table(table: pa.Table, spec: FormatSpec, name: str = "<requests>") -> FileReport:
    """Validate requests held in memory (an Arrow table with `spec`'s columns) as `check_file`
    validates a file: every problem with its row and field, the file named `name`."""
    report = FileReport(file=name, has_labels=spec.has_labels)
    offset = 0
    for batch in table.to_batches(max_chunksize=65536):
        _check_batch(batch, spec, offset, report)
        offset += batch.num_rows
    _check_repeated_ids(table.column(REQUEST_ID), report)
    return report


def _check_repeated_ids(ids: pa.ChunkedArray, report: FileReport) -> None:
    """Flag every row of a repeated request id; then sort the report's problems by row."""
    counts = pc.value_counts(ids) if len(ids) else None
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1)) \
        if counts is not None else []
    if len(repeated):
        rows = np.flatnonzero(pc.is_in(ids, value_set=repeated).to_numpy(zero_copy_only=False))
        for r in rows:
            report.problems.append(Problem(report.file, int(r), REQUEST_ID,
                                           f"request id {ids[int(r)].as_py()!r} is repeated"))
    report.problems.sort(key=lambda p: (p.row if p.row is not None else -1, p.field or ""))


def validate_file(path: str | os.PathLike) -> list[Problem]:
    """The problems of one request-log file (an empty list when it is valid)."""
    return check_file(path).problems


def _lengths(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return pc.list_value_length(column).fill_null(-1).to_numpy(zero_copy_only=False)


def _flat(column) -> tuple[np.ndarray, np.ndarray]:
    """Flattened list values and the row of each value (rows with null lists contribute none)."""
    lengths = np.maximum(_lengths(column), 0)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    return pc.list_flatten(column), rows


def _check_batch(batch: pa.RecordBatch, spec: FormatSpec, offset: int,
                 report: FileReport) -> None:
    problems = report.problems
    file = report.file

    def flag(rows: np.ndarray, name: str, message: str) -> None:
        for r in np.unique(rows):
            problems.append(Problem(file, offset + int(r), name, message))

    def null_rows(column) -> np.ndarray:
        return np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))

    for name in (REQUEST_ID, USER_ID, TIMESTAMP, ITEM_ID, EXPOSED):
        if name in batch.schema.names:    # a request to rerank may lack timestamp, exposed
            flag(null_rows(batch.column(name)), name, "is null")
    for name in ([USER_NUM + f for f in spec.user_num]
                 + ([LOG_PROPENSITY] if spec.has_log_propensity else [])):
        column = batch.column(name)
        if name != LOG_PROPENSITY:
            flag(null_rows(column), name, "is null")
        values = column.to_numpy(zero_copy_only=False).astype(np.float64)
        bad = ~np.isfinite(values) & ~column.is_null().to_numpy(zero_copy_only=False)
        flag(np.flatnonzero(bad), name, "is not a finite number (NaN or infinite)")
        flag(np.flatnonzero(np.abs(np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0))
                            > FLOAT32_MAX), name, BEYOND_FLOAT32)
        if name == LOG_PROPENSITY:
            flag(np.flatnonzero(np.nan_to_num(values, nan=0.0) > 1e-9), name,
                 "is a log-probability and must be <= 0")

    n = _lengths(batch.column(ITEM_ID))
    flag(np.flatnonzero(n == 0), ITEM_ID, "has no candidates")

    items, _ = _flat(batch.column(ITEM_ID))
    item_rows = np.repeat(np.arange(len(n)), np.maximum(n, 0))
    flag(item_rows[items.is_null().to_numpy(zero_copy_only=False)], ITEM_ID,
         "has a null item id")
    _check_distinct_items(items, item_rows, offset, report)

    candidate_lists = [CAND_CAT + f for f in spec.cand_cat] + [CAND_NUM + f for f in spec.cand_num]
    if spec.has_upstream_score:
        candidate_lists.append(UPSTREAM_SCORE)
    for name in candidate_lists:
        lengths = _lengths(batch.column(name))
        flag(np.flatnonzero(lengths < 0), name, "is null")
        flag(np.flatnonzero((lengths != n) & (n >= 0) & (lengths >= 0)), name,
             "length differs from the number of candidates (item_id)")
    for name in [CAND_NUM + f for f in spec.cand_num] + (
            [UPSTREAM_SCORE] if spec.has_upstream_score else []):
        _check_numbers(batch.column(name), name, flag)
    m = np.zeros(0, np.int64)
    if spec.has_labels:
        m, lists = _check_labels(batch, spec, n, flag)
        if spec.has_logging:
            _check_logging(batch, spec, n, m, lists, flag)

    counts = Counts.of_table(batch, spec)
    report.counts.add(counts)
    valid_n, valid_m = n[n > 0], m[m > 0]
    if len(valid_n):
        report.min_candidates = int(min(valid_n.min(), report.min_candidates or 1 << 62))
        report.max_candidates = int(max(valid_n.max(), report.max_candidates or 0))
    if len(valid_m):
        report.min_list_length = int(min(valid_m.min(), report.min_list_length or 1 << 62))
        report.max_list_length = int(max(valid_m.max(), report.max_list_length or 0))


def _check_labels(batch: pa.RecordBatch, spec: FormatSpec, n: np.ndarray,
                  flag) -> tuple[np.ndarray, np.ndarray]:
    """Check the logged lists and their feedback (lengths, indices into the candidates,
    numbers); return the lists' lengths m (R,) and the lists (R, max m) padded with -1, all
    -1 for a row whose list is not valid."""
    m = _lengths(batch.column(EXPOSED))
    bad = (m <= 0) | (m > n) | (n <= 0)
    flag(np.flatnonzero(m == 0), EXPOSED, "the exposed list is empty")
    flag(np.flatnonzero((m > n) & (n >= 0)), EXPOSED,
         "more exposed positions than candidates (m > n)")
    for b in spec.behaviours:
        name = FEEDBACK + b
        lengths = _lengths(batch.column(name))
        flag(np.flatnonzero(lengths < 0), name, "is null")
        flag(np.flatnonzero((lengths != m) & (m >= 0) & (lengths >= 0)), name,
             "length differs from the exposed list's")
        _check_numbers(batch.column(name), name, flag)

    exposed, rows = _flat(batch.column(EXPOSED))
    if len(exposed):
        null = exposed.is_null().to_numpy(zero_copy_only=False)
        flag(rows[null], EXPOSED, "has a null position")
        values = exposed.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        limit = np.maximum(n, 0)[rows]
        out_of_range = ((values < 0) | (values >= limit)) & ~null
        flag(rows[out_of_range], EXPOSED, "has an index outside [0, n) of the candidates")
        ok = ~null & ~out_of_range                 # only real indices can repeat
        ok_rows, ok_values = rows[ok].astype(np.int64), values[ok]
        key = ok_rows * (int(np.maximum(n, 0).max(initial=0)) + 1) + ok_values
        order = np.argsort(key, kind="stable")
        repeats = order[1:][np.diff(key[order]) == 0]
        flag(ok_rows[repeats], EXPOSED, "shows the same candidate twice")
        bad[rows[null | out_of_range]] = True
        bad[ok_rows[repeats]] = True
        lists = _padded(values, np.maximum(m, 0), -1)
    else:
        lists = np.full((len(m), 1), -1)
    lists[bad] = -1
    return m, lists


def _padded(flat: np.ndarray, lengths: np.ndarray, fill, width: int | None = None
            ) -> np.ndarray:
    """Row r's lengths[r] values of `flat` (concatenated by row) in an (R, width) array padded
    with `fill`; width is the longest row's length unless given (longer rows are cut)."""
    longest = max(int(lengths.max(initial=0)), 1)
    out = np.full((len(lengths), max(longest, width or 1)), fill, dtype=flat.dtype)
    row = np.repeat(np.arange(len(lengths)), lengths)
    out[row, np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)] = flat
    return out if width is None else np.ascontiguousarray(out[:, :width])


def _check_logging(batch: pa.RecordBatch, spec: FormatSpec, n: np.ndarray, m: np.ndarray,
                   lists: np.ndarray, flag) -> None:
    """Check the logging_ columns: shapes against n and m, numbers, and that they agree
    with each other and with log_propensity. A null is a request whose logging policy is
    unknown; only rows whose list and every column involved are valid are compared."""
    rows = batch.num_rows
    real = (lists >= 0).any(axis=1)                     # a valid exposed list
    log_propensity = np.full(rows, np.nan)
    if spec.has_log_propensity:
        log_propensity = batch.column(LOG_PROPENSITY).to_numpy(
            zero_copy_only=False).astype(np.float64)
        invalid = ~np.isfinite(log_propensity) | (np.abs(np.nan_to_num(log_propensity))
                                                   > FLOAT32_MAX) | (log_propensity > 1e-9)
        log_propensity[invalid] = np.nan        # null, or reported as a problem of its own
    logits = None
    if spec.has_logging_score:
        logits = _check_plackett_luce(batch, n, lists, real, log_propensity, flag)
    if spec.has_logging_marginal:
        _check_marginal(batch.column(LOGGING_MARGINAL), n, m, lists, flag)
    if spec.has_logging_prefix:
        _check_prefix(batch.column(LOGGING_PREFIX), m, lists, real, log_propensity, logits,
                      flag)


def _check_plackett_luce(batch: pa.RecordBatch, n: np.ndarray, lists: np.ndarray,
                         real: np.ndarray, log_propensity: np.ndarray, flag) -> np.ndarray:
    """logging_score (n finite numbers) and logging_temperature (> 0), null together, and
    log_propensity their Plackett-Luce log-probability of the exposed list. Returns the
    logits (R, N) of the rows fit to compare, -inf for padding, NaN for the other rows."""
    score, temperature = batch.column(LOGGING_SCORE), batch.column(LOGGING_TEMPERATURE)
    lengths = _lengths(score)                                         # -1 for a null
    values, value_rows = _flat(score)
    numbers = values.fill_null(np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
    t = temperature.to_numpy(zero_copy_only=False).astype(np.float64)
    t_null = temperature.is_null().to_numpy(zero_copy_only=False)
    both = "a Plackett-Luce logger needs both; null in both: unknown for this request"
    flag(np.flatnonzero((lengths < 0) & ~t_null), LOGGING_SCORE,
         f"is null while {LOGGING_TEMPERATURE} is not ({both})")
    flag(np.flatnonzero(t_null & (lengths >= 0)), LOGGING_TEMPERATURE,
         f"is null while {LOGGING_SCORE} is not ({both})")
    flag(np.flatnonzero((lengths != n) & (n >= 0) & (lengths >= 0)), LOGGING_SCORE,
         "length differs from the number of candidates (item_id)")
    _check_numbers(score, LOGGING_SCORE, flag)
    bad_t = ~t_null & ~(np.isfinite(t) & (np.nan_to_num(t, nan=0.0) > 0))
    flag(np.flatnonzero(bad_t), LOGGING_TEMPERATURE, "must be a finite number > 0")

    usable = real & (lengths == n) & ~t_null & ~bad_t
    usable[value_rows[~np.isfinite(numbers)]] = False
    width = max(int(n.max(initial=1)), 1)
    scores = _padded(numbers, np.maximum(lengths, 0), np.nan, width)       # (R, N)
    logits = np.where(usable[:, None] & ~np.isnan(scores),
                      scores / np.where(usable, t, 1.0)[:, None], -np.inf)
    check = np.flatnonzero(usable & ~np.isnan(log_propensity))
    for part in _row_chunks(check, width):
        computed = pl_log_prob(logits[part], lists[part])
        wrong = np.abs(computed - log_propensity[part]) > 1e-3
        for row, value in zip(part[wrong], computed[wrong], strict=True):
            flag(np.array([row]), LOG_PROPENSITY,
                 f"{log_propensity[row]:.6g} is not the Plackett-Luce log-probability of the "
                 f"exposed list under {LOGGING_SCORE} / {LOGGING_TEMPERATURE} ({value:.6g})")
    logits[~usable] = np.nan
    return logits


def _check_prefix(column, m: np.ndarray, lists: np.ndarray, real: np.ndarray,
                  log_propensity: np.ndarray, logits: np.ndarray | None, flag) -> None:
    """logging_prefix_log_propensity: m finite log-probabilities, <= 0, non-increasing, the
    last one log_propensity, and all of them the Plackett-Luce ones where the log has
    logging_score (`logits`)."""
    name = LOGGING_PREFIX
    lengths = _lengths(column)
    flag(np.flatnonzero((lengths != m) & (m >= 0) & (lengths >= 0)), name,
         "length differs from the exposed list's")
    _check_numbers(column, name, flag)
    values, value_rows = _flat(column)
    numbers = values.fill_null(np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
    flag(value_rows[np.nan_to_num(numbers, nan=0.0) > 1e-9], name,
         "is a log-probability and must be <= 0")
    same_row = value_rows[1:] == value_rows[:-1]
    flag(value_rows[1:][same_row & (np.diff(numbers) > 1e-9)], name,
         "increases along the list (a longer prefix cannot be more probable)")
    usable = real & (lengths == m)
    usable[value_rows[~np.isfinite(numbers)]] = False
    prefix = _padded(numbers, np.maximum(lengths, 0), np.nan, lists.shape[1])    # (R, M)
    last = prefix[np.arange(len(m)), np.clip(m - 1, 0, prefix.shape[1] - 1)]
    disagree = usable & ~np.isnan(log_propensity) & (
        np.abs(last - log_propensity) > 1e-4 * np.maximum(1.0, np.abs(log_propensity)))
    flag(np.flatnonzero(disagree), name,
         f"its last entry (the whole list's) differs from {LOG_PROPENSITY}")
    if logits is None:
        return
    check = np.flatnonzero(usable & ~np.isnan(logits).any(axis=1))
    for part in _row_chunks(check, logits.shape[1]):
        computed = pl_prefix_log_probs(logits[part], lists[part])
        wrong = (np.abs(np.nan_to_num(computed - prefix[part], nan=0.0)) > 1e-3).any(axis=1)
        flag(part[wrong], name, "is not the Plackett-Luce log-probability of the exposed "
             f"list's prefixes under {LOGGING_SCORE} / {LOGGING_TEMPERATURE}")


def _row_chunks(rows: np.ndarray, width: int) -> list[np.ndarray]:
    """`rows` in pieces of about 4M candidate slots (bounded memory for the PL checks)."""
    return np.array_split(rows, max(1, len(rows) * width // 2**22))


def _check_marginal(column, n: np.ndarray, m: np.ndarray, lists: np.ndarray, flag) -> None:
    """logging_marginal: n lists of m probabilities in [0, 1]; each position's column sums to
    1 over the candidates, each candidate's row to at most 1, and the item shown at each
    position has a probability > 0."""
    name = LOGGING_MARGINAL
    outer = _lengths(column)                                       # -1 for a null row
    flag(np.flatnonzero((outer != n) & (n >= 0) & (outer >= 0)), name,
         "length differs from the number of candidates (item_id)")
    inner_lists, list_rows = _flat(column)                         # one per candidate
    inner = _lengths(inner_lists)
    flag(list_rows[inner < 0], name, "has a null list of probabilities")
    wrong_m = (inner >= 0) & (inner != np.maximum(m, 0)[list_rows])
    flag(list_rows[wrong_m], name,
         "a candidate's probabilities differ in length from the exposed list")
    values, value_lists = _flat(inner_lists)
    if len(values) == 0:
        return
    value_rows = list_rows[value_lists]
    null = values.is_null().to_numpy(zero_copy_only=False)
    numbers = values.fill_null(np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
    flag(value_rows[null], name, "has a null value")
    flag(value_rows[~null & ~np.isfinite(numbers)], name,
         "has a value that is not finite (NaN or infinite)")
    flag(value_rows[(numbers < 0) | (numbers > 1)], name, "has a probability outside [0, 1]")

    # Rows of the right shape with finite numbers: sums by position and by candidate.
    shaped = (outer == n) & (m > 0) & (n > 0)
    shaped[list_rows[(inner < 0) | wrong_m]] = False
    shaped[value_rows[~np.isfinite(numbers)]] = False
    keep = shaped[value_rows]
    inner = np.maximum(inner, 0)
    position = np.arange(len(values)) - np.repeat(np.cumsum(inner) - inner, inner)
    cells = np.where(shaped, m, 0)                                 # (row, position) cells
    first_cell = np.cumsum(cells) - cells
    column_sum = np.bincount((first_cell[value_rows] + position)[keep],
                             weights=numbers[keep], minlength=int(cells.sum()))
    cell_rows = np.repeat(np.arange(len(m)), cells)
    flag(cell_rows[np.abs(column_sum - 1.0) > 1e-3], name,
         "a position's probabilities over the candidates do not sum to 1")
    row_sum = np.bincount(value_lists[keep], weights=numbers[keep], minlength=len(inner))
    flag(list_rows[row_sum > 1.0 + 1e-3], name,
         "a candidate's probabilities over the positions sum to more than 1")
    # The item shown at position k: value k of the row's inner list of that candidate.
    candidates = np.maximum(outer, 0)
    first_list = np.cumsum(candidates) - candidates
    first_value = np.cumsum(inner) - inner
    row, k = np.nonzero((lists >= 0) & shaped[:, None])
    shown = numbers[first_value[first_list[row] + lists[row, k]] + k]
    flag(row[~(shown > 0)], name, "gives the item shown at a position probability 0")


def _check_distinct_items(items: pa.Array, rows: np.ndarray, offset: int,
                          report: FileReport) -> None:
    """A request's candidates are distinct items: one item cannot be shown twice in a list
    (the service refuses a repeat too)."""
    if len(items) == 0:
        return
    codes = pc.dictionary_encode(items).indices.fill_null(-1).to_numpy(zero_copy_only=False)
    known = codes >= 0
    known_rows, known_codes = rows[known].astype(np.int64), codes[known].astype(np.int64)
    key = known_rows * (int(known_codes.max(initial=0)) + 1) + known_codes
    order = np.argsort(key, kind="stable")
    repeats = order[1:][np.diff(key[order]) == 0]
    reported: set[int] = set()
    for index in np.flatnonzero(known)[repeats]:
        row = int(rows[index])
        if row not in reported:
            reported.add(row)
            report.problems.append(Problem(
                report.file, offset + row, ITEM_ID,
                f"item id {items[int(index)].as_py()!r} appears twice among the candidates "
                "(an item can be shown once)"))


def _check_numbers(column, name: str, flag) -> None:
    values, rows = _flat(column)
    if len(values) == 0:
        return
    null = values.is_null().to_numpy(zero_copy_only=False)
    flag(rows[null], name, "has a null value")
    numbers = values.fill_null(0).to_numpy(zero_copy_only=False).astype(np.float64)
    finite = np.isfinite(numbers)
    flag(rows[~finite], name, "has a value that is not finite (NaN or infinite)")
    flag(rows[finite & (np.abs(np.where(finite, numbers, 0.0)) > FLOAT32_MAX)], name,
         BEYOND_FLOAT32)
