"""Whole reranking systems: train one into a run directory, load it, evaluate it, apply it.

This is what `nar4rec train`, `evaluate` and `rerank` run. A run directory holds:

    run.json            the model name, every setting (RunConfig), the FeatureSpace, the data
                        it was trained on and each finished phase's result
    evaluator/          the evaluator's training: best.pt, last.pt, metrics.jsonl, steps.jsonl
    generator/          the generator's (model "nar4rec" only)
    model/              a baseline's (models "dnn", "dcn", "prm", "edge_rerank", "seq2slate",
                        "pier": one model, no separate evaluator)

A data directory holds `train`, `valid` and `test` splits, each a `SPLIT.parquet` file or a
`SPLIT/` folder of Parquet shards (what `nar4rec simulate` and `nar4rec prepare` write).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nar4rec import decode, metrics
from nar4rec.config import apply_overrides, dataset_settings
from nar4rec.data.loader import FeatureSpace, RequestBatch, RequestLoader, max_lengths
from nar4rec.errors import Nar4recError
from nar4rec.io import atomic_file
from nar4rec.models import BASELINES, baseline
from nar4rec.models.base import ListModel, Ranking
from nar4rec.models.evaluator import Evaluator, EvaluatorConfig, evaluator_loss
from nar4rec.models.nar4rec import (
    NAR4Rec,
    NAR4RecConfig,
    generator_loss,
    greedy_judged_utility,
    resolve_tau,
)
from nar4rec.reranker import Reranker, RerankerConfig, request_keys, request_uniforms
from nar4rec.train import (
    BEST,
    METRICS,
    STEPS,
    DistributedContext,
    TrainConfig,
    distributed_context,
    load_checkpoint,
    train,
)

if TYPE_CHECKING:
    from nar4rec.models.dcn import DCNConfig
    from nar4rec.models.dnn import DNNConfig
    from nar4rec.models.edge_rerank import EdgeRerankConfig
    from nar4rec.models.pier import PIERConfig
    from nar4rec.models.prm import PRMConfig
    from nar4rec.models.seq2slate import Seq2SlateConfig

MODELS = ("nar4rec", "evaluator", *BASELINES)
RUN_FILE = "run.json"
PHASES = ("evaluator", "generator")
BASELINE_PHASE = "model"
TAU_REQUESTS = 200_000          # logged lists read to set tau from the training utilities


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


def _baseline_config(name: str):
    return field(default_factory=lambda: baseline(name)[1]())


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

    generator: NAR4RecConfig = field(default_factory=NAR4RecConfig)
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluator_train: TrainConfig = field(default_factory=TrainConfig)
    reranker: RerankerConfig = field(default_factory=RerankerConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    dnn: DNNConfig = _baseline_config("dnn")
    dcn: DCNConfig = _baseline_config("dcn")
    prm: PRMConfig = _baseline_config("prm")
    edge_rerank: EdgeRerankConfig = _baseline_config("edge_rerank")
    seq2slate: Seq2SlateConfig = _baseline_config("seq2slate")
    pier: PIERConfig = _baseline_config("pier")

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        return apply_overrides(cls(), data, source=RUN_FILE)


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
              config: RunConfig | None = None, evaluator_from: str | Path | None = None,
              resume: bool = False, overwrite: bool = False, progress: bool | None = None,
              context: DistributedContext | None = None) -> dict:
    """Train a whole system into `run_dir`: the evaluator, then (model "nar4rec") the generator.

    Args:
        data_dir: the data (train and valid splits).
        model: "nar4rec" (evaluator and generator) or "evaluator" (the evaluator alone).
        config: every setting; defaults to RunConfig() with the data set's settings
            (`config.dataset_settings`: batch size 1024 on Avito).
        evaluator_from: a run whose trained evaluator is copied instead of training one.
        resume: continue an interrupted run: finished phases are kept, the one in progress
            restarts from its last checkpoint. The run's own settings are used.
        overwrite: replace an existing run directory.
    Returns:
        run.json's content.
    """
    if model not in MODELS:
        raise Nar4recError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    context = context or distributed_context()
    run_dir = Path(run_dir)
    train_paths = split_files(data_dir, "train")
    valid_paths = split_files(data_dir, "valid", required=False)
    if config is None:
        config = apply_overrides(RunConfig(), dataset_settings(data_dir),
                                 source="the data set's settings")
    info = _start_run(run_dir, data_dir, model, config, train_paths,
                      evaluator_from, resume, overwrite, context)
    config = RunConfig.from_dict(info["config"])
    space = FeatureSpace.from_dict(info["space"])
    weights = space.utility_weights

    if model in BASELINES:
        if BASELINE_PHASE not in info["phases"]:
            model_class, _ = baseline(model)
            torch.manual_seed(config.train.seed)
            network = model_class(getattr(config, model), space)
            result = _train_phase(network, ListModel.step, BASELINE_PHASE, model,
                                  getattr(config, model), config.train, space, train_paths,
                                  valid_paths, run_dir, resume, progress, context)
            info = _finish_phase(run_dir, info, BASELINE_PHASE, result, context)
        return info

    if "evaluator" not in info["phases"]:
        if evaluator_from is not None:
            _copy_evaluator(Path(evaluator_from), run_dir, space, context)
            result = {"copied_from": str(evaluator_from)}
        else:
            torch.manual_seed(config.evaluator_train.seed)
            evaluator = Evaluator(config.evaluator, space)
            result = _train_phase(evaluator, evaluator_step, "evaluator", "evaluator",
                                  config.evaluator, config.evaluator_train, space,
                                  train_paths, valid_paths, run_dir, resume, progress, context)
        info = _finish_phase(run_dir, info, "evaluator", result, context)

    if model == "nar4rec" and "generator" not in info["phases"]:
        generator_config = config.generator
        if generator_config.objective == "unlikelihood" and generator_config.tau is None:
            loader = RequestLoader(train_paths, space, batch_size=4096)
            generator_config = resolve_tau(generator_config, loader, max_requests=TAU_REQUESTS)
            info["config"]["generator"] = dataclasses.asdict(generator_config)
            _write_run(run_dir, info, context)
        judge = _load_model(run_dir / "evaluator" / BEST, Evaluator, EvaluatorConfig,
                            space).to(context.device) if generator_config.evaluator_lists else None
        torch.manual_seed(config.train.seed)
        generator = NAR4Rec(generator_config, space)
        result = _train_phase(generator, generator_step(generator_config, weights, judge),
                              "generator", "nar4rec", generator_config, config.train, space,
                              train_paths, valid_paths, run_dir, resume, progress, context)
        info = _finish_phase(run_dir, info, "generator", result, context)
    return info


def evaluator_step(network: torch.nn.Module, batch: RequestBatch
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """The evaluator's LossFn for the training loop: per-behaviour BCE on the logged lists."""
    loss = evaluator_loss(network(batch), batch.feedback, batch.exposed_mask)
    return loss, {"loss": float(loss.detach())}


