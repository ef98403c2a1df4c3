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

The schema metadata key ``nar4rec`` holds JSON with the behaviours, in order, and the utility
weight of each (paper, section 3.1: R(u, Y) = sum_i sum_b w_b e_{u, y_i, b}).

A request file to rerank (`FormatSpec.has_labels` False) holds only what the ranking stage
knows: no exposed, feedback_ or log_propensity column, timestamp optional, and behaviours that
may be empty. It can be reranked, not trained or evaluated on.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nar4rec.errors import DataError
from nar4rec.io import atomic_file

FORMAT_NAME = "nar4rec-requests"
FORMAT_VERSION = 1
METADATA_KEY = b"nar4rec"

REQUEST_ID = "request_id"
USER_ID = "user_id"
TIMESTAMP = "timestamp"
ITEM_ID = "item_id"
UPSTREAM_SCORE = "upstream_score"
EXPOSED = "exposed"
LOG_PROPENSITY = "log_propensity"

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


@dataclass(frozen=True)
class FormatSpec:
    """What one request-log file holds: its behaviours, weights and feature names.

    has_labels: the file logs the shown lists (`exposed`) and the feedback on them; False for
    a request file to rerank, which holds neither (nor `log_propensity`), may leave out the
    timestamp and may declare no behaviours.
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
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.has_labels and not self.behaviours:
            raise ValueError("a request log needs at least one behaviour")
        if not self.has_labels and self.has_log_propensity:
            raise ValueError("a request file to rerank has no log_propensity: it logs no list")
        missing = [b for b in self.behaviours if b not in self.utility_weights]
        if missing:
            raise ValueError(f"no utility weight for behaviours {missing}")

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

    def arrow_schema(self, id_type: pa.DataType = ID_TYPE) -> pa.Schema:
        """The schema a writer uses; `id_type` (int64 or string) types every id column."""
        fields = [
            pa.field(REQUEST_ID, id_type, nullable=False),
            pa.field(USER_ID, id_type, nullable=False),
            pa.field(TIMESTAMP, TIMESTAMP_TYPE, nullable=False),
        ]
        fields += [pa.field(USER_CAT + f, id_type) for f in self.user_cat]
        fields += [pa.field(USER_NUM + f, NUMBER_TYPE, nullable=False) for f in self.user_num]
        fields.append(pa.field(ITEM_ID, pa.list_(id_type), nullable=False))
        fields += [pa.field(CAND_CAT + f, pa.list_(id_type)) for f in self.cand_cat]
        fields += [pa.field(CAND_NUM + f, pa.list_(NUMBER_TYPE)) for f in self.cand_num]
        if self.has_upstream_score:
            fields.append(pa.field(UPSTREAM_SCORE, pa.list_(NUMBER_TYPE)))
        if self.has_labels:
            fields.append(pa.field(EXPOSED, pa.list_(pa.int32()), nullable=False))
            fields += [pa.field(FEEDBACK + b, pa.list_(NUMBER_TYPE)) for b in self.behaviours]
        if self.has_log_propensity:
            fields.append(pa.field(LOG_PROPENSITY, pa.float64()))
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

        A file without any of the exposed, feedback_ and log_propensity columns is a request
        file to rerank (`has_labels` False); one with any of them is a log and needs them all.
        """
        file = str(file)
        raw = (schema.metadata or {}).get(METADATA_KEY)
        if raw is None:
            raise DataError(
                "not a nar4rec request log: the Parquet metadata has no 'nar4rec' key "
                "(see docs/data-format.md)",
                file=file,
            )
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(f"metadata 'nar4rec' is not valid JSON: {exc}", file=file) from None
        if meta.get("format") != FORMAT_NAME:
            raise DataError(f"metadata format is {meta.get('format')!r}, expected "
                            f"{FORMAT_NAME!r}", file=file, field="nar4rec")
        names = schema.names
        has_labels = any(n in (EXPOSED, LOG_PROPENSITY) or n.startswith(FEEDBACK) for n in names)
        behaviours = meta.get("behaviours", None if has_labels else [])
        weights = meta.get("utility_weights", None if has_labels else {})
        if not isinstance(behaviours, list) or (has_labels and not behaviours) or not all(
            isinstance(b, str) and b for b in behaviours
        ):
            raise DataError("metadata 'behaviours' must be a "
                            f"{'non-empty ' if has_labels else ''}list of names",
                            file=file, field="nar4rec.behaviours")
        if not isinstance(weights, dict):
            raise DataError("metadata 'utility_weights' must map behaviours to numbers",
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
            raise DataError("unknown behaviour: not listed in the metadata's behaviours",
                            file=file, field=FEEDBACK + b)
        required = (REQUEST_ID, USER_ID, TIMESTAMP, ITEM_ID, EXPOSED) if has_labels else \
            (REQUEST_ID, USER_ID, ITEM_ID)
        for column in required:
            if column not in names:
                raise DataError("required column is missing", file=file, field=column)
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
            extra=extra,
        )


def read_spec(path: str | os.PathLike) -> FormatSpec:
    """The FormatSpec of a Parquet request log, with a clear error for a bad file."""
    return FormatSpec.from_schema(open_parquet(path).schema_arrow, path)


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
    feedback_ and log_propensity.
    """

    def __init__(self, path: str | os.PathLike, spec: FormatSpec,
                 id_type: pa.DataType = ID_TYPE, row_group_size: int = 16384,
                 compression: str = "zstd", *, labels: bool = True) -> None:
        if not labels:
            spec = dataclasses.replace(spec, has_labels=False, has_log_propensity=False)
        self.path = Path(path)
        self.spec = spec
        self.schema = spec.arrow_schema(id_type)
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

    def write(self, columns: dict[str, pa.Array | np.ndarray]) -> None:
        """Append rows given as {column name: array}; every schema column must be present."""
        arrays = []
        for f in self.schema:
            if f.name not in columns:
                raise ValueError(f"missing column {f.name!r}")
            col = columns[f.name]
            if not isinstance(col, pa.Array | pa.ChunkedArray):
                col = pa.array(col, type=f.type)
            elif col.type != f.type:
                col = col.cast(f.type)
            arrays.append(col)
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        self._writer.write_table(table, row_group_size=self.row_group_size)
        self.rows += table.num_rows

    def __exit__(self, exc_type, exc, tb) -> None:
        self._writer.close()
        self._atomic.__exit__(exc_type, exc, tb)
