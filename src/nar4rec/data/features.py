"""How request logs become tensors: the feature space fitted on the training split.

`FeatureSpace.fit` makes one streaming pass over the training files to learn every categorical
feature's vocabulary and every numeric feature's mean and standard deviation; it is saved with
a model so that the same encoding applies at evaluation and serving time. `FeatureSpace.encode`
turns request-log rows into a `RequestBatch`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from nar4rec.data.batch import PAD, UNKNOWN, LoggingPolicy, RequestBatch
from nar4rec.data.format import (
    CAND_CAT,
    CAND_NUM,
    EXPOSED,
    FEEDBACK,
    ITEM_ID,
    LOG_PROPENSITY,
    LOGGING_COLUMNS,
    LOGGING_MARGINAL,
    LOGGING_PREFIX,
    LOGGING_SCORE,
    LOGGING_TEMPERATURE,
    REQUEST_ID,
    UPSTREAM_SCORE,
    USER_CAT,
    USER_ID,
    USER_NUM,
    FormatSpec,
    open_parquet,
)
from nar4rec.errors import DataError


@dataclass
class Vocabulary:
    """Known raw values of one categorical feature, most frequent first."""

    values: list
    _sorted: np.ndarray | None = field(default=None, repr=False)
    _order: np.ndarray | None = field(default=None, repr=False)
    _arrow: pa.Array | None = field(default=None, repr=False)
    _index: dict[str, int] | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        """Embedding rows needed: the values plus padding and unknown."""
        return len(self.values) + 2

    def encode(self, raw: pa.Array | pa.ChunkedArray | list) -> np.ndarray:
        """Raw values -> indices (known values from 2, null or unseen -> UNKNOWN).

        Values match by their text, as Arrow's string cast writes it (an integer 5 and a
        string "5" are the same category); a Python list is looked up in a dict.
        """
        if isinstance(raw, list):
            if self._index is None:
                self._index = {str(v): i + 2 for i, v in enumerate(self.values)}
            return np.array([UNKNOWN if v is None else self._index.get(str(v), UNKNOWN)
                             for v in raw], dtype=np.int64)
        if isinstance(raw, pa.ChunkedArray):
            raw = raw.combine_chunks()
        if len(self.values) == 0:
            return np.full(len(raw), UNKNOWN, dtype=np.int64)
        if pa.types.is_integer(raw.type) and self._is_integer():
            if self._sorted is None:
                keys = np.asarray(self.values, dtype=np.int64)
                self._order = np.argsort(keys, kind="stable")
                self._sorted = keys[self._order]
            if raw.type != pa.int64():
                raw = raw.cast(pa.int64())        # int32 (Spark's IntegerType) and others
            keys = raw.fill_null(np.iinfo(np.int64).min).to_numpy(zero_copy_only=False)
            position = np.clip(np.searchsorted(self._sorted, keys), 0, len(self._sorted) - 1)
            found = (self._sorted[position] == keys) & raw.is_valid().to_numpy(
                zero_copy_only=False)
            return np.where(found, self._order[position] + 2, UNKNOWN).astype(np.int64)
        if self._arrow is None:
            self._arrow = pa.array([str(v) for v in self.values], pa.string())
        index = pc.index_in(raw.cast(pa.string()), value_set=self._arrow)   # null if unseen
        return pc.add(index, 2).fill_null(UNKNOWN).to_numpy(zero_copy_only=False).astype(
            np.int64)

    def _is_integer(self) -> bool:
        return all(isinstance(v, int) for v in self.values[:16])


@dataclass
class NumericStats:
    mean: float
    std: float


@dataclass
class FeatureSpace:
    """How requests become tensors: vocabularies, numeric scaling, behaviours and weights."""

    spec: FormatSpec
    user_cat: dict[str, Vocabulary]   # "user_id" first, then the user_cat_ features
    cand_cat: dict[str, Vocabulary]   # "item_id" first, then the cand_cat_ features
    user_num: dict[str, NumericStats]
    cand_num: dict[str, NumericStats]

    @property
    def behaviours(self) -> tuple[str, ...]:
        return self.spec.behaviours

    @property
    def utility_weights(self) -> torch.Tensor:
        return torch.tensor(self.spec.weights, dtype=torch.float32)

    @classmethod
    def fit(cls, paths: Sequence[str | os.PathLike], *, max_vocabulary: int = 1_000_000,
            min_count: int = 1) -> FeatureSpace:
        """One streaming pass over `paths` (the training files)."""
        paths = [Path(p) for p in paths]
        spec = _common_spec(paths)
        counters: dict[str, _Counter] = {USER_ID: _Counter(), ITEM_ID: _Counter()}
        counters.update({USER_CAT + f: _Counter() for f in spec.user_cat})
        counters.update({CAND_CAT + f: _Counter() for f in spec.cand_cat})
        moments: dict[str, _Moments] = {USER_NUM + f: _Moments() for f in spec.user_num}
        moments.update({CAND_NUM + f: _Moments() for f in spec.cand_num})
        for path in paths:
            parquet = open_parquet(path)
            columns = [*counters, *moments]
            for batch in parquet.iter_batches(batch_size=65536, columns=columns):
                for name, counter in counters.items():
                    column = batch.column(name)
                    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type) \
                            or pa.types.is_fixed_size_list(column.type):
                        column = pc.list_flatten(column)
                    counter.add(column)
                for name, moment in moments.items():
                    column = batch.column(name)
                    if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
                        column = pc.list_flatten(column)
                    moment.add(column.to_numpy(zero_copy_only=False))

        def vocab(name: str) -> Vocabulary:
            return Vocabulary(counters[name].top(max_vocabulary, min_count))

        def stats(name: str) -> NumericStats:
            return moments[name].stats()

        return cls(
            spec=spec,
            user_cat={"user_id": vocab(USER_ID),
                      **{f: vocab(USER_CAT + f) for f in spec.user_cat}},
            cand_cat={"item_id": vocab(ITEM_ID),
                      **{f: vocab(CAND_CAT + f) for f in spec.cand_cat}},
            user_num={f: stats(USER_NUM + f) for f in spec.user_num},
            cand_num={f: stats(CAND_NUM + f) for f in spec.cand_num},
        )

    def check_compatible(self, spec: FormatSpec, file: str, *, labels: bool = True) -> None:
        """A file must hold the features this space was fitted on and, with `labels`, its
        behaviours (a request file to rerank needs only the features)."""
        missing = [prefix + f
                   for prefix, ours, theirs in ((USER_CAT, self.spec.user_cat, spec.user_cat),
                                                (USER_NUM, self.spec.user_num, spec.user_num),
                                                (CAND_CAT, self.spec.cand_cat, spec.cand_cat),
                                                (CAND_NUM, self.spec.cand_num, spec.cand_num))
                   for f in ours if f not in theirs]
        if self.spec.has_upstream_score and not spec.has_upstream_score:
            missing.append(UPSTREAM_SCORE)
        problems = []
        if missing:
            problems.append(f"missing column{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(repr(c) for c in missing)}, which the training files "
                            f"had")
        if labels and spec.behaviours != self.spec.behaviours:
            problems.append(f"behaviours {list(spec.behaviours)} differ from "
                            f"{list(self.spec.behaviours)}")
        if problems:
            raise DataError("; ".join(problems), file=file)

    def encode(self, batch: pa.RecordBatch | pa.Table) -> RequestBatch:
        """Turn request-log rows into a padded RequestBatch (vectorised, no per-row loop).

        Rows without exposed and feedback_ columns (requests to rerank) get empty logged lists:
        `exposed` and `feedback` hold one padded position, masked out by `exposed_mask`, as
        for `encode_rows`. The logging_ columns, where the rows have any and an exposed list,
        fill `RequestBatch.logging`."""
        return self._encode(_TableColumns(batch))

    def encode_rows(self, rows: Sequence[dict]) -> RequestBatch:
        """`encode` for requests given as Python values, one dict per request keyed by the
        request-log columns (exposure, feedback and propensity may be left out): the same
        tensors as encoding the same rows as an Arrow table, without Arrow's fixed cost per
        column (which dominates for the one request of an HTTP call)."""
        return self._encode(_RowColumns(rows))

    def _encode(self, source: _TableColumns | _RowColumns) -> RequestBatch:
        spec = self.spec
        rows = source.rows
        n, m = source.lengths(ITEM_ID), source.lengths(EXPOSED)
        width_n, width_m = max(int(n.max(initial=1)), 1), max(int(m.max(initial=1)), 1)

        user_cat = np.stack(
            [self.user_cat["user_id"].encode(source.column(USER_ID))]
            + [self.user_cat[f].encode(source.column(USER_CAT + f)) for f in spec.user_cat
               if f in self.user_cat], axis=1) if rows else np.zeros((0, 1), np.int64)
        user_num = np.stack(
            [_scale(_numbers(source.column(USER_NUM + f)), self.user_num[f])
             for f in self.user_num], axis=1) if self.user_num else np.zeros((rows, 0))
        cand_cat = np.stack(
            [_pad(self.cand_cat["item_id"].encode(source.flat(ITEM_ID)), n, width_n, PAD)]
            + [_pad(self.cand_cat[f].encode(source.flat(CAND_CAT + f)), n, width_n, PAD)
               for f in spec.cand_cat if f in self.cand_cat], axis=-1)
        cand_num = np.stack(
            [_pad(_scale(_numbers(source.flat(CAND_NUM + f)), self.cand_num[f]), n, width_n,
                  0.0)
             for f in self.cand_num], axis=-1) if self.cand_num else \
            np.zeros((rows, width_n, 0))
        if source.has(UPSTREAM_SCORE):
            upstream = _pad(np.nan_to_num(_numbers(source.flat(UPSTREAM_SCORE)), nan=0.0,
                                          posinf=0.0, neginf=0.0), n, width_n, 0.0)
        else:
            upstream = np.zeros((rows, width_n))
        exposed = _pad(_numbers(source.flat(EXPOSED)).astype(np.int64), m, width_m, 0)
        feedback = np.stack(
            [_pad(np.nan_to_num(_numbers(source.flat(FEEDBACK + b))), m, width_m, 0.0)
             for b in spec.behaviours], axis=-1)
        if source.has(LOG_PROPENSITY):  # null: unknown, kept as NaN (never as probability 1)
            log_propensity = _numbers(source.column(LOG_PROPENSITY))
        else:
            log_propensity = np.full(rows, np.nan)
        item_values, integer_ids = source.item_ids()
        item_id = _pad(item_values, n, width_n, -1 if integer_ids else None)
        logging = _logging_policy(source, width_n, width_m) if source.has(EXPOSED) else None
        return RequestBatch(
            request_id=source.values(REQUEST_ID),
            user_id=source.values(USER_ID),
            item_id=item_id,
            user_cat=torch.from_numpy(user_cat),
            user_num=torch.from_numpy(user_num.astype(np.float32)),
            cand_cat=torch.from_numpy(cand_cat),
            cand_num=torch.from_numpy(cand_num.astype(np.float32)),
            upstream_score=torch.from_numpy(upstream.astype(np.float32)),
            cand_mask=torch.from_numpy(np.arange(width_n)[None, :] < n[:, None]),
            exposed=torch.from_numpy(exposed),
            exposed_mask=torch.from_numpy(np.arange(width_m)[None, :] < m[:, None]),
            feedback=torch.from_numpy(feedback.astype(np.float32)),
            log_propensity=torch.from_numpy(log_propensity.astype(np.float32)),
            logging=logging,
        )

    def to_dict(self) -> dict:
        """A JSON-able description, saved inside checkpoints."""
        return {
            "spec": {"behaviours": list(self.spec.behaviours),
                     "utility_weights": self.spec.utility_weights,
                     "user_cat": list(self.spec.user_cat), "user_num": list(self.spec.user_num),
                     "cand_cat": list(self.spec.cand_cat), "cand_num": list(self.spec.cand_num),
                     "has_upstream_score": self.spec.has_upstream_score,
                     "has_log_propensity": self.spec.has_log_propensity,
                     "has_logging_score": self.spec.has_logging_score,
                     "has_logging_marginal": self.spec.has_logging_marginal,
                     "has_logging_prefix": self.spec.has_logging_prefix},
            "user_cat": {k: v.values for k, v in self.user_cat.items()},
            "cand_cat": {k: v.values for k, v in self.cand_cat.items()},
            "user_num": {k: [v.mean, v.std] for k, v in self.user_num.items()},
            "cand_num": {k: [v.mean, v.std] for k, v in self.cand_num.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> FeatureSpace:
        s = data["spec"]
        spec = FormatSpec(behaviours=tuple(s["behaviours"]),
                          utility_weights=dict(s["utility_weights"]),
                          user_cat=tuple(s["user_cat"]), user_num=tuple(s["user_num"]),
                          cand_cat=tuple(s["cand_cat"]), cand_num=tuple(s["cand_num"]),
                          has_upstream_score=s["has_upstream_score"],
                          has_log_propensity=s["has_log_propensity"],
                          # absent from the checkpoints of runs older than these columns
                          has_logging_score=s.get("has_logging_score", False),
                          has_logging_marginal=s.get("has_logging_marginal", False),
                          has_logging_prefix=s.get("has_logging_prefix", False))
        return cls(
            spec=spec,
            user_cat={k: Vocabulary(list(v)) for k, v in data["user_cat"].items()},
            cand_cat={k: Vocabulary(list(v)) for k, v in data["cand_cat"].items()},
            user_num={k: NumericStats(*v) for k, v in data["user_num"].items()},
            cand_num={k: NumericStats(*v) for k, v in data["cand_num"].items()},
        )


def _logging_policy(source: _TableColumns | _RowColumns, width_n: int, width_m: int
                    ) -> LoggingPolicy | None:
    """The rows' logging_ columns as tensors padded to (N, M) = (width_n, width_m); None when
    they have none. A null (the policy unknown for that request) becomes NaN."""
    if not any(source.has(name) for name in LOGGING_COLUMNS):
        return None
    rows = source.rows
    policy = LoggingPolicy()
    if source.has(LOGGING_SCORE) and source.has(LOGGING_TEMPERATURE):
        policy.score = torch.from_numpy(_pad_cut(
            _numbers(source.flat(LOGGING_SCORE)), source.lengths(LOGGING_SCORE), width_n,
            np.nan))
        policy.temperature = torch.from_numpy(_numbers(source.column(LOGGING_TEMPERATURE)))
    if source.has(LOGGING_MARGINAL):
        outer, inner, values = source.nested(LOGGING_MARGINAL)            # (R,), (Σn,), (Σnm,)
        candidate = np.arange(len(inner)) - np.repeat(np.cumsum(outer) - outer, outer)
        row = np.repeat(np.arange(rows), outer)
        value_of = np.repeat(np.arange(len(inner)), inner)                # inner list of each
        position = np.arange(len(values)) - np.repeat(np.cumsum(inner) - inner, inner)
        keep = (candidate[value_of] < width_n) & (position < width_m)
        marginal = np.zeros((rows, width_n, width_m), np.float32)
        marginal[row[value_of][keep], candidate[value_of][keep], position[keep]] = \
            _numbers(values)[keep]
        marginal[source.nulls(LOGGING_MARGINAL)] = np.nan
        policy.marginal = torch.from_numpy(marginal)
    if source.has(LOGGING_PREFIX):
        policy.prefix_log_propensity = torch.from_numpy(_pad_cut(
            _numbers(source.flat(LOGGING_PREFIX)), source.lengths(LOGGING_PREFIX), width_m,
            np.nan))
    return policy


def _common_spec(paths: list[Path]) -> FormatSpec:
    if not paths:
        raise DataError("no input files given")
    spec = FormatSpec.from_schema(open_parquet(paths[0]).schema_arrow, paths[0])
    spec.require_labels(paths[0])
    for path in paths[1:]:
        other = FormatSpec.from_schema(open_parquet(path).schema_arrow, path)
        other.require_labels(path)
        if other.behaviours != spec.behaviours:
            raise DataError(f"behaviours {list(other.behaviours)} differ from "
                            f"{list(spec.behaviours)} in {paths[0]}", file=str(path))
    return spec


class _TableColumns:
    """The columns of a request-log table, for `FeatureSpace._encode`: a column per request,
    or a list column flattened over the requests; a missing label column (exposure, feedback)
    is empty."""

    def __init__(self, table: pa.RecordBatch | pa.Table):
        self.table, self.rows = table, table.num_rows

    def has(self, name: str) -> bool:
        return name in self.table.schema.names

    def column(self, name: str) -> pa.Array | pa.ChunkedArray:
        return self.table.column(name)

    def values(self, name: str) -> np.ndarray:
        return self.table.column(name).to_numpy(zero_copy_only=False)

    def flat(self, name: str) -> pa.Array | pa.ChunkedArray:
        if self._no_labels(name):
            return pa.array([], pa.float32())
        return pc.list_flatten(self.table.column(name))

    def lengths(self, name: str) -> np.ndarray:
        if self._no_labels(name):
            return np.zeros(self.rows, np.int64)
        return _lengths(self.table.column(name))

    def _no_labels(self, name: str) -> bool:
        return (name == EXPOSED or name.startswith(FEEDBACK)) and not self.has(name)

    def nulls(self, name: str) -> np.ndarray:
        return self.table.column(name).is_null().to_numpy(zero_copy_only=False)

    def nested(self, name: str) -> tuple[np.ndarray, np.ndarray, pa.Array | pa.ChunkedArray]:
        """A list<list<...>> column: each row's list length, each inner list's length (null
        lists hold none) and the values of all inner lists, in order."""
        inner = pc.list_flatten(self.table.column(name))
        return _lengths(self.table.column(name)), _lengths(inner), pc.list_flatten(inner)

    def item_ids(self) -> tuple[np.ndarray, bool]:
        values = self.flat(ITEM_ID)
        return values.to_numpy(zero_copy_only=False), pa.types.is_integer(values.type)


class _RowColumns:
    """The same as `_TableColumns` for requests given as dicts of Python values; a missing
    list column (exposure, feedback) is empty."""

    def __init__(self, rows: Sequence[dict]):
        self.records, self.rows = rows, len(rows)

    def has(self, name: str) -> bool:
        return bool(self.records) and name in self.records[0]

    def column(self, name: str) -> list:
        return [record[name] for record in self.records]

    def values(self, name: str) -> np.ndarray:
        return np.array(self.column(name))

    def flat(self, name: str) -> list:
        return [value for record in self.records for value in _listed(record.get(name))]

    def lengths(self, name: str) -> np.ndarray:
        return np.array([len(_listed(record.get(name))) for record in self.records], np.int64)

    def nulls(self, name: str) -> np.ndarray:
        return np.array([record.get(name) is None for record in self.records], bool)

    def nested(self, name: str) -> tuple[np.ndarray, np.ndarray, list]:
        inner = self.flat(name)
        return (self.lengths(name), np.array([len(_listed(x)) for x in inner], np.int64),
                [value for values in inner for value in _listed(values)])

    def item_ids(self) -> tuple[np.ndarray, bool]:
        values = self.flat(ITEM_ID)
        integer = all(isinstance(v, int) for v in values)
        return np.array(values, dtype=np.int64 if integer else object), integer


def _listed(values) -> Sequence:
    """A row's list value, with None (a null) as an empty list."""
    return () if values is None else values


