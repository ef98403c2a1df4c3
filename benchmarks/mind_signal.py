"""What the baselines learn from the MIND sample: NDCG@10 of the clicks on held-out impressions.

    python benchmarks/mind_signal.py --split impression --out runs/mind-impression
    python benchmarks/mind_signal.py --split day --out runs/mind-day
    python benchmarks/mind_signal.py --models seq2slate --set target=sequence

converts the sample (`nar4rec prepare mind`'s code; `--split day`: the last day is test,
`--split impression`: 10 % of the impressions of every day to valid and 10 % to test), then
scores lists of 10 for the held-out impressions (valid and test; nothing is tuned) that have a
click: random lists (the mean of 16 per impression), the impression's listed order and its
reverse, and each model after `--epochs` of training on the training impressions, with every
impression's candidates shuffled in training and held out (so neither the listed order nor
index tie-breaking helps or hurts). Prints each list's mean NDCG@10 and its paired difference
from the random lists in standard errors, the share of held-out candidates with a known
category and of news unseen in training, and each model's training seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from nar4rec import metrics
from nar4rec.config import load_overrides
from nar4rec.data.batch import UNKNOWN
from nar4rec.data.features import FeatureSpace
from nar4rec.data.loader import RequestLoader
from nar4rec.data.mind import prepare_mind
from nar4rec.models import BASELINES, baseline
from nar4rec.models.base import ListModel, top_m

LENGTH = 10
RANDOM_LISTS = 16


def report(name: str, scores: np.ndarray, random: np.ndarray) -> None:
    difference = scores - random
    error = difference.std(ddof=1) / np.sqrt(len(difference))
    print(f"{name:>22}  NDCG@10 {scores.mean():.3f}  vs random {difference.mean():+.3f} "
          f"({difference.mean() / error:+.1f} standard errors)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", default="../shared/data/mind-sample")
    parser.add_argument("--split", choices=["day", "impression"], default="impression")
    parser.add_argument("--out", default="runs/mind-impression")
    parser.add_argument("--models", default=",".join(BASELINES))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a model setting, for the models that have it, e.g. "
                             "target=sequence (Seq2Slate)")
    args = parser.parse_args()
    torch.manual_seed(0)
    sample, out = Path(args.sample), Path(args.out)
    if not (out / "train.parquet").exists():
        prepare_mind([sample / "behaviors.tsv"], sample / "news.tsv", out, split=args.split)
    space = FeatureSpace.fit([out / "train.parquet"])
    mixer = torch.Generator().manual_seed(0)
    listed = list(RequestLoader(      # candidates in the listed order, as converted
        [p for p in (out / "valid.parquet", out / "test.parquet") if p.exists()], space,
        batch_size=256))
    held_out = [b.shuffled(mixer) for b in listed]
    train = [b.shuffled(mixer) for b in RequestLoader([out / "train.parquet"], space,
                                                       batch_size=64, shuffle=True, seed=0)]
    category = torch.cat([b.cand_cat[..., 1][b.cand_mask] for b in held_out])
    items = torch.cat([b.cand_cat[..., 0][b.cand_mask] for b in held_out])
    print(f"{sum(map(len, train))} training and {sum(map(len, held_out))} held-out "
          f"impressions; held-out candidates with a known category: "
          f"{(category != UNKNOWN).float().mean():.1%}, news unseen in training: "
          f"{(items == UNKNOWN).float().mean():.1%}")
    clicks = [b.candidate_feedback()[..., 0] for b in held_out]
    clicked = [(c.sum(1) > 0).numpy() for c in clicks]
    draws = torch.Generator().manual_seed(1)
    random = np.concatenate([
        np.mean([metrics.list_ndcg(top_m(torch.rand(b.cand_mask.shape, generator=draws),
                                         b.cand_mask, LENGTH), c)
                 for _ in range(RANDOM_LISTS)], axis=0)[k]
        for b, c, k in zip(held_out, clicks, clicked, strict=True)])
    print(f"{'random':>22}  NDCG@10 {random.mean():.3f}  ({len(random)} impressions with a "
          "click)", flush=True)
    for name, sign in (("listed order", -1.0), ("reversed order", 1.0)):
        lists = [top_m(sign * torch.arange(b.cand_mask.shape[1]).float().expand(len(b), -1),
                       b.cand_mask, LENGTH) for b in listed]
        report(name, np.concatenate([metrics.list_ndcg(x, b.candidate_feedback()[..., 0])[k]
                                     for x, b, k in zip(lists, listed, clicked, strict=True)]),
               random)
    for name in [m for m in args.models.split(",") if m]:
        model_class, config_class = baseline(name)
        fields = {f.name for f in dataclasses.fields(config_class)}
        config = load_overrides(config_class(list_length=LENGTH), None,
                                [item for item in args.set if item.split("=")[0] in fields])
        model = model_class(config, space).train()
        optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
        start = time.perf_counter()
        for _ in range(args.epochs):
            for batch in train:
                loss, _ = ListModel.step(model, batch)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        seconds = time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            scores = np.concatenate([metrics.list_ndcg(model.rerank(b).lists, c)[k] for b, c, k
                                     in zip(held_out, clicks, clicked, strict=True)])
        report(f"{name} ({seconds:.0f} s)", scores, random)


if __name__ == "__main__":
    main()
