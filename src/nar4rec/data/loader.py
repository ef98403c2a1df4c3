"""Request-log files -> a stream of RequestBatches, row group by row group.

`RequestLoader` iterates over (file, row group) units, shuffled per epoch and split across DDP
ranks, keeping only a few row groups in memory: a file larger than memory can be trained on.
Each batch is encoded by a fitted `features.FeatureSpace`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nar4rec.data.batch import RequestBatch
from nar4rec.data.features import FeatureSpace
from nar4rec.data.format import (
    CAND_CAT,
    CAND_NUM,
    EXPOSED,
    FEEDBACK,
    ITEM_ID,
    LOG_PROPENSITY,
    REQUEST_ID,
    UPSTREAM_SCORE,
    USER_CAT,
    USER_ID,
    USER_NUM,
    FormatSpec,
    open_parquet,
)
from nar4rec.errors import DataError


class RequestLoader:
    """Iterate over RequestBatches from one or more request-log files.

    Each epoch shuffles the (file, row group) units with a seed that depends on the epoch, gives
    rank r of `world_size` every world_size-th unit, and shuffles rows within a buffer of
    `buffer_row_groups` row groups: memory holds a few row groups, never the whole data.

    With `labels=False` (reranking) it reads only what the ranking stage knows: the files may
    be request files to rerank, any exposed, feedback_, log_propensity and logging_ columns
    are not read, and every batch's logged lists are empty (`FeatureSpace.encode`). With
    `labels=True` (training, evaluation) a file without them is an error; its log_propensity
    and logging_ columns are read where it has them (`RequestBatch.logging`).
    """

    def __init__(self, paths: Sequence[str | os.PathLike], space: FeatureSpace, *,
                 batch_size: int = 256, shuffle: bool = False, seed: int = 0, rank: int = 0,
                 world_size: int = 1, buffer_row_groups: int = 4, drop_last: bool = False,
                 labels: bool = True):
        self.paths = [Path(p) for p in paths]
        self.space = space
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.buffer_row_groups = max(1, buffer_row_groups)
        self.drop_last = drop_last
        self.epoch = 0
        self.units: list[tuple[Path, int, int]] = []      # (file, row group, rows)
        self.columns: dict[Path, list[str]] = {}          # what to read of each file
        for path in self.paths:
            parquet = open_parquet(path)
            spec = FormatSpec.from_schema(parquet.schema_arrow, path)
            if labels:
                spec.require_labels(path)
            space.check_compatible(spec, str(path), labels=labels)
            self.columns[path] = _columns_needed(space, spec, labels)
            for group in range(parquet.metadata.num_row_groups):
                self.units.append((path, group, parquet.metadata.row_group(group).num_rows))
        if not self.units:
            raise DataError("no rows to read", file=", ".join(str(p) for p in self.paths))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def my_units(self) -> list[tuple[Path, int, int]]:
        order = np.arange(len(self.units))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
        return [self.units[i] for i in order[self.rank::self.world_size]]

    @property
    def num_rows(self) -> int:
        return sum(rows for _, _, rows in self.my_units())

    def __iter__(self) -> Iterator[RequestBatch]:
        return self.batches()

    def batches(self, skip: int = 0) -> Iterator[RequestBatch]:
        """The epoch's batches after its first `skip`: those are read and shuffled as usual,
        so that the rest are the same requests in the same order, but never encoded (a run
        resumed mid-epoch fast-forwards over the batches it has trained on)."""
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, 1])
        units = self.my_units()
        files: dict[Path, object] = {}
        carry: pa.Table | None = None
        for start in range(0, len(units), self.buffer_row_groups):
            tables = []
            for path, group, _ in units[start:start + self.buffer_row_groups]:
                if path not in files:
                    files[path] = open_parquet(path)
                try:
                    tables.append(files[path].read_row_group(group,
                                                              columns=self.columns[path]))
                except (pa.ArrowException, OSError) as exc:
                    raise DataError(f"cannot read row group {group} ({exc})",
                                    file=str(path)) from None
            table = pa.concat_tables([carry, *tables] if carry is not None else tables,
                                     promote_options="permissive")
            if self.shuffle:
                table = table.take(rng.permutation(table.num_rows))
            full = table.num_rows - table.num_rows % self.batch_size
            first = min(skip, full // self.batch_size)       # batches of this table to skip
            skip -= first
            for offset in range(first * self.batch_size, full, self.batch_size):
                yield self.space.encode(table.slice(offset, self.batch_size))
            carry = table.slice(full) if full < table.num_rows else None
        if carry is not None and carry.num_rows and not self.drop_last and not skip:
            yield self.space.encode(carry)


def max_lengths(paths: Sequence[str | os.PathLike]) -> tuple[int, int]:
    """The most candidates and the longest logged list of any request in `paths`: (n, m);
    m is 0 for a request file to rerank."""
    most_candidates = longest_list = 0
    for path in paths:
        parquet = open_parquet(path)
        columns = [ITEM_ID] + ([EXPOSED] if EXPOSED in parquet.schema_arrow.names else [])
        for batch in parquet.iter_batches(batch_size=65536, columns=columns):
            for name in columns:
                longest = pc.max(pc.list_value_length(batch.column(name))).as_py() or 0
                if name == ITEM_ID:
                    most_candidates = max(most_candidates, longest)
                else:
                    longest_list = max(longest_list, longest)
    return most_candidates, longest_list


def _columns_needed(space: FeatureSpace, file_spec: FormatSpec, labels: bool) -> list[str]:
    """The columns to read of a file whose spec is `file_spec`: the features `space` was
    fitted on and, with `labels`, the logged lists, their feedback and whatever the file says
    of its logging policy (log_propensity, logging_)."""
    spec = space.spec
    columns = [REQUEST_ID, USER_ID, ITEM_ID]
    columns += [USER_CAT + f for f in spec.user_cat] + [USER_NUM + f for f in spec.user_num]
    columns += [CAND_CAT + f for f in spec.cand_cat] + [CAND_NUM + f for f in spec.cand_num]
    if spec.has_upstream_score:
        columns.append(UPSTREAM_SCORE)
    if labels:
        columns.append(EXPOSED)
        columns += [FEEDBACK + b for b in spec.behaviours]
        if file_spec.has_log_propensity:
            columns.append(LOG_PROPENSITY)
        columns += file_spec.logging_columns
    return columns
