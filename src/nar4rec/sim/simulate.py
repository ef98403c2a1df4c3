"""`nar4rec simulate`: write train/valid/test request logs, the ground truth and a summary.

Requests are generated in chunks in time order and streamed to Parquet, so memory does not grow
with the number of requests. The test split also gets the oracle's near-best list of every
request (oracle.parquet), so that any method's lists can be compared with it later.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from nar4rec.config import SUMMARY_FILE
from nar4rec.data.format import (
    CAND_CAT,
    CAND_NUM,
    EXPOSED,
    FEEDBACK,
    ITEM_ID,
    LOG_PROPENSITY,
    LOGGING_PREFIX,
    LOGGING_SCORE,
    LOGGING_TEMPERATURE,
    REQUEST_ID,
    TIMESTAMP,
    UPSTREAM_SCORE,
    USER_CAT,
    USER_ID,
    USER_NUM,
    FormatSpec,
    RequestLogWriter,
    list_array,
)
from nar4rec.errors import Nar4recError
from nar4rec.io import atomic_dir
from nar4rec.propensity import pl_prefix_log_probs
from nar4rec.sim.movielens import build_movielens_world
from nar4rec.sim.oracle import itemwise_top, oracle
from nar4rec.sim.policy import logging_logits, plackett_luce, sample_feedback, sample_requests
from nar4rec.sim.presets import SimConfig
from nar4rec.sim.world import TRUTH_DIR, WORLD_FILE, World, build_synthetic_world

ORACLE_FILE = "oracle_test.parquet"


def build_world(config: SimConfig, seed: int) -> World:
    rng = np.random.default_rng([seed, 0])
    if config.preset == "movielens":
        return build_movielens_world(config, rng)
    return build_synthetic_world(config, rng)


def format_spec(world: World) -> FormatSpec:
    c = world.config
    return FormatSpec(
        behaviours=c.behaviours,
        utility_weights=dict(c.utility_weights),
        user_cat=tuple(world.user_cat),
        user_num=tuple(world.user_num),
        cand_cat=tuple(world.item_cat),
        cand_num=tuple(world.item_num),
        has_upstream_score=True,
        has_log_propensity=True,
        has_logging_score=True,
        has_logging_prefix=True,
        extra={"source": f"nar4rec simulate --preset {c.preset}",
               "ground_truth": f"{TRUTH_DIR}/{WORLD_FILE}"},
    )


def split_sizes(config: SimConfig, requests: int) -> dict[str, int]:
    """Requests per split; every split gets at least one, or this is an error."""
    valid = int(round(requests * config.valid_fraction))
    test = int(round(requests * config.test_fraction))
    sizes = {"train": requests - valid - test, "valid": valid, "test": test}
    empty = [split for split, size in sizes.items() if size < 1]
    if empty:
        raise Nar4recError(
            f"{requests} requests leave the {', '.join(empty)} split empty with "
            f"valid_fraction={config.valid_fraction} and test_fraction={config.test_fraction}: "
            "use more --requests or larger fractions")
    return sizes


@dataclasses.dataclass
class _Totals:
    """Running sums over the test split, for the summary."""

    requests: int = 0
    fallbacks: int = 0          # test requests where the search lost to a simpler list
    utility: dict[str, float] = dataclasses.field(default_factory=dict)
    behaviours: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def add(self, name: str, per_request_utility: np.ndarray,
            per_request_behaviours: np.ndarray) -> None:
        self.utility[name] = self.utility.get(name, 0.0) + float(per_request_utility.sum())
        self.behaviours[name] = self.behaviours.get(name, 0.0) + \
            per_request_behaviours.sum(axis=0)

    def means(self, behaviours: tuple[str, ...]) -> tuple[dict, dict]:
        n = max(self.requests, 1)
        utility = {k: v / n for k, v in self.utility.items()}
        per_behaviour = {k: {b: float(v[i] / n) for i, b in enumerate(behaviours)}
                         for k, v in self.behaviours.items()}
        return utility, per_behaviour


def simulate(config: SimConfig, requests: int, seed: int, out_dir: str | Path, *,
             overwrite: bool = False, progress: bool | None = None) -> dict:
    """Simulate `requests` requests into `out_dir`; return the summary that is also written."""
    started = time.perf_counter()
    world = build_world(config, seed)
    config = world.config
    spec = format_spec(world)
    sizes = split_sizes(config, requests)
    totals = _Totals()
    oracle_method = ""
    start_ms = int(datetime.fromisoformat(config.start_date).replace(tzinfo=UTC).timestamp()
                   * 1000)
    span_ms = config.days * 86_400_000

    with atomic_dir(out_dir, overwrite=overwrite) as tmp, _oracle_executor(world) as oracles:
        (tmp / TRUTH_DIR).mkdir()
        bar = tqdm(total=requests, unit="req", desc="simulate",
                   disable=None if progress is None else not progress)
        starts = {"train": 0, "valid": sizes["train"], "test": sizes["train"] + sizes["valid"]}
        chunks = {split: deque(range(starts[split], starts[split] + sizes[split],
                                     config.chunk_size)) for split in starts}
        searches: deque[tuple[np.ndarray, Future]] = deque()
        oracle_writer = None

        def harvest(block: bool) -> None:
            """Write finished oracle results, in order; wait for the oldest if `block`."""
            nonlocal oracle_writer, oracle_method
            while searches and (block or searches[0][1].done()):
                request_ids, job = searches.popleft()
                result = job.result()
                oracle_method = result.pop("method")
                table = _add_oracle_result(request_ids, result, totals)
                if oracle_writer is None:
                    oracle_writer = pq.ParquetWriter(tmp / TRUTH_DIR / ORACLE_FILE, table.schema)
                oracle_writer.write_table(table)
                block = False

        # Writing Parquet (in a thread, which releases the GIL) overlaps simulating the next
        # chunk, and the test split's oracle searches run in a second process while train
        # and valid chunks are simulated. Each chunk has its own seed, so the interleaving
        # changes nothing; at most two writes and two searches wait, so memory stays bounded.
        # The pool is left before the files close, so no write is cut off by an exception.
        with contextlib.ExitStack() as files, ThreadPoolExecutor(max_workers=1) as pool:
            writers = {split: files.enter_context(
                RequestLogWriter(tmp / f"{split}.parquet", spec)) for split in starts}
            writes: deque[Future] = deque()
            while any(chunks.values()):
                harvest(block=False)
                if chunks["test"] and len(searches) < 2:
                    split = "test"
                elif chunks["train"] or chunks["valid"]:
                    split = "train" if chunks["train"] else "valid"
                else:
                    harvest(block=True)
                    continue
                chunk_start = chunks[split].popleft()
                size = min(config.chunk_size, starts[split] + sizes[split] - chunk_start)
                rng = np.random.default_rng([seed, 1, chunk_start])
                columns, lists, req, probabilities = _simulate_chunk(
                    world, spec, chunk_start, size, requests, start_ms, span_ms, rng)
                writes.append(pool.submit(writers[split].write, columns))
                while len(writes) > 2:
                    writes.popleft().result()
                if split == "test":
                    searches.append((columns[REQUEST_ID], oracles.submit(
                        _oracle_job, req.users, req.items, lists, probabilities)))
                bar.update(size)
            while writes:
                writes.popleft().result()
        while searches:
            harvest(block=True)
        bar.close()
        if oracle_writer is not None:
            oracle_writer.close()
        world.save(tmp / TRUTH_DIR / WORLD_FILE)
        utility, per_behaviour = totals.means(config.behaviours)
        summary = {
            "preset": config.preset,
            "seed": seed,
            "n_candidates": config.n_candidates,
            "list_length": config.list_length,
            "behaviours": list(config.behaviours),
            "utility_weights": dict(config.utility_weights),
            "requests": sizes,
            "users": world.n_users,
            "items": world.n_items,
            "logging_utility": utility.get("logging"),
            "oracle_utility": utility.get("oracle"),
            "itemwise_top_utility": utility.get("itemwise_top"),
            "oracle_method": oracle_method,
            "oracle_fallbacks": totals.fallbacks,
            "behaviour_means": per_behaviour,
            "config": dataclasses.asdict(config),
            "seconds": round(time.perf_counter() - started, 2),
        }
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _simulate_chunk(world: World, spec: FormatSpec, start: int, size: int, total: int,
                    start_ms: int, span_ms: int, rng: np.random.Generator):
    c = world.config
    req = sample_requests(world, size, rng)
    lists, log_propensity = plackett_luce(req.upstream_score, c.list_length,
                                          c.logging_temperature, rng)
    shown = np.take_along_axis(req.items, lists, axis=1)                     # (R, m)
    shown_terms = world.candidate_terms(req.users, shown)
    in_order = np.broadcast_to(np.arange(c.list_length), (size, 1, c.list_length))
    probabilities = world.list_feedback(shown_terms, in_order)[:, 0]         # (R, m, K)
    feedback = sample_feedback(world, probabilities, rng)                    # (R, m, K)

    index = np.arange(start, start + size)
    timestamp = start_ms + ((index + rng.random(size)) / total * span_ms).astype(np.int64)
    columns: dict[str, pa.Array | np.ndarray] = {
        REQUEST_ID: index.astype(np.int64),
        USER_ID: req.users,
        TIMESTAMP: pa.array(timestamp, type=pa.timestamp("ms", tz="UTC")),
        ITEM_ID: list_array(req.items),
        UPSTREAM_SCORE: list_array(req.upstream_score.astype(np.float32)),
        EXPOSED: list_array(lists.astype(np.int32)),
        LOG_PROPENSITY: log_propensity,
        # The logging policy itself, for off-policy evaluation; computed from what was drawn
        # above without drawing more, so the requests, lists and feedback of a seed stay.
        LOGGING_SCORE: list_array(req.upstream_score.astype(np.float32)),
        LOGGING_TEMPERATURE: np.full(size, c.logging_temperature),
        LOGGING_PREFIX: list_array(pl_prefix_log_probs(
            logging_logits(req.upstream_score, c.logging_temperature), lists)),
    }
    for name in spec.user_cat:
        columns[USER_CAT + name] = world.user_cat[name][req.users]
    for name in spec.user_num:
        columns[USER_NUM + name] = world.user_num[name][req.users]
    for name in spec.cand_cat:
        columns[CAND_CAT + name] = list_array(world.item_cat[name][req.items])
    for name in spec.cand_num:
        columns[CAND_NUM + name] = list_array(world.item_num[name][req.items])
    for k, b in enumerate(spec.behaviours):
        columns[FEEDBACK + b] = list_array(feedback[..., k])
    return columns, lists, req, probabilities


_WORLD: World | None = None


def _set_world(world: World) -> None:
    global _WORLD
    _WORLD = world


def _start_oracle_worker(world: World, parent: int) -> None:
    """The oracle worker's initializer: die with `parent`, then hold the world."""
    _die_with_parent(parent)
    _set_world(world)