def generator_step(config: NAR4RecConfig, weights: torch.Tensor,
                   evaluator: Evaluator | None = None):
    """The generator's LossFn for the training loop, with its objective settings (tau set)
    and, for `evaluator_lists`, the trained evaluator (frozen).

    With the evaluator, the validation loss is minus the evaluator's mean utility for the
    generator's greedy lists: what that training optimises (its loss on sampled lists is
    relative to the greedy list and does not compare epochs)."""
    if evaluator is not None:
        evaluator.requires_grad_(False)

    def step(network: torch.nn.Module, batch: RequestBatch
             ) -> tuple[torch.Tensor, dict[str, float]]:
        out = network(batch)
        if evaluator is not None and not network.training:
            judged = greedy_judged_utility(out, batch, evaluator, weights)
            return -judged, {"greedy_judged_utility": float(judged)}
        terms = generator_loss(out, batch, config, weights, evaluator)
        return terms.total, terms.as_dict()
    return step


def check_models(models) -> None:
    """`--models` of compare and bench: known models, the evaluator alone excepted."""
    unknown = [m for m in models if m not in MODELS or m == "evaluator"]
    if unknown or not models:
        choices = ", ".join(m for m in MODELS if m != "evaluator")
        raise Nar4recError(f"--models: unknown model {unknown[0] if unknown else '(none)'!r}; "
                           f"choose from {choices}")


