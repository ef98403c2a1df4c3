"""`nar4rec ope`: off-policy estimates of a run's value from logs (docs/ope.md).

A trained run's lists are the target policy; the logs' shown lists, their feedback and the
logging policy's probabilities (the `logging_*` columns and `log_propensity`, see
docs/data-format.md and `propensity.logging_probabilities`) feed the estimators of `ope.py`.
The direct method and Cascade-DR need a reward model: a run whose system predicts every
behaviour of any list (`System.predict_feedback`: NAR4Rec's evaluator, the point-wise models,
EdgeRerank), the run itself by default. On simulated data the true value of the run's lists
sits beside every estimate.

The logs are read batch by batch (never whole); PBM's examination probabilities need one more
pass when they are not given. Nothing here loops over requests.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from nar4rec import metrics, ope, propensity
from nar4rec.data.format import read_spec
from nar4rec.data.loader import RequestLoader
from nar4rec.errors import DataError, Nar4recError
from nar4rec.evaluation import Z95, world_of
from nar4rec.runs import load_run, split_files

DEFAULT_SAMPLES = 1024          # logging lists drawn per request for marginals and PI's Gamma
NEEDS = {"ips": ("list_log_prob",), "snips": ("list_log_prob",),
         "iips": ("marginal",), "pbm": ("marginal",), "rips": ("prefix_log_prob",),
         "cascade_dr": ("prefix_log_prob",), "pi": (), "dm": ()}


@torch.no_grad()
def ope_run(run_dir: str | Path, data_dir: str | Path, *, split: str = "test",
            reward_model: str | Path | None = None,
            estimators: tuple[str, ...] = ope.ESTIMATORS, max_weight: float | None = None,
            samples: int = DEFAULT_SAMPLES, batch_size: int = 1024, seed: int = 0,
            sets: dict | None = None) -> dict:
    """Every requested estimator's estimate of the run's value on one split of the logs.

    Args:
        run_dir: the run whose lists are evaluated (the target policy).
        data_dir: the logs (a data directory; `split` picks the files).
        reward_model: the run whose `predict_feedback` the direct method and Cascade-DR use
            (default: `run_dir`, when its system has one).
        estimators: names from `ope.ESTIMATORS`.
        max_weight: clip importance weights at this value (None: no clipping).
        samples: logging lists drawn per request for Monte Carlo marginals (Plackett-Luce
            loggers without an explicit `logging_marginal`) and for PI's Gamma.
        seed: the random numbers of those draws (the same in every pass).
    Returns:
        {"model", "run", "data", "split", "requests", "behaviours", "utility_weights",
         "estimates": {name: Estimate.to_dict()}, "logged": the logged lists' observed mean,
         "reward_model": its run or why there is none, "sources": where the logging
         probabilities came from, and on simulated data "truth": the true value of the run's
         lists and of the logged lists}.
    Raises:
        Nar4recError naming what the logs lack when no requested estimator can run.
    """
    run = load_run(run_dir, sets=sets)
    paths = split_files(data_dir, split)
    spec = read_spec(paths[0])
    spec.require_labels(paths[0])
    _check_logging_columns(spec, paths[0], estimators)
    reward, reward_note = _reward_model(run, run_dir, reward_model, estimators, paths)
    world = world_of(data_dir)
    m = run.info["list_length"]
    weights = np.asarray(spec.weights)
    truth = {"model": [], "logged": []}
    logged_mean = ope.Moments()
    quantities = {q for name in estimators for q in NEEDS[name]}
    sources: dict[str, str] = {}
    missing: dict[str, str] = {}
    passes = []

    def batches() -> Iterator[ope.OffPolicyBatch]:
        passes.append(True)
        first_pass = len(passes) == 1
        loaders = [RequestLoader(paths, run.space, batch_size=batch_size)]
        if reward is not None and reward is not run:
            loaders.append(RequestLoader(paths, reward.space, batch_size=batch_size))
        for index, group in enumerate(zip(*loaders, strict=True)):
            batch = group[0]
            other = group[-1]
            if not np.array_equal(np.asarray(batch.request_id), np.asarray(other.request_id)):
                raise Nar4recError("the reward model's loader read other requests")
            rng = np.random.default_rng([seed, index])
            logged = batch.exposed.masked_fill(~batch.exposed_mask, -1)
            probabilities = propensity.logging_probabilities(
                batch.logging, logged, m, log_propensity=batch.log_propensity,
                quantities=quantities, samples=samples, rng=rng)
            sources.update(probabilities.sources)
            missing.update(probabilities.missing)
            target = run.system.rerank(batch).lists                         # (B, m)
            rewards = (batch.feedback * batch.exposed_mask.unsqueeze(-1)).double().numpy()
            logged_np = propensity.fit_width(logged.numpy(), m)
            mask = logged_np >= 0
            rewards = propensity.fit_width(rewards, m, axis=1)
            part = ope.OffPolicyBatch(
                logged=logged_np, logged_mask=mask, rewards=rewards,
                mu_list=_exp(probabilities.list_log_prob),
                mu_prefix=_exp(probabilities.prefix_log_prob),
                mu_marginal=_floored(probabilities.marginal, logged_np, samples)
                if "logging_score" in probabilities.sources.get("marginal", "")
                else probabilities.marginal,
                logging_samples=_logging_samples(batch, m, samples, rng)
                if "pi" in estimators else None,
                target_lists=target.numpy(),
                q_target=None if reward is None else
                reward.system.predict_feedback(other, target).double().numpy())
            if first_pass:
                logged_mean.add(rewards.sum(1))
                if world is not None:
                    truth["model"].append(metrics.behaviour_means(world, batch, target))
                    truth["logged"].append(metrics.behaviour_means(world, batch, logged))
            yield part

    results = ope.evaluate(batches, weights, estimators, max_weight=max_weight)
    for estimate in results.values():              # say which column would have given it
        for field, quantity in (("mu_list", "list_log_prob"), ("mu_prefix", "prefix_log_prob"),
                                ("mu_marginal", "marginal")):
            if estimate.skipped and estimate.skipped.startswith(f"needs {field}") \
                    and quantity in missing:
                estimate.skipped = missing[quantity]
    if all(estimate.skipped for estimate in results.values()):
        reasons = "; ".join(f"{name}: {e.skipped}" for name, e in results.items())
        raise DataError(f"no estimator can run on these logs ({reasons})", file=str(paths[0]))
    report = {"model": run.info["model"], "run": str(run_dir), "data": str(data_dir),
              "split": split, "requests": logged_mean.count,
              "behaviours": list(spec.behaviours),
              "utility_weights": dict(zip(spec.behaviours, weights.tolist(), strict=True)),
              "estimates": {name: estimate.to_dict() for name, estimate in results.items()},
              "logged": _observed_summary(logged_mean, weights), "reward_model": reward_note,
              "sources": sources, "max_weight": max_weight, "samples": samples}
    if world is not None:
        report["truth"] = {name: _behaviour_summary(np.concatenate(parts), weights)
                           for name, parts in truth.items()}
    return report


def _check_logging_columns(spec, file: Path, estimators) -> None:
    """A log without any of the logging policy's columns can feed only the direct method."""
    if spec.has_logging or spec.has_log_propensity or tuple(estimators) == ("dm",):
        return
    raise DataError("the logs carry no logging-policy probabilities (log_propensity, "
                    "logging_score with logging_temperature, logging_marginal or "
                    "logging_prefix_log_propensity): off-policy estimates need them "
                    "(docs/ope.md); only --estimators dm works without", file=str(file),
                    field="log_propensity")


