"""The upstream stages: who asks, which candidates ranking passes on, and the logging policy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nar4rec.propensity import pl_log_prob, pl_sample
from nar4rec.sim.world import World


@dataclass
class Requests:
    """R simulated requests: the user, n candidates in upstream order, and their scores."""

    users: np.ndarray            # (R,) user index
    items: np.ndarray            # (R, n) item index, sorted by upstream score, descending
    upstream_score: np.ndarray   # (R, n) the ranking stage's noisy estimate of appeal


def sample_requests(world: World, size: int, rng: np.random.Generator) -> Requests:
    """Users by activity; candidates are the top n of a retrieved pool by a noisy ranker.

    The pool is drawn by item popularity (with replacement; repeats are dropped before the
    ranking stage picks its top n).
    """
    c = world.config
    n = c.n_candidates
    users = world.user_urn()[rng.integers(0, len(world.user_urn()), size=size)]
    pool_size = min(n * c.candidate_pool_factor, world.n_items)
    pool, repeated = _pool(world, size, pool_size, n, rng)                    # (R, P)
    first = 0  # the ranking stage predicts the first behaviour (view, click)
    score = (world.affinity(users, pool) + world.item_attr[pool, first]
             + c.upstream_noise * rng.normal(size=pool.shape)).astype(np.float32)
    ranked = np.where(repeated, -np.inf, score)
    top = np.argpartition(-ranked, n - 1, axis=1)[:, :n] if n < pool_size else \
        np.argsort(repeated, axis=1, kind="stable")[:, :n]
    order = np.argsort(-np.take_along_axis(ranked, top, axis=1), axis=1, kind="stable")
    chosen = np.take_along_axis(top, order, axis=1)
    return Requests(users=users.astype(np.int64),
                    items=np.take_along_axis(pool, chosen, axis=1).astype(np.int64),
                    upstream_score=np.take_along_axis(score, chosen, axis=1))


def _pool(world: World, size: int, width: int, need: int,
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(size, width) items drawn by popularity and a mask of repeats (all but the first).

    Rows with fewer than `need` distinct items (tiny catalogues) are redrawn uniformly.
    """
    urn = world.item_urn()
    items = urn[rng.integers(0, len(urn), size=(size, width))]
    repeated = np.zeros_like(items, dtype=bool)
    rows = np.arange(size)
    while True:
        order = np.argsort(items[rows], axis=1, kind="stable")
        ordered = np.take_along_axis(items[rows], order, axis=1)
        repeat_sorted = np.zeros_like(ordered, dtype=bool)
        repeat_sorted[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
        part = np.zeros_like(repeat_sorted)
        np.put_along_axis(part, order, repeat_sorted, axis=1)
        repeated[rows] = part
        short = rows[(width - part.sum(axis=1)) < need]
        if len(short) == 0:
            return items, repeated
        items[short] = rng.integers(0, world.n_items, size=(len(short), width))
        rows = short


def plackett_luce(scores: np.ndarray, m: int, temperature: float,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sample ordered lists of length m from Plackett-Luce over scores / temperature.

    Uses the Gumbel-top-m trick (`propensity.pl_sample`). Returns the lists (R, m) of
    candidate indices and the exact log-probability of each list (R,) under the policy.
    """
    logits = logging_logits(scores, temperature)                             # (R, n)
    lists = pl_sample(logits, m, rng)[:, 0]                                  # (R, m)
    return lists, plackett_luce_log_prob(logits, lists)


def logging_logits(scores: np.ndarray, temperature: float) -> np.ndarray:
    """The logging policy's logits, scores / temperature in float64: (R, n) -> (R, n)."""
    return scores.astype(np.float64) / temperature


def plackett_luce_log_prob(logits: np.ndarray, lists: np.ndarray) -> np.ndarray:
    """log P(list) under Plackett-Luce with the given logits: (R, n), (R, m) -> (R,)
    (`propensity.pl_log_prob`, exact however peaked the policy is)."""
    return pl_log_prob(logits, lists)


def sample_feedback(world: World, probabilities: np.ndarray,
                    rng: np.random.Generator) -> np.ndarray:
    """Draw 0/1 feedback consistent with the marginals: the first behaviour gates the others.

    Args:
        probabilities: (R, m, K) marginals from `World.list_feedback`.
    Returns:
        (R, m, K) float32 feedback.
    """
    first = rng.random(probabilities.shape[:-1]) < probabilities[..., 0]      # (R, m)
    conditional = probabilities[..., 1:] / np.maximum(probabilities[..., :1], 1e-12)
    rest = rng.random(conditional.shape) < conditional                      # (R, m, K-1)
    feedback = np.concatenate([first[..., None], first[..., None] & rest], axis=-1)
    return feedback.astype(np.float32)
