"""ONNX export: onnxruntime and PyTorch agree on probabilities, logits and returned lists."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import train_tiny
from nar4rec.data.loader import RequestLoader
from nar4rec.export import (
    FEATURE_INPUTS,
    OnnxReranker,
    cpu_session,
    example_inputs,
    export_graph,
    export_run,
)
from nar4rec.reranker import NAR4RecSystem
from nar4rec.runs import load_run
from nar4rec.system import batch_of

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    train_tiny(root)
    export_run(root / "run", root / "onnx")
    return root


def padded_batch(root, space):
    """The first 64 test requests of `root`'s data, the first cut to 3 candidates (fewer
    than the 5 positions)."""
    batch = next(iter(RequestLoader([root / "data" / "test.parquet"], space, batch_size=64)))
    mask = batch.cand_mask.clone()
    mask[0, 3:] = False
    return dataclasses.replace(batch, cand_mask=mask)


def as_numpy(inputs: dict) -> dict:
    return {k: v.numpy() for k, v in inputs.items()}


def with_reranker(run, tmp_path, **settings):
    """The run's NAR4Rec system with other reranker settings, and its system graph exported
    to tmp_path/system.onnx under onnxruntime."""
    config = dataclasses.replace(run.config, reranker=dataclasses.replace(
        run.config.reranker, **settings))
    system = NAR4RecSystem(run.system.modules, config, run.space, 5)
    export_graph(system.graphs()["system"], run.space, 5, tmp_path / "system.onnx")
    return system, cpu_session(tmp_path / "system.onnx")


@pytest.mark.parametrize("batch,n", [(1, 5), (4, 20), (7, 33)])
def test_probabilities_and_logits_agree_on_random_requests(exported, batch, n):
    run = load_run(exported / "run")
    onnx = OnnxReranker(exported / "onnx")
    inputs = example_inputs(run.space, batch=batch, n=n, m=5, lists=3, seed=n)
    features = [inputs[k] for k in FEATURE_INPUTS]
    with torch.no_grad():
        out = run.reranker.generator(batch_of(*features))
        logits = run.reranker.evaluator(batch_of(*features), inputs["lists"],
                                        inputs["list_mask"])
    probs, item_repr = onnx.run("generator", as_numpy(inputs))
    np.testing.assert_allclose(probs, out.probs.numpy(), atol=1e-4)
    np.testing.assert_allclose(item_repr, out.item_repr.numpy(), atol=1e-4)
    assert (probs[~inputs["cand_mask"].numpy()] == 0).all()        # padding gets 0
    onnx_logits, = onnx.run("evaluator", as_numpy(inputs))
    np.testing.assert_allclose(onnx_logits, logits.numpy(), atol=1e-4)


def test_the_same_lists_on_simulated_requests_padded_ones_included(exported):
    run = load_run(exported / "run")
    onnx = OnnxReranker(exported / "onnx")
    batch = next(iter(RequestLoader([exported / "data" / "test.parquet"], run.space,
                                    batch_size=64)))
    mask = batch.cand_mask.clone()
    mask[0, 3:] = False                      # fewer candidates than positions
    mask[1, 12:] = False
    batch = dataclasses.replace(batch, cand_mask=mask)
    expected = run.reranker.rerank(batch)
    lists, utility = onnx.rerank({k: getattr(batch, k).numpy() for k in FEATURE_INPUTS})
    np.testing.assert_array_equal(lists, expected.lists.numpy())
    np.testing.assert_allclose(utility, expected.utility.numpy(), atol=1e-4)
    assert (lists[0, 3:] == -1).all()
    for row in (0, 5):                                      # one request at a time, as served
        one = {k: getattr(batch, k)[row:row + 1].numpy() for k in FEATURE_INPUTS}
        np.testing.assert_array_equal(onnx.rerank(one)[0][0], expected.lists[row].numpy())


def test_the_pipeline_graph_decodes_with_the_evaluators_similarity(tmp_path):
    """A run whose proposals include evaluator alphas exports the evaluator's pairwise
    similarity into the pipeline graph: the same lists as PyTorch."""
    train_tiny(tmp_path, settings=("evaluator.similarity_heads=2", "evaluator.shared_values=true",
                                   "reranker.evaluator_alphas=[0.05, 0.3]"))
    export_run(tmp_path / "run", tmp_path / "onnx")
    run = load_run(tmp_path / "run")
    assert run.reranker.config.evaluator_alphas == (0.05, 0.3)
    onnx = OnnxReranker(tmp_path / "onnx")
    batch = padded_batch(tmp_path, run.space)
    expected = run.reranker.rerank(batch)
    first = len(run.reranker.config.alphas)          # the evaluator-alpha lists follow these
    assert ((expected.chosen == first) | (expected.chosen == first + 1)).any(), \
        "no evaluator-alpha list chosen"
    lists, utility = onnx.rerank({k: getattr(batch, k).numpy() for k in FEATURE_INPUTS})
    np.testing.assert_array_equal(lists, expected.lists.numpy())
    np.testing.assert_allclose(utility, expected.utility.numpy(), atol=1e-4)


def test_the_pipeline_graph_proposes_the_evaluators_top_m(exported, tmp_path):
    """With `evaluator_top_m` the pipeline graph ranks every candidate by the evaluator and
    appends its top m to the proposals (ONNX TopK in place of a stable sort): PyTorch's
    lists, padded requests included, and the appended list is chosen for some requests."""
    run = load_run(exported / "run")
    system, session = with_reranker(run, tmp_path, evaluator_top_m=True)
    batch = padded_batch(exported, run.space)
    expected = system.rerank(batch)
    assert (expected.chosen == system.reranker.config.proposals - 1).any()
    lists, _, utility = session.run(None, {k: getattr(batch, k).numpy() for k in FEATURE_INPUTS})
    np.testing.assert_array_equal(lists, expected.lists.numpy())
    np.testing.assert_allclose(utility, expected.utility.numpy(), atol=1e-4)


@pytest.mark.parametrize("size", [0, 4])
def test_the_pipeline_graph_keeps_the_contrastive_candidate_set(exported, tmp_path, size):
    """The candidate set V(k) of contrastive decoding inside the pipeline graph (every
    candidate at k = 0; k = 4 more than the padded request's 3 candidates): PyTorch's
    proposals and lists, and the setting changes some proposal against the default k."""
    run = load_run(exported / "run")
    system, session = with_reranker(run, tmp_path, contrastive_k=size)
    batch = padded_batch(exported, run.space)
    assert not torch.equal(system.reranker.propose(batch), run.reranker.propose(batch))
    expected = system.rerank(batch)
    lists, _, utility = session.run(None, {k: getattr(batch, k).numpy() for k in FEATURE_INPUTS})
    np.testing.assert_array_equal(lists, expected.lists.numpy())
    np.testing.assert_allclose(utility, expected.utility.numpy(), atol=1e-4)


def test_manifest_and_command(exported, tmp_path):
    manifest = json.loads((exported / "onnx" / "manifest.json").read_text())
    assert manifest["list_length"] == 5 and set(manifest["graphs"]) == {
        "generator", "evaluator", "system"}
    assert manifest["settings"]["reranker"]["contrastive_k"] == 2
    assert manifest["inputs"]["cand_mask"] == {"dtype": "bool",
                                               "axes": ["batch", "candidates"]}
    assert "item_id" in manifest["space"]["cand_cat"]
    done = subprocess.run([sys.executable, "-m", "nar4rec", "export", "--run",
                           str(exported / "run"), "--out", str(exported / "onnx")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "not empty (use --overwrite)" in done.stderr
    done = subprocess.run([sys.executable, "-m", "nar4rec", "export", "--run",
                           str(tmp_path), "--out", str(tmp_path / "x")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "not a run directory" in done.stderr
    assert not (tmp_path / "x").exists()
