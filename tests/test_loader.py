"""Request logs -> padded, masked batches, streamed by row group and split across ranks."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers import plackett_luce_log, simulate_small
from nar4rec.data.batch import PAD, UNKNOWN
from nar4rec.data.features import FeatureSpace
from nar4rec.data.format import FormatSpec, RequestLogWriter, list_array
from nar4rec.data.loader import RequestLoader


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "data"
    simulate_small(out, requests=2500)
    return out


def ragged_file(path) -> pa.Table:
    """Requests with different n and m, string ids and a null category."""
    spec = FormatSpec(behaviours=("click",), utility_weights={"click": 1.0},
                      user_cat=("city",), cand_cat=("genre",), cand_num=("price",))
    n = np.array([3, 5, 2])
    m = np.array([2, 3, 1])
    items = np.array([["a", "b", "c", "", ""], ["d", "e", "a", "f", "g"], ["x", "b", "", "", ""]])
    columns = {
        "request_id": pa.array(["r1", "r2", "r3"]),
        "user_id": pa.array(["u1", "u2", "u1"]),
        "timestamp": pa.array([1, 2, 3], pa.timestamp("ms", tz="UTC")),
        "user_cat_city": pa.array(["paris", None, "rome"]),
        "item_id": list_array(items, n, pa.string()),
        "cand_cat_genre": list_array(np.array([["g1", "g2", "g1", "", ""],
                                               ["g2", "g2", "g1", "g3", "g1"],
                                               ["g9", "g1", "", "", ""]]), n, pa.string()),
        "cand_num_price": list_array(np.arange(15, dtype=np.float32).reshape(3, 5), n),
        "upstream_score": list_array(np.ones((3, 5), dtype=np.float32), n),
        "exposed": list_array(np.array([[2, 0, 0], [4, 1, 3], [1, 0, 0]], dtype=np.int32), m),
        "feedback_click": list_array(np.array([[1, 0, 0], [0, 0, 1], [1, 0, 0]],
                                              dtype=np.float32), m),
    }
    with RequestLogWriter(path, spec, id_type=pa.string()) as writer:
        writer.write(columns)
    return pq.read_table(path)


def test_padding_masks_and_vocabularies(tmp_path):
    path = tmp_path / "ragged.parquet"
    ragged_file(path)
    space = FeatureSpace.fit([path])
    batch = next(iter(RequestLoader([path], space, batch_size=8)))
    assert batch.cand_mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5,
                                        [True] * 2 + [False] * 3]
    assert batch.exposed_mask.sum(1).tolist() == [2, 3, 1]
    assert batch.exposed[1].tolist() == [4, 1, 3]
    assert batch.feedback[:, :, 0].tolist() == [[1, 0, 0], [0, 0, 1], [1, 0, 0]]
    assert batch.candidate_feedback()[..., 0].tolist() == [
        [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 1, 0, 0, 0]]    # padded positions point at 0
    items = batch.cand_cat[..., 0]
    assert torch.all(items[~batch.cand_mask] == PAD)
    assert items[0, 0] == items[1, 2]           # "a" twice, one index
    assert items[0, 1] == items[2, 1]           # "b" twice
    assert batch.user_cat[1, 1] == UNKNOWN      # a null city
    assert batch.item_id[1].tolist() == ["d", "e", "a", "f", "g"]
    # Numbers are standardised with the training mean and deviation; padding stays 0.
    prices = batch.cand_num[..., 0][batch.cand_mask]
    assert abs(float(prices.mean())) < 1e-5
    assert torch.all(batch.cand_num[~batch.cand_mask] == 0)
    unseen = space.cand_cat["genre"].encode(pa.array(["g1", "never-seen", None]))
    assert unseen[1] == UNKNOWN and unseen[2] == UNKNOWN and unseen[0] >= 2
    restored = FeatureSpace.from_dict(space.to_dict())
    again = restored.encode(pq.read_table(path))
    assert torch.equal(again.cand_cat, batch.cand_cat)
    assert torch.equal(again.user_num, batch.user_num)


def candidate_rows(batch, row: int) -> list[tuple]:
    """One request's real candidates as (item id, categorical ids, numbers), sorted."""
    real = batch.cand_mask[row]
    return sorted(zip(batch.item_id[row][real.numpy()].tolist(), batch.cand_cat[row][real].tolist(),
                      batch.cand_num[row][real].tolist(), strict=True))


def test_shuffled_candidates_keep_their_features_and_the_logged_lists(tmp_path):
    path = tmp_path / "ragged.parquet"
    ragged_file(path)
    space = FeatureSpace.fit([path])
    batch = next(iter(RequestLoader([path], space, batch_size=8)))
    orders = set()
    for seed in range(20):
        mixed = batch.shuffled(torch.Generator().manual_seed(seed))
        assert torch.equal(mixed.cand_mask, batch.cand_mask)           # padding stays last
        for row in range(len(batch)):
            assert candidate_rows(mixed, row) == candidate_rows(batch, row)  # moved, unchanged
            shown = batch.exposed[row][batch.exposed_mask[row]].numpy()
            moved = mixed.exposed[row][batch.exposed_mask[row]].numpy()
            assert mixed.item_id[row][moved].tolist() == batch.item_id[row][shown].tolist()
        orders.add(tuple(mixed.item_id[1].tolist()))
        again = batch.shuffled(torch.Generator().manual_seed(seed))
        assert torch.equal(again.exposed, mixed.exposed)
    assert len(orders) > 10                                              # of 5! = 120


