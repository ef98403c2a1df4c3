"""What NAR4Rec's configurations cost to serve, side by side in one process: the default
against the paper's settings (configs/paper.toml) and any other given ones.

    python benchmarks/default_cost.py --threads 2 --json runs/default_cost.json
    python benchmarks/default_cost.py --config list-aware=configs/list-aware.toml

For each configuration, an untrained system (weights do not change the cost) at the kuaishou
preset's shapes (n = 60, m = 6): one batch of --batch requests through `rerank` (PyTorch), and
--requests single requests through `rerank` and through the exported system graph under
onnxruntime (p50, p99). The configurations are timed in turns, --rounds times, and each figure
is the median over rounds, so that the machine's drift falls on all of them alike. The ratio
to the paper's settings is what issue 21's rule reads (a new default may cost at most 1.5x).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from nar4rec.bench import _latencies, machine, time_inference, untrained_system
from nar4rec.config import RunConfig, load_overrides, paper_config
from nar4rec.data.features import FeatureSpace
from nar4rec.data.loader import RequestLoader
from nar4rec.export import FEATURE_INPUTS, cpu_session, export_graph
from nar4rec.io import atomic_file
from nar4rec.models.nar4rec import utility_threshold
from nar4rec.sim.presets import preset_config
from nar4rec.sim.simulate import simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", default=[],
                        help="NAME=TOML, another configuration to time (repeatable)")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = {"paper": paper_config(RunConfig()), "default": RunConfig()}
    for item in args.config:
        name, _, path = item.partition("=")
        configs[name] = load_overrides(RunConfig(), path, [])
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        simulate(preset_config("kuaishou"), max(3 * args.batch, 3000), 0, data,
                 overwrite=True, progress=False)
        space = FeatureSpace.fit([data / "train.parquet"])
        batch = next(iter(RequestLoader([data / "train.parquet"], space,
                                        batch_size=args.batch)))
        single = list(RequestLoader([data / "test.parquet"], space, batch_size=1))
        requests = [single[i % len(single)] for i in range(args.requests)]
        m = batch.exposed.shape[1]
        tau = utility_threshold([batch], space.utility_weights, 0.5)
        systems, sessions = {}, {}
        for name, config in configs.items():
            system = untrained_system("nar4rec", space, m, tau, settings=config)
            path = Path(tmp) / f"{name}.onnx"
            export_graph(system.graphs()["system"], space, m, path, what=f"{name} system graph")
            systems[name] = system
            sessions[name] = cpu_session(path, threads=torch.get_num_threads())
        feeds = [{k: getattr(r, k).numpy() for k in FEATURE_INPUTS} for r in requests]
        figures: dict[str, dict[str, list[float]]] = {name: {} for name in configs}
        for _ in range(args.rounds):
            for name, system in systems.items():
                with torch.no_grad():
                    row = {"batch_s": time_inference(system.rerank, batch, warmup=2, repeats=5),
                           **{f"torch_{k}": v for k, v in _latencies(
                               system.rerank, requests, warmup=20).items()}}
                session = sessions[name]
                row.update({f"onnx_{k}": v for k, v in _latencies(
                    lambda inputs, s=session: s.run(None, inputs), feeds, warmup=20).items()})
                for key, value in row.items():
                    figures[name].setdefault(key, []).append(value)
    result = {"machine": machine(), "threads": torch.get_num_threads(), "batch": len(batch),
              "requests": args.requests, "rounds": args.rounds,
              "proposals": {name: systems[name].reranker.config.proposals for name in configs},
              "figures": {name: {k: statistics.median(v) for k, v in values.items()
                                 if "requests" not in k}
                          for name, values in figures.items()}}
    paper = result["figures"]["paper"]
    keys = ("batch_s", "torch_latency_ms_p50", "torch_latency_ms_p99", "onnx_latency_ms_p50",
            "onnx_latency_ms_p99")
    print(f"{result['machine']['cpu']}, {result['threads']} threads; median of "
          f"{args.rounds} rounds\n")
    print("| configuration | proposals | batch of " + f"{len(batch)} (s) | PyTorch p50 / p99 "
          "(ms) | onnxruntime p50 / p99 (ms) | ratio to paper (batch, PyTorch p50, ORT p50) |")
    print("|---|---|---|---|---|---|")
    for name, values in result["figures"].items():
        ratios = [values[k] / paper[k] for k in (keys[0], keys[1], keys[3])]
        print(f"| {name} | {result['proposals'][name]} | {values['batch_s']:.4f} | "
              f"{values[keys[1]]:.2f} / {values[keys[2]]:.2f} | "
              f"{values[keys[3]]:.2f} / {values[keys[4]]:.2f} | "
              + ", ".join(f"{r:.2f}x" for r in ratios) + " |")
        result["figures"][name]["ratio_to_paper"] = dict(zip(keys, (
            values[k] / paper[k] for k in keys), strict=True))
    if args.json:
        with atomic_file(args.json) as tmp_path:
            Path(tmp_path).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
