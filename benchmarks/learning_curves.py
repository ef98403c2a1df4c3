"""Learning curves: captured lift on the test split against the number of training requests.

    python benchmarks/learning_curves.py --preset kuaishou --sizes 20000,100000,300000 \
        --models nar4rec,dnn,prm,seq2slate --list-aware configs/list-aware.toml \
        --data-seed 0 --seeds 1 --out runs/curves [--movielens-dir ../shared/data/ml-100k]
    # a variant of a preset's world: recurring users and items, a weaker ranking stage
    python benchmarks/learning_curves.py --preset kuaishou --sizes 30000 ... \
        --sim-set n_users=2000 --sim-set n_items=6000 --sim-set upstream_noise=1.2

For every size: simulate that many requests with the data seed (`nar4rec simulate`: 80 % train,
10 % valid, 10 % test, in time order; the x axis is the train split's size, read from
summary.json), train every model for every training seed (0 .. --seeds - 1) on it, and score
each model's lists on the test split with the simulator's exact expected utility
(`evaluation.evaluate_run`). With --list-aware, NAR4Rec is trained a second time with that TOML
file applied, into its own run directory, labelled "nar4rec (list-aware)".

"nar4rec" is NAR4Rec at the paper's settings (`reranker.PAPER_SETTINGS`, configs/paper.toml:
the defaults these curves were measured with, before stop 24).

Settings, applied in this order: the data set's settings, the paper's settings ("nar4rec"
only), the results protocol
(`train.epochs=3`, `evaluator_train.epochs=3`, as `nar4rec compare` in docs/results.md), the
--list-aware TOML (its run only, so its own epochs win there), every --set (every run), every
--list-aware-set (the list-aware run only).

Intervals (95 %, normal approximation):
- captured lift = mean(u_model - u_logging) / mean(u_oracle - u_logging) over the test
  requests, a ratio of paired means; its standard error by the delta method,
  sd(a - lift * g) / (sqrt(R) * mean(g)) with a = u_model - u_logging and g = u_oracle -
  u_logging per request, a averaged over the training seeds first. With several seeds the
  variance of the seeds' lifts divided by the number of seeds is added (the seeds share the
  test requests, so their spread is the training's own randomness).
- against the best baseline (the baseline with the highest captured lift at that size):
  mean(u_model - u_best) / mean(g), the same way. The best baseline is picked on the same test
  requests, which favours it slightly.
The test split grows with the size (2,000 requests at 20,000), so the intervals narrow along
the curve; the world (users, items, ground truth) is the same at every size for one data seed.

Finished simulations, runs and evaluations are reused; OUT/<label>/curves.json is rewritten
after every size, OUT/<label>/curves.png drawn at the end and the Markdown tables printed.
Training seconds (wall clock of `train_run`: feature vocabularies, tau and every phase) are
recorded per run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from nar4rec.config import PAPER_SETTINGS, RunConfig, dataset_settings, load_overrides
from nar4rec.errors import Nar4recError
from nar4rec.evaluation import evaluate_run
from nar4rec.io import atomic_file
from nar4rec.models import BASELINES
from nar4rec.registry import check_models
from nar4rec.runs import changed_settings, phases_of, read_run, train_run
from nar4rec.sim.presets import preset_config
from nar4rec.sim.simulate import simulate

PROTOCOL = ["train.epochs=3", "evaluator_train.epochs=3"]
LIST_AWARE = "nar4rec_list_aware"
LABELS = {"nar4rec": "nar4rec (paper's settings)", LIST_AWARE: "nar4rec (list-aware)"}
SIMULATION_FILE = "simulation.json"     # beside data/: what it was simulated with
TRAINED_FILE = "curve_train.json"       # in a run: training seconds
EVALUATED_FILE = "curve_test.npz"       # in a run: per-request test utilities
Z95 = 1.959964


@dataclasses.dataclass
class Curves:
    """What one invocation measures: a preset (or a variant of it) over sizes."""

    label: str
    preset: str
    sim_sets: list[str]
    movielens_dir: str
    data_seed: int
    seeds: int
    models: list[str]            # pipeline model names, plus LIST_AWARE
    list_aware: str | None
    sets: list[str]
    list_aware_sets: list[str]
    out: Path
    list_aware_up_to: int | None = None   # the list-aware run only at sizes up to this one

    def base(self, requests: int) -> Path:
        return self.out / self.label / f"n{requests}"

    def config(self, model: str, data: Path, seed: int) -> RunConfig:
        toml = self.list_aware if model == LIST_AWARE else None
        sets = [*self.sets, *(self.list_aware_sets if model == LIST_AWARE else []),
                f"train.seed={seed}", f"evaluator_train.seed={seed}", f"reranker.seed={seed}"]
        # "nar4rec" is NAR4Rec at the paper's settings (the defaults before stop 24)
        paper = PAPER_SETTINGS if model == "nar4rec" else {}
        defaults = {**dataset_settings(data), **paper,
                    **dict(item.split("=", 1) for item in PROTOCOL)}
        return load_overrides(RunConfig(), toml, sets, defaults=defaults)


def pipeline_model(model: str) -> str:
    return "nar4rec" if model == LIST_AWARE else model


def label_of(model: str) -> str:
    return LABELS.get(model, model)


# ---------------------------------------------------------------------------------------------
# Simulate, train, evaluate (each reused when done)


def simulated(curves: Curves, requests: int) -> tuple[Path, dict, float | None]:
    """The data of one size: its directory, summary.json and the seconds simulating took
    (None when reused)."""
    data = curves.base(requests) / "data"
    identity = {"preset": curves.preset, "sim_sets": curves.sim_sets,
                "data_seed": curves.data_seed, "requests": requests}
    record = curves.base(requests) / SIMULATION_FILE
    if (data / "summary.json").exists():
        if record.exists() and json.loads(record.read_text()) != identity:
            raise Nar4recError(f"{data}: simulated with {record.read_text().strip()}, not "
                               f"{json.dumps(identity)}; use another --label or --out")
        return data, json.loads((data / "summary.json").read_text()), None
    sets = list(curves.sim_sets)
    if curves.preset == "movielens":
        sets.append(f"movielens_dir={curves.movielens_dir}")
    config = load_overrides(preset_config(curves.preset), None, sets)
    started = time.perf_counter()
    summary = simulate(config, requests, curves.data_seed, data, overwrite=True, progress=False)
    seconds = time.perf_counter() - started
    record.write_text(json.dumps(identity) + "\n")
    return data, summary, seconds


def trained(curves: Curves, data: Path, run: Path, model: str, seed: int) -> dict:
    """Train the run unless it has finished with the same settings; its training seconds."""
    config = curves.config(model, data, seed)
    name = pipeline_model(model)
    if (run / "run.json").exists():
        info = read_run(run)
        changed = changed_settings(info, config)
        if changed:
            raise Nar4recError(f"{run}: trained with other '{changed[0]}' settings than "
                               "these; use another --out or delete the run")
        if all(p in info["phases"] for p in phases_of(name)):
            return _training_seconds(run, info)
        resumed = True                   # unfinished: continue with the run's own settings
    else:
        resumed = False
    started = time.perf_counter()
    info = train_run(data, run, model=name, config=config,
                     resume=resumed, overwrite=not resumed, progress=False)
    seconds = time.perf_counter() - started
    (run / TRAINED_FILE).write_text(json.dumps({"seconds": seconds, "resumed": resumed}) + "\n")
    return _training_seconds(run, info)


def _training_seconds(run: Path, info: dict) -> dict:
    """Wall seconds of train_run (when this script trained the run) and each phase's loop."""
    phases = {p: round(r.get("seconds", math.nan), 1) for p, r in info["phases"].items()}
    recorded = run / TRAINED_FILE
    wall = json.loads(recorded.read_text()) if recorded.exists() else {}
    return {"seconds": round(wall.get("seconds", sum(phases.values())), 1),
            "measured": bool(wall) and not wall.get("resumed", False),
            "phases": phases,
            "epochs_run": {p: r.get("epochs_run") for p, r in info["phases"].items()}}