def _reward_model(run, run_dir, reward_model, estimators, paths):
    """(the reward model's LoadedRun or None, a note saying which or why none)."""
    wanted = {"dm", "cascade_dr"} & set(estimators)
    if not wanted:
        return None, "not needed"
    candidate = run if reward_model is None else load_run(reward_model)
    source = str(run_dir if reward_model is None else reward_model)
    try:
        probe = next(iter(RequestLoader(paths, candidate.space, batch_size=2)))
        candidate.system.predict_feedback(probe, probe.exposed[:, :1])
    except Nar4recError as exc:
        if reward_model is not None:
            raise Nar4recError(f"{reward_model}: cannot serve as the reward model: "
                               f"{exc}") from None
        return None, f"none: {exc}"
    return candidate, source


def _logging_samples(batch, m: int, samples: int, rng: np.random.Generator):
    """(B, S, m) lists from a Plackett-Luce logger, None without its columns."""
    logging = batch.logging
    if logging is None or logging.score is None or logging.temperature is None:
        return None
    score = logging.score.numpy().astype(np.float64)
    temperature = logging.temperature.numpy().astype(np.float64)
    if not np.isfinite(temperature).all():
        return None
    logits = np.where(np.isfinite(score) & batch.cand_mask.numpy(),
                      score / temperature[:, None], -np.inf)
    drawn = propensity.pl_sample(logits, min(m, logits.shape[1]), rng, samples=samples)
    return propensity.fit_width(drawn, m)


def _floored(marginal: np.ndarray | None, logged: np.ndarray, samples: int
             ) -> np.ndarray | None:
    """Monte Carlo marginals with each logged slot at least 0.5 / samples.

    A logged item's estimated probability at its logged position is 0 when no sampled prefix
    left it free there (a peaked logger that almost always shows it higher up); it is not 0,
    as the log shows, only below what the samples resolve. Half a sample's weight is that
    resolution (`propensity.pl_marginals`)."""
    if marginal is None:
        return None
    rows, positions = np.nonzero(logged >= 0)
    items = logged[rows, positions]
    floored = marginal.copy()
    floored[rows, items, positions] = np.maximum(floored[rows, items, positions],
                                                 0.5 / samples)
    return floored


def _exp(log_values: np.ndarray | None) -> np.ndarray | None:
    return None if log_values is None else np.exp(log_values)


