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
`GraphedReranker(buckets=True)` (what `nar4rec serve --device cuda` uses) pads each batch to a
power-of-two number of requests and a multiple of 16 candidates, so that a service sees a few
graphs, not one per request size; padding changes no real request's answer (masked
candidates are never placed, and each request is decoded and scored on its own).

Results are the eager call's: the same kernels run on the same numbers (a test checks lists and
scores against eager calls). A call that synchronises with the host (reads a tensor's value in
Python) cannot be captured; the capture then fails with PyTorch's error.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch

from nar4rec.data.batch import RequestBatch
from nar4rec.errors import Nar4recError
from nar4rec.system import FEATURE_INPUTS, Reranked, System


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
        warmup: eager calls on a side stream before a capture (at least 1: lets cuBLAS, the
            caching allocator and the decoders' per-device constants settle, as PyTorch's
            CUDA-graph notes ask).
        max_graphs: how many shapes are kept; past that, the least recently used graph is
            dropped.
    """

    def __init__(self, call: Callable[[RequestBatch], object], device: torch.device | str, *,
                 warmup: int = 3, max_graphs: int = 16):
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise Nar4recError(f"CUDA graphs need the model on a CUDA device, not "
                               f"{self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if warmup < 1 or max_graphs < 1:
            raise ValueError("CUDA graphs need warmup >= 1 and max_graphs >= 1")
        self.call, self.warmup, self.max_graphs = call, warmup, max_graphs
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()

    @torch.no_grad()
    def __call__(self, batch: RequestBatch):
        """`call(batch)` (the batch's tensors on any device), its outputs on this device."""
        key = tuple((name, tuple(getattr(batch, name).shape), getattr(batch, name).dtype)
                    for name in FEATURE_INPUTS)
        with torch.cuda.device(self.device):      # capture and replay on the model's GPU
            entry = self.graphs.get(key)
            if entry is None:
                entry = self._capture(batch, key)
            self.graphs.move_to_end(key)
            for name in FEATURE_INPUTS:
                getattr(entry.inputs, name).copy_(getattr(batch, name), non_blocking=True)
            entry.graph.replay()
            return _cloned(entry.outputs)

    def evicted(self, key: tuple) -> None:
        """Called with the key of each graph dropped to make room."""

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
        while len(self.graphs) >= self.max_graphs:
            old, _ = self.graphs.popitem(last=False)
            self.evicted(old)
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
    """A system's `rerank` (`system.System`, or NAR4Rec's `Reranker`) on a CUDA device,
    replayed from captured graphs: the same answers as `system.rerank(batch)`, with one
    launch per call instead of several hundred.

    buckets: pad each batch to `bucket_shape` first (fewer, reused graphs; the answers are
        cut back to the batch's own requests). The first batch of a new candidate width
        captures the graphs of every batch size up to `max_batch` for it at once, so that a
        service under load does not pause to capture (about 50 ms each); when a width's graph
        is dropped to make room (`max_graphs`, least recently used first), the width is
        captured whole again the next time it is seen.
    """

    def __init__(self, reranker: System, *, buckets: bool = False, max_batch: int = 64,
                 warmup: int = 3, max_graphs: int = 64):
        module = next(iter(reranker.modules.values())) if isinstance(reranker, System) \
            else reranker.generator or reranker.evaluator
        super().__init__(reranker.rerank, next(module.parameters()).device, warmup=warmup,
                         max_graphs=max_graphs)
        self.reranker, self.buckets, self.max_batch = reranker, buckets, max_batch
        self.widths: set[int] = set()

    @property
    def list_length(self) -> int:
        return self.reranker.list_length

    def evicted(self, key: tuple) -> None:
        width = dict((name, shape) for name, shape, _ in key)["cand_mask"][1]
        self.widths.discard(width)

    def rerank(self, batch: RequestBatch) -> Reranked:
        if not self.buckets:
            return self(batch)
        rows, width = bucket_shape(len(batch), batch.cand_mask.shape[1])
        if width not in self.widths:                    # capture every batch size for it
            self.widths.add(width)
            first = dataclasses.replace(batch, **{
                field.name: getattr(batch, field.name)[:1] for field in dataclasses.fields(batch)
                if getattr(batch, field.name) is not None})
            largest = bucket_shape(self.max_batch, 1)[0]
            for size in (1 << k for k in range(largest.bit_length())):
                self(pad_batch(first, size, width))
        out = self(pad_batch(batch, rows, width))
        return Reranked(*(getattr(out, field.name)[:len(batch)]
                          for field in dataclasses.fields(Reranked)))


def bucket_shape(rows: int, width: int, *, step: int = 16) -> tuple[int, int]:
    """The padded (requests, candidates) of a batch: the next power of two, the next multiple
    of `step`."""
    return 1 << max(rows - 1, 0).bit_length(), -(-max(width, 1) // step) * step


def pad_batch(batch: RequestBatch, rows: int, width: int) -> RequestBatch:
    """`batch` grown to `rows` requests (copies of its first) and `width` candidate slots
    (masked: no features, never placed); the real requests' answers do not change. The
    logging policy (`RequestBatch.logging`), which inference never reads, is left out."""
    extra_rows, extra_width = rows - len(batch), width - batch.cand_mask.shape[1]
    if extra_rows < 0 or extra_width < 0:
        raise ValueError(f"cannot pad a batch of {len(batch)} x {batch.cand_mask.shape[1]} "
                         f"to {rows} x {width}")
    padded = {}
    for field in dataclasses.fields(batch):
        value = getattr(batch, field.name)
        if value is None or field.name == "logging":
            padded[field.name] = None
            continue
        if field.name in _CANDIDATE_AXIS and extra_width:
            value = _pad_axis(value, 1, extra_width, fill=_CANDIDATE_AXIS[field.name])
        if extra_rows:
            value = _pad_axis(value, 0, extra_rows, fill=None)
        padded[field.name] = value
    return RequestBatch(**padded)


# fields with a candidate axis (axis 1) and what a padded slot holds (None: a copy of slot 0)
_CANDIDATE_AXIS = {"cand_cat": 0, "cand_num": 0.0, "upstream_score": 0.0, "cand_mask": False,
                   "item_id": None}


def _pad_axis(value, axis: int, extra: int, *, fill):
    """`value` (tensor or array) with `extra` slices appended on `axis`: `fill`, or copies of
    the first slice when fill is None."""
    first = value[:1] if axis == 0 else value[:, :1]
    reps = [1] * value.ndim
    reps[axis] = extra
    if isinstance(value, torch.Tensor):
        block = first.repeat(*reps) if fill is None else torch.full_like(first, fill).repeat(
            *reps)
        return torch.cat([value, block], dim=axis)
    block = np.tile(first, reps)
    if fill is not None:
        block[...] = fill
    return np.concatenate([value, block], axis=axis)
