"""One training loop for every model: Adam, validation each epoch, early stopping, checkpoints
that describe themselves, resuming a killed run, and DDP when started by torchrun.

The loop knows nothing about a model but its `loss(model, batch) -> (loss, logs)` function, so
NAR4Rec, its evaluator and every baseline train the same way. Under `torchrun
--nproc-per-node N` each rank reads its own share of the row groups (`RequestLoader(rank=...,
world_size=...)`), gradients are averaged by DistributedDataParallel (gloo on CPU, NCCL on GPU),
every rank takes the same number of steps per epoch, and only rank 0 writes.

A run killed at any point resumes from its last checkpoint exactly as if it had not stopped:
the checkpoint holds the weights, Adam's moments, the step counters, the running sums of the
epoch in progress and of the steps.jsonl window, and each step draws its random numbers
(dropout, sampled lists) from a seed of (seed, global step); the loader replays the epoch's
shuffle and skips the batches already trained on; records written after the checkpoint are
dropped from metrics.jsonl and steps.jsonl, which the resumed run writes again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from nar4rec.data.batch import RequestBatch
from nar4rec.data.loader import RequestLoader
from nar4rec.errors import Nar4recError
from nar4rec.io import atomic_file

LossFn = Callable[[nn.Module, RequestBatch], tuple[torch.Tensor, dict[str, float]]]
LAST = "last.pt"
BEST = "best.pt"
METRICS = "metrics.jsonl"
STEPS = "steps.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; the paper's defaults: Adam, learning rate 1e-3 (section 5.1)."""

    epochs: int = 10
    batch_size: int = 256          # the paper's Kuaishou size; Avito: config.DATASET_SETTINGS
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 5.0         # max gradient norm; 0 turns clipping off
    patience: int = 2              # epochs without a better validation loss before stopping
    seed: int = 0
    steps_per_epoch: int = 0       # 0: the whole training split every epoch
    checkpoint_every: int = 0      # steps between mid-epoch checkpoints; 0: at epoch ends only
    threads: int = 0               # torch intra-op threads; 0: torch's default
    log_every: int = 20            # steps between training-curve records in steps.jsonl
                                   # (and at each epoch's end); 0: off


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str) -> torch.device:
    """"auto": CUDA when torch sees a GPU, else the CPU; otherwise the device named."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Nar4recError("--device cuda, but torch sees no CUDA device here")
    return device


def distributed_context() -> DistributedContext:
    """Join the process group when started by torchrun (WORLD_SIZE > 1), else run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext(device=resolve_device("auto"))
    rank = int(os.environ["RANK"])
    # one GPU per process, or none: with fewer GPUs than processes on this node (torchrun's
    # LOCAL_WORLD_SIZE) every rank trains on the CPU, since all ranks must share a backend
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_world:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    else:
        if torch.cuda.is_available():
            print(f"nar4rec: rank {rank}: {torch.cuda.device_count()} GPU(s) for "
                  f"{local_world} processes on this node; training on the CPU (gloo). Every "
                  "node must see as many GPUs as processes, or none.", file=sys.stderr)
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistributedContext(rank=rank, world_size=world_size, device=device)


@dataclass
class TrainResult:
    epochs_run: int
    best_epoch: int
    best_valid_loss: float
    stopped_early: bool
    seconds: float


