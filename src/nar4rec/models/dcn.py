"""DCN (Wang, Fu, Fu, Wang, "Deep & Cross Network for Ad Click Predictions", ADKDD 2017).

The embedded input x0 (user and item embeddings, concatenated) goes through a cross network,
x_{l+1} = x0 (x_l . w_l) + b_l + x_l (eq. 3 of the DCN paper: explicit feature crosses of
bounded degree, O(width) parameters a layer), and in parallel through a deep ReLU network; the
two outputs are concatenated and mapped to one logit per behaviour. Point-wise, used like DNN
(`PointwiseModel`): binary cross-entropy on shown items, a list is the top m by predicted utility.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nar4rec.data.features import FeatureSpace
from nar4rec.models.base import BaselineSystem, InputConfig, PointwiseModel
from nar4rec.models.layers import MLP, personalised_inputs


@dataclass
class DCNConfig(InputConfig):
    """list_length: m. d_model: width of the user and item embeddings. cross_layers: depth of
    the cross network. hidden: the deep network's ReLU layers."""

    list_length: int = 6
    d_model: int = 64
    cross_layers: int = 3
    hidden: tuple[int, ...] = (256, 128)

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        problems = self.check_inputs()
        if self.list_length < 1:
            problems.append(f"list_length must be >= 1, not {self.list_length}")
        if self.cross_layers < 0:
            problems.append(f"cross_layers must be >= 0, not {self.cross_layers}")
        if problems:
            raise ValueError("; ".join(problems))


class CrossNetwork(nn.Module):
    """x_{l+1} = x0 * (x_l . w_l) + b_l + x_l, for each of `layers` layers."""

    def __init__(self, width: int, layers: int):
        super().__init__()
        self.weights = nn.Parameter(torch.randn(layers, width) / width ** 0.5)
        self.biases = nn.Parameter(torch.zeros(layers, width))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        """(..., width) -> (..., width)."""
        x = x0
        for w, b in zip(self.weights, self.biases, strict=True):
            x = x0 * (x @ w).unsqueeze(-1) + b + x                     # (..., width)
        return x


class DCN(PointwiseModel):
    """Point-wise behaviour logits from a cross network and a deep network side by side."""

    def __init__(self, config: DCNConfig, space: FeatureSpace):
        super().__init__()
        self.config = config
        self.candidates, self.user, self.interaction = personalised_inputs(config, space)
        width = config.d_model * (2 if self.user is not None else 1)
        self.cross = CrossNetwork(width, config.cross_layers)
        self.deep = nn.Sequential(MLP(width, config.hidden[:-1], config.hidden[-1],
                                      dropout=config.dropout, activation="relu"), nn.ReLU()) \
            if config.hidden else nn.Identity()
        deep_width = config.hidden[-1] if config.hidden else width
        self.head = nn.Linear(width + deep_width, len(space.behaviours))
        self.register_buffer("weights", space.utility_weights.float(), persistent=False)

    def logits_of(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.cross(pairs), self.deep(pairs)], dim=-1))  # (B, L, K)


class DCNSystem(BaselineSystem, section="dcn", model_class=DCN):
    """DCN behind the `system.System` interface (registered as "dcn")."""
