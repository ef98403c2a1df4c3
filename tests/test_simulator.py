"""The ground-truth user model: exact utilities, sampling, logging policy and oracle."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from helpers import simulate_small, small_config
from nar4rec.data.validate import validate_file
from nar4rec.propensity import pl_log_prob, pl_prefix_log_probs
from nar4rec.sim.oracle import beam_search, exhaustive, itemwise_top, list_utility, oracle
from nar4rec.sim.policy import (
    plackett_luce,
    plackett_luce_log_prob,
    sample_feedback,
    sample_requests,
)
from nar4rec.sim.simulate import build_world
from nar4rec.sim.world import World, sigmoid


@pytest.fixture(scope="module")
def world() -> World:
    return build_world(small_config("kuaishou"), seed=3)


@pytest.fixture(scope="module")
def requests(world):
    return sample_requests(world, 64, np.random.default_rng(1))


def reference_feedback(world: World, user: int, items: list[int]) -> np.ndarray:
    """The user model of SimConfig's docstring, written position by position: (m, K)."""
    c = world.config
    z = [c.affinity_scale * (world.user_latent[user] @ world.item_latent[i]
                             + world.item_bias[i] + world.user_bias[user]) + c.affinity_bias
         for i in items]
    out = np.zeros((len(items), len(c.behaviours)))
    for k, item in enumerate(items):
        fatigue = max([max(0.0, float(world.item_embedding[item] @ world.item_embedding[j]))
                       for j in items[:k]], default=0.0)
        carry = sum(c.carryover_decay ** (k - 1 - j) * (sigmoid(z[j]) - c.carryover_baseline)
                    for j in range(k))
        exam = (1.0 + k) ** -c.position_decay
        first = None
        for b_index, b in enumerate(c.behaviours):
            logit = (c.behaviour_bias[b] + c.behaviour_slope[b] * z[k]
                     + world.item_attr[item, b_index] - c.fatigue[b] * fatigue
                     + c.carryover * carry)
            if first is None:
                first = exam * sigmoid(logit)
                out[k, b_index] = first
            else:
                out[k, b_index] = first * sigmoid(logit)
    return out


def test_closed_form_matches_position_by_position_reference(world, requests):
    rng = np.random.default_rng(0)
    terms = world.candidate_terms(requests.users, requests.items)
    lists = np.stack([rng.choice(60, size=6, replace=False) for _ in range(len(requests.users))])
    batched = world.list_feedback(terms, lists[:, None, :])[:, 0]
    for r in range(8):
        expected = reference_feedback(world, int(requests.users[r]),
                                      [int(i) for i in requests.items[r, lists[r]]])
        np.testing.assert_allclose(batched[r], expected, rtol=1e-4, atol=1e-6)


def test_sampled_feedback_has_the_closed_form_means(world, requests):
    terms = world.candidate_terms(requests.users[:4], requests.items[:4])
    lists = np.tile(np.arange(6), (4, 1))
    probabilities = world.list_feedback(terms, lists[:, None, :])[:, 0]      # (4, 6, K)
    draws = 20000
    rng = np.random.default_rng(5)
    repeated = np.repeat(probabilities, draws, axis=0)
    sampled = sample_feedback(world, repeated, rng).reshape(4, draws, 6, -1).mean(axis=1)
    error = np.sqrt(probabilities * (1 - probabilities) / draws)
    assert np.all(np.abs(sampled - probabilities) <= 5 * error + 1e-4)
    # Every other behaviour happens only with the first (a like needs a view).
    one = sample_feedback(world, repeated[:1000], rng)
    assert np.all(one[..., 1:] <= one[..., :1])


def test_list_effects_make_order_and_diversity_matter(world, requests):
    terms = world.candidate_terms(requests.users, requests.items)
    best, best_utility, _ = oracle(world, terms, 6)
    top = itemwise_top(world, terms, 6)
    top_utility = list_utility(world, terms, top[:, None, :])[:, 0]
    assert np.all(best_utility >= top_utility - 1e-6)
    differs = np.mean(np.any(np.sort(best, 1) != np.sort(top, 1), axis=1) | np.any(best != top, 1))
    assert differs > 0.2, "the best list should often not be the item-wise top m"
    # Reversing a list changes its utility: order matters, not only the set.
    reversed_utility = list_utility(world, terms, best[:, None, ::-1].copy())[:, 0]
    assert np.mean(reversed_utility < best_utility - 1e-6) > 0.9


