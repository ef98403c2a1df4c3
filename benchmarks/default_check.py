"""NAR4Rec's default against every baseline and against the paper's settings, on held-out
test splits, paired over requests.

    python benchmarks/default_check.py --splits kuaishou-7 kuaishou-8 movielens-7 movielens-8 \
        avito-7 avito-8 --data-root runs/dec --runs runs/gen runs/gen24 --json runs/gen24/test.json

For each split NAME, the data are DATA_ROOT/NAME/data and the runs every directory
RUNS/NAME/<model>/ of each --runs root: "nar4rec" (the default), "nar4rec_paper"
(configs/paper.toml) and every run of one of the six baselines (other runs are ignored). Every
run's lists are scored on the test split by the simulator's exact expected utility
(`evaluation.evaluate_run`). Per split and pooled per preset (the splits' requests
together): each run's captured lift, and NAR4Rec's utility minus the best baseline's (the
baseline with the highest mean utility on that split, picked on test, which favours the
baselines) and minus the paper settings', with a 95 % interval over requests (normal
approximation of the paired differences).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from nar4rec.evaluation import evaluate_run
from nar4rec.io import atomic_file
from nar4rec.registry import BASELINES
from nar4rec.runs import read_run

DEFAULT, PAPER = "nar4rec", "nar4rec_paper"


def per_request(run: Path, data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(R,) true utility of the run's lists, of the logging policy's and of the oracle's."""
    report = evaluate_run(run, data, split="test", per_request=True)
    weights = np.array(list(report["utility_weights"].values()))
    lists = {name: counts @ weights for name, counts in report["per_request"].items()}
    model = "evaluator_top_m" if report["model"] == "evaluator" else report["model"]
    return lists[model], lists["logging"], lists["oracle"]


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    difference = a - b
    half = 1.96 * difference.std(ddof=1) / math.sqrt(len(difference))
    return {"difference": float(difference.mean()),
            "ci95": [float(difference.mean() - half), float(difference.mean() + half)]}


def lift(utility: np.ndarray, logging: np.ndarray, oracle: np.ndarray) -> float:
    return float((utility - logging).mean() / (oracle - logging).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--splits", nargs="+", required=True)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--runs", nargs="+", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    splits = {}
    for name in args.splits:
        data = args.data_root / name / "data"
        runs = {run.name: run for root in args.runs for run in sorted((root / name).glob("*"))
                if (run / "run.json").exists() and (
                    run.name in (DEFAULT, PAPER) or read_run(run)["model"] in BASELINES)}
        scored = {model: per_request(run, data) for model, run in runs.items()}
        splits[name] = scored
    presets: dict[str, list[str]] = {}
    for name in splits:
        presets.setdefault(name.rsplit("-", 1)[0], []).append(name)
    groups = {name: [name] for name in splits} | {
        f"{preset} (pooled)": names for preset, names in presets.items() if len(names) > 1}
    result = {}
    print("| split | best baseline | its lift | paper's settings | default | default - best "
          "baseline [95 %] | default - paper [95 %] |")
    print("|---|---|---|---|---|---|---|")
    for label, names in groups.items():
        models = set.intersection(*(set(splits[n]) for n in names))
        joined = {model: [np.concatenate([splits[n][model][k] for n in names])
                          for k in range(3)] for model in models}
        # the best baseline of each split, its requests joined over the group's splits
        best = {n: max((m for m in splits[n] if not m.startswith(DEFAULT)),
                       key=lambda m, n=n: splits[n][m][0].mean()) for n in names}
        best_utility = np.concatenate([splits[n][best[n]][0] for n in names])
        logging, oracle = joined[DEFAULT][1], joined[DEFAULT][2]
        row = {"best_baseline": sorted(set(best.values())),
               "lift": {m: lift(joined[m][0], logging, oracle) for m in models},
               "best_baseline_lift": lift(best_utility, logging, oracle),
               "default_vs_best": paired(joined[DEFAULT][0], best_utility),
               "default_vs_paper": paired(joined[DEFAULT][0], joined[PAPER][0]),
               "requests": len(logging)}
        result[label] = row
        vs_best, vs_paper = row["default_vs_best"], row["default_vs_paper"]
        print(f"| {label} | {', '.join(row['best_baseline'])} | "
              f"{row['best_baseline_lift']:.3f} | {row['lift'][PAPER]:.3f} | "
              f"{row['lift'][DEFAULT]:.3f} | {vs_best['difference']:+.4f} "
              f"[{vs_best['ci95'][0]:+.4f}, {vs_best['ci95'][1]:+.4f}] | "
              f"{vs_paper['difference']:+.4f} [{vs_paper['ci95'][0]:+.4f}, "
              f"{vs_paper['ci95'][1]:+.4f}] |")
    if args.json:
        with atomic_file(args.json) as tmp:
            Path(tmp).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
