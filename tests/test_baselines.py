"""Every registered baseline through the one interface: a training step, a rerank, and learning.

Each model must (a) train: a finite loss whose gradient reaches its parameters, (b) rerank:
valid lists (no repeats, no padding, NO_ITEM only past a short request's end), scores -inf on
padding, exposure probabilities in [0, 1], logged click probabilities in [0, 1], all
independent of the batch a request sits in, and (c) learn: after a short training its lists'
true utility on the simulator beats random lists by a clear, paired margin, on the kuaishou,
avito and movielens presets (tests/test_mind_baselines.py: on real data, the MIND sample).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from helpers import ragged, simulate_small
from nar4rec import metrics
from nar4rec.data.batch import RequestBatch
from nar4rec.data.features import FeatureSpace
from nar4rec.data.loader import RequestLoader
from nar4rec.decode import NO_ITEM
from nar4rec.models import BASELINES, baseline
from nar4rec.models.base import ListModel, top_m
from nar4rec.sim.world import World

SMALL = {"d_model": 32, "embedding_dim": 8}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def kuaishou(tmp_path_factory):
    out = tmp_path_factory.mktemp("baselines") / "data"
    simulate_small(out, requests=4000, n_candidates=20, list_length=5)
    space = FeatureSpace.fit([out / "train.parquet"])
    return {"out": out, "space": space, "world": World.load(out),
            "train": list(RequestLoader([out / "train.parquet"], space, batch_size=64,
                                        shuffle=True, seed=0)),
            "test": next(iter(RequestLoader([out / "test.parquet"], space, batch_size=400)))}


@pytest.fixture(scope="module")
def avito(tmp_path_factory):
    out = tmp_path_factory.mktemp("baselines-avito") / "data"
    simulate_small(out, preset="avito", requests=600)
    space = FeatureSpace.fit([out / "train.parquet"])
    return {"space": space,
            "train": next(iter(RequestLoader([out / "train.parquet"], space, batch_size=32)))}


def build(name: str, space: FeatureSpace, list_length: int, **overrides) -> ListModel:
    model_class, config_class = baseline(name)
    fields = {f.name for f in dataclasses.fields(config_class)}
    settings = {k: v for k, v in {**SMALL, **overrides}.items() if k in fields}
    torch.manual_seed(0)
    return model_class(config_class(list_length=list_length, **settings), space)


def check_lists(lists: torch.Tensor, batch: RequestBatch, m: int) -> None:
    assert lists.shape == (len(batch), m) and lists.dtype == torch.long
    placed = lists >= 0
    n_real = batch.cand_mask.sum(1)
    assert torch.equal(placed.sum(1), n_real.clamp(max=m))             # full, or all it has
    assert not (placed[:, 1:] & ~placed[:, :-1]).any()                  # NO_ITEM only at the end
    assert batch.cand_mask.gather(1, lists.clamp_min(0))[placed].all()  # never padding
    for row in lists.tolist():
        real = [i for i in row if i != NO_ITEM]
        assert len(real) == len(set(real))                              # never twice


@pytest.mark.parametrize("name", list(BASELINES))
def test_one_training_step_reaches_every_parameter(kuaishou, name):
    model = build(name, kuaishou["space"], 5).train()
    loss, logs = ListModel.step(model, kuaishou["train"][0])
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(isinstance(v, float) for v in logs.values())
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    reached = [p for p in trained if p.grad is not None and p.grad.abs().sum() > 0]
    # Embedding rows of ids absent from the batch get no gradient; whole tensors must.
    assert len(reached) >= 0.8 * len(trained), \
        f"{len(trained) - len(reached)} of {len(trained)} parameter tensors got no gradient"


@pytest.mark.parametrize("name", list(BASELINES))
def test_rerank_gives_valid_lists_on_ragged_requests(kuaishou, name):
    model = build(name, kuaishou["space"], 5).eval()
    batch = ragged(kuaishou["train"][0], [20, 9, 5, 3, 1])
    ranking = model.rerank(batch)
    check_lists(ranking.lists, batch, 5)
    assert ranking.scores.shape == batch.cand_mask.shape
    assert torch.isneginf(ranking.scores[~batch.cand_mask]).all()
    assert torch.isfinite(ranking.scores[batch.cand_mask]).all()
    if ranking.exposure is not None:
        assert ((ranking.exposure >= 0) & (ranking.exposure <= 1)).all()
        assert (ranking.exposure[~batch.cand_mask] == 0).all()
    click = model.logged_click(batch)
    assert click.shape == batch.exposed.shape
    assert ((click >= 0) & (click <= 1)).all()
    # A request's list does not depend on the other requests of its batch.
    alone = model.rerank(ragged(kuaishou["train"][0], [20])).lists
    assert torch.equal(alone[0], ranking.lists[0])


@pytest.mark.parametrize("name", list(BASELINES))
def test_trains_and_reranks_lists_of_n_equal_m(avito, name):
    """The avito protocol: every candidate is shown (n = m); lists are permutations."""
    batch = avito["train"]
    m = batch.exposed.shape[1]
    model = build(name, avito["space"], m).train()
    loss, _ = ListModel.step(model, batch)
    loss.backward()
    model.eval()
    ranking = model.rerank(batch)
    check_lists(ranking.lists, batch, m)
    assert model.logged_click(batch).shape == batch.exposed.shape


@pytest.fixture(scope="module", params=["kuaishou", "avito", "movielens"])
def preset(request, tmp_path_factory):
    """Each preset, small: kuaishou (n 20 > m 5, five behaviours), avito (n = m = 5, one
    click, order only), movielens (n 20 > m 5, MovieLens-100K's users and movies; skipped
    without ../shared)."""
    name = request.param
    if name == "kuaishou":
        return request.getfixturevalue("kuaishou")
    out = tmp_path_factory.mktemp(f"learns-{name}") / "data"
    if name == "avito":
        simulate_small(out, preset="avito", requests=4000)
    else:
        ml = request.getfixturevalue("shared_data") / "ml-100k"
        simulate_small(out, preset="movielens", requests=4000, n_candidates=20, list_length=5,
                       movielens_dir=str(ml))
    space = FeatureSpace.fit([out / "train.parquet"])
    return {"space": space, "world": World.load(out),
            "train": list(RequestLoader([out / "train.parquet"], space, batch_size=64,
                                        shuffle=True, seed=0)),
            "test": next(iter(RequestLoader([out / "test.parquet"], space, batch_size=400)))}


@pytest.mark.parametrize("name", list(BASELINES))
def test_learns_to_beat_random_lists(preset, name):
    """After 2 epochs on 3,200 requests, the true utility of the model's lists beats random
    lists by more than 3 standard errors of the paired difference, on every preset."""
    m = preset["test"].exposed.shape[1]
    model = build(name, preset["space"], m).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(2):
        for batch in preset["train"]:
            loss, _ = ListModel.step(model, batch)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    test, world = preset["test"], preset["world"]
    chosen = metrics.list_utility(world, test, model.rerank(test).lists)
    generator = torch.Generator().manual_seed(1)
    random_scores = torch.rand(test.cand_mask.shape, generator=generator)
    random = metrics.list_utility(world, test, top_m(random_scores, test.cand_mask, m))
    difference = chosen - random
    standard_error = difference.std(ddof=1) / np.sqrt(len(difference))
    assert difference.mean() > 3 * standard_error, \
        f"{name}: {chosen.mean():.3f} vs random {random.mean():.3f}"


@pytest.mark.parametrize("name", list(BASELINES))
def test_logged_lists_longer_than_the_training_ones(kuaishou, name):
    """A test or serving request may show a longer list than any training request (MIND's test
    split does): positions past the model's list_length share its last position row."""
    model = build(name, kuaishou["space"], 3).eval()
    batch = kuaishou["train"][0]                                    # logged lists of 5
    loss, _ = ListModel.step(model, batch)
    assert torch.isfinite(loss)
    click = model.logged_click(batch)
    assert click.shape == batch.exposed.shape and torch.isfinite(click).all()
    check_lists(model.rerank(batch).lists, batch, 3)