def evaluated(run: Path, data: Path) -> dict[str, np.ndarray]:
    """(R,) true utility of each test request's list: the run's ("method"), the logging
    policy's and the oracle's; computed once and kept in the run."""
    cached = run / EVALUATED_FILE
    if cached.exists():
        with np.load(cached) as stored:
            return {k: stored[k] for k in stored.files}
    report = evaluate_run(run, data, split="test", per_request=True)
    weights = np.array(list(report["utility_weights"].values()))
    method = "evaluator_top_m" if report["model"] == "evaluator" else report["model"]
    per_request = report["per_request"]
    values = {"method": per_request[method] @ weights,
              "logging": per_request["logging"] @ weights,
              "oracle": per_request["oracle"] @ weights}
    with atomic_file(cached) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **values)
    return values


# ---------------------------------------------------------------------------------------------
# Intervals


def ratio_interval(numerator: np.ndarray, gain: np.ndarray) -> dict:
    """mean(numerator) / mean(gain) over paired requests, with a 95 % interval.

    Args:
        numerator: (S, R) per-request values of each training seed, e.g. u_model - u_logging.
        gain: (R,) per-request u_oracle - u_logging.
    The delta method over requests on the seed-averaged numerator, plus the variance of the
    seeds' ratios over S when S > 1.
    """
    base = float(gain.mean())
    requests = gain.shape[0]
    if requests < 2 or abs(base) < 1e-12:
        return {"value": math.nan, "ci95": [math.nan, math.nan], "per_seed": []}
    per_seed = numerator.mean(1) / base                                       # (S,)
    averaged = numerator.mean(0)                                              # (R,)
    value = float(averaged.mean()) / base
    variance = float(np.var(averaged - value * gain, ddof=1)) / (requests * base ** 2)
    if len(per_seed) > 1:
        variance += float(np.var(per_seed, ddof=1)) / len(per_seed)
    half = Z95 * math.sqrt(variance)
    return {"value": value, "ci95": [value - half, value + half],
            "per_seed": per_seed.tolist()}


