"""The evaluation protocols: every metric of a trained run on one split of a data directory.

`evaluate_run` is what `nar4rec evaluate` and `compare` run: the paper's offline metrics (the
item-wise protocol for n = m, the exposure protocol for n > m) and, on simulated data, the true
utility of the run's lists and of its variants against the logging policy and the oracle. It
reads a run through `runs.load_run` and the run's `System` only.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from nar4rec import decode, metrics
from nar4rec.data.batch import RequestBatch
from nar4rec.data.loader import RequestLoader, max_lengths
from nar4rec.errors import Nar4recError
from nar4rec.runs import load_run, split_files


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
