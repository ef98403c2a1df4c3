"""The upstream stages: who asks, which candidates ranking passes on, and the logging policy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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

    Uses the Gumbel-top-m trick. Returns the lists (R, m) of candidate indices and the exact
    log-probability of each list (R,) under the policy.
    """
    logits = scores.astype(np.float64) / temperature                         # (R, n)
    keys = logits + rng.gumbel(size=logits.shape)
    if m < logits.shape[1]:
        top = np.argpartition(-keys, m - 1, axis=1)[:, :m]
    else:
        top = np.broadcast_to(np.arange(logits.shape[1]), logits.shape).copy()
    order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1, kind="stable")
    lists = np.take_along_axis(top, order, axis=1)                           # (R, m)
    return lists, plackett_luce_log_prob(logits, lists)


def plackett_luce_log_prob(logits: np.ndarray, lists: np.ndarray) -> np.ndarray:
    """log P(list) under Plackett-Luce with the given logits: (R, n), (R, m) -> (R,).

    Computed in log space: the denominator at step k is the log-sum-exp of the logits of the
    candidates not yet placed, that is of the unlisted candidates and of list items k..m-1,
    so the result stays exact (and <= 0) however peaked the policy is.
    """
    chosen = np.take_along_axis(logits, lists, axis=1)                       # (R, m)
    unlisted = logits.copy()
    np.put_along_axis(unlisted, lists, -np.inf, axis=1)
    rest = np.logaddexp.reduce(unlisted, axis=1)                              # (R,)
    # Suffix log-sum-exp of the listed logits: log sum_{j >= k} exp(chosen_j).
    suffix = np.logaddexp.accumulate(chosen[:, ::-1], axis=1)[:, ::-1]       # (R, m)
    denominator = np.logaddexp(rest[:, None], suffix)
    return np.minimum(chosen - denominator, 0.0).sum(axis=1)


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