# ---------------------------------------------------------------------------------------------
# One size


def measure(curves: Curves, requests: int, log=print) -> dict:
    """One point of every curve: simulate, train, evaluate, intervals."""
    data, summary, simulate_seconds = simulated(curves, requests)
    point = {"requests": requests, "train_requests": summary["requests"]["train"],
             "test_requests": summary["requests"]["test"], "users": summary["users"],
             "items": summary["items"], "simulate_seconds": simulate_seconds,
             "data_bytes": sum(p.stat().st_size for p in data.rglob("*") if p.is_file()),
             "models": {}}
    utilities: dict[str, list[np.ndarray]] = {}
    reference = None
    for model in curves.models:
        if model == LIST_AWARE and curves.list_aware_up_to and requests > curves.list_aware_up_to:
            continue
        for seed in range(curves.seeds):
            run = curves.base(requests) / f"seed{seed}" / model
            timing = trained(curves, data, run, model, seed)
            values = evaluated(run, data)
            if reference is None:
                reference = values
            utilities.setdefault(model, []).append(values["method"])
            entry = point["models"].setdefault(model, {"label": label_of(model), "seeds": []})
            entry["seeds"].append({"seed": seed, "utility": float(values["method"].mean()),
                                   "train": timing})
            log(f"{curves.label} n={requests:,} seed {seed} {label_of(model)}: "
                f"{timing['seconds']:.0f} s training, utility {values['method'].mean():.3f}")
    logging, oracle = reference["logging"], reference["oracle"]
    gain = oracle - logging
    point["logging_utility"] = float(logging.mean())
    point["oracle_utility"] = float(oracle.mean())
    stacked = {model: np.stack(runs) for model, runs in utilities.items()}      # (S, R)
    for model, values in stacked.items():
        entry = point["models"][model]
        entry["utility"] = float(values.mean())
        entry["captured_lift"] = ratio_interval(values - logging, gain)
        entry["train_seconds"] = float(np.mean([s["train"]["seconds"] for s in entry["seeds"]]))
    baselines = [m for m in stacked if m in BASELINES]
    if baselines:
        best = max(baselines, key=lambda m: point["models"][m]["captured_lift"]["value"])
        point["best_baseline"] = best
        for model, values in stacked.items():
            difference = values - stacked[best]
            point["models"][model]["against_best_baseline"] = {
                **ratio_interval(difference, gain),
                "utility_difference": float(difference.mean())}
    return point