def test_beam_scores_equal_full_evaluation(world, requests):
    terms = world.candidate_terms(requests.users, requests.items)
    lists, scores = beam_search(world, terms, 6, beam=4)
    assert np.all(np.sort(lists, axis=1)[:, 1:] != np.sort(lists, axis=1)[:, :-1])
    np.testing.assert_allclose(scores, list_utility(world, terms, lists[:, None, :])[:, 0],
                               rtol=1e-4)


def test_exhaustive_equals_brute_force_and_search_comes_close(world, requests):
    small = dataclasses.replace(world, config=dataclasses.replace(world.config, n_candidates=6,
                                                                    list_length=4))
    terms = small.candidate_terms(requests.users[:12], requests.items[:12, :6])
    best_list, best_utility = exhaustive(small, terms, 4)
    for r in range(12):
        utilities = {p: list_utility(small, terms.take(slice(r, r + 1)),
                                     np.array(p)[None, None, :])[0, 0]
                     for p in itertools.permutations(range(6), 4)}
        assert best_utility[r] == pytest.approx(max(utilities.values()), rel=1e-6)
        assert utilities[tuple(best_list[r])] == pytest.approx(best_utility[r], rel=1e-6)
    forced = dataclasses.replace(small, config=dataclasses.replace(small.config,
                                                                  exhaustive_limit=0))
    terms = small.candidate_terms(requests.users, requests.items[:, :6])
    _, searched, method = oracle(forced, terms, 4)
    _, exact = exhaustive(small, terms, 4)
    assert method.startswith("beam")
    assert np.all(searched <= exact + 1e-6)
    assert np.mean(searched / exact) > 0.995


def test_plackett_luce_propensities_are_exact(world):
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(1, 4))
    perms = np.array(list(itertools.permutations(range(4), 3)))
    log_p = plackett_luce_log_prob(np.repeat(scores, len(perms), 0), perms)
    assert np.exp(log_p).sum() == pytest.approx(1.0, abs=1e-9)
    lists, sampled_log_p = plackett_luce(np.repeat(scores, 40000, 0), 3, 1.0, rng)
    codes = lists @ np.array([16, 4, 1])
    frequency = {int(c): n / len(codes) for c, n in zip(*np.unique(codes, return_counts=True),
                                                         strict=True)}
    for p, lp in zip(perms, log_p, strict=True):
        assert frequency.get(int(p @ np.array([16, 4, 1])), 0.0) == pytest.approx(
            np.exp(lp), abs=0.01)
    np.testing.assert_allclose(sampled_log_p,
                               plackett_luce_log_prob(np.repeat(scores, 40000, 0), lists))


@pytest.mark.parametrize("preset", ["kuaishou", "avito"])
def test_simulate_writes_valid_logs_and_the_oracle_beats_logging(tmp_path, preset):
    summary = simulate_small(tmp_path / "data", preset=preset)
    for split in ("train", "valid", "test"):
        assert validate_file(tmp_path / "data" / f"{split}.parquet") == []
    assert summary["requests"] == {"train": 2400, "valid": 300, "test": 300}
    assert summary["oracle_utility"] > 1.08 * summary["logging_utility"]
    # The search itself almost always beats the logged and item-wise lists; where it does not,
    # the summary counts the requests whose oracle list fell back to the better of the two.
    assert summary["oracle_fallbacks"] <= 0.01 * summary["requests"]["test"]
    assert summary["oracle_utility"] > summary["itemwise_top_utility"]
    on_disk = json.loads((tmp_path / "data" / "summary.json").read_text())
    assert on_disk["oracle_utility"] == summary["oracle_utility"]
    oracle_table = pq.read_table(tmp_path / "data" / "truth" / "oracle_test.parquet")
    test = pq.read_table(tmp_path / "data" / "test.parquet")
    assert oracle_table.column("request_id").to_pylist() == test.column("request_id").to_pylist()
    assert np.mean(oracle_table.column("oracle_utility").to_numpy()) == pytest.approx(
        summary["oracle_utility"])
    # The logged feedback agrees with the ground truth's expectation of the logged lists.
    world = World.load(tmp_path / "data")
    users = np.concatenate([test.column("user_id").to_numpy()])
    items = np.stack(test.column("item_id").to_numpy(zero_copy_only=False))
    exposed = np.stack(test.column("exposed").to_numpy(zero_copy_only=False)).astype(np.int64)
    expected = world.utility(users, items, exposed[:, None, :])[:, 0]
    np.testing.assert_allclose(expected, oracle_table.column("logging_utility").to_numpy(),
                               rtol=1e-4)


