"""Off-policy evaluation of rerankers: a target policy's value estimated from another's logs.

A request shows a ranked list Y = (y_1, ..., y_m) of m of its n candidates, drawn by the
logging policy mu; the user answers with feedback r_k in K behaviours at each position k. The
value of a target policy pi (a reranker's lists) is the expected feedback per request,
V(pi) = E_x E_{Y ~ pi} [sum_k r_k]  (K,), and its utility sum_b w_b V_b. The estimators below
read it off logs of mu; they trade assumptions on how users react to a list for variance:

    estimator    weight on the logged feedback                      unbiased when
    dm           none: a reward model's predictions of pi's lists   the model is right
    ips, snips   pi(Y) / mu(Y) on the list's total                   always (snips: consistent)
    iips         pi(y_k at k) / mu(y_k at k) on r_k                  r_k depends on (y_k, k) only
    pbm          sum_k' theta_k' pi(y_k at k') / (same for mu)       r_k = theta_k alpha(y_k)
    rips         pi(y_1..y_k) / mu(y_1..y_k) on r_k                  r_k depends on y_1..y_k only
    cascade_dr   rips's weights around a reward model                as rips, or model right
    pi           q_pi' Gamma_mu^+ 1_Y on the list's total            list total additive in slots

Everything streams: `OffPolicyEvaluator.add` takes one `OffPolicyBatch` of requests (numpy
arrays, padded per batch) and keeps running sums only, so logs larger than memory are read
batch by batch; `result` gives each estimator's `Estimate` (value per behaviour, utility, a
normal-approximation interval over requests, the effective sample size of its weights and how
many were clipped), or the reason it was skipped when its inputs are missing. PBM's
examination probabilities, when not known, come from a first pass (`ExaminationEstimator`);
`evaluate` runs both passes over re-iterable batches.

Shapes: B requests in a batch, M positions, N candidates, K behaviours, S sampled lists.
Probabilities are plain probabilities (exp of `nar4rec.propensity`'s log-probabilities; a
Plackett-Luce list of 10 out of 100 has probability around 1e-20, well inside float64).
Values past a short list's end (padding) are never read, NaN included.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from nar4rec.errors import Nar4recError

ESTIMATORS = ("dm", "ips", "snips", "iips", "pbm", "rips", "cascade_dr", "pi")

# What each optional input of an OffPolicyBatch is, for the reasons of skipped estimators.
_INPUTS = {
    "mu_list": "the logging policy's probability of each logged list, (B,)",
    "mu_prefix": "the logging policy's probability of each logged prefix y_1..y_k, (B, M)",
    "mu_marginal": "the logging policy's probability of each candidate at each position, "
                   "(B, N, M)",
    "logging_samples or mu_gamma": "lists sampled from the logging policy, (B, S, M), or its "
                                   "slot Gamma, (B, N*M, N*M)",
    "target_lists or pi_list": "the target's lists, (B, M), or its probability of each logged "
                               "list, (B,)",
    "target_lists or pi_prefix": "the target's lists, (B, M), or its probability of each "
                                 "logged prefix, (B, M)",
    "target_lists or pi_marginal": "the target's lists, (B, M), or its probability of each "
                                   "candidate at each position, (B, N, M)",
    "q_target": "the reward model's predicted feedback at each position of the target's lists, "
                "(B, M, K)",
    "cascade_q_logged and cascade_q_target": "Q-values of the logged prefixes under the "
                                             "stochastic target, (B, M, K) each",
    "examination": "PBM's examination probability of each position: pass `examination=`, "
                   "e.g. from ExaminationEstimator over the same logs (`evaluate` does both "
                   "passes)",
}


@dataclass
class OffPolicyBatch:
    """One batch of logged requests and what the estimators need to know about both policies.

    Only the first three fields are required; an estimator whose inputs are missing is skipped
    with a reason (`Estimate.skipped`). The target is either deterministic (`target_lists`,
    from which its probabilities are derived) or stochastic (`pi_list`, `pi_prefix`,
    `pi_marginal`: its probabilities of the logged lists, prefixes and slots), not both.

    Fields (B requests, M positions, N candidates, K behaviours, S sampled lists):
        logged: (B, M) int candidate indices of the logged lists, -1 (NO_ITEM) on padding.
        logged_mask: (B, M) True on real logged positions.
        rewards: (B, M, K) observed feedback of each behaviour at each logged position.
        mu_list: (B,) logging probability of the whole logged list, mu(Y).
        mu_prefix: (B, M) logging probability of the logged prefix, mu(y_1..y_k).
        mu_marginal: (B, N, M) logging probability of candidate i at position k.
        logging_samples: (B, S, M) lists drawn from the logging policy (for PI's Gamma).
        mu_gamma: (B, N*M, N*M) the logging policy's exact slot Gamma (for PI, instead of
            samples); slot (i, k) is row i * M + k.
        target_lists: (B, M) the deterministic target's list of each request, -1 on padding.
        pi_list: (B,) the stochastic target's probability of the logged list.
        pi_prefix: (B, M) the stochastic target's probability of the logged prefix.
        pi_marginal: (B, N, M) the stochastic target's probability of candidate i at k.
        q_target: (B, M, K) the reward model's predicted feedback at position k of the
            target's list (for a stochastic target: its expectation under pi).
        cascade_q_logged: (B, M, K) stochastic target only: Q_k(y_1..y_k), the predicted
            feedback from position k to the end of a list that starts with the logged prefix
            y_1..y_k and that the target completes.
        cascade_q_target: (B, M, K) stochastic target only: E_{a ~ pi(. | y_1..y_k-1)}
            Q_k(y_1..y_k-1, a).
    """

    logged: np.ndarray
    logged_mask: np.ndarray
    rewards: np.ndarray
    mu_list: np.ndarray | None = None
    mu_prefix: np.ndarray | None = None
    mu_marginal: np.ndarray | None = None
    logging_samples: np.ndarray | None = None
    mu_gamma: np.ndarray | None = None
    target_lists: np.ndarray | None = None
    pi_list: np.ndarray | None = None
    pi_prefix: np.ndarray | None = None
    pi_marginal: np.ndarray | None = None
    q_target: np.ndarray | None = None
    cascade_q_logged: np.ndarray | None = None
    cascade_q_target: np.ndarray | None = None


@dataclass
class Estimate:
    """One estimator's answer over all the requests added, or why it has none.

    `value`, `stderr`, `low`, `high` are per behaviour (K,): the expected count of each
    behaviour per request and its normal-approximation interval over requests. `utility` is
    sum_b w_b value_b, with its own interval. `ess` is the effective sample size
    (sum w)^2 / sum w^2 of the estimator's importance weights (after clipping), the smallest
    over positions for position-wise weights (`ess_by_position`, (M,)); `clipped` of `weights`
    weights were cut to the maximum. `skipped` holds the reason when the estimator could not
    run; then the numbers are None.
    """

    estimator: str
    requests: int
    value: np.ndarray | None = None
    stderr: np.ndarray | None = None
    low: np.ndarray | None = None
    high: np.ndarray | None = None
    utility: float | None = None
    utility_stderr: float | None = None
    utility_low: float | None = None
    utility_high: float | None = None
    ess: float | None = None
    ess_by_position: np.ndarray | None = None
    weights: int | None = None
    clipped: int | None = None
    diagnostics: dict[str, float] = field(default_factory=dict)
    skipped: str | None = None

    def to_dict(self) -> dict:
        """Plain floats and lists (JSON-ready)."""
        def plain(value):
            if isinstance(value, np.ndarray):
                return value.tolist()
            return value
        return {name: plain(getattr(self, name)) for name in self.__dataclass_fields__}


class OffPolicyEvaluator:
    """Running sums of every requested estimator over batches of logs; `result` at the end.

    Only sums are kept (per estimator: the mean and covariance of its per-request terms by
    Chan's pairwise update, and sums of weights and squared weights per position), so adding
    the logs in any split into batches gives the same result up to rounding. An estimator
    missing an input in any batch is skipped from then on, with the reason.

    Args:
        behaviour_weights: (K,) utility weight of each behaviour.
        estimators: which of ESTIMATORS to run.
        max_weight: clip importance weights to at most this (PI's to [-max, max]); None: no
            clipping. Clipping trades bias for variance; `Estimate.clipped` counts the cuts.
        examination: PBM's examination probability of each position, (M,) or (M, K) per
            behaviour (only ratios matter); None skips PBM (see ExaminationEstimator).
        confidence: the level of the intervals.
        pi_min_count: PI keeps a candidate when it appears at least this often in a request's
            logging samples (shrinks Gamma from n*m to the slots the logging policy shows).
        pi_rcond: eigenvalues of Gamma below pi_rcond times its largest count as zero.
        pi_max_bytes: memory budget of PI's Gamma stacks; sets how many requests go at once.
    """

    def __init__(self, behaviour_weights: Sequence[float] | np.ndarray,
                 estimators: Sequence[str] = ESTIMATORS, *, max_weight: float | None = None,
                 examination: np.ndarray | None = None, confidence: float = 0.95,
                 pi_min_count: int = 1, pi_rcond: float = 1e-9,
                 pi_max_bytes: int = 256 * 2**20) -> None:
        unknown = sorted(set(estimators) - set(ESTIMATORS))
        if unknown:
            raise Nar4recError(f"unknown estimator(s) {unknown}; known: {list(ESTIMATORS)}")
        if max_weight is not None and max_weight <= 0:
            raise Nar4recError(f"max_weight must be positive, got {max_weight}")
        if not 0 < confidence < 1:
            raise Nar4recError(f"confidence must be in (0, 1), got {confidence}")
        self.behaviour_weights = np.asarray(behaviour_weights, dtype=np.float64)   # (K,)
        self.estimators = tuple(name for name in ESTIMATORS if name in estimators)
        self.max_weight = max_weight
        self.examination = None if examination is None else _examination_matrix(examination)
        self.confidence = confidence
        self.pi_min_count = pi_min_count
        self.pi_rcond = pi_rcond
        self.pi_max_bytes = pi_max_bytes
        self._states = {name: _State() for name in self.estimators}
        self._batches = 0

    def add(self, batch: OffPolicyBatch) -> None:
        """Add one batch of requests to every estimator that has its inputs."""
        view = _BatchView(batch, len(self.behaviour_weights))
        self._batches += 1
        for name, state in self._states.items():
            if state.skipped is not None:
                continue
            reason = self._missing(name, view)
            if reason is not None:
                state.skip(reason if self._batches == 1 else f"{reason} (from batch "
                           f"{self._batches} on)")
                continue
            terms = getattr(self, f"_{name}")(view)
            state.add(terms)

    def result(self) -> dict[str, Estimate]:
        """Each estimator's `Estimate` over all requests added so far."""
        z = NormalDist().inv_cdf(0.5 + self.confidence / 2)
        return {name: state.estimate(name, self.behaviour_weights, z, ratio=name == "snips")
                for name, state in self._states.items()}

    # Which inputs each estimator needs ------------------------------------------------

    def _missing(self, name: str, view: _BatchView) -> str | None:
        batch = view.batch
        needs: list[tuple[str, bool]] = []
        deterministic = batch.target_lists is not None
        if name == "dm":
            needs = [("q_target", batch.q_target is not None)]
        elif name in ("ips", "snips"):
            needs = [("mu_list", batch.mu_list is not None),
                     ("target_lists or pi_list", deterministic or batch.pi_list is not None)]
        elif name in ("iips", "pbm"):
            needs = [("mu_marginal", batch.mu_marginal is not None),
                     ("target_lists or pi_marginal",
                      deterministic or batch.pi_marginal is not None)]
            if name == "pbm":
                needs.append(("examination", self.examination is not None))
        elif name == "rips":
            needs = [("mu_prefix", batch.mu_prefix is not None),
                     ("target_lists or pi_prefix", deterministic or batch.pi_prefix is not None)]
        elif name == "cascade_dr":
            needs = [("mu_prefix", batch.mu_prefix is not None),
                     ("target_lists or pi_prefix", deterministic or batch.pi_prefix is not None)]
            if deterministic:
                needs.append(("q_target", batch.q_target is not None))
            else:
                needs.append(("cascade_q_logged and cascade_q_target",
                              batch.cascade_q_logged is not None
                              and batch.cascade_q_target is not None))
        elif name == "pi":
            needs = [("logging_samples or mu_gamma",
                      batch.logging_samples is not None or batch.mu_gamma is not None),
                     ("target_lists or pi_marginal",
                      deterministic or batch.pi_marginal is not None)]
        missing = [need for need, present in needs if not present]
        if not missing:
            if name == "pbm" and self.examination.shape[0] < view.positions:
                return (f"examination has {self.examination.shape[0]} positions, the lists "
                        f"have {view.positions}")
            if name == "pbm" and self.examination.shape[1] not in (1, view.behaviours):
                return (f"examination has {self.examination.shape[1]} behaviours, the "
                        f"feedback {view.behaviours}")
            return None
        return "needs " + "; ".join(f"{need}: {_INPUTS[need]}" for need in missing)

    # The estimators: per-request terms (B, K) and their weights -------------------------

    def _dm(self, view: _BatchView) -> _Terms:
        """The direct method: V = mean_r sum_k qhat_k(pi's list of r), a reward model's
        predicted feedback of the target's lists (Dudik et al. 2011, "Doubly robust policy
        evaluation and learning", ICML: the estimator with no importance weights)."""
        q = np.where(view.target_mask[:, :, None], view.q_target, 0.0)         # (B, M, K)
        return _Terms(values=q.sum(axis=1))

    def _ips(self, view: _BatchView) -> _Terms:
        """Whole-list IPS: V = mean_r w_r R_r, w = pi(Y) / mu(Y), R = sum_k r_k
        (Swaminathan and Joachims 2015, "Batch learning from logged bandit feedback through
        counterfactual risk minimization", JMLR 16: the IPS estimator with the whole list as
        the action; "SIPS" in McInerney et al. 2020 and Kiyohara et al. 2022)."""
        weight = view.pi_list() / _positive("mu_list", view.batch.mu_list)      # (B,)
        weight, clipped = _clip(weight, self.max_weight)
        return _Terms(values=weight[:, None] * view.list_rewards,
                      weights=weight[:, None, None], weight_mask=np.ones((view.size, 1), bool),
                      clipped=clipped)

    def _snips(self, view: _BatchView) -> _Terms:
        """Self-normalised IPS: V = sum_r w_r R_r / sum_r w_r (Swaminathan and Joachims 2015,
        "The self-normalized estimator for counterfactual learning", NeurIPS). Its
        terms are (w R, w) (K + 1,); `Estimate` takes the ratio and its delta-method
        variance."""
        terms = self._ips(view)
        weight = terms.weights[:, 0, 0]                                        # (B,)
        terms.values = np.concatenate([terms.values, weight[:, None]], axis=1)  # (B, K + 1)
        return terms

    def _iips(self, view: _BatchView) -> _Terms:
        """Item-position IPS: V = mean_r sum_k pi(y_k at k) / mu(y_k at k) r_k (Li et al.
        2018, "Offline evaluation of ranking policies with click models", KDD: the estimator
        of the item-position model; "IIPS" in Kiyohara et al. 2022). Unbiased when the
        feedback at k depends only on the item shown there and k."""
        mu_at = np.diagonal(view.mu_at(), axis1=1, axis2=2)                     # (B, M)
        pi_at = np.diagonal(view.pi_at(), axis1=1, axis2=2)                     # (B, M)
        weight = pi_at / _positive("mu_marginal at the logged slots", mu_at, view.mask)
        return self._position_terms(view, weight)

    def _pbm(self, view: _BatchView) -> _Terms:
        """Position-based model estimator: V = mean_r sum_k w_k r_k with
        w_k = sum_k' theta_k' pi(y_k at k') / sum_k' theta_k' mu(y_k at k') (Li et al. 2018,
        KDD: the estimator of the position-based model). Unbiased when
        P(r_k | y_k = i) = theta_k alpha_i:
        E_mu[sum_k r_k w(y_k)] = sum_i alpha_i sum_k theta_k mu(i at k) w(i)
        = sum_i alpha_i sum_k' theta_k' pi(i at k'). Only ratios of theta matter; with theta
        per behaviour (M, K) the weights are per behaviour too."""
        theta = self.examination[:view.positions]                              # (M, Kt)
        shown = np.einsum("bkj,jt->bkt", view.mu_at(), theta)                  # (B, M, Kt)
        wanted = np.einsum("bkj,jt->bkt", view.pi_at(), theta)                 # (B, M, Kt)
        shown = _positive("sum_k theta_k mu(y at k)", shown, view.mask)
        weight = wanted / shown
        return self._position_terms(view, weight)

    def _rips(self, view: _BatchView) -> _Terms:
        """Reward-interaction (cascade) IPS: V = mean_r sum_k pi(y_1..y_k) / mu(y_1..y_k) r_k
        (McInerney et al. 2020, "Counterfactual evaluation of slate recommendations with
        sequential reward interactions", KDD: the cascade weights pi(y_1..y_k) / mu(y_1..y_k),
        here not self-normalised; "RIPS" in Kiyohara et al. 2022). Unbiased when the feedback at k
        depends only on y_1..y_k (a user who reads the list from the top)."""
        weight = view.pi_prefix() / _positive("mu_prefix", view.batch.mu_prefix, view.mask)
        return self._position_terms(view, weight)

    def _cascade_dr(self, view: _BatchView) -> _Terms:
        """Cascade doubly robust (Kiyohara et al. 2022, "Doubly robust off-policy evaluation
        for ranking policies under the cascade behavior model", WSDM, Sec. 3.1):
        V = mean_r sum_k [w_1:k (r_k - Q_k(y_1..y_k)) + w_1:k-1 E_{a ~ pi(.|y_1..y_k-1)}
        Q_k(y_1..y_k-1, a)], w_1:k = pi(y_1..y_k) / mu(y_1..y_k), w_1:0 = 1, and Q_k the
        predicted feedback from position k to the end (the Q-function: with it a perfect
        model of deterministic feedback gives every request the exact value).

        For a deterministic target w_1:k is 0 unless the logged prefix is the target's, where
        both Q's are the target's own: Q_k = sum_{l >= k} q_target_l, and the estimator is
        DM plus the prefix-weighted residuals, sum_k q_k + sum_k w_1:k (r_k - q_k). For a
        stochastic target the caller gives the Q's (`cascade_q_logged`,
        `cascade_q_target`)."""
        prefix = view.pi_prefix() / _positive("mu_prefix", view.batch.mu_prefix, view.mask)
        prefix, clipped = _clip(prefix * view.mask, self.max_weight)            # (B, M)
        before = np.concatenate([np.ones((view.size, 1)), prefix[:, :-1]], axis=1)
        if view.batch.target_lists is not None:
            q = np.where(view.target_mask[:, :, None], view.q_target, 0.0)     # (B, M, K)
            q_logged = q_target = np.flip(np.cumsum(np.flip(q, 1), axis=1), 1)
        else:
            q_logged = np.asarray(view.batch.cascade_q_logged, dtype=np.float64)
            q_target = np.asarray(view.batch.cascade_q_target, dtype=np.float64)
        terms = np.where(view.mask[:, :, None],
                         prefix[:, :, None] * (view.rewards - q_logged)
                         + before[:, :, None] * q_target, 0.0)                 # (B, M, K)
        return _Terms(values=terms.sum(axis=1), weights=prefix[:, :, None],
                      weight_mask=view.mask, clipped=clipped)

    def _pi(self, view: _BatchView) -> _Terms:
        """The pseudo-inverse estimator (Swaminathan et al. 2017, "Off-policy evaluation for
        slate recommendation", NeurIPS): V = mean_r q_pi' Gamma_mu^+ 1_Y R_r, with
        1_Y the (n m) indicator of the logged list's (candidate, position) slots,
        q_pi = E_pi[1_Y] and Gamma_mu = E_mu[1_Y 1_Y']. Unbiased when the expected total
        feedback of a list is additive over its slots (and q_pi lies in Gamma's range). See
        `pseudo_inverse_weights` for Gamma and its cost."""
        batch = view.batch
        weight, outside = pseudo_inverse_weights(
            batch.logged, view.mask, target_lists=batch.target_lists,
            pi_marginal=batch.pi_marginal, logging_samples=batch.logging_samples,
            mu_gamma=batch.mu_gamma, min_count=self.pi_min_count, rcond=self.pi_rcond,
            max_bytes=self.pi_max_bytes)                                       # (B,), (B,)
        weight, clipped = _clip(weight, self.max_weight, symmetric=True)
        return _Terms(values=weight[:, None] * view.list_rewards,
                      weights=weight[:, None, None], weight_mask=np.ones((view.size, 1), bool),
                      clipped=clipped,
                      diagnostics={"target_mass_outside_support": float(outside.sum())})

    def _position_terms(self, view: _BatchView, weight: np.ndarray) -> _Terms:
        """sum_k w_k r_k over real positions, weights (B, M) or (B, M, Kt) clipped."""
        if weight.ndim == 2:
            weight = weight[:, :, None]                                        # (B, M, 1)
        weight, clipped = _clip(weight * view.mask[:, :, None], self.max_weight)
        return _Terms(values=(weight * view.rewards).sum(axis=1), weights=weight,
                      weight_mask=view.mask, clipped=clipped)


class ExaminationEstimator:
    """PBM's examination probabilities theta_k / theta_1 estimated from the logs themselves.

    Under the position-based model (Li et al. 2018, KDD; Craswell et al. 2008) the
    feedback at position k on candidate i has mean theta_k alpha_i. Weighting each logged
    r_k by 1 / mu(y_k at k) (the item-position IPS of "every candidate, placed at k"):
        E_mu[r_k / mu(y_k at k)] = sum_i mu(i at k) theta_k alpha_i / mu(i at k)
                                 = theta_k sum_{i: mu(i at k) > 0} alpha_i,
    so when every candidate can reach every position (Plackett-Luce logging) the sum over
    requests S_k = sum_r r_rk / mu_r(y_rk at k) is proportional to theta_k with the same
    constant for all k, and theta_k / theta_1 = S_k / S_1. Requests shorter than k + 1
    positions are left out of both S_k and its S_1, so the constant stays the same. Per
    behaviour, the result is clipped to [floor, 1] (the top position is assumed the most
    examined); a position with no feedback at the top gets 1.
    """

    def __init__(self) -> None:
        self._at_k = np.zeros((0, 0))                                          # (M, K)
        self._at_top = np.zeros((0, 0))                                        # (M, K)

    def add(self, batch: OffPolicyBatch) -> None:
        """Add the sums of one batch; it needs `mu_marginal`."""
        if batch.mu_marginal is None:
            raise Nar4recError("ExaminationEstimator needs mu_marginal: "
                               + _INPUTS["mu_marginal"])
        view = _BatchView(batch, None)
        mu_at = np.diagonal(view.mu_at(), axis1=1, axis2=2)                     # (B, M)
        mu_at = _positive("mu_marginal at the logged slots", mu_at, view.mask)
        scaled = view.rewards / mu_at[:, :, None]                              # (B, M, K)
        at_k = scaled.sum(axis=0)                                              # (M, K)
        at_top = np.einsum("bm,bk->mk", view.mask.astype(np.float64), scaled[:, 0])
        self._at_k = _add_rows(self._at_k, at_k)
        self._at_top = _add_rows(self._at_top, at_top)

    def result(self, floor: float = 1e-3) -> np.ndarray:
        """(M, K) theta_k / theta_1 per behaviour, in [floor, 1]."""
        ratio = np.divide(self._at_k, self._at_top, out=np.ones_like(self._at_k),
                          where=self._at_top > 0)
        return np.clip(ratio, floor, 1.0)


def evaluate(batches: Callable[[], Iterable[OffPolicyBatch]] | Iterable[OffPolicyBatch],
             behaviour_weights: Sequence[float] | np.ndarray,
             estimators: Sequence[str] = ESTIMATORS, *, examination: np.ndarray | None = None,
             **options) -> dict[str, Estimate]:
    """Run the estimators over batches; estimate PBM's examination in a first pass if needed.

    Args:
        batches: a function returning a fresh iterable of batches, or a re-iterable
            collection (read twice when PBM needs the first pass).
        behaviour_weights: (K,) utility weights.
        estimators: which of ESTIMATORS.
        examination: (M,) or (M, K) for PBM; None estimates it from the logs when the batches
            carry `mu_marginal`.
        options: the other arguments of OffPolicyEvaluator.
    Returns:
        Each estimator's Estimate; `Estimate.diagnostics` of PBM holds the examination used.
    """
    def read():
        return batches() if callable(batches) else batches

    if "pbm" in estimators and examination is None:
        if not callable(batches) and iter(batches) is batches:
            raise Nar4recError("PBM's examination needs two passes over the batches: pass a "
                               "function returning a fresh iterable, or a list")
        first = ExaminationEstimator()
        for batch in read():
            if batch.mu_marginal is None:
                first = None
                break
            first.add(batch)
        examination = None if first is None else first.result()
    evaluator = OffPolicyEvaluator(behaviour_weights, estimators, examination=examination,
                                   **options)
    for batch in read():
        evaluator.add(batch)
    results = evaluator.result()
    if "pbm" in results and examination is not None:
        theta = _examination_matrix(examination)                               # (M, Kt)
        results["pbm"].diagnostics.update(
            {f"examination_{k}" + ("" if theta.shape[1] == 1 else f"_{b}"): float(theta[k, b])
             for k in range(theta.shape[0]) for b in range(theta.shape[1])})
    return results


# PI's Gamma ---------------------------------------------------------------------------


def candidate_support(samples: np.ndarray, n_candidates: int, min_count: int = 1) -> np.ndarray:
    """(R, N) each candidate's compact index among those PI keeps, -1 for the others.

    A candidate is kept when it appears at least `min_count` times in the request's sampled
    logging lists: the slots the logging policy can realistically show.

    Args:
        samples: (R, S, M) lists drawn from the logging policy, -1 on padding.
        n_candidates: N, more than the largest candidate index.
        min_count: appearances needed.
    """
    rows = np.arange(len(samples))
    drawn = samples >= 0
    flat = (rows[:, None, None] * n_candidates + samples)[drawn]
    counts = np.bincount(flat, minlength=len(samples) * n_candidates)
    kept = counts.reshape(len(samples), n_candidates) >= min_count             # (R, N)
    return np.where(kept, np.cumsum(kept, axis=1) - 1, -1)


def estimate_slot_gamma(samples: np.ndarray, support: np.ndarray,
                        max_bytes: int = 256 * 2**20) -> np.ndarray:
    """Monte Carlo estimate of Gamma_mu = E_mu[1_Y 1_Y'] over each request's kept slots.

    Slot (i, k), i a kept candidate's compact index, is row i * M + k. Every sampled list
    adds 1 at each pair of its slots (M^2 pairs; one bincount over all pair indices of a chunk
    of requests); Gamma is the count over S. The chunk is sized so the pair indices and the
    counts stay within max_bytes.

    Args:
        samples: (R, S, M) lists drawn from the logging policy, -1 on padding.
        support: (R, N) from `candidate_support`.
    Returns:
        (R, D, D) Gamma, D = M times the most candidates any request keeps.
    """
    size, draws, m = samples.shape
    width = int(max((support >= 0).sum(axis=1).max(initial=0), 1)) * m
    gamma = np.empty((size, width, width))
    per_request = 8 * (3 * draws * m * m + 2 * width * width)
    chunk = max(1, max_bytes // per_request)
    for start in range(0, size, chunk):
        part = slice(start, min(start + chunk, size))
        slots = _slots(samples[part], support[part])                           # (C, S, M)
        rows = np.arange(len(slots))[:, None, None, None]
        pairs = rows * width * width + slots[..., :, None] * width + slots[..., None, :]
        valid = (slots[..., :, None] >= 0) & (slots[..., None, :] >= 0)        # (C, S, M, M)
        counts = np.bincount(pairs[valid], minlength=len(slots) * width * width)
        gamma[part] = counts.reshape(len(slots), width, width) / draws
    return gamma


def pseudo_inverse_weights(logged: np.ndarray, logged_mask: np.ndarray, *,
                           target_lists: np.ndarray | None = None,
                           pi_marginal: np.ndarray | None = None,
                           logging_samples: np.ndarray | None = None,
                           mu_gamma: np.ndarray | None = None, min_count: int = 1,
                           rcond: float = 1e-9,
                           max_bytes: int = 256 * 2**20) -> tuple[np.ndarray, np.ndarray]:
    """PI's weight q_pi' Gamma_mu^+ 1_Y of each logged list (Swaminathan et al. 2017).

    Gamma comes from `mu_gamma` (exact, all N*M slots) or from `logging_samples` (Monte Carlo,
    over the slots of the candidates the samples show at least min_count times: the rows and
    columns of never-shown slots would be zero anyway). Gamma is symmetric positive
    semi-definite, so its pseudo-inverse applied to q_pi is computed from a batched `eigh`,
    eigenvalues below rcond times the largest dropped (the m - 1 directions that every list
    satisfies, sum_i 1[(i, k)] = 1 for each k, are exactly null). Requests go in chunks whose
    Gamma stacks fit in max_bytes.

    Cost per request: O(S m^2) to count the sampled pairs and O(D^3) for `eigh` with
    D = (kept candidates) * m; memory about 3 * 8 D^2 bytes. Measured on one core: n = 60,
    m = 6 (D = 360, S = 2000) 0.03 s per request; n = 100, m = 10 (D = 1000, S = 4000)
    0.35 s and 24 MB per request, so an hour per 10,000 requests: keep D small with
    min_count, and use S of several times D samples: with fewer, the sampled Gamma is
    rank-deficient and its pseudo-inverse biased (PI is unbiased with the exact Gamma only).

    Args:
        logged: (R, M) logged candidate indices, -1 on padding.
        logged_mask: (R, M) True on real positions.
        target_lists: (R, M) deterministic target (q_pi its slot indicator), or
        pi_marginal: (R, N, M) the stochastic target's slot probabilities.
        logging_samples: (R, S, M) lists from the logging policy, or
        mu_gamma: (R, N*M, N*M) the exact Gamma, slot (i, k) at row i * M + k.
    Returns:
        (R,) weights, and (R,) the target's slot mass outside the kept slots (lost by PI).
    """
    size, m = logged.shape
    logged = np.where(logged_mask, logged, -1)
    n_candidates = 1 + max(int(logged.max(initial=-1)),
                           -1 if target_lists is None else int(target_lists.max(initial=-1)),
                           -1 if pi_marginal is None else pi_marginal.shape[1] - 1,
                           -1 if logging_samples is None
                           else int(logging_samples.max(initial=-1)),
                           -1 if mu_gamma is None else mu_gamma.shape[1] // m - 1)
    if mu_gamma is not None and mu_gamma.shape[1] != n_candidates * m:
        raise Nar4recError(f"mu_gamma has {mu_gamma.shape[1]} slots, but the candidate "
                           f"indices need {n_candidates} * {m}")
    draws = 0 if logging_samples is None else logging_samples.shape[1]
    width = n_candidates * m
    per_request = 8 * (3 * draws * m * m + 4 * width * width) + 1
    chunk = max(1, max_bytes // per_request)
    weights = np.empty(size)
    outside = np.empty(size)
    for start in range(0, size, chunk):
        part = slice(start, min(start + chunk, size))
        if mu_gamma is not None:
            support = np.broadcast_to(np.arange(n_candidates), (len(logged[part]), n_candidates))
            gamma = np.asarray(mu_gamma[part], dtype=np.float64)
        else:
            support = candidate_support(logging_samples[part], n_candidates, min_count)
            gamma = estimate_slot_gamma(logging_samples[part], support, max_bytes)
        q, outside[part] = _target_slots(support, m, gamma.shape[1],
                                         None if target_lists is None else target_lists[part],
                                         None if pi_marginal is None else pi_marginal[part])
        z = _pinv_apply(gamma, q, rcond)                                       # (C, D)
        slots = _slots(logged[part], support)                                  # (C, M)
        picked = np.take_along_axis(z, np.maximum(slots, 0), axis=1)
        weights[part] = (picked * (slots >= 0)).sum(axis=1)
    return weights, outside


def _slots(lists: np.ndarray, support: np.ndarray) -> np.ndarray:
    """(C, ..., M) slot index compact(i) * M + k of each listed candidate, -1 where padded or
    not kept."""
    m = lists.shape[-1]
    rows = np.arange(len(lists)).reshape((-1,) + (1,) * (lists.ndim - 1))
    compact = support[rows, np.maximum(lists, 0)]
    valid = (lists >= 0) & (compact >= 0)
    return np.where(valid, compact * m + np.arange(m), -1)


def _target_slots(support: np.ndarray, m: int, width: int, target_lists: np.ndarray | None,
                  pi_marginal: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(C, D) q_pi over the kept slots and (C,) the target's mass outside them."""
    size = len(support)
    q = np.zeros(size * width)
    if target_lists is not None:
        slots = _slots(target_lists, support)                                  # (C, M)
        flat = np.arange(size)[:, None] * width + slots
        q[flat[slots >= 0]] = 1.0
        outside = ((target_lists >= 0) & (slots < 0)).sum(axis=1).astype(np.float64)
    else:
        marginal = np.asarray(pi_marginal, dtype=np.float64)                   # (C, N, M)
        compact = support[:, :marginal.shape[1]]                               # (C, N)
        kept = np.broadcast_to((compact >= 0)[:, :, None], marginal.shape)
        flat = (np.arange(size)[:, None, None] * width
                + compact[:, :, None] * m + np.arange(m))                      # (C, N, M)
        q[flat[kept]] = marginal[kept]
        outside = (marginal * ~kept).sum(axis=(1, 2))
    return q.reshape(size, width), outside


def _pinv_apply(gamma: np.ndarray, q: np.ndarray, rcond: float) -> np.ndarray:
    """(C, D) Gamma^+ q for symmetric positive semi-definite (C, D, D) Gamma, via eigh."""
    values, vectors = np.linalg.eigh(gamma)                                    # (C, D), (C, D, D)
    cutoff = rcond * np.maximum(values[:, -1:], 0.0)
    inverse = np.divide(1.0, values, out=np.zeros_like(values),
                        where=(values > cutoff) & (values > 0))
    coords = np.einsum("cdj,cd->cj", vectors, q)                               # (C, D)
    return np.einsum("cdj,cj->cd", vectors, inverse * coords)


# Internals ------------------------------------------------------------------------------


@dataclass
class _Terms:
    """One batch of an estimator: per-request terms and (optionally) its weights."""

    values: np.ndarray                      # (B, K), or (B, K + 1) for snips: (w R, w)
    weights: np.ndarray | None = None       # (B, P, Kt) after clipping
    weight_mask: np.ndarray | None = None   # (B, P) which weights are real
    clipped: int = 0
    diagnostics: dict[str, float] = field(default_factory=dict)


class Moments:
    """Running mean and scatter matrix of vectors, merged batch by batch (Chan et al. 1979)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: np.ndarray | None = None
        self.scatter: np.ndarray | None = None

    def add(self, values: np.ndarray) -> None:
        count = len(values)
        if count == 0:
            return
        mean = values.mean(axis=0)                                             # (D,)
        centred = values - mean
        scatter = centred.T @ centred                                          # (D, D)
        if self.count == 0:
            self.count, self.mean, self.scatter = count, mean, scatter
            return
        total = self.count + count
        delta = mean - self.mean
        self.scatter = self.scatter + scatter + np.outer(delta, delta) * self.count * count / total
        self.mean = self.mean + delta * count / total
        self.count = total

    def covariance(self) -> np.ndarray:
        """Sample covariance (D, D); nan with fewer than two vectors."""
        if self.count < 2:
            return np.full_like(self.scatter, math.nan)
        return self.scatter / (self.count - 1)


class _State:
    """One estimator's running sums, or the reason it was skipped."""

    def __init__(self) -> None:
        self.moments = Moments()
        self.weight_sum = np.zeros((0, 0))                                     # (P, Kt)
        self.weight_square = np.zeros((0, 0))                                  # (P, Kt)
        self.weight_count = 0
        self.clipped = 0
        self.weighted = False
        self.diagnostics: dict[str, float] = {}
        self.skipped: str | None = None

    def skip(self, reason: str) -> None:
        self.skipped = reason
        self.moments = Moments()

    def add(self, terms: _Terms) -> None:
        self.moments.add(terms.values)
        for name, value in terms.diagnostics.items():
            self.diagnostics[name] = self.diagnostics.get(name, 0.0) + value
        if terms.weights is None:
            return
        self.weighted = True
        real = terms.weight_mask[:, :, None]                                   # (B, P, 1)
        weights = terms.weights * real
        self.weight_sum = _add_rows(self.weight_sum, weights.sum(axis=0))
        self.weight_square = _add_rows(self.weight_square, (weights ** 2).sum(axis=0))
        self.weight_count += int(np.broadcast_to(real, weights.shape).sum())
        self.clipped += terms.clipped

    def estimate(self, name: str, behaviour_weights: np.ndarray, z: float,
                 ratio: bool) -> Estimate:
        moments = self.moments
        if self.skipped is not None:
            return Estimate(name, 0, skipped=self.skipped)
        if moments.count == 0:
            return Estimate(name, 0, skipped="no requests were added")
        covariance = moments.covariance()
        if ratio:
            # V = mean(w R) / mean(w); delta method: dV / d(mean(w R), mean(w)) = (I, -V) / mean(w).
            mean_weight = moments.mean[-1]
            if mean_weight <= 0:
                return Estimate(name, moments.count, skipped="no logged list has a positive "
                                "weight: the target never shows what the logs show")
            value = moments.mean[:-1] / mean_weight                            # (K,)
            gradient = np.concatenate([np.eye(len(value)), -value[:, None]], axis=1) \
                / mean_weight                                                  # (K, K + 1)
            covariance = gradient @ covariance @ gradient.T                    # (K, K)
        else:
            value = moments.mean
        covariance = covariance / moments.count
        stderr = np.sqrt(np.maximum(np.diagonal(covariance), 0.0))
        utility = float(behaviour_weights @ value)
        utility_stderr = float(np.sqrt(max(behaviour_weights @ covariance @ behaviour_weights,
                                           0.0)))
        estimate = Estimate(
            name, moments.count, value=value, stderr=stderr, low=value - z * stderr,
            high=value + z * stderr, utility=utility, utility_stderr=utility_stderr,
            utility_low=utility - z * utility_stderr, utility_high=utility + z * utility_stderr,
            diagnostics={key: total / moments.count for key, total in self.diagnostics.items()})
        if self.weighted:
            ess = np.divide(self.weight_sum ** 2, self.weight_square,
                            out=np.zeros_like(self.weight_sum),
                            where=self.weight_square > 0)                      # (P, Kt)
            estimate.ess_by_position = ess.min(axis=1)
            estimate.ess = float(ess.min())
            estimate.weights = self.weight_count
            estimate.clipped = self.clipped
        return estimate


class _BatchView:
    """A batch checked and with the target's probabilities derived (computed once each)."""

    def __init__(self, batch: OffPolicyBatch, behaviours: int | None) -> None:
        self.batch = batch
        logged = np.asarray(batch.logged)
        self.size, self.positions = logged.shape
        self.mask = np.asarray(batch.logged_mask, dtype=bool)                  # (B, M)
        self.logged = np.where(self.mask, logged, -1).astype(np.int64)
        rewards = np.asarray(batch.rewards, dtype=np.float64)
        _shape("logged_mask", self.mask, (self.size, self.positions))
        _shape("rewards", rewards, (self.size, self.positions, behaviours))
        self.rewards = np.where(self.mask[:, :, None], rewards, 0.0)            # (B, M, K)
        self.list_rewards = self.rewards.sum(axis=1)                           # (B, K)
        k = self.behaviours = rewards.shape[2]
        stochastic = [name for name in ("pi_list", "pi_prefix", "pi_marginal")
                      if getattr(batch, name) is not None]
        if batch.target_lists is not None and stochastic:
            raise Nar4recError("give the target either as target_lists (deterministic) or as "
                               f"its probabilities, not both (also got {stochastic})")
        for name, shape in (("mu_list", (self.size,)), ("mu_prefix", (self.size, self.positions)),
                            ("mu_marginal", (self.size, None, self.positions)),
                            ("logging_samples", (self.size, None, self.positions)),
                            ("mu_gamma", (self.size, None, None)),
                            ("target_lists", (self.size, self.positions)),
                            ("pi_list", (self.size,)), ("pi_prefix", (self.size, self.positions)),
                            ("pi_marginal", (self.size, None, self.positions)),
                            ("q_target", (self.size, self.positions, k)),
                            ("cascade_q_logged", (self.size, self.positions, k)),
                            ("cascade_q_target", (self.size, self.positions, k))):
            if getattr(batch, name) is not None:
                _shape(name, getattr(batch, name), shape)
        if batch.target_lists is not None:
            self.target = np.asarray(batch.target_lists, dtype=np.int64)       # (B, M)
            self.target_mask = self.target >= 0
        else:
            self.target = None
            self.target_mask = self.mask
        self._cache: dict[str, np.ndarray] = {}

    @property
    def q_target(self) -> np.ndarray:
        return np.asarray(self.batch.q_target, dtype=np.float64)

    def pi_list(self) -> np.ndarray:
        """(B,) the target's probability of the logged list."""
        if self.target is None:
            return np.asarray(self.batch.pi_list, dtype=np.float64)
        return self.pi_prefix()[:, -1]

    def pi_prefix(self) -> np.ndarray:
        """(B, M) the target's probability of the logged prefix y_1..y_k (1 on padding after
        a list's end, so the last column is the whole list's)."""
        if self.target is None:
            return np.where(self.mask, np.asarray(self.batch.pi_prefix, dtype=np.float64), 0.0)
        if "pi_prefix" not in self._cache:
            same = (self.logged == self.target) | ~self.mask                   # (B, M)
            self._cache["pi_prefix"] = np.cumprod(same, axis=1).astype(np.float64)
        return self._cache["pi_prefix"]

    def mu_at(self) -> np.ndarray:
        """(B, M, M) mu(y_k at k'): the logging probability of the candidate logged at k
        sitting at position k'."""
        if "mu_at" not in self._cache:
            self._cache["mu_at"] = self._at(self.batch.mu_marginal)
        return self._cache["mu_at"]

    def pi_at(self) -> np.ndarray:
        """(B, M, M) pi(y_k at k'), from the target's lists or its marginals."""
        if "pi_at" not in self._cache:
            if self.target is None:
                self._cache["pi_at"] = self._at(self.batch.pi_marginal)
            else:
                same = self.logged[:, :, None] == self.target[:, None, :]      # (B, M, M)
                real = self.mask[:, :, None] & self.mask[:, None, :]
                self._cache["pi_at"] = (same & real).astype(np.float64)
        return self._cache["pi_at"]

    def _at(self, marginal: np.ndarray) -> np.ndarray:
        rows = np.arange(self.size)[:, None]
        at = np.asarray(marginal, dtype=np.float64)[rows, np.maximum(self.logged, 0)]
        return np.where(self.mask[:, :, None] & self.mask[:, None, :], at, 0.0)  # (B, M, M)


def _examination_matrix(examination: np.ndarray) -> np.ndarray:
    """(M, Kt) examination probabilities, Kt = 1 for one shared by all behaviours."""
    theta = np.asarray(examination, dtype=np.float64)
    theta = theta[:, None] if theta.ndim == 1 else theta
    if theta.ndim != 2 or (theta <= 0).any():
        raise Nar4recError("examination must be (M,) or (M, K) positive probabilities, got "
                           f"shape {theta.shape}")
    return theta


def _clip(weight: np.ndarray, max_weight: float | None,
          symmetric: bool = False) -> tuple[np.ndarray, int]:
    """Weights cut to max_weight (to [-max, max] when symmetric) and how many were cut."""
    if max_weight is None:
        return weight, 0
    size = np.abs(weight) if symmetric else weight
    clipped = int((size > max_weight).sum())
    low = -max_weight if symmetric else -np.inf
    return np.clip(weight, low, max_weight), clipped


def _positive(name: str, values, mask: np.ndarray | None = None) -> np.ndarray:
    """values as float64, after checking they are > 0 wherever mask (or everywhere)."""
    values = np.asarray(values, dtype=np.float64)
    real = np.ones(values.shape, bool) if mask is None else \
        np.broadcast_to(mask.reshape(mask.shape + (1,) * (values.ndim - mask.ndim)),
                        values.shape)
    if (values[real] <= 0).any() or np.isnan(values[real]).any():
        raise Nar4recError(f"{name} must be > 0 at every logged position: a logged list must "
                           "have positive probability under the logging policy")
    return np.where(real, values, 1.0)


def _add_rows(total: np.ndarray, part: np.ndarray) -> np.ndarray:
    """total + part for (P, K) sums whose P may grow from batch to batch."""
    rows = max(total.shape[0], part.shape[0])
    grown = np.zeros((rows, part.shape[1]))
    grown[:total.shape[0]] += total if total.size else 0.0
    grown[:part.shape[0]] += part
    return grown


def _shape(name: str, array, shape: tuple[int | None, ...]) -> None:
    actual = np.shape(array)
    if len(actual) != len(shape) or any(want is not None and got != want
                                        for got, want in zip(actual, shape, strict=True)):
        expected = tuple("*" if want is None else want for want in shape)
        raise Nar4recError(f"{name} has shape {actual}, expected {expected}")