def _start_run(run_dir: Path, data_dir, model: str, config: RunConfig, train_paths,
               evaluator_from, resume: bool, overwrite: bool,
               context: DistributedContext) -> dict:
    """run.json of a new run (settings, FeatureSpace, list length), or of the resumed one."""
    existing = run_dir / RUN_FILE
    if resume and existing.exists():
        info = read_run(run_dir)
        if info["model"] != model:
            raise Nar4recError(f"{run_dir}: resuming a '{info['model']}' run as '{model}'")
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
    if evaluator_from is not None:
        space = FeatureSpace.from_dict(read_run(evaluator_from)["space"])
    else:
        space = FeatureSpace.fit(train_paths, min_count=config.features.min_count,
                                 max_vocabulary=config.features.max_vocabulary)
    most_candidates, list_length = max_lengths(train_paths)
    if list_length < 1:
        raise Nar4recError(f"{train_paths[0]}: no request shows any item")
    sections = _sections_of(model)
    config = dataclasses.replace(config, **{
        name: dataclasses.replace(getattr(config, name), list_length=list_length)
        for name in ("generator", "evaluator", model) if name in sections})
    settings = {name: value for name, value in dataclasses.asdict(config).items()
                if name in sections}
    info = {"model": model, "data": str(data_dir), "list_length": list_length,
            "max_candidates": most_candidates, "config": settings,
            "space": space.to_dict(), "phases": {}}
    _write_run(run_dir, info, context)
    return info


def _sections_of(model: str) -> tuple[str, ...]:
    """The RunConfig tables a model's run uses (run.json records only those)."""
    if model in BASELINES:
        return (model, "train", "features")
    return ("generator", "evaluator", "train", "evaluator_train", "reranker", "features")


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


def _copy_evaluator(source: Path, run_dir: Path, space: FeatureSpace,
                    context: DistributedContext) -> None:
    info = read_run(source)
    if "evaluator" not in info["phases"]:
        raise Nar4recError(f"{source}: its evaluator has not finished training")
    if context.is_main:
        target = run_dir / "evaluator"
        target.mkdir(parents=True, exist_ok=True)
        for name in (BEST, METRICS, STEPS):
            if (source / "evaluator" / name).exists():
                with atomic_file(target / name) as tmp:
                    shutil.copyfile(source / "evaluator" / name, tmp)
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
    """A trained run. `reranker` is NAR4Rec's Reranker (None for a baseline), `model` the
    baseline (None for NAR4Rec and evaluator runs); `system` answers either way."""

    info: dict
    space: FeatureSpace
    config: RunConfig
    reranker: Reranker | None = None
    model: ListModel | None = None

    @property
    def system(self) -> RerankerSystem | BaselineSystem:
        return RerankerSystem(self.reranker) if self.reranker is not None \
            else BaselineSystem(self.model)


def load_run(run_dir: str | Path, *, sets: dict | None = None) -> LoadedRun:
    """A trained run's system (best checkpoints); `sets` changes NAR4Rec's `reranker`
    settings."""
    run_dir = Path(run_dir)
    info = read_run(run_dir)
    config = RunConfig.from_dict(info["config"])
    if sets:
        unknown = [k for k in sets if not k.startswith("reranker.")]
        if unknown:
            raise Nar4recError(f"--set {unknown[0]}: only reranker.* settings can change after "
                               "training")
        if info["model"] in BASELINES:
            raise Nar4recError(f"--set {next(iter(sets))}: a {info['model']} run has no "
                               "reranker settings")
        config = apply_overrides(config, sets, source="--set")
    missing = [p for p in phases_of(info["model"]) if p not in info["phases"]]
    if missing:
        raise Nar4recError(f"{run_dir}: the {missing[0]} has not finished training (run "
                           "`nar4rec train ... --resume`)")
    space = FeatureSpace.from_dict(info["space"])
    if info["model"] in BASELINES:
        model_class, config_class = baseline(info["model"])
        model = _load_model(run_dir / BASELINE_PHASE / BEST, model_class, config_class, space)
        return LoadedRun(info=info, space=space, config=config, model=model)
    evaluator = _load_model(run_dir / "evaluator" / BEST, Evaluator, EvaluatorConfig, space)
    generator = _load_model(run_dir / "generator" / BEST, NAR4Rec, NAR4RecConfig, space) \
        if info["model"] == "nar4rec" else None
    reranker = Reranker(generator, evaluator, space.utility_weights, config.reranker,
                        list_length=info["list_length"])
    return LoadedRun(info=info, space=space, config=config, reranker=reranker)


