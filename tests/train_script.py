"""A tiny training run for tests, also launched under torchrun by test_train.py.

    python tests/train_script.py DATA_DIR RUN_DIR EPOCHS [--resume]

Trains a small evaluator with the shared loop and writes a digest of the final weights to
RUN_DIR/weights-rank{RANK}.txt so that ranks can be compared.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

from nar4rec.data.features import FeatureSpace
from nar4rec.data.loader import RequestLoader
from nar4rec.models.evaluator import Evaluator, EvaluatorConfig, evaluator_loss
from nar4rec.train import TrainConfig, distributed_context, train


def evaluator_task(model, batch):
    logits = model(batch)
    return evaluator_loss(logits, batch.feedback, batch.exposed_mask), {}


def main(data: Path, run: Path, epochs: int, resume: bool) -> None:
    torch.set_num_threads(1)
    context = distributed_context()
    space = FeatureSpace.fit([data / "train.parquet"])
    torch.manual_seed(0)
    model = Evaluator(EvaluatorConfig(d_model=16, heads=2, dropout=0.0), space)
    loaders = [RequestLoader([data / f"{split}.parquet"], space, batch_size=64,
                             shuffle=split == "train", seed=1, rank=context.rank,
                             world_size=context.world_size) for split in ("train", "valid")]
    config = TrainConfig(epochs=epochs, batch_size=64, patience=10, seed=1)
    train(model, evaluator_task, loaders[0], loaders[1], config, run,
          describe={"model": "evaluator", "space": space.to_dict()}, resume=resume,
          context=context, progress=False)
    digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes()
                                     for p in model.parameters())).hexdigest()
    run.mkdir(parents=True, exist_ok=True)
    (run / f"weights-rank{context.rank}.txt").write_text(digest)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), "--resume" in sys.argv)