# ---------------------------------------------------------------------------------------------
# Report


def _interval(stats: dict, signed: bool = False) -> str:
    value, (low, high) = stats["value"], stats["ci95"]
    if math.isnan(value):
        return "n/a"
    sign = "+" if signed else ""
    return f"{value:{sign}.3f} [{low:{sign}.3f}, {high:{sign}.3f}]"


def format_tables(result: dict) -> str:
    """Captured lift, the difference to the best baseline and training seconds, model x size."""
    points = result["points"]
    models = result["models"]
    header = "| model | " + " | ".join(f"{p['train_requests']:,}" for p in points) + " |"
    rule = "|---|" + "---|" * len(points)
    seeds = result["seeds"]
    trained_with = f"training seeds 0-{seeds - 1}" if seeds > 1 else "training seed 0"
    tested_on = ", ".join(f"{p['test_requests']:,}" for p in points)
    lines = [f"### {result['label']}: captured lift on the test split, by training requests", "",
             f"Data seed {result['data_seed']}, {trained_with}; {result['intervals']}. "
             f"Test requests: {tested_on}.", "", header, rule]
    for model in models:
        lines.append(f"| {label_of(model)} | " + " | ".join(
            _interval(p["models"][model]["captured_lift"]) if model in p["models"] else "—"
            for p in points) + " |")
    if all("best_baseline" in p for p in points):
        lines += ["", "Difference in captured lift against the best baseline at each size "
                  "(paired over the same requests; an interval across 0 is a tie):", "",
                  header, rule,
                  "| best baseline | " + " | ".join(p["best_baseline"] for p in points) + " |"]
        for model in models:
            cells = ["—" if p["best_baseline"] == model or model not in p["models"]
                     else _interval(p["models"][model]["against_best_baseline"], signed=True)
                     for p in points]
            lines.append(f"| {label_of(model)} | " + " | ".join(cells) + " |")
    lines += ["", "Training seconds (mean over seeds; wall clock on this machine):", "",
              header, rule]
    for model in models:
        lines.append(f"| {label_of(model)} | " + " | ".join(
            f"{p['models'][model]['train_seconds']:.0f}" if model in p["models"] else "—"
            for p in points) + " |")
    return "\n".join(lines)


