"""The HTTP service: the same lists as the library, and a 4xx with a reason for bad input."""

from __future__ import annotations

import asyncio
import copy
import http.client
import itertools
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from helpers import free_port, train_tiny
from nar4rec.data.batch import UNKNOWN
from nar4rec.data.format import CAND_NUM, ITEM_ID
from nar4rec.data.loader import RequestLoader
from nar4rec.data.validate import validate_file
from nar4rec.errors import Nar4recError
from nar4rec.exploration import Exploration
from nar4rec.runs import load_run
from nar4rec.serve import (
    Backend,
    BadInput,
    Batcher,
    BodyLimit,
    ModelProcess,
    RerankRequest,
    create_app,
    request_json,
    request_row,
)


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
        "item_id", r["candidates"][0]["item_id"]), 422,
                      "candidates[1].item_id: {item} appears twice (also candidates[0])"),
    "extra field": (lambda r: r.__setitem__("debug", True), 422, "body.debug"),
    "too many": (lambda r: r.__setitem__("candidates", [
        {**r["candidates"][0], "item_id": i} for i in range(31)]), 413, "at most 30"),
    "oversized": (lambda r: r.__setitem__("candidates", [
        {**r["candidates"][0], "item_id": i} for i in range(400)]), 413, "body over"),
    "huge integer": (lambda r: r["candidates"][1]["features"].__setitem__(
        "duration", 10**400), 422, "candidates[1].features.duration"),
    "huge score": (lambda r: r["candidates"][1].__setitem__("upstream_score", 10**400), 422,
                   "candidates[1].upstream_score"),
    "beyond float32": (lambda r: r["candidates"][1]["features"].__setitem__("duration", 1e39),
                       422, "candidates[1].features.duration: a finite number within "
                       "float32's range"),
    "user beyond float32": (lambda r: r["user"]["features"].__setitem__(
        "log_activity", -3.5e38), 422, "user.features.log_activity: a finite number within"),
    "score beyond float32": (lambda r: r["candidates"][2].__setitem__("upstream_score", 5e38),
                             422, "candidates[2].upstream_score: a finite number within"),
    "too far for the model": (lambda r: r["candidates"][1]["features"].__setitem__(
        "duration", -1e30), 422, "candidates[1].features.duration: -1e+30 is too far from "
        "the training data"),
    "user too far": (lambda r: r["user"]["features"].__setitem__("log_activity", 1e30), 422,
                     "user.features.log_activity: 1e+30 is too far"),
    "no candidates": (lambda r: r.__setitem__("candidates", []), 422, "candidates"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_gets_a_4xx_naming_the_problem(served, case):
    _, client, _ = served
    change, status, message = BAD[case]
    request = body(served)
    answer = client.post("/v1/rerank", json=mutate(request, change))
    assert answer.status_code == status, answer.text
    assert message.format(item=request["candidates"][0]["item_id"]) in answer.json()["detail"]


def test_validate_and_the_service_agree(served, tmp_path):
    # A repeated candidate and a float64 value beyond float32's range: each is a problem for
    # `nar4rec validate` in a file and a 422 for the service, both naming where it is.
    root, client, table = served
    space = load_run(root / "run").space
    items = table.column(ITEM_ID).to_pylist()
    items[0][3] = items[0][1]
    duration = table.column(CAND_NUM + "duration").to_pylist()
    duration[1][2] = 1e39
    for name, values, value_type in ((ITEM_ID, items, table.schema.field(ITEM_ID).type),
                                     (CAND_NUM + "duration", duration,
                                      pa.list_(pa.float64()))):
        index = table.schema.get_field_index(name)
        table = table.set_column(index, pa.field(name, value_type),
                                 pa.array(values, value_type))
    pq.write_table(table, tmp_path / "bad.parquet")
    problems = validate_file(tmp_path / "bad.parquet")
    assert {(p.row, p.field) for p in problems} == {(0, ITEM_ID), (1, CAND_NUM + "duration")}
    for row, where in ((0, "candidates[3].item_id"), (1, "candidates[2].features.duration")):
        answer = client.post("/v1/rerank", json=request_json(table, row, space))
        assert answer.status_code == 422 and where in answer.json()["detail"], answer.text
    assert client.post("/v1/rerank", json=request_json(table, 2, space)).status_code == 200


def test_an_oversized_body_sent_in_chunks_is_refused(served):
    _, client, _ = served
    chunks = iter([b'{"user": "' + b"x" * 40_000, b"x" * 40_000 + b'"}'])   # no Content-Length
    answer = client.post("/v1/rerank", content=chunks,
                         headers={"content-type": "application/json"})
    assert answer.status_code == 413 and "body over 60000 bytes" in answer.json()["detail"]
    assert client.post("/v1/rerank", json=body(served)).status_code == 200   # still alive


@pytest.fixture(scope="module")
def service(served):
    """`nar4rec serve` in its own process on a free loopback port (60,000-byte body limit)."""
    root, _, _ = served
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "nar4rec", "serve", "--run",
                                str(root / "run"), "--port", str(port),
                                "--max-body-bytes", "60000"])
    try:
        wait_until_serving(process, port)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_until_serving(process: subprocess.Popen, port: int) -> None:
    """Until the service started as `process` answers /healthz on `port` (a minute at most)."""
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return
        except OSError:
            assert process.poll() is None, "the service did not start"
            time.sleep(0.1)
    raise AssertionError(f"the service did not answer on port {port} within a minute")