def _lengths(column) -> np.ndarray:
    return pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False).astype(
        np.int64)


def _numbers(values: pa.Array | pa.ChunkedArray | list) -> np.ndarray:
    """Numbers as float64 with nulls as NaN."""
    if isinstance(values, list):
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    return values.to_numpy(zero_copy_only=False).astype(np.float64)


def _scale(values: np.ndarray, stats: NumericStats) -> np.ndarray:
    """Standardise; a missing or non-finite value becomes the mean (0 after scaling)."""
    scaled = (values - stats.mean) / stats.std
    return np.where(np.isfinite(scaled), scaled, 0.0)


def _pad_cut(flat: np.ndarray, lengths: np.ndarray, width: int, fill) -> np.ndarray:
    """`_pad` keeping each row's first `width` values (a longer row is cut)."""
    return np.ascontiguousarray(
        _pad(flat, lengths, max(width, int(lengths.max(initial=0))), fill)[:, :width])


def _pad(flat: np.ndarray, lengths: np.ndarray, width: int, fill) -> np.ndarray:
    """Scatter the concatenated per-row values into a (rows, width) array padded with fill."""
    rows = len(lengths)
    dtype = flat.dtype if fill is not None else object
    out = np.full((rows, width), fill, dtype=dtype)
    row = np.repeat(np.arange(rows), lengths)
    col = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[row, col] = flat
    return out


