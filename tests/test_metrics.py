"""Metrics against scikit-learn and hand-made cases; simulator utilities against the World."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import log_loss, ndcg_score, roc_auc_score

from helpers import simulate_small
from nar4rec.data.features import FeatureSpace
from nar4rec.data.loader import RequestLoader
from nar4rec.decode import NO_ITEM
from nar4rec.errors import Nar4recError
from nar4rec.metrics import (
    auc,
    behaviour_means,
    captured_lift,
    exposure_logloss,
    list_ndcg,
    list_utility,
    logloss,
    ndcg,
    ndcg_all_requests,
    recall_at_k,
    utility_report,
)
from nar4rec.sim.simulate import ORACLE_FILE
from nar4rec.sim.world import TRUTH_DIR, World


def padded_requests(seed: int, batch: int = 60, width: int = 8, min_real: int = 1):
    """Scores with many ties, graded labels 0..3 and a mask of min_real..width real items."""
    rng = np.random.default_rng(seed)
    scores = np.round(rng.random((batch, width)), 1)                          # ties
    labels = rng.integers(0, 4, (batch, width)) * (rng.random((batch, width)) < 0.4)
    real = rng.integers(min_real, width + 1, batch)
    mask = np.arange(width)[None, :] < real[:, None]
    labels[3] = 0                                                             # no positive
    return scores, labels, mask


def test_auc_equals_scikit_learn_with_ties_and_masks() -> None:
    scores, labels, mask = padded_requests(0)
    binary = labels > 0
    expected = roc_auc_score(binary[mask], scores[mask])
    assert auc(scores, binary, mask) == pytest.approx(expected, abs=1e-12)
    assert auc(torch.from_numpy(scores), torch.from_numpy(labels), torch.from_numpy(mask)) == \
        pytest.approx(expected, abs=1e-12)
    assert auc(scores, binary) == pytest.approx(roc_auc_score(binary.ravel(), scores.ravel()))
    assert math.isnan(auc(scores, np.ones_like(labels), mask))


def test_logloss_equals_scikit_learn() -> None:
    rng = np.random.default_rng(1)
    probs = rng.uniform(0.01, 0.99, (50, 6))
    labels = rng.random((50, 6)) < probs
    mask = rng.random((50, 6)) < 0.7
    expected = log_loss(labels[mask], probs[mask], labels=[False, True])
    assert logloss(probs, labels, mask) == pytest.approx(expected, rel=1e-10)
    assert logloss(torch.from_numpy(probs), torch.from_numpy(labels)) == \
        pytest.approx(log_loss(labels.ravel(), probs.ravel()), rel=1e-10)
    # Certain and wrong stays finite: clipped at eps.
    assert logloss(np.array([0.0, 1.0]), np.array([1.0, 0.0])) == pytest.approx(-math.log(1e-7))


@pytest.mark.parametrize("k", [None, 1, 3])
def test_ndcg_equals_scikit_learn_request_by_request(k: int | None) -> None:
    scores, labels, mask = padded_requests(2, min_real=2)
    per_request = np.array([ndcg_score(labels[row, mask[row]][None],
                                       scores[row, mask[row]][None], k=k)
                            for row in range(len(scores))])
    clicked = (labels * mask).sum(axis=1) > 0
    assert 0 < clicked.sum() < len(clicked)
    assert ndcg(scores, labels, mask, k=k) == \
        pytest.approx(per_request[clicked].mean(), abs=1e-12)
    assert ndcg_all_requests(scores, labels, mask, k=k) == \
        pytest.approx(per_request.mean(), abs=1e-12)
    full = ndcg_score(labels, scores, k=k)         # every request, those without a click at 0
    assert ndcg_all_requests(torch.from_numpy(scores), torch.from_numpy(labels), k=k) == \
        pytest.approx(full, abs=1e-12)
    positive = labels.sum(axis=1) > 0
    assert ndcg(torch.from_numpy(scores), torch.from_numpy(labels), k=k) == \
        pytest.approx(ndcg_score(labels[positive], scores[positive], k=k), abs=1e-12)


def test_ndcg_averages_over_the_requests_with_a_click() -> None:
    """A hand-made batch: two requests with a click, two without (one clicked only on a
    padded item, which does not count), one with no real item."""
    scores = np.array([[0.9, 0.5, 0.1],
                       [0.9, 0.5, 0.1],
                       [0.9, 0.5, 0.1],
                       [0.3, 0.2, 9.0],
                       [0.1, 0.2, 0.3]])
    labels = np.array([[1, 0, 0],        # click ranked first: 1
                       [0, 0, 1],        # click ranked last: 1 / log2(4) = 0.5
                       [0, 0, 0],        # no click
                       [0, 0, 1],        # the click is on padding: no click
                       [1, 1, 1]])       # no real item: left out of both means
    mask = np.array([[True] * 3, [True] * 3, [True] * 3, [True, True, False], [False] * 3])
    clicked = [0, 1]
    expected = np.mean([ndcg_score(labels[[row]], scores[[row]]) for row in clicked])
    assert expected == pytest.approx(0.75)
    assert ndcg(scores, labels, mask) == pytest.approx(expected)
    assert ndcg_all_requests(scores, labels, mask) == pytest.approx((1 + 0.5 + 0 + 0) / 4)
    assert ndcg(torch.from_numpy(scores), torch.from_numpy(labels), torch.from_numpy(mask)) \
        == pytest.approx(expected)
    # No click at all: nothing to rank, nan (not 0); the all-requests mean is 0.
    assert math.isnan(ndcg(scores[2:4], labels[2:4], mask[2:4]))
    assert ndcg_all_requests(scores[2:4], labels[2:4], mask[2:4]) == 0.0
    assert math.isnan(ndcg_all_requests(scores[4:], labels[4:], mask[4:]))


@pytest.mark.parametrize("k", [None, 2])
def test_list_ndcg_equals_scikit_learn_on_the_lists_order(k: int | None) -> None:
    """A list of 4 of 7 candidates (fewer where a request has fewer) scored as the ranking
    that puts it first in its order, the others after it."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, size=(40, 7)).astype(float)
    labels[5] = 0.0
    lists = np.stack([rng.permutation(7)[:4] for _ in range(40)])
    lists[7, 2:] = NO_ITEM                          # a request with two candidates
    labels[7, np.setdiff1d(np.arange(7), lists[7, :2])] = 0.0
    scores = np.zeros((40, 7))
    for row, chosen in enumerate(lists):
        placed = chosen[chosen >= 0]
        scores[row, placed] = np.arange(len(placed), 0, -1)
    cut = 4 if k is None else k
    expected = [ndcg_score(labels[row][None], scores[row][None], k=cut)
                for row in range(40)]
    got = list_ndcg(torch.from_numpy(lists), labels, k=k)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert got[5] == 0.0 and 0 < got.mean() < 1


