"""RequestLogWriter: per-column id types, tables as input, and errors that name the column and
the row of a value it cannot write."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nar4rec.data.batch import UNKNOWN
from nar4rec.data.features import FeatureSpace
from nar4rec.data.format import FormatSpec, RequestLogWriter, read_spec
from nar4rec.data.loader import RequestLoader
from nar4rec.data.validate import check_file
from nar4rec.errors import DataError

SPEC = FormatSpec(behaviours=("click",), utility_weights={"click": 1.0}, user_cat=("city",),
                  cand_cat=("genre",), cand_num=("price",))
MIXED = {"request_id": pa.string(), "item_id": pa.string(), "cand_cat_genre": pa.string()}


def requests(first: int, rows: int) -> dict[str, list]:
    """`rows` requests as Python values, the columns a pandas DataFrame would hold: integer
    users and cities, string request and item ids, genres given as integers."""
    rng = np.random.default_rng(first)
    n = rng.integers(2, 5, rows)
    items = [[f"item-{i}" for i in rng.choice(8, k, replace=False)] for k in n]
    return {
        "request_id": [f"r{first + r}" for r in range(rows)],
        "user_id": [int(u) for u in rng.integers(100, 104, rows)],
        "timestamp": pa.array(1_700_000_000_000 + 1000 * np.arange(first, first + rows),
                              pa.timestamp("ms", tz="UTC")),
        "user_cat_city": [None if r % 3 == 0 else r % 2 for r in range(rows)],
        "item_id": items,
        "cand_cat_genre": [[int(item[-1]) % 3 for item in row] for row in items],
        "cand_num_price": [rng.random(k).tolist() for k in n],
        "upstream_score": [sorted(rng.random(k).tolist(), reverse=True) for k in n],
        "exposed": [[1, 0] for _ in range(rows)],
        "feedback_click": [[float(r % 2), 0.0] for r in range(rows)],
    }


def test_per_column_id_types_round_trip_through_the_loader(tmp_path):
    path = tmp_path / "mixed.parquet"
    with RequestLogWriter(path, SPEC, id_type=MIXED) as writer:
        writer.write(requests(0, 5))                          # a mapping of lists
        writer.write(pa.table(requests(5, 4)))                # an Arrow table
    schema = pq.read_schema(path)
    assert schema.field("request_id").type == pa.string()
    assert schema.field("user_id").type == pa.int64()
    assert schema.field("user_cat_city").type == pa.int64()                 # not named
    assert schema.field("item_id").type.value_type == pa.string()
    assert schema.field("cand_cat_genre").type.value_type == pa.string()
    assert pq.read_table(path).column("cand_cat_genre")[0].as_py()[0] in ("0", "1", "2")
    assert check_file(path).ok and read_spec(path) == SPEC

    space = FeatureSpace.fit([path])
    assert all(isinstance(v, str) for v in space.cand_cat["item_id"].values)
    assert all(isinstance(v, int) for v in space.user_cat["user_id"].values)
    batch = next(iter(RequestLoader([path], space, batch_size=16)))
    assert len(batch) == 9
    assert batch.request_id.tolist() == [f"r{r}" for r in range(9)]
    assert batch.user_id.dtype == np.int64
    items = requests(0, 5)["item_id"][0]
    assert batch.item_id[0, :len(items)].tolist() == items
    assert (batch.cand_cat[batch.cand_mask][:, 0] >= 2).all()          # every item known
    assert (batch.user_cat[:, 0] >= 2).all()
    assert batch.user_cat[0, 1] == UNKNOWN                             # a null city
    again = space.encode(pq.read_table(path))
    assert np.array_equal(again.cand_cat.numpy(), batch.cand_cat.numpy())


def test_one_type_still_types_every_id_column():
    schema = SPEC.arrow_schema(pa.string())
    assert [schema.field(c).type for c in ("request_id", "user_id", "user_cat_city")] == \
        [pa.string()] * 3
    assert schema.field("item_id").type == schema.field("cand_cat_genre").type == \
        pa.list_(pa.string())
    assert SPEC.arrow_schema() == SPEC.arrow_schema({})                   # int64 throughout
    assert SPEC.arrow_schema().field("item_id").type == pa.list_(pa.int64())


@pytest.mark.parametrize(("id_type", "message"), [
    ({"cand_cat_colour": pa.string()}, "column 'cand_cat_colour' is not an id or categorical"),
    ({"cand_num_price": pa.string()}, "column 'cand_num_price' is not an id or categorical"),
    ({"user_id": pa.int32()}, "column 'user_id' is typed int32, expected int64 or string"),
    ({"item_id": pa.list_(pa.string())}, "column 'item_id' is typed list<item: string>"),
    (pa.float64(), "column 'request_id' is typed double"),
    ("string", "id_type must be a pyarrow type or {column: type}"),
])
def test_bad_id_types_name_the_column(tmp_path, id_type, message):
    with pytest.raises(ValueError, match=message):
        RequestLogWriter(tmp_path / "x.parquet", SPEC, id_type=id_type)


@pytest.mark.parametrize(("column", "values", "shown"), [
    ("user_id", [101, 102, "u-7", 103], "value 'u-7'"),                     # Python values
    ("user_id", np.array(["101", "102", "x", "103"]), "value 'x'"),          # numpy strings
    ("item_id", [["a"], ["b"], ["c", 2.5], ["d"]], "value ['c', 2.5]"),
    ("cand_cat_genre", pa.array([["1"], ["2"], ["x", "3"], ["4"]]), "value ['x', '3']"),
])
def test_a_value_that_cannot_be_written_names_column_and_row(tmp_path, column, values, shown):
    path = tmp_path / "bad.parquet"
    columns = requests(6, 4)
    columns[column] = values
    with pytest.raises(DataError) as error:
        with RequestLogWriter(path, SPEC, id_type={**MIXED, "cand_cat_genre": pa.int64()}) \
                as writer:
            writer.write(requests(0, 6))
            writer.write(columns)
    assert error.value.field == column
    assert error.value.row == 6 + 2                       # over the file, not the batch
    assert error.value.file == str(path) and "cannot be written as" in error.value.message
    assert shown in error.value.message
    assert not path.exists()                                     # nothing half-written


def test_a_missing_column_is_named(tmp_path):
    columns = requests(0, 2)
    del columns["cand_num_price"]
    with pytest.raises(ValueError, match="missing column 'cand_num_price'"):
        with RequestLogWriter(tmp_path / "x.parquet", SPEC, id_type=MIXED) as writer:
            writer.write(columns)


def test_a_request_file_to_rerank_takes_the_same_types(tmp_path):
    path = tmp_path / "requests.parquet"
    columns = requests(0, 3)
    with RequestLogWriter(path, SPEC, id_type=MIXED, labels=False) as writer:
        writer.write({k: v for k, v in columns.items() if k not in ("exposed", "feedback_click")})
    schema = pq.read_schema(path)
    assert schema.field("item_id").type.value_type == pa.string()
    assert "exposed" not in schema.names and not read_spec(path).has_labels
