"""Off-policy estimators against the simulator's truth: bias, RMSE, coverage, rank correlation.

    python benchmarks/ope_validation.py --preset kuaishou --runs runs/curves/kuaishou/n20000/seed0 \
        --data-seed 0 --requests 100000 --temperatures 1.0,0.3 --chunks 10 --out runs/ope
    # movielens: also --movielens-dir ../shared/data/ml-100k

The runs (every folder of --runs with a run.json: one per model, trained on the first 20,000
requests of the same world, data seed --data-seed) are the target policies. For each logging
temperature, the world is simulated again with the same seed and --requests requests, its
logging policy at that temperature (`logging_temperature`); its test split (the last 10 %,
requests no run was trained on) is cut into --chunks equal parts, each an independent log.
On each part, `nar4rec ope`'s estimators estimate each run's value and the simulator gives
its true value on the same requests. Per estimator and temperature, over parts and runs:

    bias        mean of (estimate - truth)
    RMSE        root mean square of (estimate - truth)
    coverage    share of the 95 % intervals that hold the truth
    rank        Spearman correlation between the estimates and the truths across the runs
                (per part, then averaged over the parts)

and the logging policy's own observed value beside its truth. The direct method and
Cascade-DR of every run use one reward model, --reward-model's. With --explore, the true cost of
exploring (`exploration.explore`: epsilon mixing with the upstream order) for each run at each
epsilon, on the first part. The pseudo-inverse costs an eigendecomposition of an (n m)^2
matrix per request: --pi-chunks limits it to the first parts.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from nar4rec import metrics
from nar4rec.config import load_overrides
from nar4rec.data.loader import RequestLoader
from nar4rec.evaluation import world_of
from nar4rec.exploration import Exploration, explore
from nar4rec.io import atomic_file
from nar4rec.offpolicy import ope_run
from nar4rec.ope import ESTIMATORS
from nar4rec.runs import load_run
from nar4rec.sim.presets import preset_config
from nar4rec.sim.simulate import simulate
from nar4rec.sim.world import TRUTH_DIR


def logs(preset: str, seed: int, requests: int, temperature: float, chunks: int,
         movielens_dir: str | None, out: Path, sim_sets: list[str]) -> list[Path]:
    """The test split of a simulation at `temperature`, cut into `chunks` data directories
    (each with a link to the world's truth); reused when present."""
    root = out / f"{preset}-seed{seed}-t{temperature:g}"
    parts = [root / f"part{j}" for j in range(chunks)]
    if all((p / "test.parquet").exists() for p in parts):
        return parts
    sets = [*sim_sets, f"logging_temperature={temperature}"]
    if preset == "movielens":
        sets.append(f"movielens_dir={movielens_dir}")
    config = load_overrides(preset_config(preset), None, sets)
    data = root / "data"
    if not (data / "test.parquet").exists():
        simulate(config, requests, seed, data, overwrite=True, progress=False)
    table = pq.read_table(data / "test.parquet")
    bounds = np.linspace(0, table.num_rows, chunks + 1).astype(int)
    for j, part in enumerate(parts):
        part.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.slice(bounds[j], bounds[j + 1] - bounds[j]), part / "test.parquet")
        if not (part / TRUTH_DIR).exists():
            (part / TRUTH_DIR).symlink_to((data / TRUTH_DIR).resolve())
    return parts


