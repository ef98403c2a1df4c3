"""DNN (Covington, Adams, Sargin, "Deep Neural Networks for YouTube Recommendations", RecSys
2016), the paper's point-wise baseline.

An MLP tower of ReLU layers over the concatenation of the user's and the item's feature
embeddings, one logit per behaviour, trained with binary cross-entropy on every shown item. It
sees no other item of the list; a list is the top m candidates by predicted utility
(sum_b w_b * sigmoid(logit_b)); `PointwiseModel` holds that shared use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nar4rec.data.features import FeatureSpace
from nar4rec.models.base import BaselineSystem, InputConfig, PointwiseModel
from nar4rec.models.layers import MLP, personalised_inputs


@dataclass
class DNNConfig(InputConfig):
    """list_length: m. d_model: width of the user and item embeddings. hidden: the tower's
    ReLU layers (the YouTube paper's towers narrow, 1024-512-256; ours are scaled to the
    embedding width)."""

    list_length: int = 6
    d_model: int = 64
    hidden: tuple[int, ...] = (256, 128, 64)

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        problems = self.check_inputs()
        if self.list_length < 1:
            problems.append(f"list_length must be >= 1, not {self.list_length}")
        if problems:
            raise ValueError("; ".join(problems))


class DNN(PointwiseModel):
    """Point-wise behaviour logits of each (user, item) pair from one ReLU tower."""

    def __init__(self, config: DNNConfig, space: FeatureSpace):
        super().__init__()
        self.config = config
        self.candidates, self.user, self.interaction = personalised_inputs(config, space)
        width = config.d_model * (2 if self.user is not None else 1)
        self.tower = MLP(width, config.hidden, len(space.behaviours), dropout=config.dropout,
                         activation="relu")
        self.register_buffer("weights", space.utility_weights.float(), persistent=False)

    def logits_of(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.tower(pairs)                                       # (B, L, K)


class DNNSystem(BaselineSystem, section="dnn", model_class=DNN):
    """DNN behind the `system.System` interface (registered as "dnn")."""
