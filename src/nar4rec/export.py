"""A trained run as ONNX models, for serving without PyTorch.

`export_run(run, out)` writes every graph of the run's system (`System.graphs`):

    system.onnx      (user_cat, user_num, cand_cat, cand_num, upstream_score, cand_mask)
                     -> list (B, m), item_scores (B, m), utility (B,): what the system's
                     `rerank` returns, in one graph (NAR4Rec: the generator, the reranker's
                     proposals, the evaluator and the choice; a baseline: its scoring and its
                     list construction, beam search included)
    generator.onnx   NAR4Rec: the six inputs -> probs (B, n, m), item_repr (B, n, d), which
                     every decoder of `nar4rec.decode` reads
    evaluator.onnx   NAR4Rec: the six inputs, lists (B, L, m), list_mask (B, L, m)
                     -> logits (B, L, m, K)
    manifest.json    the inputs and outputs with their dtypes and axes, the list length m,
                     the behaviours and their utility weights, the run's settings, and the
                     FeatureSpace (vocabularies, numeric scaling) that turns raw requests into
                     the inputs

with the batch size B, the candidate count n and the number of lists L dynamic. A graph the
exporter cannot hold ends the export with a one-line reason (the PyTorch service, `nar4rec
serve --run`, still answers). `OnnxReranker` answers with the system graph, one onnxruntime
call per batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nar4rec.errors import Nar4recError
from nar4rec.io import atomic_dir
from nar4rec.runs import load_run
from nar4rec.system import FEATURE_INPUTS, Graph, batch_of

LIST_INPUTS = ("lists", "list_mask")
FORMAT = 3                       # 3: the system graph (system.onnx) for every model
OPSET = 18
MANIFEST = "manifest.json"
QUIET_LOGGERS = ("torch.onnx", "onnx_ir", "onnxscript")


class GeneratorGraph(nn.Module):
    """The generator with plain tensor inputs: -> (probs, item_repr)."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, user_cat, user_num, cand_cat, cand_num, upstream_score, cand_mask):
        out = self.generator(batch_of(user_cat, user_num, cand_cat, cand_num, upstream_score,
                                      cand_mask))
        return out.probs, out.item_repr


class EvaluatorGraph(nn.Module):
    """The evaluator with plain tensor inputs: -> logits (B, L, m, K)."""

    def __init__(self, evaluator: nn.Module):
        super().__init__()
        self.evaluator = evaluator

    def forward(self, user_cat, user_num, cand_cat, cand_num, upstream_score, cand_mask,
                lists, list_mask):
        return self.evaluator(batch_of(user_cat, user_num, cand_cat, cand_num, upstream_score,
                                       cand_mask), lists, list_mask)


