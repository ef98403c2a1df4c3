"""Timing: training and inference seconds per batch of any model, single-request latency of
every model's whole system, and the machine's matrix-multiply peak to compare them with (`nar4rec
bench`, the paper's Table 4).

Every figure is a median over repeated calls after warm-up calls, measured with
`time.perf_counter` on the current thread settings (on a GPU, with the device synchronised
before the clock starts and before it stops); the numbers are only comparable within one run on
one machine (say which in any document that quotes them).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nar4rec.config import RunConfig
from nar4rec.data.batch import RequestBatch
from nar4rec.data.loader import RequestLoader
from nar4rec.models.nar4rec import utility_threshold
from nar4rec.registry import COMPARED, check_models, system_class
from nar4rec.train import resolve_device


def seconds_per_call(call: Callable[[], object], *, warmup: int = 2, repeats: int = 5,
                     device: torch.device | str | None = None) -> list[float]:
    """Wall seconds of each of `repeats` calls, after `warmup` calls that are not counted.

    On a CUDA `device` the clock starts after the device has finished earlier work and stops
    when the call's kernels have finished, not when they were queued.
    """
    sync = _synchroniser(device)
    for _ in range(warmup):
        call()
    return [_timed(call, sync) for _ in range(repeats)]


def _timed(call: Callable[[], object], sync: Callable[[], None]) -> float:
    """Wall seconds of one call, between two synchronisations of the device."""
    sync()
    start = time.perf_counter()
    call()
    sync()
    return time.perf_counter() - start


def _synchroniser(device: torch.device | str | None) -> Callable[[], None]:
    if device is not None and torch.device(device).type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def device_of(batch: RequestBatch) -> torch.device:
    return batch.cand_mask.device


def time_training(module: nn.Module, step: Callable, batch: RequestBatch, *,
                  warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds of one optimisation step (forward, loss, backward, Adam) on `batch`.

    Trains a copy: the module passed in is left as it was.
    """
    import copy

    model = copy.deepcopy(module).train()
    for layer in model.modules():           # a copy's recurrent weights are no longer one
        if isinstance(layer, nn.RNNBase):   # block, which cuDNN would compact at every call
            layer.flatten_parameters()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)

    def one_step():
        loss, _ = step(model, batch)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    return statistics.median(seconds_per_call(one_step, warmup=warmup, repeats=repeats,
                                              device=device_of(batch)))


