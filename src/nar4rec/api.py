"""The library without the command line (docs/python-api.md).

    import nar4rec
    nar4rec.write_requests(frame, "logs.parquet", utility_weights={"click": 1.0, "like": 2.0})
    nar4rec.split_by_time("logs.parquet", "data/mine")
    nar4rec.train_model("data/mine", "runs/mine", model="nar4rec")
    report = nar4rec.evaluate("runs/mine", "data/mine")          # with the reference rows
    reranker = nar4rec.load("runs/mine")
    reranker.rerank(fresh)          # [[item id, ...], ...], one list per request, input order

Every function takes requests as a pandas DataFrame, a pyarrow Table or a list of dicts, one
row per request keyed by the request-log columns (docs/data-format.md), and raises
`nar4rec.errors.DataError` naming the row and the column of a bad value.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nar4rec.config import RunConfig, apply_overrides, dataset_settings, load_overrides
from nar4rec.data.format import (
    CAND_CAT,
    CAND_NUM,
    EXPOSED,
    FEEDBACK,
    FORMAT_NAME,
    FORMAT_VERSION,
    ITEM_ID,
    LOG_PROPENSITY,
    LOGGING_COLUMNS,
    METADATA_KEY,
    REQUEST_ID,
    TIMESTAMP,
    TIMESTAMP_TYPE,
    UPSTREAM_SCORE,
    USER_CAT,
    USER_ID,
    USER_NUM,
    FormatSpec,
    RequestLogWriter,
    converted,
)
from nar4rec.data.split import split_by_time
from nar4rec.data.validate import Problem, check_file, check_table
from nar4rec.errors import DataError
from nar4rec.exploration import Exploration
from nar4rec.io import atomic_file

__all__ = ["Exploration", "Reranker", "evaluate", "load", "split_by_time", "train_model",
           "write_requests"]

Requests = "pandas.DataFrame | pa.Table | Sequence[Mapping]"
REQUESTS = "requests"            # how errors name an in-memory input
PREFIXES = (USER_CAT, USER_NUM, CAND_CAT, CAND_NUM, FEEDBACK)
FIXED = (REQUEST_ID, USER_ID, TIMESTAMP, ITEM_ID, UPSTREAM_SCORE, EXPOSED, LOG_PROPENSITY,
         *LOGGING_COLUMNS)
ID_TYPE_NAMES = {"int64": pa.int64(), "string": pa.string()}


def write_requests(requests, path: str | os.PathLike, *,
                   utility_weights: Mapping[str, float] | None = None,
                   id_types: Mapping[str, str | pa.DataType] | None = None,
                   row_group_size: int = 16384) -> dict:
    """Write requests as a request-log Parquet file, validated before it appears.

    The columns say what the file holds: `feedback_<b>` columns are the behaviours (in column
    order), `user_cat_`/`user_num_`/`cand_cat_`/`cand_num_` the features, `exposed` and
    the feedback make it a log (without them, a request file to rerank). Each id and
    categorical column gets its own type, integers or strings as its values are, unless
    `id_types` says otherwise. Timestamps without a time zone are read as UTC.

    Args:
        requests: a pandas DataFrame, a pyarrow Table or a list of dicts.
        path: the .parquet file to write (replaced atomically; nothing is left on error).
        utility_weights: {behaviour: weight} for every behaviour (the utility of a list is
            the weighted sum of its feedback, paper section 3.1); needed when there is any.
        id_types: {column: "int64" | "string"} to force a column's id type.
    Returns:
        The file's summary, as `nar4rec validate --json` writes it.
    Raises:
        DataError naming the column (and the row) of the first problems.
    """
    table = requests_table(requests)
    spec = _spec_of(table, utility_weights)
    types = {name: _id_type(table.column(name), name, (id_types or {}).get(name))
             for name in spec.id_columns if name in table.column_names}
    path = Path(path)
    with atomic_file(path) as tmp:
        with RequestLogWriter(tmp, spec, id_type=types, row_group_size=row_group_size,
                              timestamp=TIMESTAMP in table.column_names
                              or spec.has_labels) as writer:
            columns = {name: table.column(name) for name in writer.schema.names
                       if name in table.column_names}
            if TIMESTAMP in columns:
                columns[TIMESTAMP] = _utc(columns[TIMESTAMP])
            writer.write(columns)
        report = check_file(tmp)
        if report.problems:
            raise _first_problems(report.problems, str(path))
    return report.summary()


def train_model(data_dir: str | os.PathLike, run_dir: str | os.PathLike, *, model: str = "nar4rec",
          settings: Mapping[str, object] | Sequence[str] | None = None,
          config: str | os.PathLike | None = None, resume: bool = False,
          progress: bool = False) -> Path:
    """Train `model` on DATA/train (early-stopped on DATA/valid) into `run_dir`, as
    `nar4rec train` does; the data set's settings apply first, then the TOML `config`, then
    `settings` ({"train.epochs": 3} or ["train.epochs=3"]). Returns the run directory."""
    from nar4rec.runs import train_run

    base = apply_overrides(RunConfig(), dataset_settings(data_dir),
                           source="the data set's settings")
    run_config = load_overrides(base, config, _settings_list(settings))
    train_run(data_dir, run_dir, model=model, config=run_config, resume=resume,
              progress=progress)
    return Path(run_dir)


def evaluate(run_dir: str | os.PathLike, data_dir: str | os.PathLike, *, split: str = "test",
             settings: Mapping[str, object] | Sequence[str] | None = None) -> dict:
    """Every metric of a run on one split, with the logged lists and the upstream order as
    reference rows and a verdict in words on each (`nar4rec evaluate --json`'s contents)."""
    from nar4rec.config import parse_sets
    from nar4rec.evaluation import evaluate_run

    sets = parse_sets(_settings_list(settings)) if settings else None
    return evaluate_run(run_dir, data_dir, split=split, sets=sets)


def load(run_dir: str | os.PathLike, *,
         settings: Mapping[str, object] | Sequence[str] | None = None,
         batch_size: int = 1024) -> Reranker:
    """A trained run, ready to rerank fresh requests (`Reranker`)."""
    return Reranker(run_dir, settings=settings, batch_size=batch_size)


class Reranker:
    """A trained run of any model, reranking requests given in memory.

    A request needs only what the ranking stage knows: request_id, user_id, item_id (the
    candidates) and the features and upstream_score the run was trained with; exposed,
    feedback_ and other columns are ignored.
    """

    def __init__(self, run_dir: str | os.PathLike, *,
                 settings: Mapping[str, object] | Sequence[str] | None = None,
                 batch_size: int = 1024) -> None:
        from nar4rec.config import parse_sets
        from nar4rec.runs import load_run

        self.run = load_run(run_dir, sets=parse_sets(_settings_list(settings))
                            if settings else None)
        self.batch_size = batch_size
        spec = self.run.space.spec
        self.spec = spec.without_labels()
        self.columns = [REQUEST_ID, USER_ID, ITEM_ID,
                        *(USER_CAT + f for f in spec.user_cat),
                        *(USER_NUM + f for f in spec.user_num),
                        *(CAND_CAT + f for f in spec.cand_cat),
                        *(CAND_NUM + f for f in spec.cand_num),
                        *((UPSTREAM_SCORE,) if spec.has_upstream_score else ())]

    @property
    def model(self) -> str:
        return self.run.info["model"]

    @property
    def list_length(self) -> int:
        return self.run.info["list_length"]

    def rerank(self, requests) -> list[list]:
        """The item ids of each request's list, best first, in the order of the requests."""
        return self.rerank_table(requests, frame=False).column("items").to_pylist()

    def rerank_table(self, requests, *, frame: bool | None = None,
                     explore: Exploration | None = None, seed: int | None = None):
        """One row per request: request_id, user_id, items (item ids in order), positions
        (their candidate indices), scores (each item's predicted utility, a baseline's own
        score), predicted_utility (the list's, by NAR4Rec's evaluator; NaN for a baseline).

        With `explore` (`nar4rec.exploration.Exploration`, draws seeded by `seed`), the
        exploring policy's lists and their propensities (explored, log_propensity,
        logging_prefix_log_propensity, logging_marginal): log them with the feedback, and
        `nar4rec ope` can evaluate the next model on those logs (docs/ope.md).

        Returns a pandas DataFrame when given one (or `frame=True`), else a pyarrow Table.
        """
        from nar4rec.runs import reranked_table

        table = self._checked(requests_table(requests))
        space, system = self.run.space, self.run.system
        rng = np.random.default_rng(seed)
        parts = [reranked_table(system, space.encode(table.slice(start, self.batch_size)),
                                explore, rng)
                 for start in range(0, table.num_rows, self.batch_size)]
        result = pa.concat_tables(parts) if parts else pa.table({})
        if frame if frame is not None else _is_frame(requests):
            return result.to_pandas()
        return result

    def _checked(self, table: pa.Table) -> pa.Table:
        """The columns the run reads, typed as the format wants, validated row by row."""
        missing = [name for name in self.columns if name not in table.column_names]
        if missing:
            raise DataError("required column is missing (the run was trained with it)",
                            file=REQUESTS, field=missing[0])
        schema = self.spec.arrow_schema({name: _id_type(table.column(name), name, None)
                                         for name in self.spec.id_columns})
        fields = [schema.field(name) for name in self.columns]
        table = pa.Table.from_arrays([_cast(table.column(f.name), f) for f in fields],
                                     schema=pa.schema(fields, metadata=schema.metadata))
        report = check_table(table, self.spec, REQUESTS)
        if report.problems:
            raise _first_problems(report.problems, REQUESTS)
        return table


def requests_table(requests) -> pa.Table:
    """A pandas DataFrame, pyarrow Table or list of dicts as a pyarrow Table; a column whose
    values do not fit one type is a DataError naming it."""
    if isinstance(requests, pa.Table):
        return requests
    if isinstance(requests, pa.RecordBatch):
        return pa.Table.from_batches([requests])
    if _is_frame(requests):
        try:
            return pa.Table.from_pandas(requests, preserve_index=False)
        except (pa.ArrowException, ValueError, TypeError):
            pass                    # name the column below
        return pa.table({str(name): _column(requests[name].tolist(), str(name))
                         for name in requests.columns})
    if isinstance(requests, Sequence) and not isinstance(requests, str | bytes):
        rows = list(requests)
        for index, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise DataError(f"a request must be a dict of columns, not "
                                f"{type(row).__name__}", file=REQUESTS, row=index)
        names = list(dict.fromkeys(name for row in rows for name in row))
        return pa.table({str(name): _column([row.get(name) for row in rows], str(name))
                         for name in names})
    raise DataError(f"requests must be a pandas DataFrame, a pyarrow Table or a list of dicts, "
                    f"not {type(requests).__name__}", file=REQUESTS)


def _column(values: list, name: str) -> pa.Array:
    """One column of Python values (numpy arrays for lists allowed, of mixed dtypes too);
    values of more than one type are a DataError naming the column and the first row whose
    value does not fit the rows before it."""
    def convert(part: list) -> pa.Array:
        try:
            return pa.array(part)
        except (pa.ArrowException, ValueError, TypeError, OverflowError):
            return pa.array([v.tolist() if isinstance(v, np.ndarray) else v for v in part])

    try:
        return convert(values)
    except (pa.ArrowException, ValueError, TypeError, OverflowError) as exc:
        good, bad = 0, len(values)                       # values[:good] convert, [:bad] not
        while bad - good > 1:
            middle = (good + bad) // 2
            try:
                convert(values[:middle])
                good = middle
            except (pa.ArrowException, ValueError, TypeError, OverflowError):
                bad = middle
        raise DataError(f"{values[bad - 1]!r} does not fit the column's other values "
                        f"({exc})", file=REQUESTS, row=bad - 1, field=name) from None


def _spec_of(table: pa.Table, utility_weights: Mapping[str, float] | None) -> FormatSpec:
    names = table.column_names
    for name in names:
        if name not in FIXED and not name.startswith(PREFIXES):
            raise DataError("unknown column (docs/data-format.md lists the format's columns)",
                            file=REQUESTS, field=name)

    def suffixes(prefix: str) -> tuple[str, ...]:
        return tuple(n[len(prefix):] for n in names if n.startswith(prefix))

    behaviours = suffixes(FEEDBACK)
    weights = {str(k): float(v) for k, v in (utility_weights or {}).items()}
    missing = [b for b in behaviours if b not in weights]
    if missing:
        raise DataError(f"no utility weight for behaviour{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(missing)}: pass utility_weights={{behaviour: weight}} "
                        "(a list's utility is the weighted sum of its feedback)",
                        file=REQUESTS, field=FEEDBACK + missing[0])
    unknown = [b for b in weights if b not in behaviours]
    if unknown:
        raise DataError(f"utility weight for '{unknown[0]}', which has no column",
                        file=REQUESTS, field=FEEDBACK + unknown[0])
    metadata = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                "behaviours": list(behaviours), "utility_weights": weights}
    schema = table.schema.with_metadata({METADATA_KEY: json.dumps(metadata).encode()})
    return FormatSpec.from_schema(schema, REQUESTS)        # the format's own column checks


