"""Off-policy estimators: hand-made cases, exact expectations by enumerating every list of a
small world, simulated logs against the enumerated truth, streaming, clipping and PI's Gamma."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from nar4rec.errors import Nar4recError
from nar4rec.ope import (
    ESTIMATORS,
    ExaminationEstimator,
    OffPolicyBatch,
    OffPolicyEvaluator,
    candidate_support,
    estimate_slot_gamma,
    evaluate,
    pseudo_inverse_weights,
)

# --- hand-made: two requests, n = 3 candidates, m = 2 positions, one behaviour -------------


def hand_batch(**overrides) -> OffPolicyBatch:
    """Logged [0, 1] and [2, 0], one click at every position; the target shows [0, 1], [2, 1].

    Request 0 is exactly the target's list, request 1 shares its first item only.
    """
    fields = dict(
        logged=np.array([[0, 1], [2, 0]]),
        logged_mask=np.ones((2, 2), bool),
        rewards=np.ones((2, 2, 1)),
        mu_list=np.array([0.2, 0.1]),
        mu_prefix=np.array([[0.5, 0.2], [0.25, 0.1]]),
        # mu(i at k): rows are candidates, columns positions; each column sums to 1.
        mu_marginal=np.array([[[0.5, 0.2], [0.3, 0.4], [0.2, 0.4]],
                              [[0.3, 0.5], [0.45, 0.2], [0.25, 0.3]]]),
        target_lists=np.array([[0, 1], [2, 1]]),
        q_target=np.array([[[0.3], [0.2]], [[0.4], [0.1]]]),
    )
    fields.update(overrides)
    return OffPolicyBatch(**fields)


def hand_results(**options):
    evaluator = OffPolicyEvaluator([1.0], examination=np.array([1.0, 0.5]), **options)
    evaluator.add(hand_batch())
    return evaluator.result()


def test_hand_computed_values() -> None:
    results = hand_results(estimators=[name for name in ESTIMATORS if name != "pi"])
    value = {name: float(estimate.value[0]) for name, estimate in results.items()}
    # DM: sum of q over the target's list: 0.3 + 0.2 = 0.5 and 0.4 + 0.1 = 0.5 -> 0.5.
    assert value["dm"] == pytest.approx(0.5)
    # IPS: request 0 is the target's list, w = 1 / 0.2 = 5, R = 2 -> 10; request 1 is not -> 0.
    assert value["ips"] == pytest.approx(5.0)
    # SNIPS: (5 * 2 + 0 * 2) / (5 + 0) = 2.
    assert value["snips"] == pytest.approx(2.0)
    # IIPS: request 0: 1 / mu(0 at 0) + 1 / mu(1 at 1) = 2 + 2.5 = 4.5; request 1: item 2 at 0
    # is the target's, 1 / 0.25 = 4; item 0 at 1 is not -> 4.  (4.5 + 4) / 2 = 4.25.
    assert value["iips"] == pytest.approx(4.25)
    # PBM with theta = (1, 0.5): request 0, item 0 at 0: (1 * 1 + 0.5 * 0) / (1 * 0.5 + 0.5 *
    # 0.2) = 5/3; item 1 at 1: (1 * 0 + 0.5 * 1) / (1 * 0.3 + 0.5 * 0.4) = 1 -> 8/3.
    # Request 1, item 2 at 0: 1 / (1 * 0.25 + 0.5 * 0.3) = 2.5; item 0 is not in the target's
    # list -> 0.  (8/3 + 5/2) / 2 = 31/12.
    assert value["pbm"] == pytest.approx(31 / 12)
    # RIPS: request 0: 1 / 0.5 + 1 / 0.2 = 7; request 1: 1 / 0.25 = 4, then the prefixes
    # differ -> 4.  (7 + 4) / 2 = 5.5.
    assert value["rips"] == pytest.approx(5.5)
    # Cascade-DR, Q_k = sum of q from k on: request 0, Q = (0.5, 0.2):
    #   k = 1: 2 * (1 - 0.5) + 1 * 0.5 = 1.5;  k = 2: 5 * (1 - 0.2) + 2 * 0.2 = 4.4 -> 5.9.
    # Request 1, Q = (0.5, 0.1): k = 1: 4 * (1 - 0.5) + 0.5 = 2.5;  k = 2: 0 + 4 * 0.1 = 0.4
    #   -> 2.9.  (5.9 + 2.9) / 2 = 4.4.
    assert value["cascade_dr"] == pytest.approx(4.4)
    # IPS's per-request terms are (10, 0): sample variance 50, stderr sqrt(50 / 2) = 5.
    ips = results["ips"]
    assert ips.stderr[0] == pytest.approx(5.0)
    assert ips.low[0] == pytest.approx(5.0 - 1.959964 * 5.0, rel=1e-6)
    assert ips.utility == pytest.approx(5.0) and ips.utility_stderr == pytest.approx(5.0)
    # ESS: IPS weights (5, 0) -> 25 / 25 = 1; IIPS per position (2, 4) -> 36 / 20 = 1.8 and
    # (2.5, 0) -> 1.
    assert ips.ess == pytest.approx(1.0) and ips.weights == 2 and ips.clipped == 0
    assert results["iips"].ess_by_position == pytest.approx([1.8, 1.0])
    assert results["iips"].ess == pytest.approx(1.0)
    assert results["dm"].ess is None


def test_hand_computed_clipping() -> None:
    results = hand_results(estimators=["ips", "iips", "rips"], max_weight=3.0)
    # IPS: w = (5 -> 3, 0): (3 * 2 + 0) / 2 = 3, one weight cut, ESS 9 / 9 = 1.
    assert results["ips"].value[0] == pytest.approx(3.0)
    assert (results["ips"].clipped, results["ips"].weights) == (1, 2)
    # IIPS: position 0 weights (2, 4 -> 3), position 1 (2.5, 0): (4.5 + 3) / 2 = 3.75; the
    # ESS of position 0 is (2 + 3)^2 / (4 + 9) = 25/13.
    assert results["iips"].value[0] == pytest.approx(3.75)
    assert (results["iips"].clipped, results["iips"].weights) == (1, 4)
    assert results["iips"].ess_by_position[0] == pytest.approx(25 / 13)
    # RIPS: (2, 5 -> 3) and (4 -> 3, 0): (5 + 3) / 2 = 4, two weights cut.
    assert results["rips"].value[0] == pytest.approx(4.0)
    assert results["rips"].clipped == 2


def uniform_gamma(n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """All ordered lists of m of n and the exact Gamma of the uniform policy over them."""
    lists = np.array(list(itertools.permutations(range(n), m)))                # (L, m)
    slots = np.zeros((len(lists), n * m))
    slots[np.arange(len(lists))[:, None], lists * m + np.arange(m)] = 1.0
    return lists, slots.T @ slots / len(lists)


def test_hand_computed_pseudo_inverse() -> None:
    # Uniform logging over the 6 lists of 2 of 3 candidates. For a target (t1, t2) and the
    # third candidate u, E_mu[w(Y) 1_Y] = 1_target gives, slot by slot (each list has
    # probability 1/6): w(t1,t2) + w(t1,u) = 6, w(t1,t2) + w(u,t2) = 6, and 0 for the slots
    # (t2,1), (u,1), (t1,2), (u,2): w(t2,t1) = -w(t2,u) = w(t1,u) = -w(u,t1) = w(u,t2) = f.
    # Only f = 1 is of the form 1_Y' z (q' Gamma^+ 1_Y), so the weights are
    # (t1,t2): 5, (t1,u): 1, (u,t2): 1, (t2,t1): 1, (t2,u): -1, (u,t1): -1.
    lists, gamma = uniform_gamma(3, 2)
    batch = hand_batch(mu_gamma=np.broadcast_to(gamma, (2, 6, 6)))
    evaluator = OffPolicyEvaluator([1.0], ["pi"])
    evaluator.add(batch)
    # Request 0 is the target's list: 5 * 2 = 10; request 1 logged (2, 0) = (t1, u) of the
    # target (2, 1): 1 * 2 = 2.  (10 + 2) / 2 = 6.
    assert evaluator.result()["pi"].value[0] == pytest.approx(6.0)
    # The same Gamma from samples: the six lists once each.
    samples = np.broadcast_to(lists, (2, 6, 2))
    weights, outside = pseudo_inverse_weights(batch.logged, batch.logged_mask,
                                              target_lists=batch.target_lists,
                                              logging_samples=samples)
    assert weights == pytest.approx([5.0, 1.0])
    assert outside == pytest.approx([0.0, 0.0])
    # All six lists of target (0, 1): weights as above, and their mean is 1 (E_mu[w] = 1).
    all_weights, _ = pseudo_inverse_weights(lists, np.ones((6, 2), bool),
                                            target_lists=np.broadcast_to([0, 1], (6, 2)),
                                            mu_gamma=np.broadcast_to(gamma, (6, 6, 6)))
    by_list = dict(zip(map(tuple, lists.tolist()), all_weights, strict=True))
    assert by_list == pytest.approx({(0, 1): 5, (0, 2): 1, (2, 1): 1, (1, 0): 1,
                                     (1, 2): -1, (2, 0): -1})


def test_examination_from_the_logs_by_hand() -> None:
    # r / mu(y at k): request 0: 1 / 0.5 = 2 at 0, 1 / 0.4 = 2.5 at 1; request 1: 1 / 0.25 = 4
    # at 0, 1 / 0.5 = 2 at 1.  theta_2 / theta_1 = (2.5 + 2) / (2 + 4) = 0.75.
    estimator = ExaminationEstimator()
    estimator.add(hand_batch())
    assert estimator.result() == pytest.approx(np.array([[1.0], [0.75]]))


def test_missing_inputs_give_reasons() -> None:
    evaluator = OffPolicyEvaluator([1.0])                                      # no examination
    evaluator.add(hand_batch(mu_marginal=None, q_target=None))
    results = evaluator.result()
    assert results["ips"].skipped is None and results["rips"].skipped is None
    for name in ("iips", "pbm"):
        assert "mu_marginal" in results[name].skipped and results[name].value is None
    assert "examination" in results["pbm"].skipped
    assert "q_target" in results["dm"].skipped and "q_target" in results["cascade_dr"].skipped
    assert "logging_samples or mu_gamma" in results["pi"].skipped
    # An input that goes missing after the first batch skips the estimator from then on.
    later = OffPolicyEvaluator([1.0], ["ips", "iips"])
    later.add(hand_batch())
    later.add(hand_batch(mu_marginal=None))
    assert "from batch 2 on" in later.result()["iips"].skipped
    assert later.result()["ips"].requests == 4
    with pytest.raises(Nar4recError, match="not both"):
        OffPolicyEvaluator([1.0]).add(hand_batch(pi_list=np.ones(2)))
    with pytest.raises(Nar4recError, match="shape"):
        OffPolicyEvaluator([1.0]).add(hand_batch(mu_prefix=np.ones(2)))
    with pytest.raises(Nar4recError, match="positive probability"):
        OffPolicyEvaluator([1.0], ["ips"]).add(hand_batch(mu_list=np.array([0.2, 0.0])))


# --- a small world where every list can be enumerated -----------------------------------

THETA = np.array([1.0, 0.6, 0.35])
WEIGHTS = np.array([1.0, 3.0])                                                 # K = 2


def plackett_luce(lists: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Probability of each list (L,) and of each of its prefixes (L, m), by the chain rule."""
    appeal = np.exp(logits)                                                    # (n,)
    chosen = appeal[lists]                                                     # (L, m)
    left = appeal.sum() - np.cumsum(chosen, axis=1) + chosen                   # before choosing
    prefix = np.cumprod(chosen / left, axis=1)
    return prefix[:, -1], prefix


