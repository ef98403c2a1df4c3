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
from nar4rec.models.base import initial_order
from nar4rec.runs import load_run, split_files

LOGGED = "logged"            # the reference rows: the logged lists, in their order,
UPSTREAM = "upstream"        # and the top m candidates by the ranking stage's score
Z95 = 1.959964


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

    Beside the model, the same metrics for two references that need no model
    (`references`): the logged lists in their order (`logged`) and, where the data has an
    `upstream_score`, the ranking stage's order (`upstream`); and `verdicts`, whether the
    model beats each of them on the figure that can tell (true utility on simulated data,
    otherwise click recall or NDCG), with a paired 95 % interval over requests. Both
    protocols also report `ndcg` of the logged items by the model's click probability (the
    one ordering the three can be compared on), `recall@m` and `click_recall@m` at the run's
    list length m (n > m: the share of a request's clicked items among the top m).

    Args:
        per_request: also return `per_request`: {variant: (R, K) expected behaviour counts of
            each request}, and `per_request_metrics`: {metric: {scorer: (R,) values, nan
            where a request does not count}} for the model and the references (numpy, for
            confidence intervals; not JSON).
    """
    run = load_run(run_dir, sets=sets)
    system = run.system
    paths = split_files(data_dir, split)
    world = world_of(data_dir)
    oracle = _oracle_lists(data_dir) if world is not None and split == "test" else None
    most_candidates, _ = max_lengths(paths)
    list_length = run.info["list_length"]
    exposure_protocol = most_candidates > list_length
    model = run.info["model"]
    method = system.lists_name or model                  # the name of the lists it returns
    scorers = ("model", LOGGED) + ((UPSTREAM,) if run.space.spec.has_upstream_score else ())
    recall_ks = sorted({6, 10, list_length})
    item_scores = {name: [] for name in scorers}
    item_labels, has_logged = [], []
    per_request_values: dict[str, dict[str, list[np.ndarray]]] = {}
    exposure_loss = _Mean()
    behaviour_counts: dict[str, list[np.ndarray]] = {}
    has_exposure = False
    requests = 0
    for batch in RequestLoader(paths, run.space, batch_size=batch_size):
        requests += len(batch)
        logged_mask = batch.exposed_mask
        labels = batch.feedback[..., 0]
        ranking, variants = system.evaluate(batch, variants=world is not None)
        logged_scores = _logged_scores(batch)
        by_item = {"model": system.logged_click(batch),                     # (B, M) each
                   LOGGED: logged_scores.gather(1, batch.exposed.clamp(min=0)),
                   UPSTREAM: batch.upstream_score.gather(1, batch.exposed.clamp(min=0))}
        by_candidate = {"model": ranking.scores, LOGGED: logged_scores,     # (B, N) each
                        UPSTREAM: batch.upstream_score}
        item_labels.append(labels[logged_mask].numpy())
        has_logged.append(logged_mask.any(1).numpy())
        clicked_items = logged_mask & (labels > 0)                          # (B, M)
        for name in scorers:
            item_scores[name].append(by_item[name][logged_mask].numpy())
            values = per_request_values.setdefault(name, {})
            values.setdefault("ndcg", []).append(metrics.request_ndcg(by_item[name], labels,
                                                                      logged_mask))
            if exposure_protocol:
                for k in recall_ks:
                    values.setdefault(f"recall@{k}", []).append(metrics.request_recall_at_k(
                        by_candidate[name], batch.exposed, logged_mask, batch.cand_mask, k))
                values.setdefault(f"click_recall@{list_length}", []).append(
                    metrics.request_recall_at_k(by_candidate[name], batch.exposed,
                                                clicked_items, batch.cand_mask, list_length))
        if exposure_protocol and ranking.exposure is not None:
            has_exposure = True
            exposure_loss.add(metrics.exposure_logloss(
                ranking.exposure, batch.exposed, logged_mask, batch.cand_mask),
                float(batch.cand_mask.sum()))
        if world is None:
            continue
        lists = {method: ranking.lists, **variants,
                 "logging": batch.exposed.masked_fill(~logged_mask, decode.NO_ITEM)}
        if UPSTREAM in scorers:
            lists[UPSTREAM] = _upstream_lists(batch, list_length)
        if oracle is not None:
            lists["oracle"] = _join_oracle(oracle, batch)
        for name, chosen in lists.items():
            behaviour_counts.setdefault(name, []).append(
                metrics.behaviour_means(world, batch, chosen))             # (B, K)
    if requests == 0:
        raise Nar4recError(f"{paths[0]}: no requests in the '{split}' split")
    labels = np.concatenate(item_labels)
    per_request_metrics = {
        metric: {name: np.concatenate(per_request_values[name][metric]) for name in scorers}
        for metric in per_request_values["model"]}
    by_scorer = {name: {} for name in scorers}
    for metric, values in per_request_metrics.items():
        for name, per_request_value in values.items():
            counted = ~np.isnan(per_request_value)
            by_scorer[name][metric] = (float(per_request_value[counted].mean())
                                       if counted.any() else math.nan)
    if not exposure_protocol:
        for name in scorers:
            by_scorer[name]["auc"] = metrics.auc(np.concatenate(item_scores[name]), labels)
        by_scorer["model"]["logloss"] = metrics.logloss(np.concatenate(item_scores["model"]),
                                                         labels)
        shown = np.concatenate(has_logged)                                # requests with a
        ndcg = per_request_metrics["ndcg"]["model"][shown]                # logged item
        by_scorer["model"]["ndcg_all_requests"] = (float(np.nan_to_num(ndcg).mean())
                                                   if shown.any() else math.nan)
    elif has_exposure:
        by_scorer["model"]["logloss"] = exposure_loss.value
    result_metrics = by_scorer["model"]
    report = {"model": model, "run": str(run_dir), "data": str(data_dir),
              "split": split, "requests": requests, "list_length": list_length,
              "protocol": "exposure (n > m)" if exposure_protocol else "item-wise (n = m)",
              "metrics": result_metrics,
              "references": {name: by_scorer[name] for name in scorers if name != "model"}}
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
        per_request_metrics["utility"] = {"model": counts[method] @ world.weights,
                                          LOGGED: counts["logging"] @ world.weights}
        for name in scorers[2:]:                       # upstream, where the data has a score
            per_request_metrics["utility"][name] = counts[name] @ world.weights
            report["references"][name]["utility"] = utility[name]
        report["references"][LOGGED]["utility"] = utility["logging"]
        if oracle_utility is not None:
            for values in report["references"].values():
                values["captured_lift"] = metrics.captured_lift(
                    values["utility"], utility["logging"], oracle_utility)
        if per_request:
            report["per_request"] = counts
    report["verdicts"] = verdicts(per_request_metrics, model=model, list_length=list_length,
                                  simulated=world is not None, exposure=exposure_protocol)
    if per_request:
        report["per_request_metrics"] = per_request_metrics
    return report


def verdicts(per_request_metrics: dict[str, dict[str, np.ndarray]], *, model: str,
             list_length: int, simulated: bool, exposure: bool) -> list[dict]:
    """Whether the model beats each reference, on the figure that can tell, in words.

    On simulated data the true utility per request; otherwise, against the logged lists the
    NDCG of the shown items' order (only shown items have feedback, so the logged lists hold
    every click by definition and no offline figure can say more), and against the upstream
    order the click recall at the list length (n > m) or the NDCG (n = m). The difference is
    paired over the requests both count (for a model evaluated over several seeds, its arrays
    concatenated with the reference's repeated), with a 95 % normal interval: "better" or
    "worse" when the interval excludes 0, "level" when it does not.

    Args:
        per_request_metrics: {metric: {"model" | LOGGED | UPSTREAM: (R,) per-request values,
            nan where a request does not count}}, as `evaluate_run(per_request=True)` returns.
    Returns:
        One dict per reference present: reference, metric, model and reference values, the
        difference, its ci95, requests, verdict and a sentence.
    """
    found = []
    for reference in (LOGGED, UPSTREAM):
        if simulated:
            metric = "utility"
        elif exposure and reference == UPSTREAM:
            metric = f"click_recall@{list_length}"
        else:
            metric = "ndcg"
        values = per_request_metrics.get(metric, {})
        if reference not in values:
            continue
        ours, theirs = values["model"], values[reference]
        counted = ~(np.isnan(ours) | np.isnan(theirs))
        if counted.sum() < 2:
            continue
        difference = ours[counted] - theirs[counted]
        mean = float(difference.mean())
        error = float(difference.std(ddof=1) / math.sqrt(counted.sum()))
        low, high = mean - Z95 * error, mean + Z95 * error
        verdict = "better" if low > 0 else "worse" if high < 0 else "level"
        found.append({"reference": reference, "metric": metric,
                      "model_value": float(ours[counted].mean()),
                      "reference_value": float(theirs[counted].mean()),
                      "difference": mean, "ci95": [low, high],
                      "requests": int(counted.sum()), "verdict": verdict})
        found[-1]["sentence"] = _sentence(model, list_length, found[-1])
    return found


METRIC_WORDS = {"utility": "true utility per request (the simulator's)",
                "ndcg": "NDCG of the order of the shown items (requests with a click)"}


def _sentence(model: str, list_length: int, verdict: dict) -> str:
    metric = verdict["metric"]
    words = METRIC_WORDS.get(metric) or (
        f"click recall@{list_length} (share of the clicked items among the top {list_length})")
    if verdict["reference"] == LOGGED:
        reference = "the logged lists"
    else:
        reference = (f"the upstream top {list_length}" if metric == "utility"
                     else "the upstream order")
    low, high = verdict["ci95"]
    figures = (f"{words} {verdict['model_value']:.4f} against {verdict['reference_value']:.4f} "
               f"(difference {verdict['difference']:+.4f}, 95 % interval [{low:+.4f}, "
               f"{high:+.4f}] over {verdict['requests']:,} requests)")
    if verdict["verdict"] == "better":
        return f"{model} beats {reference}: {figures}."
    if verdict["verdict"] == "worse":
        instead = ("keeping the logged lists" if verdict["reference"] == LOGGED
                   else f"showing {reference}")
        return (f"{model} is WORSE than {reference}: {figures}; on this figure, {instead} "
                "would do better than this model.")
    return f"{model} cannot be told apart from {reference}: {figures}."


def _logged_scores(batch: RequestBatch) -> torch.Tensor:
    """(B, N) a score for each candidate that ranks a request's logged list first, in its
    order (M - position), and every other candidate after it (-1)."""
    positions = batch.exposed.shape[1]
    rank_score = (positions - torch.arange(positions, dtype=torch.float32)).expand_as(
        batch.exposed).masked_fill(~batch.exposed_mask, -1.0)               # (B, M)
    scores = torch.full(batch.cand_mask.shape, -1.0)
    return scores.scatter_reduce(1, batch.exposed.clamp(min=0), rank_score, reduce="amax")


def _upstream_lists(batch: RequestBatch, list_length: int) -> torch.Tensor:
    """(B, m) the top m candidates by upstream score, NO_ITEM past a request's candidates."""
    lists = initial_order(batch)[:, :list_length]
    real = batch.cand_mask.gather(1, lists)
    return lists.masked_fill(~real, decode.NO_ITEM)


def world_of(data_dir: str | Path):
    """The simulator's ground truth of a data directory (truth/world.npz), None for logs
    without one."""
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
