"""Load test of `nar4rec serve` on the loopback interface: throughput, latency, errors.

Starts the service (`--run` or `--export`) on 127.0.0.1, replays requests of a request-log file
as /v1/rerank bodies at each concurrency level, bounded by --requests per level and
--max-seconds per level, and prints one JSON line per level:

    python benchmarks/load_test.py --run runs/demo/run --data runs/demo/data/test.parquet \
        --concurrency 1,8,32 --requests 2000 --max-seconds 60
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

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    values = np.array(latencies)
    return {"concurrency": concurrency, "requests": len(latencies), "seconds": round(seconds, 2),
            "throughput_rps": round(len(latencies) / seconds, 1),
            "latency_ms_p50": round(float(np.percentile(values, 50)), 2),
            "latency_ms_p99": round(float(np.percentile(values, 99)), 2),
            "errors": errors}


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
    args = parser.parse_args()

    table = pq.read_table(args.data).slice(0, 1000)
    space = space_of(args)
    bodies = [json.dumps(request_json(table, row, space)).encode()
              for row in range(table.num_rows)]
    port = free_port()
    command = [sys.executable, "-m", "nar4rec", "serve", "--host", "127.0.0.1", "--port",
               str(port), "--threads", str(args.threads), "--device", args.device,
               *(["--run", args.run] if args.run else ["--export", args.export])]
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
            result = level(port, bodies, concurrency, args.requests, args.max_seconds)
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


if __name__ == "__main__":
    main()
