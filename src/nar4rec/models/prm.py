"""PRM (Pei et al., "Personalized Re-ranking for Recommendation", RecSys 2019).

The initial list is every candidate of a request in the ranking stage's order (descending
upstream score, ties to the lower index, padding last). Each item's vector is its feature
embedding concatenated with a personalised vector PV, projected to d, plus a learned embedding
of its initial position (section 4.2 of the PRM paper, "input layer"). A stack of Transformer
blocks (multi-head self-attention + FFN, section 4.3) encodes the list, so each item's score
is computed in the context of the whole initial list; a linear layer gives each item one logit
per behaviour (section 4.4). Training is the paper's softmax over the list's items with
cross-entropy against the engaged items of the logged list (Eq. 9), one softmax per behaviour.
PRM is one-stage: a list is the top m candidates by refined score.

Departures from the paper: PV is the hidden layer of a small MLP over [user, item] trained
jointly with the reranker, rather than of a separately pre-trained CTR model (no such model
exists here); the blocks are pre-LayerNorm. With `personalised_vector=False` the model is the
paper's PRM-BASE and sees no user feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nar4rec.data.batch import RequestBatch
from nar4rec.data.features import FeatureSpace
from nar4rec.models.base import (
    BaselineSystem,
    InputConfig,
    ListModel,
    Ranking,
    initial_order,
    logged_index,
    padding_rows,
    predicted_utility,
    top_m,
)
from nar4rec.models.evaluator import evaluator_loss
from nar4rec.models.layers import MLP, personalised_inputs

LOSSES = ("softmax", "bce")


@dataclass
class PRMConfig(InputConfig):
    """list_length: m. d_model, layers, heads, ff_mult: the encoder's width, depth, heads and
    FFN width d * ff_mult. max_candidates: rows of the initial-position table; positions
    beyond it share its last row. loss: "softmax" (the paper's list-wise cross-entropy, one
    softmax over the candidates per behaviour) or "bce" (per-behaviour binary cross-entropy on
    the shown items). personalised_vector: concatenate the PV of each (user, item) pair to the
    item (needs `personalised`); False gives PRM-BASE."""

    list_length: int = 6
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    ff_mult: int = 4
    max_candidates: int = 512
    loss: str = "softmax"
    personalised_vector: bool = True

    def __post_init__(self) -> None:
        problems = self.check_inputs()
        for name in ("list_length", "d_model", "layers", "heads", "ff_mult", "max_candidates"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, not {getattr(self, name)}")
        if self.heads >= 1 and self.d_model % self.heads:
            problems.append(f"d_model ({self.d_model}) must be a multiple of heads "
                            f"({self.heads})")
        if self.loss not in LOSSES:
            problems.append(f"loss must be one of {LOSSES}, not {self.loss!r}")
        if problems:
            raise ValueError("; ".join(problems))


class PRMBlock(nn.Module):
    """Pre-LN self-attention over the list, then FFN (section 4.3)."""

    def __init__(self, config: PRMConfig):
        super().__init__()
        d = config.d_model
        self.attention = nn.MultiheadAttention(d, config.heads, dropout=config.dropout,
                                               batch_first=True)
        self.ffn = MLP(d, [d * config.ff_mult], d, dropout=config.dropout)
        self.attention_norm = nn.LayerNorm(d)
        self.ffn_norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, h: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """h (B, n, d), padding (B, n) True where padded -> (B, n, d)."""
        normed = self.attention_norm(h)
        h = h + self.dropout(self.attention(normed, normed, normed, key_padding_mask=padding,
                                            need_weights=False)[0])
        return h + self.dropout(self.ffn(self.ffn_norm(h)))


class PRM(ListModel):
    """List-aware behaviour logits of every candidate, in the context of the initial list."""

    def __init__(self, config: PRMConfig, space: FeatureSpace):
        super().__init__()
        self.config = config
        d = config.d_model
        self.candidates, user, self.interaction = personalised_inputs(config, space)
        # The user enters only through PV: without it (PRM-BASE) no user table is built.
        self.user = user if config.personalised_vector else None
        if self.user is None:
            self.interaction = None
        # PV: hidden representation of the (user, item) pair, trained end to end.
        self.pv = MLP(2 * d, [2 * d], d, dropout=config.dropout, activation="relu") \
            if self.user is not None else None
        self.project = nn.Linear(2 * d if self.pv is not None else d, d)
        self.positions = nn.Embedding(config.max_candidates, d)
        nn.init.normal_(self.positions.weight, std=0.1)
        self.blocks = nn.ModuleList(PRMBlock(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, len(space.behaviours))
        self.register_buffer("weights", space.utility_weights.float(), persistent=False)

    def forward(self, batch: RequestBatch) -> torch.Tensor:
        """(B, n, K) behaviour logits of every candidate, in the batch's candidate order."""
        mask = batch.cand_mask                                         # (B, n)
        n = mask.shape[1]
        order = initial_order(batch)                                   # (B, n) initial list
        items = self.candidates(batch, order)                          # (B, n, d)
        if self.pv is not None:
            user = self.user(batch).unsqueeze(1).expand_as(items)      # (B, n, d)
            if self.interaction is not None:
                items = items + self.interaction(user * items)
            pv = self.pv(torch.cat([user, items], dim=-1))             # (B, n, d)
            items = torch.cat([items, pv], dim=-1)                     # (B, n, 2d)
        rank = torch.arange(n, device=mask.device).clamp(max=self.config.max_candidates - 1)
        h = self.project(items) + self.positions(rank)                 # (B, n, d)
        padding = padding_rows(mask.gather(1, order))                  # (B, n) padding last
        for block in self.blocks:
            h = block(h, padding)                                      # (B, n, d)
        logits = self.head(self.norm(h))                               # (B, n, K) initial order
        # Back to candidate order: the item at initial position r is candidate order[:, r].
        index = order.unsqueeze(-1).expand_as(logits)                  # (B, n, K)
        return torch.zeros_like(logits).scatter(1, index, logits)      # (B, n, K)

    def loss(self, outputs: torch.Tensor, batch: RequestBatch
             ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.config.loss == "bce":
            logits = outputs.gather(1, logged_index(batch).unsqueeze(-1).expand(
                -1, -1, outputs.shape[-1]))                            # (B, M, K)
            loss = evaluator_loss(logits, batch.feedback, batch.exposed_mask)
            return loss, {"bce": float(loss.detach())}
        loss = softmax_loss(outputs, batch, self.weights)
        return loss, {"softmax_ce": float(loss.detach())}

    def probabilities(self, outputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, n, K) logits -> (B, n, K) per-behaviour item probabilities, 0 on padding:
        the softmax over the request's candidates (softmax loss) or the sigmoid (bce)."""
        if self.config.loss == "bce":
            return torch.sigmoid(outputs) * mask.unsqueeze(-1)
        return list_log_softmax(outputs, mask).exp() * mask.unsqueeze(-1)

    @torch.no_grad()
    def rerank(self, batch: RequestBatch) -> Ranking:
        """Top m by sum_b w_b * p_b: each candidate's expected share of the request's weighted
        engagement (softmax), or its predicted utility (bce). PRM has no exposure probability."""
        outputs = self(batch)                                          # (B, n, K)
        if self.config.loss == "bce":
            scores = predicted_utility(outputs, self.weights)          # (B, n)
        else:
            scores = self.probabilities(outputs, batch.cand_mask) @ self.weights
        scores = scores.masked_fill(~batch.cand_mask, -torch.inf)
        return Ranking(top_m(scores, batch.cand_mask, self.config.list_length), scores)

    @torch.no_grad()
    def logged_click(self, batch: RequestBatch) -> torch.Tensor:
        """(B, M) the first behaviour's probability of each logged item: for the softmax loss
        its share of the request's clicks (a softmax probability, in [0, 1] but not a
        calibrated click rate), for bce the sigmoid."""
        probabilities = self.probabilities(self(batch), batch.cand_mask)[..., 0]  # (B, n)
        return probabilities.gather(1, logged_index(batch)).clamp(0.0, 1.0)       # (B, M)


def list_log_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, n, K) logits -> log-softmax over each request's real candidates, per behaviour;
    -inf on padding (a request with no real candidate gets finite values over its padding)."""
    padding = padding_rows(mask).unsqueeze(-1)                         # (B, n, 1)
    return torch.log_softmax(logits.masked_fill(padding, -torch.inf), dim=1)


def softmax_loss(logits: torch.Tensor, batch: RequestBatch,
                 weights: torch.Tensor) -> torch.Tensor:
    """The list-wise cross-entropy of the PRM paper (Eq. 9), per behaviour b: the target over a
    request's candidates is proportional to b's logged feedback on the shown items (0 on
    un-shown candidates); requests with no positive for b are skipped for b; the per-(request,
    behaviour) terms are averaged with weights w_b.

    Args:
        logits: (B, n, K) the model's output in candidate order.
        batch: the logged lists and feedback.
        weights: (K,) utility weight of each behaviour.
    """
    feedback = batch.feedback * batch.exposed_mask.unsqueeze(-1)       # (B, M, K)
    index = logged_index(batch).unsqueeze(-1).expand_as(feedback)      # (B, M, K)
    target = torch.zeros_like(logits).scatter_add(1, index, feedback.to(logits))  # (B, n, K)
    total = target.sum(1)                                              # (B, K)
    target = target / total.clamp(min=1e-12).unsqueeze(1)             # (B, n, K)
    log_p = list_log_softmax(logits, batch.cand_mask)                  # (B, n, K)
    log_p = log_p.masked_fill(~batch.cand_mask.unsqueeze(-1), 0.0)
    cross_entropy = -(target * log_p).sum(1)                           # (B, K)
    weight = (total > 0).to(logits) * weights.to(logits)               # (B, K)
    return (cross_entropy * weight).sum() / weight.sum().clamp(min=1e-12)


class PRMSystem(BaselineSystem, section="prm", model_class=PRM):
    """PRM behind the `system.System` interface (registered as "prm")."""