def example_inputs(space, batch: int = 2, n: int = 7, m: int = 3, lists: int = 2,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Random valid inputs of the given sizes (the last candidates of row 0 padded)."""
    generator = torch.Generator().manual_seed(seed)
    user_sizes = [v.size for v in space.user_cat.values()]
    cand_sizes = [v.size for v in space.cand_cat.values()]
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[0, max(1, n - 2):] = False
    cand_cat = torch.stack([torch.randint(1, size, (batch, n), generator=generator)
                            for size in cand_sizes], dim=-1) * mask.unsqueeze(-1)
    inputs = {
        "user_cat": torch.stack([torch.randint(1, size, (batch,), generator=generator)
                                 for size in user_sizes], dim=-1),
        "user_num": torch.randn(batch, len(space.user_num), generator=generator),
        "cand_cat": cand_cat,
        "cand_num": torch.randn(batch, n, len(space.cand_num), generator=generator) * mask[
            ..., None],
        "upstream_score": torch.randn(batch, n, generator=generator) * mask,
        "cand_mask": mask,
    }
    order = torch.rand(batch, lists, n, generator=generator).masked_fill(~mask[:, None], 2)
    inputs["lists"] = order.argsort(dim=-1)[..., :m]
    inputs["list_mask"] = torch.ones(batch, lists, m, dtype=torch.bool)
    return inputs


def _axes(names: tuple[str, ...]) -> dict[str, dict[int, str]]:
    axes = {"user_cat": {0: "batch"}, "user_num": {0: "batch"},
            "cand_cat": {0: "batch", 1: "candidates"}, "cand_num": {0: "batch", 1: "candidates"},
            "upstream_score": {0: "batch", 1: "candidates"},
            "cand_mask": {0: "batch", 1: "candidates"},
            "lists": {0: "batch", 1: "lists"}, "list_mask": {0: "batch", 1: "lists"},
            "probs": {0: "batch", 1: "candidates"}, "item_repr": {0: "batch", 1: "candidates"},
            "logits": {0: "batch", 1: "lists"},
            "list": {0: "batch"}, "item_scores": {0: "batch"}, "utility": {0: "batch"}}
    return {name: axes[name] for name in names}


def _export(module: nn.Module, inputs: dict[str, torch.Tensor], outputs: tuple[str, ...],
            path: Path) -> None:
    names = tuple(inputs)
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:           # the exporter's progress and notes; failures still raise
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), tuple(inputs.values()), str(path),
                              input_names=names, output_names=outputs,
                              dynamic_axes=_axes(names + outputs), opset_version=OPSET,
                              dynamo=True, verbose=False)
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_run(run_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> dict:
    """Write every graph of the run's system (system.onnx first) and manifest.json."""
    run = load_run(run_dir)
    system, space = run.system, run.space
    m = run.info["list_length"]
    inputs = _tracing_inputs(space, m)
    manifest = {
        "format": FORMAT, "model": run.info["model"], "list_length": m,
        "behaviours": list(space.behaviours),
        "utility_weights": [float(w) for w in space.utility_weights],
        "settings": {name: dataclasses.asdict(getattr(run.config, name))
                     for name in system.sections},
        "opset": OPSET,
        "inputs": {name: {"dtype": str(t.dtype).removeprefix("torch."),
                          "axes": _axis_names(name, t.dim())} for name, t in inputs.items()},
        "graphs": {}, "space": space.to_dict()}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for name, graph in system.graphs().items():
            export_graph(graph, space, m, tmp / f"{name}.onnx", what=f"{run.info['model']} "
                         f"{name} graph")
            manifest["graphs"][name] = {"file": f"{name}.onnx", "inputs": list(graph.inputs),
                                        "outputs": list(graph.outputs)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def export_graph(graph: Graph, space, list_length: int, path: str | Path, *,
                 what: str = "graph") -> None:
    """Write one graph as an ONNX model, traced on `example_inputs`; a graph the exporter
    cannot hold is a one-line Nar4recError naming `what` and the exporter's reason."""
    inputs = _tracing_inputs(space, list_length)
    try:
        _export(graph.module, {k: inputs[k] for k in graph.inputs}, graph.outputs, Path(path))
    except torch.onnx.errors.OnnxExporterError as exc:
        reason = next((line.strip() for line in str(exc).splitlines()
                       if "Error" in line and "<class" in line), str(exc).splitlines()[0])
        raise Nar4recError(f"ONNX export of the {what} failed: {reason[:300]} (serve it "
                           "with `nar4rec serve --run`)") from None


def _tracing_inputs(space, list_length: int) -> dict[str, torch.Tensor]:
    """The example inputs every graph is traced with: more candidates than positions, padding
    in one request, batch and sizes above 1 so that the exporter keeps them dynamic."""
    return example_inputs(space, batch=3, n=max(list_length + 2, 8), m=list_length)


def cpu_session(path: str | Path, *, threads: int = 0):
    """An onnxruntime session of the model at `path` on the CPU, with `threads` intra-op
    threads (0: onnxruntime's default)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options,
                                        providers=["CPUExecutionProvider"])


def _axis_names(name: str, rank: int) -> list:
    named = _axes((name,))[name]
    return [named.get(axis, "features" if axis == rank - 1 else "positions")
            for axis in range(rank)]


class OnnxReranker:
    """An export under onnxruntime: `rerank(inputs)` takes the six feature inputs as NumPy
    arrays and returns (lists (B, m), utility (B,)) exactly as the run's `System.rerank`
    would, from the system graph (an export of format 2, NAR4Rec only, named it pipeline)."""

    def __init__(self, export_dir: str | Path, *, threads: int = 0):
        export_dir = Path(export_dir)
        manifest_path = export_dir / MANIFEST
        if not manifest_path.exists():
            raise Nar4recError(f"{export_dir}: no {MANIFEST}; not an export directory")
        self.manifest = json.loads(manifest_path.read_text())
        self.graphs = self.manifest["graphs"]
        self.system = "system" if "system" in self.graphs else "pipeline"
        if self.system not in self.graphs:
            raise Nar4recError(f"{export_dir}: this export has no system graph (exported "
                               "before format 2): export the run again")
        self.sessions = {name: cpu_session(export_dir / graph["file"], threads=threads)
                         for name, graph in self.graphs.items()}

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs of the exported graph `graph` (for example NAR4Rec's "generator") fed
        from `inputs`, which holds at least its inputs by name."""
        names = self.graphs[graph].get("inputs", FEATURE_INPUTS)
        return self.sessions[graph].run(None, {k: inputs[k] for k in names})

    def rerank(self, inputs: dict[str, np.ndarray], *, with_scores: bool = False) -> tuple:
        """(lists (B, m), utility (B,)); with_scores: (lists, item scores (B, m), utility)."""
        lists, item_scores, utility = self.run(self.system, inputs)
        return (lists, item_scores, utility) if with_scores else (lists, utility)
