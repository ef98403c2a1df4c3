"""Every baseline trains and reranks on real data: the converted MIND sample.

MIND shows every candidate (n = m, up to 276 news per impression, longer in the later days
than any training impression) and logs one behaviour, the click. Each baseline trains for one
epoch on the sample's training days on every logged list, whole (positions past its list
length share the last position row), must fit them (its training loss falls), and reranks the
test days into valid lists of 10.

Whether the baselines *learn* on this sample (rank the clicked news above random lists) is not
asserted: 97 % of the sample's impressed news have no row in its news.tsv (../shared/data/
README.md), so their category is unknown and the user-category feature is 0 for 99.6 % of
candidates, 83 % of the test days' candidates are news unseen in training, and the only signal
left is the order in which an impression lists its news, which no reranker should learn from.
Skipped without ../shared.
"""

from __future__ import annotations

import pytest
import torch

from nar4rec.data.loader import FeatureSpace, RequestLoader
from nar4rec.data.mind import prepare_mind
from nar4rec.models import BASELINES
from nar4rec.models.base import ListModel
from test_baselines import build, check_lists

pytestmark = pytest.mark.usefixtures("one_thread")

LIST_LENGTH = 10


@pytest.fixture(scope="module")
def mind(shared_data, tmp_path_factory):
    sample = shared_data / "mind-sample"
    out = tmp_path_factory.mktemp("mind-baselines")
    prepare_mind([sample / "behaviors.tsv"], sample / "news.tsv", out)
    space = FeatureSpace.fit([out / "train.parquet"])
    return {"space": space,
            "train": list(RequestLoader([out / "train.parquet"], space, batch_size=64,
                                        shuffle=True, seed=0)),
            "test": list(RequestLoader([out / "test.parquet"], space, batch_size=256))}


@pytest.mark.parametrize("name", list(BASELINES))
def test_trains_and_reranks_the_mind_sample(mind, name):
    model = build(name, mind["space"], LIST_LENGTH).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for batch in mind["train"]:
        loss, _ = ListModel.step(model, batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    quarter = len(losses) // 4
    assert sum(losses[-quarter:]) < sum(losses[:quarter]), f"{name}: {losses}"
    model.eval()
    longest = 0
    with torch.no_grad():
        for batch in mind["test"]:
            check_lists(model.rerank(batch).lists, batch, LIST_LENGTH)
            click = model.logged_click(batch)
            assert click.shape == batch.exposed.shape
            assert ((click >= 0) & (click <= 1))[batch.exposed_mask].all()
            longest = max(longest, batch.exposed.shape[1])
    assert longest > max(batch.exposed.shape[1] for batch in mind["train"])
