"""Whole reranking systems: train one into a run directory, load it, evaluate it, apply it.

This is what `nar4rec train`, `evaluate` and `rerank` run. A run directory holds:

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
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nar4rec import decode, metrics
from nar4rec.config import RUN_FILE, RunConfig, apply_overrides, dataset_settings
from nar4rec.data.batch import RequestBatch
from nar4rec.data.features import FeatureSpace
from nar4rec.data.loader import RequestLoader, max_lengths
from nar4rec.errors import Nar4recError
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


def split_files(data_dir: str | Path, split: str, *, required: bool = True) -> list[Path]:
    """The Parquet files of one split: DIR/SPLIT.parquet, or every .parquet in DIR/SPLIT/."""
    data_dir = Path(data_dir)
    single = data_dir / f"{split}.parquet"
    if single.is_file():
        return [single]
    shards = sorted((data_dir / split).glob("*.parquet")) if (data_dir / split).is_dir() else []
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
              resume: bool = False, overwrite: bool = False, progress: bool | None = None,
              context: DistributedContext | None = None) -> dict:
    """Train a whole system into `run_dir`, phase after phase (`System.phases`).

    Args:
        data_dir: the data (train and valid splits).
        model: a name of `registry.MODELS`.
        config: every setting; defaults to RunConfig() with the data set's settings
            (`config.dataset_settings`: batch size 1024 on Avito).
        reuse: {phase: run} phases copied, trained, from another run on the same data instead
            of trained again (NAR4Rec's evaluator for vanilla training, Table 6); the feature
            space then comes from that run.
        resume: continue an interrupted run: finished phases are kept, the one in progress
            restarts from its last checkpoint. The run's own settings are used.
        overwrite: replace an existing run directory.
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
    info = _start_run(run_dir, data_dir, system, config, train_paths, reuse, resume,
                      overwrite, context)
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


def _start_run(run_dir: Path, data_dir, system: type[System], config: RunConfig, train_paths,
               reuse: dict[str, Path], resume: bool, overwrite: bool,
               context: DistributedContext) -> dict:
    """run.json of a new run (settings, FeatureSpace, list length), or of the resumed one."""
    existing = run_dir / RUN_FILE
    if resume and existing.exists():
        info = read_run(run_dir)
        if info["model"] != system.name:
            raise Nar4recError(f"{run_dir}: resuming a '{info['model']}' run as "
                               f"'{system.name}'")
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
    info = {"model": system.name, "data": str(data_dir), "list_length": list_length,
            "max_candidates": most_candidates, "config": settings,
            "space": space.to_dict(), "phases": {}}
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
    module = system.build(phase, config_class(**checkpoint["describe"]["config"]), space)
    module.load_state_dict(checkpoint["model"])
    return module.eval()


# ---------------------------------------------------------------------------------------------
# Evaluation


class _Mean:
    """A weighted mean of per-batch means (nan batches skipped)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.weight = 0.0

    def add(self, value: float, weight: float) -> None:
        if weight > 0 and not math.isnan(value):
            self.total += value * weight
            self.weight += weight

    @property
    def value(self) -> float:
        return self.total / self.weight if self.weight else math.nan


@torch.no_grad()
def evaluate_run(run_dir: str | Path, data_dir: str | Path, *, split: str = "test",
                 batch_size: int = 1024, sets: dict | None = None,
                 per_request: bool = False) -> dict:
    """Every metric of the run on one split.

    Item-wise prediction (the probability of the first behaviour, e.g. click, of each item of
    the logged lists, in their logged context: for NAR4Rec the evaluator's): `auc`, `logloss`,
    `ndcg` (the mean over requests with a click) and `ndcg_all_requests` (over every request,
    those without a click at 0) when requests have n = m (the paper's Avito protocol).
    Exposure prediction: the model's candidate scores rank candidates for `recall@6` and
    `recall@10`, and its exposure probability (NAR4Rec: a candidate's row sum of the
    probability matrix, clipped to 1) gives `logloss`, when n > m (the Kuaishou protocol;
    models without an exposure probability have no logloss there). On simulated data, the
    true expected `utility` of the returned lists, `logging_utility`, and on the test split
    `oracle_utility` and `captured_lift`;
    `variants` holds the same for the logging policy, the oracle and, for NAR4Rec, the
    generator's other decodings and the evaluator's item-wise top m; `behaviour_means` each
    behaviour's expected count per request.

    Args:
        per_request: also return `per_request`: {variant: (R, K) expected behaviour counts of
            each request} (numpy, for confidence intervals; not JSON).
    """
    run = load_run(run_dir, sets=sets)
    system = run.system
    paths = split_files(data_dir, split)
    world = _world_of(data_dir)
    oracle = _oracle_lists(data_dir) if world is not None and split == "test" else None
    most_candidates, _ = max_lengths(paths)
    exposure_protocol = most_candidates > run.info["list_length"]
    model = run.info["model"]
    method = system.lists_name or model                  # the name of the lists it returns
    item_scores, item_labels = [], []
    means = {name: _Mean() for name in ("ndcg", "ndcg_all_requests", "recall@6", "recall@10",
                                        "exposure_logloss")}
    behaviour_counts: dict[str, list[np.ndarray]] = {}
    has_exposure = False
    requests = 0
    for batch in RequestLoader(paths, run.space, batch_size=batch_size):
        requests += len(batch)
        logged_mask = batch.exposed_mask
        click = system.logged_click(batch)                                 # (B, M)
        labels = batch.feedback[..., 0]
        item_scores.append(click[logged_mask].numpy())
        item_labels.append(labels[logged_mask].numpy())
        clicked = ((labels > 0) & logged_mask).any(1)                      # (B,)
        means["ndcg"].add(metrics.ndcg(click, labels, logged_mask), float(clicked.sum()))
        means["ndcg_all_requests"].add(metrics.ndcg_all_requests(click, labels, logged_mask),
                                       float(logged_mask.any(1).sum()))
        ranking, variants = system.evaluate(batch, variants=world is not None)
        if exposure_protocol:
            counted = float(logged_mask.any(1).sum())
            if ranking.exposure is not None:
                has_exposure = True
                means["exposure_logloss"].add(metrics.exposure_logloss(
                    ranking.exposure, batch.exposed, logged_mask, batch.cand_mask),
                    float(batch.cand_mask.sum()))
            for k in (6, 10):
                means[f"recall@{k}"].add(metrics.recall_at_k(
                    ranking.scores, batch.exposed, logged_mask, batch.cand_mask, k), counted)
        if world is None:
            continue
        lists = {method: ranking.lists, **variants,
                 "logging": batch.exposed.masked_fill(~logged_mask, decode.NO_ITEM)}
        if oracle is not None:
            lists["oracle"] = _join_oracle(oracle, batch)
        for name, chosen in lists.items():
            behaviour_counts.setdefault(name, []).append(
                metrics.behaviour_means(world, batch, chosen))             # (B, K)
    if requests == 0:
        raise Nar4recError(f"{paths[0]}: no requests in the '{split}' split")
    result_metrics: dict[str, float] = {}
    if exposure_protocol:
        result_metrics["recall@6"] = means["recall@6"].value
        result_metrics["recall@10"] = means["recall@10"].value
        if has_exposure:
            result_metrics["logloss"] = means["exposure_logloss"].value
    else:
        scores, labels = np.concatenate(item_scores), np.concatenate(item_labels)
        result_metrics["auc"] = metrics.auc(scores, labels)
        result_metrics["logloss"] = metrics.logloss(scores, labels)
        result_metrics["ndcg"] = means["ndcg"].value
        result_metrics["ndcg_all_requests"] = means["ndcg_all_requests"].value
    report = {"model": model, "run": str(run_dir), "data": str(data_dir),
              "split": split, "requests": requests,
              "protocol": "exposure (n > m)" if exposure_protocol else "item-wise (n = m)",
              "metrics": result_metrics}
    if world is not None:
        counts = {name: np.concatenate(parts) for name, parts in behaviour_counts.items()}
        utility = {name: float((c @ world.weights).mean()) for name, c in counts.items()}
        oracle_utility = utility.get("oracle")
        report["utility_weights"] = dict(zip(world.config.behaviours,
                                             np.asarray(world.weights).tolist(), strict=True))
        result_metrics["utility"] = utility[method]
        result_metrics["logging_utility"] = utility["logging"]
        if oracle_utility is not None:
            result_metrics["oracle_utility"] = oracle_utility
            result_metrics["captured_lift"] = metrics.captured_lift(
                utility[method], utility["logging"], oracle_utility)
        report["variants"] = {
            name: {"utility": utility[name],
                   **({"captured_lift": metrics.captured_lift(utility[name], utility["logging"],
                                                              oracle_utility)}
                      if oracle_utility is not None else {})}
            for name in counts}
        report["behaviour_means"] = {
            name: dict(zip(world.config.behaviours, c.mean(axis=0).tolist(), strict=True))
            for name, c in counts.items()}
        if per_request:
            report["per_request"] = counts
    return report


def _world_of(data_dir: str | Path):
    from nar4rec.sim.world import TRUTH_DIR, WORLD_FILE, World
    if (Path(data_dir) / TRUTH_DIR / WORLD_FILE).exists():
        return World.load(data_dir)
    return None


def _oracle_lists(data_dir: str | Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(request ids sorted, their oracle lists (R, m)) from truth/oracle_test.parquet."""
    from nar4rec.sim.simulate import ORACLE_FILE
    from nar4rec.sim.world import TRUTH_DIR
    path = Path(data_dir) / TRUTH_DIR / ORACLE_FILE
    if not path.exists():
        return None
    table = pq.read_table(path, columns=["request_id", "oracle_list"])
    ids = table.column("request_id").to_numpy()
    lists = np.stack(table.column("oracle_list").to_numpy(zero_copy_only=False)) \
        if table.num_rows else np.zeros((0, 0), dtype=np.int64)
    order = np.argsort(ids)
    return ids[order], lists[order].astype(np.int64)


def _join_oracle(oracle: tuple[np.ndarray, np.ndarray], batch: RequestBatch) -> np.ndarray:
    ids, lists = oracle
    wanted = np.asarray(batch.request_id)
    where = np.searchsorted(ids, wanted).clip(0, max(len(ids) - 1, 0))
    if len(ids) == 0 or (ids[where] != wanted).any():
        raise Nar4recError("the oracle file does not cover every test request: was the test "
                           "split changed after `nar4rec simulate`?")
    return lists[where]


# ---------------------------------------------------------------------------------------------
# Applying a run to a file


@torch.no_grad()
def rerank_file(run_dir: str | Path, data_file: str | Path, out_file: str | Path, *,
                batch_size: int = 1024, sets: dict | None = None) -> int:
    """Rerank every request of a request-log file; write one row per request.

    The output Parquet holds request_id, user_id, items (the returned item ids in order),
    positions (their candidate indices), scores (each item's predicted utility; a baseline's
    own candidate score) and predicted_utility (the list's, by NAR4Rec's evaluator; NaN for a
    baseline). Returns the number of requests.
    """
    run = load_run(run_dir, sets=sets)
    data_file = Path(data_file)
    if not data_file.is_file():
        raise Nar4recError(f"{data_file}: no such file")
    tables = []
    for batch in RequestLoader([data_file], run.space, batch_size=batch_size):
        reranked = run.system.rerank(batch)
        lists, item_scores, utility = reranked.lists, reranked.item_scores, reranked.utility
        lists = lists.numpy()                                           # (B, m)
        placed = lists >= 0
        items = np.take_along_axis(np.asarray(batch.item_id), np.where(placed, lists, 0), 1)
        lengths = placed.sum(1)
        tables.append(pa.table({
            "request_id": pa.array(batch.request_id),
            "user_id": pa.array(batch.user_id),
            "items": _ragged(items[placed], lengths),
            "positions": _ragged(lists[placed].astype(np.int32), lengths),
            "scores": _ragged(item_scores.numpy()[placed].astype(np.float32), lengths),
            "predicted_utility": pa.array(utility.numpy().astype(np.float32)),
        }))
    table = pa.concat_tables(tables)
    with atomic_file(out_file) as tmp:
        pq.write_table(table, tmp)
    return table.num_rows


def _ragged(flat: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def phases_of(model: str) -> tuple[str, ...]:
    """The phases a finished run of `model` has."""
    return tuple(phase.name for phase in system_class(model).phases)