class _Counter:
    """Streaming value counts, compacted as they grow."""

    def __init__(self) -> None:
        self.parts: list[pa.Table] = []
        self.pending = 0

    def add(self, values: pa.Array) -> None:
        counts = pc.value_counts(values.drop_null())
        self.parts.append(pa.table({"value": counts.field("values"),
                                    "count": counts.field("counts")}))
        self.pending += len(counts)
        if self.pending > 4_000_000:
            self.parts = [self._merged()]
            self.pending = self.parts[0].num_rows

    def _merged(self) -> pa.Table:
        if not self.parts:
            return pa.table({"value": pa.array([], pa.int64()), "count": pa.array([], pa.int64())})
        table = pa.concat_tables(self.parts, promote_options="permissive")
        merged = table.group_by("value").aggregate([("count", "sum")])
        return merged.rename_columns(["value", "count"])

    def top(self, limit: int, min_count: int) -> list:
        table = self._merged()
        table = table.filter(pc.greater_equal(table.column("count"), min_count))
        table = table.sort_by([("count", "descending"), ("value", "ascending")])
        return table.column("value").slice(0, limit).to_pylist()


class _Moments:
    """Streaming mean and standard deviation (float64 sums)."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.squares = 0.0

    def add(self, values: np.ndarray) -> None:
        values = values.astype(np.float64)
        values = values[np.isfinite(values)]          # nulls (NaN) and infinities do not count
        self.count += len(values)
        self.total += float(values.sum())
        self.squares += float((values ** 2).sum())

    def stats(self) -> NumericStats:
        if self.count == 0:
            return NumericStats(0.0, 1.0)
        mean = self.total / self.count
        variance = max(self.squares / self.count - mean ** 2, 0.0)
        return NumericStats(mean, float(np.sqrt(variance)) if variance > 1e-12 else 1.0)
