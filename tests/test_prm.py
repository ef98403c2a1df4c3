"""PRM specifics: the initial list, not the batch's candidate order, drives the scores; padding
changes nothing; the list-wise softmax loss matches a direct computation; configs round-trip."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from helpers import ragged, simulate_small
from nar4rec.data.features import FeatureSpace
from nar4rec.data.loader import RequestLoader
from nar4rec.models.prm import PRM, PRMConfig, softmax_loss


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("prm") / "data"
    simulate_small(out, requests=200, n_candidates=12, list_length=4)
    space = FeatureSpace.fit([out / "train.parquet"])
    batch = next(iter(RequestLoader([out / "train.parquet"], space, batch_size=16)))
    return space, batch


def build(space: FeatureSpace, **overrides) -> PRM:
    torch.manual_seed(0)
    config = PRMConfig(list_length=4, d_model=16, embedding_dim=4, heads=2, **overrides)
    return PRM(config, space).eval()


def permute_candidates(batch, permutation: torch.Tensor):
    """The same requests with candidate j moved to column inverse[j]: `permutation` (B, n)
    lists, for each new column, the old column it takes."""
    def take(x):
        index = permutation.view(*permutation.shape, *([1] * (x.dim() - 2))).expand_as(x)
        return x.gather(1, index)
    inverse = permutation.argsort(1)                                   # old column -> new
    return dataclasses.replace(
        batch, cand_cat=take(batch.cand_cat), cand_num=take(batch.cand_num),
        upstream_score=take(batch.upstream_score), cand_mask=take(batch.cand_mask),
        exposed=inverse.gather(1, batch.exposed.clamp(min=0)))


@pytest.mark.parametrize("personalised_vector", [True, False])
def test_permuting_candidates_permutes_the_logits(small, personalised_vector):
    space, full = small
    batch = ragged(full, [12, 7, 3, 12, 1])                            # padding included
    model = build(space, personalised_vector=personalised_vector)
    permutation = torch.stack([torch.randperm(12, generator=torch.Generator().manual_seed(r))
                               for r in range(len(batch))])            # (B, n)
    moved = permute_candidates(batch, permutation)
    K = model.head.out_features
    with torch.no_grad():
        expected = model(batch).gather(1, permutation[..., None].expand(-1, -1, K))
        got = model(moved)                                             # (B, n, K)
    real = moved.cand_mask
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.logged_click(moved), model.logged_click(batch))
    lists = model.rerank(moved).lists                                  # new columns
    old = permutation.gather(1, lists.clamp(min=0)).masked_fill(lists < 0, -1)
    assert torch.equal(old, model.rerank(batch).lists)


def test_narrower_padding_changes_nothing(small):
    space, full = small
    batch = ragged(full, [7, 5])
    narrow = ragged(full, [7])
    narrow = dataclasses.replace(                                      # width 7, not 12
        narrow, cand_cat=narrow.cand_cat[:, :7], cand_num=narrow.cand_num[:, :7],
        upstream_score=narrow.upstream_score[:, :7], cand_mask=narrow.cand_mask[:, :7],
        exposed=batch.exposed[:1])
    model = build(space)
    with torch.no_grad():
        torch.testing.assert_close(model(narrow)[0], model(batch)[0, :7], rtol=1e-5, atol=1e-5)


def test_softmax_loss_matches_a_direct_computation(small):
    space, full = small
    batch = ragged(full, [6, 4, 3])
    batch = dataclasses.replace(batch, exposed=torch.tensor([[3, 0, 5, 1], [2, 1, 0, 3],
                                                             [1, 2, 0, 0]]))
    feedback = torch.zeros_like(batch.feedback)
    feedback[0, 0, 0], feedback[0, 2, 0] = 1.0, 0.5                    # two clicks, unequal
    feedback[1, 3, 0] = 1.0
    if feedback.shape[-1] > 1:
        feedback[0, 2, 1] = 1.0                                        # request 2: none at all
    batch = dataclasses.replace(batch, feedback=feedback * batch.exposed_mask[..., None])
    K = feedback.shape[-1]
    weights = torch.arange(1, K + 1, dtype=torch.float32)
    logits = torch.randn(3, batch.cand_mask.shape[1], K, generator=torch.Generator().manual_seed(0))
    total, weight_sum = 0.0, 0.0
    for r in range(3):
        n = int(batch.cand_mask[r].sum())
        for b in range(K):
            target = torch.zeros(n)
            for position in range(int(batch.exposed_mask[r].sum())):
                target[batch.exposed[r, position]] += batch.feedback[r, position, b]
            if target.sum() == 0:
                continue
            log_p = torch.log_softmax(logits[r, :n, b], dim=0)
            total += float(weights[b] * -(target / target.sum() * log_p).sum())
            weight_sum += float(weights[b])
    assert float(softmax_loss(logits, batch, weights)) == pytest.approx(total / weight_sum,
                                                                        rel=1e-5)


def test_config_round_trips_and_validates():
    config = PRMConfig(loss="bce", personalised_vector=False, max_candidates=64)
    assert PRMConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config
    with pytest.raises(ValueError, match="heads.*loss"):
        PRMConfig(loss="listwise", d_model=10, heads=4)
    with pytest.raises(ValueError, match="max_candidates"):
        PRMConfig(max_candidates=0)


def test_bce_variant_trains_and_reranks(small):
    space, batch = small
    model = build(space, loss="bce").train()
    loss, logs = PRM.step(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and "bce" in logs
    ranking = model.eval().rerank(batch)
    assert ranking.lists.shape == (len(batch), 4) and ranking.exposure is None


def test_initial_position_reaches_the_scores(small):
    """Without the upstream score as a feature, the initial order still matters (through the
    position embedding): reversing it changes the logits."""
    space, full = small
    batch = ragged(full, [12, 9])
    reversed_order = dataclasses.replace(batch, upstream_score=-batch.upstream_score)
    model = build(space, use_upstream_score=False)
    with torch.no_grad():
        assert not torch.allclose(model(batch)[batch.cand_mask],
                                  model(reversed_order)[batch.cand_mask], atol=1e-4)
