"""Rerankers, one per file, and the few layers they share (layers.py).

`BASELINES` names every baseline behind the `base.ListModel` interface; `baseline(name)` gives
its (model class, config class), imported when first asked for.
"""

from __future__ import annotations

import importlib

# name -> (module, model class, config class)
BASELINES: dict[str, tuple[str, str, str]] = {
    "dnn": ("nar4rec.models.dnn", "DNN", "DNNConfig"),
    "dcn": ("nar4rec.models.dcn", "DCN", "DCNConfig"),
    "prm": ("nar4rec.models.prm", "PRM", "PRMConfig"),
    "edge_rerank": ("nar4rec.models.edge_rerank", "EdgeRerank", "EdgeRerankConfig"),
    "seq2slate": ("nar4rec.models.seq2slate", "Seq2Slate", "Seq2SlateConfig"),
    "pier": ("nar4rec.models.pier", "PIER", "PIERConfig"),
}


def baseline(name: str) -> tuple[type, type]:
    """(model class, config class) of the baseline registered as `name`."""
    if name not in BASELINES:
        raise KeyError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    module, model, config = BASELINES[name]
    imported = importlib.import_module(module)
    return getattr(imported, model), getattr(imported, config)