def post_with_urllib(port: int, content: bytes) -> tuple[int, str] | str:
    """(status, detail), or the name of the error the client got instead of an answer."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/rerank", data=content,
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, ""
    except urllib.error.HTTPError as answer:
        return answer.code, json.loads(answer.read())["detail"]
    except urllib.error.URLError as exc:
        return type(exc.reason).__name__
    except OSError as exc:
        return type(exc).__name__


def post_with_http_client(port: int, content: bytes, chunked: bool) -> tuple[int, str] | str:
    """As `post_with_urllib`, from http.client on a connection it closes after the answer."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    pieces = (content[i:i + 65536] for i in range(0, len(content), 65536))
    try:
        connection.request("POST", "/v1/rerank", body=pieces if chunked else content,
                           headers={"content-type": "application/json",
                                    "connection": "close"}, encode_chunked=chunked)
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())["detail"]
    except OSError as exc:
        return type(exc).__name__
    finally:
        connection.close()


def test_a_plain_client_sending_an_oversized_body_reads_the_413(service):
    # urllib and http.client send the whole body before they read: had the service closed
    # with bytes unread, the connection would be reset under them (a broken pipe)
    outcomes: Counter = Counter()
    for size in (240_000, 3_000_000):                  # 4x and 50x the limit
        content = b'{"user": "' + b"x" * size + b'"}'
        for _ in range(15):
            outcomes[post_with_urllib(service, content)] += 1
            outcomes[post_with_http_client(service, content, chunked=False)] += 1
            outcomes[post_with_http_client(service, content, chunked=True)] += 1
    assert outcomes == {(413, "body over 60000 bytes"): 90}


