"""Seq2Slate's own properties: teacher forcing equals step-by-step decoding, the supervised loss
is the paper's, beam search finds the model's most probable list when it is wide enough, and
the config round-trips."""

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
from nar4rec.models.seq2slate import Seq2Slate, Seq2SlateConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("seq2slate") / "data"
    simulate_small(out, requests=300, n_candidates=12, list_length=4)
    space = FeatureSpace.fit([out / "train.parquet"])
    batch = next(iter(RequestLoader([out / "train.parquet"], space, batch_size=32)))
    return space, batch


def build(space: FeatureSpace, **overrides) -> Seq2Slate:
    torch.manual_seed(0)
    config = Seq2SlateConfig(**{"list_length": 4, "d_model": 16, "embedding_dim": 8,
                                **overrides})
    return Seq2Slate(config, space).eval()


def list_log_prob(model: Seq2Slate, batch: RequestBatch, lists: torch.Tensor) -> torch.Tensor:
    """(B,) sum_j log p_j(y_j) of the lists (B, m) by teacher forcing."""
    placed = lists >= 0
    with torch.no_grad():
        log_p = model.forced(batch, lists.clamp_min(0), placed)
        log_p = log_p.gather(2, lists.clamp_min(0)[..., None]).squeeze(-1)  # (B, m)
    return (log_p * placed).sum(1)


@pytest.mark.parametrize("target", ["labels", "sequence"])
def test_teacher_forcing_equals_step_by_step_decoding(data, target):
    space, batch = data
    model = build(space, target=target)
    with torch.no_grad():
        forced = model(batch)                                           # (B, S, n)
        target, real, _ = model.targets(batch)
        items, keys, state = model.encode(batch)
        inputs = model.go.expand(len(items), 1, items.shape[-1])
        chosen = ~batch.cand_mask
        for step in range(target.shape[1]):
            out, state = model.decoder(inputs, state)
            log_p = model.point(keys, out, chosen[:, None])[:, 0]       # (B, n)
            rows = real[:, step]
            torch.testing.assert_close(forced[rows, step], log_p[rows])
            picked = target[:, step]
            chosen = chosen.clone()
            chosen[torch.arange(len(picked)), picked] |= rows
            inputs = items.gather(1, picked[:, None, None].expand(-1, 1, items.shape[-1]))
    assert real.any()


def test_the_labels_loss_targets_the_utility_left_at_each_step(data):
    """At step j the target is the utilities of the items not placed yet, normalised (Seq2Slate
    section 4.2); steps with none left add nothing, so the logged order of the items without
    utility does not count (it does with target="sequence")."""
    space, batch = data
    model = build(space)
    torch.manual_seed(0)
    one = ragged(batch, [12])                     # 4 distinct candidates shown
    a, b, c, d = one.exposed[0].tolist()
    weight = model.weights[0].item()
    assert weight > 0
    feedback = torch.zeros_like(one.feedback)
    feedback[0, 1, 0], feedback[0, 3, 0] = 2 / weight, 1 / weight  # utilities 0, 2, 0, 1
    one = dataclasses.replace(one, feedback=feedback)
    loss, _ = model.loss(model(one), one)
    with torch.no_grad():
        log_p = model.forced(one, torch.tensor([[b, d]]), torch.ones(1, 2, dtype=torch.bool))[0]
    expected = -((2 * log_p[0, b] + log_p[0, d]) / 3 + log_p[1, d]) / 2
    torch.testing.assert_close(loss, expected)
    swapped = dataclasses.replace(one, exposed=one.exposed[:, [2, 1, 0, 3]])   # c, b, a, d
    torch.testing.assert_close(model.loss(model(swapped), swapped)[0], loss)
    sequence = build(space, target="sequence")
    assert sequence.loss(sequence(swapped), swapped)[0] != sequence.loss(sequence(one), one)[0]


def test_decoded_log_prob_matches_teacher_forcing(data):
    space, batch = data
    model = build(space)
    decoded = model.decode(batch, width=3)
    torch.testing.assert_close(decoded.log_prob, list_log_prob(model, batch, decoded.lists))


def test_wide_beam_finds_the_most_probable_list(data):
    """4 candidates, m = 3: 24 lists, so 24 beams search them all; beam search then equals
    brute force and never scores below greedy (width 1)."""
    space, batch = data
    model = build(space, list_length=3)
    small = ragged(batch, [4] * 8)
    lists = torch.tensor(list(itertools.permutations(range(4), 3)))     # (24, 3)
    every = torch.stack([list_log_prob(model, small, row.expand(len(small), 3))
                         for row in lists], dim=1)                      # (B, 24)
    greedy = model.decode(small, width=1)
    beam = model.decode(small, width=24)
    torch.testing.assert_close(beam.log_prob, every.max(1).values)
    assert torch.equal(beam.lists, lists[every.argmax(1)])
    assert (beam.log_prob >= greedy.log_prob - 1e-6).all()


def test_exposure_sums_the_path_probabilities(data):
    space, batch = data
    model = build(space, list_length=3)
    small = ragged(batch, [12, 5, 2, 1])
    ranking = model.rerank(small)
    # Before clipping each decoding step with a candidate left adds one unit of probability.
    steps = small.cand_mask.sum(1).clamp(max=3).float()
    assert (ranking.exposure.sum(1) <= steps + 1e-5).all()
    placed = ranking.lists >= 0
    on_path = ranking.exposure.gather(1, ranking.lists.clamp_min(0))[placed]
    assert (on_path > 0).all()
    # The list comes first in the scores, in its order.
    top = ranking.scores.argsort(1, descending=True)[:, :3]
    assert torch.equal(top[placed], ranking.lists[placed])


def test_loss_without_positive_lists_is_zero_with_a_graph(data):
    space, batch = data
    model = build(space).train()
    silent = dataclasses.replace(batch, feedback=torch.zeros_like(batch.feedback))
    loss, logs = model.loss(model(silent), silent)
    assert loss.item() == 0.0 and logs == {"ce": 0.0}
    loss.backward()
    everyone = build(space, target="sequence", positive_only=False).train()
    loss, _ = everyone.loss(everyone(silent), silent)
    assert loss.item() > 0


def test_config_round_trips_and_validates():
    config = Seq2SlateConfig(decoding="beam", beam_width=2)
    assert Seq2SlateConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config
    with pytest.raises(ValueError, match="decoding.*; target.*; beam_width"):
        Seq2SlateConfig(decoding="sample", target="slate", beam_width=0)
