"""Load test of `nar4rec serve` on the loopback interface: throughput, latency, errors.

Starts the service (`--run` or `--export`) on 127.0.0.1, replays requests of a request-log file
as /v1/rerank bodies at each concurrency level, bounded by --requests per level and
--max-seconds per level, and prints one JSON line per level:

    python benchmarks/load_test.py --run runs/demo/run --data runs/demo/data/test.parquet \
        --concurrency 1,8,32 --requests 2000 --max-seconds 60 --in-process

Each HTTP level also reports the CPU seconds the load generator (this process) and the
service spent per request (from the kernel's accounting of each process). With --in-process
(and --run), the same request stream then goes through the service's own batched path
without HTTP: a `serve.Backend` and `serve.Batcher` in this process, `concurrency` threads
submitting the requests' rows (parsed and validated before the clock starts) and waiting for
each answer: the ceiling the service's HTTP, parsing and validation cost is measured against.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pyarrow.parquet as pq

from nar4rec.data.features import FeatureSpace
from nar4rec.serve import request_json


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def space_of(args) -> FeatureSpace:
    if args.run:
        from nar4rec.runs import read_run
        return FeatureSpace.from_dict(read_run(args.run)["space"])
    manifest = json.loads(open(os.path.join(args.export, "manifest.json")).read())
    return FeatureSpace.from_dict(manifest["space"])


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) process `pid` and the processes it started (the service's
    model process with --model-process) have used so far."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stats[int(entry)] = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:                               # it ended meanwhile
                continue
    tree, grew = {pid}, True
    while grew:
        more = {p for p, fields in stats.items() if int(fields[1]) in tree} - tree
        tree, grew = tree | more, bool(more)
    return sum(int(stats[p][11]) + int(stats[p][12]) for p in tree if p in stats) \
        / os.sysconf("SC_CLK_TCK")


def in_process_level(batcher, rows: list[dict], concurrency: int, requests: int,
                     max_seconds: float) -> dict:
    """`concurrency` threads submitting rows to the batcher back to back, no HTTP."""
    latencies: list[float] = []
    issued = itertools.count()
    lock = threading.Lock()
    deadline = time.perf_counter() + max_seconds

    def worker() -> None:
        while time.perf_counter() < deadline:
            index = next(issued)
            if index >= requests:
                break
            started = time.perf_counter()
            batcher.submit(rows[index % len(rows)]).result(timeout=30)
            with lock:
                latencies.append((time.perf_counter() - started) * 1000)

    figures, cpu_ms = drive(worker, concurrency, latencies)
    return {"mode": "in-process", "concurrency": concurrency, **figures,
            "cpu_ms_per_request": cpu_ms}


def drive(worker, concurrency: int, latencies: list[float]) -> tuple[dict, float]:
    """Run `concurrency` threads of `worker` to the end; the level's figures from the
    latencies they recorded, and this process's CPU milliseconds per request."""
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    cpu, started = time.process_time(), time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    cpu_ms = round(1000 * (time.process_time() - cpu) / max(len(latencies), 1), 2)
    values = np.array(latencies)
    return {"requests": len(latencies), "seconds": round(seconds, 2),
            "throughput_rps": round(len(latencies) / seconds, 1),
            "latency_ms_p50": round(float(np.percentile(values, 50)), 2),
            "latency_ms_p99": round(float(np.percentile(values, 99)), 2)}, cpu_ms


