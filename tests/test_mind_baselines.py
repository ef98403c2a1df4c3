"""Every baseline learns on real data: the converted MIND sample.

MIND shows every candidate (n = m, up to 276 news per impression) and logs one behaviour, the
click. The sample is converted with `split="impression"`: 10 % of the impressions to valid and
10 % to test by a hash of their id, all five days mixed, so that the held-out impressions' news
were shown in training (98 % of them) and a news item's id carries its click rate. Split by
day, most of the held-out days' news are new and 97 % of the sample's news have no row in its
news.tsv, so the models are only 1 to 4 standard errors above random lists there
(docs/baselines.md).

Every impression's candidates are shuffled, in training and in the held-out impressions: MIND
lists them in the order shown, and no model may learn from where a candidate sits or gain from
ties broken by index. Each baseline trains one epoch on the training impressions (its loss must
fall), reranks the held-out ones (valid and test; nothing is tuned on either) into valid lists
of 10, and must beat random lists: NDCG@10 of the clicks, paired over the held-out impressions
with a click, above the mean of 16 random lists by more than 3 standard errors. Skipped
without ../shared.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nar4rec import metrics
from nar4rec.data.batch import UNKNOWN, RequestBatch
from nar4rec.data.features import FeatureSpace
from nar4rec.data.loader import RequestLoader
from nar4rec.data.mind import prepare_mind
from nar4rec.models import BASELINES
from nar4rec.models.base import ListModel, top_m
from test_baselines import build, check_lists

pytestmark = pytest.mark.usefixtures("one_thread")

LIST_LENGTH = 10
RANDOM_LISTS = 16


def clicks(batch: RequestBatch) -> torch.Tensor:
    """(B, n) each candidate's logged click: MIND shows every candidate."""
    return batch.candidate_feedback()[..., 0]


@pytest.fixture(scope="module")
def mind(shared_data, tmp_path_factory):
    sample = shared_data / "mind-sample"
    out = tmp_path_factory.mktemp("mind-baselines")
    prepare_mind([sample / "behaviors.tsv"], sample / "news.tsv", out, split="impression")
    space = FeatureSpace.fit([out / "train.parquet"])
    mixer = torch.Generator().manual_seed(0)
    train = [batch.shuffled(mixer) for batch in RequestLoader(
        [out / "train.parquet"], space, batch_size=64, shuffle=True, seed=0)]
    held_out = [batch.shuffled(mixer) for batch in RequestLoader(
        [out / "valid.parquet", out / "test.parquet"], space, batch_size=256)]
    draws = torch.Generator().manual_seed(1)
    random = [np.mean([metrics.list_ndcg(top_m(torch.rand(b.cand_mask.shape, generator=draws),
                                                 b.cand_mask, LIST_LENGTH), clicks(b))
                       for _ in range(RANDOM_LISTS)], axis=0) for b in held_out]
    return {"space": space, "train": train, "held_out": held_out, "random": random}


def test_the_held_out_news_were_seen_in_training(mind):
    items = torch.cat([b.cand_cat[..., 0][b.cand_mask] for b in mind["held_out"]])
    assert (items != UNKNOWN).float().mean() > 0.9
    assert sum(len(b) for b in mind["held_out"]) > 0.15 * sum(len(b) for b in mind["train"])


@pytest.mark.parametrize("name", list(BASELINES))
def test_learns_on_the_mind_sample(mind, name):
    model = build(name, mind["space"], LIST_LENGTH).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for batch in mind["train"]:
        loss, _ = ListModel.step(model, batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    quarter = len(losses) // 4
    assert sum(losses[-quarter:]) < sum(losses[:quarter]), f"{name}: {losses}"
    model.eval()
    gains, random = [], []
    with torch.no_grad():
        for batch, chance in zip(mind["held_out"], mind["random"], strict=True):
            lists = model.rerank(batch).lists
            check_lists(lists, batch, LIST_LENGTH)
            click = model.logged_click(batch)
            assert click.shape == batch.exposed.shape
            assert ((click >= 0) & (click <= 1))[batch.exposed_mask].all()
            observed = clicks(batch)
            clicked = (observed.sum(1) > 0).numpy()
            gains.append(metrics.list_ndcg(lists, observed)[clicked])
            random.append(chance[clicked])
    mine, chance = np.concatenate(gains), np.concatenate(random)
    difference = mine - chance
    standard_error = difference.std(ddof=1) / np.sqrt(len(difference))
    assert difference.mean() > 3 * standard_error, \
        f"{name}: NDCG@10 {mine.mean():.3f} vs random {chance.mean():.3f}"
