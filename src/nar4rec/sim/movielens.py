"""A semi-synthetic world from MovieLens-100K: affinities from a factorisation of real ratings.

Users, movies, genres and the user features are real; a biased matrix factorisation fitted to
the 100,000 ratings (alternating least squares) gives every user-movie affinity, so the
simulated user likes what the real user would have rated highly. Genres drive similarity.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from nar4rec.errors import DataError, Nar4recError
from nar4rec.sim.presets import SimConfig
from nar4rec.sim.world import World, _noisy_projection, _normalise

N_GENRES = 19


def _read_rows(path: Path, sep: str, columns: int) -> list[list[str]]:
    if not path.exists():
        raise DataError("no such file (is --movielens-dir the ml-100k folder?)", file=str(path))
    rows = []
    with open(path, encoding="latin-1") as fh:
        for line_no, line in enumerate(fh, start=1):
            line = line.rstrip("\n")
            if not line:
                continue
            parts = line.split(sep)
            if len(parts) < columns:
                raise DataError(f"expected {columns} fields separated by {sep!r}, found "
                                f"{len(parts)}", file=str(path), row=line_no)
            rows.append(parts)
    if not rows:
        raise DataError("the file is empty", file=str(path))
    return rows


def load_ratings(directory: Path) -> np.ndarray:
    """u.data as an (N, 3) int array of (user index, item index, rating), 0-based indices."""
    path = directory / "u.data"
    if not path.exists():
        raise DataError("no such file (is --movielens-dir the ml-100k folder?)", file=str(path))
    try:
        data = np.loadtxt(path, dtype=np.int64, usecols=(0, 1, 2), ndmin=2)
    except ValueError as exc:
        raise DataError(f"not tab-separated integers ({exc})", file=str(path)) from None
    if len(data) == 0:
        raise DataError("the file is empty", file=str(path))
    bad = np.flatnonzero((data[:, 2] < 1) | (data[:, 2] > 5) | (data[:, 0] < 1) | (data[:, 1] < 1))
    if len(bad):
        raise DataError("rating outside 1..5 or id < 1", file=str(path), row=int(bad[0]) + 1)
    data[:, :2] -= 1
    return data


def fit_factorisation(ratings: np.ndarray, n_users: int, n_items: int, dim: int,
                      rng: np.random.Generator, iterations: int = 12,
                      regularisation: float = 8.0) -> dict[str, np.ndarray]:
    """Biased MF, r = mu + b_u + b_i + p_u . q_i, by alternating least squares (batched)."""
    users, items, values = ratings[:, 0], ratings[:, 1], ratings[:, 2].astype(np.float64)
    mu = values.mean()
    p = rng.normal(scale=0.1, size=(n_users, dim))
    q = rng.normal(scale=0.1, size=(n_items, dim))
    b_user = np.zeros(n_users)
    b_item = np.zeros(n_items)

    def groups(index: np.ndarray, size: int) -> tuple[np.ndarray, int]:
        """Each rating's (row, slot) in a (size, most ratings per row) padded layout."""
        order = np.argsort(index, kind="stable")
        counts = np.bincount(index, minlength=size)
        slot = np.empty(len(index), dtype=np.int64)
        slot[order] = np.arange(len(index)) - np.repeat(np.cumsum(counts) - counts, counts)
        return slot, int(counts.max())

    def solve(index, slot, width, other_index, other, other_bias, size):
        # Each row solves ([other 1]^T [other 1] + reg I) x = [other 1]^T (r - mu - b_other)
        # for its latent vector and bias, over its ratings laid out in a padded batch.
        padded = np.zeros((size, width, dim + 1))
        padded[index, slot, :dim] = other[other_index]
        padded[index, slot, dim] = 1.0
        target = np.zeros((size, width))
        target[index, slot] = values - mu - other_bias[other_index]
        gram = padded.transpose(0, 2, 1) @ padded + regularisation * np.eye(dim + 1)
        rhs = (padded.transpose(0, 2, 1) @ target[..., None])[..., 0]
        solution = np.linalg.solve(gram, rhs[..., None])[..., 0]
        return solution[:, :dim], solution[:, dim]

    user_slot, user_width = groups(users, n_users)
    item_slot, item_width = groups(items, n_items)
    for _ in range(iterations):
        p, b_user = solve(users, user_slot, user_width, items, q, b_item, n_users)
        q, b_item = solve(items, item_slot, item_width, users, p, b_user, n_items)
    predicted = mu + b_user[users] + b_item[items] + np.einsum("nd,nd->n", p[users], q[items])
    rmse = float(np.sqrt(np.mean((predicted - values) ** 2)))
    return {"p": p, "q": q, "b_user": b_user, "b_item": b_item, "mu": np.array(mu),
            "rmse": np.array(rmse)}