def train(model: nn.Module, loss_fn: LossFn, train_loader: RequestLoader,
          valid_loader: RequestLoader | None, config: TrainConfig, run_dir: str | Path, *,
          describe: dict, resume: bool = False,
          context: DistributedContext | None = None, progress: bool | None = None,
          ) -> TrainResult:
    """Train `model` in place; checkpoints and metrics.jsonl go to `run_dir`.

    Args:
        describe: what a checkpoint needs to rebuild the model alone (model name, its config,
            the FeatureSpace as a dict): saved with the weights in every checkpoint.
        resume: continue from run_dir/last.pt if it exists (a killed run restarts there).
    """
    context = context or DistributedContext()
    run_dir = Path(run_dir)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    model.to(context.device)
    # fused: one pass over each parameter per step instead of several (the embedding tables
    # make the step memory-bound on CPU).
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate,
                                 weight_decay=config.weight_decay, fused=True)
    # progress: the counters, and the running sums of the epoch in progress (per rank) and
    # of rank 0's steps.jsonl window, with a digest of each of its batches' request ids
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_valid_loss": math.inf,
             "best_epoch": -1, "bad_epochs": 0, "epoch_loss_sums": [], "epoch_requests": [],
             "window_loss_sum": 0.0, "window_requests": 0, "window_batches": []}
    if resume and (run_dir / LAST).exists():
        checkpoint = load_checkpoint(run_dir / LAST)
        model.load_state_dict(checkpoint["model"])
        optimiser.load_state_dict(checkpoint["optimiser"])
        state.update(checkpoint["progress"])
        torch.set_rng_state(checkpoint["torch_rng"])
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume:                 # what a killed run wrote after its checkpoint is redone
            _keep_records(run_dir / METRICS, lambda r: r["epoch"] < state["epoch"])
            _keep_records(run_dir / STEPS, lambda r: r["step"] <= state["global_step"])
    network = nn.parallel.DistributedDataParallel(model) if context.active else model
    started = time.perf_counter()
    stopped_early = False

    def save(name: str) -> None:
        if context.is_main:
            save_checkpoint(run_dir / name, model, describe, optimiser=optimiser,
                            progress=dict(state))

    while state["epoch"] < config.epochs:
        epoch = state["epoch"]
        train_loader.set_epoch(epoch)
        steps = _steps_this_epoch(train_loader, config, context)
        skip = state["step_in_epoch"]
        total, count = _epoch_sums_of_rank(state, context)
        window, window_count = state["window_loss_sum"], state["window_requests"]
        window_batches = list(state["window_batches"])
        network.train()
        bar = tqdm(total=steps, initial=skip, desc=f"epoch {epoch}", unit="batch",
                   disable=(not context.is_main) or (None if progress is None else not progress))
        # resumed mid-epoch: the loader skips the batches already trained on
        for index, batch in enumerate(train_loader.batches(skip), start=skip):
            if index >= steps:
                break
            torch.manual_seed(config.seed * 1_000_003 + state["global_step"])
            loss, _ = loss_fn(network, batch.to(context.device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimiser.step()
            total += float(loss.detach()) * len(batch)
            count += len(batch)
            window += float(loss.detach()) * len(batch)
            window_count += len(batch)
            state["global_step"] += 1
            state["step_in_epoch"] = index + 1
            bar.update(1)
            bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
            if config.log_every:
                if context.is_main:
                    window_batches.append(batch_digest(batch))
                if state["global_step"] % config.log_every == 0 or index + 1 == steps:
                    if context.is_main:       # rank 0's own share: a curve, not a metric
                        _append_metrics(run_dir / STEPS, {
                            "epoch": epoch, "step": state["global_step"],
                            "train_loss": window / max(window_count, 1),
                            "batches": window_batches})
                    window, window_count, window_batches = 0.0, 0, []
            if config.checkpoint_every and state["global_step"] % config.checkpoint_every == 0:
                sums = _gather(total, count, context)
                state.update(epoch_loss_sums=[s for s, _ in sums],
                             epoch_requests=[n for _, n in sums], window_loss_sum=window,
                             window_requests=window_count, window_batches=list(window_batches))
                save(LAST)
        bar.close()
        train_loss = _mean_over_ranks(total, count, context)
        valid_loss = evaluate_loss(network, loss_fn, valid_loader, context) \
            if valid_loader is not None else train_loss
        improved = valid_loss < state["best_valid_loss"] - 1e-6
        if improved:
            state.update(best_valid_loss=valid_loss, best_epoch=epoch, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        state.update(epoch=epoch + 1, step_in_epoch=0, epoch_loss_sums=[], epoch_requests=[],
                     window_loss_sum=0.0, window_requests=0, window_batches=[])
        if context.is_main:
            _append_metrics(run_dir / METRICS, {
                "epoch": epoch, "step": state["global_step"], "train_loss": train_loss,
                "valid_loss": valid_loss, "best_epoch": state["best_epoch"],
                "seconds": round(time.perf_counter() - started, 3)})
            if bar.disable and progress is not False:   # no terminal (a log file): a line
                print(f"{run_dir.name}: epoch {epoch}: train loss {train_loss:.4f}, valid "
                      f"loss {valid_loss:.4f}{' (best so far)' if improved else ''}, "
                      f"{time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        if improved:
            save(BEST)
        save(LAST)
        if state["bad_epochs"] >= config.patience:
            stopped_early = True
            break
    return TrainResult(epochs_run=state["epoch"], best_epoch=state["best_epoch"],
                       best_valid_loss=state["best_valid_loss"], stopped_early=stopped_early,
                       seconds=time.perf_counter() - started)


@torch.no_grad()
def evaluate_loss(model: nn.Module, loss_fn: LossFn, loader: RequestLoader,
                  context: DistributedContext | None = None) -> float:
    """Mean loss per request over a loader (over every rank's share under DDP)."""
    context = context or DistributedContext()
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        loss, _ = loss_fn(model, batch.to(context.device))
        total += float(loss) * len(batch)
        count += len(batch)
    model.train(was_training)
    return _mean_over_ranks(total, count, context)


def _steps_this_epoch(loader: RequestLoader, config: TrainConfig,
                      context: DistributedContext) -> int:
    """Batches every rank takes this epoch: the fewest any rank has (DDP needs equal steps)."""
    steps = math.ceil(loader.num_rows / loader.batch_size)
    if config.steps_per_epoch:
        steps = min(steps, config.steps_per_epoch)
    if context.active:
        tensor = torch.tensor([steps], device=context.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        steps = int(tensor.item())
    if steps == 0:
        raise Nar4recError(
            "a rank has no training rows this epoch: write the training data in more row "
            "groups (or more files) than there are ranks")
    return steps


def batch_digest(batch: RequestBatch) -> str:
    """16 hex digits naming a batch's request ids in order: steps.jsonl's record of which
    requests each step trained on (`batches`, one digest per step of the record's window)."""
    ids = np.asarray(batch.request_id).astype(str)
    return hashlib.blake2b(ids.tobytes(), digest_size=8).hexdigest()


def _gather(total: float, count: int, context: DistributedContext) -> list[tuple[float, int]]:
    """Every rank's (total, count), in rank order (float64: exact)."""
    if not context.active:
        return [(total, count)]
    mine = torch.tensor([total, float(count)], dtype=torch.float64, device=context.device)
    every = [torch.empty_like(mine) for _ in range(context.world_size)]
    dist.all_gather(every, mine)
    return [(float(t[0]), int(t[1])) for t in every]


def _epoch_sums_of_rank(state: dict, context: DistributedContext) -> tuple[float, int]:
    """This rank's loss sum and request count so far in the epoch, from a checkpoint's
    per-rank sums; resumed on another number of ranks, rank 0 takes them all."""
    sums, counts = state["epoch_loss_sums"], state["epoch_requests"]
    if len(sums) == context.world_size:
        return sums[context.rank], counts[context.rank]
    return (math.fsum(sums), sum(counts)) if context.is_main else (0.0, 0)


def _mean_over_ranks(total: float, count: int, context: DistributedContext) -> float:
    if context.active:
        tensor = torch.tensor([total, float(count)], dtype=torch.float64, device=context.device)
        dist.all_reduce(tensor)
        total, count = float(tensor[0]), int(tensor[1])
    return total / count if count else math.nan


def _append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _keep_records(path: Path, keep: Callable[[dict], bool]) -> None:
    """Rewrite a JSON-lines file with only the records `keep` accepts (a killed run's last
    line may be cut short: it goes too)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if keep(record):
            kept.append(line + "\n")
    with atomic_file(path) as tmp:
        tmp.write_text("".join(kept))


def save_checkpoint(path: Path, model: nn.Module, describe: dict, *,
                    optimiser: torch.optim.Optimizer | None = None,
                    progress: dict | None = None) -> None:
    """Weights, the description that rebuilds the model, and training progress; atomic."""
    payload = {"model": model.state_dict(), "describe": describe,
               "torch_rng": torch.get_rng_state()}
    if optimiser is not None:
        payload["optimiser"] = optimiser.state_dict()
    if progress is not None:
        payload["progress"] = progress
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by `save_checkpoint`, loaded with weights_only=True."""
    path = Path(path)
    if not path.exists():
        raise Nar4recError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say so in one line
        raise Nar4recError(f"{path}: not a readable nar4rec checkpoint ({exc})") from None
