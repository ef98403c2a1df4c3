"""`nar4rec serve`: a trained run (PyTorch) or an export (onnxruntime) behind an HTTP API.

    POST /v1/rerank   one request: the user's features and its candidates' -> the ordered
                      item ids, each item's predicted utility and the list's
    GET  /healthz     liveness and what is loaded
    GET  /metrics     request counts by outcome, latency percentiles
    GET  /docs        the OpenAPI page (the schema: /openapi.json)

Input is checked before any model runs: a wrong type, a missing field, a feature the model
does not know, a number beyond float32's range, fewer candidates than the list length, more
than `max_candidates`, a repeated item or a body over `max_body_bytes` gets a 4xx whose
`detail` says what and where; so does a request whose numbers, though within range, drive the
model's scores to infinity or NaN (the detail names its value farthest from training). A
body announced by its Content-Length but not all sent within `body_seconds` gets a 408. A
categorical value never seen in training is not an error: it maps to the "unknown" row, as in
training, and is counted in /metrics. The raw request becomes model inputs through the same
FeatureSpace encoding as training (one Arrow row in the request-log format).

Requests that arrive while the model is busy are encoded and reranked together, in one call
(`Batcher`): a request alone waits for nothing, and under load the per-call costs are shared.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import pyarrow as pa
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

from nar4rec.data.batch import UNKNOWN, RequestBatch
from nar4rec.data.features import FeatureSpace
from nar4rec.data.format import (
    CAND_CAT,
    CAND_NUM,
    FLOAT32_MAX,
    ITEM_ID,
    REQUEST_ID,
    UPSTREAM_SCORE,
    USER_CAT,
    USER_ID,
    USER_NUM,
)
from nar4rec.errors import Nar4recError
from nar4rec.exploration import Exploration, explore

Id = StrictInt | StrictStr
Value = StrictInt | StrictFloat | StrictStr | None
EXTREME_DEVIATIONS = 1e4     # a value this many standard deviations out explains non-finite scores


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
    scores: list[float | None] = Field(description="each item's predicted utility in the "
                                       "list (a baseline: its own score of the item); null "
                                       "for an explored list")
    predicted_utility: float | None = Field(description="the list's predicted utility; null "
                                            "for a model that predicts none (the baselines) "
                                            "and for an explored list")
    latency_ms: float
    explored: bool | None = Field(None, description="exploring mode (serve --explore): True "
                                  "when the list is a Plackett-Luce draw over the upstream "
                                  "order, False when it is the model's")
    log_propensity: float | None = Field(None, description="exploring mode: log-probability "
                                         "of the list under the exploring policy")
    prefix_log_propensity: list[float] | None = Field(
        None, description="exploring mode: log-probability of each prefix of the list")
    logging_marginal: list[list[float]] | None = Field(
        None, description="exploring mode: for each candidate, in the request's order, its "
        "probability at each position; log these with the feedback for `nar4rec ope`")


class ErrorDetail(BaseModel):
    detail: str = Field(description="what is wrong and where, e.g. `body.user: Field "
                        "required` or `candidates[1].features.duration: ...`")


ERRORS = {408: "the body did not all arrive in time",            # /v1/rerank's, for OpenAPI
          413: "a body or a candidate list over the service's limits",
          422: "input the model cannot take: the detail names the field"}

SCHEMA_REF = "#/components/schemas/{model}"           # where OpenAPI keeps the models
REQUEST_BODY = {"required": True, "content": {"application/json": {"schema": {
    "$ref": SCHEMA_REF.format(model="RerankRequest")}}}}  # /v1/rerank's, as FastAPI writes it


def parse_request(content: bytes, content_type: str | None) -> RerankRequest:
    """A /v1/rerank body -> RerankRequest, parsed and validated by pydantic-core in one pass.

    Bad input raises FastAPI's RequestValidationError, its locations under "body" as for a
    body parameter (`body.user: Field required`, `body.candidates[1].features.duration: ...`),
    so that one handler words and counts every 422: an empty body is a missing one, bytes
    that are not JSON get pydantic's reason and position (`body: Invalid JSON: key must be a
    string at line 1 column 2`), and a body sent as anything but JSON (`application/json` or
    `application/*+json`, a charset or other parameter allowed) is refused as such.
    """
    if not content:
        raise RequestValidationError([{"type": "missing", "loc": ("body",),
                                       "msg": "Field required", "input": None}])
    media = (content_type or "").partition(";")[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/")
                                            and media.endswith("+json")):
        raise RequestValidationError([{
            "type": "content_type", "loc": ("body",), "input": None,
            "msg": f"a JSON body expected (Content-Type: application/json), got "
                   f"{content_type or 'no Content-Type'!r}"}])
    try:
        return RerankRequest.model_validate_json(content)
    except ValidationError as exc:
        raise RequestValidationError([{**error, "loc": ("body", *error["loc"])}
                                      for error in exc.errors(include_url=False)]) from None


class BadInput(Exception):
    """Input the service refuses, with the HTTP status to answer."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


class Backend:
    """A loaded run or export: FeatureSpace, list length and a batched `rerank`.

    device: where a run's models run, "cpu", "cuda" or "auto"; on a GPU each batch is padded
        to a few fixed shapes and replayed from CUDA graphs (`cuda_graphs.GraphedReranker`).
        An export runs on the CPU (onnxruntime's CPU package).
    max_batch: the most requests of one model call (`Batcher`), the largest graph captured.
    exploration: exploring mode (`exploration.explore`): every answer carries the shown list's
        propensities; `seed` seeds its draws (None: fresh ones).
    """

    def __init__(self, *, run: str | Path | None = None, export: str | Path | None = None,
                 threads: int = 1, device: str = "cpu", max_batch: int = 64,
                 exploration: Exploration | None = None, seed: int | None = None):
        if (run is None) == (export is None):
            raise Nar4recError("serve needs exactly one of --run and --export")
        # what another process needs to load the same backend (`ModelProcess`)
        self.args = {"run": run, "export": export, "threads": threads, "device": device,
                     "max_batch": max_batch, "exploration": exploration, "seed": seed}
        self.exploration = exploration
        self.rng = np.random.default_rng(seed)
        self.graphed = None
        if run is not None:
            from nar4rec.runs import load_run
            from nar4rec.train import resolve_device
            torch.set_num_threads(max(threads, 1))
            where = resolve_device(device)
            loaded = load_run(run)
            self.space, self.system, self.onnx = loaded.space, loaded.system.to(where), None
            self.list_length = loaded.info["list_length"]
            self.model, self.kind = loaded.info["model"], "pytorch"
            if where.type == "cuda":
                from nar4rec.cuda_graphs import GraphedReranker
                self.graphed = GraphedReranker(self.system, buckets=True, max_batch=max_batch)
                self.kind = "pytorch, CUDA graphs"
        else:
            from nar4rec.export import OnnxReranker
            if device not in ("cpu", "auto"):
                raise Nar4recError(f"an export runs on the CPU (onnxruntime); serve --run on "
                                   f"--device {device}")
            self.onnx = OnnxReranker(export, threads=threads)
            self.space = FeatureSpace.from_dict(self.onnx.manifest["space"])
            self.system = None
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
            out = (self.graphed or self.system).rerank(batch)
            return (out.lists.cpu().numpy(), out.item_scores.cpu().numpy(),
                    out.utility.cpu().numpy())


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


def request_row(request: RerankRequest, space: FeatureSpace, list_length: int,
                max_candidates: int) -> dict[str, object]:
    """Check one request against the model; return it as one request-log row (column -> value).

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
        first: dict = {}
        for index, item in enumerate(ids):
            if item in first:
                raise BadInput(f"candidates[{index}].item_id: {item!r} appears twice (also "
                               f"candidates[{first[item]}]); a candidate can be shown once")
            first[item] = index
    if len({type(i) for i in ids}) > 1:
        raise BadInput("candidates: item ids mix integers and strings")
    user = request.user.features
    _check_names("user.features", user, spec.user_cat, spec.user_num)
    known = {*spec.cand_cat, *spec.cand_num}
    features = [c.features for c in candidates]
    for index, given in enumerate(features):
        if given.keys() != known:
            _check_names(f"candidates[{index}].features", given, spec.cand_cat,
                         spec.cand_num)                      # raises, naming the feature
    row: dict[str, object] = {REQUEST_ID: 0, USER_ID: request.user.user_id, ITEM_ID: ids}
    for prefix, names, numeric in ((USER_CAT, spec.user_cat, False),
                                   (USER_NUM, spec.user_num, True)):
        for name in names:
            _check_values(lambda _: "user.features", name, [user[name]], numeric)
            row[prefix + name] = user[name]
    for prefix, names, numeric in ((CAND_CAT, spec.cand_cat, False),
                                   (CAND_NUM, spec.cand_num, True)):
        for name in names:
            values = [given[name] for given in features]
            _check_values(lambda i: f"candidates[{i}].features", name, values, numeric)
            row[prefix + name] = values
    scores = [c.upstream_score for c in candidates]
    if spec.has_upstream_score and None in scores:
        missing = next(i for i, s in enumerate(scores) if s is None)
        raise BadInput(f"candidates[{missing}].upstream_score: required by this model")
    for index, score in enumerate([] if _within_float32(scores) else scores):
        if score is not None and not _representable(score):
            raise BadInput(f"candidates[{index}].upstream_score: a finite number within "
                           f"float32's range expected, got {score!r}")
    if spec.has_upstream_score:
        row[UPSTREAM_SCORE] = [float(s) for s in scores]
    return row


def encode_rows(rows: list[dict[str, object]], space: FeatureSpace) -> RequestBatch:
    """Rows from `request_row` -> one RequestBatch, with the FeatureSpace encoding of training
    (`FeatureSpace.encode_rows`). Raises BadInput when the values do not fit."""
    try:
        return space.encode_rows(rows)
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadInput(f"the request's values do not fit the model's features ({exc})") \
            from None


def unseen_values(batch: RequestBatch) -> np.ndarray:
    """(B,) categorical values of each request that the model never saw in training."""
    return ((batch.cand_cat.numpy() == UNKNOWN).sum(axis=(1, 2))
            + (batch.user_cat.numpy() == UNKNOWN).sum(axis=1))


def farthest_value(row: dict[str, object], space: FeatureSpace) -> tuple[str, float, float]:
    """The numeric value of a `request_row` farthest from training: (where, value, distance),
    the distance in the training split's standard deviations (the raw magnitude for an
    upstream score, which the model takes unscaled)."""
    spec = space.spec
    found = ("", 0.0, 0.0)
    groups = [(lambda _: "user.features", name, [row[USER_NUM + name]], space.user_num[name])
              for name in spec.user_num]
    groups += [(lambda i: f"candidates[{i}].features", name, row[CAND_NUM + name],
                space.cand_num[name]) for name in spec.cand_num]
    if spec.has_upstream_score:
        groups.append((lambda i: f"candidates[{i}]", "upstream_score", row[UPSTREAM_SCORE],
                       None))
    for where, name, values, stats in groups:
        for index, value in enumerate(values):
            if value is None:
                continue
            distance = abs(value) if stats is None else abs(value - stats.mean) / stats.std
            if distance > found[2]:
                found = (f"{where(index)}.{name}", value, distance)
    return found


def _number_or_null(value) -> bool:
    return value is None or (not isinstance(value, str) and _representable(value))


def _representable(value: float | int) -> bool:
    """Finite and within float32's range: the model computes in float32."""
    try:
        return math.isfinite(value) and abs(value) <= FLOAT32_MAX
    except OverflowError:                   # an integer too large for a float
        return False


_NUMBERS = {int, float}
_CATEGORIES = {int, str, type(None)}


def _within_float32(values: list) -> bool:
    """True when every value is an int or a float, finite and within float32's range: the
    common case, decided by loops in C (types, min, max, and the sum, which a NaN makes NaN).
    False says nothing: a null, a string or a misfit among them is for a value-by-value look.
    (Checking every value in Python, `request_row` took 0.09 ms for 60 candidates; with this,
    0.06: benchmarks/request_decoding.py.)"""
    return (bool(values) and set(map(type, values)) <= _NUMBERS
            and -FLOAT32_MAX <= min(values) and max(values) <= FLOAT32_MAX
            and math.isfinite(sum(values)))


def _check_names(where: str, given: dict, categorical, numeric) -> None:
    """One user's or candidate's features must be exactly the model's."""
    known = set(categorical) | set(numeric)
    unknown = sorted(set(given) - known)
    if unknown:
        raise BadInput(f"{where}: unknown feature {unknown[0]!r} (this model's: "
                       f"{', '.join(sorted(known)) or 'none'})")
    missing = sorted(known - set(given))
    if missing:
        raise BadInput(f"{where}: missing feature {missing[0]!r} (use null for an unknown "
                       "value)")


def _check_values(where: Callable[[int], str], name: str, values: list, numeric: bool) -> None:
    """Values of one feature (the i-th at `where(i)`): a numeric feature takes finite numbers
    or null, a categorical one integers, strings or null; the first misfit raises BadInput.

    The common case is settled over the whole list at once (`_within_float32`, or the
    values' types); anything else is looked at value by value, for the message."""
    if _within_float32(values) if numeric else set(map(type, values)) <= _CATEGORIES:
        return
    for index, value in enumerate(values):
        if numeric and not _number_or_null(value):
            raise BadInput(f"{where(index)}.{name}: a finite number within float32's range "
                           f"(|x| <= {FLOAT32_MAX:.8g}) or null expected, got {value!r}")
        if not numeric and isinstance(value, float):
            raise BadInput(f"{where(index)}.{name}: an integer or string category expected, "
                           f"got {value!r}")


class Batcher:
    """Serves the requests that arrive while the model is busy as one batch.

    Each request is queued; one worker thread takes everything queued (up to `max_batch`),
    encodes it in one FeatureSpace call and reranks it in one model call, then answers each
    request. Alone, a request is served at once (no waiting window); under load, the cost of
    encoding and of the model's fixed per-call overhead is shared by the batch. A batch whose
    encoding fails is retried request by request, so one bad request fails alone.
    """

    def __init__(self, backend: Backend, max_batch: int = 64, *,
                 process: ModelProcess | None = None, start: bool = True):
        self.backend, self.max_batch, self.process = backend, max_batch, process
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        if start:
            threading.Thread(target=self._work, name="nar4rec-batcher", daemon=True).start()

    def submit(self, row: dict[str, object]) -> Future:
        """Queue one row from `request_row`; the future gets (list, scores, utility, unseen,
        propensities: a dict in exploring mode, else None) or raises BadInput / the model's
        error."""
        future: Future = Future()
        self.queue.put((row, future))
        return future

    def _work(self) -> None:
        while True:
            pending = [self.queue.get()]
            while len(pending) < self.max_batch:
                try:
                    pending.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            if self.process is None:
                self._serve(pending)
                continue
            try:
                outcomes = self.process.serve([row for row, _ in pending])
            except Exception as exc:                      # the model process is gone: 500s
                outcomes = [exc] * len(pending)
            for (_, future), outcome in zip(pending, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    def _serve(self, pending: list[tuple[dict, Future]]) -> None:
        try:
            batch = encode_rows([row for row, _ in pending], self.backend.space)
        except BadInput as exc:
            if len(pending) > 1:
                for one in pending:
                    self._serve([one])
            else:
                pending[0][1].set_exception(exc)
            return
        try:
            lists, scores, utility = self.backend.rerank(batch)
        except Exception as exc:                          # the model failed: a 500 for each
            for _, future in pending:
                future.set_exception(exc)
            return
        unseen = unseen_values(batch)
        logged = [None] * len(pending)
        if self.backend.exploration is not None:
            lists, scores, utility, logged = self._explore(batch, lists, scores, utility)
        for i, (_, future) in enumerate(pending):
            future.set_result((lists[i], scores[i], float(utility[i]), int(unseen[i]),
                               logged[i]))

    def _explore(self, batch: RequestBatch, lists, scores, utility):
        """The exploring policy's lists (an explored one has no model scores) and each
        request's propensities, its candidates in the request's order."""
        with self.backend.lock:                   # the generator of random numbers is shared
            out = explore(lists, batch.upstream_score.numpy(), batch.cand_mask.numpy(),
                          self.backend.exploration, self.backend.rng)
        scores = np.where(out.explored[:, None], np.nan, scores)
        utility = np.where(out.explored, np.nan, utility)
        counts = batch.cand_mask.sum(1).tolist()
        logged = [{"explored": bool(out.explored[i]),
                   "log_propensity": float(out.log_propensity[i]),
                   "prefix_log_propensity": out.prefix_log_propensity[i][
                       out.lists[i] >= 0].tolist(),
                   "logging_marginal": out.marginal[i, :counts[i],
                                                    :int((out.lists[i] >= 0).sum())].tolist()}
                  for i in range(len(lists))]
        return out.lists, scores, utility, logged


class ModelProcess:
    """The backend in a process of its own, for `Batcher` (`serve --model-process`).

    The service's event loop and a model thread share one interpreter lock, so a service
    with the model in its own process spends no lock time on the model: the event loop parses
    and checks requests on one core while the model encodes and reranks on another. The
    batcher's thread sends each batch's rows through a pipe and waits (the lock released);
    the process (spawned, so that torch's threads start clean) loads its own `Backend` from
    the same arguments and answers with each request's result or error. It ends when the pipe
    closes, so it does not outlive the service, however that ends.
    """

    def __init__(self, backend_args: dict):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_model_process, args=(child, backend_args),
                                       name="nar4rec-model", daemon=True)
        self.process.start()
        child.close()
        try:
            status, message = self.conn.recv()
        except EOFError:
            status, message = "error", "it exited while loading"
        if status != "ready":
            self.process.join(5)
            raise Nar4recError(f"the model process could not start: {message}")

    def serve(self, rows: list[dict[str, object]]) -> list:
        """Each row's (list, scores, utility, unseen, propensities), or the exception to
        raise for it."""
        self.conn.send(rows)
        return [outcome.exception() if isinstance(outcome, _Failed) else outcome
                for outcome in self.conn.recv()]

    def close(self) -> None:
        self.conn.close()
        self.process.join(5)


@dataclass(frozen=True)
class _Failed:
    """A request's error, as the model process sends it back (an exception with extra
    fields does not survive pickling whole)."""

    bad_input: bool
    message: str
    status: int

    def exception(self) -> Exception:
        return BadInput(self.message, self.status) if self.bad_input else \
            RuntimeError(self.message)


def _model_process(conn, backend_args: dict) -> None:
    """The model process's loop: batches of rows in, outcomes out, until the pipe closes."""
    try:
        backend = Backend(**backend_args)
    except Exception as exc:
        conn.send(("error", str(exc)))
        return
    conn.send(("ready", ""))
    batcher = Batcher(backend, start=False)
    while True:
        try:
            rows = conn.recv()
        except (EOFError, OSError):                       # the service has gone
            return
        pending = [(row, Future()) for row in rows]
        batcher._serve(pending)
        outcomes = []
        for _, future in pending:
            error = future.exception()
            if error is None:
                outcomes.append(future.result())
            else:
                outcomes.append(_Failed(isinstance(error, BadInput), str(error),
                                        getattr(error, "status", 500)))
        conn.send(outcomes)


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes gets a 413, judged by its Content-Length
    or, for a body sent in chunks, as soon as the bytes read so far pass the limit;
    `on_refuse` is called for each refusal. (A plain ASGI layer: Starlette's
    @app.middleware("http") costs about a millisecond per request.)

    Before the 413 goes out, the rest of the body is read and dropped, up to `drain_bytes` in
    all (default: 4x the limit, at least 64 MiB) and for at most `drain_seconds`: a client that
    sends its whole body before it reads the answer (urllib, requests, http.client) then reads
    the 413, where closing on unread bytes would reset the connection under it (a broken
    pipe). A body announced longer than that, found longer or slower, or sent with
    `Expect: 100-continue` (never invited) gets the 413 at once with `Connection: close`.

    A body within the limit must arrive whole within `body_seconds` of the application's first
    read: a client that stalls (a Content-Length that promises more than it sends) gets a 408
    with `Connection: close` instead of holding the request open forever.
    """

    def __init__(self, app, *, limit: int, on_refuse: Callable[[], None],
                 drain_bytes: int | None = None, drain_seconds: float = 5.0,
                 body_seconds: float = 10.0):
        self.app, self.limit, self.on_refuse = app, limit, on_refuse
        self.drain_bytes = max(4 * limit, 64 * 2**20) if drain_bytes is None else drain_bytes
        self.drain_seconds, self.body_seconds = drain_seconds, body_seconds

    def refusal(self, drained: bool) -> HTTPException:
        self.on_refuse()
        return HTTPException(413, f"body over {self.limit} bytes",
                             headers=None if drained else {"Connection": "close"})

    async def drain(self, receive, received: int, more_body: bool) -> bool:
        """Read and drop the rest of a body of which `received` bytes were read, within the
        bounds; True when the whole body has come."""
        try:
            async with asyncio.timeout(self.drain_seconds):
                while more_body and received <= self.drain_bytes:
                    message = await receive()
                    if message["type"] != "http.request":     # the client went away
                        return False
                    received += len(message.get("body", b""))
                    more_body = message.get("more_body", False)
        except TimeoutError:
            return False
        return not more_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            drainable = (length.isdigit() and int(length) <= self.drain_bytes
                         and headers.get(b"expect", b"").lower() != b"100-continue")
            refused = self.refusal(drainable and await self.drain(receive, 0, True))
            response = JSONResponse({"detail": refused.detail}, refused.status_code,
                                    headers=refused.headers)
            return await response(scope, receive, send)
        received, deadline, complete = 0, None, False

        async def counted() -> dict:
            nonlocal received, deadline, complete
            if complete:                        # the body is in: later reads wait for nothing
                return await receive()
            if deadline is None:
                deadline = asyncio.get_running_loop().time() + self.body_seconds
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                self.on_refuse()
                raise HTTPException(408, f"the body did not arrive within {self.body_seconds:g} "
                                    "s", headers={"Connection": "close"}) from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            received += len(message.get("body", b""))
            if received > self.limit:       # FastAPI answers an HTTPException from the body
                more_body = message.get("more_body", False)
                raise self.refusal(await self.drain(receive, received, more_body))
            return message

        return await self.app(scope, counted, send)


def create_app(backend: Backend, *, max_candidates: int = 1000,
               max_body_bytes: int = 1_000_000, max_batch: int = 64,
               body_seconds: float = 10.0, model_process: bool = False) -> FastAPI:
    """The FastAPI application around a loaded backend; concurrent requests are reranked
    together, at most `max_batch` per model call (`Batcher`); a body must arrive within
    `body_seconds` (`BodyLimit`)."""
    app = FastAPI(title="nar4rec", version="1",
                  description="NAR4Rec reranking: POST a request's candidates, get the list.")
    stats = Stats()
    batcher = Batcher(backend, max_batch=max_batch,
                      process=ModelProcess(backend.args) if model_process else None)
    app.state.model_process = batcher.process          # closed by whoever owns the app

    def count_refusal() -> None:
        with stats.lock:
            stats.counts["bad_input"] += 1

    app.add_middleware(BodyLimit, limit=max_body_bytes, on_refuse=count_refusal,
                       body_seconds=body_seconds)

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

    @app.post("/v1/rerank", response_model=RerankResponse,
              responses={status: {"model": ErrorDetail, "description": text}
                         for status, text in ERRORS.items()},
              openapi_extra={"requestBody": REQUEST_BODY})
    async def rerank(request: Request) -> Response:
        # The body is read and validated here rather than declared as a `RerankRequest`
        # parameter: FastAPI's way (stdlib json.loads, then pydantic's validation of the
        # Python objects) cost 0.20 ms per 18.8 KB request, pydantic-core parsing the bytes
        # itself 0.09 (benchmarks/request_decoding.py). The schema still says what the body
        # is (REQUEST_BODY, `openapi` below).
        body = parse_request(await request.body(), request.headers.get("content-type"))
        started = time.perf_counter()
        row = request_row(body, backend.space, backend.list_length, max_candidates)
        try:
            placed_list, scores, utility, unseen, logged = await asyncio.wrap_future(
                batcher.submit(row))
        except BadInput:
            raise
        except Exception:
            with stats.lock:
                stats.counts["error"] += 1
            raise
        placed = placed_list >= 0
        explored = logged is not None and logged["explored"]
        if not explored and (not np.isfinite(scores[placed]).all() or math.isinf(utility)):
            where, value, distance = farthest_value(row, backend.space)
            if distance > EXTREME_DEVIATIONS:   # the request's doing: a 422 that names it
                raise BadInput(f"{where}: {value!r} is too far from the training data (about "
                               f"{distance:.2g} times its spread): the model's scores come "
                               "out infinite or NaN")
            with stats.lock:
                stats.counts["error"] += 1
            raise RuntimeError("the model returned non-finite scores")
        items = [body.candidates[int(i)].item_id for i in placed_list[placed]]
        latency = (time.perf_counter() - started) * 1000
        with stats.lock:
            stats.counts["ok"] += 1
            stats.unseen_values += unseen
            stats.latencies.append(latency)
        answer = RerankResponse(request_id=body.request_id, items=items,
                                scores=[None if explored else float(s) for s in scores[placed]],
                                predicted_utility=None if math.isnan(utility) else utility,
                                latency_ms=latency, **(logged or {}))
        # Serialised here, by pydantic-core: `response_model` above only documents the answer.
        # (FastAPI before 0.130 would validate it again and encode it through
        # jsonable_encoder and json.dumps; since then it is as cheap as this.)
        return Response(answer.model_dump_json(), media_type="application/json")

    default_openapi = app.openapi

    def openapi() -> dict:
        """FastAPI's schema, plus RerankRequest and the models it refers to, which no
        parameter declares any more (the endpoint parses its body itself)."""
        if app.openapi_schema is None:
            schema = default_openapi()
            models = RerankRequest.model_json_schema(ref_template=SCHEMA_REF)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(models.pop("$defs", {}))
            components["RerankRequest"] = models
        return app.openapi_schema

    app.openapi = openapi

    @app.get("/healthz")
    def healthz() -> dict:
        exploring = backend.exploration
        return {"status": "ok", "model": backend.model, "backend": backend.kind,
                "list_length": backend.list_length,
                "exploration": None if exploring is None else
                {"epsilon": exploring.epsilon, "temperature": exploring.temperature}}

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
