"""Inference replayed from CUDA graphs, for small batches on a GPU.

On a GPU a request or a few are reranked in well under a millisecond of kernel time, but the
pipeline launches several hundred small kernels (the generator's layers, m decoding steps per
proposal family, the evaluator), and launching them one by one from Python costs far more than
running them (`nar4rec bench --device cuda`, docs/benchmarks.md). A CUDA graph records the
launches once and replays them with one call (PyTorch's `torch.cuda.graph`; NVIDIA's CUDA
programming guide, "CUDA Graphs").

A graph holds fixed shapes and fixed memory: `CudaGraphed` keeps one graph per input shape
(batch size, candidates, feature counts), captured the first time a shape is seen; every later
call copies the batch into that graph's input tensors, replays it and copies the outputs out.
Pad requests to a few fixed shapes (say n = 60 candidates, batch 1 or 8) to keep the number of
graphs small. Results are the eager call's: the same kernels run on the same numbers (a test
checks lists and scores against eager calls). A call that synchronises with the host (reads a
tensor's value in Python) cannot be captured; the capture then fails with PyTorch's error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from nar4rec.data.loader import RequestBatch
from nar4rec.errors import Nar4recError
from nar4rec.export import FEATURE_INPUTS
from nar4rec.reranker import Reranker


@dataclasses.dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: RequestBatch           # the static batch the graph reads
    outputs: object                # the static tensors the graph writes


class CudaGraphed:
    """`call(batch)` on a CUDA device, replayed from captured graphs, one per input shape.

    Args:
        call: batch -> a tensor, a dataclass of tensors (or None) or a tuple of tensors;
            it must read only the batch's feature tensors (`export.FEATURE_INPUTS`), which
            inference does, and must not synchronise with the host.
        device: the CUDA device `call`'s model lives on.
        warmup: eager calls on a side stream before a capture (lets cuBLAS and the caching
            allocator settle, as PyTorch's CUDA-graph notes ask).
        max_graphs: how many shapes are kept; past that, the oldest graph is dropped.
    """

    def __init__(self, call: Callable[[RequestBatch], object], device: torch.device | str, *,
                 warmup: int = 3, max_graphs: int = 16):
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise Nar4recError(f"CUDA graphs need the model on a CUDA device, not "
                               f"{self.device}")
        self.call, self.warmup, self.max_graphs = call, warmup, max_graphs
        self.graphs: dict[tuple, _Graph] = {}

    @torch.no_grad()
    def __call__(self, batch: RequestBatch):
        """`call(batch)` (the batch's tensors on any device), its outputs on this device."""
        key = tuple((name, tuple(getattr(batch, name).shape), getattr(batch, name).dtype)
                    for name in FEATURE_INPUTS)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(batch, key)
        for name in FEATURE_INPUTS:
            getattr(entry.inputs, name).copy_(getattr(batch, name), non_blocking=True)
        entry.graph.replay()
        return _cloned(entry.outputs)

    def _capture(self, batch: RequestBatch, key: tuple) -> _Graph:
        inputs = batch.to(self.device)
        inputs = dataclasses.replace(inputs, **{name: getattr(inputs, name).clone()
                                                for name in FEATURE_INPUTS})
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.call(inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.call(inputs)
        if len(self.graphs) >= self.max_graphs:
            self.graphs.pop(next(iter(self.graphs)))
        self.graphs[key] = entry = _Graph(graph, inputs, outputs)
        return entry


def _cloned(outputs):
    """A copy of a graph's outputs that the next replay will not overwrite."""
    if isinstance(outputs, torch.Tensor):
        return outputs.clone()
    if isinstance(outputs, tuple):
        return tuple(_cloned(value) for value in outputs)
    if dataclasses.is_dataclass(outputs):
        return dataclasses.replace(outputs, **{
            field.name: _cloned(getattr(outputs, field.name))
            for field in dataclasses.fields(outputs) if field.init})
    return outputs                                                  # None and plain values


class GraphedReranker(CudaGraphed):
    """`Reranker.rerank` on a CUDA device, replayed from captured graphs: the same answers as
    `reranker.rerank(batch)`, with one launch per call instead of several hundred."""

    def __init__(self, reranker: Reranker, *, warmup: int = 3, max_graphs: int = 16):
        module = reranker.generator or reranker.evaluator
        super().__init__(reranker.rerank, next(module.parameters()).device, warmup=warmup,
                         max_graphs=max_graphs)
        self.reranker = reranker

    @property
    def list_length(self) -> int:
        return self.reranker.list_length

    def rerank(self, batch: RequestBatch):
        return self(batch)