def _observed_summary(moments: ope.Moments, weights: np.ndarray) -> dict:
    """The logged lists' observed mean per behaviour and utility, with its 95 % interval,
    from the running moments of each request's feedback (B, K)."""
    utility = float(weights @ moments.mean)
    error = math.sqrt(max(float(weights @ moments.covariance() @ weights), 0.0)
                      / moments.count)
    return {"value": moments.mean.tolist(), "utility": utility,
            "utility_low": utility - Z95 * error, "utility_high": utility + Z95 * error}


def _behaviour_summary(counts: np.ndarray, weights: np.ndarray) -> dict:
    """The true expected counts (R, K) as the mean per behaviour and the utility."""
    return {"value": counts.mean(0).tolist(), "utility": float((counts @ weights).mean())}


def format_ope(report: dict) -> str:
    """The estimates as aligned lines, the truth beside them on simulated data."""
    truth = report.get("truth", {}).get("model", {}).get("utility")
    lines = [f"{report['model']} on {report['data']} ({report['split']}, "
             f"{report['requests']:,} requests): estimated utility per request",
             f"  {'estimator':<12}{'utility':>10}{'95 % interval':>22}{'ESS':>10}"
             + (f"{'error':>10}" if truth is not None else "")]
    for name, estimate in report["estimates"].items():
        if estimate["skipped"]:
            lines.append(f"  {name:<12}skipped: {estimate['skipped']}")
            continue
        interval = f"[{estimate['utility_low']:.3f}, {estimate['utility_high']:.3f}]"
        ess = "" if estimate["ess"] is None else f"{estimate['ess']:,.0f}"
        error = f"{estimate['utility'] - truth:+10.3f}" if truth is not None else ""
        lines.append(f"  {name:<12}{estimate['utility']:>10.3f}{interval:>22}{ess:>10}{error}")
    logged = report["logged"]
    interval = f"[{logged['utility_low']:.3f}, {logged['utility_high']:.3f}]"
    lines.append(f"  {'logged':<12}{logged['utility']:>10.3f}{interval:>22}"
                 "   (observed, the logging policy)")
    if truth is not None:
        lines.append(f"  true utility of the run's lists {truth:.3f}, of the logged lists "
                     f"{report['truth']['logged']['utility']:.3f} (simulator)")
    lines.append(f"  reward model: {report['reward_model']}")
    return "\n".join(lines)


ESTIMATOR_NOTES = {
    "dm": "direct method: the reward model's prediction for the run's lists",
    "ips": "whole-list IPS (Swaminathan & Joachims 2015): unbiased, useless when the run "
           "rarely shows what the logs show",
    "snips": "self-normalised IPS: the same weights, divided by their sum",
    "iips": "item-position IPS (Li et al. 2018): unbiased if each position's feedback "
            "depends only on its item",
    "pbm": "position-based click model (Li et al. 2018): feedback = examination(position) x "
           "attraction(item), examination estimated from the logs",
    "rips": "reward-interaction (cascade) IPS (McInerney et al. 2020): feedback depends on "
            "the items above",
    "cascade_dr": "cascade doubly robust (Kiyohara et al. 2022): RIPS with the reward model "
                  "as a control variate",
    "pi": "pseudo-inverse (Swaminathan et al. 2017): unbiased if the list's reward adds up "
          "over (item, position) slots",
}


def write_ope_report(report: dict, path: str | Path) -> None:
    """The estimates as a Markdown table, each estimator's assumption in a line."""
    from nar4rec.io import atomic_file

    truth = report.get("truth", {}).get("model", {}).get("utility")
    lines = [f"# {report['model']}: off-policy estimates on {report['split']}", "",
             f"Run `{report['run']}`, logs `{report['data']}`, {report['requests']:,} "
             f"requests; reward model: {report['reward_model']}; logging probabilities from "
             + ", ".join(f"{k}: {v}" for k, v in report["sources"].items()) + ".", "",
             "| estimator | utility | 95 % interval | effective sample size | "
             + ("error against the truth | " if truth is not None else "")
             + "assumes |", "|---|---|---|---|" + ("---|" if truth is not None else "") + "---|"]
    for name, e in report["estimates"].items():
        if e["skipped"]:
            lines.append(f"| {name} | skipped: {e['skipped']} | | | "
                         + ("| " if truth is not None else "") + f"{ESTIMATOR_NOTES[name]} |")
            continue
        ess = "" if e["ess"] is None else f"{e['ess']:,.0f}"
        error = f"{e['utility'] - truth:+.4f} | " if truth is not None else ""
        lines.append(f"| {name} | {e['utility']:.4f} | [{e['utility_low']:.4f}, "
                     f"{e['utility_high']:.4f}] | {ess} | {error}{ESTIMATOR_NOTES[name]} |")
    logged = report["logged"]
    lines += ["", f"The logged lists' observed utility: {logged['utility']:.4f} "
              f"[{logged['utility_low']:.4f}, {logged['utility_high']:.4f}]."]
    if truth is not None:
        lines.append(f"On the simulator, the run's lists are worth {truth:.4f} and the logged "
                     f"lists {report['truth']['logged']['utility']:.4f}.")
    lines += ["", "Which estimator to trust for which question: docs/ope.md.", ""]
    with atomic_file(path) as tmp:
        Path(tmp).write_text("\n".join(lines))
