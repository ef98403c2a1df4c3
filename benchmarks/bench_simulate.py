"""Time `nar4rec simulate` end to end and record its peak memory.

    python benchmarks/bench_simulate.py --preset kuaishou --sizes 100000,1000000

prints requests per second, wall time, CPU time (all its processes) and peak resident memory,
for each size given, so that memory can be seen not to grow with N.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time


def run_once(preset: str, requests: int, seed: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        arguments = ["simulate", "--preset", preset, "--requests", str(requests),
                     "--seed", str(seed), "--out", f"{tmp}/data", "--quiet", *extra]
        # The child reports its own peak resident memory, so each size is measured alone.
        code = ("import resource, sys; from nar4rec.cli import main; code = main(sys.argv[1:]); "
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code, *arguments], check=True,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        peak_kib = int(done.stdout.strip().splitlines()[-1])
        size = subprocess.run(["du", "-sm", f"{tmp}/data"], capture_output=True,
                              text=True).stdout.split()[0]
    return {"preset": preset, "requests": requests, "seconds": round(seconds, 1),
            "requests_per_second": round(requests / seconds), "cpu_seconds": round(cpu, 1),
            "peak_rss_mib": round(peak_kib / 1024), "output_mib": int(size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="kuaishou")
    parser.add_argument("--sizes", default="1000000",
                        help="comma-separated request counts, run in increasing order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("extra", nargs="*", help="more arguments for nar4rec simulate")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, "
          f"{subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores")
    for requests in sorted(int(s) for s in args.sizes.split(",")):
        print(json.dumps(run_once(args.preset, requests, args.seed, args.extra)), flush=True)


if __name__ == "__main__":
    main()