def build_movielens_world(config: SimConfig, rng: np.random.Generator) -> World:
    if not config.movielens_dir:
        raise Nar4recError("the movielens preset needs --movielens-dir, the MovieLens-100K "
                           "folder (u.data, u.item, u.user)")
    directory = Path(config.movielens_dir)
    ratings = load_ratings(directory)
    movies = _read_rows(directory / "u.item", "|", 5 + N_GENRES)
    people = _read_rows(directory / "u.user", "|", 5)
    n_users = int(max(ratings[:, 0].max() + 1, len(people)))
    n_items = int(max(ratings[:, 1].max() + 1, len(movies)))
    config = dataclasses.replace(config, n_users=n_users, n_items=n_items, n_topics=N_GENRES)
    fit = fit_factorisation(ratings, n_users, n_items, config.latent_dim, rng)

    genres = np.zeros((n_items, N_GENRES), dtype=np.float32)
    year = np.full(n_items, 1995.0)
    for row in movies:
        index = int(row[0]) - 1
        try:
            genres[index] = [float(x) for x in row[5:5 + N_GENRES]]
        except ValueError:
            raise DataError("genre flags must be 0 or 1", file=str(directory / "u.item"),
                            row=index + 1, field="genres") from None
        date = row[2].strip()
        if len(date) >= 4 and date[-4:].isdigit():
            year[index] = float(date[-4:])
    age = np.full(n_users, 30.0)
    gender = np.zeros(n_users, dtype=np.int64)
    occupations: dict[str, int] = {}
    occupation = np.zeros(n_users, dtype=np.int64)
    for row in people:
        index = int(row[0]) - 1
        age[index] = float(row[1])
        gender[index] = 1 if row[2] == "M" else 2
        occupation[index] = occupations.setdefault(row[3], len(occupations) + 1)

    # Affinity z = scale * (p.q + b_i + b_u) + bias equals scale * (predicted rating - mean).
    counts = np.bincount(ratings[:, 1], minlength=n_items).astype(np.float64)
    n_behaviours = len(config.behaviours)
    spread = np.array([config.behaviour_item_spread[b] for b in config.behaviours])
    item_attr = rng.normal(size=(n_items, n_behaviours)) * spread
    runtime = rng.normal(size=n_items) + 0.5 * genres[:, 8] - 0.5 * genres[:, 3]  # drama, kids
    for k, b in enumerate(config.behaviours):
        if b == "long_view":
            item_attr[:, k] += 0.8 * runtime
        elif b == "complete_view":
            item_attr[:, k] -= 1.0 * runtime
    no_genre = genres.sum(axis=1) == 0
    genres_for_similarity = genres.copy()
    genres_for_similarity[no_genre, 0] = 1.0          # "unknown"
    primary_genre = genres_for_similarity.argmax(axis=1)
    popularity = (counts + 1.0) ** 1.0
    activity = np.bincount(ratings[:, 0], minlength=n_users).astype(np.float64) + 1.0
    user_cat = {"user_gender": gender,
                "age_bucket": np.digitize(age, [18, 25, 35, 45, 50, 56]).astype(np.int64),
                "occupation": occupation}
    user_num = {"age": ((age - 33.0) / 12.0).astype(np.float32)}
    user_num.update(_noisy_projection("taste", fit["p"], 4, config.feature_noise, rng))
    item_cat = {"primary_genre": primary_genre.astype(np.int64),
                "decade": (year // 10).astype(np.int64)}
    item_num = {"year": ((year - 1990.0) / 10.0).astype(np.float32),
                "log_ratings": np.log1p(counts).astype(np.float32),
                "runtime": runtime.astype(np.float32)}
    item_num.update({f"genre_{g}": genres[:, g] for g in range(N_GENRES)})
    return World(
        config=config,
        user_latent=fit["p"].astype(np.float32),
        user_bias=fit["b_user"].astype(np.float32),
        user_weight=activity / activity.sum(),
        item_latent=fit["q"].astype(np.float32),
        item_bias=fit["b_item"].astype(np.float32),
        item_attr=item_attr.astype(np.float32),
        item_embedding=_normalise(genres_for_similarity).astype(np.float32),
        item_weight=popularity / popularity.sum(),
        user_cat=user_cat,
        user_num={k: np.asarray(v, dtype=np.float32) for k, v in user_num.items()},
        item_cat=item_cat,
        item_num={k: np.asarray(v, dtype=np.float32) for k, v in item_num.items()},
    )
