"""Run directories: train a whole reranking system into one, load it, apply it to a file.

This is what `nar4rec train` and `rerank` run (the evaluation protocols are `evaluation.py`).
A run directory holds:

    run.json            the model name, every setting (RunConfig), the FeatureSpace, the data
                        it was trained on and each finished phase's result
    PHASE/              each training phase of the model's system (`system.System.phases`):
                        best.pt, last.pt, metrics.jsonl, steps.jsonl. NAR4Rec: evaluator/,
                        then generator/; a baseline: model/

A data directory holds `train`, `valid` and `test` splits, each a `SPLIT.parquet` file or a
`SPLIT/` folder of Parquet shards (what `nar4rec simulate` and `nar4rec prepare` write).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nar4rec.config import (
    RUN_FILE,
    RunConfig,
    apply_overrides,
    dataset_settings,
    stored_section,
)
from nar4rec.data.batch import RequestBatch
from nar4rec.data.features import FeatureSpace
from nar4rec.data.format import folder_files
from nar4rec.data.loader import RequestLoader, max_lengths
from nar4rec.errors import Nar4recError
from nar4rec.exploration import Exploration, explore
from nar4rec.io import atomic_file
from nar4rec.registry import system_class
from nar4rec.reranker import Reranker
from nar4rec.system import Phase, System
from nar4rec.train import (
    BEST,
    METRICS,
    STEPS,
    DistributedContext,
    distributed_context,
    load_checkpoint,
    train,
)

log = logging.getLogger(__name__)


def split_files(data_dir: str | Path, split: str, *, required: bool = True) -> list[Path]:
    """The Parquet files of one split: DIR/SPLIT.parquet, or every .parquet in DIR/SPLIT/
    but those whose names start with "_" or "." (a folder written by Spark: its part files
    count, `_SUCCESS` and `.crc` checksums do not; `format.folder_files`)."""
    data_dir = Path(data_dir)
    single = data_dir / f"{split}.parquet"
    if single.is_file():
        return [single]
    shards = folder_files(data_dir / split) if (data_dir / split).is_dir() else []
    if not shards and required:
        if not data_dir.is_dir():
            raise Nar4recError(f"{data_dir}: no such data directory")
        raise Nar4recError(f"{data_dir}: no '{split}' split (expected {split}.parquet or a "
                           f"{split}/ folder of .parquet shards)")
    return shards


# ---------------------------------------------------------------------------------------------
# Training


def train_run(data_dir: str | Path, run_dir: str | Path, *, model: str = "nar4rec",
              config: RunConfig | None = None, reuse: dict[str, str | Path] | None = None,
              resume: bool = False, overwrite: bool = False, force: bool = False,
              progress: bool | None = None, context: DistributedContext | None = None) -> dict:
    """Train a whole system into `run_dir`, phase after phase (`System.phases`).

    Without a valid split, a one-line warning says so: early stopping and the best checkpoint
    then follow the training loss.

    Args:
        data_dir: the data (train and valid splits).
        model: a name of `registry.MODELS`.
        config: every setting; defaults to RunConfig() with the data set's settings
            (`config.dataset_settings`: batch size 1024 on Avito).
        reuse: {phase: run} phases copied, trained, from another run on the same data instead
            of trained again (NAR4Rec's evaluator for vanilla training, Table 6); the feature
            space then comes from that run.
        resume: continue an interrupted run: finished phases are kept, the one in progress
            restarts from its last checkpoint. The run's own settings are used. A run_dir
            without a run is an error, and so is other data than the run was trained on
            (`data_fingerprint`: the splits' files, requests and bytes) unless `force`.
        overwrite: replace an existing run directory.
        force: resume even on other data than the run was trained on.
    Returns:
        run.json's content.
    """
    system = system_class(model)
    reuse = {name: Path(run) for name, run in (reuse or {}).items()}
    unknown = [name for name in reuse if name not in {p.name for p in system.phases}]
    if unknown:
        raise Nar4recError(f"a {model} run has no '{unknown[0]}' phase to reuse")
    context = context or distributed_context()
    run_dir = Path(run_dir)
    train_paths = split_files(data_dir, "train")
    valid_paths = split_files(data_dir, "valid", required=False)
    if config is None:
        config = apply_overrides(RunConfig(), dataset_settings(data_dir),
                                 source="the data set's settings")
    fingerprint = data_fingerprint(data_dir, train_paths, valid_paths)
    info = _start_run(run_dir, data_dir, fingerprint, system, config, train_paths, reuse,
                      resume, overwrite, force, context)
    to_train = [p for p in system.phases if p.name not in info["phases"] and p.name not in reuse]
    if not valid_paths and to_train and context.is_main:
        log.warning(f"warning: {data_dir} has no 'valid' split: early stopping and the best "
                    "checkpoint follow the training loss")
    config = RunConfig.from_dict(info["config"])
    space = FeatureSpace.from_dict(info["space"])

    def trained(name: str) -> torch.nn.Module:
        phase = next(p for p in system.phases if p.name == name)
        return _load_phase(run_dir, system, phase, space).to(context.device)

    for phase in system.phases:
        if phase.name in info["phases"]:
            continue
        if phase.name in reuse:
            _copy_phase(reuse[phase.name], run_dir, phase.name, context)
            info = _finish_phase(run_dir, info, phase.name,
                                 {"copied_from": str(reuse[phase.name])}, context)
            continue
        model_config = system.phase_config(phase, config, train_paths, space)
        if model_config != getattr(config, phase.section):     # fitted on the training split
            info["config"][phase.section] = dataclasses.asdict(model_config)
            _write_run(run_dir, info, context)
        train_config = getattr(config, phase.train)
        torch.manual_seed(train_config.seed)
        module = system.build(phase, model_config, space)
        result = _train_phase(module, system.loss(phase, model_config, space, trained),
                              phase.name, model, model_config, train_config, space,
                              train_paths, valid_paths, run_dir, resume, progress, context)
        info = _finish_phase(run_dir, info, phase.name, result, context)
    return info


def data_fingerprint(data_dir: str | Path, train_paths: list[Path],
                     valid_paths: list[Path]) -> dict:
    """What identifies a data directory cheaply: its resolved path and, per split (train,
    valid), the number of files, of requests (from the Parquet footers) and of bytes."""
    def split(paths: list[Path]) -> dict | None:
        if not paths:
            return None
        return {"files": len(paths),
                "requests": sum(pq.ParquetFile(p).metadata.num_rows for p in paths),
                "bytes": sum(p.stat().st_size for p in paths)}

    return {"resolved": str(Path(data_dir).resolve()), "train": split(train_paths),
            "valid": split(valid_paths)}


def _same_data(info: dict, fingerprint: dict) -> bool:
    """Whether a run was trained on the data of `fingerprint`: the same splits (a copy or a
    move is the same data); for a run without a fingerprint, the same resolved path."""
    recorded = info.get("data_fingerprint")
    if recorded is None:
        return str(Path(info["data"]).resolve()) == fingerprint["resolved"]
    return all(recorded[split] == fingerprint[split] for split in ("train", "valid"))


def _describe_data(fingerprint: dict | None) -> str:
    if fingerprint is None:
        return "no fingerprint recorded"
    parts = []
    for split in ("train", "valid"):
        counts = fingerprint[split]
        parts.append(f"{split} {counts['requests']:,} requests, {counts['bytes']:,} bytes"
                     if counts else f"no {split}")
    return ", ".join(parts)


def _start_run(run_dir: Path, data_dir, fingerprint: dict, system: type[System],
               config: RunConfig, train_paths, reuse: dict[str, Path], resume: bool,
               overwrite: bool, force: bool, context: DistributedContext) -> dict:
    """run.json of a new run (settings, FeatureSpace, list length), or of the resumed one."""
    existing = run_dir / RUN_FILE
    if resume and not existing.exists():
        state = "does not exist" if not run_dir.exists() else \
            "is empty" if not any(run_dir.iterdir()) else f"holds no {RUN_FILE}"
        raise Nar4recError(f"{run_dir}: no run to resume (the folder {state}); leave out "
                           "--resume to start one")
    if resume:
        info = read_run(run_dir)
        if info["model"] != system.name:
            raise Nar4recError(f"{run_dir}: resuming a '{info['model']}' run as "
                               f"'{system.name}'")
        if not force and not _same_data(info, fingerprint):
            raise Nar4recError(
                f"{run_dir}: trained on other data than {data_dir} (the run's: {info['data']}, "
                f"{_describe_data(info.get('data_fingerprint'))}; given: "
                f"{_describe_data(fingerprint)}); resume on the run's data, or use --force")
        return info
    occupied = run_dir.exists() and any(run_dir.iterdir())
    context_barrier(context)               # every rank looks before rank 0 writes anything
    if occupied and not resume:
        if not overwrite:
            raise Nar4recError(f"{run_dir}: already exists; use --resume to continue it or "
                               "--overwrite to replace it")
        if context.is_main:
            shutil.rmtree(run_dir)
    context_barrier(context)
    if reuse:
        space = FeatureSpace.from_dict(read_run(next(iter(reuse.values())))["space"])
    else:
        space = FeatureSpace.fit(train_paths, min_count=config.features.min_count,
                                 max_vocabulary=config.features.max_vocabulary)
    most_candidates, list_length = max_lengths(train_paths)
    if list_length < 1:
        raise Nar4recError(f"{train_paths[0]}: no request shows any item")
    config = dataclasses.replace(config, **{
        phase.section: dataclasses.replace(getattr(config, phase.section),
                                           list_length=list_length)
        for phase in system.phases})
    settings = {name: value for name, value in dataclasses.asdict(config).items()
                if name in system.sections}
    info = {"model": system.name, "data": str(data_dir), "data_fingerprint": fingerprint,
            "list_length": list_length, "max_candidates": most_candidates,
            "config": settings, "space": space.to_dict(), "phases": {}}
    _write_run(run_dir, info, context)
    return info


def _train_phase(network: torch.nn.Module, step, name: str, model_name: str, model_config,
                 train_config,
                 space: FeatureSpace, train_paths, valid_paths, run_dir: Path, resume: bool,
                 progress, context: DistributedContext) -> dict:
    train_loader = RequestLoader(train_paths, space, batch_size=train_config.batch_size,
                                 shuffle=True, seed=train_config.seed, rank=context.rank,
                                 world_size=context.world_size)
    valid_loader = RequestLoader(valid_paths, space, batch_size=1024, rank=context.rank,
                                 world_size=context.world_size) if valid_paths else None
    describe = {"model": model_name, "config": dataclasses.asdict(model_config),
                "space": space.to_dict()}
    result = train(network, step, train_loader, valid_loader, train_config, run_dir / name,
                   describe=describe, resume=resume, context=context, progress=progress)
    return dataclasses.asdict(result)


def _finish_phase(run_dir: Path, info: dict, phase: str, result: dict,
                  context: DistributedContext) -> dict:
    info = {**info, "phases": {**info["phases"], phase: result}}
    _write_run(run_dir, info, context)
    return info


def _copy_phase(source: Path, run_dir: Path, phase: str, context: DistributedContext) -> None:
    """A finished phase of another run, copied into this one."""
    info = read_run(source)
    if phase not in info["phases"]:
        raise Nar4recError(f"{source}: its {phase} has not finished training")
    if context.is_main:
        target = run_dir / phase
        target.mkdir(parents=True, exist_ok=True)
        for name in (BEST, METRICS, STEPS):
            if (source / phase / name).exists():
                with atomic_file(target / name) as tmp:
                    shutil.copyfile(source / phase / name, tmp)
    context_barrier(context)


def _write_run(run_dir: Path, info: dict, context: DistributedContext) -> None:
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(run_dir / RUN_FILE) as tmp:
            Path(tmp).write_text(json.dumps(info, indent=1))
    context_barrier(context)


def context_barrier(context: DistributedContext) -> None:
    if context.active:
        torch.distributed.barrier()


def read_run(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RUN_FILE
    if not path.exists():
        raise Nar4recError(f"{run_dir}: not a run directory (no {RUN_FILE})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise Nar4recError(f"{path}: not valid JSON ({exc})") from None


# settings training fills in, or that do not change what is trained
UNCOMPARED_SETTINGS = frozenset({"list_length", "tau", "threads", "log_every",
                                 "checkpoint_every"})


def changed_settings(info: dict, config: RunConfig) -> list[str]:
    """The tables of `config` (for example "evaluator") whose settings differ from those the
    run of run.json's `info` was trained with, ignoring `UNCOMPARED_SETTINGS`."""
    recorded = RunConfig.from_dict(info["config"])

    def comparable(table) -> dict:
        return {k: v for k, v in dataclasses.asdict(table).items()
                if k not in UNCOMPARED_SETTINGS}

    return [name for name in info["config"]
            if comparable(getattr(recorded, name)) != comparable(getattr(config, name))]


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadedRun:
    """A trained run: run.json's content, its feature space and settings, and its system."""

    info: dict
    space: FeatureSpace
    config: RunConfig
    system: System

    @property
    def reranker(self) -> Reranker | None:
        """NAR4Rec's generator-evaluator `Reranker`, for a run that has one."""
        return getattr(self.system, "reranker", None)


def load_run(run_dir: str | Path, *, sets: dict | None = None) -> LoadedRun:
    """A trained run's system (best checkpoints); `sets` changes the settings its system
    allows after training (NAR4Rec's `reranker.*`)."""
    run_dir = Path(run_dir)
    info = read_run(run_dir)
    system = system_class(info["model"])
    config = RunConfig.from_dict(info["config"])
    if sets:
        system.check_settable(sets)
        config = apply_overrides(config, sets, source="--set")
    missing = [p.name for p in system.phases if p.name not in info["phases"]]
    if missing:
        raise Nar4recError(f"{run_dir}: the {missing[0]} has not finished training (run "
                           "`nar4rec train ... --resume`)")
    space = FeatureSpace.from_dict(info["space"])
    modules = {phase.name: _load_phase(run_dir, system, phase, space)
               for phase in system.phases}
    return LoadedRun(info=info, space=space, config=config,
                     system=system(modules, config, space, info["list_length"]))


def _load_phase(run_dir: Path, system: type[System], phase: Phase,
                space: FeatureSpace) -> torch.nn.Module:
    """The trained module of `phase` (its best checkpoint), in evaluation mode."""
    checkpoint = load_checkpoint(run_dir / phase.name / BEST)
    config_class = type(getattr(RunConfig(), phase.section))
    stored = stored_section(phase.section, checkpoint["describe"]["config"])
    module = system.build(phase, config_class(**stored), space)
    module.load_state_dict(checkpoint["model"])
    return module.eval()


# ---------------------------------------------------------------------------------------------
# Applying a run to a file


@torch.no_grad()
def rerank_file(run_dir: str | Path, data_file: str | Path, out_file: str | Path, *,
                batch_size: int = 1024, sets: dict | None = None,
                exploration: Exploration | None = None, seed: int | None = None) -> int:
    """Rerank every request of a request-log file; write one row per request.

    The file needs only what the ranking stage knows (a request file to rerank,
    docs/data-format.md): its exposed, feedback_ and log_propensity columns, if any, are not
    read. A feature column the run was trained with (or upstream_score) that it lacks is a
    DataError naming the file and the column.

    The output Parquet holds request_id, user_id, items (the returned item ids in order),
    positions (their candidate indices), scores (each item's predicted utility; a baseline's
    own candidate score) and predicted_utility (the list's, by NAR4Rec's evaluator; NaN for a
    baseline). With `exploration` (`exploration.explore`, its draws seeded by `seed`) the
    lists are the exploring policy's, with its propensities in the format's columns
    (`reranked_table`). Returns the number of requests.
    """
    run = load_run(run_dir, sets=sets)
    data_file = Path(data_file)
    if not data_file.is_file():
        raise Nar4recError(f"{data_file}: no such file")
    loader = RequestLoader([data_file], run.space, batch_size=batch_size, labels=False)
    rng = np.random.default_rng(seed)
    table = pa.concat_tables([reranked_table(run.system, batch, exploration, rng)
                              for batch in loader])
    with atomic_file(out_file) as tmp:
        pq.write_table(table, tmp)
    return table.num_rows


@torch.no_grad()
def reranked_table(system: System, batch: RequestBatch, exploration: Exploration | None = None,
                   rng: np.random.Generator | None = None) -> pa.Table:
    """One row per request of the batch, as `rerank_file` writes them: request_id, user_id,
    items (item ids in order), positions (candidate indices), scores, predicted_utility.

    With `exploration`, the exploring policy's lists (an explored list's scores and utility
    are NaN: the model did not choose it) and, to log beside the feedback for `nar4rec ope`,
    explored, log_propensity, logging_prefix_log_propensity and logging_marginal (each
    candidate's probability at each position of the list, candidates in the request's
    order)."""
    reranked = system.rerank(batch)
    lists = reranked.lists.numpy()                                      # (B, m)
    item_scores = reranked.item_scores.numpy().astype(np.float32)
    utility = reranked.utility.numpy().astype(np.float32)
    explored = None
    if exploration is not None:
        explored = explore(lists, batch.upstream_score.numpy(), batch.cand_mask.numpy(),
                           exploration, rng if rng is not None else np.random.default_rng())
        lists = explored.lists
        item_scores = np.where(explored.explored[:, None], np.nan, item_scores)
        utility = np.where(explored.explored, np.nan, utility)
    placed = lists >= 0
    items = np.take_along_axis(np.asarray(batch.item_id), np.where(placed, lists, 0), 1)
    lengths = placed.sum(1)
    columns = {
        "request_id": pa.array(batch.request_id),
        "user_id": pa.array(batch.user_id),
        "items": _ragged(items[placed], lengths),
        "positions": _ragged(lists[placed].astype(np.int32), lengths),
        "scores": _ragged(item_scores[placed].astype(np.float32), lengths),
        "predicted_utility": pa.array(utility.astype(np.float32)),
    }
    if explored is not None:
        candidates = batch.cand_mask.sum(1).numpy()                     # (B,)
        n, m = explored.marginal.shape[1:]
        kept = ((np.arange(n)[None, :, None] < candidates[:, None, None])
                & (np.arange(m)[None, None, :] < lengths[:, None, None]))  # (B, N, m)
        rows = _ragged(explored.marginal[kept].astype(np.float32),
                       np.repeat(lengths, candidates))                  # one list a candidate
        offsets = np.concatenate([[0], np.cumsum(candidates)]).astype(np.int32)
        columns |= {
            "explored": pa.array(explored.explored),
            "log_propensity": pa.array(explored.log_propensity),
            "logging_prefix_log_propensity": _ragged(
                explored.prefix_log_propensity[placed], lengths),
            "logging_marginal": pa.ListArray.from_arrays(pa.array(offsets), rows),
        }
    return pa.table(columns)


def _ragged(flat: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def phases_of(model: str) -> tuple[str, ...]:
    """The phases a finished run of `model` has."""
    return tuple(phase.name for phase in system_class(model).phases)
