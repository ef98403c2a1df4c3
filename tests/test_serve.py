"""The HTTP service: the same lists as the library, and a 4xx with a reason for bad input."""

from __future__ import annotations

import copy

import numpy as np
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from helpers import train_tiny
from nar4rec.data.loader import RequestLoader
from nar4rec.pipeline import load_run
from nar4rec.serve import Backend, create_app, request_json


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    train_tiny(root, requests=1200, n_candidates=12, list_length=4, d_model=16, steps=5)
    client = TestClient(create_app(Backend(run=root / "run"), max_candidates=30,
                                   max_body_bytes=60_000))
    table = pq.read_table(root / "data" / "test.parquet")
    return root, client, table


def body(served, row: int = 0) -> dict:
    root, _, table = served
    return request_json(table, row, load_run(root / "run").space)


def test_the_service_returns_the_library_lists(served):
    root, client, table = served
    run = load_run(root / "run")
    loader = RequestLoader([root / "data" / "test.parquet"], run.space, batch_size=1)
    for row, batch in zip(range(8), loader, strict=False):   # one request at a time, as served
        expected = run.reranker.rerank(batch)
        answer = client.post("/v1/rerank", json=request_json(table, row, run.space))
        assert answer.status_code == 200, answer.text
        result = answer.json()
        ids = batch.item_id[0]
        assert result["items"] == [int(ids[i]) for i in expected.lists[0]]
        np.testing.assert_allclose(result["scores"], expected.item_scores[0].numpy(),
                                   rtol=1e-4, atol=1e-5)
        assert result["request_id"] == int(batch.request_id[0])


def test_unseen_values_are_served_and_counted(served):
    _, client, _ = served
    request = body(served)
    request["candidates"][0]["item_id"] = 10**12
    request["user"]["user_id"] = 10**12
    assert client.post("/v1/rerank", json=request).status_code == 200
    metrics = client.get("/metrics").json()
    assert metrics["unseen_categorical_values"] >= 2
    assert metrics["requests"]["ok"] >= 1 and metrics["latency_ms"]["p50"] > 0


def mutate(request: dict, change) -> dict:
    request = copy.deepcopy(request)
    change(request)
    return request


BAD = {
    "wrong type": (lambda r: r["candidates"][0].__setitem__("upstream_score", "high"), 422,
                   "candidates[0].upstream_score"),
    "missing user": (lambda r: r.pop("user"), 422, "body.user: Field required"),
    "missing feature": (lambda r: r["candidates"][2]["features"].pop("topic"), 422,
                        "candidates[2].features: missing feature 'topic'"),
    "unknown feature": (lambda r: r["user"]["features"].__setitem__("shoe_size", 3), 422,
                        "unknown feature 'shoe_size'"),
    "text for a number": (lambda r: r["candidates"][1]["features"].__setitem__(
        "quality_estimate", "good"), 422, "candidates[1].features.quality_estimate"),
    "fewer than m": (lambda r: r.__setitem__("candidates", r["candidates"][:3]), 422,
                     "the model shows 4"),
    "repeated item": (lambda r: r["candidates"][1].__setitem__(
        "item_id", r["candidates"][0]["item_id"]), 422, "appears twice"),
    "extra field": (lambda r: r.__setitem__("debug", True), 422, "body.debug"),
    "too many": (lambda r: r.__setitem__("candidates", [
        {**r["candidates"][0], "item_id": i} for i in range(31)]), 413, "at most 30"),
    "oversized": (lambda r: r.__setitem__("candidates", [
        {**r["candidates"][0], "item_id": i} for i in range(400)]), 413, "body over"),
    "no candidates": (lambda r: r.__setitem__("candidates", []), 422, "candidates"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_gets_a_4xx_naming_the_problem(served, case):
    _, client, _ = served
    change, status, message = BAD[case]
    answer = client.post("/v1/rerank", json=mutate(body(served), change))
    assert answer.status_code == status, answer.text
    assert message in answer.json()["detail"]


def test_garbage_bodies_and_health(served):
    _, client, _ = served
    answer = client.post("/v1/rerank", content=b"{not json",
                         headers={"content-type": "application/json"})
    assert answer.status_code == 422
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.post("/v1/rerank", json=body(served)).status_code == 200   # still alive
    assert "/v1/rerank" in client.get("/openapi.json").json()["paths"]
    assert client.get("/metrics").json()["requests"]["bad_input"] >= 1
