"""Edge-rerank: the causal context of its item model, and its beam search against greedy and
brute-force construction under the same model."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch

from helpers import ragged, simulate_small
from nar4rec.data.batch import RequestBatch
from nar4rec.data.features import FeatureSpace
from nar4rec.data.loader import RequestLoader
from nar4rec.decode import NO_ITEM
from nar4rec.models.base import ListModel, logged_index, predicted_utility
from nar4rec.models.edge_rerank import EdgeRerank, EdgeRerankConfig

SMALL = dict(d_model=16, heads=2, hidden=(32,), embedding_dim=8, list_length=5)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("edge-rerank") / "data"
    simulate_small(out, requests=800, n_candidates=12, list_length=5)
    space = FeatureSpace.fit([out / "train.parquet"])
    batches = list(RequestLoader([out / "train.parquet"], space, batch_size=64, seed=0))
    return space, batches


def trained(space: FeatureSpace, batches: list[RequestBatch], **overrides) -> EdgeRerank:
    """A model after a few steps, so that its utilities differ between lists."""
    torch.manual_seed(0)
    model = EdgeRerank(EdgeRerankConfig(**{**SMALL, **overrides}), space)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for batch in batches[:8]:
        loss, _ = ListModel.step(model, batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def with_beam(model: EdgeRerank, **search) -> EdgeRerank:
    model.config = dataclasses.replace(model.config, **search)
    return model


def list_utility(model: EdgeRerank, batch: RequestBatch, lists: torch.Tensor) -> torch.Tensor:
    """(B,) the model's summed predicted utility of `lists` (B, m), each item in its prefix."""
    shown = dataclasses.replace(batch, exposed=lists.clamp_min(0), exposed_mask=lists >= 0)
    with torch.no_grad():
        utility = predicted_utility(model(shown), model.weights)      # (B, m)
    return (utility * shown.exposed_mask).sum(1)


def test_config_round_trips_and_validates():
    config = EdgeRerankConfig(hidden=[64, 32], prune_margin=0.1)
    assert config.hidden == (64, 32)
    assert EdgeRerankConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config
    with pytest.raises(ValueError, match="beam_width.*prune_margin|heads"):
        EdgeRerankConfig(d_model=10, heads=4, beam_width=0, prune_margin=-1.0)


def test_training_prediction_equals_explicit_prefix(data):
    space, batches = data
    model = trained(space, batches)
    batch = batches[0]
    with torch.no_grad():
        logits = model(batch)                                          # (B, M, K)
        items, user = model.items(batch, logged_index(batch))          # (B, M, d)
        for j in range(items.shape[1]):
            keys, padding = model.context(items[:, :j], batch.exposed_mask[:, :j])
            query = items[:, j:j + 1] + model.slots.weight[j]
            explicit = model.logits_of(query, user, keys, padding)[:, 0]   # (B, K)
            real = batch.exposed_mask[:, j]
            assert torch.allclose(explicit[real], logits[real, j], atol=1e-5)
    # Replace, in every request, one logged item by a candidate not in its list: slot 3
    # changes nothing above it, slot 1 changes what every later slot sees.
    in_list = torch.zeros_like(batch.cand_mask).scatter(1, batch.exposed, True)
    outsider = (~in_list & batch.cand_mask).float().argmax(1)         # (B,)
    for changed in (3, 1):
        exposed = batch.exposed.clone()
        exposed[:, changed] = outsider
        with torch.no_grad():
            moved = model(dataclasses.replace(batch, exposed=exposed))
        assert torch.allclose(moved[:, :changed], logits[:, :changed], atol=1e-6)
        assert not torch.allclose(moved[:, changed + 1:], logits[:, changed + 1:], atol=1e-4)


def greedy(model: EdgeRerank, batch: RequestBatch) -> torch.Tensor:
    """Plain greedy construction: at each slot the unused candidate of highest utility given
    the explicit prefix."""
    m = model.config.list_length
    available = batch.cand_mask.clone()
    lists = torch.full((len(batch), m), NO_ITEM, dtype=torch.long)
    rows = torch.arange(len(batch))
    with torch.no_grad():
        items, user = model.items(batch)                               # (B, n, d)
        for j in range(m):
            prefix = lists[:, :j]
            keys, padding = model.context(items[rows[:, None], prefix.clamp_min(0)], prefix >= 0)
            logits = model.logits_of(items + model.slots.weight[j], user, keys, padding)
            utility = predicted_utility(logits, model.weights).masked_fill(~available, -torch.inf)
            best = utility.argmax(1)
            picked = torch.where(available.any(1), best, NO_ITEM)
            lists[:, j] = picked
            available[rows, picked.clamp_min(0)] &= picked < 0
    return lists


def test_width_one_is_greedy_and_wider_beams_do_better(data):
    space, batches = data
    model = trained(space, batches)
    batch = batches[1]
    short = ragged(batch, [12, 7, 4, 2, 1])
    for sample in (batch, short):
        assert torch.equal(with_beam(model, beam_width=1).rerank(sample).lists,
                           greedy(model, sample))
    # a tiny relative margin keeps only the best expansion: the adaptive search is then greedy
    narrow = with_beam(model, beam_width=4, prune_margin=1e-9).rerank(batch).lists
    assert torch.equal(narrow, greedy(model, batch))
    utility = {width: list_utility(model, batch, with_beam(model, beam_width=width,
                                                          prune_margin=0.0).rerank(batch).lists)
               for width in (1, 4)}
    # Beam search does not promise every request a list at least as good as greedy's, but on
    # a batch it does better on average.
    assert utility[4].mean() >= utility[1].mean()
    assert (utility[4] >= utility[1] - 1e-5).float().mean() > 0.9


def test_exhaustive_beam_finds_the_best_permutation(data):
    """With 4 candidates and 24 beams, beam search enumerates every list: it must find the
    brute-force optimum of the model's list utility."""
    space, batches = data
    model = with_beam(trained(space, batches), beam_width=24, prune_margin=0.0)
    batch = ragged(batches[2], [4] * 16)
    found = list_utility(model, batch, model.rerank(batch).lists)
    best = torch.stack([
        list_utility(model, batch, torch.tensor([*order, NO_ITEM]).expand(16, 5))
        for order in itertools.permutations(range(4))], dim=1).amax(1)
    assert torch.allclose(found, best, atol=1e-5)