def test_ndcg_conventions() -> None:
    # scikit-learn scores a request with no positive label 0, and it counts in its mean: in
    # ndcg_all_requests' too, not in ndcg's.
    assert ndcg_score([[0, 0, 0]], [[0.3, 0.2, 0.1]]) == 0.0
    scores = np.array([[0.3, 0.2, 0.1], [0.1, 0.2, 0.3]])
    labels = np.array([[0, 0, 0], [0, 0, 2]])
    assert ndcg_all_requests(scores, labels) == pytest.approx(0.5)
    assert ndcg(scores, labels) == pytest.approx(1.0)
    # Padded items neither rank nor gain, even scored high; a request with no real item is
    # left out.
    mask = np.array([[True, False, True], [False, False, False]])
    assert ndcg(np.array([[0.1, 9.0, 0.2], [1, 2, 3]]), np.array([[1, 5, 0], [1, 1, 1]]),
                mask) == pytest.approx(1 / math.log2(3))
    with pytest.raises(ValueError, match=">= 0"):
        ndcg(scores, -labels)


def test_recall_at_k_by_hand() -> None:
    scores = np.array([[0.9, 0.1, 0.5, 0.3, 9.9],     # candidate 4 is padding
                       [0.2, 0.4, 0.6, 0.8, 1.0],
                       [0.5, 0.5, 0.5, 0.5, 0.5]])
    cand_mask = np.array([[True, True, True, True, False], [True] * 5, [True] * 5])
    exposed = np.array([[0, 1, 3], [4, 0, 0], [3, 4, 0]])
    exposed_mask = np.array([[True, True, True], [True, False, False], [False, False, False]])
    # Request 0: top 2 are {0, 2}, exposed {0, 1, 3}: 1/3. Request 1: top 2 are {4, 3}: 1/1.
    # Request 2 shows nothing and is left out.
    assert recall_at_k(scores, exposed, exposed_mask, cand_mask, k=2) == \
        pytest.approx((1 / 3 + 1) / 2)
    assert recall_at_k(scores, exposed, exposed_mask, cand_mask, k=3) == \
        pytest.approx((2 / 3 + 1) / 2)
    # Ties go to the lower candidate index.
    tied = recall_at_k(scores[2:], np.array([[0, 4]]), np.array([[True, True]]),
                       cand_mask[2:], k=1)
    assert tied == pytest.approx(0.5)


