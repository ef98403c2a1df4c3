"""NAR4Rec on the simulator, over presets and seeds: the figures of docs/results.md.

For every preset and seed: simulate, train NAR4Rec (evaluator, then the generator with
unlikelihood training), train a second generator with vanilla (likelihood) training that reuses
the same evaluator, evaluate both on the test split, and sweep the contrastive-decoding weight
alpha. Finished steps are kept, so an interrupted run continues where it stopped.

    python benchmarks/nar4rec_results.py --presets kuaishou,movielens --seeds 0,1,2 \
        --movielens-dir ../shared/data/ml-100k --out runs/results

writes runs/results/results.json and prints the Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nar4rec import decode
from nar4rec.config import PAPER_SETTINGS, RunConfig, dataset_settings, load_overrides
from nar4rec.data.loader import RequestLoader
from nar4rec.evaluation import evaluate_run
from nar4rec.metrics import list_utility
from nar4rec.runs import load_run, read_run, split_files, train_run
from nar4rec.sim.presets import preset_config
from nar4rec.sim.simulate import simulate
from nar4rec.sim.world import World

ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ROWS = [  # (label, objective, variant)
    ("logging policy", "unlikelihood", "logging"),
    ("evaluator: item-wise top m", "unlikelihood", "evaluator_top_m"),
    ("generator, greedy (unlikelihood)", "unlikelihood", "generator_greedy"),
    ("generator, contrastive (unlikelihood)", "unlikelihood", "generator_contrastive"),
    ("NAR4Rec: generator + evaluator (unlikelihood)", "unlikelihood", "nar4rec"),
    ("generator, greedy (vanilla)", "likelihood", "generator_greedy"),
    ("generator, contrastive (vanilla)", "likelihood", "generator_contrastive"),
    ("NAR4Rec: generator + evaluator (vanilla)", "likelihood", "nar4rec"),
    ("oracle", "unlikelihood", "oracle"),
]


def finished(run: Path) -> bool:
    try:
        info = read_run(run)
    except Exception:
        return False
    return {"evaluator", "generator"} <= set(info["phases"])


@torch.no_grad()
def alpha_sweep(run: Path, data: Path) -> dict[str, float]:
    """Mean true utility of the generator's contrastive lists at each alpha (cosine, the
    default candidate set k)."""
    loaded = load_run(run)
    world = World.load(data)
    totals = dict.fromkeys(ALPHAS, 0.0)
    count = 0
    for batch in RequestLoader(split_files(data, "test"), loaded.space, batch_size=1024):
        out = loaded.reranker.generator(batch)
        for alpha in ALPHAS:
            lists = decode.contrastive(out.probs, out.item_repr, out.cand_mask, alpha=alpha)
            totals[alpha] += float(list_utility(world, batch, lists).sum())
        count += len(batch)
    return {f"{alpha:.1f}": total / count for alpha, total in totals.items()}


def one_seed(preset: str, seed: int, args, sets: list[str]) -> dict:
    base = Path(args.out) / f"{preset}-{seed}"
    data = base / "data"
    if not (data / "summary.json").exists():
        overrides = [f"movielens_dir={args.movielens_dir}"] if preset == "movielens" else []
        config = load_overrides(preset_config(preset), None, overrides)
        simulate(config, args.requests, seed, data, overwrite=True, progress=False)
    record = {"preset": preset, "seed": seed, "runs": {}}
    for objective in ("unlikelihood", "likelihood"):
        run = base / objective
        if not finished(run):
            config = load_overrides(RunConfig(), args.config, [
                f"train.seed={seed}", f"evaluator_train.seed={seed}",
                f"generator.objective={objective}", *sets],
                defaults={**dataset_settings(data), **PAPER_SETTINGS})   # the paper's NAR4Rec
            started = time.perf_counter()
            train_run(data, run, config=config, overwrite=True, progress=False,
                      reuse=None if objective == "unlikelihood"
                      else {"evaluator": base / "unlikelihood"})
            print(f"{preset} seed {seed} {objective}: trained in "
                  f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        evaluation = evaluate_run(run, data)
        evaluation["alpha_sweep"] = alpha_sweep(run, data)
        evaluation["phases"] = read_run(run)["phases"]
        record["runs"][objective] = evaluation
    return record


def table(records: list[dict], preset: str) -> str:
    """Mean (min - max over seeds) true utility and captured lift of every row."""
    mine = [r for r in records if r["preset"] == preset]
    seeds = ", ".join(str(r["seed"]) for r in mine)
    lines = [f"### {preset} (seeds {seeds}; mean over seeds, range in brackets)", "",
             "| lists | true utility | captured lift |", "|---|---|---|"]
    for label, objective, variant in ROWS:
        values = [r["runs"][objective]["variants"][variant] for r in mine]
        utility = np.array([v["utility"] for v in values])
        lift = np.array([v.get("captured_lift", np.nan) for v in values])
        lines.append(f"| {label} | {utility.mean():.3f} ({utility.min():.3f} - "
                     f"{utility.max():.3f}) | {lift.mean():.3f} ({lift.min():.3f} - "
                     f"{lift.max():.3f}) |")
    lines += ["", "Contrastive decoding alone (generator, unlikelihood training), true utility "
              "by alpha (0 = greedy):", "",
              "| alpha | " + " | ".join(f"{a:.1f}" for a in ALPHAS) + " |",
              "|---|" + "---|" * len(ALPHAS)]
    sweep = np.array([[r["runs"]["unlikelihood"]["alpha_sweep"][f"{a:.1f}"] for a in ALPHAS]
                      for r in mine]).mean(0)
    lines.append("| utility | " + " | ".join(f"{v:.3f}" for v in sweep) + " |")
    metric_names = ("recall@6", "recall@10", "logloss")
    lines += ["", "| offline metric (unlikelihood run) | " + " | ".join(metric_names) + " |",
              "|---|" + "---|" * len(metric_names)]
    offline = [[r["runs"]["unlikelihood"]["metrics"].get(k, np.nan) for k in metric_names]
               for r in mine]
    lines.append("| mean over seeds | " + " | ".join(f"{v:.4f}" for v in np.mean(offline, 0))
                 + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="kuaishou,movielens")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--movielens-dir", default="../shared/data/ml-100k")
    parser.add_argument("--out", default="runs/results")
    parser.add_argument("--config", help="TOML file of RunConfig settings")
    parser.add_argument("--set", action="append", default=[], help="RunConfig key=value")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for preset in args.presets.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            records.append(one_seed(preset, seed, args, args.set))
            (out / "results.json").write_text(json.dumps(records, indent=1))
    for preset in args.presets.split(","):
        print(table(records, preset))
        print()


if __name__ == "__main__":
    main()
