"""The simulated world and its exact expected feedback for any list (closed form, batched).

A `World` holds every user's and item's hidden parameters (latent vectors, biases, behaviour
attributes, similarity embeddings) and the observable features written to the logs. Given a
user, the candidates and any number of lists over them, `list_feedback` returns the exact
probability of every behaviour at every position under the user model of `SimConfig`; the
expected utility of a list is the weighted sum of those probabilities.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nar4rec.errors import Nar4recError
from nar4rec.sim.presets import SimConfig

TRUTH_DIR = "truth"
WORLD_FILE = "world.npz"


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


@dataclass
class World:
    """Hidden truth and observable features of a simulated population."""

    config: SimConfig
    user_latent: np.ndarray        # (U, d)
    user_bias: np.ndarray          # (U,)
    user_weight: np.ndarray        # (U,)  how often each user makes a request, sums to 1
    item_latent: np.ndarray        # (I, d)
    item_bias: np.ndarray          # (I,)
    item_attr: np.ndarray          # (I, K) per-behaviour item attribute added to its logit
    item_embedding: np.ndarray     # (I, D) unit vectors; cosine similarity drives fatigue
    item_weight: np.ndarray        # (I,)  how often the upstream stages retrieve each item
    user_cat: dict[str, np.ndarray]
    user_num: dict[str, np.ndarray]
    item_cat: dict[str, np.ndarray]
    item_num: dict[str, np.ndarray]

    @property
    def n_users(self) -> int:
        return len(self.user_latent)

    @property
    def n_items(self) -> int:
        return len(self.item_latent)

    def item_urn(self) -> np.ndarray:
        """Item indices repeated in proportion to item_weight: a uniform draw from it is a
        popularity-weighted draw, in O(1) (weights resolved to 1 / 2**22)."""
        if not hasattr(self, "_item_urn"):
            self._item_urn = _urn(self.item_weight)
        return self._item_urn

    def user_urn(self) -> np.ndarray:
        """User indices repeated in proportion to user_weight (see item_urn)."""
        if not hasattr(self, "_user_urn"):
            self._user_urn = _urn(self.user_weight)
        return self._user_urn

    @property
    def weights(self) -> np.ndarray:
        """Utility weights in behaviour order, (K,)."""
        return np.array([self.config.utility_weights[b] for b in self.config.behaviours])

    def _per_behaviour(self, name: str) -> np.ndarray:
        table = getattr(self.config, name)
        return np.array([table[b] for b in self.config.behaviours], dtype=np.float32)

    def affinity(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """z(u, i) for users (R,) and items (R, n): (R, n)."""
        c = self.config
        dot = np.einsum("rd,rnd->rn", self.user_latent[users], self.item_latent[items])
        return c.affinity_scale * (dot + self.item_bias[items] + self.user_bias[users][:, None]) \
            + c.affinity_bias

    def candidate_terms(self, users: np.ndarray, items: np.ndarray) -> CandidateTerms:
        """Everything about each candidate that does not depend on the list: (R, n, ...)."""
        z = self.affinity(users, items)                                      # (R, n)
        base = (self._per_behaviour("behaviour_bias")
                + self._per_behaviour("behaviour_slope") * z[..., None]
                + self.item_attr[items])                                     # (R, n, K)
        embedding = self.item_embedding[items]                              # (R, n, D)
        similarity = np.maximum(embedding @ embedding.transpose(0, 2, 1), 0.0)  # (R, n, n)
        return CandidateTerms(appeal=sigmoid(z).astype(np.float32),
                              base_logit=base.astype(np.float32),
                              similarity=similarity.astype(np.float32))

    def list_feedback(self, terms: CandidateTerms, lists: np.ndarray) -> np.ndarray:
        """Exact P(behaviour) at each position of each list.

        Args:
            terms: candidate terms of R requests, from `candidate_terms`.
            lists: (R, L, m) candidate indices, L lists of length m per request.
        Returns:
            (R, L, m, K) marginal probability of each behaviour at each position.
        """
        return self._probabilities(self._list_logits(terms, lists), self.examination(
            lists.shape[-1]))

    def list_utility(self, terms: CandidateTerms, lists: np.ndarray) -> np.ndarray:
        """Exact expected utility R(u, Y) of lists (R, L, m): (R, L)."""
        gains = self._utility(self._list_logits(terms, lists), self.examination(lists.shape[-1]))
        return gains.sum(axis=-1)

    def _list_logits(self, terms: CandidateTerms, lists: np.ndarray) -> np.ndarray:
        """Every behaviour's logit at every position of lists (R, L, m): (R, L, m, K)."""
        c = self.config
        rows = np.arange(lists.shape[0])[:, None, None]                     # (R, 1, 1)
        m = lists.shape[-1]
        base = terms.base_logit[rows, lists]                                 # (R, L, m, K)
        appeal = terms.appeal[rows, lists]                                   # (R, L, m)
        sim = terms.similarity[rows[..., None], lists[..., :, None], lists[..., None, :]]
        above = np.tril(np.ones((m, m), dtype=bool), k=-1)                   # (m, m) j < k
        fatigue = np.where(above, sim, 0.0).max(axis=-1)                     # (R, L, m)
        carry = (appeal - c.carryover_baseline) @ self.carryover_matrix(m).T  # (R, L, m)
        return (base - self._per_behaviour("fatigue") * fatigue[..., None]
                + c.carryover * carry[..., None])

    def _utility(self, logits: np.ndarray, exam: np.ndarray) -> np.ndarray:
        """(..., m, K) logits and (m,) examination -> (..., m) expected utility per position."""
        p = sigmoid(logits)
        weights = self.weights.astype(np.float32)
        return exam * p[..., 0] * (weights[0] + p[..., 1:] @ weights[1:])

    def _probabilities(self, logits: np.ndarray, exam: np.ndarray) -> np.ndarray:
        """(..., m, K) logits and (m,) examination -> (..., m, K) marginal probabilities."""
        p = sigmoid(logits)
        first = exam[:, None] * p[..., :1]
        return np.concatenate([first, first * p[..., 1:]], axis=-1)

    def step_gain(self, terms: CandidateTerms, position: int, max_similarity: np.ndarray,
                  carry: np.ndarray) -> np.ndarray:
        """Expected utility of placing each candidate at `position`, given what is above.

        Args:
            max_similarity: (R, B, n) each candidate's max similarity to the items above.
            carry: (R, B) carry-over state h of the items above.
        Returns:
            (R, B, n) utility gain of the candidate at that position.
        """
        c = self.config
        logits = (terms.base_logit[:, None]
                  - self._per_behaviour("fatigue") * max_similarity[..., None]
                  + c.carryover * carry[..., None, None])                     # (R, B, n, K)
        exam = np.float32((1.0 + position) ** -c.position_decay)
        return self._utility(logits, exam)

    def examination(self, m: int) -> np.ndarray:
        return ((1.0 + np.arange(m)) ** -self.config.position_decay).astype(np.float32)

    def carryover_matrix(self, m: int) -> np.ndarray:
        """A[k, j] = decay ** (k - 1 - j) for j < k: h = A @ (appeal - baseline)."""
        k, j = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
        return np.where(j < k, self.config.carryover_decay ** np.maximum(k - 1 - j, 0),
                        0.0).astype(np.float32)

    def utility(self, users: np.ndarray, items: np.ndarray, lists: np.ndarray) -> np.ndarray:
        """Expected utility R(u, Y) of lists (R, L, m) over candidates items (R, n): (R, L)."""
        return self.list_utility(self.candidate_terms(users, items), lists)

    def save(self, path: str | os.PathLike) -> None:
        arrays = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if isinstance(getattr(self, f.name), np.ndarray)}    # no deep copies
        for group in ("user_cat", "user_num", "item_cat", "item_num"):
            for name, values in getattr(self, group).items():
                arrays[f"{group}/{name}"] = values
        arrays["config"] = np.array(json.dumps(dataclasses.asdict(self.config)))
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> World:
        """Load the ground truth written by `nar4rec simulate`: its output directory, the
        directory's truth/ folder, or the world.npz file itself."""
        path = Path(path)
        if (path / TRUTH_DIR).is_dir():
            path = path / TRUTH_DIR
        if path.is_dir():
            path = path / WORLD_FILE
        if not path.exists():
            raise Nar4recError(f"{path}: no simulator ground truth here")
        with np.load(path, allow_pickle=False) as data:
            raw = json.loads(str(data["config"]))
            config = SimConfig(**{k: tuple(v) if k == "behaviours" else v
                                  for k, v in raw.items()})
            fields = {}
            groups: dict[str, dict[str, np.ndarray]] = {
                "user_cat": {}, "user_num": {}, "item_cat": {}, "item_num": {}}
            for key in data.files:
                group, _, name = key.partition("/")
                if name:
                    groups[group][name] = data[key]
                elif key != "config":
                    fields[key] = data[key]
        return cls(config=config, **fields, **groups)


