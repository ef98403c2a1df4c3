"""The sequence evaluator of NAR4Rec's generator-evaluator framework (section 4.4, Fig. 2).

A list of m candidates is embedded, given position embeddings and the user vector, encoded by
self-attention + FFN layers (so each item's prediction sees the whole list: its context and
its order), and one linear head per behaviour predicts each item's feedback. A list's utility
is the weighted sum of the item-wise predictions (`predicted_list_utility`), mirroring R(u, Y) of
section 3.1. The paper does not say how the evaluator is trained; `evaluator_loss` is the
natural reading (NOTES.md): per-behaviour binary cross-entropy on the logged lists.

Scoring L generated lists per request embeds the candidates once and runs the encoder on all
B * L lists in one batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nar4rec.data.batch import RequestBatch
from nar4rec.data.features import FeatureSpace
from nar4rec.models.layers import (
    MLP,
    UPSTREAM_NORMS,
    attend,
    key_padding_bias,
    personalised_inputs,
    position_rows,
)


@dataclass
class EvaluatorConfig:
    """Every knob of the sequence evaluator (sizes are not given by the paper).

    list_length: rows of the position embedding table (the longest training list);
        positions past it share the last row.
    d_model, layers, heads, ff_mult, dropout: hidden size, number of self-attention + FFN
        layers ("a self-attention and a feed-forward layer": 1 by default), heads, FFN width
        d * ff_mult, dropout.
    embedding_dim: width of every categorical feature table.
    activation: FFN activation, "gelu", "relu" or "silu".
    norm_first: pre-LayerNorm layers (False: post-LN).
    causal: each item attends only to itself and the items above it (a user meets a list from
        the top), instead of the whole list (the paper's plain self-attention, the default).
    personalised: add the user vector to every item of the list.
    user_interaction: also add a learned projection of the element-wise product of the user
        and each item vector (a factorisation-machine style user-item term).
    use_upstream_score, upstream_norm: the ranking stage's score as a candidate input
        ("request": z-score within a request, "none": raw).
    similarity_heads, similarity_dim: give each item its redundancy with the items above it
        (`Redundancy`): the number of learned similarities (0: none) and the width of each.
        Plain self-attention averages over the items above; this says whether any of them
        is like this one, which is what fatigue and diversity are about.
    shared_values: also give each item, per categorical feature but the id, whether an item
        above has the same value.
    alone_weight: weight of a second training loss, the same BCE for every logged item
        scored alone (a one-item list at the first position, as the evaluator's item-wise
        scores read it; `reranker.evaluator_step`); 0: the logged lists only (the paper's
        reading).
    """

    list_length: int = 6
    d_model: int = 64
    layers: int = 1
    heads: int = 4
    ff_mult: int = 4
    dropout: float = 0.0
    embedding_dim: int = 16
    activation: str = "gelu"
    norm_first: bool = True
    causal: bool = True
    personalised: bool = True
    user_interaction: bool = False
    use_upstream_score: bool = True
    upstream_norm: str = "request"
    similarity_heads: int = 4
    similarity_dim: int = 16
    shared_values: bool = True
    alone_weight: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if self.list_length < 1:
            problems.append(f"list_length must be >= 1, not {self.list_length}")
        if self.d_model % self.heads:
            problems.append(f"d_model ({self.d_model}) must be a multiple of heads "
                            f"({self.heads})")
        if self.layers < 1:
            problems.append(f"layers must be >= 1, not {self.layers}")
        if self.similarity_heads < 0 or self.similarity_dim < 1:
            problems.append(f"similarity_heads must be >= 0 and similarity_dim >= 1, not "
                            f"{self.similarity_heads} and {self.similarity_dim}")
        if self.alone_weight < 0:
            problems.append(f"alone_weight must be >= 0, not {self.alone_weight}")
        if self.upstream_norm not in UPSTREAM_NORMS:
            problems.append(f"upstream_norm must be one of {UPSTREAM_NORMS}, not "
                            f"{self.upstream_norm!r}")
        if problems:
            raise ValueError("; ".join(problems))


class EvaluatorLayer(nn.Module):
    """Self-attention over the items of a list, then FFN (section 4.4)."""

    def __init__(self, config: EvaluatorConfig):
        super().__init__()
        d = config.d_model
        self.norm_first = config.norm_first
        self.attention = nn.MultiheadAttention(d, config.heads, dropout=config.dropout,
                                               batch_first=True)
        self.ffn = MLP(d, [d * config.ff_mult], d, dropout=config.dropout,
                       activation=config.activation)
        self.attention_norm = nn.LayerNorm(d)
        self.ffn_norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, h: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """h (S, m, d), padding (S, m) -inf where padded, else 0 -> (S, m, d)."""
        if self.norm_first:
            normed = self.attention_norm(h)
            h = h + self.dropout(attend(self.attention, normed, normed, padding))
            return h + self.dropout(self.ffn(self.ffn_norm(h)))
        h = self.attention_norm(h + self.dropout(attend(self.attention, h, h, padding)))
        return self.ffn_norm(h + self.dropout(self.ffn(h)))


class Redundancy(nn.Module):
    """How much each item of a list repeats the items above it, as a vector to add to it.

    Item k gets, for every learned head h, `max(0, max_{j<k} cos(W_h x_k, W_h x_j))` over the
    real items j above it, and, for every categorical candidate feature but the item id, 1
    if an item above has the same known value (the same topic, author, genre), else 0; the
    first item gets zeros. A linear layer maps these figures to a d-vector. This is the
    "redundancy with what was already shown" of maximal marginal relevance and of contrastive
    decoding's penalty (eq. 16), here an input from which the evaluator learns what
    repetition costs.

    Args:
        d_model: width of the item vectors.
        heads, dim: number of learned similarities (0: none) and width of each projection.
        shared_features: number of categorical features compared for equal values (0: none).
    """

    def __init__(self, d_model: int, heads: int, dim: int, shared_features: int):
        super().__init__()
        self.heads, self.dim, self.shared_features = heads, dim, shared_features
        self.project = nn.Linear(d_model, heads * dim) if heads else None
        self.out = nn.Linear(heads + shared_features, d_model)

    def figures(self, items: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        """(S, m, m, H + F) the redundancy figures between every two of m items: each head's
        cosine clipped at 0, then each compared feature's 1 (the same known value) or 0
        (items (S, m, d), categorical (S, m, F + 1) feature indices, the id first)."""
        parts = []
        if self.project is not None:
            z = F.normalize(self.project(items).unflatten(-1, (self.heads, self.dim)), dim=-1)
            z = z.transpose(1, 2)                                      # (S, H, m, dim)
            cosine = (z @ z.transpose(2, 3)).clamp_min(0)              # (S, H, m, m)
            parts.append(cosine.permute(0, 2, 3, 1))                   # (S, m, m, H)
        if self.shared_features:
            values = categorical[..., 1:]                              # (S, m, F)
            same = (values[:, :, None] == values[:, None, :]) & (values >= 2)[:, :, None]
            parts.append(same.to(items.dtype))                         # (S, m, m, F)
        return torch.cat(parts, dim=-1)

    def forward(self, items: torch.Tensor, categorical: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """items (S, m, d), categorical (S, m, F + 1) feature indices (the id first), mask
        (S, m) True for real items -> (S, m, d)."""
        length = items.shape[1]
        above = torch.ones(length, length, dtype=torch.bool, device=items.device).tril(-1)
        keep = above & mask[:, None, :]                                # (S, m, m) k <- j
        figures = self.figures(items, categorical).masked_fill(~keep[..., None], 0)
        return self.out(figures.amax(2))                               # (S, m, d)

    def pairwise(self, items: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        """(B, n, n) the mean of the redundancy figures between every two of n items."""
        return self.figures(items, categorical).mean(-1)


class Evaluator(nn.Module):
    """Item-wise, list-aware feedback predictions for whole lists (section 4.4).

    Args:
        config: the architecture.
        space: the feature space (vocabulary sizes, number of behaviours K).
    """

    def __init__(self, config: EvaluatorConfig, space: FeatureSpace):
        super().__init__()
        self.config = config
        d = config.d_model
        self.candidates, self.user, self.interaction = personalised_inputs(config, space)
        self.positions = nn.Embedding(config.list_length, d)
        nn.init.normal_(self.positions.weight, std=0.1)
        shared = len(space.cand_cat) - 1 if config.shared_values else 0
        self.redundancy = (Redundancy(d, config.similarity_heads, config.similarity_dim, shared)
                           if config.similarity_heads or shared else None)
        self.layers = nn.ModuleList(EvaluatorLayer(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(d) if config.norm_first else nn.Identity()
        self.heads = nn.Linear(d, len(space.behaviours))   # one linear head per behaviour

    def forward(self, batch: RequestBatch, lists: torch.Tensor | None = None,
                list_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Behaviour logits of every item of the logged or of the given lists.

        Args:
            batch: B requests.
            lists: (B, L, m) candidate indices of L lists per request, or None to score the
                logged list `batch.exposed`.
            list_mask: (B, L, m) True for real entries (None: all real); ignored when
                `lists` is None (then `batch.exposed_mask`).
        Returns:
            (B, L, m, K) logits, or (B, M, K) for the logged lists.
        """
        if lists is None:
            return self.forward(batch, batch.exposed.unsqueeze(1),
                                batch.exposed_mask.unsqueeze(1)).squeeze(1)
        batch_size, count, length = lists.shape
        index = lists.clamp(0, batch.cand_mask.shape[1] - 1).reshape(batch_size, count * length)
        return self._judge(batch, self.candidates(batch, index), lists, list_mask)

    def forward_relaxed(self, batch: RequestBatch, choice: torch.Tensor,
                        lists: torch.Tensor) -> torch.Tensor:
        """Behaviour logits of relaxed lists: each position's item vector is the mixture
        sum_i choice[b, i, t] x_i of the candidates' vectors, so that gradients reach the
        choice (the Gumbel-softmax relaxation of `NAR4RecConfig.evaluator_gumbel`; with a
        straight-through one-hot choice the forward pass equals `forward` on `lists`).

        Args:
            choice: (B, n, m) each position's weights over the candidates.
            lists: (B, m) the hard lists the choice stands for (NO_ITEM past a list's end):
                their categorical features feed the redundancy block and their mask the
                attention.
        Returns:
            (B, m, K) logits.
        """
        vectors = self.candidates(batch)                               # (B, n, d)
        items = torch.einsum("bnm,bnd->bmd", choice.to(vectors), vectors)  # (B, m, d)
        return self._judge(batch, items, lists.unsqueeze(1), (lists >= 0).unsqueeze(1))[:, 0]

    def _judge(self, batch: RequestBatch, items: torch.Tensor, lists: torch.Tensor,
               list_mask: torch.Tensor | None) -> torch.Tensor:
        """The layers over item vectors (B, L * m, d) of lists (B, L, m) -> (B, L, m, K)."""
        batch_size, count, length = lists.shape
        if list_mask is None:
            list_mask = torch.ones_like(lists, dtype=torch.bool)
        index = lists.clamp(0, batch.cand_mask.shape[1] - 1).reshape(batch_size, count * length)
        d = items.shape[-1]
        h = items.view(batch_size, count, length, d)                   # (B, L, m, d)
        if self.user is not None:
            user = self.user(batch)[:, None, None, :]                  # (B, 1, 1, d)
            if self.interaction is not None:
                h = h + self.interaction(user * h)                     # (B, L, m, d)
            h = h + user                                               # (B, L, m, d)
        h = h + position_rows(self.positions, length)                 # (B, L, m, d)
        h = h.reshape(batch_size * count, length, d)                   # (B * L, m, d)
        mask = list_mask.reshape(batch_size * count, length)           # (B * L, m)
        if self.redundancy is not None:
            categorical = batch.cand_cat.gather(
                1, index.unsqueeze(-1).expand(-1, -1, batch.cand_cat.shape[-1]))  # (B, L m, F)
            h = h + self.redundancy(items.view(batch_size * count, length, d),
                                    categorical.view(batch_size * count, length, -1), mask)
        padding = ~mask & mask.any(1, keepdim=True)   # an all-padding list attends to all
        padding = key_padding_bias(padding, h.dtype)                   # (B * L, m) 0 or -inf
        if self.config.causal:
            above = torch.ones(length, length, dtype=torch.bool, device=h.device).triu(1)
            padding = padding[:, None, :].masked_fill(above, -torch.inf)  # (B * L, m, m)
        for layer in self.layers:
            h = layer(h, padding)                                      # (B * L, m, d)
        logits = self.heads(self.norm(h))                              # (B * L, m, K)
        return logits.view(batch_size, count, length, -1)              # (B, L, m, K)

    def candidate_similarity(self, batch: RequestBatch) -> torch.Tensor:
        """(B, n, n) how redundant every two candidates of a request are to this evaluator
        (`Redundancy.pairwise`): the similarity it learned from feedback, for contrastive
        decoding (`reranker.evaluator_alphas`). Needs `similarity_heads` or
        `shared_values`."""
        if self.redundancy is None:
            raise ValueError("this evaluator has no redundancy inputs (similarity_heads = 0 "
                             "and shared_values off)")
        return self.redundancy.pairwise(self.candidates(batch), batch.cand_cat)


def predicted_list_utility(logits: torch.Tensor, weights: torch.Tensor,
                           mask: torch.Tensor | None = None) -> torch.Tensor:
    """A list's estimated utility: sum over items of sum_b w_b * sigmoid(logit_b) (section 4.4).

    Args:
        logits: (..., m, K) the evaluator's output.
        weights: (K,) utility weight of each behaviour.
        mask: (..., m) True for real items, or None when all are real.
    Returns:
        (...) one utility per list.
    """
    item_utility = torch.sigmoid(logits) @ weights.to(logits)          # (..., m)
    if mask is not None:
        item_utility = item_utility * mask
    return item_utility.sum(-1)                                        # (...)


def evaluator_loss(logits: torch.Tensor, feedback: torch.Tensor,
                   exposed_mask: torch.Tensor) -> torch.Tensor:
    """Per-behaviour binary cross-entropy on the logged lists, averaged over real cells.

    Feedback values are the targets and should lie in [0, 1] (binary behaviours, or rates).

    Args:
        logits: (B, M, K) the evaluator's output for the logged lists.
        feedback: (B, M, K) the logged behaviours.
        exposed_mask: (B, M) True for real positions.
    """
    cell = F.binary_cross_entropy_with_logits(logits, feedback, reduction="none")  # (B, M, K)
    weight = exposed_mask.unsqueeze(-1).to(cell)                       # (B, M, 1)
    return (cell * weight).sum() / (weight.sum() * cell.shape[-1]).clamp(min=1)