def _id_type(column: pa.ChunkedArray, name: str, forced: str | pa.DataType | None
             ) -> pa.DataType:
    """int64 or string for an id column (of a list column, its values), by its values."""
    if forced is not None:
        chosen = ID_TYPE_NAMES.get(forced, forced) if isinstance(forced, str) else forced
        if chosen not in ID_TYPE_NAMES.values():
            raise DataError(f"id type {forced!r}: expected 'int64' or 'string'",
                            file=REQUESTS, field=name)
        return chosen
    kind = column.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        kind = kind.value_type
    if pa.types.is_integer(kind) or pa.types.is_null(kind):
        return pa.int64()
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return pa.string()
    raise DataError(f"holds {column.type}: ids and categories must be integers or strings",
                    file=REQUESTS, field=name)


def _cast(column: pa.ChunkedArray, target: pa.Field) -> pa.ChunkedArray:
    if column.type == target.type:
        return column
    try:
        return converted(column, target.type)
    except (pa.ArrowException, ValueError, TypeError, OverflowError) as exc:
        raise DataError(f"cannot be read as {target.type} ({exc})", file=REQUESTS,
                        field=target.name) from None


def _utc(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Timestamps as the format's (milliseconds, UTC); a zone-less one is taken as UTC."""
    if pa.types.is_timestamp(column.type) and column.type != TIMESTAMP_TYPE:
        if column.type.tz is None:
            column = pc.assume_timezone(column, "UTC")
        return column.cast(TIMESTAMP_TYPE, safe=False)     # below a millisecond: truncated
    return column


def _first_problems(problems: list[Problem], where: str, shown: int = 5) -> DataError:
    """The first problem as the error, the places of the next few after it."""
    first = problems[0]
    message = first.message
    if len(problems) > 1:
        places = ", ".join(f"row {p.row} '{p.field}'" if p.row is not None else f"'{p.field}'"
                           for p in problems[1:shown])
        more = ", ..." if len(problems) > shown else ""
        message += f" (and {len(problems) - 1} more problems: {places}{more})"
    return DataError(message, file=where, row=first.row, field=first.field)


def _settings_list(settings: Mapping[str, object] | Sequence[str] | None) -> list[str]:
    if settings is None:
        return []
    if isinstance(settings, Mapping):
        return [f"{key}={_toml_value(value)}" for key, value in settings.items()]
    return list(settings)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


def _is_frame(value: object) -> bool:
    return type(value).__module__.startswith("pandas") and hasattr(value, "columns")