def plot(result: dict, out: Path) -> None:
    """Captured lift against training requests (log scale) and the difference to the best
    baseline, one line per model, 95 % intervals as error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nar4rec.report import save_figure

    points = result["points"]
    sizes = np.array([p["train_requests"] for p in points], dtype=float)
    paired = all("best_baseline" in p for p in points)
    figure, axes = plt.subplots(1, 2 if paired else 1, figsize=(12 if paired else 7, 4.5),
                                squeeze=False)
    models = result["models"]
    # a small horizontal offset per model, so that the error bars do not hide each other
    offsets = np.exp(np.linspace(-0.03, 0.03, len(models))) if len(models) > 1 else [1.0]
    panels = [("captured_lift", axes[0][0], "captured lift (0 logging, 1 oracle)",
               "captured lift on the test split")]
    if paired:
        panels.append(("against_best_baseline", axes[0][1],
                       "difference in captured lift", "against the best baseline at each size"))
    for key, axis, ylabel, title in panels:
        for offset, model in zip(offsets, models, strict=True):
            at = [k for k, p in enumerate(points) if key in p["models"].get(model, {})]
            stats = [points[k]["models"][model][key] for k in at]
            if not stats:
                continue
            values = np.array([s["value"] for s in stats])
            errors = np.array([[s["value"] - s["ci95"][0], s["ci95"][1] - s["value"]]
                               for s in stats]).T
            axis.errorbar(sizes[at] * offset, values, yerr=errors, marker="o", capsize=3,
                          label=label_of(model))
        axis.set_xscale("log")
        ticks = [f"{int(s):,}" for s in sizes]
        if key == "against_best_baseline":
            ticks = [f"{tick}\nbest: {label_of(p['best_baseline'])}"
                     for tick, p in zip(ticks, points, strict=True)]
        axis.set_xticks(sizes, ticks)
        axis.minorticks_off()
        axis.set_xlabel("training requests")
        axis.set_ylabel(ylabel)
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.axhline(0, color="black", lw=0.8)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"{result['label']}: 95 % intervals over paired test requests", fontsize=10)
    save_figure(figure, out)


def write_json(result: dict, path: Path) -> None:
    with atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------


def _default_label(preset: str, sim_sets: list[str]) -> str:
    return "-".join([preset, *(s.replace("=", "") for s in sim_sets)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True, help="kuaishou, movielens or avito")
    parser.add_argument("--sizes", default="20000,100000,300000",
                        help="requests to simulate (train + valid + test), comma-separated")
    parser.add_argument("--models", default="nar4rec,dnn,prm,seq2slate")
    parser.add_argument("--list-aware", metavar="TOML",
                        help="also train NAR4Rec with this config (configs/list-aware.toml)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=1, help="training seeds 0 .. N-1")
    parser.add_argument("--out", default="runs/curves")
    parser.add_argument("--label", help="name of the curves' folder in OUT; default: the "
                        "preset and the --sim-set values")
    parser.add_argument("--movielens-dir", default="../shared/data/ml-100k")
    parser.add_argument("--sim-set", action="append", default=[], metavar="KEY=VALUE",
                        help="simulator setting (SimConfig), e.g. n_users=2000")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="run setting for every run (after the protocol's epochs and the "
                        "list-aware TOML)")
    parser.add_argument("--list-aware-set", action="append", default=[], metavar="KEY=VALUE",
                        help="run setting for the list-aware run only")
    parser.add_argument("--list-aware-up-to", type=int, metavar="REQUESTS",
                        help="train the list-aware run only at sizes up to this one (it costs "
                        "about four times the paper's settings)")
    args = parser.parse_args(argv)
    try:
        models = [m for m in args.models.split(",") if m]
        check_models(models)
        if args.seeds < 1:
            raise Nar4recError(f"--seeds must be >= 1, not {args.seeds}")
        sizes = sorted(int(s) for s in args.sizes.split(","))
        curves = Curves(label=args.label or _default_label(args.preset, args.sim_set),
                        preset=args.preset, sim_sets=args.sim_set,
                        movielens_dir=args.movielens_dir, data_seed=args.data_seed,
                        seeds=args.seeds,
                        models=models + ([LIST_AWARE] if args.list_aware else []),
                        list_aware=args.list_aware, sets=args.set,
                        list_aware_sets=args.list_aware_set, out=Path(args.out),
                        list_aware_up_to=args.list_aware_up_to)
        folder = curves.out / curves.label
        folder.mkdir(parents=True, exist_ok=True)
        result = {"label": curves.label, "preset": curves.preset, "sim_sets": curves.sim_sets,
                  "data_seed": curves.data_seed, "seeds": curves.seeds,
                  "models": curves.models, "list_aware": curves.list_aware,
                  "protocol": PROTOCOL, "sets": curves.sets,
                  "list_aware_sets": curves.list_aware_sets,
                  "intervals": "95 %, delta method over paired test requests"
                               + (", plus the seeds' spread" if curves.seeds > 1 else ""),
                  "points": []}
        for requests in sizes:
            started = time.perf_counter()
            result["points"].append(measure(
                curves, requests, log=lambda line: print(line, file=sys.stderr, flush=True)))
            result["points"][-1]["seconds"] = round(time.perf_counter() - started, 1)
            write_json(result, folder / "curves.json")
        plot(result, folder / "curves.png")
    except Nar4recError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_tables(result))
    print(f"\nwrote {folder / 'curves.json'} and {folder / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
