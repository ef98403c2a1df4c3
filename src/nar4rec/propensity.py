"""The logging policy's probabilities, for off-policy evaluation (docs/ope.md).

A Plackett-Luce (PL) policy over logits l (Plackett 1975; Luce 1959) draws a list position by
position from the candidates not yet placed:

    P(y_k = i | y_<k) = exp(l_i) / sum over j not in y_<k of exp(l_j)

`pl_log_prob` and `pl_prefix_log_probs` give a list's probability and its prefixes' exactly;
`pl_sample` draws lists (the Gumbel-top-m trick); `pl_marginals` estimates P(candidate i at
position k). `logging_probabilities` turns what a log says of its logging policy (a batch's
`LoggingPolicy`: a PL logger's scores and temperature, or explicit marginals and prefix
probabilities) into what an estimator needs, or says which column is missing.

Every function works on whole batches in numpy float64, no loop over requests. Shapes: logits
(R, N) with -inf for padding candidates (never drawn); lists (R, M) of candidate indices,
padded with NO_ITEM (-1) after their end.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from nar4rec.data.format import (
    LOG_PROPENSITY,
    LOGGING_MARGINAL,
    LOGGING_PREFIX,
    LOGGING_SCORE,
    LOGGING_TEMPERATURE,
)
from nar4rec.errors import DataError

if TYPE_CHECKING:
    import torch

    from nar4rec.data.batch import LoggingPolicy

NO_ITEM = -1
MARGINAL_BYTES = 128 * 2**20   # what pl_marginals holds at once, beyond its (R, N, m) result
QUANTITIES = ("list_log_prob", "prefix_log_prob", "marginal")


def pl_log_prob(logits: np.ndarray, lists: np.ndarray) -> np.ndarray:
    """Exact log-probability of each list under Plackett-Luce.

    Args:
        logits: (R, N) float, -inf for padding candidates.
        lists: (R, M) candidate indices in list order, NO_ITEM (-1) after a list's end.
    Returns:
        (R,) float64 log P(list), <= 0: the sum over its positions of log P(y_k | y_<k).
    """
    steps, _ = _pl_steps(logits, lists)
    return steps.sum(axis=1)


def pl_prefix_log_probs(logits: np.ndarray, lists: np.ndarray) -> np.ndarray:
    """Exact log-probability of each list's prefixes under Plackett-Luce.

    Args:
        logits: (R, N) float, -inf for padding candidates.
        lists: (R, M) candidate indices in list order, NO_ITEM (-1) after a list's end.
    Returns:
        (R, M) float64: [r, k] = log P(the list's first k+1 items, in order), non-increasing
        in k, NaN past a short list's end; the last real entry is `pl_log_prob`.
    """
    steps, placed = _pl_steps(logits, lists)
    return np.where(placed, np.cumsum(steps, axis=1), np.nan)


def _pl_steps(logits: np.ndarray, lists: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(R, M) log P(y_k | y_<k) (0 past a list's end) and (R, M) where a list has an item.

    Computed in log space: the denominator at step k is the log-sum-exp of the logits of the
    candidates not yet placed, that is of the unlisted candidates and of list items k..M-1, so
    the result stays exact (and <= 0) however peaked the policy is. A list item with logit
    -inf (a padding candidate) is a step of probability 0 (-inf).
    """
    logits = np.asarray(logits, dtype=np.float64)
    lists = np.asarray(lists, dtype=np.int64)
    rows, width = logits.shape
    placed = lists >= 0                                                      # (R, M)
    extended = np.concatenate([logits, np.full((rows, 1), -np.inf)], axis=1)  # (R, N+1)
    index = np.where(placed, lists, width)           # past the end: the extra -inf column
    chosen = np.take_along_axis(extended, index, axis=1)                     # (R, M)
    unlisted = extended.copy()
    np.put_along_axis(unlisted, index, -np.inf, axis=1)
    rest = np.logaddexp.reduce(unlisted[:, :width], axis=1)                  # (R,)
    # Suffix log-sum-exp of the listed logits: log sum_{j >= k} exp(chosen_j).
    suffix = _suffix_log_sum_exp(chosen)                                     # (R, M)
    denominator = np.logaddexp(rest[:, None], suffix)
    with np.errstate(invalid="ignore"):                       # -inf - -inf past the end
        steps = np.minimum(chosen - denominator, 0.0)
    steps = np.where(chosen == -np.inf, -np.inf, steps)
    return np.where(placed, steps, 0.0), placed


def pl_sample(logits: np.ndarray, m: int, rng: np.random.Generator,
              samples: int = 1) -> np.ndarray:
    """Sample lists of length m from Plackett-Luce by the Gumbel-top-m trick: the m largest
    of logits + Gumbel noise, in descending order, are a PL list (Yellott 1977).

    Args:
        logits: (R, N) float, -inf for padding candidates.
        m: list length; a request with fewer than m real candidates gets a shorter list.
        rng: the source of the noise: `rng.gumbel` of shape (R, samples, N), as the
            simulator's logging policy has always drawn it (`sim.policy.plackett_luce`).
        samples: lists per request.
    Returns:
        (R, samples, m) int64 candidate indices, NO_ITEM (-1) past a short list's end.
    """
    logits = np.asarray(logits, dtype=np.float64)
    rows, width = logits.shape
    keys = logits[:, None, :] + rng.gumbel(size=(rows, samples, width))      # (R, S, N)
    return _top(-keys, m)


def _pl_sample_fast(logits: np.ndarray, m: int, rng: np.random.Generator,
                    samples: int) -> np.ndarray:
    """`pl_sample` with the Gumbel noise made from `rng.random` by vectorised logarithms,
    -log(-log(1 - U)), as `rng.gumbel` makes it one number at a time: the same draws up to the
    last bit of a logarithm, several times faster."""
    logits = np.asarray(logits, dtype=np.float64)
    rows, width = logits.shape
    noise = rng.random(size=(rows, samples, width))                          # (R, S, N)
    np.negative(noise, out=noise)
    np.log1p(noise, out=noise)                       # log(1 - U) < 0
    np.negative(noise, out=noise)                    # an exponential variate E
    with np.errstate(divide="ignore"):
        np.log(noise, out=noise)                     # -Gumbel = log E
    np.subtract(noise, logits[:, None, :], out=noise)                        # -(l + Gumbel)
    return _top(noise, m)


def _top(negative_keys: np.ndarray, m: int) -> np.ndarray:
    """The indices of the m smallest negative keys (the largest keys) along the last axis,
    smallest first; NO_ITEM where fewer than m are below +inf (keys above -inf)."""
    if m < 1:
        raise ValueError(f"a list needs m >= 1 positions, got {m}")
    width = negative_keys.shape[-1]
    take = min(m, width)
    if take < width:
        top = np.argpartition(negative_keys, take - 1, axis=-1)[..., :take]
    else:
        top = np.broadcast_to(np.arange(width), negative_keys.shape).copy()
    order = np.argsort(np.take_along_axis(negative_keys, top, axis=-1), axis=-1, kind="stable")
    lists = np.take_along_axis(top, order, axis=-1)
    lists = np.where(np.take_along_axis(negative_keys, lists, axis=-1) < np.inf, lists, NO_ITEM)
    if take < m:
        lists = np.concatenate([lists, np.full((*lists.shape[:-1], m - take), NO_ITEM)],
                               axis=-1)
    return lists


def pl_marginals(logits: np.ndarray, m: int, *, samples: int = 4096,
                 rng: np.random.Generator | None = None, max_bytes: int = MARGINAL_BYTES,
                 exact_lists: int | None = None) -> np.ndarray:
    """P(candidate i is shown at position k) under Plackett-Luce, for the first m positions.

    Exact when there are few ordered lists: if N candidate slots give at most `exact_lists`
    (default: `samples`) ordered lists of length min(m, N), every one is enumerated (5
    candidates shown in any order: 120 lists), for no more work than sampling.

    Otherwise position 0 is exact (the softmax), and later positions are Monte Carlo over
    `samples` sampled lists per request, Rao-Blackwellised: each sampled list contributes, at
    every position k, the exact conditional distribution P(y_k = i | its first k items)
    rather than the one item it placed there. The estimate is unbiased; every column sums to
    1 over the candidates (while a request has candidates left), and a candidate gets a
    positive probability at every position that some sampled prefix leaves it free for.
    Each entry averages numbers in [0, 1], so its standard deviation is at most
    0.5 / sqrt(samples) (0.0078 for 4096), and less in practice (about half of what counting
    the sampled items gives, in our tests).

    Cost: about R * samples * N work (some 10 s per thousand requests of 60 candidates at
    4096 samples, on one core). Memory: lists are drawn and reduced in pieces of at most
    `max_bytes` (requests at a time, or one request's samples in parts) besides the
    (R, N, m) result; the pieces draw the noise in the order one draw of shape
    (R, samples, N) would, so the result does not depend on `max_bytes` (up to rounding).

    Args:
        logits: (R, N) float, -inf for padding candidates.
        m: positions.
        samples: sampled lists per request.
        rng: the source of the sampling noise; None for np.random.default_rng(0).
        max_bytes: the memory a piece may hold.
        exact_lists: enumerate the lists when there are at most this many (0: always sample).
    Returns:
        (R, N, m) float64; 0 for padding candidates and for positions a request's candidates
        cannot fill.
    """
    logits = np.asarray(logits, dtype=np.float64)
    rng = np.random.default_rng(0) if rng is None else rng
    rows, width = logits.shape
    if math.perm(width, min(m, width)) <= (samples if exact_lists is None else exact_lists):
        return _exact_marginals(logits, m, max_bytes)
    total = np.zeros((rows, width, m))
    per_sample = 8 * (2 * width + 4 * m * (m + 1) + 8 * m)   # bytes held per sampled list
    block = max(1, max_bytes // per_sample)                   # sampled lists per piece
    if block >= samples:
        step = block // samples
        pieces = [(start, min(start + step, rows), samples) for start in range(0, rows, step)]
    else:
        pieces = [(row, row + 1, min(block, samples - first))
                  for row in range(rows) for first in range(0, samples, block)]
    for start, stop, count in pieces:
        part = logits[start:stop]
        total[start:stop] += _conditional_sums(part, _pl_sample_fast(part, m, rng, count))
    marginal = total / samples
    with np.errstate(invalid="ignore"):                      # a request with no candidates
        marginal[:, :, 0] = np.exp(logits - np.logaddexp.reduce(logits, axis=1)[:, None])
    return marginal


def _exact_marginals(logits: np.ndarray, m: int, max_bytes: int) -> np.ndarray:
    """`pl_marginals` by enumerating every ordered list of min(m, N) candidates: P(i at k) is
    the sum of P(y_0..y_k) over the distinct prefixes ending in i (each prefix is shared by
    the same number of full lists). Padding candidates make prefixes of probability 0."""
    rows, width = logits.shape
    length = min(m, width)
    lists = np.array(list(itertools.permutations(range(width), length)), np.int64)   # (P, L)
    shared = np.array([math.perm(width - k - 1, length - k - 1) for k in range(length)])
    onehot = np.zeros((len(lists), length, width))                           # (P, L, N)
    onehot[np.arange(len(lists))[:, None], np.arange(length), lists] = 1.0
    marginal = np.zeros((rows, width, m))
    step = max(1, max_bytes // (8 * len(lists) * (width + 8 * length)))
    for start in range(0, rows, step):
        part = logits[start:start + step]                                     # (c, N)
        prefix = pl_prefix_log_probs(np.repeat(part, len(lists), axis=0),
                                     np.tile(lists, (len(part), 1)))          # (c * P, L)
        weight = np.exp(prefix).reshape(len(part), len(lists), length) / shared   # (c, P, L)
        marginal[start:start + step, :, :length] = np.einsum("cpk,pki->cik", weight, onehot)
    return marginal


def _conditional_sums(logits: np.ndarray, lists: np.ndarray) -> np.ndarray:
    """Sum over sampled lists of P(y_k = i | the list's first k items): (R, N), (R, S, M) ->
    (R, N, M).

    The candidates free at position k are those the list never placed and its items at
    positions >= k. With D_k the log-sum-exp of their logits and u the largest logit never
    placed, exp(l_i - D_k) = exp(l_i - u) * exp(u - D_k) for a candidate never placed: one
    product (N, S) @ (S, M) per request, of factors <= 1 (no overflow however peaked the
    policy); the item placed at position j adds exp(l_{y_j} - D_k) at each k <= j, <= 1 too.
    """
    rows, width = logits.shape
    _, samples, m = lists.shape
    placed = lists >= 0                                                       # (R, S, M)
    index = np.maximum(lists, 0)
    chosen = np.where(placed, np.take_along_axis(logits[:, None, :], index, axis=2),
                      -np.inf)                                                # (R, S, M)
    free = np.broadcast_to(logits[:, None, :], (rows, samples, width)).copy()  # (R, S, N)
    # Past a list's end every real candidate is placed: writing -inf at candidate 0 again
    # changes nothing then.
    np.put_along_axis(free, index, -np.inf, axis=2)
    top = free.max(axis=2)                                                    # (R, S)
    some = top > -np.inf                                  # any candidate left never placed
    scaled = free
    with np.errstate(invalid="ignore"):
        np.subtract(scaled, top[..., None], out=scaled)
        np.exp(scaled, out=scaled)                                            # exp(l_i - u)
    scaled[~some] = 0.0
    with np.errstate(divide="ignore"):
        rest = np.where(some, top + np.log(scaled.sum(axis=2)), -np.inf)      # (R, S)
    suffix = np.empty_like(chosen)           # log sum_{j >= k} exp(chosen_j), (R, S, M)
    suffix[..., m - 1] = chosen[..., m - 1]
    for k in range(m - 2, -1, -1):
        suffix[..., k] = _logaddexp(chosen[..., k], suffix[..., k + 1])
    denominator = _logaddexp(rest[..., None], suffix)                         # D_k
    with np.errstate(invalid="ignore"):
        lift = np.exp(np.where(some[..., None] & (denominator > -np.inf),
                               top[..., None] - denominator, -np.inf))        # (R, S, M)
    sums = np.matmul(scaled.transpose(0, 2, 1), lift)                         # (R, N, M)

    position, later = np.triu_indices(m)                      # the pairs (j, k), j >= k
    counted = placed[..., later]                                              # (R, S, P)
    with np.errstate(invalid="ignore"):                   # -inf - -inf past a list's end
        weight = np.where(counted, chosen[..., later] - denominator[..., position], -np.inf)
    np.exp(weight, out=weight)
    cell = (np.arange(rows)[:, None, None] * width + index[..., later]) * m + position
    sums += np.bincount(cell.ravel(), weights=weight.ravel(),
                        minlength=rows * width * m).reshape(rows, width, m)
    return sums


def _logaddexp(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """np.logaddexp(x, y) from vectorised exp and log1p, several times faster (to the last
    bit or two; the exact functions keep numpy's)."""
    high = np.maximum(x, y)
    with np.errstate(invalid="ignore"):                            # -inf - -inf
        out = high + np.log1p(np.exp(np.minimum(x, y) - high))
    return np.where(high == -np.inf, -np.inf, out)


def _suffix_log_sum_exp(values: np.ndarray) -> np.ndarray:
    """log sum_{j >= k} exp(values_j) along the last axis, for every k (-inf where all are)."""
    return np.logaddexp.accumulate(values[..., ::-1], axis=-1)[..., ::-1]


@dataclass
class LoggingProbabilities:
    """What an off-policy estimator needs of the logging policy, for B logged lists cut to M
    positions; a field is None when the log cannot give it, `missing[name]` saying which
    columns it would need. NaN marks a request whose logging policy the log does not know (a
    null), and positions past a list's end in `prefix_log_prob`.

    list_log_prob: (B,) log P(the list) under the logging policy.
    prefix_log_prob: (B, M) log P(the list's first k+1 items, in order).
    marginal: (B, N, M) P(candidate i shown at position k), 0 past a list's end (the logger
        showed nothing there).
    sources: {name: the columns it came from}, e.g. {"marginal": "logging_marginal"}.
    """

    list_log_prob: np.ndarray | None = None
    prefix_log_prob: np.ndarray | None = None
    marginal: np.ndarray | None = None
    missing: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def require(self, name: str, *, file: str | None = None) -> np.ndarray:
        """The quantity `name` (one of QUANTITIES), or a DataError naming the column that
        would give it."""
        value = getattr(self, name)
        if value is None:
            raise DataError(self.missing[name], file=file, field=_COLUMN_OF[name])
        return value


_COLUMN_OF = {"list_log_prob": LOG_PROPENSITY, "prefix_log_prob": LOGGING_PREFIX,
              "marginal": LOGGING_MARGINAL}
_PL = f"{LOGGING_SCORE} with {LOGGING_TEMPERATURE} (a Plackett-Luce logger)"
_NEEDS = {
    "list_log_prob": f"the logging policy's probability of the logged lists is unknown: the "
                     f"log has no {LOG_PROPENSITY}, {LOGGING_PREFIX}, or {_PL}",
    "prefix_log_prob": f"the logging policy's probability of the logged lists' prefixes is "
                       f"unknown: the log has no {LOGGING_PREFIX}, or {_PL}",
    "marginal": f"the logging policy's probability of each candidate at each position is "
                f"unknown: the log has no {LOGGING_MARGINAL}, or {_PL}",
}


def logging_probabilities(logging: LoggingPolicy | None, lists, m: int, *,
                          log_propensity=None, quantities: Collection[str] = QUANTITIES,
                          samples: int = 4096, rng: np.random.Generator | None = None
                          ) -> LoggingProbabilities:
    """The logging policy's probabilities of B logged lists, from a batch's `logging` (and
    its `log_propensity`), as `LoggingProbabilities`.

    Each quantity comes, request by request, from the first source that knows it:
        list_log_prob:   the PL columns (exact), logging_prefix_log_propensity (its entry at
                         the list's last position), `log_propensity` (for lists not cut)
        prefix_log_prob: the PL columns (exact), logging_prefix_log_propensity
        marginal:        logging_marginal (exact), the PL columns (`pl_marginals`: exact at
                         position 0, Monte Carlo with `samples` lists after)
    The PL columns give the probabilities of any lists; the explicit columns describe the
    logged lists only, so pass the logged lists.

    Args:
        logging: `RequestBatch.logging` (None: a log without logging_ columns).
        lists: (B, L) the logged lists, candidate indices with NO_ITEM (-1) after the end
            (`batch.exposed.masked_fill(~batch.exposed_mask, -1)`); numpy or torch.
        m: positions M of the results; longer lists are cut to their first m items.
        log_propensity: (B,) `RequestBatch.log_propensity` (NaN: unknown), or None.
        quantities: which of QUANTITIES to compute (the Monte Carlo marginals cost
            R * samples * N work); the others are None, `missing` saying so.
        samples, rng: for `pl_marginals`.
    Returns:
        LoggingProbabilities, float64 arrays.
    """
    full = _numpy(lists).astype(np.int64)
    rows = len(full)
    cut = fit_width(full, m, NO_ITEM)                                     # (B, M)
    placed = cut >= 0
    length = placed.sum(axis=1)                                           # (B,)
    result = LoggingProbabilities()
    score, temperature, marginal, prefix = (
        None if logging is None else _numpy(getattr(logging, name), np.float64)
        for name in ("score", "temperature", "marginal", "prefix_log_propensity"))
    logits = known = None
    if score is not None and temperature is not None:
        known = np.isfinite(temperature) & (temperature > 0)              # (B,)
        with np.errstate(invalid="ignore", divide="ignore"):
            logits = np.where(np.isnan(score), -np.inf,
                              score / np.where(known, temperature, 1.0)[:, None])
        logits[~known] = 0.0            # computed for every request, then marked unknown
    explicit_prefix = None if prefix is None else np.where(placed, fit_width(prefix, m, np.nan),
                                                           np.nan)

    def combine(name: str, parts: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
        """The first part's value for each request that it knows, else the next part's."""
        if name not in quantities:
            result.missing[name] = f"{name} was not asked for"
            return
        if not parts:
            result.missing[name] = _NEEDS[name]
            return
        value = np.full_like(parts[-1][1], np.nan)
        todo = np.ones(rows, bool)
        used = []
        for source, part, knows in parts:
            use = todo & knows
            value[use] = part[use]
            todo &= ~use
            used += [source] if use.any() else []
        setattr(result, name, value)
        result.sources[name] = ", ".join(used) or "none (every request's policy is unknown)"

    parts = []
    if logits is not None and "list_log_prob" in quantities:
        parts.append((f"{LOGGING_SCORE}/{LOGGING_TEMPERATURE}", pl_log_prob(logits, cut), known))
    if explicit_prefix is not None:
        last = np.take_along_axis(explicit_prefix, np.maximum(length - 1, 0)[:, None], 1)[:, 0]
        parts.append((LOGGING_PREFIX, last, ~np.isnan(last)))
    if log_propensity is not None:
        whole = _numpy(log_propensity, np.float64)
        uncut = (full >= 0).sum(axis=1) == length
        parts.append((LOG_PROPENSITY, whole, uncut & ~np.isnan(whole)))
    combine("list_log_prob", parts)

    parts = []
    if logits is not None and "prefix_log_prob" in quantities:
        parts.append((f"{LOGGING_SCORE}/{LOGGING_TEMPERATURE}", pl_prefix_log_probs(logits, cut),
                      known))
    if explicit_prefix is not None:
        parts.append((LOGGING_PREFIX, explicit_prefix, ~np.isnan(explicit_prefix[:, 0])))
    combine("prefix_log_prob", parts)

    parts = []
    if marginal is not None:
        explicit = fit_width(marginal, m, 0.0) * placed[:, None, :]
        parts.append((LOGGING_MARGINAL, explicit, ~np.isnan(explicit).any(axis=(1, 2))))
    if logits is not None and "marginal" in quantities and (
            not parts or not parts[0][2].all()):
        estimated = pl_marginals(logits, m, samples=samples, rng=rng) * placed[:, None, :]
        parts.append((f"{LOGGING_SCORE}/{LOGGING_TEMPERATURE}", estimated, known))
    combine("marginal", parts)
    return result


def fit_width(values: np.ndarray, width: int, fill=None, axis: int = -1) -> np.ndarray:
    """`values` cut or padded to `width` entries along `axis`, padding with `fill` (default
    NO_ITEM for integers, 0 otherwise): lists and their per-position arrays brought to the
    M positions of a batch."""
    length = values.shape[axis]
    if length >= width:
        return np.take(values, np.arange(width), axis=axis)
    if fill is None:
        fill = NO_ITEM if np.issubdtype(values.dtype, np.integer) else 0
    pad = [(0, 0)] * values.ndim
    pad[axis] = (0, width - length)
    return np.pad(values, pad, constant_values=fill)


def _numpy(values: np.ndarray | torch.Tensor | None, dtype=None) -> np.ndarray | None:
    if values is None:
        return None
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)
