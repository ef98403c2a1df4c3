"""Why NAR4Rec does what it does on simulated data: the diagnostic figures of docs/results.md.

    python benchmarks/nar4rec_diagnostics.py --run runs/results/kuaishou-0/unlikelihood \
        --data runs/results/kuaishou-0/data

prints, on the test split: the true utility of lists sorted by the upstream score and by the
true affinity; the best of the pipeline's proposals chosen with the truth; the candidate
representations' cosine similarities and the probability matrix's peaks; contrastive decoding
with the model's, the simulator's own and a topic one-hot similarity; and how much of the true
affinity the observed features explain (least squares, training split).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from nar4rec import decode
from nar4rec.data.loader import RequestLoader
from nar4rec.metrics import list_utility
from nar4rec.reranker import RerankerConfig, propose
from nar4rec.runs import load_run, split_files
from nar4rec.sim.world import World

ALPHAS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)


def mean(values: list[np.ndarray]) -> float:
    return float(np.concatenate(values).mean())


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--data", required=True)
    args = parser.parse_args()
    run, world = load_run(args.run), World.load(args.data)
    generator, m = run.reranker.generator, run.info["list_length"]
    sampled = RerankerConfig(alphas=(0.0,), samples=16, sample_k=10, temperature=0.5)
    sums: dict[str, list[np.ndarray]] = {}
    peaks, cosines, top_cosines = [], [], []

    def add(name: str, batch, lists) -> None:
        sums.setdefault(name, []).append(list_utility(world, batch, lists))

    for batch in RequestLoader(split_files(args.data, "test"), run.space, batch_size=1000):
        items = np.where(batch.item_id >= 0, batch.item_id, 0)
        upstream = batch.upstream_score.masked_fill(~batch.cand_mask, -torch.inf)
        add("top m by upstream score", batch, upstream.topk(m, 1).indices)
        affinity = torch.tensor(world.affinity(batch.user_id.astype(np.int64), items))
        add("top m by true affinity", batch, affinity.masked_fill(
            ~batch.cand_mask, -torch.inf).topk(m, 1).indices)
        add("logging policy", batch, batch.exposed.masked_fill(~batch.exposed_mask, -1))
        add("NAR4Rec pipeline", batch, run.reranker.rerank(batch).lists)
        out = generator(batch)
        for label, config in (("NAR4Rec's proposals", run.config.reranker),
                              ("greedy + 16 samples (k 10, t 0.5)", sampled)):
            proposals = propose(out.probs, out.item_repr, out.cand_mask, config)
            truth = np.stack([list_utility(world, batch, proposals[:, k])
                              for k in range(proposals.shape[1])], axis=1)
            sums.setdefault(f"best of {label}, chosen with the truth", []).append(
                truth.max(1))
        peaks.append(out.probs.max(1).values.numpy())                   # (B, m)
        unit = F.normalize(out.item_repr, dim=-1)
        cos = unit @ unit.transpose(1, 2)                                # (B, n, n)
        pair = batch.cand_mask[:, :, None] & batch.cand_mask[:, None, :] & \
            ~torch.eye(cos.shape[1], dtype=torch.bool)
        cosines.append(cos[pair].numpy())
        top = out.probs[:, :, 0].topk(m, 1).indices
        top_cos = cos.gather(1, top[:, :, None].expand(-1, -1, cos.shape[2])).gather(
            2, top[:, None, :].expand(-1, m, -1))
        top_cosines.append(top_cos[:, ~torch.eye(m, dtype=torch.bool)].numpy())
        topic_column = list(run.space.cand_cat).index("topic") \
            if "topic" in run.space.cand_cat else None
        similarities = {"model's representations": out.item_repr,
                        "simulator's similarity vectors":
                            torch.tensor(world.item_embedding[items]).float()}
        if topic_column is not None:
            similarities["topic one-hot"] = F.one_hot(
                batch.cand_cat[..., topic_column],
                run.space.cand_cat["topic"].size).float()
        for name, vectors in similarities.items():
            for alpha in ALPHAS:
                add(f"contrastive, {name}, alpha {alpha}", batch, decode.contrastive(
                    out.probs, vectors, out.cand_mask, alpha=alpha))
    for name, values in sums.items():
        print(f"{mean(values):8.3f}  {name}")
    peak = np.concatenate(peaks).mean(0)
    print("largest probability of a position, by position: "
          + ", ".join(f"{p:.3f}" for p in peak))
    all_cos = np.concatenate(cosines)
    print(f"cosine between two candidates: mean {all_cos.mean():.3f}, sd {all_cos.std():.3f}; "
          f"among the {m} most probable at position 1: {np.concatenate(top_cosines).mean():.3f}")
    explained(run, world, args.data)


def explained(run, world: World, data) -> None:
    """Share of the true affinity's variance that least squares on the features explains."""
    space = run.space
    batch = next(iter(RequestLoader(split_files(data, "train"), space, batch_size=8000)))
    items = np.where(batch.item_id >= 0, batch.item_id, 0)
    target = world.affinity(batch.user_id.astype(np.int64), items)        # (B, n)
    real = batch.cand_mask.numpy()
    n = target.shape[1]
    upstream = batch.upstream_score.numpy()[..., None]
    item = batch.cand_num.numpy()
    user = np.repeat(batch.user_num.numpy()[:, None, :], n, axis=1)
    products = (user[..., :, None] * item[..., None, :]).reshape(*item.shape[:2], -1)

    def r2(x: np.ndarray) -> float:
        x = np.concatenate([x[real], np.ones((real.sum(), 1))], axis=1)
        y = target[real]
        weights, *_ = np.linalg.lstsq(x, y, rcond=None)
        return 1.0 - (y - x @ weights).var() / y.var()

    print(f"variance of the true affinity explained: upstream score {r2(upstream):.3f}; "
          f"+ item numeric features {r2(np.concatenate([upstream, item], -1)):.3f}; "
          f"+ user numeric features and all user x item products "
          f"{r2(np.concatenate([upstream, item, user, products], -1)):.3f}")


if __name__ == "__main__":
    main()
