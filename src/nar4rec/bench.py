"""Timing: training and inference seconds per batch of any trained run, and the machine's
matrix-multiply peak to compare them with.

Every figure is a median over repeated calls after warm-up calls, measured with
`time.perf_counter` on the current thread settings; the numbers are only comparable within
one run on one machine (say which in any document that quotes them).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from nar4rec.data.loader import RequestBatch
from nar4rec.models.base import ListModel
from nar4rec.models.nar4rec import generator_loss


def seconds_per_call(call: Callable[[], object], *, warmup: int = 2, repeats: int = 5
                     ) -> list[float]:
    """Wall seconds of each of `repeats` calls, after `warmup` calls that are not counted."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def training_step_of(run) -> tuple[nn.Module, Callable]:
    """The module a run trains last and its loss function (NAR4Rec: the generator; an
    evaluator run: the evaluator; a baseline: itself), as `nar4rec.train.train` calls them."""
    if run.model is not None:
        return run.model, ListModel.step
    reranker = run.reranker
    weights = run.space.utility_weights
    if reranker.generator is not None:
        config = reranker.generator.config

        def generator_step(network, batch):
            terms = generator_loss(network(batch), batch, config, weights)
            return terms.total, terms.as_dict()
        return reranker.generator, generator_step
    from nar4rec.models.evaluator import evaluator_loss

    def evaluator_step(network, batch):
        loss = evaluator_loss(network(batch), batch.feedback, batch.exposed_mask)
        return loss, {}
    return reranker.evaluator, evaluator_step


def time_training(module: nn.Module, step: Callable, batch: RequestBatch, *,
                  warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds of one optimisation step (forward, loss, backward, Adam) on `batch`.

    Trains a copy: the module passed in is left as it was.
    """
    import copy

    model = copy.deepcopy(module).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)

    def one_step():
        loss, _ = step(model, batch)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    return statistics.median(seconds_per_call(one_step, warmup=warmup, repeats=repeats))


def time_inference(rerank: Callable[[RequestBatch], object], batch: RequestBatch, *,
                   warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds of `rerank(batch)` without gradients."""
    with torch.no_grad():
        return statistics.median(seconds_per_call(lambda: rerank(batch), warmup=warmup,
                                                  repeats=repeats))


def matmul_gflops(size: int = 1024, *, repeats: int = 10) -> float:
    """The best GFLOP/s of a float32 (size x size) @ (size x size) product on this machine."""
    left, right = torch.randn(size, size), torch.randn(size, size)
    best = min(seconds_per_call(lambda: left @ right, warmup=2, repeats=repeats))
    return 2 * size ** 3 / best / 1e9
