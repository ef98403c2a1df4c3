"""The batch every model takes: B requests as padded, masked tensors (`RequestBatch`).

Categorical index 0 is padding (`PAD`) and 1 is "unknown" (`UNKNOWN`: null, or not in the
vocabulary); the known values of a feature start at 2.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch

PAD = 0
UNKNOWN = 1


@dataclass
class LoggingPolicy:
    """What a log says of its logging policy beyond `log_propensity`, for B requests
    (docs/data-format.md, the logging_ columns); a field is None when the log has no such
    column, and NaN marks a null (the policy is unknown for that request).

    score: (B, N) float64 `logging_score`, NaN past a request's candidates; with
        temperature: (B,) float64 `logging_temperature`, a Plackett-Luce logger
        (`propensity.logging_probabilities` turns them into probabilities).
    marginal: (B, N, M) float32 `logging_marginal`: P(candidate i shown at position k), 0 for
        padding candidates and positions past the logged list's end.
    prefix_log_propensity: (B, M) float64 `logging_prefix_log_propensity`: log P(the logged
        list's first k+1 items, in order), NaN past the list's end.
    """

    score: torch.Tensor | None = None
    temperature: torch.Tensor | None = None
    marginal: torch.Tensor | None = None
    prefix_log_propensity: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> LoggingPolicy:
        return self._map(lambda v: v.to(device, non_blocking=non_blocking))

    def __getitem__(self, rows) -> LoggingPolicy:
        """The policy of requests `rows` (a slice, or an index tensor)."""
        return self._map(lambda v: v[rows])

    def _map(self, apply) -> LoggingPolicy:
        return LoggingPolicy(**{f.name: None if getattr(self, f.name) is None
                                else apply(getattr(self, f.name)) for f in fields(self)})


@dataclass
class RequestBatch:
    """B requests padded to N candidates and M exposed positions.

    Shapes: user_cat (B, Fu), user_num (B, Gu), cand_cat (B, N, Fc), cand_num (B, N, Gc),
    upstream_score (B, N), cand_mask (B, N), exposed (B, M), exposed_mask (B, M),
    feedback (B, M, K), log_propensity (B,). `user_cat[:, 0]` is the user id and
    `cand_cat[..., 0]` the item id. `request_id`, `user_id` and `item_id` keep the raw ids
    (numpy) for joining results back and for scoring lists with a simulator's ground truth.
    Requests to rerank (no logged list) have M = 1 and `exposed_mask` all False.
    `logging` holds the log's logging_ columns (`LoggingPolicy`), for off-policy evaluation;
    None when the log has none of them, and for requests to rerank.
    """

    request_id: np.ndarray
    user_id: np.ndarray
    item_id: np.ndarray
    user_cat: torch.Tensor
    user_num: torch.Tensor
    cand_cat: torch.Tensor
    cand_num: torch.Tensor
    upstream_score: torch.Tensor
    cand_mask: torch.Tensor
    exposed: torch.Tensor
    exposed_mask: torch.Tensor
    feedback: torch.Tensor
    log_propensity: torch.Tensor
    logging: LoggingPolicy | None = None

    def __len__(self) -> int:
        return len(self.request_id)

    def to(self, device: torch.device | str) -> RequestBatch:
        moved = {k: (v.to(device, non_blocking=True)
                     if isinstance(v, torch.Tensor | LoggingPolicy) else v)
                 for k, v in self.__dict__.items()}
        return RequestBatch(**moved)

    def candidate_feedback(self) -> torch.Tensor:
        """(B, N, K) each candidate's logged feedback, 0 where it was not shown."""
        shown = self.feedback * self.exposed_mask[..., None]                # (B, M, K)
        index = self.exposed[..., None].expand_as(shown)
        return shown.new_zeros(*self.cand_mask.shape, shown.shape[-1]).scatter_add(1, index, shown)

    def shuffled(self, generator: torch.Generator) -> RequestBatch:
        """The batch with each request's candidates in a random order (padding stays last) and
        its logged lists pointing at the same candidates: for logs whose candidate order
        carries the logged order (MIND lists every candidate in the order shown), so that a
        model cannot learn from where a candidate sits or gain from ties broken by index."""
        keys = torch.rand(self.cand_mask.shape, generator=generator, device=self.cand_mask.device)
        order = keys.masked_fill(~self.cand_mask, 2.0).argsort(dim=1)   # new slot -> old index
        where = order.argsort(dim=1)                                    # old index -> new slot

        def take(values: torch.Tensor) -> torch.Tensor:
            index = order.view(*order.shape, *[1] * (values.dim() - 2)).expand_as(values)
            return values.gather(1, index)

        logging = self.logging
        if logging is not None:
            logging = replace(
                logging, score=None if logging.score is None else take(logging.score),
                marginal=None if logging.marginal is None else take(logging.marginal))
        return replace(
            self, cand_cat=take(self.cand_cat), cand_num=take(self.cand_num),
            upstream_score=take(self.upstream_score), cand_mask=take(self.cand_mask),
            item_id=np.take_along_axis(self.item_id, order.cpu().numpy(), axis=1),
            exposed=where.gather(1, self.exposed), logging=logging)
