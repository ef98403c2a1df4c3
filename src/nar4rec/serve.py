"""`nar4rec serve`: a trained run (PyTorch) or an export (onnxruntime) behind an HTTP API.

    POST /v1/rerank   one request: the user's features and its candidates' -> the ordered
                      item ids, each item's predicted utility and the list's
    GET  /healthz     liveness and what is loaded
    GET  /metrics     request counts by outcome, latency percentiles
    GET  /docs        the OpenAPI page (the schema: /openapi.json)

Input is checked before any model runs: a wrong type, a missing field, a feature the model
does not know, fewer candidates than the list length, more than `max_candidates`, a repeated
item or a body over `max_body_bytes` gets a 4xx whose `detail` says what and where. A
categorical value never seen in training is not an error: it maps to the "unknown" row, as in
training, and is counted in /metrics. The raw request becomes model inputs through the same
FeatureSpace encoding as training (one Arrow row in the request-log format).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from pathlib import Path
from typing import Annotated

import numpy as np
import pyarrow as pa
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from nar4rec.data.format import (
    CAND_CAT,
    CAND_NUM,
    EXPOSED,
    FEEDBACK,
    ITEM_ID,
    REQUEST_ID,
    UPSTREAM_SCORE,
    USER_CAT,
    USER_ID,
    USER_NUM,
)
from nar4rec.data.loader import UNKNOWN, FeatureSpace, RequestBatch
from nar4rec.errors import Nar4recError

Id = StrictInt | StrictStr
Value = StrictInt | StrictFloat | StrictStr | None


class User(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: Id
    features: dict[str, Value] = Field(default_factory=dict,
                                       description="every user feature of the model, by name")


class Candidate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: Id
    features: dict[str, Value] = Field(default_factory=dict,
                                       description="every candidate feature, by name")
    upstream_score: StrictFloat | StrictInt | None = Field(
        None, description="the ranking stage's score, when the model uses one")


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {
        "request_id": "r-1",
        "user": {"user_id": 17, "features": {"segment": 3, "activity_level": 2,
                                             "log_activity": 0.4}},
        "candidates": [
            {"item_id": 101, "features": {"topic": 4, "author": 77, "duration": 31.0},
             "upstream_score": 0.82},
            {"item_id": 205, "features": {"topic": 9, "author": 12, "duration": 12.5},
             "upstream_score": 0.41}]}})
    request_id: Id | None = None
    user: User
    candidates: Annotated[list[Candidate], Field(min_length=1)]


class RerankResponse(BaseModel):
    request_id: Id | None
    items: list[Id] = Field(description="item ids in the order to show them")
    scores: list[float] = Field(description="each item's predicted utility")
    predicted_utility: float = Field(description="the list's predicted utility")
    latency_ms: float


class BadInput(Exception):
    """Input the service refuses, with the HTTP status to answer."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


