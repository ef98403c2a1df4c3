"""What decoding and validating a /v1/rerank request costs, by stack, in one process.

    python benchmarks/request_decoding.py --run runs/demo/run --data runs/demo/data/test.parquet

Bodies are built from the first --requests rows of the file (`serve.request_json`); each
figure is the best of 5 repeats of 10 passes over them, in milliseconds per request:
    stdlib json + pydantic      json.loads, then RerankRequest.model_validate (FastAPI's way
                                for a pydantic body parameter)
    pydantic JSON               RerankRequest.model_validate_json (pydantic-core parses the
                                bytes itself)
    request_row                 the service's own checks of a validated request against the
                                model (`serve.request_row`)
"""

from __future__ import annotations

import argparse
import json
import timeit

import pyarrow.parquet as pq

from nar4rec.data.features import FeatureSpace
from nar4rec.runs import read_run
from nar4rec.serve import RerankRequest, request_json, request_row


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
    }
    print(f"{len(bodies)} bodies, {sum(map(len, bodies)) / len(bodies):,.0f} bytes on average")
    for name, call in stacks.items():
        seconds = min(timeit.repeat(call, number=10, repeat=5)) / (10 * len(bodies))
        print(f"{name}: {1000 * seconds:.3f} ms per request")


if __name__ == "__main__":
    main()
