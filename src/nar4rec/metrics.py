"""The paper's offline metrics (section 5) and the simulator's ground-truth utility of lists.

Offline metrics take numpy arrays or torch tensors, padded per request as in a RequestBatch
(scores and labels (B, N) with a (B, N) mask of real entries), and return one float:
- Avito protocol (n = m = 5): `auc` and `logloss` of item-wise click predictions, and `ndcg`
  of the ranking of each request's candidates by score, averaged over the requests with a
  click (`ndcg_all_requests` counts the others as 0); `list_ndcg`, each request's NDCG of
  one list (for n = m logs such as MIND's, where a reranker's list of m < n can be scored).
- Kuaishou protocol (n = 60, m = 6): `recall_at_k`, the share of the exposed items that are
  among the model's top k candidates, and `exposure_logloss` of the "is this candidate
  exposed" prediction (Recall@6, Recall@10 and LogLoss of the paper's Table 3).

Simulator metrics score lists (B, m) of candidate indices with the World's exact expected
feedback: `list_utility`, `behaviour_means`, and `captured_lift`, the share of the oracle's
gain over the logging policy that a method captures. Everything is vectorised over requests.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from nar4rec.data.batch import RequestBatch
from nar4rec.errors import Nar4recError
from nar4rec.sim.world import World

Array = np.ndarray | torch.Tensor

# Requests scored by the simulator at once: bounds the (R, N, N) similarity of the candidates.
_SIM_CHUNK = 4096


def auc(scores: Array, labels: Array, mask: Array | None = None) -> float:
    """Global ROC AUC over all masked-in items (not a per-request average).

    Computed from the ranks of the scores, tied scores getting their average rank: the
    Mann-Whitney statistic, equal to scikit-learn's `roc_auc_score`.

    Args:
        scores: (...) predicted scores or probabilities.
        labels: (...) labels; > 0 is positive (a click count of 2 is a click).
        mask: (...) True on items to count; None counts all.
    Returns:
        The AUC, or nan when the masked-in items are all positive or all negative.
    """
    values = _masked(scores, mask)
    positive = _masked(labels, mask) > 0
    positives = int(positive.sum())
    negatives = positive.size - positives
    if positives == 0 or negatives == 0:
        return math.nan
    ranks = _average_ranks(values)
    return float((ranks[positive].sum() - positives * (positives + 1) / 2)
                 / (positives * negatives))


def logloss(probs: Array, labels: Array, mask: Array | None = None, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy over masked-in items, probabilities clipped to [eps, 1 - eps].

    Args:
        probs: (...) predicted probabilities.
        labels: (...) labels in [0, 1].
        mask: (...) True on items to count; None counts all.
    Returns:
        The mean log loss, or nan when no item is masked in.
    """
    p = np.clip(_masked(probs, mask), eps, 1.0 - eps)
    y = _masked(labels, mask)
    if y.size == 0:
        return math.nan
    return float(-(y * np.log(p) + (1.0 - y) * np.log1p(-p)).mean())


def ndcg(scores: Array, labels: Array, mask: Array | None = None,
         k: int | None = None) -> float:
    """Mean over the requests with a positive label of the NDCG of the ranking of each
    request's items by score.

    Each request's NDCG follows scikit-learn's `ndcg_score` (linear gains, discount
    1 / log2(rank + 1), tied scores sharing their group's average gain, only the first k ranks
    if k is given). A request without a click has no ranking better than another, so it is
    left out: on logs where a few percent of the items are clicked, counting it as 0 would make
    the mean measure the click rate. The paper's Table 2 (NDCG 0.69-0.74 on Avito, where about
    1 % of the ads are clicked) can hardly be anything but this mean, though the paper does not
    say. `ndcg_all_requests` is the mean with those requests at 0.

    Args:
        scores: (B, N) predicted scores.
        labels: (B, N) graded relevance, >= 0; > 0 is a click.
        mask: (B, N) True on real items; None counts all.
        k: cut-off rank, or None for the whole list.
    Returns:
        The mean NDCG, or nan when no request has a real item with a positive label.
    """
    per_request = request_ndcg(scores, labels, mask, k)
    clicked = ~np.isnan(per_request)
    return float(per_request[clicked].mean()) if clicked.any() else math.nan


