"""PIER specifics: SimHash ranks like the cosine it stands for; OCPM's attention is distance
aware and sees both sides of an item; rerank shows OCPM's best of the permutations FPSM keeps;
Plackett-Luce draws are valid lists; FPSM's loss leaves OCPM's embeddings alone; configs
round-trip and the hash projection is saved."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from scipy.stats import spearmanr

from helpers import ragged, simulate_small
from nar4rec.data.features import FeatureSpace
from nar4rec.data.loader import RequestLoader
from nar4rec.decode import NO_ITEM
from nar4rec.models.base import top_m
from nar4rec.models.evaluator import predicted_list_utility
from nar4rec.models.pier import (
    PIER,
    PIERConfig,
    PIEROutput,
    hash_similarity,
    plackett_luce,
    simhash,
)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("pier") / "data"
    simulate_small(out, requests=200, n_candidates=12, list_length=4)
    space = FeatureSpace.fit([out / "train.parquet"])
    batch = next(iter(RequestLoader([out / "train.parquet"], space, batch_size=16)))
    return space, batch


def build(space: FeatureSpace, **overrides) -> PIER:
    torch.manual_seed(0)
    settings = {"list_length": 4, "d_model": 16, "embedding_dim": 4, "heads": 2,
                "permutations": 24, "train_permutations": 8, "top_k": 4, **overrides}
    return PIER(PIERConfig(**settings), space).eval()


def test_simhash_ranks_vectors_like_cosine():
    generator = torch.Generator().manual_seed(0)
    d, bits = 32, 64
    planes = torch.randn(d, bits, generator=generator)
    correlations = []
    for _ in range(20):
        query = torch.randn(d, generator=generator)
        mix = torch.rand(200, 1, generator=generator) * 2 - 1            # cosines over [-1, 1]
        vectors = mix * query + (1 - mix.abs()) * torch.randn(200, d, generator=generator)
        cosine = torch.nn.functional.cosine_similarity(vectors, query[None], dim=-1)
        equal_bits = hash_similarity(simhash(query, planes)[None], simhash(vectors, planes))
        correlations.append(spearmanr(cosine.numpy(), equal_bits.numpy())[0])
    assert sum(correlations) / len(correlations) > 0.8
    assert hash_similarity(simhash(query, planes), simhash(query, planes)) == bits


def test_distance_bias_is_used_and_attention_sees_both_sides(small):
    space, full = small
    batch = ragged(full, [12, 9])
    model = build(space)
    lists = torch.tensor([[[0, 1, 2, 3]], [[4, 5, 6, 7]]])               # (B, 1, m)
    mask = torch.ones_like(lists, dtype=torch.bool)
    with torch.no_grad():
        items, user = model.embed(batch)
        before = model.ocpm(items, user, lists, mask)                   # (B, 1, m, K)
        model.blocks[0].attention.distance_bias[:, 3] += 2.0            # favour far items
        after = model.ocpm(items, user, lists, mask)
        assert not torch.allclose(before, after, atol=1e-5)
        later_changed = lists.clone()
        later_changed[:, :, 3] = 8                                      # only the last item
        changed = model.ocpm(items, user, later_changed, mask)
    # the first item's prediction depends on an item after it (a causal model's would not)
    assert not torch.allclose(after[:, :, 0], changed[:, :, 0], atol=1e-5)


def test_rerank_shows_ocpm_best_of_the_kept_permutations(small):
    space, full = small
    batch = ragged(full, [12, 9, 5, 3, 12, 12])
    model = build(space)
    with torch.no_grad():
        items, user = model.embed(batch)
        scores, lists = model.proposals(batch, items, user)             # (B, P, m)
        kept = model.select(items, user, lists)                         # (B, k)
        utility = predicted_list_utility(model.ocpm(items, user, lists, lists >= 0),
                                         model.weights, lists >= 0)     # (B, P)
    ranking = model.rerank(batch)
    torch.testing.assert_close(ranking.scores, scores)
    assert lists.shape == (len(batch), 24, 4) and kept.shape == (len(batch), 4)
    for row in range(len(batch)):
        generated = [p for p in range(lists.shape[1])
                     if torch.equal(lists[row, p], ranking.lists[row])]
        assert generated                                                # one of the P
        kept_rows = kept[row].tolist()
        best = max(kept_rows, key=lambda p: float(utility[row, p]))
        assert torch.equal(ranking.lists[row], lists[row, best])        # OCPM's best kept
    assert torch.equal(lists[:, 0], top_m(batch.upstream_score, batch.cand_mask, 4))


def test_plackett_luce_draws_valid_lists_with_the_right_first_item():
    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 5.0], [0.5, 0.0, -0.5, 0.0, 0.0]])
    cand_mask = torch.tensor([[True, True, True, True, False], [True, True, False, False, False]])
    uniforms = torch.rand(2, 4000, 3, generator=generator)
    lists = plackett_luce(logits, cand_mask, uniforms)                  # (B, S, m)
    assert (lists[1, :, 2] == NO_ITEM).all() and (lists[1, :, :2] >= 0).all()
    assert (lists[0] != 4).all() and (lists[0] >= 0).all()              # never padding
    assert (lists[0, :, 0] != lists[0, :, 1]).all() and (lists[0, :, 1] != lists[0, :, 2]).all()
    assert (lists[0, :, 0] != lists[0, :, 2]).all()
    first = torch.bincount(lists[0, :, 0], minlength=4)[:4].float() / 4000
    torch.testing.assert_close(first, logits[0, :4].softmax(0), atol=0.03, rtol=0)


def test_fpsm_loss_trains_fpsm_only(small):
    space, batch = small
    model = build(space).train()
    outputs = model(batch)
    outputs = PIEROutput(outputs.logits.detach(), outputs.similarity, outputs.utility)
    loss, logs = model.loss(outputs, batch)                             # FPSM's part only
    assert set(logs) == {"bce", "fpsm"}
    loss.backward()
    assert model.pool_key.weight.grad.abs().sum() > 0
    assert model.interest.net[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.candidates.parameters())
    assert all(p.grad is None for p in model.blocks.parameters())


def test_config_round_trips_validates_and_the_projection_is_saved(small):
    space, _ = small
    config = PIERConfig(permutations=32, top_k=4, proposal="model", temperature=0.3)
    assert PIERConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config
    with pytest.raises(ValueError, match="top_k.*temperature.*proposal"):
        PIERConfig(permutations=4, top_k=8, temperature=0.0, proposal="beam")
    with pytest.raises(ValueError, match="train_permutations"):
        PIERConfig(train_permutations=1)
    model = build(space)
    assert "hash_planes" in model.state_dict()
    torch.manual_seed(123)                                              # any global RNG state
    other = PIER(model.config, space)
    assert torch.equal(other.hash_planes, model.hash_planes)
