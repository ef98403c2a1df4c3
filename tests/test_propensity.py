"""The logging policy's probabilities: Plackett-Luce against brute force over every list, and
what a batch's logging_ columns give an estimator."""

from __future__ import annotations

import itertools
import math
import tracemalloc

import numpy as np
import pytest
import torch
from scipy import stats

from nar4rec.data.batch import LoggingPolicy
from nar4rec.errors import DataError
from nar4rec.propensity import (
    NO_ITEM,
    logging_probabilities,
    pl_log_prob,
    pl_marginals,
    pl_prefix_log_probs,
    pl_sample,
)

N, M = 5, 3
ALL_LISTS = np.array(list(itertools.permutations(range(N), M)))          # (60, 3)


def brute_force_probability(logits: list[float], items: list[int]) -> float:
    """P(items, in order) under Plackett-Luce, written position by position (a logit of -inf
    has weight 0)."""
    weights = [math.exp(x) for x in logits]
    probability, left = 1.0, set(range(len(logits)))
    for item in items:
        probability *= weights[item] / sum(weights[j] for j in left)
        left.remove(item)
    return probability


def brute_force_marginals(logits: list[float], m: int) -> np.ndarray:
    """(N, m) P(i at position k) by summing over every prefix, padding (-inf) excluded."""
    real = [i for i, x in enumerate(logits) if x > -math.inf]
    out = np.zeros((len(logits), m))
    for k in range(min(m, len(real))):
        for prefix in itertools.permutations(real, k + 1):
            out[prefix[-1], k] += brute_force_probability(logits, list(prefix))
    return out


@pytest.fixture(scope="module")
def logits() -> np.ndarray:
    """Four requests: ordinary, peaked (temperature 0.05), flat, and one with a padding slot."""
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4, N))
    scores[1] /= 0.05
    scores[2] = 0.0
    scores[3, 4] = -np.inf
    return scores


def test_list_probabilities_are_exact_and_sum_to_one(logits):
    for row in logits[:3]:
        log_p = pl_log_prob(np.repeat(row[None], len(ALL_LISTS), 0), ALL_LISTS)
        expected = [brute_force_probability(row.tolist(), list(y)) for y in ALL_LISTS]
        np.testing.assert_allclose(np.exp(log_p), expected, rtol=1e-9, atol=1e-300)
        assert np.all(log_p <= 0)
        assert np.exp(log_p).sum() == pytest.approx(1.0, abs=1e-12)


def test_prefixes_are_consistent_with_the_list(logits):
    rows = np.repeat(logits[:3], len(ALL_LISTS), 0)
    lists = np.tile(ALL_LISTS, (3, 1))
    prefix = pl_prefix_log_probs(rows, lists)                                # (180, 3)
    for k in range(M):
        np.testing.assert_allclose(prefix[:, k], pl_log_prob(rows, lists[:, :k + 1]),
                                   rtol=1e-12)
    np.testing.assert_allclose(prefix[:, -1], pl_log_prob(rows, lists), rtol=1e-12)
    assert np.all(np.diff(prefix, axis=1) <= 0)
    # P(first k+1 items) = sum of P(list) over the lists sharing them
    log_p = pl_log_prob(rows, lists)
    first = lists[:, 0] + 10 * np.repeat(np.arange(3), len(ALL_LISTS))
    for key in np.unique(first)[:7]:
        together = np.exp(log_p[first == key]).sum()
        assert together == pytest.approx(np.exp(prefix[first == key, 0][0]), rel=1e-9)


