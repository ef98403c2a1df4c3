"""How well NAR4Rec's evaluator chooses lists, on simulated data (docs/results.md).

    python benchmarks/evaluator_choice.py --run runs/compare/movielens-runs/seed0/nar4rec \
        --data runs/compare/movielens-data --split valid [--evaluator OTHER_RUN]

prints the true utility of: the logging policy; the evaluator's item-wise top m; the pipeline
(the generator's proposals, the evaluator's choice); the generator's greedy list; the
evaluator's own greedy search in context (each position takes the candidate that maximises
the evaluator's utility for the list so far: m batched evaluator calls over all candidates);
the evaluator's choice among all of these; the truth's choice among them; and the mean
correlation, within a request, between the evaluator's and the true utility of these lists.
When the evaluator has redundancy inputs (`evaluator.similarity_heads`, `shared_values`), also
the generator's lists decoded alone by eq. 16 with the evaluator's learned similarity
(`reranker.evaluator_alphas`) at each of EVALUATOR_ALPHAS.
`--evaluator` swaps in the evaluator of another run trained on the same data (for example one
trained with `--set evaluator.causal=true`).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from nar4rec import decode
from nar4rec.data.batch import RequestBatch
from nar4rec.data.loader import RequestLoader
from nar4rec.metrics import list_utility
from nar4rec.reranker import Reranker
from nar4rec.runs import load_run, split_files
from nar4rec.sim.world import World

EVALUATOR_ALPHAS = (0.01, 0.02, 0.05, 0.1, 0.2)


def evaluator_greedy(reranker: Reranker, batch: RequestBatch, m: int) -> torch.Tensor:
    """(B, m) lists built position by position by the evaluator's utility in context."""
    size, n = batch.cand_mask.shape
    lists = torch.zeros(size, 0, dtype=torch.long)
    used = ~batch.cand_mask.clone()
    rows = torch.arange(size)
    for k in range(m):
        trial = torch.cat([lists[:, None, :].expand(size, n, k),
                           torch.arange(n).expand(size, n)[:, :, None]], dim=2)  # (B, n, k + 1)
        utility = reranker.item_utility(batch, trial).sum(-1).masked_fill(used, -torch.inf)
        pick = utility.argmax(1)                                                 # (B,)
        pick = torch.where(torch.isfinite(utility.max(1).values), pick, -1)      # none left
        lists = torch.cat([lists, pick[:, None]], dim=1)
        used[rows, pick.clamp_min(0)] |= pick >= 0
    return lists


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="valid")
    parser.add_argument("--evaluator", help="a run whose evaluator replaces --run's")
    args = parser.parse_args()
    run, world = load_run(args.run), World.load(args.data)
    reranker, m = run.reranker, run.info["list_length"]
    if args.evaluator:
        reranker.evaluator = load_run(args.evaluator).reranker.evaluator
    sums: dict[str, list[np.ndarray]] = {}
    for batch in RequestLoader(split_files(args.data, args.split), run.space, batch_size=500):
        out = reranker.generator(batch)
        chosen = reranker.choose(batch, out)
        proposals = chosen.proposals                                             # (B, K, m)
        lists = {"logging policy": batch.exposed.masked_fill(~batch.exposed_mask, -1),
                 "evaluator: item-wise top m": reranker.evaluator_top_m(batch).lists,
                 "NAR4Rec pipeline": chosen.lists,
                 "generator, greedy": proposals[:, 0],
                 "evaluator: greedy search in context": evaluator_greedy(reranker, batch, m)}
        alone = {}                                  # scored, not added to the pool below
        if reranker.evaluator.redundancy is not None:
            pairwise = reranker.evaluator.candidate_similarity(batch)
            for alpha in EVALUATOR_ALPHAS:
                alone[f"generator, eq. 16 with the evaluator's similarity, alpha {alpha}"] = (
                    decode.contrastive(out.probs, None, batch.cand_mask, alpha=alpha,
                                       pairwise=pairwise))
        for name, placed in {**lists, **alone}.items():
            sums.setdefault(name, []).append(list_utility(world, batch, placed))
        pool = torch.cat([proposals, *(lists[k][:, None] for k in list(lists)[1:])], dim=1)
        judged = reranker.item_utility(batch, pool).sum(-1).numpy()             # (B, P)
        truth = np.stack([list_utility(world, batch, pool[:, k])
                          for k in range(pool.shape[1])], axis=1)               # (B, P)
        rows = np.arange(len(truth))
        sums.setdefault("all of the above and the proposals: evaluator's choice", []).append(
            truth[rows, judged.argmax(1)])
        sums.setdefault("all of the above and the proposals: truth's choice", []).append(
            truth.max(1))
        j, t = judged - judged.mean(1, keepdims=True), truth - truth.mean(1, keepdims=True)
        sums.setdefault("correlation of evaluator and truth within a request", []).append(
            (j * t).sum(1) / np.sqrt((j ** 2).sum(1) * (t ** 2).sum(1) + 1e-12))
    for name, values in sums.items():
        print(f"{np.concatenate(values).mean():8.3f}  {name}")


if __name__ == "__main__":
    main()