def test_timestamps_split_by_time_and_runs_repeat(tmp_path):
    simulate_small(tmp_path / "a", requests=1500, seed=7)
    simulate_small(tmp_path / "b", requests=1500, seed=7)
    simulate_small(tmp_path / "c", requests=1500, seed=8)
    last = None
    for split in ("train", "valid", "test"):
        times = pq.read_table(tmp_path / "a" / f"{split}.parquet").column("timestamp")
        values = times.cast("int64").to_numpy()
        assert np.all(np.diff(values) >= 0)
        if last is not None:
            assert values[0] >= last
        last = values[-1]
    a = pq.read_table(tmp_path / "a" / "train.parquet")
    assert a.equals(pq.read_table(tmp_path / "b" / "train.parquet"))
    assert not a.equals(pq.read_table(tmp_path / "c" / "train.parquet"))


def test_logging_policy_shows_many_different_lists(tmp_path):
    simulate_small(tmp_path / "d", requests=2000)
    table = pq.read_table(tmp_path / "d" / "train.parquet", columns=["exposed"])
    lists = {tuple(x) for x in table.column("exposed").to_pylist()}
    assert len(lists) > 0.9 * table.num_rows


def test_movielens_preset_uses_the_real_ratings(tmp_path, shared_data):
    summary = simulate_small(tmp_path / "ml", preset="movielens", requests=2000,
                             movielens_dir=str(shared_data / "ml-100k"))
    assert summary["users"] == 943 and summary["items"] == 1682
    assert summary["oracle_utility"] > 1.08 * summary["logging_utility"]
    world = World.load(tmp_path / "ml")
    ratings = np.loadtxt(shared_data / "ml-100k" / "u.data", dtype=np.int64)[:, :3]
    affinity = world.affinity(ratings[:, 0] - 1, (ratings[:, 1] - 1)[:, None])[:, 0]
    # The fitted affinity ranks a user's 5-star movies above their 1-star ones.
    assert affinity[ratings[:, 2] == 5].mean() > affinity[ratings[:, 2] == 1].mean() + 1.0
    assert np.corrcoef(affinity, ratings[:, 2])[0, 1] > 0.5


def test_peaked_logging_policy_keeps_exact_propensities(tmp_path):
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(1, 5))
    perms = np.array(list(itertools.permutations(range(5), 3)))
    for temperature in (1.0, 0.05, 0.005):
        log_p = plackett_luce_log_prob(np.repeat(scores, len(perms), 0) / temperature, perms)
        assert np.all(log_p <= 0)
        assert np.exp(log_p).sum() == pytest.approx(1.0, abs=1e-9)
    simulate_small(tmp_path / "peaked", requests=600, logging_temperature=0.02)
    assert validate_file(tmp_path / "peaked" / "train.parquet") == []
    table = pq.read_table(tmp_path / "peaked" / "train.parquet")
    logits = rows_of(table, "logging_score") / 0.02
    assert np.all(table.column("logging_temperature").to_numpy() == 0.02)
    np.testing.assert_allclose(table.column("log_propensity").to_numpy(),
                               pl_log_prob(logits, rows_of(table, "exposed", np.int64)),
                               rtol=1e-12)


# sha256 of the request, candidate, list and feedback columns that `simulate_small(requests=1200,
# seed=5)` wrote before the logging_ columns existed (numpy 2.4): adding them drew nothing more.
DRAWN_BEFORE_LOGGING_COLUMNS = "2246ed3e9c719bec11565377e131490dcbe41704d362d8593afec05d5a234149"