def test_padding_candidates_and_short_lists(logits):
    padded = logits[3:4]                                   # candidate 4 is padding
    lists = np.array([[2, 0, NO_ITEM], [1, NO_ITEM, NO_ITEM], [3, 4, 0]])
    rows = np.repeat(padded, 3, 0)
    log_p = pl_log_prob(rows, lists)
    real = padded[0, :4].tolist()
    assert np.exp(log_p[0]) == pytest.approx(brute_force_probability(real, [2, 0]), rel=1e-12)
    assert np.exp(log_p[1]) == pytest.approx(brute_force_probability(real, [1]), rel=1e-12)
    assert log_p[2] == -np.inf                              # shows a padding candidate
    prefix = pl_prefix_log_probs(rows, lists)
    assert np.isnan(prefix[0, 2]) and np.isnan(prefix[1, 1:]).all()
    assert prefix[0, 1] == pytest.approx(log_p[0])
    # sampled lists never show padding, and stop when the candidates run out
    three = np.array([[0.3, -0.2, 0.1, -np.inf, -np.inf]])
    sampled = pl_sample(three, 4, np.random.default_rng(0), samples=50)      # (1, 50, 4)
    assert np.all(np.sort(sampled[0, :, :3], axis=1) == [0, 1, 2])
    assert np.all(sampled[0, :, 3] == NO_ITEM)
    assert pl_sample(three, 7, np.random.default_rng(0)).shape == (1, 1, 7)


def test_sampled_lists_follow_the_exact_probabilities(logits):
    samples = 30000
    lists = pl_sample(logits[:1], M, np.random.default_rng(1), samples=samples)[0]
    codes = lists @ np.array([N * N, N, 1])
    observed = np.bincount(codes, minlength=N ** 3)[ALL_LISTS @ np.array([N * N, N, 1])]
    assert observed.sum() == samples                       # only lists of distinct items
    expected = samples * np.exp(pl_log_prob(np.repeat(logits[:1], len(ALL_LISTS), 0),
                                            ALL_LISTS))
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert chi2 < stats.chi2.ppf(0.999, df=len(ALL_LISTS) - 1)


def test_marginals_exact_by_enumeration_and_monte_carlo_within_its_error(logits):
    expected = np.stack([brute_force_marginals(row.tolist(), M) for row in logits])
    exact = pl_marginals(logits, M)                         # 60 lists <= 4096 samples
    np.testing.assert_allclose(exact, expected, atol=1e-12)
    samples = 4096
    sampled = pl_marginals(logits, M, samples=samples, rng=np.random.default_rng(2),
                           exact_lists=0)
    # each entry's deviation is at most 0.5 / sqrt(samples); five of them over 60 entries
    assert np.abs(sampled - expected).max() < 5 * 0.5 / np.sqrt(samples)
    np.testing.assert_allclose(sampled[:, :, 0], expected[:, :, 0], atol=1e-12)  # exact
    np.testing.assert_allclose(sampled.sum(axis=1), 1.0, atol=1e-9)    # columns sum to 1
    assert np.all(sampled[3, 4] == 0.0)                                 # padding
    assert np.all(sampled[[0, 2, 3], :4] > 0)        # every real candidate at every position
    # a request with fewer real candidates than positions leaves the rest empty
    two = np.array([[0.5, -0.5, -np.inf, -np.inf, -np.inf]])
    short = pl_marginals(two, M, exact_lists=0, samples=64)
    assert np.all(short[0, :, 2] == 0.0) and short[0, :2, :2].sum() == pytest.approx(2.0)


