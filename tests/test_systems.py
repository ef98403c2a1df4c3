"""Every registered model is a first-class reranker: one interface from training to serving.

One tiny data set; each model of the registry is trained a few steps (plumbing: the weights do
not matter), then evaluated, applied to a file, timed, exported and served, PyTorch and
onnxruntime, with the same calls. A model whose system graph ONNX cannot hold must say so in
one line, and its PyTorch service must still answer.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fastapi.testclient import TestClient

from helpers import simulate_small, train_every_model
from nar4rec.compare import time_run
from nar4rec.data.loader import RequestLoader
from nar4rec.errors import Nar4recError
from nar4rec.evaluation import evaluate_run
from nar4rec.export import FEATURE_INPUTS, OnnxReranker, export_run
from nar4rec.registry import MODELS, system_class
from nar4rec.runs import load_run, rerank_file
from nar4rec.serve import Backend, create_app, request_json
from nar4rec.system import Reranked

pytestmark = pytest.mark.usefixtures("one_thread")

# Models whose system graph ONNX cannot hold, and the reason their refusal names
NOT_EXPORTED = {"seq2slate": "packs each request's candidates"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("systems") / "data"
    simulate_small(out, requests=900, n_candidates=12, list_length=4)
    return out


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    return train_every_model(data, tmp_path_factory.mktemp("runs"), steps=3)


def a_batch(data, space, size: int = 32):
    """The first `size` test requests, the first cut to 3 candidates (fewer than m = 4)."""
    batch = next(iter(RequestLoader([data / "test.parquet"], space, batch_size=size)))
    mask = batch.cand_mask.clone()
    mask[0, 3:] = False
    return dataclasses.replace(batch, cand_mask=mask)


@pytest.mark.parametrize("model", list(MODELS))
def test_every_model_trains_evaluates_reranks_and_times_the_same_way(model, runs, data,
                                                                       tmp_path):
    run = load_run(runs / model)
    system = run.system
    assert isinstance(system, system_class(model))
    assert set(run.info["phases"]) == {phase.name for phase in system.phases}
    batch = a_batch(data, run.space)
    out = system.rerank(batch)
    assert isinstance(out, Reranked) and out.lists.shape == (len(batch), 4)
    assert (out.lists[0, 3:] == -1).all() and (out.lists[1:] >= 0).all()
    for row in out.lists.tolist():                  # never a candidate twice
        placed = [i for i in row if i >= 0]
        assert len(set(placed)) == len(placed)
    report = evaluate_run(runs / model, data)
    assert report["model"] == model and np.isfinite(report["metrics"]["utility"])
    assert rerank_file(runs / model, data / "test.parquet", tmp_path / "lists.parquet") > 0
    table = pq.read_table(tmp_path / "lists.parquet")
    assert table.column("items").to_pylist()[1] == [
        int(i) for i in np.asarray(batch.item_id)[1][out.lists[1].numpy()]]
    timed = time_run(runs / model, data, 16)
    assert timed["train_s_per_batch"] > 0 and timed["infer_s_per_batch"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("model", list(MODELS))
def test_every_model_exports_and_serves(model, runs, data, tmp_path):
    """onnxruntime returns PyTorch's lists (padded requests included), and the service
    answers from the run and from the export; or the export is refused in one line and the
    PyTorch service still answers."""
    run = load_run(runs / model)
    batch = a_batch(data, run.space)
    expected = run.system.rerank(batch)
    table = pq.read_table(data / "test.parquet")
    backends = [Backend(run=runs / model)]
    if model in NOT_EXPORTED:
        with pytest.raises(Nar4recError, match=NOT_EXPORTED[model]):
            export_run(runs / model, tmp_path / "onnx")
        assert not (tmp_path / "onnx").exists()
        done = subprocess.run([sys.executable, "-m", "nar4rec", "export", "--run",
                               str(runs / model), "--out", str(tmp_path / "onnx")],
                              capture_output=True, text=True)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    else:
        manifest = export_run(runs / model, tmp_path / "onnx")
        assert manifest["model"] == model and "system" in manifest["graphs"]
        onnx = OnnxReranker(tmp_path / "onnx")
        lists, item_scores, utility = onnx.rerank(
            {k: getattr(batch, k).numpy() for k in FEATURE_INPUTS}, with_scores=True)
        np.testing.assert_array_equal(lists, expected.lists.numpy())
        np.testing.assert_allclose(item_scores, expected.item_scores.numpy(), rtol=1e-4,
                                   atol=1e-4)
        np.testing.assert_allclose(utility, expected.utility.numpy(), rtol=1e-4, atol=1e-4)
        backends.append(Backend(export=tmp_path / "onnx"))
    for backend in backends:
        client = TestClient(create_app(backend))
        answer = client.post("/v1/rerank", json=request_json(table, 1, run.space))
        assert answer.status_code == 200, answer.text
        result = answer.json()
        ids = batch.item_id[1]
        assert result["items"] == [int(ids[i]) for i in expected.lists[1]]
        assert (result["predicted_utility"] is None) == bool(torch.isnan(expected.utility[1]))
        assert client.get("/healthz").json()["model"] == model


REWARD_MODELS = {"nar4rec", "evaluator", "dnn", "dcn", "edge_rerank"}


@pytest.mark.parametrize("model", list(MODELS))
def test_a_reward_model_scores_any_list_or_says_it_cannot(model, runs, data):
    """`predict_feedback`: on the logged lists the same probabilities as the logged-list
    forward pass (`logged_click`), on other lists zero past their end; a system without a
    calibrated click model refuses by name."""
    system = load_run(runs / model).system
    batch = a_batch(data, system.space)
    own = system.rerank(batch).lists
    if model not in REWARD_MODELS:
        with pytest.raises(Nar4recError, match=f"a {model} run has no per-behaviour"):
            system.predict_feedback(batch, own)
        return
    logged = batch.exposed.masked_fill(~batch.exposed_mask, -1)
    predicted = system.predict_feedback(batch, logged)                 # (B, M, K)
    assert predicted.shape == (*logged.shape, len(system.space.behaviours))
    clicks = system.logged_click(batch)
    assert torch.allclose(predicted[..., 0][batch.exposed_mask], clicks[batch.exposed_mask],
                          atol=1e-5)
    on_own = system.predict_feedback(batch, own)
    assert ((on_own >= 0) & (on_own <= 1)).all()
    assert (on_own[own < 0] == 0).all() and (on_own[0, :3] > 0).all()
