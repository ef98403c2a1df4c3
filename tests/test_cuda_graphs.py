"""CUDA graphs replay exactly what the eager pipeline computes (GPU only), and refuse a CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import simulate_small
from nar4rec.cuda_graphs import GraphedReranker, bucket_shape, pad_batch
from nar4rec.data.features import FeatureSpace
from nar4rec.data.loader import RequestLoader
from nar4rec.errors import Nar4recError
from nar4rec.models.evaluator import Evaluator, EvaluatorConfig
from nar4rec.models.nar4rec import NAR4Rec, NAR4RecConfig
from nar4rec.reranker import Reranker


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    data = tmp_path_factory.mktemp("graphs") / "data"
    simulate_small(data, requests=400)
    space = FeatureSpace.fit([data / "train.parquet"])
    torch.manual_seed(0)
    reranker = Reranker(NAR4Rec(NAR4RecConfig(list_length=6, d_model=32), space),
                        Evaluator(EvaluatorConfig(list_length=6, d_model=32), space),
                        space.utility_weights)
    batch = next(iter(RequestLoader([data / "test.parquet"], space, batch_size=16)))
    return reranker, batch


def test_a_reranker_on_the_cpu_is_refused(untrained):
    reranker, _ = untrained
    reranker.to("cpu")
    with pytest.raises(Nar4recError, match="CUDA device"):
        GraphedReranker(reranker)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_replayed_graphs_give_the_eager_answers(untrained):
    reranker, batch = untrained
    reranker.to("cuda")
    graphed = GraphedReranker(reranker)
    mask = batch.cand_mask.clone()
    mask[0, 4:] = False                                  # fewer candidates than positions
    mask[3, 20:] = False
    padded = dataclasses.replace(batch, cand_mask=mask).to("cuda")
    singles = [batch.to("cuda")] + [dataclasses.replace(
        padded, **{field.name: getattr(padded, field.name)[row:row + 1]
                   for field in dataclasses.fields(padded)}) for row in range(4)]
    for request in [padded, *singles, padded]:          # shapes seen again replay their graph
        expected = reranker.rerank(request)
        got = graphed.rerank(request)
        assert torch.equal(got.lists, expected.lists)
        torch.testing.assert_close(got.utility, expected.utility, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.item_scores, expected.item_scores, rtol=1e-5,
                                   atol=1e-5)
    assert len(graphed.graphs) == 2                     # batch 16 and batch 1
    answers = {tuple(graphed.rerank(one).lists[0].tolist()) for one in singles[1:]}
    assert len(answers) > 1                             # the inputs are copied in, not frozen


def test_bucket_shapes():
    assert [bucket_shape(rows, 60) for rows in (1, 2, 3, 8, 9)] == [
        (1, 64), (2, 64), (4, 64), (8, 64), (16, 64)]
    assert bucket_shape(5, 5) == (8, 16) and bucket_shape(1, 16) == (1, 16)


def test_padding_a_batch_changes_no_answer(untrained):
    """What `GraphedReranker(buckets=True)` relies on, checked eagerly on any device."""
    reranker, batch = untrained
    reranker.to("cpu")
    mask = batch.cand_mask.clone()
    mask[1, 3:] = False                                 # fewer candidates than positions
    some = dataclasses.replace(batch, cand_mask=mask)
    some = dataclasses.replace(some, **{field.name: getattr(some, field.name)[:5]
                                        for field in dataclasses.fields(some)})
    padded = pad_batch(some, 8, some.cand_mask.shape[1] + 11)
    assert padded.cand_cat.shape[:2] == (8, 71) and len(padded) == 8
    assert not padded.cand_mask[:, -11:].any() and padded.item_id.shape[:2] == (8, 71)
    expected, got = reranker.rerank(some), reranker.rerank(padded)
    assert torch.equal(got.lists[:5], expected.lists)
    torch.testing.assert_close(got.utility[:5], expected.utility)
    torch.testing.assert_close(got.item_scores[:5], expected.item_scores)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_width_dropped_to_make_room_is_captured_again(untrained):
    reranker, batch = untrained
    reranker.to("cuda")
    graphed = GraphedReranker(reranker, buckets=True, max_batch=2, max_graphs=2)
    narrow = dataclasses.replace(batch, **{field.name: getattr(batch, field.name)[:2]
                                           for field in dataclasses.fields(batch)})
    wide = pad_batch(narrow, 2, 70)                     # 64 and 80 candidate slots
    for request in (narrow, wide, narrow):
        expected = reranker.rerank(request.to("cuda"))
        assert torch.equal(graphed.rerank(request).lists, expected.lists)
        assert len(graphed.graphs) == 2                 # batch 1 and 2 of one width
    assert graphed.widths == {64}