def ndcg_all_requests(scores: Array, labels: Array, mask: Array | None = None,
                      k: int | None = None) -> float:
    """`ndcg` averaged over every request with a real item, a request without a click
    scoring 0 (scikit-learn's `ndcg_score` convention): on sparse clicks it tracks the click
    rate as much as the ranking.

    Arguments as in `ndcg`. Returns nan when no request has a real item.
    """
    per_request, counted, _ = _request_ndcg(scores, labels, mask, k)
    return float(per_request[counted].mean()) if counted.any() else math.nan


def request_ndcg(scores: Array, labels: Array, mask: Array | None = None,
                 k: int | None = None) -> np.ndarray:
    """(B,) each request's `ndcg`, nan for a request without a click (arguments as `ndcg`)."""
    per_request, _, clicked = _request_ndcg(scores, labels, mask, k)
    return np.where(clicked, per_request, math.nan)


def _request_ndcg(scores: Array, labels: Array, mask: Array | None,
                  k: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each request's NDCG of the ranking of its items by score, as scikit-learn's `ndcg_score`.

    Linear gains (the labels, graded), discount 1 / log2(rank + 1), tied scores share the
    average gain of their group (McSherry and Najork 2008), only the first k ranks count if k
    is given; a request whose labels are all 0 scores 0.

    Returns:
        (B,) NDCG per request; (B,) True where a request has a real item; (B,) True where it
        has a real item with a positive label.
    """
    score = _numpy(scores).astype(np.float64)
    batch, width = score.shape
    real = np.ones((batch, width), dtype=bool) if mask is None else _numpy(mask).astype(bool)
    gain = np.where(real, _numpy(labels).astype(np.float64), 0.0)             # (B, N)
    if (gain < 0).any():
        raise ValueError("ndcg needs labels >= 0")
    if k is not None and k < 1:
        raise ValueError(f"ndcg: k must be at least 1, got {k}")
    discount = 1.0 / np.log2(np.arange(width) + 2.0)                          # (N,)
    if k is not None:
        discount[k:] = 0.0
    # Real items first, each request's by descending score; padding after, in its own groups.
    order = np.lexsort((-score, ~real), axis=1)                               # (B, N)
    ranked_score = np.take_along_axis(score, order, axis=1)
    ranked_gain = np.take_along_axis(gain, order, axis=1)
    ranked_real = np.take_along_axis(real, order, axis=1)
    starts_group = np.ones((batch, width), dtype=bool)
    starts_group[:, 1:] = ((ranked_score[:, 1:] != ranked_score[:, :-1])
                           | (ranked_real[:, 1:] != ranked_real[:, :-1]))
    group = np.cumsum(starts_group.ravel()) - 1                               # (B * N,)
    group_size = np.bincount(group)
    group_gain = np.bincount(group, weights=ranked_gain.ravel()) / group_size
    group_discount = np.bincount(group, weights=(discount * ranked_real).ravel())
    group_row = np.repeat(np.arange(batch), width)[starts_group.ravel()]
    dcg = np.bincount(group_row, weights=group_gain * group_discount, minlength=batch)  # (B,)
    ideal = (-np.sort(-gain, axis=1)) @ discount                              # (B,)
    per_request = np.divide(dcg, ideal, out=np.zeros(batch), where=ideal > 0)
    return per_request, real.any(axis=1), ideal > 0


def list_ndcg(lists: Array, labels: Array, k: int | None = None) -> np.ndarray:
    """Each request's NDCG of one list of its candidates against graded labels.

    For a reranker's lists scored against logged feedback (n = m logs, where every candidate
    has a label): the gains of the listed candidates, discount 1 / log2(rank + 1), over the
    best gains any list of that length could have. A request whose labels are all 0 scores 0.

    Args:
        lists: (B, L) candidate indices, NO_ITEM (-1) past a short request's end.
        labels: (B, N) graded relevance of each candidate, >= 0 (0 on padding).
        k: only the first k ranks count (default: all L).
    Returns:
        (B,) float64 NDCG per request.
    """
    chosen = _numpy(lists).astype(np.int64)
    gain = _numpy(labels).astype(np.float64)
    if (gain < 0).any():
        raise ValueError("list_ndcg needs labels >= 0")
    length = chosen.shape[1] if k is None else min(k, chosen.shape[1])
    if length < 1:
        raise ValueError(f"list_ndcg: k must be at least 1, got {k}")
    chosen = chosen[:, :length]
    discount = 1.0 / np.log2(np.arange(length) + 2.0)                         # (L,)
    placed = chosen >= 0
    dcg = (np.take_along_axis(gain, np.where(placed, chosen, 0), axis=1) * placed) @ discount
    best = -np.sort(-gain, axis=1)[:, :length]                                # (B, <= L)
    ideal = best @ discount[:best.shape[1]]
    return np.divide(dcg, ideal, out=np.zeros(len(gain)), where=ideal > 0)


def recall_at_k(scores: Array, exposed: Array, exposed_mask: Array, cand_mask: Array,
                k: int) -> float:
    """Mean over requests of the share of exposed items among the top k candidates by score.

    The Kuaishou protocol of the paper (Recall@6, Recall@10). Ties in score go to the lower
    candidate index; a request with at most k real candidates has them all in its top k.
    Requests with no exposed item are left out.

    Args:
        scores: (B, N) the model's score of each candidate.
        exposed: (B, M) candidate indices of the logged list.
        exposed_mask: (B, M) True on real positions of the logged list.
        cand_mask: (B, N) True on real candidates.
        k: how many top candidates count.
    Returns:
        The mean recall, or nan when no request has an exposed item.
    """
    per_request = request_recall_at_k(scores, exposed, exposed_mask, cand_mask, k)
    counted = ~np.isnan(per_request)
    return float(per_request[counted].mean()) if counted.any() else math.nan


def request_recall_at_k(scores: Array, targets: Array, target_mask: Array, cand_mask: Array,
                        k: int) -> np.ndarray:
    """Each request's share of its target candidates among its top k candidates by score.

    With the logged list as targets this is `recall_at_k` per request; with the logged items
    that were clicked it is the click recall of the evaluation reports (how many of the items
    the user engaged with a list of length k would have held).

    Args:
        scores: (B, N) each candidate's score; ties go to the lower candidate index.
        targets: (B, T) candidate indices.
        target_mask: (B, T) True on real targets.
        cand_mask: (B, N) True on real candidates.
        k: how many top candidates count.
    Returns:
        (B,) float64 recall per request, nan where a request has no target.
    """
    if k < 1:
        raise ValueError(f"recall_at_k: k must be at least 1, got {k}")
    score = _numpy(scores).astype(np.float64)
    real = _numpy(cand_mask).astype(bool)
    wanted = _numpy(target_mask).astype(bool)
    positions = np.where(wanted, _numpy(targets).astype(np.int64), 0)           # (B, T)
    order = np.lexsort((-score, ~real), axis=1)                               # (B, N)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(score.shape[1])[None, :], axis=1)
    in_top = (rank < k) & real                                                # (B, N)
    hits = (np.take_along_axis(in_top, positions, axis=1) & wanted).sum(axis=1)  # (B,)
    count = wanted.sum(axis=1)
    return np.divide(hits, count, out=np.full(len(count), math.nan), where=count > 0)


def exposure_logloss(probs: Array, exposed: Array, exposed_mask: Array, cand_mask: Array,
                     eps: float = 1e-7) -> float:
    """Log loss of the prediction "this candidate is exposed", over real candidates.

    The Kuaishou protocol's LogLoss (Table 3). For a probability matrix, the natural
    prediction is a candidate's row sum (clipped to 1): its expected number of positions.

    Args:
        probs: (B, N) predicted probability that each candidate is in the exposed list.
        exposed: (B, M) candidate indices of the logged list.
        exposed_mask: (B, M) True on real positions of the logged list.
        cand_mask: (B, N) True on real candidates.
    """
    labels = _exposed_labels(exposed, exposed_mask, _numpy(cand_mask).shape)
    return logloss(probs, labels, cand_mask, eps=eps)


def list_utility(world: World, batch: RequestBatch, lists: Array) -> np.ndarray:
    """Exact expected utility R(u, Y) of one list per request of a simulated batch.

    Args:
        world: the simulator's ground truth (`World.load` of the simulated directory).
        batch: requests of simulated data: `user_id` (B,) and `item_id` (B, N) are indices
            into the World's tables, item_id padded with -1.
        lists: (B, m) candidate indices; a list may end early with NO_ITEM (-1) positions,
            which add nothing (a position's feedback depends only on the items above it).
    Returns:
        (B,) expected utility: the weighted sum of the expected behaviour counts.
    """
    return behaviour_means(world, batch, lists) @ world.weights


def behaviour_means(world: World, batch: RequestBatch, lists: Array) -> np.ndarray:
    """Expected count of each behaviour over the positions of each list: (B, K).

    Arguments as in `list_utility`; K follows `world.config.behaviours`.
    """
    users, items = _world_indices(world, batch)
    lists = _numpy(lists).astype(np.int64)
    if lists.ndim != 2 or len(lists) != len(users):
        raise ValueError(f"lists must be (B, m) with B = {len(users)}, got {lists.shape}")
    placed = lists >= 0                                                       # (B, m)
    if (placed[:, 1:] & ~placed[:, :-1]).any():
        raise Nar4recError("a list has an item after an empty (-1) position")
    if (lists >= items.shape[1]).any():
        raise Nar4recError(f"a list index is >= the number of candidates ({items.shape[1]})")
    safe = np.where(placed, lists, 0)
    if (placed & (np.take_along_axis(items, safe, axis=1) < 0)).any():
        raise Nar4recError("a list places a padded candidate")
    distinct = np.sort(np.where(placed, lists, -1 - np.arange(lists.shape[1])), axis=1)
    if (distinct[:, 1:] == distinct[:, :-1]).any():
        raise Nar4recError("a list places the same candidate twice")
    items = np.where(items >= 0, items, 0)   # padded candidates are never looked up
    means = np.zeros((len(users), len(world.config.behaviours)))
    for start in range(0, len(users), _SIM_CHUNK):
        part = slice(start, start + _SIM_CHUNK)
        terms = world.candidate_terms(users[part], items[part])
        feedback = world.list_feedback(terms, safe[part, None, :])[:, 0]    # (R, m, K)
        means[part] = (feedback * placed[part, :, None]).sum(axis=1)
    return means


def captured_lift(method: Array | float, logging: Array | float,
                  oracle: Array | float) -> float:
    """Share of the oracle's gain over logging that a method captures.

    (mean(method) - mean(logging)) / (mean(oracle) - mean(logging)): 0 for the logging policy,
    1 for the oracle. nan when the oracle does not beat logging (denominator ~0).
    """
    method_mean, logging_mean, oracle_mean = (float(np.mean(_numpy(x)))
                                              for x in (method, logging, oracle))
    gap = oracle_mean - logging_mean
    if abs(gap) <= 1e-9 * max(1.0, abs(oracle_mean), abs(logging_mean)):
        return math.nan
    return (method_mean - logging_mean) / gap


def utility_report(method_utility: Array, logging_utility: Array,
                   oracle_utility: Array) -> dict[str, float]:
    """Mean true utility of a method's, the logging policy's and the oracle's lists, and the
    captured lift, all over the same requests."""
    return {
        "utility": float(np.mean(_numpy(method_utility))),
        "logging_utility": float(np.mean(_numpy(logging_utility))),
        "oracle_utility": float(np.mean(_numpy(oracle_utility))),
        "captured_lift": captured_lift(method_utility, logging_utility, oracle_utility),
    }


def _numpy(values: Array | float) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _masked(values: Array, mask: Array | None) -> np.ndarray:
    """The masked-in values, flattened, as float64."""
    values = _numpy(values).astype(np.float64)
    if mask is None:
        return values.ravel()
    return values[_numpy(mask).astype(bool)]


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of values (V,), tied values sharing their average rank."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])        # (G,)
    sizes = np.diff(np.r_[starts, len(values)])
    average = starts + (sizes + 1) / 2.0
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(average, sizes)
    return ranks


def _exposed_labels(exposed: Array, exposed_mask: Array, shape: tuple[int, int]) -> np.ndarray:
    """1 on the candidates of each logged list, 0 elsewhere: (B, N)."""
    shown = _numpy(exposed_mask).astype(bool)
    positions = _numpy(exposed).astype(np.int64)
    labels = np.zeros(shape)
    rows = np.broadcast_to(np.arange(shape[0])[:, None], positions.shape)
    labels[rows[shown], positions[shown]] = 1.0
    return labels


def _world_indices(world: World, batch: RequestBatch) -> tuple[np.ndarray, np.ndarray]:
    """batch.user_id (B,) and batch.item_id (B, N) as World indices, checked."""
    users = np.asarray(batch.user_id)
    items = np.asarray(batch.item_id)
    if not (np.issubdtype(users.dtype, np.integer) and np.issubdtype(items.dtype, np.integer)):
        raise Nar4recError("simulator metrics need simulated data: integer user and item ids "
                           "that index the World's tables")
    if len(users) and (users.min() < 0 or users.max() >= world.n_users):
        raise Nar4recError(f"user ids outside the World's {world.n_users} users: is this "
                           "batch from the data the World simulated?")
    if (items >= world.n_items).any():
        raise Nar4recError(f"item ids outside the World's {world.n_items} items: is this "
                           "batch from the data the World simulated?")
    return users.astype(np.int64), items.astype(np.int64)