class Backend:
    """A loaded run or export: FeatureSpace, list length and a batched `rerank`."""

    def __init__(self, *, run: str | Path | None = None, export: str | Path | None = None,
                 threads: int = 1):
        if (run is None) == (export is None):
            raise Nar4recError("serve needs exactly one of --run and --export")
        if run is not None:
            from nar4rec.pipeline import load_run
            torch.set_num_threads(max(threads, 1))
            loaded = load_run(run)
            self.space, self.reranker, self.onnx = loaded.space, loaded.reranker, None
            self.list_length = loaded.info["list_length"]
            self.model, self.kind = loaded.info["model"], "pytorch"
        else:
            from nar4rec.export import OnnxReranker
            self.onnx = OnnxReranker(export, threads=threads)
            self.space = FeatureSpace.from_dict(self.onnx.manifest["space"])
            self.reranker = None
            self.list_length = self.onnx.manifest["list_length"]
            self.model, self.kind = self.onnx.manifest["model"], "onnxruntime"
        self.lock = threading.Lock()

    def rerank(self, batch: RequestBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lists (B, m), item scores (B, m), list utility (B,))."""
        with self.lock:                     # one model call at a time: 2 cores, no thrashing
            if self.onnx is not None:
                from nar4rec.export import FEATURE_INPUTS
                return self.onnx.rerank({k: getattr(batch, k).numpy() for k in FEATURE_INPUTS},
                                        with_scores=True)
            out = self.reranker.rerank(batch)
            return out.lists.numpy(), out.item_scores.numpy(), out.utility.numpy()


class Stats:
    """Request counts by outcome and the latencies of the last 10,000 answered requests."""

    def __init__(self) -> None:
        self.counts = {"ok": 0, "bad_input": 0, "error": 0}
        self.unseen_values = 0
        self.latencies: deque[float] = deque(maxlen=10_000)
        self.lock = threading.Lock()

    def snapshot(self) -> dict:
        with self.lock:
            latencies = np.array(self.latencies)
            counts = dict(self.counts)
            unseen = self.unseen_values
        percentiles = {f"p{q}": float(np.percentile(latencies, q)) if len(latencies) else None
                       for q in (50, 90, 99)}
        return {"requests": counts, "unseen_categorical_values": unseen,
                "latency_ms": {**percentiles, "count": len(latencies)}}


def encode_request(request: RerankRequest, space: FeatureSpace, list_length: int,
                   max_candidates: int) -> tuple[RequestBatch, int]:
    """One request -> a RequestBatch of one row; also the number of unseen categorical values.

    Raises BadInput naming the field when the request does not fit the model.
    """
    spec = space.spec
    candidates = request.candidates
    n = len(candidates)
    if n < list_length:
        raise BadInput(f"candidates: {n} given, the model shows {list_length}: at least that "
                       "many are needed")
    if n > max_candidates:
        raise BadInput(f"candidates: {n} given, at most {max_candidates} are accepted", 413)
    ids = [c.item_id for c in candidates]
    if len(set(ids)) != n:
        raise BadInput("candidates: an item_id appears twice")
    if len({type(i) for i in ids}) > 1:
        raise BadInput("candidates: item ids mix integers and strings")
    user_columns = _feature_columns("user.features", request.user.features, spec.user_cat,
                                    spec.user_num)
    cand_columns: dict[str, list] = {f: [] for f in (*spec.cand_cat, *spec.cand_num)}
    for index, candidate in enumerate(candidates):
        values = _feature_columns(f"candidates[{index}].features", candidate.features,
                                  spec.cand_cat, spec.cand_num)
        for name, value in values.items():
            cand_columns[name].append(value)
    scores = [c.upstream_score for c in candidates]
    if spec.has_upstream_score and any(s is None for s in scores):
        missing = next(i for i, s in enumerate(scores) if s is None)
        raise BadInput(f"candidates[{missing}].upstream_score: required by this model")
    if any(s is not None and not math.isfinite(s) for s in scores):
        raise BadInput("upstream_score: must be a finite number")
    columns: dict[str, pa.Array] = {
        REQUEST_ID: pa.array([0]), USER_ID: pa.array([request.user.user_id]),
        ITEM_ID: pa.array([ids])}
    for name in spec.user_cat:
        columns[USER_CAT + name] = pa.array([user_columns[name]])
    for name in spec.user_num:
        columns[USER_NUM + name] = pa.array([user_columns[name]], pa.float64())
    for name in spec.cand_cat:
        columns[CAND_CAT + name] = pa.array([cand_columns[name]])
    for name in spec.cand_num:
        columns[CAND_NUM + name] = pa.array([cand_columns[name]], pa.list_(pa.float64()))
    if spec.has_upstream_score:
        columns[UPSTREAM_SCORE] = pa.array([[float(s) for s in scores]], pa.list_(pa.float64()))
    columns[EXPOSED] = pa.array([[]], pa.list_(pa.int32()))
    for behaviour in spec.behaviours:
        columns[FEEDBACK + behaviour] = pa.array([[]], pa.list_(pa.float32()))
    try:
        batch = space.encode(pa.table(columns))
    except (pa.ArrowException, ValueError, TypeError) as exc:
        raise BadInput(f"the request's values do not fit the model's features ({exc})") \
            from None
    unseen = int((batch.cand_cat == UNKNOWN).sum() + (batch.user_cat == UNKNOWN).sum())
    return batch, unseen


def _feature_columns(where: str, given: dict, categorical, numeric) -> dict:
    """Check one user's or candidate's features against the model's; return them by name."""
    known = set(categorical) | set(numeric)
    unknown = sorted(set(given) - known)
    if unknown:
        raise BadInput(f"{where}: unknown feature {unknown[0]!r} (this model's: "
                       f"{', '.join(sorted(known)) or 'none'})")
    missing = sorted(known - set(given))
    if missing:
        raise BadInput(f"{where}: missing feature {missing[0]!r} (use null for an unknown "
                       "value)")
    for name in numeric:
        value = given[name]
        if value is not None and (isinstance(value, str) or not math.isfinite(value)):
            raise BadInput(f"{where}.{name}: a finite number or null expected, got {value!r}")
    for name in categorical:
        value = given[name]
        if isinstance(value, float):
            raise BadInput(f"{where}.{name}: an integer or string category expected, got "
                           f"{value!r}")
    return given