def exploration_cost(run: Path, part: Path, epsilons: list[float]) -> dict[str, float]:
    """True utility of the run's lists and of its exploring policy at each epsilon."""
    loaded = load_run(run)
    world = world_of(part)
    rng = np.random.default_rng(0)
    totals = {"model": [], **{f"{e:g}": [] for e in epsilons}}
    for batch in RequestLoader([part / "test.parquet"], loaded.space, batch_size=1024):
        lists = loaded.system.rerank(batch).lists
        totals["model"].append(metrics.behaviour_means(world, batch, lists) @ world.weights)
        for e in epsilons:
            shown = explore(lists.numpy(), batch.upstream_score.numpy(),
                            batch.cand_mask.numpy(), Exploration(epsilon=e, samples=16), rng)
            totals[f"{e:g}"].append(metrics.behaviour_means(world, batch, shown.lists)
                                    @ world.weights)
    return {name: float(np.concatenate(values).mean()) for name, values in totals.items()}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation with tied values sharing their average rank; nan when either side
    is constant (an estimator that says 0 for every run orders nothing)."""
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan

    def ranks(x: np.ndarray) -> np.ndarray:
        values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        ends = np.cumsum(counts)
        return ((ends - (counts - 1) / 2.0) - 1)[inverse]

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def summarise(records: list[dict], runs: list[str]) -> dict:
    """Per estimator: bias, RMSE, coverage over every (part, run), mean rank correlation."""
    table = {}
    for name in ESTIMATORS:
        rows = [r for r in records if r["estimator"] == name and r["estimate"] is not None]
        if not rows:
            continue
        errors = np.array([r["estimate"] - r["truth"] for r in rows])
        covered = np.array([r["low"] <= r["truth"] <= r["high"] for r in rows])
        by_part: dict[int, list] = {}
        for r in rows:
            by_part.setdefault(r["part"], []).append(r)
        ranks = [spearman(np.array([r["estimate"] for r in group]),
                          np.array([r["truth"] for r in group]))
                 for group in by_part.values() if len(group) == len(runs)]
        table[name] = {"bias": float(errors.mean()), "rmse": float(np.sqrt((errors ** 2).mean())),
                       "coverage": float(covered.mean()),
                       "rank": float(np.nanmean(ranks)) if ranks else math.nan,
                       "estimates": len(rows),
                       "median_ess": float(np.median([r["ess"] for r in rows
                                                      if r["ess"] is not None] or [math.nan]))}
    return table


def plot(result: dict, preset: str, out: Path) -> None:
    """Each estimator's errors (estimate - truth) over every (part, run), per temperature, on
    a symmetric log scale (whole-list weights make some errors thousands)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nar4rec.report import save_figure

    keys = [k for k in result if "summary" in result[k]]
    figure, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 3.8), squeeze=False)
    for axis, key in zip(axes[0], keys, strict=True):
        records = result[key]["records"]
        names = [n for n in ESTIMATORS if any(r["estimator"] == n and r["estimate"] is not None
                                               for r in records)]
        errors = [[r["estimate"] - r["truth"] for r in records
                   if r["estimator"] == n and r["estimate"] is not None] for n in names]
        axis.boxplot(errors, showfliers=True)
        axis.set_xticks(range(1, len(names) + 1), names, rotation=30)
        axis.set_yscale("symlog", linthresh=1.0)
        axis.axhline(0, color="black", lw=0.8)
        axis.set_ylabel("estimate - truth (utility per request)")
        axis.set_title(f"{preset}, logging temperature {key[1:]}")
        axis.grid(axis="y", alpha=0.3)
    save_figure(figure, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True)
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--temperatures", default="1.0,0.3")
    parser.add_argument("--chunks", type=int, default=10)
    parser.add_argument("--pi-chunks", type=int, default=None)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--explore", default="0.05,0.1,0.2")
    parser.add_argument("--movielens-dir", default="../shared/data/ml-100k")
    parser.add_argument("--reward-model", default="nar4rec",
                        help="the folder of --runs whose click model every run's direct "
                             "method and Cascade-DR use (default %(default)s; absent: each "
                             "run's own where it has one)")
    parser.add_argument("--sim-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a simulator setting the runs' data was simulated with")
    parser.add_argument("--out", type=Path, default=Path("runs/ope"))
    parser.add_argument("--plot", type=Path, help="also draw the errors into this PNG")
    args = parser.parse_args()
    runs = sorted(p for p in args.runs.iterdir() if (p / "run.json").exists())
    reward = args.runs / args.reward_model
    reward = reward if (reward / "run.json").exists() else None
    result_file = args.out / f"{args.preset}-seed{args.data_seed}.json"
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    for temperature in [float(t) for t in args.temperatures.split(",")]:
        key = f"t{temperature:g}"
        parts = logs(args.preset, args.data_seed, args.requests, temperature, args.chunks,
                     args.movielens_dir, args.out, args.sim_set)
        records = result.setdefault(key, {}).setdefault("records", [])
        logging = result[key].setdefault("logging", [])
        done = {(r["part"], r["run"]) for r in records}
        for j, part in enumerate(parts):
            estimators = tuple(e for e in ESTIMATORS if e != "pi"
                               or args.pi_chunks is None or j < args.pi_chunks)
            for run in runs:
                if (j, run.name) in done:
                    continue
                report = ope_run(run, part, estimators=estimators, samples=args.samples,
                                 reward_model=reward)
                truth = report["truth"]["model"]["utility"]
                for name, e in report["estimates"].items():
                    records.append({"part": j, "run": run.name, "estimator": name,
                                    "truth": truth, "estimate": e["utility"],
                                    "low": e["utility_low"], "high": e["utility_high"],
                                    "ess": e["ess"], "skipped": e["skipped"]})
                if run == runs[0]:
                    logging.append({"part": j, "observed": report["logged"]["utility"],
                                    "low": report["logged"]["utility_low"],
                                    "high": report["logged"]["utility_high"],
                                    "truth": report["truth"]["logged"]["utility"]})
                print(f"{key} part {j} {run.name}: truth {truth:.3f}, " + ", ".join(
                    f"{n} {e['utility']:.3f}" for n, e in report["estimates"].items()
                    if e["utility"] is not None), flush=True)
                with atomic_file(result_file) as tmp:
                    tmp.write_text(json.dumps(result, indent=1) + "\n")
        result[key]["summary"] = summarise(records, [r.name for r in runs])
        if args.explore and "exploration" not in result[key]:
            epsilons = [float(e) for e in args.explore.split(",")]
            result[key]["exploration"] = {run.name: exploration_cost(run, parts[0], epsilons)
                                          for run in runs}
        with atomic_file(result_file) as tmp:
            tmp.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\n{args.preset}, logging temperature {temperature:g}: "
              f"{len(parts)} parts x {len(runs)} runs")
        print("| estimator | bias | RMSE | 95 % coverage | rank correlation | median ESS |")
        print("|---|---|---|---|---|---|")
        for name, s in result[key]["summary"].items():
            print(f"| {name} | {s['bias']:+.3f} | {s['rmse']:.3f} | {s['coverage']:.2f} | "
                  f"{s['rank']:.2f} | {s['median_ess']:.0f} |")
    if args.plot:
        plot(result, args.preset, args.plot)


if __name__ == "__main__":
    main()