def test_every_row_once_per_epoch_across_ranks(data):
    path = data / "train.parquet"
    space = FeatureSpace.fit([path])
    table = pq.read_table(path, columns=["request_id", "exposed"])
    seen = []
    for rank in range(2):
        loader = RequestLoader([path], space, batch_size=64, shuffle=True, seed=3, rank=rank,
                               world_size=2, buffer_row_groups=1)
        ids = np.concatenate([b.request_id for b in loader])
        seen.append(ids)
        assert len(ids) == loader.num_rows
    assert not set(seen[0]) & set(seen[1])
    assert sorted(np.concatenate(seen)) == sorted(table.column("request_id").to_pylist())


def test_skipped_batches_leave_the_rest_of_the_epoch_unchanged(data):
    path = data / "train.parquet"
    space = FeatureSpace.fit([path])
    loader = RequestLoader([path], space, batch_size=64, shuffle=True, seed=3,
                           buffer_row_groups=1)
    loader.set_epoch(2)
    every = [b.request_id for b in loader]
    assert len(every) == 32                 # 2000 rows in 2 row groups: 15 + 16 + a last of 16
    for skip in (0, 1, 15, 16, 31, 32, 40):  # across the buffers' boundaries and past the end
        rest = [b.request_id for b in loader.batches(skip)]
        assert len(rest) == len(every[skip:])
        assert all(np.array_equal(a, b) for a, b in zip(rest, every[skip:], strict=True))


def test_shuffle_changes_with_epoch_and_batches_match_the_file(data):
    path = data / "valid.parquet"
    space = FeatureSpace.fit([data / "train.parquet"])
    loader = RequestLoader([path], space, batch_size=50, shuffle=True, seed=0)
    first = np.concatenate([b.request_id for b in loader])
    loader.set_epoch(1)
    second = np.concatenate([b.request_id for b in loader])
    assert sorted(first) == sorted(second) and not np.array_equal(first, second)
    table = pq.read_table(path)
    rows = {r: i for i, r in enumerate(table.column("request_id").to_pylist())}
    for batch in RequestLoader([path], space, batch_size=40):
        for j, request in enumerate(batch.request_id[:5]):
            i = rows[request]
            assert batch.exposed[j].tolist() == table.column("exposed")[i].as_py()
            assert batch.feedback[j, :, 1].tolist() == table.column("feedback_like")[i].as_py()
            assert batch.item_id[j].tolist() == table.column("item_id")[i].as_py()
        break


def test_incompatible_file_is_refused(tmp_path, data):
    path = tmp_path / "ragged.parquet"
    ragged_file(path)
    space = FeatureSpace.fit([data / "train.parquet"])
    from nar4rec.errors import DataError
    with pytest.raises(DataError, match="behaviours"):
        RequestLoader([path], space)


def test_missing_numbers_do_not_pose_as_values(tmp_path):
    path = tmp_path / "ragged.parquet"
    table = ragged_file(path)
    prices = table.column("cand_num_price").to_pylist()
    prices[1][2] = None
    index = table.schema.get_field_index("cand_num_price")
    table = table.set_column(index, table.schema.field(index),
                             pa.array(prices, type=table.schema.field(index).type))
    table = table.append_column("log_propensity", pa.array([-1.0, None, -2.0], pa.float64()))
    meta = table.schema.metadata
    pq.write_table(table.replace_schema_metadata(meta), path)
    space = FeatureSpace.fit([path])
    known = [v for row in prices for v in row if v is not None]
    assert space.cand_num["price"].mean == pytest.approx(np.mean(known))
    batch = space.encode(pq.read_table(path))
    assert batch.cand_num[1, 2, 0] == 0.0                    # the mean, after scaling
    assert torch.isnan(batch.log_propensity[1]) and batch.log_propensity[0] == -1.0


def assert_same_batch(a, b) -> None:
    for name in ("user_cat", "user_num", "cand_cat", "cand_num", "upstream_score", "cand_mask",
                 "exposed", "exposed_mask", "feedback"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.log_propensity.isnan(), b.log_propensity.isnan())
    for name in ("request_id", "user_id", "item_id"):
        assert getattr(a, name).tolist() == getattr(b, name).tolist(), name


