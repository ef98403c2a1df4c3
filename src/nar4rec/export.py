"""A trained run as ONNX models: the generator and the evaluator, for serving without PyTorch.

`export_run(run, out)` writes

    generator.onnx   (user_cat, user_num, cand_cat, cand_num, upstream_score, cand_mask)
                     -> probs (B, n, m), item_repr (B, n, d)
    evaluator.onnx   (the same six inputs, lists (B, L, m), list_mask (B, L, m))
                     -> logits (B, L, m, K)
    pipeline.onnx    (the six inputs) -> list (B, m), item_scores (B, m), utility (B,): the
                     generator, the reranker's proposals, the evaluator and the choice in one
                     graph (when the run has both models and selects by the evaluator)
    manifest.json    the inputs and outputs with their dtypes and axes, the list length m,
                     the behaviours and their utility weights, the reranker settings, and the
                     FeatureSpace (vocabularies, numeric scaling) that turns raw requests into
                     the inputs

with the batch size B, the candidate count n and the number of lists L dynamic. The generator
graph leaves decoding outside (`nar4rec.decode` runs on its outputs), so it serves every
decoder; `OnnxReranker` answers with the pipeline graph, one onnxruntime call per batch.
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

from nar4rec.data.loader import RequestBatch
from nar4rec.errors import Nar4recError
from nar4rec.io import atomic_dir
from nar4rec.models.base import predicted_utility
from nar4rec.pipeline import load_run
from nar4rec.reranker import Reranker, best_of, proposals_of, propose, request_keys

FEATURE_INPUTS = ("user_cat", "user_num", "cand_cat", "cand_num", "upstream_score", "cand_mask")
LIST_INPUTS = ("lists", "list_mask")
PIPELINE_OUTPUTS = ("list", "item_scores", "utility")
OPSET = 18
MANIFEST = "manifest.json"
QUIET_LOGGERS = ("torch.onnx", "onnx_ir", "onnxscript")


def _batch(user_cat, user_num, cand_cat, cand_num, upstream_score, cand_mask) -> RequestBatch:
    """A RequestBatch holding only what the models' forward passes read."""
    return RequestBatch(request_id=None, user_id=None, item_id=None, user_cat=user_cat,
                        user_num=user_num, cand_cat=cand_cat, cand_num=cand_num,
                        upstream_score=upstream_score, cand_mask=cand_mask, exposed=None,
                        exposed_mask=None, feedback=None, log_propensity=None)