def create_app(backend: Backend, *, max_candidates: int = 1000,
               max_body_bytes: int = 1_000_000) -> FastAPI:
    """The FastAPI application around a loaded backend."""
    app = FastAPI(title="nar4rec", version="1",
                  description="NAR4Rec reranking: POST a request's candidates, get the list.")
    stats = Stats()

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            with stats.lock:
                stats.counts["bad_input"] += 1
            return JSONResponse({"detail": f"body over {max_body_bytes} bytes"}, 413)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        with stats.lock:
            stats.counts["bad_input"] += 1
        messages = ["body" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}"
                                     for p in error["loc"][1:]) + f": {error['msg']}"
                    for error in exc.errors()]
        return JSONResponse({"detail": "; ".join(messages[:10])}, 422)

    @app.exception_handler(BadInput)
    async def refused(request: Request, exc: BadInput):
        with stats.lock:
            stats.counts["bad_input"] += 1
        return JSONResponse({"detail": str(exc)}, exc.status)

    @app.post("/v1/rerank", response_model=RerankResponse)
    def rerank(body: RerankRequest) -> RerankResponse:
        started = time.perf_counter()
        batch, unseen = encode_request(body, backend.space, backend.list_length,
                                       max_candidates)
        try:
            lists, scores, utility = backend.rerank(batch)
        except Exception:
            with stats.lock:
                stats.counts["error"] += 1
            raise
        row = lists[0]
        placed = row >= 0
        items = [body.candidates[int(i)].item_id for i in row[placed]]
        latency = (time.perf_counter() - started) * 1000
        with stats.lock:
            stats.counts["ok"] += 1
            stats.unseen_values += unseen
            stats.latencies.append(latency)
        return RerankResponse(request_id=body.request_id, items=items,
                              scores=[float(s) for s in scores[0][placed]],
                              predicted_utility=float(utility[0]), latency_ms=latency)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "model": backend.model, "backend": backend.kind,
                "list_length": backend.list_length}

    @app.get("/metrics")
    def metrics() -> dict:
        return stats.snapshot()

    return app


def request_json(table: pa.Table, row: int, space: FeatureSpace) -> dict:
    """The /v1/rerank body for one row of a request-log table (examples and load tests)."""
    spec = space.spec
    record = table.slice(row, 1).to_pylist()[0]
    user = {"user_id": record[USER_ID],
            "features": {**{f: record[USER_CAT + f] for f in spec.user_cat},
                         **{f: record[USER_NUM + f] for f in spec.user_num}}}
    candidates = []
    for index, item in enumerate(record[ITEM_ID]):
        features = {**{f: record[CAND_CAT + f][index] for f in spec.cand_cat},
                    **{f: record[CAND_NUM + f][index] for f in spec.cand_num}}
        candidate = {"item_id": item, "features": features}
        if spec.has_upstream_score:
            candidate["upstream_score"] = record[UPSTREAM_SCORE][index]
        candidates.append(candidate)
    return {"request_id": record[REQUEST_ID], "user": user, "candidates": candidates}
