"""Near-best lists by search on the true expected utility; exhaustive when permutations are few.

Every position's expected feedback depends only on the items above it, so a list's utility is
a sum of per-position gains that a prefix fixes: beam search over prefixes scores them exactly.
Local search (swap two positions, or replace an item by an unused candidate) then polishes the
best beam until no single move improves it.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from nar4rec.sim.world import CandidateTerms, World

# Lists evaluated at once: bounds the (R, L, m, m) similarity gathers to a few hundred MB.
_LIST_BUDGET = 1 << 21


def permutation_count(n: int, m: int) -> int:
    return math.perm(n, m)


def exhaustive(world: World, terms: CandidateTerms, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The best list of every request among all n!/(n-m)! ordered lists: (R, m), (R,)."""
    n = terms.appeal.shape[1]
    perms = np.array(list(itertools.permutations(range(n), m)), dtype=np.int64)  # (P, m)
    requests = terms.appeal.shape[0]
    best_list = np.zeros((requests, m), dtype=np.int64)
    best_utility = np.full(requests, -np.inf)
    rows_per_step = max(1, _LIST_BUDGET // (len(perms) * m))
    for start in range(0, requests, rows_per_step):
        part = slice(start, start + rows_per_step)
        sub = terms.take(part)
        size = sub.appeal.shape[0]
        for p0 in range(0, len(perms), _LIST_BUDGET):
            block = perms[p0:p0 + _LIST_BUDGET]
            lists = np.broadcast_to(block, (size, *block.shape))
            utility = list_utility(world, sub, lists)                          # (r, P)
            arg = utility.argmax(axis=1)
            value = utility[np.arange(size), arg]
            better = value > best_utility[part]
            best_utility[part] = np.where(better, value, best_utility[part])
            best_list[part] = np.where(better[:, None], block[arg], best_list[part])
    return best_list, best_utility


def list_utility(world: World, terms: CandidateTerms, lists: np.ndarray) -> np.ndarray:
    """Expected utility of lists (R, L, m): (R, L)."""
    return world.list_utility(terms, lists)


def beam_search(world: World, terms: CandidateTerms, m: int,
                beam: int) -> tuple[np.ndarray, np.ndarray]:
    """Build lists position by position, keeping the `beam` best prefixes: (R, m), (R,)."""
    requests, n = terms.appeal.shape
    c = world.config
    rows = np.arange(requests)[:, None]
    prefix = np.zeros((requests, 1, 0), dtype=np.int64)
    score = np.zeros((requests, 1))
    max_sim = np.zeros((requests, 1, n), dtype=np.float32)
    carry = np.zeros((requests, 1), dtype=np.float32)
    used = np.zeros((requests, 1, n), dtype=bool)
    for position in range(m):
        gain = world.step_gain(terms, position, max_sim, carry)              # (R, B, n)
        total = np.where(used, -np.inf, score[..., None] + gain)             # (R, B, n)
        flat = total.reshape(requests, -1)
        width = min(beam, int(np.isfinite(flat[0]).sum()))
        pick = np.argpartition(-flat, width - 1, axis=1)[:, :width]          # (R, B')
        parent, item = np.divmod(pick, n)
        score = np.take_along_axis(flat, pick, axis=1)
        prefix = np.concatenate([prefix[rows, parent], item[..., None]], axis=2)
        new_sim = terms.similarity[rows, item]                               # (R, B', n)
        max_sim = np.maximum(max_sim[rows, parent], new_sim)
        appeal = terms.appeal[rows, item]                                    # (R, B')
        carry = c.carryover_decay * carry[rows, parent] + (appeal - c.carryover_baseline)
        used = used[rows, parent]
        used[rows, np.arange(width)[None, :], item] = True
    best = score.argmax(axis=1)
    return prefix[np.arange(requests), best], score[np.arange(requests), best]


def local_search(world: World, terms: CandidateTerms, lists: np.ndarray, utility: np.ndarray,
                 rounds: int, replacements: int) -> tuple[np.ndarray, np.ndarray]:
    """Apply the best improving move, up to `rounds` times per request.

    Moves: swap two positions, or put one of the `replacements` unused candidates with the
    highest utility on their own in place of a listed item. Requests that did not improve in a
    round are left alone in the next.
    """
    requests, n = terms.appeal.shape
    m = lists.shape[1]
    swaps = np.array(list(itertools.combinations(range(m), 2)), dtype=np.int64).reshape(-1, 2)
    pool = min(replacements, n - m)
    moves = len(swaps) + m * pool
    standalone = _standalone_gain(world, terms)                               # (R, n)
    lists = lists.copy()
    utility = utility.copy()
    rows_per_step = max(1, _LIST_BUDGET // (moves * m))
    active = np.arange(requests)
    for _ in range(rounds):
        improved = []
        for start in range(0, len(active), rows_per_step):
            idx = active[start:start + rows_per_step]
            current = lists[idx]                                              # (r, m)
            size = len(idx)
            neighbours = np.repeat(current[:, None, :], moves, axis=1)        # (r, M, m)
            k = np.arange(len(swaps))
            neighbours[:, k, swaps[:, 0]] = current[:, swaps[:, 1]]
            neighbours[:, k, swaps[:, 1]] = current[:, swaps[:, 0]]
            if pool:
                gain = standalone[idx].copy()
                np.put_along_axis(gain, current, -np.inf, axis=1)
                best_unused = np.argpartition(-gain, pool - 1, axis=1)[:, :pool]  # (r, pool)
                position, slot = np.meshgrid(np.arange(m), np.arange(pool), indexing="ij")
                k = len(swaps) + np.arange(m * pool)
                neighbours[:, k, position.ravel()] = best_unused[:, slot.ravel()]
            values = list_utility(world, terms.take(idx), neighbours)          # (r, M)
            arg = values.argmax(axis=1)
            best = values[np.arange(size), arg]
            better = best > utility[idx] + 1e-6
            lists[idx[better]] = neighbours[np.flatnonzero(better), arg[better]]
            utility[idx[better]] = best[better]
            improved.append(idx[better])
        active = np.concatenate(improved) if improved else active[:0]
        if len(active) == 0:
            break
    return lists, utility


def _standalone_gain(world: World, terms: CandidateTerms) -> np.ndarray:
    """Each candidate's expected utility alone at the first position: (R, n)."""
    requests, n = terms.appeal.shape
    return world.step_gain(terms, 0, np.zeros((requests, 1, n), dtype=np.float32),
                           np.zeros((requests, 1), dtype=np.float32))[:, 0]


def oracle(world: World, terms: CandidateTerms, m: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The near-best list of every request and its utility, and the method used."""
    c = world.config
    n = terms.appeal.shape[1]
    if permutation_count(n, m) <= c.exhaustive_limit:
        lists, utility = exhaustive(world, terms, m)
        return lists, utility, "exhaustive"
    lists, utility = beam_search(world, terms, m, c.oracle_beam)
    # Local search starts from the better of the beam's list and the item-wise top m.
    top = itemwise_top(world, terms, m)
    top_utility = list_utility(world, terms, top[:, None, :])[:, 0]
    better = top_utility > utility
    lists = np.where(better[:, None], top, lists)
    utility = np.where(better, top_utility, utility)
    lists, utility = local_search(world, terms, lists, utility, c.oracle_local_rounds,
                                  c.oracle_replacements)
    return lists, utility, (f"beam search (width {c.oracle_beam}) + local search "
                            f"({c.oracle_local_rounds} rounds, {c.oracle_replacements} "
                            "replacements)")


def itemwise_top(world: World, terms: CandidateTerms, m: int) -> np.ndarray:
    """Top m candidates by their utility alone at the first position, no list context: (R, m)."""
    requests, n = terms.appeal.shape
    gain = _standalone_gain(world, terms)                                     # (R, n)
    top = np.argpartition(-gain, m - 1, axis=1)[:, :m] if m < n else \
        np.broadcast_to(np.arange(n), (requests, n))
    order = np.argsort(-np.take_along_axis(gain, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)