class World:
    """Every ordered list of m of n candidates; a Plackett-Luce logging policy; a
    deterministic target (one list) and a stochastic one (another Plackett-Luce); expected
    feedback tables (L, m, K) of user models, each true to some estimators' assumptions."""

    def __init__(self, n: int = 5, m: int = 3, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.n, self.m = n, m
        self.lists = np.array(list(itertools.permutations(range(n), m)))       # (L, m)
        self.mu, self.mu_prefix = plackett_luce(self.lists, rng.normal(0, 0.7, n))
        self.pi, self.pi_prefix = plackett_luce(self.lists, rng.normal(0, 1.2, n))
        self.mu_marginal, self.pi_marginal = self.marginal(self.mu), self.marginal(self.pi)
        slots = np.zeros((len(self.lists), n * m))
        slots[np.arange(len(self.lists))[:, None], self.lists * m + np.arange(m)] = 1.0
        self.gamma = slots.T @ (self.mu[:, None] * slots)                      # (nm, nm)
        self.target = int(np.argsort(self.mu)[len(self.mu) // 3])              # rarely logged
        position = np.arange(m)
        attract = rng.uniform(0.1, 0.6, (n, 2))                                # (n, K)
        self.models = {
            # r_k depends on the whole list: on the next item too.
            "generic": rng.uniform(0.05, 0.5, (len(self.lists), m, 2)),
            # r_k depends on (y_k, k) only: additive over slots too.
            "item_position": rng.uniform(0.05, 0.5, (n, m, 2))[self.lists, position],
            # r_k = theta_k alpha(y_k): item-position, cascade and additive all at once.
            "pbm": THETA[None, :, None] * attract[self.lists],
            # the cascade model: a click on the first attractive item, none after it.
            "cascade": attract[self.lists] * np.cumprod(
                np.concatenate([np.ones((len(self.lists), 1, 2)),
                                1 - attract[self.lists][:, :-1]], axis=1), axis=1),
        }

    def marginal(self, probs: np.ndarray) -> np.ndarray:
        """(n, m) probability of candidate i at position k."""
        out = np.zeros((self.n, self.m))
        np.add.at(out, (self.lists, np.arange(self.m)), probs[:, None])
        return out

    def truth(self, model: str, target: str) -> np.ndarray:
        """(K,) the target's expected feedback per request, by enumeration."""
        expected = self.models[model]                                          # (L, m, K)
        if target == "deterministic":
            return expected[self.target].sum(axis=0)
        return np.einsum("l,lmk->k", self.pi, expected)

    def cascade_q(self, expected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(L, m, K) Q_k(y_1..y_k) and E_{a ~ pi(.|y_1..y_k-1)} Q_k(y_1..y_k-1, a) of the
        stochastic target, from an expected-feedback table (true or not)."""
        future = np.flip(np.cumsum(np.flip(expected, 1), axis=1), 1)            # (L, m, K)

        def given_prefix(length: int, start: int) -> np.ndarray:
            same = (self.lists[:, None, :length] == self.lists[None, :, :length]).all(axis=2)
            mass = same * self.pi[None, :]                                     # (L, L)
            return mass @ future[:, start] / mass.sum(axis=1, keepdims=True)   # (L, K)

        q_logged = np.stack([given_prefix(k + 1, k) for k in range(self.m)], axis=1)
        q_target = np.stack([given_prefix(k, k) for k in range(self.m)], axis=1)
        return q_logged, q_target

    def batch(self, chosen: np.ndarray, rewards: np.ndarray, target: str,
              model: np.ndarray | None = None) -> OffPolicyBatch:
        """Requests that logged the lists `chosen` (R,) with `rewards` (R, m, K); `model`
        (L, m, K) is the reward model's table (default: none, DM and DR skipped)."""
        size, n, m = len(chosen), self.n, self.m
        fields = dict(
            logged=self.lists[chosen], logged_mask=np.ones((size, m), bool), rewards=rewards,
            mu_list=self.mu[chosen], mu_prefix=self.mu_prefix[chosen],
            mu_marginal=np.broadcast_to(self.mu_marginal, (size, n, m)),
            mu_gamma=np.broadcast_to(self.gamma, (size, n * m, n * m)))
        if target == "deterministic":
            fields["target_lists"] = np.broadcast_to(self.lists[self.target], (size, m))
            if model is not None:
                fields["q_target"] = np.broadcast_to(model[self.target], (size, m, 2))
        else:
            fields.update(pi_list=self.pi[chosen], pi_prefix=self.pi_prefix[chosen],
                          pi_marginal=np.broadcast_to(self.pi_marginal, (size, n, m)))
            if model is not None:
                q_logged, q_target = self.cascade_q(model)
                fields.update(q_target=np.broadcast_to(np.einsum("l,lmk->mk", self.pi, model),
                                                       (size, m, 2)),
                              cascade_q_logged=q_logged[chosen],
                              cascade_q_target=q_target[chosen])
        return OffPolicyBatch(**fields)

    def expectation(self, estimator: str, model: str, target: str,
                    reward_model: np.ndarray | None = None) -> np.ndarray:
        """(K,) the exact E_mu of an estimator linear in the feedback and the reward model
        (all but SNIPS): every list once, its feedback and model scaled by L mu(Y), so the
        mean over the L requests is sum_Y mu(Y) estimate(Y)."""
        everything = np.arange(len(self.lists))
        scale = len(self.lists) * self.mu                                      # (L,)
        batch = self.batch(everything, self.models[model] * scale[:, None, None], target,
                           reward_model)
        for name in ("q_target", "cascade_q_logged", "cascade_q_target"):
            if getattr(batch, name) is not None:
                setattr(batch, name, getattr(batch, name) * scale[:, None, None])
        evaluator = OffPolicyEvaluator(WEIGHTS, [estimator], examination=THETA)
        evaluator.add(batch)
        return evaluator.result()[estimator].value


@pytest.fixture(scope="module")
def world() -> World:
    return World()


# Each estimator with a user model that meets its assumption.
FAITHFUL = {"ips": "generic", "iips": "item_position", "pbm": "pbm", "rips": "cascade",
            "cascade_dr": "cascade", "pi": "item_position"}


@pytest.mark.parametrize("target", ["deterministic", "stochastic"])
@pytest.mark.parametrize("estimator", sorted(FAITHFUL))
def test_exactly_unbiased_under_its_assumption(world: World, estimator: str,
                                               target: str) -> None:
    model = FAITHFUL[estimator]
    # Cascade-DR with a wrong reward model (unbiased anyway) as well as the right one.
    wrong = 0.5 * world.models[model] + 0.1
    for reward_model in (world.models[model], wrong):
        expected = world.expectation(estimator, model, target, reward_model)
        assert expected == pytest.approx(world.truth(model, target), rel=1e-9)


@pytest.mark.parametrize("target", ["deterministic", "stochastic"])
def test_direct_method_is_exact_with_the_true_model(world: World, target: str) -> None:
    truth = world.truth("generic", target)
    assert world.expectation("dm", "generic", target, world.models["generic"]) == \
        pytest.approx(truth, rel=1e-9)
    wrong = world.expectation("dm", "generic", target, 0.5 * world.models["generic"])
    assert np.abs(wrong - truth).max() > 0.1 * truth.max()


# Assumptions broken on purpose: the estimators are biased there; the bias is printed (run
# pytest -s) and checked to be visible, so the table documents what each assumption buys.
# Seen with this world (relative bias per behaviour): iips under cascade feedback (-0.20,
# 0.04), pbm under item-position (-0.23, 0.04), rips under feedback that depends on later
# items (-0.25, 0.01), cascade_dr there too, even with the true model of the target's list
# (the same: for a deterministic target its expectation is rips's), pi under that
# non-additive feedback (0.14, -0.08). IPS, with no assumption, has none.
VIOLATED = [("iips", "cascade"), ("pbm", "item_position"), ("rips", "generic"),
            ("cascade_dr", "generic"), ("pi", "generic")]


@pytest.mark.parametrize(("estimator", "model"), VIOLATED)
def test_bias_when_the_assumption_is_violated(world: World, estimator: str,
                                              model: str) -> None:
    truth = world.truth(model, "deterministic")
    expected = world.expectation(estimator, model, "deterministic", world.models[model])
    relative = (expected - truth) / truth
    print(f"{estimator} under {model} feedback: E[estimate] {expected.round(4)}, truth "
          f"{truth.round(4)}, relative bias {relative.round(3)}")
    assert np.abs(relative).max() > 0.02


@pytest.mark.parametrize("target", ["deterministic", "stochastic"])
def test_simulated_logs_agree_with_the_truth(world: World, target: str) -> None:
    # PBM feedback meets every estimator's assumption; 200k requests, Bernoulli feedback.
    rng = np.random.default_rng(1 if target == "deterministic" else 2)
    size = 200_000
    chosen = rng.choice(len(world.lists), size=size, p=world.mu)
    expected = world.models["pbm"]
    rewards = (rng.random((size, world.m, 2)) < expected[chosen]).astype(np.float64)
    truth = world.truth("pbm", target)
    wrong = 0.7 * expected + 0.05                                             # DR's model
    evaluator = OffPolicyEvaluator(WEIGHTS, examination=THETA)
    evaluator.add(world.batch(chosen, rewards, target, wrong))
    for name, estimate in evaluator.result().items():
        assert estimate.skipped is None, name
        if name == "dm":                                                       # a wrong model
            continue
        assert np.abs(estimate.value - truth).max() < 4.5 * estimate.stderr.max(), name
        assert abs(estimate.utility - WEIGHTS @ truth) < 4.5 * estimate.utility_stderr, name
        assert estimate.stderr.max() < 0.05 * truth.max(), name


def test_cascade_dr_with_a_perfect_model_has_no_variance(world: World) -> None:
    rng = np.random.default_rng(3)
    chosen = rng.choice(len(world.lists), size=2000, p=world.mu)
    expected = world.models["cascade"]
    for target in ("deterministic", "stochastic"):
        evaluator = OffPolicyEvaluator(WEIGHTS, ["cascade_dr", "rips"])
        # Feedback without noise: the expected feedback itself.
        evaluator.add(world.batch(chosen, expected[chosen], target, expected))
        results = evaluator.result()
        dr = results["cascade_dr"]
        assert dr.value == pytest.approx(world.truth("cascade", target), rel=1e-12)
        assert dr.stderr.max() < 1e-12
        assert results["rips"].stderr.max() > 1e-3                              # RIPS is not


def test_streaming_equals_one_batch() -> None:
    # Random (inconsistent but valid) inputs of padded lists: lengths 2..4 of 4 positions.
    rng = np.random.default_rng(4)
    size, n, m, draws = 60, 6, 4, 40
    length = np.sort(rng.integers(2, m + 1, size))                             # short first
    mask = np.arange(m)[None, :] < length[:, None]
    logged = np.where(mask, np.argsort(rng.random((size, n)), axis=1)[:, :m], -1)
    target = np.where(mask, np.argsort(rng.random((size, n)), axis=1)[:, :m], -1)
    target[::3] = logged[::3]                                                   # some matches
    target[1::3, :2] = logged[1::3, :2]
    samples = np.argsort(rng.random((size, draws, n)), axis=2)[:, :, :m]
    samples = np.where(mask[:, None, :], samples, -1)
    padding = np.where(mask, 1.0, np.nan)                                      # never read
    full = OffPolicyBatch(
        logged=logged, logged_mask=mask, rewards=rng.random((size, m, 2)) * padding[:, :, None],
        mu_list=rng.uniform(0.01, 0.3, size),
        mu_prefix=np.cumprod(rng.uniform(0.1, 0.6, (size, m)), axis=1) * padding,
        mu_marginal=rng.uniform(0.05, 0.4, (size, n, m)) * padding[:, None, :],
        logging_samples=samples, target_lists=target,
        q_target=rng.random((size, m, 2)) * padding[:, :, None])

    def part(rows: slice, positions: int) -> OffPolicyBatch:
        cut = {name: value[rows] for name, value in vars(full).items() if value is not None}
        for name in ("logged", "logged_mask", "rewards", "mu_prefix", "target_lists",
                     "q_target"):
            cut[name] = cut[name][:, :positions]
        for name in ("mu_marginal", "logging_samples"):
            cut[name] = cut[name][:, :, :positions]
        return OffPolicyBatch(**cut)

    options = dict(examination=np.array([1.0, 0.7, 0.5, 0.4]), max_weight=20.0)
    whole = OffPolicyEvaluator(WEIGHTS, **options)
    whole.add(full)
    streamed = OffPolicyEvaluator(WEIGHTS, **options)
    short = int((length == 2).sum())
    assert short >= 5
    streamed.add(part(slice(0, short), 2))                                     # trimmed to M = 2
    streamed.add(part(slice(short, 31), m))
    streamed.add(part(slice(31, size), m))
    for name, expected in whole.result().items():
        got = streamed.result()[name]
        assert np.isfinite(expected.value).all(), name
        assert got.skipped is None and got.requests == size, name
        for field in ("value", "stderr", "utility", "utility_stderr", "ess", "ess_by_position"):
            want = getattr(expected, field)
            if want is not None:
                assert getattr(got, field) == pytest.approx(want, rel=1e-9), (name, field)
        assert (got.weights, got.clipped) == (expected.weights, expected.clipped), name
    assert whole.result()["ips"].clipped > 0


def test_ips_interval_coverage(world: World) -> None:
    # 300 logs of 1000 requests, stochastic target: about 95 % of the intervals hold the truth.
    rng = np.random.default_rng(5)
    truth = world.truth("generic", "stochastic")
    covered = []
    for _ in range(300):
        chosen = rng.choice(len(world.lists), size=1000, p=world.mu)
        expected = world.models["generic"][chosen]
        rewards = (rng.random(expected.shape) < expected).astype(np.float64)
        evaluator = OffPolicyEvaluator(WEIGHTS, ["ips", "snips"])
        evaluator.add(world.batch(chosen, rewards, "stochastic"))
        result = evaluator.result()
        covered.append([(result[name].low[0] <= truth[0] <= result[name].high[0])
                        for name in ("ips", "snips")])
    coverage = np.mean(covered, axis=0)
    assert ((0.9 <= coverage) & (coverage <= 0.99)).all(), coverage


def test_examination_estimated_and_used_by_evaluate(world: World) -> None:
    rng = np.random.default_rng(6)
    size = 100_000
    chosen = rng.choice(len(world.lists), size=size, p=world.mu)
    expected = world.models["pbm"]
    rewards = (rng.random((size, world.m, 2)) < expected[chosen]).astype(np.float64)
    batches = [world.batch(chosen[rows], rewards[rows], "deterministic")
               for rows in (slice(0, 40_000), slice(40_000, size))]
    estimator = ExaminationEstimator()
    for batch in batches:
        estimator.add(batch)
    assert estimator.result() == pytest.approx(np.repeat(THETA[:, None], 2, axis=1), abs=0.05)
    results = evaluate(batches, WEIGHTS, ["pbm", "ips"])
    pbm = results["pbm"]
    truth = world.truth("pbm", "deterministic")
    # The examination comes from the same logs, so allow a little more than sampling noise.
    assert np.abs(pbm.value - truth).max() < 5 * pbm.stderr.max()
    assert pbm.diagnostics["examination_1_0"] == pytest.approx(THETA[1], abs=0.05)
    # Without marginals there is no first pass and PBM says why.
    bare = [OffPolicyBatch(**{**vars(batch), "mu_marginal": None}) for batch in batches]
    assert "mu_marginal" in evaluate(bare, WEIGHTS, ["pbm"])["pbm"].skipped


# --- PI's Gamma ----------------------------------------------------------------------------


def test_pseudo_inverse_matches_numpy_pinv(world: World) -> None:
    everything = np.arange(len(world.lists))
    batch = world.batch(everything, world.models["generic"][everything], "stochastic")
    weights, outside = pseudo_inverse_weights(
        batch.logged, batch.logged_mask, pi_marginal=batch.pi_marginal, mu_gamma=batch.mu_gamma)
    q = world.pi_marginal.reshape(-1)                                          # slot i * m + k
    slots = world.lists * world.m + np.arange(world.m)                         # (L, m)
    oracle = (np.linalg.pinv(world.gamma) @ q)[slots].sum(axis=1)
    assert weights == pytest.approx(oracle, abs=1e-8)
    assert outside == pytest.approx(np.zeros(len(world.lists)))
    # One request at a time (the smallest chunk) gives the same.
    one_by_one, _ = pseudo_inverse_weights(
        batch.logged, batch.logged_mask, pi_marginal=batch.pi_marginal, mu_gamma=batch.mu_gamma,
        max_bytes=1)
    assert one_by_one == pytest.approx(weights, abs=1e-10)


def test_sampled_gamma_restricted_to_shown_candidates() -> None:
    # Candidate 3 of 5 is never shown by the logging policy: PI keeps 4 * m slots, not 5 * m.
    n, m, draws = 5, 2, 20_000
    lists = np.array(list(itertools.permutations(range(n), m)))
    logits = np.array([0.3, -0.2, 0.5, -np.inf, 0.0])
    mu, _ = plackett_luce(lists, logits)
    slots = np.zeros((len(lists), n * m))
    slots[np.arange(len(lists))[:, None], lists * m + np.arange(m)] = 1.0
    gamma = slots.T @ (mu[:, None] * slots)
    rng = np.random.default_rng(7)
    samples = lists[rng.choice(len(lists), size=(2, draws), p=mu)]             # (2, S, m)
    support = candidate_support(samples, n)
    assert (support[:, 3] == -1).all() and (support.max(axis=1) == 3).all()
    sampled = estimate_slot_gamma(samples, support, max_bytes=2**20)           # chunked
    shown = np.array([0, 1, 2, 4])
    kept_slots = (shown[:, None] * m + np.arange(m)).reshape(-1)
    assert sampled.shape == (2, 4 * m, 4 * m)
    assert np.abs(sampled - gamma[np.ix_(kept_slots, kept_slots)]).max() < 0.015
    logged = np.array([[2, 0], [4, 1]])
    target = np.array([[2, 0], [3, 1]])                                        # 3 is never shown
    exact, exact_outside = pseudo_inverse_weights(
        logged, np.ones((2, m), bool), target_lists=target,
        mu_gamma=np.broadcast_to(gamma, (2, n * m, n * m)))
    estimated, outside = pseudo_inverse_weights(
        logged, np.ones((2, m), bool), target_lists=target, logging_samples=samples)
    assert estimated == pytest.approx(exact, rel=0.1, abs=0.05)
    assert outside == pytest.approx([0.0, 1.0]) and exact_outside == pytest.approx([0.0, 0.0])


def test_evaluator_reports_pi_support_gap() -> None:
    # The samples show only candidates 0 and 1; request 1's target (2, 1) puts candidate 2
    # first, a slot PI cannot see: 1 of its 2 slots is outside, 0 of request 0's -> 0.5.
    samples = np.broadcast_to(np.array([[0, 1], [1, 0]]), (2, 2, 2))
    evaluator = OffPolicyEvaluator([1.0], ["pi"])
    evaluator.add(hand_batch(logging_samples=samples))
    pi = evaluator.result()["pi"]
    assert pi.skipped is None
    assert pi.diagnostics["target_mass_outside_support"] == pytest.approx(0.5)