def level(port: int, bodies: list[bytes], concurrency: int, requests: int,
          max_seconds: float) -> dict:
    """`concurrency` client threads, each with its own keep-alive connection, post bodies
    back to back until `requests` are issued or `max_seconds` pass.

    The client shares the machine's cores with the service, so it is kept light: stdlib
    http.client in threads costs about 0.4 ms of CPU per request here, an asyncio httpx
    client several times that (at concurrency 32 it, not the service, was the bottleneck).
    """
    latencies: list[float] = []
    errors = {"4xx": 0, "5xx": 0, "failed": 0}
    issued = itertools.count()
    lock = threading.Lock()
    deadline = time.perf_counter() + max_seconds

    def worker() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.perf_counter() < deadline:
            index = next(issued)
            if index >= requests:
                break
            started = time.perf_counter()
            try:
                connection.request("POST", "/v1/rerank", bodies[index % len(bodies)],
                                   {"content-type": "application/json"})
                answer = connection.getresponse()
                answer.read()
            except (OSError, http.client.HTTPException):
                with lock:
                    errors["failed"] += 1
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                continue
            with lock:
                latencies.append((time.perf_counter() - started) * 1000)
                if 400 <= answer.status < 500:
                    errors["4xx"] += 1
                elif answer.status >= 500:
                    errors["5xx"] += 1
        connection.close()

    figures, cpu_ms = drive(worker, concurrency, latencies)
    return {"mode": "http", "concurrency": concurrency, **figures,
            "client_cpu_ms_per_request": cpu_ms, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run")
    source.add_argument("--export")
    parser.add_argument("--data", required=True, help="request-log .parquet to replay")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--requests", type=int, default=2000, help="per level")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="per level")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="the service's model threads")
    parser.add_argument("--device", default="cpu", help="the service's --device (a run's)")
    parser.add_argument("--json", help="also write the levels here")
    parser.add_argument("--model-process", action="store_true",
                        help="the service's model in a process of its own (serve "
                             "--model-process)")
    parser.add_argument("--in-process", action="store_true",
                        help="also run the levels through the batched path without HTTP")
    args = parser.parse_args()

    table = pq.read_table(args.data).slice(0, 1000)
    space = space_of(args)
    bodies = [json.dumps(request_json(table, row, space)).encode()
              for row in range(table.num_rows)]
    port = free_port()
    command = [sys.executable, "-m", "nar4rec", "serve", "--host", "127.0.0.1", "--port",
               str(port), "--threads", str(args.threads), "--device", args.device,
               *(["--run", args.run] if args.run else ["--export", args.export]),
               *(["--model-process"] if args.model_process else [])]
    server = subprocess.Popen(command)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise SystemExit("the service did not start")
        level(port, bodies, 1, args.warmup, 30)
        results = []
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            service_cpu = process_cpu(server.pid)
            result = level(port, bodies, concurrency, args.requests, args.max_seconds)
            result["service_cpu_ms_per_request"] = round(
                1000 * (process_cpu(server.pid) - service_cpu) / max(result["requests"], 1), 2)
            results.append(result)
            print(json.dumps(result), flush=True)
        results_all = {"levels": results, "service": httpx.get(base + "/metrics").json(),
                       "cpus": os.cpu_count()}
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(results_all, fh, indent=1)
    finally:
        server.terminate()
        server.wait(timeout=30)
    if args.in_process and args.run:
        results += in_process_levels(args, table, space)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({**results_all, "levels": results}, fh, indent=1)


def in_process_levels(args, table, space) -> list[dict]:
    """The same requests through `Backend` and `Batcher` in this process (after the service
    has stopped, so that the two do not share the cores)."""
    import torch

    from nar4rec.serve import Backend, Batcher, RerankRequest, request_row

    backend = Backend(run=args.run, threads=args.threads, device=args.device)
    torch.set_num_threads(max(args.threads, 1))
    batcher = Batcher(backend)
    rows = [request_row(RerankRequest.model_validate(request_json(table, row, space)),
                        space, backend.list_length, 10_000)
            for row in range(table.num_rows)]
    in_process_level(batcher, rows, 1, args.warmup, 30)
    results = []
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        result = in_process_level(batcher, rows, concurrency, args.requests, args.max_seconds)
        results.append(result)
        print(json.dumps(result), flush=True)
    return results


if __name__ == "__main__":
    main()