def drawn_digest(folder: Path) -> str:
    """A digest of every column of ids, events and shown lists of the three splits."""
    digest = hashlib.sha256()
    for split in ("train", "valid", "test"):
        table = pq.read_table(folder / f"{split}.parquet")
        for name in sorted(table.column_names):
            if not (name in ("request_id", "user_id", "timestamp", "item_id", "exposed")
                    or name.startswith(("user_cat_", "cand_cat_", "feedback_"))):
                continue
            column = table.column(name)
            if pa.types.is_list(column.type):
                digest.update(name.encode())
                digest.update(pc.list_value_length(column).to_numpy().astype(np.int64).tobytes())
                column = pc.list_flatten(column)
            if pa.types.is_timestamp(column.type):
                column = column.cast(pa.int64())
            digest.update(name.encode())
            digest.update(column.to_numpy().astype(np.int64).tobytes())
    return digest.hexdigest()


def rows_of(table: pa.Table, name: str, dtype=np.float64) -> np.ndarray:
    """A list column of equal-length lists as an (R, L) array."""
    return np.stack(table.column(name).to_numpy(zero_copy_only=False)).astype(dtype)


def test_logging_columns_describe_the_policy_and_draw_nothing_more(tmp_path):
    simulate_small(tmp_path / "d", requests=1200, seed=5)
    assert drawn_digest(tmp_path / "d") == DRAWN_BEFORE_LOGGING_COLUMNS
    table = pq.read_table(tmp_path / "d" / "train.parquet")
    score = rows_of(table, "logging_score")
    np.testing.assert_array_equal(score, rows_of(table, "upstream_score"))
    temperature = table.column("logging_temperature").to_numpy()
    assert np.all(temperature == small_config("kuaishou").logging_temperature)
    exposed = rows_of(table, "exposed", np.int64)
    logits = score / temperature[:, None]
    log_propensity = table.column("log_propensity").to_numpy()
    np.testing.assert_allclose(log_propensity, pl_log_prob(logits, exposed), rtol=1e-12)
    prefix = rows_of(table, "logging_prefix_log_propensity")
    np.testing.assert_allclose(prefix, pl_prefix_log_probs(logits, exposed), rtol=1e-12)
    np.testing.assert_allclose(prefix[:, -1], log_propensity, rtol=1e-12)


def test_too_few_requests_for_three_splits_is_a_clear_error(tmp_path):
    from nar4rec.errors import Nar4recError
    with pytest.raises(Nar4recError, match="split empty"):
        simulate_small(tmp_path / "few", requests=4)
    with pytest.raises(Nar4recError, match="split empty"):
        simulate_small(tmp_path / "none", requests=500, test_fraction=0.0)
    assert not (tmp_path / "few").exists() and not (tmp_path / "none").exists()


def process_group(group: int) -> dict[int, float]:
    """The live (not zombie) processes of a process group: pid -> CPU seconds used, from /proc."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == group and fields[0] != "Z":
                found[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) \
                    / os.sysconf("SC_CLK_TCK")
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_a_killed_simulate_leaves_no_worker_and_the_next_run_no_partial(tmp_path):
    out = tmp_path / "data"
    process = subprocess.Popen([sys.executable, "-m", "nar4rec", "simulate", "--preset",
                                "kuaishou", "--requests", "2000000", "--out", str(out),
                                "--quiet"], start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:       # until the forked oracle worker is busy with the test split's searches
            assert process.poll() is None and time.monotonic() < deadline
            workers = {pid: cpu for pid, cpu in process_group(process.pid).items()
                       if pid != process.pid}
            if any(cpu > 0.5 for cpu in workers.values()):
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        deadline = time.monotonic() + 5
        while process_group(process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_group(process.pid) == {}, "the oracle worker outlived simulate"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)      # what this test started, if left
        process.wait(timeout=30)
    assert list(tmp_path.glob(".data.*.partial"))       # what the killed run left
    simulate_small(out, requests=600)                   # the next run into the same place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
