"""Exploring lists with their propensities, so that production logs can evaluate the next model.

A deterministic reranker's logs cannot evaluate another policy: a list it never shows has
probability zero under it. In exploring mode each request is shown, with probability epsilon,
a Plackett-Luce draw over the ranking stage's order instead of the model's list (epsilon
mixing with the upstream order, docs/ope.md): softmax(z / temperature) position by position
over the candidates not yet placed, z the upstream score standardised within the request (a
uniform draw without one). The shown list's probabilities under that mixture are exact where
they can be and are returned with it, in the format's columns, ready to be logged:

    log_propensity                  log P(list) = log((1 - eps) [list = model's] + eps PL(list))
    logging_prefix_log_propensity   the same for each prefix of the list
    logging_marginal                P(candidate i at position k) = (1 - eps) [model's list
                                    has i at k] + eps PL(i at k), the PL term exact at the
                                    first position and Monte Carlo after it
                                    (`propensity.pl_marginals`)

Every model explores the same way: the mixture needs only its lists. Nothing loops over
requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nar4rec import propensity
from nar4rec.errors import Nar4recError


@dataclass(frozen=True)
class Exploration:
    """epsilon: the share of requests shown a Plackett-Luce draw (0 < epsilon <= 1).
    temperature: of that draw, over the request-standardised upstream score.
    samples: Monte Carlo lists per request for the marginals after the first position."""

    epsilon: float
    temperature: float = 1.0
    samples: int = 1024

    def __post_init__(self) -> None:
        if not 0 < self.epsilon <= 1:
            raise Nar4recError(f"exploration epsilon must be in (0, 1], not {self.epsilon}")
        if not self.temperature > 0:
            raise Nar4recError(f"exploration temperature must be > 0, not {self.temperature}")
        if self.samples < 1:
            raise Nar4recError(f"exploration samples must be >= 1, not {self.samples}")


@dataclass
class Explored:
    """B requests' shown lists and their probabilities under the exploring policy.

    lists: (B, m) candidate indices, -1 past a short request's end.
    explored: (B,) True where the Plackett-Luce draw was shown.
    log_propensity: (B,) log-probability of the shown list.
    prefix_log_propensity: (B, m) of each of its prefixes (NaN past its end).
    marginal: (B, N, m) probability of each candidate at each position (0 on padding and
        past a list's end).
    """

    lists: np.ndarray
    explored: np.ndarray
    log_propensity: np.ndarray
    prefix_log_propensity: np.ndarray
    marginal: np.ndarray


def explore(lists: np.ndarray, upstream_score: np.ndarray, cand_mask: np.ndarray,
            config: Exploration, rng: np.random.Generator) -> Explored:
    """Mix a model's lists with Plackett-Luce draws over the upstream order (module docstring).

    Args:
        lists: (B, m) the model's lists, -1 past a short request's end.
        upstream_score: (B, N) the ranking stage's scores (any finite values on padding).
        cand_mask: (B, N) True on real candidates.
        config: epsilon, temperature, samples.
        rng: the draws' random numbers.
    """
    lists = np.asarray(lists, dtype=np.int64)
    real = np.asarray(cand_mask, dtype=bool)
    batch, m = lists.shape
    logits = _logits(np.asarray(upstream_score, dtype=np.float64), real, config.temperature)
    drawn = propensity.fit_width(
        propensity.pl_sample(logits, min(m, logits.shape[1]), rng)[:, 0], m)      # (B, m)
    explored = rng.random(batch) < config.epsilon                             # (B,)
    shown = np.where(explored[:, None], drawn, lists)                         # (B, m)
    eps = config.epsilon
    same_prefix = np.cumprod(shown == lists, axis=1).astype(bool)             # (B, m)
    placed = shown >= 0
    with np.errstate(divide="ignore"):
        pl_prefix = np.exp(propensity.pl_prefix_log_probs(logits, shown))     # (B, m)
        prefix = np.log((1 - eps) * same_prefix + eps * np.nan_to_num(pl_prefix))
    prefix = np.where(placed, prefix, np.nan)
    length = placed.sum(1)
    log_propensity = np.take_along_axis(prefix, np.maximum(length - 1, 0)[:, None], 1)[:, 0]
    pl_marginal = propensity.fit_width(propensity.pl_marginals(
        logits, min(m, logits.shape[1]), samples=config.samples, rng=rng), m)    # (B, N, m)
    own = np.zeros_like(pl_marginal)                                          # (B, N, m)
    rows, positions = np.nonzero(lists >= 0)
    own[rows, lists[rows, positions], positions] = 1.0
    reachable = (np.arange(m)[None, :] < real.sum(1)[:, None])[:, None, :]   # (B, 1, m)
    marginal = ((1 - eps) * own + eps * pl_marginal) * reachable * real[:, :, None]
    return Explored(lists=shown, explored=explored, log_propensity=log_propensity,
                    prefix_log_propensity=prefix, marginal=marginal)


def _logits(score: np.ndarray, real: np.ndarray, temperature: float) -> np.ndarray:
    """(B, N) standardised upstream scores / temperature, -inf on padding."""
    count = np.maximum(real.sum(1, keepdims=True), 1)
    mean = np.where(real, score, 0.0).sum(1, keepdims=True) / count
    spread = np.sqrt(np.where(real, (score - mean) ** 2, 0.0).sum(1, keepdims=True) / count)
    z = (score - mean) / np.where(spread > 0, spread, 1.0)
    return np.where(real, z / temperature, -np.inf)