def test_a_body_that_stalls_gets_a_408_within_a_bounded_time(service):
    # The Content-Length promises 1,000 bytes, well under the limit; 10 come, then nothing.
    head = (b"POST /v1/rerank HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
    with socket.create_connection(("127.0.0.1", service), timeout=30) as sock:
        sock.sendall(head + b'{"user": {')
        started = time.perf_counter()
        answer = b""
        while chunk := sock.recv(65536):              # until the service closes
            answer += chunk
    waited = time.perf_counter() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"did not arrive within 10 s" in answer and waited < 20
    assert post_with_urllib(service, b"{}")[0] == 422               # still serving


def drained(limit_app: BodyLimit, headers: dict[str, str], chunks) -> tuple[int, dict, int]:
    """POST `chunks` to `limit_app` (past the last one the client stalls): the status, the
    answer's headers and the bytes read of the body."""
    read = 0
    answer: dict = {}

    async def receive() -> dict:
        nonlocal read
        chunk = next(chunks, None)
        if chunk is None:
            await asyncio.sleep(3600)
        read += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            answer.update(status=message["status"], headers=dict(message["headers"]))

    scope = {"type": "http", "method": "POST", "path": "/", "raw_path": b"/",
             "query_string": b"", "root_path": "", "http_version": "1.1", "scheme": "http",
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1),
             "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(limit_app(scope, receive, send))
    return answer["status"], answer["headers"], read


def test_the_drain_of_a_refused_body_is_bounded():
    app = FastAPI()

    @app.post("/")
    async def read_all(request: Request) -> dict:
        return {"bytes": len(await request.body())}

    limit_app = BodyLimit(app, limit=1000, on_refuse=lambda: None, drain_bytes=100_000,
                          drain_seconds=0.5)
    endless = itertools.repeat(b"x" * 4096)
    status, headers, read = drained(limit_app, {}, endless)                  # chunked
    assert status == 413 and headers[b"connection"] == b"close"
    assert 100_000 < read <= 100_000 + 4096
    status, headers, read = drained(limit_app, {"content-length": str(10**10)}, endless)
    assert (status, headers[b"connection"], read) == (413, b"close", 0)   # not read at all
    started = time.perf_counter()
    status, headers, read = drained(limit_app, {"content-length": "50000"},
                                    iter([b"x" * 20_000]))             # then the client stalls
    assert (status, headers[b"connection"], read) == (413, b"close", 20_000)
    assert time.perf_counter() - started < 5


def test_a_stalled_body_within_the_limit_ends_in_a_408_after_body_seconds():
    app = FastAPI()

    @app.post("/")
    async def read_all(request: Request) -> dict:
        return {"bytes": len(await request.body())}

    limit_app = BodyLimit(app, limit=1000, on_refuse=lambda: None, body_seconds=0.5)
    started = time.perf_counter()
    status, headers, read = drained(limit_app, {"content-length": "500"},
                                    iter([b"x" * 100, b"x" * 100]))   # then the client stalls
    assert (status, headers[b"connection"], read) == (408, b"close", 200)
    assert 0.5 <= time.perf_counter() - started < 5


def test_garbage_bodies_and_health(served):
    _, client, _ = served
    answer = client.post("/v1/rerank", content=b"{not json",
                         headers={"content-type": "application/json"})
    assert answer.status_code == 422
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.post("/v1/rerank", json=body(served)).status_code == 200   # still alive
    assert "/v1/rerank" in client.get("/openapi.json").json()["paths"]
    assert client.get("/metrics").json()["requests"]["bad_input"] >= 1


GARBAGE = {
    "not JSON": (b"{not json", "application/json",
                 "body: Invalid JSON: key must be a string at line 1 column 2"),
    "cut short": (b'{"user": {"user_id": 1', "application/json", "body: Invalid JSON: EOF"),
    "not UTF-8": (b'{"user": "\xff"}', "application/json", "body: Invalid JSON"),
    "empty": (b"", "application/json", "body: Field required"),
    "a list": (b"[1, 2]", "application/json", "body: Input should be an object"),
    "not sent as JSON": (b"{}", "text/plain", "body: a JSON body expected (Content-Type: "
                         "application/json), got 'text/plain'"),
}


@pytest.mark.parametrize("case", GARBAGE, ids=list(GARBAGE))
def test_a_body_that_is_not_a_json_object_gets_a_422_saying_so(served, case):
    # The endpoint parses its raw body itself (`serve.parse_request`): what FastAPI's body
    # parameter answered with a 422 (or, for bytes that are not UTF-8, a 400) is a 422 whose
    # detail says what is wrong, counted as bad input; never a 500.
    _, client, _ = served
    content, content_type, detail = GARBAGE[case]
    refused = client.get("/metrics").json()["requests"]["bad_input"]
    answer = client.post("/v1/rerank", content=content, headers={"content-type": content_type})
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"].startswith(detail), answer.json()
    assert client.get("/metrics").json()["requests"]["bad_input"] == refused + 1


def test_a_json_body_is_taken_with_any_json_media_type(served):
    _, client, _ = served
    content = json.dumps(body(served)).encode()
    for content_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
        answer = client.post("/v1/rerank", content=content,
                             headers={"content-type": content_type})
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "application/json"


def test_the_openapi_schema_holds_the_request_and_the_answer(served):
    # The endpoint takes a Request and returns a pre-serialised Response; the schema still
    # describes both bodies, with every model they refer to.
    _, client, _ = served
    schema = client.get("/openapi.json").json()
    operation = schema["paths"]["/v1/rerank"]["post"]
    ref = "#/components/schemas/"
    assert operation["requestBody"] == {"required": True, "content": {
        "application/json": {"schema": {"$ref": ref + "RerankRequest"}}}}
    assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": ref + "RerankResponse"}
    for status in ("408", "413", "422"):
        assert operation["responses"][status]["content"]["application/json"]["schema"] == {
            "$ref": ref + "ErrorDetail"}
    models = schema["components"]["schemas"]
    assert set(models["RerankRequest"]["properties"]) == {"request_id", "user", "candidates"}
    assert models["RerankRequest"]["properties"]["candidates"]["items"] == {
        "$ref": ref + "Candidate"}
    assert models["RerankRequest"]["example"]["user"]["user_id"] == 17
    assert set(models["Candidate"]["properties"]) == {"item_id", "features", "upstream_score"}
    assert "user_id" in models["User"]["properties"]
    assert "logging_marginal" in models["RerankResponse"]["properties"]
    refs = {value for value in _values(schema) if isinstance(value, str)
            and value.startswith(ref)}
    assert {r.removeprefix(ref) for r in refs} <= set(models)      # nothing dangles
    assert client.get("/docs").status_code == 200


def _values(tree):
    """Every leaf value of a JSON document."""
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _values(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _values(value)
    else:
        yield tree


VALUES = {   # request_row settles a whole feature at once when all is well: never a misfit
    "NaN among numbers": ("duration", 1, math.nan, "candidates[1].features.duration: a finite"),
    "NaN first": ("duration", 0, math.nan, "candidates[0].features.duration: a finite"),
    "infinity": ("quality_estimate", 2, -math.inf, "candidates[2].features.quality_estimate"),
    "beyond float32": ("duration", 3, 3.5e38, "candidates[3].features.duration"),
    "integer beyond float32": ("duration", 1, 10**39, "candidates[1].features.duration"),
    "text": ("duration", 1, "long", "candidates[1].features.duration"),
    "a float category": ("topic", 2, 3.0, "candidates[2].features.topic: an integer or string"),
    "NaN score": ("upstream_score", 1, math.nan, "candidates[1].upstream_score: a finite"),
    "score beyond float32": ("upstream_score", 0, 1e39, "candidates[0].upstream_score"),
    "null": ("duration", 1, None, None),
    "integer": ("duration", 1, 7, None),
    "largest float32": ("duration", 1, -3.4028234e38, None),
    "text category": ("topic", 1, "news", None),
}


@pytest.mark.parametrize("case", VALUES, ids=list(VALUES))
def test_request_row_names_the_first_value_that_does_not_fit(served, case):
    root, _, _ = served
    space = load_run(root / "run").space
    name, index, value, message = VALUES[case]
    request = body(served)
    for candidate in request["candidates"][index:]:        # the first misfit is named
        if name == "upstream_score":
            candidate[name] = value
        else:
            candidate["features"][name] = value
    parsed = RerankRequest.model_validate(request)
    if message is None:
        row = request_row(parsed, space, 4, 30)
        column = [c for c in row if c.endswith(name)][0]
        assert row[column][index] == value
    else:
        with pytest.raises(BadInput, match=re.escape(message)):
            request_row(parsed, space, 4, 30)


class HeldBackend:
    """A backend whose rerank waits while `gate` is closed, so that later requests queue up."""

    def __init__(self, backend: Backend):
        self.backend, self.space, self.exploration = backend, backend.space, None
        self.gate, self.sizes = threading.Event(), []

    def rerank(self, batch):
        self.gate.wait(timeout=30)
        self.sizes.append(len(batch))
        return self.backend.rerank(batch)


def held_batch(batcher: Batcher, backend: HeldBackend, first: dict, rows: list) -> list:
    """Answers to `first`, served alone while the others queue, then to `rows`."""
    backend.gate.clear()
    futures = [batcher.submit(first)]
    while batcher.queue.qsize():                    # the worker has taken `first` and waits
        time.sleep(0.01)
    futures += [batcher.submit(row) for row in rows]
    backend.gate.set()
    return [f.result(timeout=30) for f in futures]


def test_concurrent_requests_are_reranked_together_each_getting_its_own_list(served):
    root, _, table = served
    run = load_run(root / "run")
    backend = HeldBackend(Backend(run=root / "run"))
    batcher = Batcher(backend)
    bodies = [RerankRequest.model_validate(request_json(table, row, run.space))
              for row in range(5)]
    bodies[4].candidates = [c.model_copy(update={"item_id": f"s{c.item_id}"})
                            for c in bodies[4].candidates]    # string ids: no batch with
    rows = [request_row(b, run.space, 4, 30) for b in bodies]  # integer ones
    answers = held_batch(batcher, backend, rows[0], rows[1:4])
    assert backend.sizes == [1, 3]                             # 1, 2 and 3 in one call
    loader = RequestLoader([root / "data" / "test.parquet"], run.space, batch_size=1)
    for (placed, scores, _, unseen, logged), batch in zip(answers, loader, strict=False):
        assert logged is None                                   # not exploring
        expected = run.reranker.rerank(batch)
        np.testing.assert_array_equal(placed, expected.lists[0].numpy())
        np.testing.assert_allclose(scores, expected.item_scores[0].numpy(), rtol=1e-4,
                                   atol=1e-5)
        assert unseen == (batch.cand_cat == UNKNOWN).sum() + (batch.user_cat == UNKNOWN).sum()
    alone = batcher.submit(rows[4]).result(timeout=30)
    assert alone[3] == len(rows[4][ITEM_ID])                  # every string id is unseen
    backend.sizes.clear()
    mixed = held_batch(batcher, backend, rows[0], rows[3:5])  # integer and string ids
    assert backend.sizes == [1, 2]
    np.testing.assert_array_equal(mixed[1][0], answers[3][0])
    np.testing.assert_array_equal(mixed[2][0], alone[0])


def test_a_request_that_cannot_be_encoded_fails_alone(served):
    root, _, table = served
    run = load_run(root / "run")
    backend = HeldBackend(Backend(run=root / "run"))
    batcher = Batcher(backend)
    rows = [request_row(RerankRequest.model_validate(request_json(table, row, run.space)),
                        run.space, 4, 30) for row in range(3)]
    bad = {**rows[2], CAND_NUM + "duration": ["long"] * len(rows[2][ITEM_ID])}
    backend.gate.clear()
    futures = [batcher.submit(rows[0])]
    while batcher.queue.qsize():
        time.sleep(0.01)
    futures += [batcher.submit(rows[1]), batcher.submit(bad)]
    backend.gate.set()
    assert futures[0].result(timeout=30)[0].shape == (4,)
    assert futures[1].result(timeout=30)[0].shape == (4,)
    with pytest.raises(BadInput, match="do not fit the model's features"):
        futures[2].result(timeout=30)
    assert backend.sizes == [1, 1]               # the batch failed to encode; row 1 alone did not


def test_a_device_that_is_not_there_is_a_clear_error(served):
    root, _, _ = served
    with pytest.raises(Nar4recError, match="an export runs on the CPU"):
        Backend(export=root / "no-export", device="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(Nar4recError, match="no CUDA device"):
            Backend(run=root / "run", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_service_on_a_gpu_returns_the_library_lists(served):
    root, _, table = served
    run = load_run(root / "run")
    run.reranker.to("cuda")                            # eager on the same GPU, for reference
    backend = Backend(run=root / "run", device="cuda")
    client = TestClient(create_app(backend, max_candidates=30))
    loader = RequestLoader([root / "data" / "test.parquet"], run.space, batch_size=5)
    for batch in list(loader)[:3]:                     # 5 requests: padded to a graph of 8
        expected = run.reranker.rerank(batch.to("cuda"))
        lists, scores, utility = backend.rerank(batch)
        np.testing.assert_array_equal(lists, expected.lists.cpu().numpy())
        np.testing.assert_allclose(scores, expected.item_scores.cpu().numpy(), rtol=1e-4,
                                   atol=1e-5)
        np.testing.assert_allclose(utility, expected.utility.cpu().numpy(), rtol=1e-4,
                                   atol=1e-5)
    assert len(backend.graphed.graphs) == 7            # batch 1 to 64 for 16 candidate slots
    answer = client.post("/v1/rerank", json=request_json(table, 0, run.space))
    assert answer.status_code == 200, answer.text
    assert client.get("/healthz").json()["backend"] == "pytorch, CUDA graphs"


def test_the_service_says_where_it_listens(served):
    """`nar4rec serve` prints the address it answers on before it serves."""
    root, _, _ = served
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "nar4rec", "serve", "--run",
                                str(root / "run"), "--port", str(port)],
                               stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert f"on http://127.0.0.1:{port}" in line and "nar4rec" in line, line
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_exploring_mode_returns_propensities_that_match_the_frequencies(served):
    """`serve --explore`: the same request many times; each distinct list is shown about as
    often as its returned propensity says, the model's list most of all, and the marginals
    are each position's distribution over the request's candidates."""
    root, _, _ = served
    exploring = TestClient(create_app(Backend(run=root / "run", exploration=Exploration(
        epsilon=0.5, temperature=2.0, samples=2048), seed=0), max_candidates=30))
    request = body(served, 3)
    answers = [exploring.post("/v1/rerank", json=request).json() for _ in range(1500)]
    assert exploring.get("/healthz").json()["exploration"] == {"epsilon": 0.5,
                                                               "temperature": 2.0}
    seen = Counter(tuple(a["items"]) for a in answers)
    propensity = {tuple(a["items"]): math.exp(a["log_propensity"]) for a in answers}
    model_list, times = seen.most_common(1)[0]
    assert propensity[model_list] > 0.5
    for shown, times in seen.most_common(4):
        p = propensity[shown]
        assert abs(times / 1500 - p) < 4 * math.sqrt(p * (1 - p) / 1500) + 0.002, (shown, p)
    explored = [a for a in answers if a["explored"]]
    assert 600 < len(explored) < 900 and all(s is None for s in explored[0]["scores"])
    items = [c["item_id"] for c in request["candidates"]]
    marginal = np.array(answers[0]["logging_marginal"])                 # (n, m)
    assert marginal.shape == (len(items), 4) and np.allclose(marginal.sum(0), 1.0, atol=1e-6)
    first = Counter(a["items"][0] for a in answers)
    for index, item in enumerate(items):
        assert abs(first[item] / 1500 - marginal[index, 0]) < 0.05, item
    prefixes = answers[0]["prefix_log_propensity"]
    assert prefixes[-1] == pytest.approx(answers[0]["log_propensity"])
    # Off by default: no propensities.
    _, client, _ = served
    assert client.post("/v1/rerank", json=request).json()["log_propensity"] is None


def test_the_model_in_its_own_process_answers_as_the_thread_does(served):
    """`serve --model-process`: the same lists and scores as the library, a row that cannot
    be encoded fails alone with its BadInput (status kept), and the process ends with its
    pipe."""
    root, _, table = served
    run = load_run(root / "run")
    backend = Backend(run=root / "run")
    process = ModelProcess(backend.args)
    try:
        batcher = Batcher(backend, process=process)
        rows = [request_row(RerankRequest.model_validate(request_json(table, row, run.space)),
                            run.space, 4, 30) for row in range(3)]
        bad = {**rows[2], CAND_NUM + "duration": ["long"] * len(rows[2][ITEM_ID])}
        outcomes = process.serve([rows[0], bad, rows[1]])
        assert isinstance(outcomes[1], BadInput) and outcomes[1].status == 422
        assert "do not fit the model's features" in str(outcomes[1])
        loader = RequestLoader([root / "data" / "test.parquet"], run.space, batch_size=1)
        for row, batch in zip((0, 1), loader, strict=False):
            expected = run.reranker.rerank(batch)
            lists, scores, utility, unseen, logged = outcomes[2 * row]
            np.testing.assert_array_equal(lists, expected.lists[0].numpy())
            np.testing.assert_allclose(scores, expected.item_scores[0].numpy(), rtol=1e-4,
                                       atol=1e-5)
            assert logged is None
        answer = batcher.submit(rows[0]).result(timeout=60)              # through the batcher
        np.testing.assert_array_equal(answer[0], outcomes[0][0])
        app = create_app(backend, max_candidates=30, model_process=True)
        served_answer = TestClient(app).post("/v1/rerank",
                                             json=request_json(table, 0, run.space))
        app.state.model_process.close()
        assert served_answer.status_code == 200, served_answer.text
        np.testing.assert_array_equal(
            served_answer.json()["items"],
            [int(i) for i in np.asarray(table.column("item_id")[0].as_py())[outcomes[0][0]]])
    finally:
        process.close()
    assert not process.process.is_alive()


def test_a_killed_service_leaves_no_model_process_behind(served):
    """The model process reads its pipe; when the service dies (SIGKILL, no clean-up), the
    pipe closes and the process ends."""
    root, _, _ = served
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "nar4rec", "serve", "--run",
                               str(root / "run"), "--port", str(port), "--model-process"])
    try:
        wait_until_serving(server, port)
        children = [int(p) for p in os.listdir("/proc")
                    if p.isdigit() and _parent(p) == server.pid]
        assert children, "no model process started"
    finally:
        server.kill()
        server.wait(timeout=30)
    deadline = time.time() + 30
    while time.time() < deadline and any(os.path.exists(f"/proc/{p}") and _parent(p) != 0
                                         and not _zombie(p) for p in children):
        time.sleep(0.1)
    assert not [p for p in children if os.path.exists(f"/proc/{p}") and not _zombie(p)]


def _parent(pid) -> int:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return 0


def _zombie(pid) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
