"""Speed at equal quality: captured lift against inference time, by hidden size, per model.

    python benchmarks/pareto.py --data runs/curves/kuaishou/n20000/data \
        --models nar4rec,seq2slate,prm \
        --sizes 16,32,64,128 --out runs/pareto --plot docs/img/pareto-kuaishou.png

For every model and hidden size d (NAR4Rec: its generator's and its evaluator's d_model; the
baselines: their d_model), a run is trained on DATA with the results protocol (3 + 3 epochs,
the best validation checkpoint) into OUT/<model>-d<d>/, scored on the test split by the
simulator's truth (captured lift, `evaluation.evaluate_run`), and timed on the same machine:
its whole system (`System.rerank`: NAR4Rec's proposals and the evaluator's choice) one request
at a time (p50 and p99 over --latency-requests test requests) and on a batch of 1,024.
Finished runs and figures are reused (OUT/pareto.json). A model's Pareto front is its sizes
that no smaller-latency size of it beats in captured lift.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from nar4rec.bench import seconds_per_call
from nar4rec.config import RunConfig, load_overrides
from nar4rec.data.loader import RequestLoader
from nar4rec.evaluation import evaluate_run
from nar4rec.io import atomic_file
from nar4rec.runs import load_run, phases_of, read_run, train_run

PROTOCOL = ["train.epochs=3", "evaluator_train.epochs=3"]


def size_settings(model: str, d: int) -> list[str]:
    if model == "nar4rec":
        return [f"generator.d_model={d}", f"evaluator.d_model={d}"]
    return [f"{model}.d_model={d}"]


def trained(data: Path, run: Path, model: str, d: int) -> None:
    if (run / "run.json").exists() and set(read_run(run)["phases"]) >= set(phases_of(model)):
        return
    config = load_overrides(RunConfig(), None, [*PROTOCOL, *size_settings(model, d)])
    train_run(data, run, model=model, config=config, progress=False,
              resume=(run / "run.json").exists())


@torch.no_grad()
def timed(run: Path, data: Path, requests: int) -> dict:
    system = load_run(run).system
    test = [data / "test.parquet"]
    singles = list(RequestLoader(test, system.space, batch_size=1))[:requests]
    for request in singles[:20]:
        system.rerank(request)
    seconds = []
    for request in singles:
        started = time.perf_counter()
        system.rerank(request)
        seconds.append(time.perf_counter() - started)
    batch = next(iter(RequestLoader(test, system.space, batch_size=1024)))
    per_batch = statistics.median(seconds_per_call(lambda: system.rerank(batch), warmup=2,
                                                   repeats=5))
    ms = 1000 * np.array(seconds)
    return {"latency_ms_p50": float(np.percentile(ms, 50)),
            "latency_ms_p99": float(np.percentile(ms, 99)), "batch_s": per_batch}


def fronts(rows: list[dict]) -> dict[str, list[str]]:
    """Per model, the sizes on its Pareto front of (p50 latency, captured lift)."""
    out = {}
    for model in sorted({r["model"] for r in rows}):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["latency_ms_p50"])
        best, front = -np.inf, []
        for r in mine:
            if r["captured_lift"] > best:
                best = r["captured_lift"]
                front.append(f"d{r['d']}")
        out[model] = front
    return out


def plot(rows: list[dict], out: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nar4rec.report import save_figure

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for model in sorted({r["model"] for r in rows}):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["d"])
        for axis, key, label in ((axes[0], "latency_ms_p50", "one request, p50 ms"),
                                 (axes[1], "batch_s", "batch of 1,024, s")):
            axis.plot([r[key] for r in mine], [r["captured_lift"] for r in mine], "o-",
                      label=model)
            for r in mine:
                axis.annotate(f"{r['d']}", (r[key], r["captured_lift"]), fontsize=7,
                              xytext=(3, 3), textcoords="offset points")
            axis.set_xlabel(label)
            axis.set_ylabel("captured lift (test)")
            axis.set_xscale("log")
            axis.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle(title)
    save_figure(figure, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--models", default="nar4rec,seq2slate,prm")
    parser.add_argument("--sizes", default="16,32,64,128")
    parser.add_argument("--latency-requests", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("runs/pareto"))
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    record = args.out / "pareto.json"
    rows = json.loads(record.read_text()) if record.exists() else []
    done = {(r["model"], r["d"]) for r in rows}
    for model in args.models.split(","):
        for d in (int(x) for x in args.sizes.split(",")):
            if (model, d) in done:
                continue
            run = args.out / f"{model}-d{d}"
            trained(args.data, run, model, d)
            report = evaluate_run(run, args.data)
            row = {"model": model, "d": d, "captured_lift": report["metrics"]["captured_lift"],
                   "utility": report["metrics"]["utility"],
                   **timed(run, args.data, args.latency_requests)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            with atomic_file(record) as tmp:
                tmp.write_text(json.dumps(rows, indent=1) + "\n")
    print("\n| model | d | captured lift | p50 ms | p99 ms | batch of 1,024 s |")
    print("|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["model"], r["d"])):
        print(f"| {r['model']} | {r['d']} | {r['captured_lift']:.3f} | {r['latency_ms_p50']:.2f} | "
              f"{r['latency_ms_p99']:.2f} | {r['batch_s']:.3f} |")
    print("\nPareto fronts (latency p50 -> captured lift):", fronts(rows))
    if args.plot:
        plot(rows, args.plot, f"{args.data}")


if __name__ == "__main__":
    main()