@pytest.mark.parametrize("source", ["ragged strings", "simulated"])
def test_python_rows_encode_as_the_table_does(tmp_path, data, source):
    if source == "ragged strings":
        path = tmp_path / "ragged.parquet"
        table = ragged_file(path)
        space = FeatureSpace.fit([path])
    else:
        table = pq.read_table(data / "test.parquet").slice(0, 50)
        space = FeatureSpace.fit([data / "train.parquet"])      # test items include unseen
    rows = table.to_pylist()
    assert_same_batch(space.encode_rows(rows), space.encode(table))
    served = [{k: v for k, v in row.items() if not k.startswith(("exposed", "feedback_"))}
              for row in rows]                                   # what the service passes
    bare = space.encode_rows(served)
    assert not bare.exposed_mask.any()
    assert torch.equal(bare.cand_cat, space.encode(table).cand_cat)
    assert torch.equal(bare.cand_num, space.encode(table).cand_num)
    # a category matches by its text, in a list as in an Arrow array
    vocab = space.cand_cat["item_id"]
    assert vocab.encode([str(vocab.values[0]), None, "never seen"]).tolist() == \
        vocab.encode(pa.array([str(vocab.values[0]), None, "never seen"])).tolist() == \
        [2, UNKNOWN, UNKNOWN]


def test_logging_columns_reach_the_batch(tmp_path):
    path = tmp_path / "logged.parquet"
    table = plackett_luce_log(path)
    space = FeatureSpace.fit([path])
    batch = next(iter(RequestLoader([path], space, batch_size=8)))
    policy = batch.logging
    n = np.array([len(x) for x in table.column("item_id").to_pylist()])
    m = np.array([len(x) for x in table.column("exposed").to_pylist()])
    assert policy.score.shape == (6, 5) and policy.score.dtype == torch.float64
    assert policy.marginal.shape == (6, 5, 3) and policy.marginal.dtype == torch.float32
    assert policy.prefix_log_propensity.shape == (6, 3)
    for row in range(5):                                  # the last row's policy is unknown
        assert policy.score[row, :n[row]].tolist() == pytest.approx(
            table.column("logging_score")[row].as_py())
        assert torch.isnan(policy.score[row, n[row]:]).all()
        np.testing.assert_array_equal(policy.marginal[row, :n[row], :m[row]],
                                      np.array(table.column("logging_marginal")[row].as_py(),
                                               np.float32))
        assert (policy.marginal[row, n[row]:] == 0).all()
        assert (policy.marginal[row, :, m[row]:] == 0).all()
        assert torch.isnan(policy.prefix_log_propensity[row, m[row]:]).all()
    assert torch.isnan(policy.temperature[5]) and torch.isnan(policy.score[5]).all()
    assert torch.isnan(policy.marginal[5]).all()
    assert torch.isnan(policy.prefix_log_propensity[5]).all()
    assert policy.temperature[:5].tolist() == [1.0, 0.5, 2.0, 1.0, 0.3]

    same = space.encode_rows(table.to_pylist()).logging     # the service's path
    for name in ("score", "temperature", "marginal", "prefix_log_propensity"):
        assert torch.equal(getattr(same, name).isnan(), getattr(policy, name).isnan())
        assert torch.equal(getattr(same, name).nan_to_num(), getattr(policy, name).nan_to_num())
    assert torch.equal(batch.to("cpu").logging.temperature.nan_to_num(),
                       policy.temperature.nan_to_num())
    assert torch.equal(policy[1:3].score.nan_to_num(), policy.score[1:3].nan_to_num())

    mixed = batch.shuffled(torch.Generator().manual_seed(1))   # candidates move together
    for row in range(6):
        order = [list(batch.item_id[row]).index(item) for item in mixed.item_id[row]]
        assert torch.equal(mixed.logging.score[row].nan_to_num(),
                           policy.score[row, order].nan_to_num())
        assert torch.equal(mixed.logging.marginal[row].nan_to_num(),
                           policy.marginal[row, order].nan_to_num())
    assert mixed.logging.prefix_log_propensity is policy.prefix_log_propensity

    reranking = next(iter(RequestLoader([path], space, batch_size=8, labels=False)))
    assert reranking.logging is None
    served = [{k: v for k, v in row.items() if k not in ("exposed", "feedback_click")}
              for row in table.to_pylist()]
    assert space.encode_rows(served).logging is None      # requests have no logged list


def test_a_log_without_logging_columns_beside_one_with_them(tmp_path, data):
    with_them = tmp_path / "new.parquet"
    table = plackett_luce_log(with_them)
    without = tmp_path / "old.parquet"
    pq.write_table(table.drop_columns(["logging_score", "logging_temperature",
                                       "logging_marginal", "logging_prefix_log_propensity"]),
                   without)
    space = FeatureSpace.fit([without])                    # trained before the columns
    assert not space.spec.has_logging
    assert next(iter(RequestLoader([without], space, batch_size=8))).logging is None
    loader = RequestLoader([without, with_them], space, batch_size=12, shuffle=True)
    batch = next(iter(loader))
    known = ~torch.isnan(batch.logging.temperature)
    assert known.sum() == 5                                # the old file's rows: unknown
    assert (batch.request_id[known.numpy()] < 5).all()
    # a checkpoint's feature space from before the columns still loads
    saved = FeatureSpace.fit([data / "train.parquet"]).to_dict()
    assert saved["spec"]["has_logging_score"] and saved["spec"]["has_logging_prefix"]
    for flag in ("has_logging_score", "has_logging_marginal", "has_logging_prefix"):
        del saved["spec"][flag]
    assert not FeatureSpace.from_dict(saved).spec.has_logging
