"""Simulator settings and the named presets (kuaishou, avito, movielens)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from nar4rec.errors import Nar4recError

FEED_BEHAVIOURS = ("view", "like", "follow", "long_view", "complete_view")


@dataclass(frozen=True)
class SimConfig:
    """Every knob of the simulated world, its ranking stage, logging policy and oracle.

    The user model (docs/simulator.md) for the item at 0-based position k of a list:
        exam_k   = (1 + k) ** -position_decay                       position bias
        F_k      = max_{j<k} sim(y_k, y_j)                           fatigue from similar items
        h_k      = sum_{j<k} carryover_decay ** (k-1-j) * (appeal(y_j) - carryover_baseline)
        logit_b  = bias_b + slope_b * z(u, y_k) + attr_b(y_k) - fatigue_b * F_k + carryover * h_k
        P(first) = exam_k * sigmoid(logit_first)        the first behaviour gates the others
        P(b)     = P(first) * sigmoid(logit_b)          for every other behaviour b
    where z(u, i) is the user-item affinity and appeal(i) = sigmoid(z(u, i)).
    """

    preset: str
    n_candidates: int
    list_length: int
    behaviours: tuple[str, ...]
    utility_weights: dict[str, float]
    behaviour_bias: dict[str, float]
    behaviour_slope: dict[str, float]
    behaviour_item_spread: dict[str, float]
    fatigue: dict[str, float]
    n_users: int = 20_000
    n_items: int = 50_000
    n_topics: int = 24
    latent_dim: int = 16
    affinity_scale: float = 2.5
    affinity_bias: float = -0.5
    item_quality_spread: float = 0.6
    topic_concentration: float = 1.5
    similarity_noise: float = 0.35
    position_decay: float = 0.35
    carryover: float = 1.5
    carryover_decay: float = 0.6
    carryover_baseline: float = 0.4
    popularity_exponent: float = 0.8
    candidate_pool_factor: int = 2
    upstream_noise: float = 0.8
    logging_temperature: float = 1.0
    feature_noise: float = 0.5
    oracle_beam: int = 8
    oracle_local_rounds: int = 4
    oracle_replacements: int = 10
    exhaustive_limit: int = 5040
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    days: int = 28
    start_date: str = "2024-03-01"
    chunk_size: int = 8192
    movielens_dir: str = ""

    def __post_init__(self) -> None:
        if self.n_candidates < 1 or not 1 <= self.list_length <= self.n_candidates:
            raise Nar4recError(f"need 1 <= list_length ({self.list_length}) <= n_candidates "
                               f"({self.n_candidates})")
        for name in ("utility_weights", "behaviour_bias", "behaviour_slope",
                     "behaviour_item_spread", "fatigue"):
            table = getattr(self, name)
            missing = [b for b in self.behaviours if b not in table]
            if missing:
                raise Nar4recError(f"setting '{name}' has no value for behaviours {missing}")
        if not (0 <= self.valid_fraction and 0 <= self.test_fraction
                and self.valid_fraction + self.test_fraction < 1):
            raise Nar4recError("valid_fraction + test_fraction must be in [0, 1)")
        positive = ("n_users", "n_items", "n_topics", "latent_dim", "chunk_size", "oracle_beam",
                    "days", "candidate_pool_factor")
        for name in positive:
            if getattr(self, name) < 1:
                raise Nar4recError(f"setting '{name}' must be at least 1, got "
                                   f"{getattr(self, name)}")
        for name in ("oracle_local_rounds", "oracle_replacements", "exhaustive_limit",
                     "position_decay",
                     "upstream_noise", "feature_noise"):
            if getattr(self, name) < 0:
                raise Nar4recError(f"setting '{name}' must be >= 0, got {getattr(self, name)}")
        if self.logging_temperature <= 0:
            raise Nar4recError("logging_temperature must be > 0")
        if self.n_items < self.n_candidates:
            raise Nar4recError(f"n_items ({self.n_items}) < n_candidates ({self.n_candidates})")


def _feed(**overrides) -> SimConfig:
    base = SimConfig(
        preset="kuaishou",
        n_candidates=60,
        list_length=6,
        behaviours=FEED_BEHAVIOURS,
        utility_weights={"view": 1.0, "like": 2.0, "follow": 4.0, "long_view": 1.0,
                         "complete_view": 1.0},
        behaviour_bias={"view": -0.5, "like": -3.2, "follow": -4.8, "long_view": -1.0,
                        "complete_view": -0.8},
        behaviour_slope={"view": 1.0, "like": 0.8, "follow": 0.6, "long_view": 0.7,
                         "complete_view": 0.5},
        behaviour_item_spread={"view": 0.3, "like": 0.7, "follow": 0.8, "long_view": 0.6,
                               "complete_view": 0.6},
        fatigue={"view": 2.0, "like": 1.0, "follow": 0.5, "long_view": 1.5,
                 "complete_view": 1.5},
    )
    return dataclasses.replace(base, **overrides)


PRESETS: dict[str, SimConfig] = {
    # Like the paper's industrial set: 60 candidates from ranking, 6 shown, five behaviours.
    "kuaishou": _feed(),
    # Like the paper's public set: 5 ads shown in some order, one click behaviour.
    "avito": SimConfig(
        preset="avito",
        n_candidates=5,
        list_length=5,
        behaviours=("click",),
        utility_weights={"click": 1.0},
        behaviour_bias={"click": -1.6},
        behaviour_slope={"click": 1.0},
        behaviour_item_spread={"click": 0.3},
        fatigue={"click": 2.0},
        n_users=20_000,
        n_items=30_000,
        position_decay=0.9,
        carryover=1.5,
        upstream_noise=0.8,
        logging_temperature=1.0,
    ),
    # Semi-synthetic: users, movies, genres and affinities from a factorisation of
    # MovieLens-100K; genres drive similarity. n_users / n_items come from the data.
    "movielens": _feed(
        preset="movielens",
        n_candidates=30,
        list_length=6,
        n_users=943,
        n_items=1682,
        n_topics=19,
        affinity_scale=1.6,
        affinity_bias=0.0,
        upstream_noise=0.6,
        candidate_pool_factor=4,
    ),
}


def preset_config(name: str) -> SimConfig:
    if name not in PRESETS:
        raise Nar4recError(f"unknown preset '{name}' (known: {', '.join(PRESETS)})")
    return PRESETS[name]


