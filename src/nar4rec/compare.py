"""`nar4rec compare`: every model trained on one data set under one protocol, laid out as the
paper's tables.

For each seed, each model is trained on the train split (validated on valid, early-stopped on
the validation loss: nothing is tuned on test) into RUNS/seed<S>/<model>/ and evaluated on the
test split by `evaluation.evaluate_run`. Each model's companions (`System.companions`) are
trained beside it: with NAR4Rec, NAR4Rec at the paper's settings (configs/paper.toml), a row
of its own named nar4rec_paper, and for Table 6 a generator trained with vanilla (likelihood)
training on that run's evaluator; Table 7 comes from decoding the default generator with each
decoder. The seed sets every training seed
and the reranker's sampling seed; the data stay the same.

Tables (the paper's numbering):
    2 / 3  offline metrics (AUC, LogLoss, NDCG over the requests with a click for n = m;
           Recall@6, Recall@10, LogLoss for n > m), mean and standard deviation over seeds
    4      training and inference seconds per batch (seed 0's models, this machine)
    5      on simulated data: each behaviour's expected count per request, as a relative change
           against the reference model (Edge-rerank, the paper's online baseline), with 95%
           confidence intervals over requests and seeds; each model's true utility and
           captured lift
    6      NAR4Rec, vanilla against unlikelihood training
    7      NAR4Rec's generator under each decoder
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np

from nar4rec import bench
from nar4rec.config import RunConfig, apply_overrides, dataset_settings
from nar4rec.data.loader import RequestLoader
from nar4rec.errors import Nar4recError
from nar4rec.evaluation import evaluate_run, verdicts
from nar4rec.io import atomic_file
from nar4rec.registry import COMPARED, check_models, system_class
from nar4rec.report import NDCG_NOTE, OFFLINE_CAVEAT, REFERENCE_NAMES
from nar4rec.runs import (
    changed_settings,
    load_run,
    phases_of,
    read_run,
    split_files,
    train_run,
)
from nar4rec.system import Companion

REFERENCE = "edge_rerank"
OFFLINE = {"item-wise (n = m)": ("auc", "logloss", "ndcg"),
           "exposure (n > m)": ("recall@6", "recall@10", "logloss")}
SIMULATED = ("utility", "captured_lift")
Z95 = 1.959964


def compare(data_dir: str | Path, runs_dir: str | Path, *, models=COMPARED,
            seeds: int = 1, config: RunConfig | None = None, resume: bool = False,
            overwrite: bool = False, time_batch: int = 256, progress: bool | None = None,
            log=print) -> dict:
    """Train, evaluate and time every model for every seed; the tables as one dict.

    Args:
        runs_dir: where the runs go (RUNS/seed<S>/<model>/).
        models: names from `registry.COMPARED`; each model's companions
            (`System.companions`, NAR4Rec's vanilla training for Table 6) are trained too.
        config: settings shared by every run (seeds are set per run); default: RunConfig's
            with the data set's settings (`config.DATASET_SETTINGS`: batch 1024 on Avito).
        resume: reuse finished runs in runs_dir and continue unfinished ones.
        overwrite: delete runs_dir first.
        time_batch: requests per batch in the Table 4 timings.
    """
    check_models(models)
    if seeds < 1:
        raise Nar4recError(f"--seeds must be >= 1, not {seeds}")
    runs_dir = Path(runs_dir)
    if runs_dir.exists() and any(runs_dir.iterdir()) and not resume:
        if not overwrite:
            raise Nar4recError(f"{runs_dir}: already exists; use --resume to reuse its runs or "
                               "--overwrite to replace them")
        shutil.rmtree(runs_dir)
    config = config or apply_overrides(RunConfig(), dataset_settings(data_dir),
                                       source="the data set's settings")
    evaluations: dict[str, list[dict]] = {}
    timings: dict[str, dict] = {}
    rows: list[str] = []
    for seed in range(seeds):
        seeded = _seeded(config, seed)
        for model in models:
            runs = {model: Companion(seeded, row=True)} | system_class(model).companions(seeded)
            for name, companion in runs.items():
                run = runs_dir / f"seed{seed}" / name
                log(f"seed {seed}: {name}")
                _train(data_dir, run, model, companion.config, resume, progress,
                       reuse={phase: runs_dir / f"seed{seed}" / source
                              for phase, source in companion.reuse.items()})
                evaluations.setdefault(name, []).append(
                    evaluate_run(run, data_dir, per_request=True))
                if companion.row and seed == 0:
                    rows.append(name)
                    timings[name] = time_run(run, data_dir, time_batch)
    return tables(evaluations, timings, data_dir=str(data_dir), seeds=seeds,
                  time_batch=time_batch, models=list(models), rows=rows)


def _seeded(config: RunConfig, seed: int) -> RunConfig:
    return dataclasses.replace(
        config, train=dataclasses.replace(config.train, seed=seed),
        evaluator_train=dataclasses.replace(config.evaluator_train, seed=seed),
        reranker=dataclasses.replace(config.reranker, seed=seed))


def _train(data_dir, run: Path, model: str, config: RunConfig, resume: bool, progress,
           reuse: dict[str, Path] | None = None) -> None:
    if resume and (run / "run.json").exists():
        info = read_run(run)
        changed = changed_settings(info, config)
        if changed:
            raise Nar4recError(f"{run}: trained with other '{changed[0]}' settings than this "
                               "comparison's (an older default, or another --config); use "
                               "--overwrite or another --runs")
        if all(p in info["phases"] for p in phases_of(model)):
            return
        train_run(data_dir, run, model=model, resume=True, progress=progress, reuse=reuse)
        return
    train_run(data_dir, run, model=model, config=config, overwrite=True, progress=progress,
              reuse=reuse)


def time_run(run_dir: Path, data_dir, batch_size: int) -> dict:
    """Table 4: seconds of one training step and of one rerank call on a test batch."""
    loaded = load_run(run_dir)
    batch = next(iter(RequestLoader(split_files(data_dir, "test"), loaded.space,
                                    batch_size=batch_size)))
    module, step = loaded.system.training_step()
    return {"train_s_per_batch": bench.time_training(module, step, batch),
            "infer_s_per_batch": bench.time_inference(loaded.system.rerank, batch),
            "batch": len(batch)}


# ---------------------------------------------------------------------------------------------
# The tables


def tables(evaluations: dict[str, list[dict]], timings: dict[str, dict], *, data_dir: str,
           seeds: int, time_batch: int, models: list[str], rows: list[str] | None = None
           ) -> dict:
    """Aggregate per-seed evaluations into the JSON `nar4rec compare` writes.

    models: the registered models compared; rows: the runs shown as rows, in order (default
    `models`; `compare` adds the companions that ask for a row after their model)."""
    first = evaluations[models[0]][0]
    protocol = first["protocol"]
    simulated = "variants" in first
    names = rows or list(models)
    rows = []
    for model in names:
        runs = evaluations[model]
        metrics = _mean_std([r["metrics"] for r in runs])
        row = {"model": model, "metrics": metrics["mean"], "std": metrics["std"],
               "per_seed": [r["metrics"] for r in runs]}
        if model in timings:
            row["metrics"].update({k: v for k, v in timings[model].items() if k != "batch"})
        row["verdicts"] = _verdicts(runs, model)
        rows.append(row)
    result = {"data": data_dir, "protocol": protocol, "seeds": seeds,
              "requests": first["requests"], "time_batch": time_batch, "rows": rows,
              "references": first["references"]}
    if simulated:
        reference = REFERENCE if REFERENCE in models else "logging"
        behaviours = list(next(iter(first["behaviour_means"].values())))
        counts = {model: [r["per_request"][r["model"]] for r in evaluations[model]]
                  for model in names}
        for name in ("logging", "upstream", "oracle"):
            if name in first["per_request"]:
                counts[name] = [r["per_request"][name] for r in evaluations[models[0]]]
        weights = _utility_weights(first)
        result["table5"] = {
            "reference": reference, "behaviours": behaviours,
            "rows": [{"model": name,
                      "means": dict(zip(behaviours, np.concatenate(c).mean(0).tolist(),
                                        strict=True)),
                      "relative": {b: relative_change(np.concatenate(c)[:, k],
                                                      np.concatenate(counts[reference])[:, k])
                                   for k, b in enumerate(behaviours)},
                      "utility_relative": relative_change(
                          np.concatenate(c) @ weights,
                          np.concatenate(counts[reference]) @ weights)}
                     for name, c in counts.items()]}
    for model in models:                # the first model whose system has Tables 6 and 7
        system = system_class(model)
        if system.TABLE6 and all(name in evaluations for name in system.TABLE6):
            result["table6"] = [
                {"training": label, **_summary(evaluations[name], model, protocol, simulated)}
                for name, label in system.TABLE6.items()]
        if system.TABLE7 and simulated:
            result["table7"] = [
                {"decoding": label, **_variant_summary(evaluations[model], variant)}
                for label, variant in system.TABLE7.items()]
        if "table6" in result or "table7" in result:
            break
    return result


def _verdicts(runs: list[dict], model: str) -> list[dict]:
    """`evaluation.verdicts` over every seed's requests (the references repeated per seed)."""
    first = runs[0]
    joined = {metric: {name: np.concatenate([r["per_request_metrics"][metric][name]
                                             for r in runs]) for name in values}
              for metric, values in first["per_request_metrics"].items()}
    return verdicts(joined, model=model, list_length=first["list_length"],
                    simulated="variants" in first, exposure=first["protocol"].startswith("exp"))


def _utility_weights(evaluation: dict) -> np.ndarray:
    return np.array(list(evaluation["utility_weights"].values()))


def relative_change(values: np.ndarray, reference: np.ndarray) -> dict:
    """mean(values) / mean(reference) - 1 over paired requests, with a 95% interval.

    The interval is the delta method's for a ratio of paired means: the standard error of r
    is sd(values - (1 + r) * reference) / (sqrt(N) * mean(reference)).
    """
    base = float(reference.mean())
    if len(values) < 2 or abs(base) < 1e-12:
        return {"change": math.nan, "ci95": [math.nan, math.nan]}
    change = float(values.mean()) / base - 1.0
    error = float(np.std(values - (1.0 + change) * reference, ddof=1)
                  / (math.sqrt(len(values)) * abs(base)))
    return {"change": change, "ci95": [change - Z95 * error, change + Z95 * error]}


def _mean_std(records: list[dict]) -> dict:
    keys = [k for k in records[0] if isinstance(records[0][k], int | float)]
    values = {k: np.array([r.get(k, math.nan) for r in records], dtype=float) for k in keys}
    return {"mean": {k: float(np.mean(v)) for k, v in values.items()},
            "std": {k: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
                    for k, v in values.items()}}


def _summary(runs: list[dict], method: str, protocol: str, simulated: bool) -> dict:
    keys = OFFLINE[protocol] + (SIMULATED if simulated else ())
    stats = _mean_std([r["metrics"] for r in runs])
    return {"metrics": {k: stats["mean"].get(k, math.nan) for k in keys},
            "std": {k: stats["std"].get(k, math.nan) for k in keys}}


def _variant_summary(runs: list[dict], variant: str) -> dict:
    stats = _mean_std([r["variants"][variant] for r in runs])
    return {"metrics": stats["mean"], "std": stats["std"]}


def write_json(result: dict, path: str | Path) -> None:
    with atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------
# The Markdown report


def _cell(mean: float, std: float | None = None, digits: int = 4) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    text = f"{mean:.{digits}f}"
    if std is not None and not math.isnan(std) and std > 0:
        text += f" ± {std:.{digits}f}"
    return text


def format_tables(result: dict) -> str:
    """The comparison as Markdown tables (the paper's layout), without the chart."""
    protocol = result["protocol"]
    offline = OFFLINE[protocol]
    number = "2" if protocol.startswith("item") else "3"
    seeds = result["seeds"]
    lines = [f"## Table {number} style: offline metrics ({protocol})", "",
             f"Test split of `{result['data']}`, {result['requests']:,} requests; mean ± "
             f"standard deviation over {seeds} seed{'s' if seeds > 1 else ''}.", ""]
    if "ndcg" in offline:
        lines += [NDCG_NOTE, ""]
    lines += ["| model | " + " | ".join(offline) + (" | utility | captured lift |"
                                                   if "table5" in result else " |"),
              "|---|" + "---|" * (len(offline) + (2 if "table5" in result else 0))]
    keys = offline + (SIMULATED if "table5" in result else ())
    for row in result["rows"]:
        lines.append(f"| {row['model']} | " + " | ".join(
            _cell(row["metrics"].get(k, math.nan), row["std"].get(k)) for k in keys) + " |")
    for name, values in result.get("references", {}).items():
        lines.append(f"| *{REFERENCE_NAMES.get(name, name)}* | " + " | ".join(
            _cell(values.get(k, math.nan)) for k in keys) + " |")
    sentences = [v["sentence"] for row in result["rows"] for v in row.get("verdicts", [])]
    if sentences:
        lines += ["", "Against the references (the logged lists; the upstream order, the top "
                  "m by the data's upstream_score):", ""]
        lines += [f"- {sentence}" for sentence in sentences]
    if "table5" not in result:
        lines += ["", OFFLINE_CAVEAT]
    lines += ["", f"## Table 4 style: seconds per batch of {result['time_batch']} requests", "",
              "| model | training step | inference |", "|---|---|---|"]
    lines += [f"| {row['model']} | {_cell(row['metrics'].get('train_s_per_batch'))} | "
              f"{_cell(row['metrics'].get('infer_s_per_batch'))} |" for row in result["rows"]]
    if "table5" in result:
        table = result["table5"]
        behaviours = table["behaviours"]
        lines += ["", f"## Table 5 style: behaviours under the simulator's ground truth, "
                  f"relative to {table['reference']}", "",
                  "Change of the mean expected count per request, with its 95% confidence "
                  "interval over requests and seeds (paired requests, delta method).", "",
                  "| lists | " + " | ".join(behaviours) + " | utility |",
                  "|---|" + "---|" * (len(behaviours) + 1)]
        for row in table["rows"]:
            cells = [_relative(row["relative"][b]) for b in behaviours]
            lines.append(f"| {row['model']} | " + " | ".join(cells)
                         + f" | {_relative(row['utility_relative'])} |")
    if "table6" in result:
        keys = list(result["table6"][0]["metrics"])
        lines += ["", "## Table 6: NAR4Rec, vanilla against unlikelihood training", ""]
        if "ndcg" in keys:
            lines += ["`ndcg` as in Table 2: averaged over the requests with a click.", ""]
        lines += ["| training | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        lines += [f"| {row['training']} | " + " | ".join(
            _cell(row["metrics"][k], row["std"][k]) for k in keys) + " |"
            for row in result["table6"]]
    if "table7" in result:
        lines += ["", "## Table 7: NAR4Rec's generator under each decoder", "",
                  "| decoding | utility | captured lift |", "|---|---|---|"]
        lines += [f"| {row['decoding']} | "
                  f"{_cell(row['metrics']['utility'], row['std']['utility'])} | "
                  f"{_cell(row['metrics'].get('captured_lift'), row['std'].get('captured_lift'))} |"
                  for row in result["table7"]]
    return "\n".join(lines)


