"""What each layer of a /v1/rerank request costs, in one process, without a server.

    python benchmarks/request_decoding.py --run runs/demo/run --data runs/demo/data/test.parquet

Bodies are built from the first --requests rows of the file (`serve.request_json`); each
figure is the best of 5 repeats of 10 passes over them, in milliseconds of this process's CPU
(all its threads) per request.

Decoding and checking a body:
    stdlib json + pydantic      json.loads, then RerankRequest.model_validate (FastAPI's way
                                for a pydantic body parameter)
    pydantic JSON               RerankRequest.model_validate_json (pydantic-core parses the
                                bytes itself; `serve.parse_request`, the service's way)
    request_row                 the service's own checks of a validated request against the
                                model (`serve.request_row`)

The layers of the endpoint, its ASGI application called directly with a prepared request (no
uvicorn, no socket), each FastAPI application behind the service's `BodyLimit`:
    route floor                 a FastAPI route that reads the raw body and answers a constant:
                                routing, Request, exception and body-limit middleware
    body parameter              the body declared as a RerankRequest parameter (FastAPI's
                                json.loads and validation), a constant answer
    parse_request               the raw body through `serve.parse_request`, a constant answer
    response_model              the raw body read, a prepared RerankResponse returned through
                                FastAPI's `response_model` (its validation and serialisation)
    pre-serialised response     the same answer as Response(RerankResponse.model_dump_json())
    /v1/rerank, stand-in model  `serve.create_app` end to end with a model that costs nothing
                                (the first m candidates in order): everything but the model,
                                the FeatureSpace encoding and the batcher's thread included
    Batcher, stand-in model     the same requests' rows through `serve.Batcher` from this
                                thread, no HTTP (the in-process path of load_test.py): the
                                encoding and the hand-off that the service shares
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import threading
import time
import timeit

import numpy as np
import pyarrow.parquet as pq
from fastapi import FastAPI, Request
from fastapi.responses import Response

from nar4rec.data.features import FeatureSpace
from nar4rec.runs import read_run
from nar4rec.serve import (
    Batcher,
    BodyLimit,
    RerankRequest,
    RerankResponse,
    create_app,
    parse_request,
    request_json,
    request_row,
)


class StandIn:
    """A backend whose model costs nothing: each list is the first m candidates in order."""

    def __init__(self, space: FeatureSpace, list_length: int):
        self.space, self.list_length, self.exploration = space, list_length, None
        self.model, self.kind, self.lock = "stand-in", "stand-in", threading.Lock()

    def rerank(self, batch):
        size, m = len(batch), self.list_length
        return (np.tile(np.arange(m), (size, 1)), np.ones((size, m), np.float32),
                np.ones(size, np.float32))


def prepared(body: bytes) -> tuple[dict, object, object, dict]:
    """A POST /v1/rerank of `body` for an ASGI application: scope, receive, send, and the
    dict that gets the answer's status and body."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/rerank",
             "raw_path": b"/v1/rerank", "query_string": b"", "root_path": "",
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 1),
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    answer: dict = {"body": b""}

    async def receive() -> dict:
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)                    # no disconnect while answering

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        else:
            answer["body"] += message.get("body", b"")

    return scope, receive, send, answer


def through_app(app, bodies: list[bytes]):
    """A callable that posts every body to `app` in turn, on one event loop."""
    loop = asyncio.new_event_loop()

    async def all_bodies() -> dict:
        for body in bodies:
            scope, receive, send, answer = prepared(body)
            await app(scope, receive, send)
        return answer

    answer = loop.run_until_complete(all_bodies())
    assert answer["status"] == 200, answer
    return lambda: loop.run_until_complete(all_bodies())


def layers(space: FeatureSpace, list_length: int, bodies: list[bytes]) -> dict:
    """The applications and calls of the endpoint's layers, by name (module docstring)."""
    constant = Response(b"{}", media_type="application/json")
    answer = RerankResponse(request_id=1, items=list(range(list_length)),
                            scores=[1.0] * list_length, predicted_utility=1.0, latency_ms=1.0)

    def limited(app: FastAPI) -> BodyLimit:
        return BodyLimit(app, limit=1_000_000, on_refuse=lambda: None)

    floor, parameter, parsed, model, serialised = (FastAPI() for _ in range(5))

    @floor.post("/v1/rerank")
    async def raw(request: Request) -> Response:
        await request.body()
        return constant

    @parameter.post("/v1/rerank")
    async def body_parameter(body: RerankRequest) -> Response:
        return constant

    @parsed.post("/v1/rerank")
    async def parse(request: Request) -> Response:
        parse_request(await request.body(), request.headers.get("content-type"))
        return constant

    @model.post("/v1/rerank", response_model=RerankResponse)
    async def response_model(request: Request) -> RerankResponse:
        await request.body()
        return answer

    @serialised.post("/v1/rerank", response_model=RerankResponse)
    async def pre_serialised(request: Request) -> Response:
        await request.body()
        return Response(answer.model_dump_json(), media_type="application/json")

    batcher = Batcher(StandIn(space, list_length))
    rows = [request_row(RerankRequest.model_validate_json(body), space, list_length, 10_000)
            for body in bodies]
    return {
        "route floor": through_app(limited(floor), bodies),
        "body parameter": through_app(limited(parameter), bodies),
        "parse_request": through_app(limited(parsed), bodies),
        "response_model": through_app(limited(model), bodies),
        "pre-serialised response": through_app(limited(serialised), bodies),
        "/v1/rerank, stand-in model": through_app(create_app(StandIn(space, list_length)),
                                                  bodies),
        "Batcher, stand-in model": lambda: [batcher.submit(row).result() for row in rows],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    info = read_run(args.run)
    space = FeatureSpace.from_dict(info["space"])
    table = pq.read_table(args.data).slice(0, args.requests)
    bodies = [json.dumps(request_json(table, row, space)).encode()
              for row in range(table.num_rows)]
    parsed = [RerankRequest.model_validate_json(body) for body in bodies]
    stacks = {
        "stdlib json + pydantic": lambda: [RerankRequest.model_validate(json.loads(body))
                                           for body in bodies],
        "pydantic JSON": lambda: [RerankRequest.model_validate_json(body) for body in bodies],
        "request_row": lambda: [request_row(request, space, info["list_length"], 10_000)
                                for request in parsed],
        **layers(space, info["list_length"], bodies),
    }
    print(f"{len(bodies)} bodies, {sum(map(len, bodies)) / len(bodies):,.0f} bytes on average")
    for name, call in stacks.items():
        timer = timeit.Timer(call, timer=time.process_time)
        seconds = min(timer.repeat(number=10, repeat=5)) / (10 * len(bodies))
        print(f"{name}: {1000 * seconds:.3f} ms per request")
    # Collected now rather than at the interpreter's exit, where, with the batchers' threads
    # still waiting on their queues, the process aborted after its last line ("terminate
    # called without an active exception"; torch 2.13, the same before this script's rows).
    gc.collect()


if __name__ == "__main__":
    main()
