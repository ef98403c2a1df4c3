"""Every model `nar4rec` can train, by name: the one place that maps a name to its code.

Training, evaluation, `compare`, `bench`, `export` and `serve` look a model up here and speak to
its `system.System` only; nothing else branches on a model's name. The table holds strings, so
the command line reads the names without importing torch; `system_class(name)` imports the
model's module when first asked.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nar4rec.system import System

# the paper's six baselines (section 5.1), each a `models.base.BaselineSystem`
BASELINES = ("dnn", "dcn", "prm", "edge_rerank", "seq2slate", "pier")
# name -> "module:System subclass", and a line for --help
MODELS: dict[str, tuple[str, str]] = {
    "nar4rec": ("nar4rec.reranker:NAR4RecSystem",
                "NAR4Rec: the evaluator, then the generator; the generator proposes, the "
                "evaluator picks"),
    "evaluator": ("nar4rec.reranker:EvaluatorSystem",
                  "NAR4Rec's evaluator alone, ranking by its item-wise scores"),
    "dnn": ("nar4rec.models.dnn:DNNSystem", "point-wise DNN (YouTube DNN)"),
    "dcn": ("nar4rec.models.dcn:DCNSystem", "point-wise Deep & Cross Network"),
    "prm": ("nar4rec.models.prm:PRMSystem", "Personalized Re-ranking Model (transformer)"),
    "edge_rerank": ("nar4rec.models.edge_rerank:EdgeRerankSystem",
                    "Edge-rerank (context-aware, beam search)"),
    "seq2slate": ("nar4rec.models.seq2slate:Seq2SlateSystem",
                  "Seq2Slate (pointer network, autoregressive)"),
    "pier": ("nar4rec.models.pier:PIERSystem", "PIER (permutation generation and evaluation)"),
}
# The models `nar4rec compare` and `bench` put side by side (the evaluator alone is a part of
# NAR4Rec, measured as its `evaluator_top_m` variant).
COMPARED = tuple(name for name in MODELS if name != "evaluator")


def system_class(name: str) -> type[System]:
    """The `System` subclass registered as `name`."""
    from nar4rec.errors import Nar4recError

    if name not in MODELS:
        raise Nar4recError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    module, attribute = MODELS[name][0].split(":")
    cls = getattr(importlib.import_module(module), attribute)
    cls.name = name
    return cls


def check_models(models) -> None:
    """`--models` of compare and bench: registered models, the evaluator alone excepted."""
    from nar4rec.errors import Nar4recError

    unknown = [m for m in models if m not in COMPARED]
    if unknown or not models:
        raise Nar4recError(f"--models: unknown model {unknown[0] if unknown else '(none)'!r}; "
                           f"choose from {', '.join(COMPARED)}")
