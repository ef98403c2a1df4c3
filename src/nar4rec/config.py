"""Dataclass configs, overridden by a TOML file and by `--set key=value` pairs.

`RunConfig` holds every setting of a run: each model's own config (declared in the model's
file), the training loops', the reranker's and the feature space's. This module does not import
torch (the command line reads it at start-up): a model's config is imported when a `RunConfig`
is first made.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nar4rec.errors import Nar4recError

if TYPE_CHECKING:
    from nar4rec.models.dcn import DCNConfig
    from nar4rec.models.dnn import DNNConfig
    from nar4rec.models.edge_rerank import EdgeRerankConfig
    from nar4rec.models.evaluator import EvaluatorConfig
    from nar4rec.models.nar4rec import NAR4RecConfig
    from nar4rec.models.pier import PIERConfig
    from nar4rec.models.prm import PRMConfig
    from nar4rec.models.seq2slate import Seq2SlateConfig
    from nar4rec.reranker import RerankerConfig
    from nar4rec.train import TrainConfig

SUMMARY_FILE = "summary.json"   # written beside the splits by `nar4rec simulate` and converters
RUN_FILE = "run.json"           # a run directory's record, its settings included (runs.py)
# Run settings the paper gives per data set (section 5.1): batch 1024 on Avito, 256 on Kuaishou
# (TrainConfig's default). Keyed by the data set a data directory's summary says it holds; a
# `--config` file or `--set` overrides them.
DATASET_SETTINGS: dict[str, dict[str, Any]] = {
    "avito": {"train.batch_size": 1024, "evaluator_train.batch_size": 1024},
}


# The paper's NAR4Rec where the defaults go beyond it (issue 21, stop 24; docs/results.md):
# the generator trained on the logged lists alone, the evaluator on the logged lists with plain
# self-attention, the proposals the generator's only. configs/paper.toml holds the same, and
# `paper_config` applies it. Every run written before stop 24 was trained at these
# values, so a stored run's settings that lack one of them read it from here
# (`RunConfig.from_dict`, `stored_section`), not from today's defaults.
PAPER_SETTINGS: dict[str, Any] = {
    "generator.gumbel_weight": 0.0,
    "generator.gumbel_objective": "log",
    "evaluator.causal": False,
    "evaluator.similarity_heads": 0,
    "evaluator.shared_values": False,
    "evaluator.alone_weight": 0.0,
    "reranker.alphas": (0.0, 0.3, 0.6, 0.9),
    "reranker.samples": 4,
    "reranker.evaluator_alphas": (),
    "reranker.evaluator_top_m": False,
}


def stored_section(section: str, values: dict) -> dict:
    """A stored table of settings (`section`: its RunConfig name, e.g. "evaluator") with the
    keys it lacks filled in from `PAPER_SETTINGS`: what a run written before those settings
    existed, or before their defaults changed, was trained with."""
    legacy = {key.partition(".")[2]: value for key, value in PAPER_SETTINGS.items()
              if key.partition(".")[0] == section}
    return {**legacy, **values}


def paper_config(config: RunConfig) -> RunConfig:
    """`config` with NAR4Rec at the paper's settings (`PAPER_SETTINGS`)."""
    return apply_overrides(config, PAPER_SETTINGS, source="the paper's settings")


def _lazy(target: str) -> Callable[[], Any]:
    """A `default_factory` for the config class `target` ("module:Class"), imported when the
    first default is made, so that importing this module imports no model (nor torch)."""
    module, name = target.split(":")

    def default() -> Any:
        return getattr(importlib.import_module(module), name)()

    return default


@dataclass
class FeaturesConfig:
    """How the FeatureSpace is fitted on the training split.

    min_count: a categorical value seen fewer times becomes "unknown" (index 1): rare ids get
        one shared row instead of a row each that the data cannot train.
    max_vocabulary: at most this many values per categorical feature (the most frequent).
    """

    min_count: int = 1
    max_vocabulary: int = 1_000_000

    def __post_init__(self) -> None:
        if self.min_count < 1 or self.max_vocabulary < 1:
            raise ValueError("min_count and max_vocabulary must be >= 1")


@dataclass
class RunConfig:
    """Every setting of a run; `--config FILE` tables and `--set a.b=v` change it.

    generator, evaluator: NAR4Rec's two models (their list_length, like every model's, is set
        from the data: the longest logged list of the training split).
    train, evaluator_train: the training loop of the main model (NAR4Rec's generator or the
        baseline) and of the evaluator.
    reranker: how the generator's lists are proposed and chosen (changeable at evaluation).
    features: how vocabularies are built from the training split.
    dnn, dcn, prm, edge_rerank, seq2slate, pier: each baseline's architecture.
    """

    generator: NAR4RecConfig = field(default_factory=_lazy("nar4rec.models.nar4rec:NAR4RecConfig"))
    evaluator: EvaluatorConfig = field(
        default_factory=_lazy("nar4rec.models.evaluator:EvaluatorConfig"))
    train: TrainConfig = field(default_factory=_lazy("nar4rec.train:TrainConfig"))
    evaluator_train: TrainConfig = field(default_factory=_lazy("nar4rec.train:TrainConfig"))
    reranker: RerankerConfig = field(default_factory=_lazy("nar4rec.reranker:RerankerConfig"))
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    dnn: DNNConfig = field(default_factory=_lazy("nar4rec.models.dnn:DNNConfig"))
    dcn: DCNConfig = field(default_factory=_lazy("nar4rec.models.dcn:DCNConfig"))
    prm: PRMConfig = field(default_factory=_lazy("nar4rec.models.prm:PRMConfig"))
    edge_rerank: EdgeRerankConfig = field(
        default_factory=_lazy("nar4rec.models.edge_rerank:EdgeRerankConfig"))
    seq2slate: Seq2SlateConfig = field(
        default_factory=_lazy("nar4rec.models.seq2slate:Seq2SlateConfig"))
    pier: PIERConfig = field(default_factory=_lazy("nar4rec.models.pier:PIERConfig"))

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        """A run's stored settings (run.json's "config"); a setting the file lacks takes the
        value it was trained with (`stored_section`), not today's default."""
        return apply_overrides(cls(), {name: stored_section(name, values)
                                       if isinstance(values, dict) else values
                                       for name, values in data.items()}, source=RUN_FILE)


