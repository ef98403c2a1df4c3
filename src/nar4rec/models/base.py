"""The one interface every baseline reranker implements (RecBole's habit: one loop trains them
all, one evaluation measures them all, one benchmark times them all).

A baseline is an `nn.Module` subclass of `ListModel`, built as `Model(config, space)` from a
dataclass config that extends `InputConfig` (the feature inputs every model shares) and holds
`list_length` (m, set from the data) and `d_model`. It implements:

    forward(batch) -> outputs            what training needs; the training loop calls it
                                         through DistributedDataParallel when there is one
    loss(outputs, batch) -> (loss, logs) a scalar loss and floats to log
    rerank(batch) -> Ranking             the list it shows for each request, each candidate's
                                         score, and (if it has one) each candidate's
                                         probability of being shown
    logged_click(batch) -> (B, M)        the predicted probability of the first behaviour
                                         (click) of every item of the logged list, in the
                                         logged context: the AUC/LogLoss/NDCG of Table 2

`rerank` and `logged_click` run without gradients and loop over positions at most, never over
requests. `step(network, batch)` is the `LossFn` that `nar4rec.train.train` takes.
`BaselineSystem` puts a ListModel behind the `system.System` interface (one phase, "model");
each baseline's file declares its own, which `registry` names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from nar4rec.data.batch import RequestBatch
from nar4rec.decode import NO_ITEM
from nar4rec.models.evaluator import evaluator_loss
from nar4rec.models.layers import UPSTREAM_NORMS
from nar4rec.system import Phase, Reranked, System


@dataclass
class InputConfig:
    """The feature inputs every model shares (`layers.personalised_inputs` reads these).

    embedding_dim: width of every categorical feature table.
    dropout: dropout on the embeddings and in the model's blocks.
    personalised: the model sees the user's features.
    user_interaction: add a projection of user * item to each item vector (FM-style term).
    use_upstream_score, upstream_norm: the ranking stage's score as a candidate input
        ("request": z-score within a request, "none": raw).
    """

    embedding_dim: int = 16
    dropout: float = 0.0
    personalised: bool = True
    user_interaction: bool = False
    use_upstream_score: bool = True
    upstream_norm: str = "request"

    def check_inputs(self) -> list[str]:
        """Problems with these fields, for the subclass's __post_init__ to raise together."""
        problems = []
        if self.upstream_norm not in UPSTREAM_NORMS:
            problems.append(f"upstream_norm must be one of {UPSTREAM_NORMS}, not "
                            f"{self.upstream_norm!r}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), not {self.dropout}")
        return problems


@dataclass
class Ranking:
    """A model's answer for B requests with n (padded) candidates.

    lists: (B, m) candidate indices in the order shown, NO_ITEM (-1) past the end of a request
        with fewer than m candidates.
    scores: (B, n) how strongly the model wants each candidate shown (what Recall@k ranks);
        -inf on padded candidates.
    exposure: (B, n) the model's probability that each candidate is shown, in [0, 1], or None
        for a model that has no such probability (then the n > m LogLoss does not apply).
    """

    lists: torch.Tensor
    scores: torch.Tensor
    exposure: torch.Tensor | None = None