def _relative(stats: dict) -> str:
    change, (low, high) = stats["change"], stats["ci95"]
    if math.isnan(change):
        return "n/a"
    return f"{100 * change:+.2f}% [{100 * low:+.2f}, {100 * high:+.2f}]"


def write_report(result: dict, path: str | Path) -> None:
    """The Markdown report, with a bar chart of the lifts beside it (PATH-lifts.png)."""
    path = Path(path)
    chart = path.with_name(path.stem + "-lifts.png")
    lines = [f"# Comparison on `{result['data']}`", "", format_tables(result)]
    if "table5" in result and plot_lifts(result, chart):
        lines += ["", "## Lifts", "", f"![lifts]({chart.name})"]
    lines.append("")
    with atomic_file(path) as tmp:
        Path(tmp).write_text("\n".join(lines))


def plot_lifts(result: dict, out: Path) -> bool:
    """Captured lift per model, and each behaviour's change against the reference."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nar4rec.report import save_figure

    rows = result["rows"]
    if not all("captured_lift" in r["metrics"] for r in rows):
        return False
    table = result["table5"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    names = [r["model"] for r in rows]
    left.bar(names, [r["metrics"]["captured_lift"] for r in rows],
             yerr=[r["std"].get("captured_lift", 0.0) for r in rows], capsize=3)
    left.set_ylabel("captured lift")
    left.set_title("share of the oracle's gain over logging")
    left.tick_params(axis="x", rotation=30)
    left.grid(axis="y", alpha=0.3)
    behaviours = table["behaviours"]
    shown = [r for r in table["rows"] if r["model"] in names]
    width = 0.8 / max(len(shown), 1)
    for index, row in enumerate(shown):
        changes = [100 * row["relative"][b]["change"] for b in behaviours]
        errors = [100 * (row["relative"][b]["ci95"][1] - row["relative"][b]["change"])
                  for b in behaviours]
        right.bar(np.arange(len(behaviours)) + index * width, changes, width, yerr=errors,
                  capsize=2, label=row["model"])
    right.set_xticks(np.arange(len(behaviours)) + 0.4 - width / 2, behaviours)
    right.set_ylabel(f"% change against {table['reference']}")
    right.set_title("behaviours (95% intervals)")
    right.axhline(0, color="black", lw=0.8)
    right.grid(axis="y", alpha=0.3)
    right.legend(fontsize=7)
    save_figure(figure, out)
    return True
