"""Small builders shared by tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from nar4rec.sim.presets import preset_config
from nar4rec.sim.simulate import simulate


def small_config(preset: str, **overrides):
    """A preset shrunk so that a few thousand requests simulate in a second."""
    config = preset_config(preset)
    sizes = {"n_users": 500, "n_items": 2000, "chunk_size": 1000} if preset != "movielens" \
        else {"chunk_size": 1000}
    return dataclasses.replace(config, **{**sizes, **overrides})


def simulate_small(out: Path, preset: str = "kuaishou", requests: int = 3000, seed: int = 0,
                   **overrides) -> dict:
    return simulate(small_config(preset, **overrides), requests, seed, out, progress=False)
