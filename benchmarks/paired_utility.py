"""True utility of one system's lists minus another's, paired over the same test requests.

    python benchmarks/paired_utility.py --data runs/compare/kuaishou-data \
        --runs runs/exp/cmp-red/kuaishou-runs/seed{0,1,2}/nar4rec \
        --against runs/exp/base3/kuaishou-runs/seed{0,1,2}/prm --set reranker.evaluator_top_m=true
    python benchmarks/paired_utility.py --data ... --runs ... --variant evaluator_top_m

Each run of --runs is paired with the run of --against at the same place (a seed each), or
with one of its own variants (`nar4rec evaluate`'s: evaluator_top_m, generator_greedy,
logging, ...). Prints every pair's mean difference with its standard error over requests,
then all pairs pooled with a 95 % interval (the requests repeat across seeds, so the pooled
interval is somewhat narrow), and the share of requests where the lists differ in utility.
`--set` applies to the runs of --runs only (reranker settings, which training does not read).
"""

from __future__ import annotations

import argparse

import numpy as np

from nar4rec.config import parse_sets
from nar4rec.evaluation import evaluate_run


def utilities(run: str, data: str, sets: dict | None = None
              ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(R,) true utility of each test request's list: the run's lists, and each variant's."""
    report = evaluate_run(run, data, split="test", sets=sets, per_request=True)
    weights = np.array(list(report["utility_weights"].values()))
    values = {name: counts @ weights for name, counts in report["per_request"].items()}
    model = "evaluator_top_m" if report["model"] == "evaluator" else report["model"]
    return values[model], values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="simulated data (its test split is used)")
    parser.add_argument("--runs", nargs="+", required=True)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--against", nargs="+", help="one run per run of --runs")
    target.add_argument("--variant", help="a variant of the same run, e.g. evaluator_top_m")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.against and len(args.against) != len(args.runs):
        parser.error("--against needs as many runs as --runs")
    sets = parse_sets(args.set)
    differences = []
    for k, run in enumerate(args.runs):
        ours, variants = utilities(run, args.data, sets)
        if args.variant:
            theirs, label = variants[args.variant], args.variant
        else:
            theirs, label = utilities(args.against[k], args.data)[0], args.against[k]
        difference = ours - theirs
        differences.append(difference)
        print(f"{run} - {label}: {difference.mean():+.4f} "
              f"(standard error {difference.std(ddof=1) / np.sqrt(len(difference)):.4f})")
    pooled = np.concatenate(differences)
    half = 1.96 * pooled.std(ddof=1) / np.sqrt(len(pooled))
    print(f"pooled over {len(differences)} pair(s), {len(pooled)} requests: "
          f"{pooled.mean():+.4f}, 95 % interval [{pooled.mean() - half:+.4f}, "
          f"{pooled.mean() + half:+.4f}]; different utility in "
          f"{np.mean(np.abs(pooled) > 1e-6):.0%} of the requests")


if __name__ == "__main__":
    main()
