"""Shared fixtures. Tests that need ../shared skip cleanly when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NAR4REC_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data`, or skip the test when it is not there (a user's fresh clone)."""
    data = SHARED / "data"
    if not data.is_dir():
        pytest.skip(f"{data} is absent: the real data samples are not beside this checkout")
    return data