def test_chunks_give_the_results_of_one_piece():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(9, 12))
    logits[4, 7:] = -np.inf
    whole = pl_marginals(logits, 4, samples=300, rng=np.random.default_rng(7),
                         max_bytes=1 << 30)
    by_rows = pl_marginals(logits, 4, samples=300, rng=np.random.default_rng(7),
                           max_bytes=2_000_000)                   # a few requests a piece
    by_samples = pl_marginals(logits, 4, samples=300, rng=np.random.default_rng(7),
                              max_bytes=1)                        # one sampled list a piece
    np.testing.assert_allclose(by_rows, whole, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(by_samples, whole, rtol=1e-12, atol=1e-15)
    other = pl_marginals(logits, 4, samples=300, rng=np.random.default_rng(8))
    assert not np.allclose(other, whole)                          # the rng matters


def policy_of(logits_rows: np.ndarray, temperature: np.ndarray) -> LoggingPolicy:
    score = np.where(np.isinf(logits_rows), np.nan, logits_rows * temperature[:, None])
    return LoggingPolicy(score=torch.from_numpy(score), temperature=torch.from_numpy(temperature))


def test_logging_probabilities_from_a_plackett_luce_logger(logits):
    rows = logits[[0, 2, 3]]
    temperature = np.array([0.5, 1.0, np.nan])              # the last request: unknown
    lists = torch.tensor([[3, 1, 0, -1], [0, 2, 4, 1], [2, 0, 1, -1]])
    got = logging_probabilities(policy_of(rows, temperature), lists, 3,
                                rng=np.random.default_rng(0))
    assert got.missing == {}
    cut = lists[:, :3].numpy()
    np.testing.assert_allclose(got.list_log_prob[:2], pl_log_prob(rows[:2], cut[:2]))
    np.testing.assert_allclose(got.prefix_log_prob[:2], pl_prefix_log_probs(rows[:2], cut[:2]))
    np.testing.assert_allclose(got.marginal[:2], pl_marginals(rows[:2], 3), atol=1e-12)
    assert np.isnan(got.list_log_prob[2]) and np.isnan(got.marginal[2]).all()
    # log_propensity fills what the scores do not know, for a list that was not cut
    with_column = logging_probabilities(policy_of(rows, temperature), lists, 4,
                                        log_propensity=torch.tensor([-9.0, -9.0, -2.5]),
                                        quantities=("list_log_prob",))
    assert with_column.list_log_prob[2] == -2.5
    assert with_column.list_log_prob[0] == pytest.approx(pl_log_prob(rows[:1], cut[:1])[0])
    assert with_column.marginal is None and "not asked" in with_column.missing["marginal"]


def test_logging_probabilities_from_explicit_columns_and_what_is_missing():
    marginal = np.zeros((2, 3, 2), np.float32)
    marginal[0] = [[0.5, 0.2], [0.3, 0.5], [0.2, 0.3]]
    marginal[1] = np.nan                                    # unknown for that request
    prefix = np.array([[-0.7, -1.9], [np.nan, np.nan]])
    policy = LoggingPolicy(marginal=torch.from_numpy(marginal),
                           prefix_log_propensity=torch.from_numpy(prefix))
    lists = np.array([[0, 1], [2, -1]])
    got = logging_probabilities(policy, lists, 2, log_propensity=np.array([-1.9, -0.4]))
    np.testing.assert_allclose(got.marginal[0], marginal[0])
    assert np.isnan(got.marginal[1]).all()
    assert got.list_log_prob.tolist() == [-1.9, -0.4]       # the prefix's end, log_propensity
    assert got.sources["list_log_prob"] == "logging_prefix_log_propensity, log_propensity"
    np.testing.assert_allclose(got.prefix_log_prob[0], prefix[0])

    nothing = logging_probabilities(None, lists, 2)
    assert nothing.list_log_prob is None and nothing.marginal is None
    assert "logging_marginal" in nothing.missing["marginal"]
    assert "logging_score with logging_temperature" in nothing.missing["prefix_log_prob"]
    with pytest.raises(DataError, match="logging_marginal") as error:
        nothing.require("marginal", file="test.parquet")
    assert error.value.field == "logging_marginal" and error.value.file == "test.parquet"
    only_propensity = logging_probabilities(None, lists, 2, log_propensity=[-1.0, -2.0])
    assert only_propensity.require("list_log_prob").tolist() == [-1.0, -2.0]


def test_marginals_hold_at_most_max_bytes_beside_the_result():
    logits = np.random.default_rng(4).normal(size=(64, 60))
    tracemalloc.start()
    try:
        marginal = pl_marginals(logits, 6, samples=512, max_bytes=2 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - marginal.nbytes < 2 << 20
