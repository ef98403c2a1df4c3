"""Rerankers, one per file, and the few layers they share (layers.py).

Each file holds one model and declares its `system.System` (`DNNSystem`, ...); `registry`
names them. `baseline(name)` gives a baseline's (model class, config class).
"""

from __future__ import annotations

from nar4rec.registry import BASELINES

__all__ = ["BASELINES", "baseline"]


def baseline(name: str) -> tuple[type, type]:
    """(model class, config class) of the baseline registered as `name`."""
    import typing

    from nar4rec.registry import system_class

    if name not in BASELINES:
        raise KeyError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    model_class = system_class(name).model_class
    return model_class, typing.get_type_hints(model_class.__init__)["config"]