@dataclass
class CandidateTerms:
    """Per-candidate quantities of R requests with n candidates each."""

    appeal: np.ndarray       # (R, n) sigmoid of the user-item affinity
    base_logit: np.ndarray   # (R, n, K) each behaviour's logit before list effects
    similarity: np.ndarray   # (R, n, n) cosine similarity, clipped at 0

    def take(self, rows: np.ndarray | slice) -> CandidateTerms:
        return CandidateTerms(self.appeal[rows], self.base_logit[rows], self.similarity[rows])


def _urn(weights: np.ndarray, size: int = 1 << 22) -> np.ndarray:
    counts = np.floor(weights / weights.sum() * size).astype(np.int64)
    counts[counts == 0] = 1  # every item stays reachable
    return np.repeat(np.arange(len(weights)), counts)


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def build_synthetic_world(config: SimConfig, rng: np.random.Generator) -> World:
    """Users with topic interests, items in topics with quality and behaviour attributes."""
    c = config
    n_behaviours = len(c.behaviours)
    topic_centres = rng.normal(size=(c.n_topics, c.latent_dim)) / np.sqrt(c.latent_dim)

    item_topic = rng.integers(0, c.n_topics, size=c.n_items)
    item_latent = (c.topic_concentration * topic_centres[item_topic]
                   + rng.normal(size=(c.n_items, c.latent_dim)) / np.sqrt(c.latent_dim))
    quality = rng.normal(scale=c.item_quality_spread, size=c.n_items)
    duration = rng.normal(size=c.n_items)
    spread = np.array([c.behaviour_item_spread[b] for b in c.behaviours])
    item_attr = rng.normal(size=(c.n_items, n_behaviours)) * spread
    for k, b in enumerate(c.behaviours):      # long videos are watched long, rarely finished
        if b == "long_view":
            item_attr[:, k] += 0.8 * duration
        elif b == "complete_view":
            item_attr[:, k] -= 1.0 * duration
    embedding = _normalise(np.eye(c.n_topics)[item_topic]
                           + c.similarity_noise * rng.normal(size=(c.n_items, c.n_topics))
                           / np.sqrt(c.n_topics) * 3)
    author = rng.integers(0, max(c.n_items // 8, 1), size=c.n_items)

    # Users like one or two topics.
    main_topic = rng.integers(0, c.n_topics, size=c.n_users)
    second_topic = rng.integers(0, c.n_topics, size=c.n_users)
    mix = rng.uniform(0.5, 1.0, size=(c.n_users, 1))
    user_latent = (mix * topic_centres[main_topic] + (1 - mix) * topic_centres[second_topic]
                   + 0.5 * rng.normal(size=(c.n_users, c.latent_dim)) / np.sqrt(c.latent_dim))
    activity = rng.lognormal(sigma=1.0, size=c.n_users)
    popularity = rng.permutation(np.arange(1, c.n_items + 1) ** -c.popularity_exponent)

    user_cat = {"segment": main_topic.astype(np.int64),
                "activity_level": np.digitize(np.log(activity), [-1.0, 0.0, 1.0]).astype(np.int64)}
    user_num = {"log_activity": np.log(activity)}
    item_cat = {"topic": item_topic.astype(np.int64), "author": author.astype(np.int64)}
    item_num = {"duration": duration,
                "quality_estimate": quality + c.feature_noise * rng.normal(size=c.n_items)}
    user_num.update(_noisy_projection("taste", user_latent, 4, c.feature_noise, rng))
    item_num.update(_noisy_projection("content", item_latent, 4, c.feature_noise, rng))
    return World(
        config=c,
        user_latent=user_latent.astype(np.float32),
        user_bias=np.zeros(c.n_users, dtype=np.float32),
        user_weight=activity / activity.sum(),
        item_latent=item_latent.astype(np.float32),
        item_bias=(quality / c.affinity_scale).astype(np.float32),
        item_attr=item_attr.astype(np.float32),
        item_embedding=embedding.astype(np.float32),
        item_weight=popularity / popularity.sum(),
        user_cat=user_cat,
        user_num={k: v.astype(np.float32) for k, v in user_num.items()},
        item_cat=item_cat,
        item_num={k: v.astype(np.float32) for k, v in item_num.items()},
    )


def _noisy_projection(prefix: str, latent: np.ndarray, width: int, noise: float,
                      rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Features an upstream model would provide: a random projection of the latent, plus noise."""
    projection = rng.normal(size=(latent.shape[1], width)) / np.sqrt(latent.shape[1])
    values = latent @ projection
    values = values / values.std(axis=0, keepdims=True)
    values += noise * rng.normal(size=values.shape)
    return {f"{prefix}_{k}": values[:, k] for k in range(width)}