def time_inference(rerank: Callable[[RequestBatch], object], batch: RequestBatch, *,
                   warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds of `rerank(batch)` without gradients."""
    with torch.no_grad():
        return statistics.median(seconds_per_call(lambda: rerank(batch), warmup=warmup,
                                                  repeats=repeats, device=device_of(batch)))


def matmul_gflops(size: int | None = None, *, repeats: int = 10,
                  device: torch.device | str = "cpu") -> float:
    """The best GFLOP/s of a float32 (size x size) @ (size x size) product on `device` (size:
    1024 on a CPU, 8192 on a GPU, large enough to reach its peak), in torch's default float32
    precision (no TF32), the precision the models run in."""
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 1024)
    left = torch.randn(size, size, device=device)
    right = torch.randn(size, size, device=device)
    best = min(seconds_per_call(lambda: left @ right, warmup=2, repeats=repeats, device=device))
    return 2 * size ** 3 / best / 1e9


# ---------------------------------------------------------------------------------------------
# `nar4rec bench`: the paper's Table 4 and the distance to the hardware's limit

SWEEP = tuple(range(2, 11))


@dataclasses.dataclass
class BenchConfig:
    """What `nar4rec bench` measures.

    preset: simulated data whose shapes are timed ("kuaishou": n = 60, m = 6; "avito": 5, 5).
    models: the models of the Table 4 rows; batch: requests per batch (the paper's 1024).
    steps, warmup: timed and untimed calls per figure (the paper averages 100 steps).
    latency_requests: single requests timed through each model's whole system (0: none).
    lengths: the list lengths m of the inference sweep of `sweep`'s two models.
    sweep: the two models timed against each other for every m (when both are in `models`).
    threads: torch intra-op threads (0: torch's default); onnxruntime gets as many.
    onnx: also time each system exported as one ONNX graph under onnxruntime (the export
        takes up to a minute or two a model); on the CPU only (onnxruntime's CPU package is
        the dependency).
    device: "cpu", "cuda" or "auto" (CUDA when there is one, as training does).
    settings: the models' settings (`--config FILE`, `--set key=value`, as for training):
        sizes and options of every model and the reranker's proposals; list_length comes
        from the data.
    """

    preset: str = "kuaishou"
    models: tuple[str, ...] = COMPARED
    batch: int = 1024
    steps: int = 100
    warmup: int = 5
    latency_requests: int = 1000
    lengths: tuple[int, ...] = SWEEP
    sweep: tuple[str, str] = ("nar4rec", "seq2slate")
    threads: int = 0
    onnx: bool = True
    device: str = "cpu"
    settings: RunConfig = dataclasses.field(default_factory=RunConfig)


def run_bench(config: BenchConfig, workdir: str | Path, log=print) -> dict:
    """Every figure of the benchmark, in one process on this machine, as a dict."""
    from nar4rec.data.features import FeatureSpace
    from nar4rec.sim.presets import preset_config
    from nar4rec.sim.simulate import simulate

    check_models(config.models)
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    workdir = Path(workdir)
    data = workdir / f"{config.preset}-data"
    if not (data / "train.parquet").exists():
        simulate(preset_config(config.preset), max(3 * config.batch, 3000), 0, data,
                 overwrite=True, progress=False)
    space = FeatureSpace.fit([data / "train.parquet"])
    loader = RequestLoader([data / "train.parquet"], space, batch_size=config.batch)
    batch = next(iter(loader)).to(device)
    single = [request.to(device)
              for request in RequestLoader([data / "test.parquet"], space, batch_size=1)]
    requests = [single[i % len(single)] for i in range(config.latency_requests)]
    m = batch.exposed.shape[1]
    tau = utility_threshold([batch], space.utility_weights, 0.5)   # the default tau
    timing = {"warmup": config.warmup, "repeats": config.steps}
    result = {"preset": config.preset, "batch": len(batch), "candidates":
              int(batch.cand_mask.shape[1]), "list_length": m, "threads":
              torch.get_num_threads(), "steps": config.steps, "machine": machine(),
              "device": device.type, "matmul_gflops": matmul_gflops(device=device),
              "settings": dataclasses.asdict(config.settings), "rows": [], "arithmetic": {}}
    log(f"{device.type}: float32 matrix-multiply peak {result['matmul_gflops']:.1f} GFLOP/s")
    for name in config.models:
        system = untrained_system(name, space, m, tau, device, config.settings)
        module, step = system.training_step()
        calls = list(system.inference_calls().items())
        proposals = int(system.rerank(single[0]).proposals.shape[1])   # one request tells
        for index, (call_name, call) in enumerate(calls):
            row = {"model": call_name, "preset": config.preset,
                   "train_s_per_batch": time_training(module, step, batch, **timing)
                   if index == 0 else None,
                   "infer_s_per_batch": time_inference(call, batch, **timing)}
            if device.type == "cuda":
                row["infer_s_per_batch_cuda_graph"] = time_graphed(call, batch, timing, log,
                                                                   call_name)
            if call == system.rerank:               # the whole system: one request at a time
                row["proposals"] = proposals
                if requests:
                    with torch.no_grad():
                        row.update(_latencies(system.rerank, requests,
                                              warmup=config.warmup * 10, device=device))
            result["rows"].append(row)
            if index == 0:
                train_s = row["train_s_per_batch"]
            log(f"{call_name}: " + (f"train {row['train_s_per_batch']:.4f} s, "
                                    if index == 0 else "")
                + f"infer {row['infer_s_per_batch']:.4f} s per batch of {len(batch)}"
                + (f" ({_seconds(row['infer_s_per_batch_cuda_graph'])} from a CUDA graph)"
                   if device.type == "cuda" else "")
                + (f"; one request p50 {row['latency_ms_p50']:.2f} ms"
                   if "latency_ms_p50" in row else ""))
        if device.type == "cuda" and requests:
            result["rows"].append(_cuda_graph_row(system, requests, batch, config, timing))
        if config.onnx and device.type == "cpu" and requests:
            onnx_row = _onnx_system_row(system, requests, batch, config, workdir, timing, log)
            if onnx_row is not None:
                result["rows"].append({**onnx_row, "proposals": proposals})
        result["arithmetic"][name] = _arithmetic(module, batch, timing, result["matmul_gflops"],
                                                 log, name, step=step, train_s=train_s)
    if set(config.sweep) <= set(config.models):
        result["sweep"] = _sweep(space, tau, batch, config, timing, log)
        result["sweep_models"] = list(config.sweep)
    return result


def untrained_system(name: str, space, m: int, tau: float, device: torch.device | str = "cpu",
                     settings: RunConfig | None = None):
    """The system registered as `name` with untrained modules at `settings` (default: every
    model at its default size, d_model 64), on `device`: weights do not change the cost."""
    torch.manual_seed(0)
    return system_class(name).untrained(settings or RunConfig(), space, m, tau=tau).to(device)


def build_for_timing(name: str, space, m: int, tau: float, device: torch.device | str = "cpu",
                     settings: RunConfig | None = None) -> tuple[nn.Module, Callable, Callable]:
    """An untrained system's module of its last phase, its loss function and the call timed
    in the paper's Table 4 (its first `inference_calls`): (module, step, infer)."""
    system = untrained_system(name, space, m, tau, device, settings)
    module, step = system.training_step()
    return module, step, next(iter(system.inference_calls().values()))


def time_graphed(infer: Callable[[RequestBatch], object], batch: RequestBatch, timing: dict,
                 log=print, name: str = "") -> float | None:
    """Median seconds of `infer(batch)` replayed from a CUDA graph (`cuda_graphs`): the cost
    of its kernels without Python's launch overhead. None, and a logged reason, where the
    call cannot be captured (it synchronises with the host)."""
    from nar4rec.cuda_graphs import CudaGraphed

    graphed = CudaGraphed(infer, device_of(batch))
    try:
        graphed(batch)
    except RuntimeError as exc:
        torch.cuda.synchronize(device_of(batch))
        log(f"{name}: no CUDA graph ({str(exc).splitlines()[0]})")
        return None
    return time_inference(graphed, batch, **timing)


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f} s"


def _onnx_system_row(system, requests, batch, config: BenchConfig, workdir: Path, timing,
                     log) -> dict | None:
    """The system exported as one graph (`nar4rec export`'s system.onnx) and run by
    onnxruntime with as many threads as torch has; None, and a logged reason, where the
    system does not export."""
    from nar4rec.errors import Nar4recError
    from nar4rec.export import FEATURE_INPUTS, cpu_session, export_graph

    path = workdir / f"{config.preset}-{system.name}.onnx"
    try:
        export_graph(system.graphs()["system"], system.space, system.list_length, path,
                     what=f"{system.name} system graph")
    except Nar4recError as exc:
        log(f"{system.name}: no ONNX row ({exc})")
        return None
    session = cpu_session(path, threads=torch.get_num_threads())
    operations = onnx_operations(path)

    def feeds(batch: RequestBatch) -> dict[str, np.ndarray]:
        return {k: getattr(batch, k).numpy() for k in FEATURE_INPUTS}

    latencies = _latencies(lambda inputs: session.run(None, inputs),
                           [feeds(request) for request in requests],
                           warmup=config.warmup * 10)
    whole = feeds(batch)
    return {"model": f"{system.name}_system_onnx", "preset": config.preset,
            "train_s_per_batch": None,
            "infer_s_per_batch": statistics.median(seconds_per_call(
                lambda: session.run(None, whole), warmup=timing["warmup"],
                repeats=timing["repeats"])), **latencies,
            "onnx_operations": sum(operations.values()),
            "onnx_top_operations": dict(operations.most_common(8))}


def onnx_operations(path: str | Path) -> Counter:
    """The operations of an ONNX file by type, those of Loop, If and Scan bodies included
    (each counted once, as the graph holds it: a loop body runs once per iteration)."""
    import onnx

    counts: Counter = Counter()

    def walk(graph) -> None:
        for node in graph.node:
            counts[node.op_type] += 1
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    walk(attribute.g)
                for sub in attribute.graphs:
                    walk(sub)

    walk(onnx.load(str(path), load_external_data=False).graph)
    return counts


def _cuda_graph_row(system, requests, batch, config: BenchConfig, timing) -> dict:
    """The system replayed from CUDA graphs (`cuda_graphs.GraphedReranker`), which launches
    its kernels in one call instead of several hundred."""
    from nar4rec.cuda_graphs import GraphedReranker

    graphed = GraphedReranker(system)
    latencies = _latencies(graphed.rerank, requests, warmup=config.warmup * 10,
                           device=device_of(batch))
    return {"model": f"{system.name}_system_cuda_graph", "preset": config.preset,
            "train_s_per_batch": None,
            "infer_s_per_batch": time_inference(graphed.rerank, batch, **timing), **latencies}


def _latencies(call: Callable, requests: list, *, warmup: int,
               device: torch.device | None = None) -> dict:
    """p50 and p99 milliseconds of `call` on each request, after `warmup` untimed calls on
    the first ones (on a GPU, until the call's kernels have finished)."""
    sync = _synchroniser(device)
    for request in requests[:warmup]:
        call(request)
    seconds = [_timed(functools.partial(call, request), sync) for request in requests]
    milliseconds = 1000 * np.array(seconds)
    return {"latency_ms_p50": float(np.percentile(milliseconds, 50)),
            "latency_ms_p99": float(np.percentile(milliseconds, 99)),
            "latency_requests": len(seconds)}


def _arithmetic(module: nn.Module, batch: RequestBatch, timing, peak: float, log=print,
                name: str = "", step: Callable | None = None,
                train_s: float | None = None) -> dict:
    """The forward pass of the module a system trains last (NAR4Rec: the generator): its
    FLOPs per batch, and the GFLOP/s it achieves against the measured matrix-multiply peak,
    eager and (on a GPU) from a CUDA graph; with its training `step` and the measured seconds
    of one (`train_s`), the same for a training step (forward, loss and backward, as torch's
    FLOP counter counts them; the optimiser's update is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    module = module.eval()
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            module(batch)
    flops = counter.get_total_flops()
    forward = time_inference(module, batch, **timing)
    figures = {"flops_per_batch": flops, "forward_s": forward, "gflops": flops / forward / 1e9,
               "matmul_gflops": peak, "share_of_peak": flops / forward / 1e9 / peak}
    if step is not None and train_s:
        module.train()
        with FlopCounterMode(display=False) as counter:
            loss, _ = step(module, batch)
            loss.backward()
        module.zero_grad(set_to_none=True)
        module.eval()
        train_flops = counter.get_total_flops()
        figures.update({"train_flops_per_batch": train_flops, "train_s": train_s,
                        "train_gflops": train_flops / train_s / 1e9,
                        "train_share_of_peak": train_flops / train_s / 1e9 / peak})
    if device_of(batch).type == "cuda":
        forward_graph = time_graphed(module, batch, timing, log, f"{name} forward")
        figures["forward_graph_s"] = forward_graph
        figures["gflops_graph"] = flops / forward_graph / 1e9 if forward_graph else None
    log(f"{name} forward: {figures['gflops']:.1f} GFLOP/s ({figures['share_of_peak']:.0%} of "
        "the peak)" + (f"; training step {figures['train_gflops']:.1f} GFLOP/s "
                       f"({figures['train_share_of_peak']:.0%})" if "train_gflops" in figures
                       else ""))
    return figures


def _sweep(space, tau, batch, config: BenchConfig, timing, log) -> list[dict]:
    """Inference seconds per batch of the two models of `config.sweep` (NAR4Rec's forward and
    contrastive decoding against Seq2Slate's greedy pointer decoding) for each m; training
    seconds where the logged lists are at least m long (they are cut to m)."""
    rows = []
    logged = batch.exposed.shape[1]
    for m in config.lengths:
        row = {"m": m}
        for name in config.sweep:
            module, step, infer = build_for_timing(name, space, m, tau, device_of(batch),
                                                   config.settings)
            row[f"{name}_infer_s"] = time_inference(infer, batch, **timing)
            row[f"{name}_train_s"] = time_training(module, step, _cut(batch, m), **timing) \
                if m <= logged and m in (5, 6) else None
        ours, theirs = config.sweep
        row["infer_ratio"] = row[f"{theirs}_infer_s"] / row[f"{ours}_infer_s"]
        if row[f"{ours}_train_s"] is not None:
            row["train_ratio"] = row[f"{theirs}_train_s"] / row[f"{ours}_train_s"]
        rows.append(row)
        log(f"m = {m}: {ours} {row[f'{ours}_infer_s']:.4f} s, {theirs} "
            f"{row[f'{theirs}_infer_s']:.4f} s per batch ({theirs} / {ours} "
            f"{row['infer_ratio']:.2f}x)")
    return rows


def _cut(batch: RequestBatch, m: int) -> RequestBatch:
    """The batch with its logged lists cut to their first m positions."""
    return dataclasses.replace(batch, exposed=batch.exposed[:, :m],
                               exposed_mask=batch.exposed_mask[:, :m],
                               feedback=batch.feedback[:, :m])


def machine() -> dict:
    """What the figures were measured on."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def format_bench(result: dict) -> str:
    """The benchmark as Markdown tables."""
    def cell(value, digits=4):
        return "n/a" if value is None else f"{value:.{digits}f}"

    m = result["machine"]
    where = f"on the GPU ({m['gpu']})" if result.get("device") == "cuda" else "on the CPU"
    lines = [f"Preset {result['preset']} (n = {result['candidates']}, m = "
             f"{result['list_length']}), batch {result['batch']}, {result['steps']} timed "
             f"steps after warm-up; {where}; {m['cpu']}, {m['cores']} cores, "
             f"{result['threads']} torch threads, torch {m['torch']}; float32 matrix-multiply "
             f"peak {result['matmul_gflops']:.1f} GFLOP/s.", ""]
    graphs = result.get("device") == "cuda"
    if graphs:
        lines += ["| model | training s/batch | inference s/batch | inference s/batch (CUDA "
                  "graph) | p50 ms (batch 1) | p99 ms (batch 1) |", "|---|---|---|---|---|---|"]
    else:
        lines += ["| model | training s/batch | inference s/batch | p50 ms (batch 1) | "
                  "p99 ms (batch 1) |", "|---|---|---|---|---|"]
    for row in result["rows"]:
        graph = f"{cell(row.get('infer_s_per_batch_cuda_graph'))} | " if graphs else ""
        lines.append(f"| {row['model']} | {cell(row['train_s_per_batch'])} | "
                     f"{cell(row['infer_s_per_batch'])} | {graph}"
                     f"{cell(row.get('latency_ms_p50'), 2)}"
                     f" | {cell(row.get('latency_ms_p99'), 2)} |")
    if result.get("arithmetic"):
        lines += ["", "The forward pass of each model's last-trained module (NAR4Rec: the "
                  "generator) against the measured matrix-multiply peak:", "",
                  "| model | GFLOP per batch | forward s | GFLOP/s | share of the peak |"
                  + (" GFLOP/s (CUDA graph) |" if graphs else ""),
                  "|---|---|---|---|---|" + ("---|" if graphs else "")]
        for name, g in result["arithmetic"].items():
            lines.append(f"| {name} | {g['flops_per_batch'] / 1e9:.2f} | {g['forward_s']:.4f} | "
                         f"{g['gflops']:.1f} | {100 * g['share_of_peak']:.0f}% |"
                         + (f" {cell(g.get('gflops_graph'), 1)} |" if graphs else ""))
        trained = {n: g for n, g in result["arithmetic"].items() if "train_gflops" in g}
        if trained:
            lines += ["", "A training step (forward, loss, backward) of the same module:", "",
                      "| model | GFLOP per step | step s | GFLOP/s | share of the peak |",
                      "|---|---|---|---|---|"]
            lines += [f"| {n} | {g['train_flops_per_batch'] / 1e9:.2f} | {g['train_s']:.4f} | "
                      f"{g['train_gflops']:.1f} | {100 * g['train_share_of_peak']:.0f}% |"
                      for n, g in trained.items()]
    counted = [row for row in result["rows"] if "onnx_operations" in row]
    if counted:
        lines += ["", "Operations of each exported system graph (Loop bodies once):", "",
                  "| graph | operations | most frequent |", "|---|---|---|"]
        lines += [f"| {row['model']} | {row['onnx_operations']} | " + ", ".join(
            f"{op} {count}" for op, count in row["onnx_top_operations"].items()) + " |"
            for row in counted]
    if "sweep" in result:
        ours, theirs = result["sweep_models"]
        lines += ["", f"| m | {ours} inference s | {theirs} inference s | {theirs} / {ours} "
                  f"| {ours} training s | {theirs} training s | ratio |",
                  "|---|---|---|---|---|---|---|"]
        for row in result["sweep"]:
            lines.append(f"| {row['m']} | {cell(row[f'{ours}_infer_s'])} | "
                         f"{cell(row[f'{theirs}_infer_s'])} | {row['infer_ratio']:.2f}x | "
                         f"{cell(row[f'{ours}_train_s'])} | {cell(row[f'{theirs}_train_s'])} | "
                         + (f"{row['train_ratio']:.2f}x |" if "train_ratio" in row else "n/a |"))
    return "\n".join(lines)


def plot_sweep(result: dict, out: Path) -> bool:
    """Inference seconds per batch against m, the two models of the sweep."""
    if "sweep" not in result:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nar4rec.report import save_figure

    lengths = [r["m"] for r in result["sweep"]]
    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    for name, marker in zip(result["sweep_models"], "os", strict=True):
        axis.plot(lengths, [r[f"{name}_infer_s"] for r in result["sweep"]], f"{marker}-",
                  label=f"{name} (its Table 4 inference call)")
    axis.set_xlabel("list length m")
    axis.set_ylabel(f"seconds per batch of {result['batch']}")
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    save_figure(figure, out)
    return True