class ListModel(nn.Module):
    """Base class of the baselines: the interface above, and the loss function of the loop."""

    config: InputConfig

    def loss(self, outputs, batch: RequestBatch) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def rerank(self, batch: RequestBatch) -> Ranking:
        raise NotImplementedError

    def logged_click(self, batch: RequestBatch) -> torch.Tensor:
        raise NotImplementedError

    feedback_model: bool = False   # forward(batch) gives calibrated (B, M, K) logits of the
    # logged items in their list (point-wise models, EdgeRerank): `predict_feedback` works

    def predict_feedback(self, batch: RequestBatch, lists: torch.Tensor) -> torch.Tensor:
        """(B, m, K) each behaviour's probability at each position of `lists`, as
        `System.predict_feedback`: the logged-list forward pass applied to other lists."""
        real = lists >= 0
        other = dataclasses.replace(batch, exposed=lists.clamp_min(0), exposed_mask=real)
        return torch.sigmoid(self(other)) * real.unsqueeze(-1)

    @staticmethod
    def step(network: nn.Module, batch: RequestBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loop's LossFn: forward through `network` (which may be a DDP wrapper),
        loss from the model itself."""
        model = network.module if isinstance(network, nn.parallel.DistributedDataParallel) \
            else network
        return model.loss(network(batch), batch)


class PointwiseModel(ListModel):
    """A model that scores each (user, item) pair alone (DNN, DCN): subclasses build
    `candidates`, `user`, `interaction` (`layers.personalised_inputs`) and a `weights` buffer,
    and implement `logits_of(pairs)`; training is per-behaviour binary cross-entropy on the
    shown items, and a list is the top m candidates by predicted utility."""

    feedback_model = True

    def pairs(self, batch: RequestBatch, index: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, 2d) user and item vectors side by side for the candidates `index` (B, L),
        or all of them; (B, L, d) without user features."""
        items = self.candidates(batch, index)                          # (B, L, d)
        if self.user is None:
            return items
        user = self.user(batch).unsqueeze(1).expand_as(items)          # (B, L, d)
        if self.interaction is not None:
            items = items + self.interaction(user * items)
        return torch.cat([user, items], dim=-1)                        # (B, L, 2d)

    def logits_of(self, pairs: torch.Tensor) -> torch.Tensor:
        """(B, L, width) -> (B, L, K) behaviour logits."""
        raise NotImplementedError

    def forward(self, batch: RequestBatch) -> torch.Tensor:
        """(B, M, K) logits of the logged items."""
        return self.logits_of(self.pairs(batch, logged_index(batch)))

    def loss(self, outputs: torch.Tensor, batch: RequestBatch
             ) -> tuple[torch.Tensor, dict[str, float]]:
        return feedback_loss(outputs, batch)

    @torch.no_grad()
    def rerank(self, batch: RequestBatch) -> Ranking:
        logits = self.logits_of(self.pairs(batch))                     # (B, n, K)
        scores = predicted_utility(logits, self.weights).masked_fill(~batch.cand_mask, -torch.inf)
        return Ranking(top_m(scores, batch.cand_mask, self.config.list_length), scores)

    @torch.no_grad()
    def logged_click(self, batch: RequestBatch) -> torch.Tensor:
        return torch.sigmoid(self(batch)[..., 0])                      # (B, M)


class BaselineSystem(System):
    """A baseline (`ListModel`) as a reranking system: one phase, "model", whose settings are
    the RunConfig table named in the subclass's declaration (`class DNNSystem(BaselineSystem,
    section="dnn")`), trained by the main training settings."""

    model_class: type[ListModel]

    def __init_subclass__(cls, *, section: str, model_class: type[ListModel], **kwargs):
        super().__init_subclass__(**kwargs)
        cls.model_class = model_class
        cls.phases = (Phase("model", section, "train"),)
        cls.sections = (section, "train", "features")

    @classmethod
    def build(cls, phase, model_config, space):
        return cls.model_class(model_config, space)

    @classmethod
    def loss(cls, phase, model_config, space, trained):
        return ListModel.step

    @property
    def model(self) -> ListModel:
        return self.modules["model"]

    @torch.no_grad()
    def rerank(self, batch: RequestBatch) -> Reranked:
        """The model's list, each placed item scored by the model's own candidate score."""
        ranking = self.model.rerank(batch)
        return Reranked.single(ranking.lists, ranking.scores.gather(
            1, ranking.lists.clamp_min(0)))

    @torch.no_grad()
    def evaluate(self, batch: RequestBatch, variants: bool = True
                 ) -> tuple[Ranking, dict[str, torch.Tensor]]:
        return self.model.rerank(batch), {}

    @torch.no_grad()
    def logged_click(self, batch: RequestBatch) -> torch.Tensor:
        return self.model.logged_click(batch)

    @torch.no_grad()
    def predict_feedback(self, batch: RequestBatch, lists: torch.Tensor) -> torch.Tensor:
        if not self.model.feedback_model:
            return super().predict_feedback(batch, lists)
        return self.model.predict_feedback(batch, lists)


def feedback_loss(logits: torch.Tensor, batch: RequestBatch
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-behaviour binary cross-entropy of (B, M, K) logits of the logged items against their
    feedback (`evaluator_loss`), with its value to log."""
    loss = evaluator_loss(logits, batch.feedback, batch.exposed_mask)
    return loss, {"bce": float(loss.detach())}


def predicted_utility(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(..., K) behaviour logits -> (...) sum_b w_b * sigmoid(logit_b), an item's utility."""
    return torch.sigmoid(logits) @ weights.to(logits)


def item_utility_targets(feedback: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, M, K) logged feedback -> (B, M) each shown item's observed utility."""
    return feedback @ weights.to(feedback)


def top_m(scores: torch.Tensor, cand_mask: torch.Tensor, m: int) -> torch.Tensor:
    """The m best-scored real candidates of each request, best first: (B, n) -> (B, m).

    NO_ITEM where a request has fewer than m real candidates; ties go to the lower index.
    """
    n = scores.shape[1]
    width = min(m, n)
    masked = scores.masked_fill(~cand_mask, -torch.inf)
    order = descending_order(masked, width)                                   # (B, width)
    lists = torch.full((len(scores), m), NO_ITEM, dtype=torch.long, device=scores.device)
    real = cand_mask.gather(1, order)                                         # (B, width)
    lists[:, :width] = order.masked_fill(~real, NO_ITEM)
    return lists


def descending_order(values: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """(B, count) indices of the `count` largest of values (B, n) (default: all n), largest
    first, ties to the lower index.

    Eagerly a stable descending sort (torch.topk does not promise its order of ties); while a
    graph is traced for ONNX, which has no stable sort, TopK, which puts the lower index first
    on ties."""
    count = values.shape[1] if count is None else count
    if torch.compiler.is_compiling():
        return values.topk(count, dim=1).indices
    return values.argsort(dim=1, descending=True, stable=True)[:, :count]


def initial_order(batch: RequestBatch) -> torch.Tensor:
    """(B, n) the ranking stage's order of each request's candidates: descending upstream
    score, ties to the lower index, padding last (the "initial list" of PRM and Seq2Slate)."""
    upstream = batch.upstream_score.float().masked_fill(~batch.cand_mask, -torch.inf)
    return descending_order(upstream)


def logged_index(batch: RequestBatch) -> torch.Tensor:
    """(B, M) the logged list's candidate indices, padding clamped to 0 (mask with
    `batch.exposed_mask`)."""
    return batch.exposed.clamp(0, batch.cand_mask.shape[1] - 1)


def padding_rows(mask: torch.Tensor) -> torch.Tensor:
    """An attention key-padding mask from a validity mask (S, L): True where padded, except in
    rows with no valid entry at all (they attend to everything rather than produce NaN)."""
    return ~mask & mask.any(-1, keepdim=True)