class GeneratorGraph(nn.Module):
    """The generator with plain tensor inputs: -> (probs, item_repr)."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, user_cat, user_num, cand_cat, cand_num, upstream_score, cand_mask):
        out = self.generator(_batch(user_cat, user_num, cand_cat, cand_num, upstream_score,
                                    cand_mask))
        return out.probs, out.item_repr


class EvaluatorGraph(nn.Module):
    """The evaluator with plain tensor inputs: -> logits (B, L, m, K)."""

    def __init__(self, evaluator: nn.Module):
        super().__init__()
        self.evaluator = evaluator

    def forward(self, user_cat, user_num, cand_cat, cand_num, upstream_score, cand_mask,
                lists, list_mask):
        return self.evaluator(_batch(user_cat, user_num, cand_cat, cand_num, upstream_score,
                                     cand_mask), lists, list_mask)


class PipelineGraph(nn.Module):
    """The whole generator-evaluator pipeline in one graph: -> (list (B, m), item_scores (B, m),
    utility (B,)), what `Reranker.rerank` returns.

    Decoding the proposals (`reranker.propose`: contrastive at every alpha, seeded top-k
    samples) and choosing the best (`reranker.best_of`) run inside the graph, from the same
    code as in PyTorch: at batch 1 a separate decoding step in Python costs more than the
    generator itself (docs/benchmarks.md).
    """

    def __init__(self, reranker: Reranker):
        super().__init__()
        self.generator, self.evaluator = reranker.generator, reranker.evaluator
        self.config = reranker.config
        self.register_buffer("weights", reranker.weights.float(), persistent=False)

    def forward(self, user_cat, user_num, cand_cat, cand_num, upstream_score, cand_mask):
        batch = _batch(user_cat, user_num, cand_cat, cand_num, upstream_score, cand_mask)
        proposals = proposals_of(self.generator(batch), batch, self.evaluator, self.weights,
                                 self.config)                          # (B, K, m)
        mask = proposals >= 0
        logits = self.evaluator(batch, proposals.clamp_min(0), mask)       # (B, K, m, K_b)
        item_utility = predicted_utility(logits, self.weights) * mask     # (B, K, m)
        lists, utility, item_scores, _ = best_of(proposals, item_utility)
        return lists, item_scores, utility


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
    """Write generator.onnx (when the run has a generator), evaluator.onnx and manifest.json."""
    run = load_run(run_dir)
    space, reranker = run.space, run.reranker
    m = run.info["list_length"]
    inputs = _tracing_inputs(space, m)
    features = {k: inputs[k] for k in FEATURE_INPUTS}
    manifest = {
        "format": 2, "model": run.info["model"], "list_length": m,
        "behaviours": list(space.behaviours),
        "utility_weights": [float(w) for w in space.utility_weights],
        "reranker": dataclasses.asdict(run.config.reranker),
        "opset": OPSET,
        "inputs": {name: {"dtype": str(t.dtype).removeprefix("torch."),
                          "axes": _axis_names(name, t.dim())} for name, t in inputs.items()},
        "graphs": {}, "space": space.to_dict()}
    try:
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            if reranker.generator is not None:
                _export(GeneratorGraph(reranker.generator), features, ("probs", "item_repr"),
                        tmp / "generator.onnx")
                manifest["graphs"]["generator"] = {
                    "file": "generator.onnx", "inputs": list(FEATURE_INPUTS),
                    "outputs": {"probs": ["batch", "candidates", m],
                                "item_repr": ["batch", "candidates",
                                              reranker.generator.config.d_model]}}
            _export(EvaluatorGraph(reranker.evaluator), inputs, ("logits",),
                    tmp / "evaluator.onnx")
            manifest["graphs"]["evaluator"] = {
                "file": "evaluator.onnx", "inputs": [*FEATURE_INPUTS, *LIST_INPUTS],
                "outputs": {"logits": ["batch", "lists", m, len(space.behaviours)]}}
            if reranker.generator is not None and reranker.config.select == "evaluator":
                export_pipeline(reranker, space, m, tmp / "pipeline.onnx")
                manifest["graphs"]["pipeline"] = {
                    "file": "pipeline.onnx", "inputs": list(FEATURE_INPUTS),
                    "outputs": {"list": ["batch", m], "item_scores": ["batch", m],
                                "utility": ["batch"]}}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    except torch.onnx.errors.OnnxExporterError as exc:
        raise Nar4recError(f"ONNX export failed: {exc}") from None
    return manifest


def export_pipeline(reranker: Reranker, space, list_length: int, path: str | Path) -> None:
    """Write the reranker's whole pipeline (`PipelineGraph`) as one ONNX model."""
    inputs = _tracing_inputs(space, list_length)
    _export(PipelineGraph(reranker), {k: inputs[k] for k in FEATURE_INPUTS}, PIPELINE_OUTPUTS,
            Path(path))


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
    """The exported models under onnxruntime, with the same proposals and choice as Reranker.

    `rerank(inputs)` takes the six feature inputs as NumPy arrays and returns (lists (B, m),
    utility (B,)) exactly as `Reranker.rerank` would from the same run.
    """

    def __init__(self, export_dir: str | Path, *, threads: int = 0):
        from nar4rec.reranker import RerankerConfig

        export_dir = Path(export_dir)
        manifest_path = export_dir / MANIFEST
        if not manifest_path.exists():
            raise Nar4recError(f"{export_dir}: no {MANIFEST}; not an export directory")
        self.manifest = json.loads(manifest_path.read_text())
        self.sessions = {name: cpu_session(export_dir / graph["file"], threads=threads)
                         for name, graph in self.manifest["graphs"].items()}
        self.weights = np.asarray(self.manifest["utility_weights"], dtype=np.float32)
        self.config = RerankerConfig(**self.manifest["reranker"])

    def generator(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        probs, item_repr = self.sessions["generator"].run(
            None, {k: inputs[k] for k in FEATURE_INPUTS})
        return probs, item_repr

    def evaluator(self, inputs: dict[str, np.ndarray], lists: np.ndarray,
                  list_mask: np.ndarray) -> np.ndarray:
        feeds = {k: inputs[k] for k in FEATURE_INPUTS}
        return self.sessions["evaluator"].run(None, {**feeds, "lists": lists,
                                                     "list_mask": list_mask})[0]

    def rerank(self, inputs: dict[str, np.ndarray], *, with_scores: bool = False) -> tuple:
        """(lists (B, m), utility (B,)); with_scores: (lists, item scores (B, m), utility)."""
        if "generator" not in self.sessions:
            raise Nar4recError("this export holds no generator")
        if "pipeline" in self.sessions:                 # one graph call (exports since v2)
            best, item_scores, utility = self.sessions["pipeline"].run(
                None, {k: inputs[k] for k in FEATURE_INPUTS})
            return (best, item_scores, utility) if with_scores else (best, utility)
        if self.config.evaluator_alphas or self.config.evaluator_top_m:
            raise Nar4recError("this export has no pipeline graph, which evaluator alphas "
                               "and the evaluator's top-m proposal need: export the run "
                               "again")
        probs, item_repr = self.generator(inputs)
        cand_mask = torch.from_numpy(inputs["cand_mask"])
        keys = request_keys(torch.from_numpy(inputs["user_cat"]),
                            torch.from_numpy(inputs["cand_cat"]), cand_mask)
        lists = propose(torch.from_numpy(probs), torch.from_numpy(item_repr), cand_mask,
                        self.config, keys).numpy()                     # (B, K, m)
        mask = lists >= 0
        logits = self.evaluator(inputs, np.where(mask, lists, 0), mask)   # (B, K, m, K_b)
        item_utility = (1.0 / (1.0 + np.exp(-logits))) @ self.weights * mask
        best, utility, item_scores, _ = (
            t.numpy() for t in best_of(torch.from_numpy(lists), torch.from_numpy(item_utility)))
        if with_scores:
            return best, item_scores, utility
        return best, utility