def _coerce(current: Any, text: str, key: str) -> Any:
    """Parse `text` into the type of `current`."""
    try:
        if isinstance(current, bool):
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return lowered in ("true", "1", "yes")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str) or current is None:
            return text
        if isinstance(current, tuple | list | dict):
            value = json.loads(text)
            return type(current)(value) if not isinstance(current, dict) else value
    except (ValueError, json.JSONDecodeError):
        raise Nar4recError(f"--set {key}={text}: cannot read {text!r} as "
                           f"{type(current).__name__}") from None
    return text


def apply_overrides(config: Any, values: dict[str, Any], *, source: str) -> Any:
    """A copy of dataclass `config` with `values` applied; keys may be dotted for dicts and
    for nested dataclass configs (`generator.d_model`, or a TOML table `[generator]`).

    `values` maps field names (or `dict_field.key`) to already-typed values or to strings,
    which are parsed to the field's current type.
    """
    changes: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(config)}
    for key, value in values.items():
        head, _, rest = key.partition(".")
        if head not in names:
            raise Nar4recError(f"{source}: unknown setting '{head}' "
                               f"(known: {', '.join(sorted(names))})")
        current = changes.get(head, getattr(config, head))
        if dataclasses.is_dataclass(current):            # a nested config: recurse
            table = {rest: value} if rest else value
            if not isinstance(table, dict):
                raise Nar4recError(f"{source}: '{head}' is a table of settings; set "
                                   f"'{head}.<name>' instead")
            changes[head] = apply_overrides(current, table, source=source)
        elif rest:
            if not isinstance(current, dict):
                raise Nar4recError(f"{source}: '{head}' is not a table, cannot set '{key}'")
            updated = dict(current)
            if rest not in updated:
                raise Nar4recError(f"{source}: unknown key '{rest}' in '{head}' "
                                   f"(known: {', '.join(updated)})")
            updated[rest] = _coerce(updated[rest], value, key) if isinstance(value, str) \
                else value
            changes[head] = updated
        elif isinstance(value, str) and not isinstance(current, str):
            changes[head] = _coerce(current, value, key)
        elif isinstance(value, dict) and isinstance(current, dict):
            changes[head] = {**current, **value}
        else:
            changes[head] = value
    try:
        return dataclasses.replace(config, **changes)
    except (ValueError, TypeError) as exc:       # a config's own checks (__post_init__)
        raise Nar4recError(f"{source}: {exc}") from None


def load_overrides(config: Any, toml_path: str | Path | None, sets: list[str], *,
                   defaults: dict[str, Any] | None = None) -> Any:
    """Apply `defaults` (such as `dataset_settings`), then a TOML file, then `key=value`
    strings, to a dataclass config."""
    if defaults:
        config = apply_overrides(config, defaults, source="the data set's settings")
    if toml_path is not None:
        path = Path(toml_path)
        try:
            table = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise Nar4recError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as exc:
            raise Nar4recError(f"{path}: not valid TOML ({exc})") from None
        config = apply_overrides(config, table, source=str(path))
    return apply_overrides(config, parse_sets(sets), source="--set")


def dataset_of(data_dir: str | Path) -> str | None:
    """The data set a data directory holds, as its summary.json says: the simulator's preset
    ("avito", "kuaishou", "movielens") or the first word of a converter's source ("avito",
    "mind", "kuairand"); None without a readable summary."""
    try:
        summary = json.loads((Path(data_dir) / SUMMARY_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    preset = summary.get("preset") if isinstance(summary, dict) else None
    source = summary.get("source") if isinstance(summary, dict) else None
    if isinstance(preset, str) and preset:
        return preset
    if isinstance(source, str) and source.split():
        return source.split()[0]
    return None


def dataset_settings(data_dir: str | Path) -> dict[str, Any]:
    """The run settings `DATASET_SETTINGS` gives the data set in `data_dir` (often none), as
    dotted keys for `apply_overrides`."""
    return dict(DATASET_SETTINGS.get(dataset_of(data_dir) or "", {}))


def parse_sets(items: list[str]) -> dict[str, str]:
    """`key=value` strings (from repeated --set options) as a dict of stripped strings."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise Nar4recError(f"--set {item}: expected key=value")
        pairs[key.strip()] = value.strip()
    return pairs