def phases_of(model: str) -> tuple[str, ...]:
    """The training phases a finished run of `model` has."""
    if model in BASELINES:
        return (BASELINE_PHASE,)
    return PHASES if model == "nar4rec" else ("evaluator",)


def _load_model(path: Path, cls, config_cls, space: FeatureSpace) -> torch.nn.Module:
    checkpoint = load_checkpoint(path)
    model = cls(config_cls(**checkpoint["describe"]["config"]), space)
    model.load_state_dict(checkpoint["model"])
    return model.eval()


class BaselineSystem:
    """A baseline behind the interface evaluation uses (`base.ListModel` already is one)."""

    def __init__(self, model: ListModel):
        self.model = model.eval()

    def rerank(self, batch: RequestBatch) -> Ranking:
        return self.model.rerank(batch)

    def evaluate(self, batch: RequestBatch, variants: bool = True
                 ) -> tuple[Ranking, dict[str, torch.Tensor]]:
        """The returned lists and, for NAR4Rec, its other decodings (none here)."""
        return self.model.rerank(batch), {}

    def logged_click(self, batch: RequestBatch) -> torch.Tensor:
        return self.model.logged_click(batch)


class RerankerSystem:
    """NAR4Rec's Reranker behind the same interface as a baseline.

    Scores for Recall@k and the exposure probability are a candidate's row sum of the
    probability matrix, clipped to 1 (the evaluator's item-wise score without a generator);
    logged clicks come from the evaluator's first behaviour on the logged list. `evaluate`
    also decodes the generator's matrix with every decoder of the paper's Table 7 and ranks by
    the evaluator's item-wise score, so the variants are measured on the same forward pass.
    """

    VARIANTS = ("generator_greedy", "generator_contrastive", "generator_beam", "generator_top_k",
                "generator_dpp", "evaluator_top_m")

    def __init__(self, reranker: Reranker):
        self.reranker = reranker

    def rerank(self, batch: RequestBatch) -> Ranking:
        return self.evaluate(batch, variants=False)[0]

    def evaluate(self, batch: RequestBatch, variants: bool = True
                 ) -> tuple[Ranking, dict[str, torch.Tensor]]:
        reranker = self.reranker
        if reranker.generator is None:
            ranking = Ranking(reranker.evaluator_top_m(batch).lists,
                              reranker.item_wise_scores(batch))
            return ranking, {}
        out = reranker.generator(batch)
        exposure = out.probs.sum(-1).clamp(0.0, 1.0)                       # (B, n)
        ranking = Ranking(reranker.choose(batch, out).lists,
                          exposure.masked_fill(~batch.cand_mask, -torch.inf), exposure)
        if not variants:
            return ranking, {}
        config = reranker.config
        keys = request_keys(batch.user_cat, batch.cand_cat, batch.cand_mask)
        uniform = request_uniforms(keys, config.seed, 1, out.probs.shape[2])[:, 0]
        return ranking, {
            "generator_greedy": decode.greedy(out.probs, out.cand_mask),
            "generator_contrastive": decode.contrastive(
                out.probs, out.item_repr, out.cand_mask, alpha=config.contrastive_alpha,
                k=config.candidate_set, similarity=config.similarity),
            "generator_beam": decode.beam_search(out.probs, out.cand_mask),
            "generator_top_k": decode.top_k_sampling(
                out.probs, out.cand_mask, k=config.sample_k, temperature=config.temperature,
                uniform=uniform),
            "generator_dpp": decode.dpp(out.probs, out.item_repr, out.cand_mask),
            "evaluator_top_m": reranker.evaluator_top_m(batch).lists,
        }

    def logged_click(self, batch: RequestBatch) -> torch.Tensor:
        return torch.sigmoid(self.reranker.evaluator(batch)[..., 0])       # (B, M)


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
    method = "evaluator_top_m" if model == "evaluator" else model   # the lists `rerank` returns
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
        if run.reranker is not None:
            reranked = run.reranker.rerank(batch)
            lists, item_scores, utility = reranked.lists, reranked.item_scores, reranked.utility
        else:                        # a baseline: its own score of each placed candidate
            ranking = run.model.rerank(batch)
            lists = ranking.lists
            item_scores = ranking.scores.gather(1, lists.clamp_min(0))
            utility = torch.full((len(batch),), torch.nan)
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
