"""Choose contrastive decoding's k and alpha (and DPP's theta) on validation, check on test.

    python benchmarks/decoding_sweep.py --runs runs/dec/kuaishou-{0,1}/run \
        --split valid --json runs/dec/valid-kuaishou.json
    python benchmarks/decoding_sweep.py --runs runs/dec/kuaishou-{7,8}/run --split test \
        --only k=3,alpha=0.6 --json runs/dec/test-kuaishou.json

Each run is a trained NAR4Rec run directory whose data directory (recorded in its run.json)
is simulated. For every request of the split, the generator runs once and its probability
matrix is decoded by: greedy decoding; contrastive decoding at every (k, alpha) of the grid
(k = 0: every candidate, the literal eq. 16); DPP at every theta, with either relevance
(`--dpp-relevance`); and the whole pipeline (proposals + evaluator) at each k. Each list is
scored by the simulator's exact expected utility, and each is paired with greedy decoding over
the same requests: the mean difference with its 95 % interval (requests pooled over the
runs), the mean utility, and the share of requests whose list differs from greedy's.
`--only` restricts the contrastive grid to one setting, for the held-out check.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from nar4rec import decode
from nar4rec.data.loader import RequestLoader
from nar4rec.metrics import list_utility
from nar4rec.reranker import Reranker
from nar4rec.runs import load_run, read_run, split_files
from nar4rec.sim.world import World


def parse_grid(text: str, kind=float) -> list:
    return [kind(v) for v in text.split(",") if v]


@torch.no_grad()
def sweep_run(run_dir: str, split: str, grid: list[tuple[int, float]], thetas: list[float],
              relevances: list[str], pipeline_ks: list[int]) -> dict[str, np.ndarray]:
    """{label: (R,) true utility of each request's list} for one run on one split."""
    run = load_run(run_dir)
    data = read_run(Path(run_dir))["data"]
    world = World.load(data)
    reranker = run.reranker
    generator = reranker.generator
    pipelines = {k: Reranker(generator, reranker.evaluator, reranker.weights,
                             _with_k(reranker.config, k)) for k in pipeline_ks}
    values: dict[str, list[np.ndarray]] = {}

    def add(label: str, batch, lists: torch.Tensor) -> None:
        values.setdefault(label, []).append(list_utility(world, batch, lists))

    for batch in RequestLoader(split_files(data, split), run.space, batch_size=1024):
        out = generator(batch)
        greedy = decode.greedy(out.probs, out.cand_mask)
        add("greedy", batch, greedy)
        add("logging", batch, batch.exposed.masked_fill(~batch.exposed_mask, decode.NO_ITEM))
        for k, alpha in grid:
            add(f"contrastive k={k} alpha={alpha:g}", batch, decode.contrastive(
                out.probs, out.item_repr, out.cand_mask, alpha=alpha, k=k or None))
        for relevance in relevances:
            for theta in thetas:
                add(f"dpp {relevance} theta={theta:g}", batch, decode.dpp(
                    out.probs, out.item_repr, out.cand_mask, theta=theta,
                    relevance=relevance))
        for k, pipeline in pipelines.items():
            add(f"pipeline k={k}", batch, pipeline.choose(batch, out).lists)
    return {label: np.concatenate(parts) for label, parts in values.items()}


def _with_k(config, k: int):
    import dataclasses
    return dataclasses.replace(config, contrastive_k=k)


def summarise(per_run: list[dict[str, np.ndarray]]) -> dict[str, dict]:
    """Each label's mean utility and its difference from greedy, paired, pooled over runs."""
    labels = per_run[0].keys()
    summary = {}
    for label in labels:
        utility = np.concatenate([r[label] for r in per_run])
        difference = np.concatenate([r[label] - r["greedy"] for r in per_run])
        half = 1.96 * difference.std(ddof=1) / np.sqrt(len(difference))
        summary[label] = {
            "utility": float(utility.mean()),
            "vs_greedy": float(difference.mean()),
            "interval": [float(difference.mean() - half), float(difference.mean() + half)],
            "per_run_vs_greedy": [float((r[label] - r["greedy"]).mean()) for r in per_run],
            "differs": float(np.mean(np.abs(difference) > 1e-9)),
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="trained NAR4Rec runs")
    parser.add_argument("--split", default="valid", choices=("valid", "test"))
    parser.add_argument("--ks", default="1,2,3,5,10,0", help="contrastive k (0: all)")
    parser.add_argument("--alphas", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    parser.add_argument("--only", help="one contrastive setting, e.g. k=3,alpha=0.6")
    parser.add_argument("--thetas", default="0.3,0.5,0.7,0.9,0.95,0.99")
    parser.add_argument("--dpp-relevance", default="probability,log")
    parser.add_argument("--pipeline-ks", default="0,2,3,5", help="k of the pipeline's "
                        "contrastive proposals")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    if args.only:
        setting = dict(part.split("=") for part in args.only.split(","))
        grid = [(int(setting["k"]), float(setting["alpha"]))]
    else:
        grid = [(k, a) for k in parse_grid(args.ks, int) for a in parse_grid(args.alphas)]
    per_run = [sweep_run(run, args.split, grid, parse_grid(args.thetas),
                         [r for r in args.dpp_relevance.split(",") if r],
                         parse_grid(args.pipeline_ks, int)) for run in args.runs]
    summary = summarise(per_run)
    Path(args.json).write_text(json.dumps({"runs": args.runs, "split": args.split,
                                           "summary": summary}, indent=1))
    width = max(len(label) for label in summary)
    print(f"{'lists':<{width}}  utility  vs greedy [95 % interval]  differs")
    for label, row in summary.items():
        low, high = row["interval"]
        print(f"{label:<{width}}  {row['utility']:7.3f}  {row['vs_greedy']:+.3f} "
              f"[{low:+.3f}, {high:+.3f}]  {row['differs']:.0%}")


if __name__ == "__main__":
    main()