def _die_with_parent(parent: int) -> None:
    """End this process when `parent` ends, however it ends (SIGKILL included): a worker
    whose parent is gone would otherwise wait on its task queue forever. On Linux the kernel
    sends SIGKILL at once (PR_SET_PDEATHSIG); elsewhere a thread checks the parent every
    second."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) == 0:
            if os.getppid() != parent:          # the parent died before prctl took effect
                os._exit(1)
            return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="nar4rec-parent-watch", daemon=True).start()


@contextlib.contextmanager
def _oracle_executor(world: World) -> Iterator[Executor]:
    """One worker process for oracle searches (forked: the world is shared, not copied);
    a thread where fork is unavailable. On an error or Ctrl-C, queued searches are dropped
    and the worker is stopped at once rather than waited for; if this process is killed, the
    worker dies with it (`_die_with_parent`)."""
    if "fork" in mp.get_all_start_methods():
        executor = ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("fork"),
                                       initializer=_start_oracle_worker,
                                       initargs=(world, os.getpid()))
        executor.submit(int).result()   # fork now, before any other thread exists
    else:
        executor = ThreadPoolExecutor(max_workers=1, initializer=_set_world, initargs=(world,))
    try:
        yield executor
    except BaseException:
        workers = list(getattr(executor, "_processes", {}).values())
        executor.shutdown(wait=False, cancel_futures=True)
        for worker in workers:
            worker.terminate()
        raise
    executor.shutdown(wait=True)


def _oracle_job(users: np.ndarray, items: np.ndarray, lists: np.ndarray,
                probabilities: np.ndarray) -> dict[str, np.ndarray | str]:
    """Oracle, item-wise top m and logged lists of one chunk, with their expected feedback."""
    world = _WORLD
    terms = world.candidate_terms(users, items)
    m = world.config.list_length
    weights = world.weights
    logging_feedback = probabilities.sum(axis=1)                              # (R, K)
    logging_utility = logging_feedback @ weights
    best, best_utility, method = oracle(world, terms, m)
    top = itemwise_top(world, terms, m)
    top_feedback = world.list_feedback(terms, top[:, None, :])[:, 0].sum(axis=1)  # (R, K)
    top_utility = top_feedback @ weights
    # Guard the oracle: it must never do worse than the lists it is compared with.
    fallback = np.maximum(logging_utility, top_utility) > best_utility
    if fallback.any():
        use_top = fallback & (top_utility >= logging_utility)
        best = np.where(use_top[:, None], top, np.where((fallback & ~use_top)[:, None], lists,
                                                        best))
    best_feedback = world.list_feedback(terms, best[:, None, :])[:, 0].sum(axis=1)
    return {"method": method, "fallbacks": int(fallback.sum()), "oracle_list": best,
            "oracle_feedback": best_feedback, "oracle_utility": best_feedback @ weights,
            "logging_feedback": logging_feedback,
            "logging_utility": logging_utility, "itemwise_top_feedback": top_feedback,
            "itemwise_top_utility": top_utility}


def _add_oracle_result(request_ids: np.ndarray, result: dict, totals: _Totals) -> pa.Table:
    totals.requests += len(request_ids)
    totals.fallbacks += result["fallbacks"]
    for name in ("logging", "oracle", "itemwise_top"):
        totals.add(name, result[f"{name}_utility"], result[f"{name}_feedback"])
    return pa.table({
        REQUEST_ID: pa.array(request_ids, pa.int64()),
        "oracle_list": list_array(result["oracle_list"].astype(np.int32)),
        "oracle_utility": pa.array(result["oracle_utility"], pa.float64()),
        "logging_utility": pa.array(result["logging_utility"], pa.float64()),
        "itemwise_top_utility": pa.array(result["itemwise_top_utility"], pa.float64()),
    })
