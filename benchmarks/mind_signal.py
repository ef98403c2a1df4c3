"""What a reranker can learn from the MIND sample: NDCG@10 of clicks on its test days.

    python benchmarks/mind_signal.py --sample ../shared/data/mind-sample --out runs/mind \
        --models dnn,dcn,prm --epochs 1

converts the sample (`nar4rec prepare-mind`'s code), then scores lists of 10 for the test
impressions that have a click: random lists, the impression's listed order and its reverse,
and each model trained on the training days, with every impression's candidates shuffled in
training and test (so neither the listed order nor index tie-breaking helps or hurts). Prints
each list's mean NDCG@10 and its paired difference from the random lists in standard errors,
and how many test candidates have a known category and how many are news unseen in training.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from nar4rec.data.loader import UNKNOWN, FeatureSpace, RequestBatch, RequestLoader
from nar4rec.data.mind import prepare_mind
from nar4rec.models import baseline
from nar4rec.models.base import ListModel, top_m

LENGTH = 10


def clicks_by_candidate(batch: RequestBatch) -> torch.Tensor:
    """(B, n) each candidate's logged click (every candidate is shown in MIND)."""
    clicks = batch.feedback[..., 0] * batch.exposed_mask                # (B, M)
    return torch.zeros(batch.cand_mask.shape).scatter(1, batch.exposed, clicks)


def ndcg_at_10(lists: torch.Tensor, clicks: torch.Tensor) -> torch.Tensor:
    """(B,) NDCG@10 of each list (B, L) of candidate indices against the clicks (B, n)."""
    discount = 1.0 / torch.log2(torch.arange(lists.shape[1]) + 2.0)
    discount[10:] = 0.0
    gains = clicks.gather(1, lists.clamp_min(0)) * (lists >= 0)
    ideal = clicks.sort(dim=1, descending=True).values[:, :lists.shape[1]]
    return (gains * discount).sum(1) / (ideal * discount[:ideal.shape[1]]).sum(1)


def report(name: str, scores: list[torch.Tensor], random: list[torch.Tensor]) -> None:
    mine, chance = torch.cat(scores), torch.cat(random)
    difference = mine - chance
    error = difference.std() / np.sqrt(len(difference))
    print(f"{name:>18}  NDCG@10 {mine.mean():.3f}  vs random {difference.mean():+.3f} "
          f"({difference.mean() / error:+.1f} standard errors)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", default="../shared/data/mind-sample")
    parser.add_argument("--out", default="runs/mind")
    parser.add_argument("--models", default="dnn,dcn,prm")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    sample, out = Path(args.sample), Path(args.out)
    if not (out / "train.parquet").exists():
        prepare_mind([sample / "behaviors.tsv"], sample / "news.tsv", out)
    space = FeatureSpace.fit([out / "train.parquet"])
    test = list(RequestLoader([out / "test.parquet"], space, batch_size=256))
    category = torch.cat([b.cand_cat[..., 1][b.cand_mask] for b in test])
    items = torch.cat([b.cand_cat[..., 0][b.cand_mask] for b in test])
    print(f"test candidates with a known category: {(category != UNKNOWN).float().mean():.1%};"
          f" news unseen in training: {(items == UNKNOWN).float().mean():.1%}")
    generator = torch.Generator().manual_seed(1)
    clicks = [clicks_by_candidate(b) for b in test]
    clicked = [c.sum(1) > 0 for c in clicks]
    random = [ndcg_at_10(top_m(torch.rand(b.cand_mask.shape, generator=generator),
                               b.cand_mask, LENGTH), c)[k]
              for b, c, k in zip(test, clicks, clicked, strict=True)]
    print(f"{'random':>18}  NDCG@10 {torch.cat(random).mean():.3f}")
    for name, sign in (("listed order", -1.0), ("reversed order", 1.0)):
        lists = [top_m(sign * torch.arange(b.cand_mask.shape[1]).float().expand(len(b), -1),
                       b.cand_mask, LENGTH) for b in test]
        report(name, [ndcg_at_10(x, c)[k] for x, c, k in zip(lists, clicks, clicked,
                                                               strict=True)], random)
    mixer = torch.Generator().manual_seed(0)
    train = [b.shuffled(mixer) for b in RequestLoader([out / "train.parquet"], space,
                                                       batch_size=64, shuffle=True, seed=0)]
    mixed = [b.shuffled(mixer) for b in test]
    for name in [m for m in args.models.split(",") if m]:
        model_class, config_class = baseline(name)
        model = model_class(config_class(list_length=LENGTH), space).train()
        optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(args.epochs):
            for batch in train:
                loss, _ = ListModel.step(model, batch)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        model.eval()
        with torch.no_grad():
            scores = [ndcg_at_10(model.rerank(b).lists, clicks_by_candidate(b))[k]
                      for b, k in zip(mixed, clicked, strict=True)]
        report(f"{name} (shuffled)", scores, random)


if __name__ == "__main__":
    main()
