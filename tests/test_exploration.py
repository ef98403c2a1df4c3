"""Exploring mode: lists with propensities that match how often they are shown."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from nar4rec.errors import Nar4recError
from nar4rec.exploration import Exploration, explore
from nar4rec.propensity import pl_log_prob


def repeated(count: int):
    """One request of 5 candidates (the last padding in a width of 6) and its model list,
    repeated `count` times."""
    score = np.tile([2.0, 1.0, 0.5, -0.3, -1.0, 0.0], (count, 1))
    mask = np.tile([True] * 5 + [False], (count, 1))
    lists = np.tile([1, 0, 3], (count, 1))
    return lists, score, mask


def test_propensities_match_the_frequencies_of_the_shown_lists():
    count = 40_000
    lists, score, mask = repeated(count)
    config = Exploration(epsilon=0.4, temperature=1.5, samples=4096)
    out = explore(lists, score, mask, config, np.random.default_rng(0))
    assert 0.38 < out.explored.mean() < 0.42
    seen = Counter(map(tuple, out.lists.tolist()))
    by_list = {tuple(row): p for row, p in zip(out.lists.tolist(),
                                              np.exp(out.log_propensity), strict=True)}
    for shown, times in seen.most_common(8):          # the model's list and the likeliest draws
        p = by_list[shown]
        assert abs(times / count - p) < 4 * np.sqrt(p * (1 - p) / count) + 1e-4, (shown, p)
    assert all(5 not in row and len(set(row)) == 3 for row in seen)   # real, distinct
    # The model's list: (1 - eps) + eps * PL(list).
    logits = (score - score[:, :5].mean(1, keepdims=True)) / score[:, :5].std(1, keepdims=True)
    logits = np.where(mask, logits / 1.5, -np.inf)[:1]
    pl = np.exp(pl_log_prob(logits, lists[:1]))[0]
    assert by_list[(1, 0, 3)] == pytest.approx(0.6 + 0.4 * pl)
    # Prefixes end at the list's propensity and never rise.
    assert np.allclose(out.prefix_log_propensity[:, -1], out.log_propensity)
    assert (np.diff(out.prefix_log_propensity, axis=1) <= 1e-12).all()
    # Marginals: each position a distribution over the real candidates, and the frequencies.
    marginal = out.marginal[0]                                      # the same every row
    assert np.allclose(marginal.sum(0), 1.0, atol=1e-9) and (marginal[5] == 0).all()
    for k in range(3):
        frequency = np.bincount(out.lists[:, k], minlength=6) / count
        assert np.abs(frequency - marginal[:, k]).max() < 0.01, k


def test_short_requests_and_bad_settings():
    score = np.array([[0.1, 0.5, 0.9, 0.0], [1.0, 0.0, -1.0, 2.0]])
    mask = np.array([[True, True, False, False], [True, True, True, True]])   # 2 candidates
    lists = np.array([[1, 0, -1], [0, 1, 2]])
    out = explore(lists, score, mask, Exploration(epsilon=1.0), np.random.default_rng(1))
    assert out.explored.all() and out.lists[0, 2] == -1 and np.isnan(
        out.prefix_log_propensity[0, 2])
    assert (out.marginal[0, :, 2] == 0).all() and np.allclose(out.marginal[0, :, :2].sum(0), 1)
    for bad in ({"epsilon": 0.0}, {"epsilon": 1.5}, {"epsilon": 0.1, "temperature": 0.0}):
        with pytest.raises(Nar4recError):
            Exploration(**bad)


def test_rerank_explores_from_the_library_and_the_command_line(tmp_path):
    """`nar4rec rerank --explore` and `Reranker.rerank_table(explore=...)`: the shown lists
    with their propensities in the format's columns, consistent with each other."""
    import nar4rec
    from helpers import train_tiny
    from nar4rec.cli import main

    run = train_tiny(tmp_path, requests=1500, n_candidates=12, list_length=4, d_model=16,
                     steps=5)
    test = tmp_path / "data" / "test.parquet"
    assert main(["rerank", "--run", str(run), "--data", str(test), "--out",
                 str(tmp_path / "lists.parquet"), "--explore", "0.3", "--explore-seed",
                 "1"]) == 0
    table = pq.read_table(tmp_path / "lists.parquet").to_pydict()
    explored = np.array(table["explored"])
    assert 0.2 < explored.mean() < 0.4
    plain = nar4rec.load(run).rerank_table(pq.read_table(test))
    same = np.array([a == b for a, b in zip(table["items"], plain.column("items").to_pylist(),
                                            strict=True)])
    assert same[~explored].all()                       # the model's own lists where not explored
    for row in range(20):
        prefixes = table["logging_prefix_log_propensity"][row]
        assert prefixes[-1] == pytest.approx(table["log_propensity"][row])
        marginal = np.array(table["logging_marginal"][row])             # (n, m)
        assert np.allclose(marginal.sum(0), 1.0, atol=1e-5)
        position = table["positions"][row]
        assert (marginal[position, np.arange(len(position))] > 0).all()
        assert (np.isnan(table["scores"][row][0])) == explored[row]
    again = nar4rec.load(run).rerank_table(pq.read_table(test), explore=nar4rec.Exploration(
        epsilon=0.3), seed=1)
    assert again.column("items").to_pylist() == table["items"]      # the same seeded draws
