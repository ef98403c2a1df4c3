"""The nar4rec request-log format: one Parquet row per request (see docs/data-format.md).

Columns (n = number of candidates, m = length of the exposed list; both may vary by row):

    request_id          int64 | string              unique per file
    user_id             int64 | string
    timestamp           timestamp (UTC)             for time-based splits
    user_cat_<f>        int64 | string (nullable)   categorical user feature f
    user_num_<f>        float                       numeric user feature f
    item_id             list<int64 | string>  [n]  the candidates, in the upstream order
    cand_cat_<f>        list<int64 | string>  [n]  categorical candidate feature f (nulls allowed)
    cand_num_<f>        list<float>           [n]  numeric candidate feature f
    upstream_score      list<float>           [n]  the ranking stage's score (optional)
    exposed             list<int>             [m]  indices into the candidates, display order
    feedback_<b>        list<float>           [m]  behaviour b at each exposed position
    log_propensity      double (nullable)          log-probability of the exposed list under
                                                    the logging policy (optional)
    logging_score       list<float>           [n]  the logging policy's score of each candidate,
    logging_temperature double                      with its temperature: a Plackett-Luce
                                                    logger (optional, both or neither)
    logging_marginal    list<list<float>>  [n][m]  P(candidate i shown at position k) under the
                                                    logging policy (optional)
    logging_prefix_log_propensity
                        list<double>          [m]  log P(the first k+1 shown items, in order)
                                                    under the logging policy (optional)

The schema metadata key ``nar4rec`` holds JSON with the behaviours, in order, and the utility
weight of each (paper, section 3.1: R(u, Y) = sum_i sum_b w_b e_{u, y_i, b}). A file whose
writer cannot set Parquet metadata (a part file written by Spark) has the same JSON in the
sidecar file ``_nar4rec.json`` of its folder instead.

The logging_ columns describe the logging policy for off-policy evaluation (docs/ope.md); a
null in any of them means "unknown for this request".

A request file to rerank (`FormatSpec.has_labels` False) holds only what the ranking stage
knows: no exposed, feedback_, log_propensity or logging_ column, timestamp optional, and
behaviours that may be empty. It can be reranked, not trained or evaluated on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nar4rec.errors import DataError
from nar4rec.io import atomic_file

FORMAT_NAME = "nar4rec-requests"
FORMAT_VERSION = 1
METADATA_KEY = b"nar4rec"
SIDECAR_FILE = "_nar4rec.json"     # beside files without the metadata key; the leading "_"
                                   # makes Spark, Hive and pyarrow.dataset skip it as data
DEFINING_KEYS = ("format", "version", "behaviours", "utility_weights")

REQUEST_ID = "request_id"
USER_ID = "user_id"
TIMESTAMP = "timestamp"
ITEM_ID = "item_id"
UPSTREAM_SCORE = "upstream_score"
EXPOSED = "exposed"
LOG_PROPENSITY = "log_propensity"
LOGGING_SCORE = "logging_score"
LOGGING_TEMPERATURE = "logging_temperature"
LOGGING_MARGINAL = "logging_marginal"
LOGGING_PREFIX = "logging_prefix_log_propensity"
LOGGING_COLUMNS = (LOGGING_SCORE, LOGGING_TEMPERATURE, LOGGING_MARGINAL, LOGGING_PREFIX)
LABEL_COLUMNS = (EXPOSED, LOG_PROPENSITY, *LOGGING_COLUMNS)   # with every feedback_ column

USER_CAT = "user_cat_"
USER_NUM = "user_num_"
CAND_CAT = "cand_cat_"
CAND_NUM = "cand_num_"
FEEDBACK = "feedback_"

TIMESTAMP_TYPE = pa.timestamp("ms", tz="UTC")
NUMBER_TYPE = pa.float32()
FLOAT32_MAX = float(np.finfo(np.float32).max)   # the largest magnitude of a number: models
                                                # compute in float32
ID_TYPE = pa.int64()
ID_TYPES = (pa.int64(), pa.string())


@dataclass(frozen=True)
class FormatSpec:
    """What one request-log file holds: its behaviours, weights and feature names.

    has_labels: the file logs the shown lists (`exposed`) and the feedback on them; False for
    a request file to rerank, which holds neither (nor `log_propensity` or a logging_ column),
    may leave out the timestamp and may declare no behaviours.
    has_logging_score: the log declares a Plackett-Luce logging policy, `logging_score` and
        `logging_temperature`: the shown list was drawn position by position with
        P(y_k | y_<k) = softmax(logging_score / logging_temperature) over the candidates not
        yet placed.
    has_logging_marginal: the log holds `logging_marginal`, each candidate's probability of
        being shown at each position under the logging policy.
    has_logging_prefix: the log holds `logging_prefix_log_propensity`, the log-probability of
        each prefix of the shown list under the logging policy.
    """

    behaviours: tuple[str, ...]
    utility_weights: dict[str, float]
    user_cat: tuple[str, ...] = ()
    user_num: tuple[str, ...] = ()
    cand_cat: tuple[str, ...] = ()
    cand_num: tuple[str, ...] = ()
    has_upstream_score: bool = True
    has_log_propensity: bool = False
    has_labels: bool = True
    has_logging_score: bool = False
    has_logging_marginal: bool = False
    has_logging_prefix: bool = False
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.has_labels and not self.behaviours:
            raise ValueError("a request log needs at least one behaviour")
        if not self.has_labels and self.has_log_propensity:
            raise ValueError("a request file to rerank has no log_propensity: it logs no list")
        if not self.has_labels and self.has_logging:
            raise ValueError("a request file to rerank has no logging_ column: it logs no list")
        missing = [b for b in self.behaviours if b not in self.utility_weights]
        if missing:
            raise ValueError(f"no utility weight for behaviours {missing}")

    @property
    def has_logging(self) -> bool:
        """Whether the log describes its logging policy beyond `log_propensity`."""
        return self.has_logging_score or self.has_logging_marginal or self.has_logging_prefix

    @property
    def logging_columns(self) -> tuple[str, ...]:
        """The logging_ columns this spec holds, in schema order."""
        return ((LOGGING_SCORE, LOGGING_TEMPERATURE) if self.has_logging_score else ()) + \
            ((LOGGING_MARGINAL,) if self.has_logging_marginal else ()) + \
            ((LOGGING_PREFIX,) if self.has_logging_prefix else ())

    def without_labels(self) -> FormatSpec:
        """The spec of a request file to rerank with the same features: no exposed, feedback_,
        log_propensity or logging_ column."""
        return dataclasses.replace(self, has_labels=False, has_log_propensity=False,
                                   has_logging_score=False, has_logging_marginal=False,
                                   has_logging_prefix=False)

    @property
    def weights(self) -> np.ndarray:
        """Utility weights in behaviour order, shape (K,)."""
        return np.array([self.utility_weights[b] for b in self.behaviours], dtype=np.float64)

    def metadata(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "behaviours": list(self.behaviours),
            "utility_weights": {b: float(self.utility_weights[b]) for b in self.behaviours},
            **self.extra,
        }

    @property
    def id_columns(self) -> tuple[str, ...]:
        """The columns of ids and categories: request_id, user_id, user_cat_, item_id and
        cand_cat_ (the last two are lists of them)."""
        return (REQUEST_ID, USER_ID, *(USER_CAT + f for f in self.user_cat), ITEM_ID,
                *(CAND_CAT + f for f in self.cand_cat))

    def id_types(self, id_type: pa.DataType | Mapping[str, pa.DataType] = ID_TYPE
                 ) -> dict[str, pa.DataType]:
        """{column: type of its ids} for every id column (`id_columns`; for a list column, the
        type of its values).

        Args:
            id_type: int64 or string for every id column, or {column: int64 or string} for
                some of them (the others are int64), e.g. {"request_id": pa.string(),
                "item_id": pa.string()}.

        Raises:
            ValueError naming the column: a type other than int64 or string, or a column that
            is not an id column of this spec.
        """
        if isinstance(id_type, pa.DataType):
            chosen = dict.fromkeys(self.id_columns, id_type)
        elif not isinstance(id_type, Mapping):
            raise ValueError(f"id_type must be a pyarrow type or {{column: type}}, got "
                             f"{id_type!r}")
        else:
            unknown = [name for name in id_type if name not in self.id_columns]
            if unknown:
                raise ValueError(f"id_type: column {unknown[0]!r} is not an id or categorical "
                                 f"column of this spec (those are "
                                 f"{', '.join(self.id_columns)})")
            chosen = {name: id_type.get(name, ID_TYPE) for name in self.id_columns}
        for name, type_ in chosen.items():
            if not isinstance(type_, pa.DataType) or type_ not in ID_TYPES:
                raise ValueError(f"id_type: column {name!r} is typed {type_}, expected int64 "
                                 "or string (pa.int64() or pa.string())")
        return chosen

    def arrow_schema(self, id_type: pa.DataType | Mapping[str, pa.DataType] = ID_TYPE
                     ) -> pa.Schema:
        """The schema a writer uses; `id_type` types the id columns as in `id_types`: one
        type (int64 or string) for all, or {column: type} (int64 where not named)."""
        ids = self.id_types(id_type)
        fields = [
            pa.field(REQUEST_ID, ids[REQUEST_ID], nullable=False),
            pa.field(USER_ID, ids[USER_ID], nullable=False),
            pa.field(TIMESTAMP, TIMESTAMP_TYPE, nullable=False),
        ]
        fields += [pa.field(USER_CAT + f, ids[USER_CAT + f]) for f in self.user_cat]
        fields += [pa.field(USER_NUM + f, NUMBER_TYPE, nullable=False) for f in self.user_num]
        fields.append(pa.field(ITEM_ID, pa.list_(ids[ITEM_ID]), nullable=False))
        fields += [pa.field(CAND_CAT + f, pa.list_(ids[CAND_CAT + f])) for f in self.cand_cat]
        fields += [pa.field(CAND_NUM + f, pa.list_(NUMBER_TYPE)) for f in self.cand_num]
        if self.has_upstream_score:
            fields.append(pa.field(UPSTREAM_SCORE, pa.list_(NUMBER_TYPE)))
        if self.has_labels:
            fields.append(pa.field(EXPOSED, pa.list_(pa.int32()), nullable=False))
            fields += [pa.field(FEEDBACK + b, pa.list_(NUMBER_TYPE)) for b in self.behaviours]
        if self.has_log_propensity:
            fields.append(pa.field(LOG_PROPENSITY, pa.float64()))
        if self.has_logging_score:
            fields.append(pa.field(LOGGING_SCORE, pa.list_(NUMBER_TYPE)))
            fields.append(pa.field(LOGGING_TEMPERATURE, pa.float64()))
        if self.has_logging_marginal:
            fields.append(pa.field(LOGGING_MARGINAL, pa.list_(pa.list_(NUMBER_TYPE))))
        if self.has_logging_prefix:
            fields.append(pa.field(LOGGING_PREFIX, pa.list_(pa.float64())))
        meta = {METADATA_KEY: json.dumps(self.metadata()).encode()}
        return pa.schema(fields, metadata=meta)

    def require_labels(self, file: str | os.PathLike) -> None:
        """Raise DataError unless the file logs shown lists and their feedback (what training
        and evaluation read)."""
        if not self.has_labels:
            raise DataError("required column is missing (a request file to rerank, without "
                            "logged lists and feedback, can be reranked but not trained or "
                            "evaluated on)", file=str(file), field=EXPOSED)

    @classmethod
    def from_schema(cls, schema: pa.Schema, file: str | os.PathLike = "<schema>") -> FormatSpec:
        """Read the spec from a file's schema; raise DataError naming what is wrong.

        The format's JSON comes from the schema's metadata key `nar4rec` or, when `file` is a
        file whose schema has no such key (Spark cannot write one), from the sidecar
        `_nar4rec.json` in the file's folder (`format_metadata`).

        A file without any of the exposed, feedback_, log_propensity and logging_ columns is a
        request file to rerank (`has_labels` False); one with any of them is a log and needs
        exposed and feedback_. `logging_score` and `logging_temperature` come together.
        """
        file = str(file)
        meta, source = format_metadata(schema, file)
        if meta.get("format") != FORMAT_NAME:
            raise DataError(f"{source} format is {meta.get('format')!r}, expected "
                            f"{FORMAT_NAME!r}", file=file, field="nar4rec")
        names = schema.names
        has_labels = any(n in LABEL_COLUMNS or n.startswith(FEEDBACK) for n in names)
        behaviours = meta.get("behaviours", None if has_labels else [])
        weights = meta.get("utility_weights", None if has_labels else {})
        if not isinstance(behaviours, list) or (has_labels and not behaviours) or not all(
            isinstance(b, str) and b for b in behaviours
        ):
            raise DataError(f"{source} 'behaviours' must be a "
                            f"{'non-empty ' if has_labels else ''}list of names",
                            file=file, field="nar4rec.behaviours")
        if not isinstance(weights, dict):
            raise DataError(f"{source} 'utility_weights' must map behaviours to numbers",
                            file=file, field="nar4rec.utility_weights")
        for b in behaviours:
            w = weights.get(b)
            if not isinstance(w, int | float) or not np.isfinite(w):
                raise DataError(f"behaviour '{b}' has no finite utility weight",
                                file=file, field="nar4rec.utility_weights")
        unknown = sorted(set(weights) - set(behaviours))
        if unknown:
            raise DataError(f"utility weights for unknown behaviours {unknown}",
                            file=file, field="nar4rec.utility_weights")

        def suffixes(prefix: str) -> tuple[str, ...]:
            return tuple(n[len(prefix):] for n in names if n.startswith(prefix))

        feedback_cols = set(suffixes(FEEDBACK))
        for b in behaviours:
            if has_labels and b not in feedback_cols:
                raise DataError(f"behaviour '{b}' has no column", file=file,
                                field=FEEDBACK + b)
        for b in sorted(feedback_cols - set(behaviours)):
            raise DataError(f"unknown behaviour: not listed in the {source}'s behaviours",
                            file=file, field=FEEDBACK + b)
        required = (REQUEST_ID, USER_ID, TIMESTAMP, ITEM_ID, EXPOSED) if has_labels else \
            (REQUEST_ID, USER_ID, ITEM_ID)
        for column in required:
            if column not in names:
                raise DataError("required column is missing", file=file, field=column)
        for column, partner in ((LOGGING_SCORE, LOGGING_TEMPERATURE),
                                (LOGGING_TEMPERATURE, LOGGING_SCORE)):
            if column in names and partner not in names:
                raise DataError(f"required column is missing: {column} declares a Plackett-Luce "
                                f"logging policy with {partner}, both or neither",
                                file=file, field=partner)
        extra = {k: v for k, v in meta.items()
                 if k not in ("format", "version", "behaviours", "utility_weights")}
        return cls(
            behaviours=tuple(behaviours),
            utility_weights={b: float(weights[b]) for b in behaviours},
            user_cat=suffixes(USER_CAT),
            user_num=suffixes(USER_NUM),
            cand_cat=suffixes(CAND_CAT),
            cand_num=suffixes(CAND_NUM),
            has_upstream_score=UPSTREAM_SCORE in names,
            has_log_propensity=LOG_PROPENSITY in names,
            has_labels=has_labels,
            has_logging_score=LOGGING_SCORE in names,
            has_logging_marginal=LOGGING_MARGINAL in names,
            has_logging_prefix=LOGGING_PREFIX in names,
            extra=extra,
        )


def format_metadata(schema: pa.Schema, file: str | os.PathLike) -> tuple[dict, str]:
    """The format's JSON object for one file and where it was found ("metadata" or "sidecar
    PATH", for messages).

    It is the schema's metadata key `nar4rec` or, for a file without it, the sidecar
    `_nar4rec.json` beside the file: Spark and other distributed writers cannot put our key
    in their part files' footers, so one sidecar describes a folder of parts. A file may have
    both only if they agree on the format, version, behaviours and utility weights (other
    keys are informative, and the metadata key's are kept).
    """
    file = str(file)
    raw = (schema.metadata or {}).get(METADATA_KEY)
    footer = None if raw is None else _json_object(raw, "metadata 'nar4rec'", file)
    sidecar_path = Path(file).parent / SIDECAR_FILE
    sidecar = None
    if Path(file).is_file() and sidecar_path.is_file():
        try:
            text = sidecar_path.read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read the sidecar {sidecar_path} ({exc})",
                            file=file) from None
        sidecar = _json_object(text, f"the sidecar {sidecar_path}", file)
    if footer is None and sidecar is None:
        raise DataError(
            "not a nar4rec request log: the Parquet metadata has no 'nar4rec' key and no "
            f"{SIDECAR_FILE} sidecar is beside the file (see docs/data-format.md, "
            "'Logs written by Spark')",
            file=file,
        )
    if footer is not None and sidecar is not None:
        differ = [key for key in DEFINING_KEYS if footer.get(key) != sidecar.get(key)]
        if differ:
            raise DataError(f"the metadata 'nar4rec' and the sidecar {sidecar_path} disagree "
                            f"on {', '.join(differ)}", file=file, field="nar4rec")
    if footer is not None:
        return footer, "metadata"
    return sidecar, f"sidecar {sidecar_path}"


def _json_object(raw: bytes, what: str, file: str) -> dict:
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{what} is not valid JSON: {exc}", file=file) from None
    if not isinstance(value, dict):
        raise DataError(f"{what} is not a JSON object", file=file)
    return value


def read_spec(path: str | os.PathLike) -> FormatSpec:
    """The FormatSpec of a Parquet request log, with a clear error for a bad file."""
    return FormatSpec.from_schema(open_parquet(path).schema_arrow, path)


def folder_files(folder: str | os.PathLike) -> list[Path]:
    """The request-log files of a folder, sorted: every `*.parquet` whose name does not start
    with "_" or "." (what Spark, Hive and pyarrow.dataset skip too: `_SUCCESS`, the
    `.part-*.crc` checksums, a `_nar4rec.json` sidecar, hidden temporaries)."""
    return sorted(path for path in Path(folder).glob("*.parquet")
                  if not path.name.startswith(("_", ".")) and path.is_file())


def open_parquet(path: str | os.PathLike) -> pq.ParquetFile:
    """Open a Parquet file, turning a missing or corrupt file into a DataError."""
    path = Path(path)
    if not path.exists():
        raise DataError("no such file", file=str(path))
    if path.is_dir():
        raise DataError("is a directory, expected a Parquet file", file=str(path))
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read as Parquet ({exc})", file=str(path)) from None


def list_array(values: np.ndarray, lengths: np.ndarray | None = None,
               type: pa.DataType | None = None) -> pa.ListArray:
    """A list<...> column from a padded (R, L) array, keeping the first lengths[r] of row r."""
    values = np.asarray(values)
    rows, width = values.shape
    if lengths is None:
        return lists_from_flat(np.full(rows, width), pa.array(values.reshape(-1), type=type))
    lengths = np.asarray(lengths, dtype=np.int64)
    keep = np.arange(width)[None, :] < lengths[:, None]
    return lists_from_flat(lengths, pa.array(values[keep], type=type))


def lists_from_flat(lengths: np.ndarray, flat: pa.Array) -> pa.ListArray:
    """A list<...> column whose row r holds the next lengths[r] values of `flat`."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), flat)


class RequestLogWriter:
    """Write request batches to one Parquet file atomically (renamed into place on close).

    Use as a context manager; if the block raises, no file is left behind. With
    `labels=False` it writes a request file to rerank: the spec's columns without exposed,
    feedback_, log_propensity and logging_ (`FormatSpec.without_labels`). `id_type` types the
    id and categorical columns: int64 or string for all, or {column: type} for some, the
    others int64 (`FormatSpec.id_types`).
    `timestamp=False` leaves out the timestamp column (a request file to rerank only).
    """

    def __init__(self, path: str | os.PathLike, spec: FormatSpec,
                 id_type: pa.DataType | Mapping[str, pa.DataType] = ID_TYPE,
                 row_group_size: int = 16384, compression: str = "zstd", *,
                 labels: bool = True, timestamp: bool = True) -> None:
        if not labels:
            spec = spec.without_labels()
        if not (timestamp or not spec.has_labels):
            raise ValueError("a request log needs its timestamps (a request file to rerank "
                             "may leave them out)")
        self.path = Path(path)
        self.spec = spec
        self.schema = spec.arrow_schema(id_type)
        if not timestamp:
            self.schema = self.schema.remove(self.schema.get_field_index(TIMESTAMP))
        self.row_group_size = row_group_size
        self.compression = compression
        self.rows = 0
        self._atomic = None
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> RequestLogWriter:
        self._atomic = atomic_file(self.path)
        tmp = self._atomic.__enter__()
        # Dictionary pages pay off for ids and categories, not for continuous numbers.
        dictionary = [f.name for f in self.schema
                      if f.name in (REQUEST_ID, USER_ID, ITEM_ID)
                      or f.name.startswith((USER_CAT, CAND_CAT))]
        self._writer = pq.ParquetWriter(tmp, self.schema, compression=self.compression,
                                        use_dictionary=dictionary)
        return self

    def write(self, columns: Mapping | pa.Table | pa.RecordBatch) -> None:
        """Append rows given as {column name: array, list or pandas Series}, a pandas
        DataFrame, or an Arrow table or record batch; every schema column must be present
        (others are ignored).

        Values are converted to the column's type; ids given as integers become strings
        for a string column, and strings of digits integers for an int64 one. A value that
        cannot be converted raises DataError naming the column and the first such row (0-based
        over the file).
        """
        if isinstance(columns, pa.Table | pa.RecordBatch):
            columns = {name: columns.column(name) for name in columns.schema.names}
        arrays = []
        for f in self.schema:
            if f.name not in columns:
                raise ValueError(f"missing column {f.name!r}")
            values = columns[f.name]
            try:
                arrays.append(converted(values, f.type))
            except _CONVERSION_ERRORS as exc:
                row, value = _first_unconvertible(values, f.type)
                shown = "" if row is None else f": value {_short(value)}"
                raise DataError(f"cannot be written as {f.type}{shown} ({exc})",
                                file=str(self.path),
                                row=None if row is None else self.rows + row,
                                field=f.name) from None
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        self._writer.write_table(table, row_group_size=self.row_group_size)
        self.rows += table.num_rows

    def __exit__(self, exc_type, exc, tb) -> None:
        self._writer.close()
        self._atomic.__exit__(exc_type, exc, tb)


_CONVERSION_ERRORS = (pa.ArrowException, TypeError, ValueError, OverflowError)


def converted(values, type: pa.DataType, *, strict: bool = False
               ) -> pa.Array | pa.ChunkedArray:
    """`values` as an Arrow array of `type`: converted directly or, failing that (unless
    `strict`), through the type Arrow infers for them (Arrow's safe cast: integers to
    strings, strings of digits to integers). A finite number beyond float32's range for a
    float32 column is refused (a cast would make it infinite)."""
    wide = _float64_of(type)
    if wide is not None:                  # numbers: checked at float64, then narrowed
        return _narrowed(converted(values, wide, strict=strict), type)
    if isinstance(values, pa.Array | pa.ChunkedArray):
        return values if values.type == type else values.cast(type)
    try:
        return pa.array(values, type=type)
    except _CONVERSION_ERRORS:
        if strict:
            raise
        return pa.array(values).cast(type)


def _float64_of(type: pa.DataType) -> pa.DataType | None:
    """float64 for float32, list<float64> for list<float32>; None for other types."""
    if type == NUMBER_TYPE:
        return pa.float64()
    if pa.types.is_list(type) and type.value_type == NUMBER_TYPE:
        return pa.list_(pa.float64())
    return None


def _narrowed(values: pa.Array | pa.ChunkedArray, type: pa.DataType
              ) -> pa.Array | pa.ChunkedArray:
    flat = pc.list_flatten(values) if pa.types.is_list(values.type) else values
    largest = pc.max(pc.abs(flat)).as_py() if len(flat) else None
    if largest is not None and math.isfinite(largest) and largest > FLOAT32_MAX:
        raise pa.ArrowInvalid(f"{largest:.6g} is beyond float32's range "
                              f"(|x| <= {FLOAT32_MAX:.8g})")
    return values.cast(type)


def _first_unconvertible(values, type: pa.DataType) -> tuple[int | None, object]:
    """The first row whose value `converted` refuses, and that value, found by bisection;
    for a column that fails only as a whole (Python values of mixed kinds), the first row
    that a direct conversion refuses; (None, None) when no row can be blamed."""
    if not isinstance(values, pa.Array | pa.ChunkedArray):
        values = list(values)

    def converts(start: int, stop: int, strict: bool) -> bool:
        # take, not slice: a sliced list array casts all of its values, not only the slice's
        part = values[start:stop] if isinstance(values, list) else \
            values.take(np.arange(start, stop))
        try:
            converted(part, type, strict=strict)
        except _CONVERSION_ERRORS:
            return False
        return True

    for strict in (False, True):
        start, stop = 0, len(values)
        if converts(start, stop, strict):
            continue
        while stop - start > 1:                # rows [start, stop) hold an unconvertible one
            middle = (start + stop) // 2
            if converts(start, middle, strict):
                start = middle
            else:
                stop = middle
        if stop - start == 1 and not converts(start, stop, strict):
            value = values[start]
            if isinstance(value, pa.Scalar):
                value = value.as_py()
            elif isinstance(value, np.generic | np.ndarray):
                value = value.tolist()
            return start, value
    return None, None


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