def test_recall_at_k_properties() -> None:
    rng = np.random.default_rng(3)
    batch, n, m = 80, 12, 4
    scores = rng.random((batch, n))
    real = rng.integers(m, n + 1, batch)
    cand_mask = np.arange(n)[None, :] < real[:, None]
    exposed = np.argsort(rng.random((batch, n)) + ~cand_mask, axis=1)[:, :m]  # real ones
    exposed_mask = np.arange(m)[None, :] < rng.integers(1, m + 1, batch)[:, None]
    recalls = []
    for k in range(1, n + 1):
        value = recall_at_k(scores, exposed, exposed_mask, cand_mask, k)
        by_hand = np.mean([
            np.isin(exposed[r, exposed_mask[r]],
                    np.argsort(-np.where(cand_mask[r], scores[r], -np.inf),
                               kind="stable")[:min(k, real[r])]).mean()
            for r in range(batch)])
        assert value == pytest.approx(by_hand)
        recalls.append(value)
    assert np.all(np.diff(recalls) >= 0)
    assert recalls[-1] == 1.0
    # Scoring the exposed items highest gives recall 1 as soon as k covers them.
    oracle = np.zeros((batch, n))
    np.put_along_axis(oracle, exposed, np.where(exposed_mask, 1.0, 0.0), axis=1)
    assert recall_at_k(oracle, exposed, exposed_mask, cand_mask, m) == 1.0


def test_exposure_logloss_is_the_logloss_of_exposed_labels() -> None:
    rng = np.random.default_rng(4)
    probs = rng.uniform(0.05, 0.95, (3, 5))
    exposed = np.array([[1, 3], [0, 0], [4, 2]])
    exposed_mask = np.array([[True, True], [True, False], [True, True]])
    cand_mask = np.array([[True] * 4 + [False], [True] * 5, [True] * 5])
    labels = np.array([[0, 1, 0, 1, 0], [1, 0, 0, 0, 0], [0, 0, 1, 0, 1]])
    expected = log_loss(labels[cand_mask], probs[cand_mask])
    assert exposure_logloss(torch.from_numpy(probs), torch.from_numpy(exposed),
                            torch.from_numpy(exposed_mask), torch.from_numpy(cand_mask)) == \
        pytest.approx(expected, rel=1e-10)


def test_captured_lift_and_report() -> None:
    logging, oracle = np.array([1.0, 2.0, 3.0]), np.array([3.0, 4.0, 5.0])
    assert captured_lift(logging, logging, oracle) == 0.0
    assert captured_lift(oracle, logging, oracle) == 1.0
    assert captured_lift(logging + 1.0, logging, oracle) == pytest.approx(0.5)
    assert math.isnan(captured_lift(oracle, logging, logging))
    report = utility_report(logging + 1.0, logging, torch.from_numpy(oracle))
    assert report == pytest.approx({"utility": 3.0, "logging_utility": 2.0,
                                    "oracle_utility": 4.0, "captured_lift": 0.5})


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """A small simulated Kuaishou-like dataset: its World and its whole test split."""
    out = tmp_path_factory.mktemp("sim") / "data"
    simulate_small(out, requests=400, seed=5)
    space = FeatureSpace.fit([out / "train.parquet"])
    batch = next(iter(RequestLoader([out / "test.parquet"], space, batch_size=1000)))
    truth = pq.read_table(out / TRUTH_DIR / ORACLE_FILE).to_pydict()
    return World.load(out), batch, truth


