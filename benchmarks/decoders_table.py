"""The paper's Table 7 on the simulator: NAR4Rec's generator under each decoder, over seeds.

    python benchmarks/decoders_table.py --runs runs/dec/kuaishou-{0,1,7,8}/run
    python benchmarks/decoders_table.py --runs ... --set reranker.contrastive_k=0 \
        --set reranker.contrastive_alpha=0.6        # the literal eq. 16 at the paper's alpha

Each run is a trained NAR4Rec run on simulated data (each its own seed, data and test split).
`nar4rec evaluate` scores every decoder's lists on the test split with the simulator's exact
expected utility (`generator_*` variants; the pipeline is the run's own lists). The table
gives each decoder's captured lift (mean over runs, range in brackets) and its true utility
minus greedy decoding's, paired over the same test requests and pooled over the runs, with a
95 % interval (normal approximation; the runs' requests are distinct).
"""

from __future__ import annotations

import argparse

import numpy as np

from nar4rec.config import parse_sets
from nar4rec.evaluation import evaluate_run
from nar4rec.metrics import captured_lift
from nar4rec.runs import read_run

ROWS = {"generator_greedy": "greedy", "generator_contrastive": "contrastive",
        "generator_beam": "beam search", "generator_top_k": "top-k sampling",
        "generator_dpp": "DPP", "nar4rec": "pipeline (proposals + evaluator)",
        "evaluator_top_m": "evaluator's item-wise top m", "logging": "logging policy"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="reranker settings for the decoders, e.g. reranker.contrastive_k=0")
    args = parser.parse_args()
    sets = parse_sets(args.set)
    lifts: dict[str, list[float]] = {name: [] for name in ROWS}
    differences: dict[str, list[np.ndarray]] = {name: [] for name in ROWS}
    for run in args.runs:
        report = evaluate_run(run, read_run(run)["data"], split="test", sets=sets,
                              per_request=True)
        weights = np.array(list(report["utility_weights"].values()))
        utility = {name: counts @ weights for name, counts in report["per_request"].items()}
        for name in ROWS:
            lifts[name].append(captured_lift(utility[name].mean(), utility["logging"].mean(),
                                             utility["oracle"].mean()))
            differences[name].append(utility[name] - utility["generator_greedy"])
    print(f"Table 7 over {len(args.runs)} runs" + (f" ({', '.join(args.set)})" if args.set
                                                   else ""))
    print("\n| lists | captured lift | utility - greedy [95 % interval] |\n|---|---|---|")
    for name, label in ROWS.items():
        lift = np.array(lifts[name])
        pooled = np.concatenate(differences[name])
        half = 1.96 * pooled.std(ddof=1) / np.sqrt(len(pooled))
        print(f"| {label} | {lift.mean():.3f} ({lift.min():.3f} - {lift.max():.3f}) | "
              f"{pooled.mean():+.3f} [{pooled.mean() - half:+.3f}, {pooled.mean() + half:+.3f}] |")


if __name__ == "__main__":
    main()