def random_lists(batch, m: int, seed: int) -> np.ndarray:
    """A random list of m real candidates per request: (B, m)."""
    rng = np.random.default_rng(seed)
    noise = rng.random(batch.cand_mask.shape) + ~batch.cand_mask.numpy()
    return np.argsort(noise, axis=1)[:, :m]


def test_list_utility_equals_the_world(simulated) -> None:
    world, batch, _ = simulated
    m = world.config.list_length
    lists = random_lists(batch, m, seed=0)
    expected = world.utility(batch.user_id, batch.item_id, lists[:, None, :])[:, 0]
    assert list_utility(world, batch, torch.from_numpy(lists)) == pytest.approx(expected,
                                                                                 rel=1e-5)
    feedback = world.list_feedback(world.candidate_terms(batch.user_id, batch.item_id),
                                   lists[:, None, :])[:, 0].sum(axis=1)      # (B, K)
    assert behaviour_means(world, batch, lists) == pytest.approx(feedback, rel=1e-6)


def test_list_utility_handles_padding_and_short_lists(simulated) -> None:
    world, batch, _ = simulated
    m = world.config.list_length
    lists = random_lists(batch, m, seed=1)
    padded = dataclasses.replace(batch, item_id=np.pad(batch.item_id, ((0, 0), (0, 3)),
                                                       constant_values=-1))
    assert list_utility(world, padded, lists) == pytest.approx(
        list_utility(world, batch, lists), rel=1e-6)
    short = lists.copy()
    short[::2, 3:] = -1                       # every other request ends after 3 items
    expected = world.utility(batch.user_id, batch.item_id, lists[:, None, :])[:, 0]
    expected[::2] = world.utility(batch.user_id[::2], batch.item_id[::2],
                                  lists[::2, None, :3])[:, 0]
    assert list_utility(world, batch, short) == pytest.approx(expected, rel=1e-5)


def test_list_utility_reproduces_the_simulators_truth(simulated) -> None:
    world, batch, truth = simulated
    assert batch.request_id.tolist() == truth["request_id"]
    logged = torch.where(batch.exposed_mask, batch.exposed, -1)
    logging = list_utility(world, batch, logged)
    oracle = list_utility(world, batch, np.array(truth["oracle_list"]))
    assert logging == pytest.approx(np.array(truth["logging_utility"]), rel=1e-5)
    assert oracle == pytest.approx(np.array(truth["oracle_utility"]), rel=1e-5)
    assert captured_lift(logging, truth["logging_utility"], truth["oracle_utility"]) == \
        pytest.approx(0.0, abs=1e-5)
    report = utility_report(oracle, truth["logging_utility"], truth["oracle_utility"])
    assert report["captured_lift"] == pytest.approx(1.0, abs=1e-5)


def test_list_utility_rejects_invalid_lists(simulated) -> None:
    world, batch, _ = simulated
    lists = random_lists(batch, 4, seed=2)
    gap = lists.copy()
    gap[0, 1] = -1
    with pytest.raises(Nar4recError, match="after an empty"):
        list_utility(world, batch, gap)
    repeat = lists.copy()
    repeat[0, 2] = repeat[0, 0]
    with pytest.raises(Nar4recError, match="twice"):
        list_utility(world, batch, repeat)
    padded = dataclasses.replace(batch, item_id=np.where(np.arange(batch.item_id.shape[1])
                                                         == lists[0, 0], -1, batch.item_id))
    with pytest.raises(Nar4recError, match="padded"):
        list_utility(world, padded, lists)
    with pytest.raises(Nar4recError, match="simulated data"):
        list_utility(world, dataclasses.replace(batch, user_id=batch.user_id.astype(str)),
                     lists)
