"""Timing: training and inference seconds per batch of any model, single-request latency of the
NAR4Rec pipeline, and the machine's matrix-multiply peak to compare them with (`nar4rec
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
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nar4rec.data.loader import RequestBatch, RequestLoader
from nar4rec.models.base import ListModel
from nar4rec.models.nar4rec import utility_threshold
from nar4rec.pipeline import RunConfig, check_models, evaluator_step, generator_step
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


def training_step_of(run) -> tuple[nn.Module, Callable]:
    """The module a run trains last and its loss function (NAR4Rec: the generator; an
    evaluator run: the evaluator; a baseline: itself), as `nar4rec.train.train` calls them."""
    if run.model is not None:
        return run.model, ListModel.step
    reranker = run.reranker
    if reranker.generator is not None:      # (trained on its own lists: judged by the evaluator)
        judge = reranker.evaluator if reranker.generator.config.evaluator_lists else None
        return reranker.generator, generator_step(reranker.generator.config,
                                                  run.space.utility_weights, judge)
    return reranker.evaluator, evaluator_step


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

BENCH_MODELS = ("nar4rec", "seq2slate", "pier", "edge_rerank", "prm", "dcn", "dnn")
SWEEP = tuple(range(2, 11))


@dataclasses.dataclass
class BenchConfig:
    """What `nar4rec bench` measures.

    preset: simulated data whose shapes are timed ("kuaishou": n = 60, m = 6; "avito": 5, 5).
    models: the models of the Table 4 rows; batch: requests per batch (the paper's 1024).
    steps, warmup: timed and untimed calls per figure (the paper averages 100 steps).
    latency_requests: single requests timed through the whole NAR4Rec pipeline.
    lengths: the list lengths m of the NAR4Rec / Seq2Slate inference sweep.
    threads: torch intra-op threads (0: torch's default); onnxruntime gets as many.
    onnx: also time the pipeline exported as one ONNX graph under onnxruntime (the export
        takes a minute or two); on the CPU only (onnxruntime's CPU package is the dependency).
    device: "cpu", "cuda" or "auto" (CUDA when there is one, as training does).
    settings: the models' settings (`--config FILE`, `--set key=value`, as for training):
        sizes and options of every model and the reranker's proposals; list_length comes
        from the data.
    """

    preset: str = "kuaishou"
    models: tuple[str, ...] = BENCH_MODELS
    batch: int = 1024
    steps: int = 100
    warmup: int = 5
    latency_requests: int = 1000
    lengths: tuple[int, ...] = SWEEP
    threads: int = 0
    onnx: bool = True
    device: str = "cpu"
    settings: RunConfig = dataclasses.field(default_factory=RunConfig)


def run_bench(config: BenchConfig, workdir: str | Path, log=print) -> dict:
    """Every figure of the benchmark, in one process on this machine, as a dict."""
    from nar4rec.data.loader import FeatureSpace
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
    m = batch.exposed.shape[1]
    tau = utility_threshold([batch], space.utility_weights, 0.5)   # the default tau
    timing = {"warmup": config.warmup, "repeats": config.steps}
    result = {"preset": config.preset, "batch": len(batch), "candidates":
              int(batch.cand_mask.shape[1]), "list_length": m, "threads":
              torch.get_num_threads(), "steps": config.steps, "machine": machine(),
              "device": device.type, "matmul_gflops": matmul_gflops(device=device),
              "settings": dataclasses.asdict(config.settings), "rows": []}
    log(f"{device.type}: float32 matrix-multiply peak {result['matmul_gflops']:.1f} GFLOP/s")
    for name in config.models:
        module, step, infer = build_for_timing(name, space, m, tau, device, config.settings)
        row = {"model": name, "preset": config.preset,
               "train_s_per_batch": time_training(module, step, batch, **timing),
               "infer_s_per_batch": time_inference(infer, batch, **timing)}
        if device.type == "cuda":
            row["infer_s_per_batch_cuda_graph"] = time_graphed(infer, batch, timing, log, name)
        result["rows"].append(row)
        log(f"{name}: train {row['train_s_per_batch']:.4f} s, infer "
            f"{row['infer_s_per_batch']:.4f} s per batch of {len(batch)}"
            + (f" ({_seconds(row['infer_s_per_batch_cuda_graph'])} from a CUDA graph)"
               if device.type == "cuda" else ""))
    if "nar4rec" in config.models:
        result["rows"] += _pipeline_rows(space, m, tau, batch, single, config, workdir, timing)
        result["generator"] = _generator_figures(space, m, tau, batch, timing, config.settings,
                                                 log)
        log(f"generator {result['generator']['gflops']:.1f} GFLOP/s "
            f"({result['generator']['share_of_peak']:.0%} of the peak); decoding "
            f"{result['generator']['decode_s']:.4f} s vs forward "
            f"{result['generator']['forward_s']:.4f} s")
    if "nar4rec" in config.models and "seq2slate" in config.models:
        result["sweep"] = _sweep(space, tau, batch, config, timing, log)
    return result


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


def build_for_timing(name: str, space, m: int, tau: float, device: torch.device | str = "cpu",
                     settings: RunConfig | None = None) -> tuple[nn.Module, Callable, Callable]:
    """An untrained model with `settings` (default: every model at its default size, d_model
    64) on `device`, its loss function and the call that produces lists: (module, step,
    infer). Weights do not change the cost. A generator trained on its own lists
    (`evaluator_lists`) is timed with the evaluator that judges them."""
    from nar4rec.decode import contrastive
    from nar4rec.models import baseline
    from nar4rec.models.evaluator import Evaluator
    from nar4rec.models.nar4rec import NAR4Rec

    settings = settings or RunConfig()
    torch.manual_seed(0)
    if name == "nar4rec":
        config = dataclasses.replace(settings.generator, list_length=m, tau=tau)
        generator = NAR4Rec(config, space).to(device).eval()
        judge = Evaluator(dataclasses.replace(settings.evaluator, list_length=m), space).to(
            device).eval() if config.evaluator_lists else None

        def infer(batch):                    # generation: forward + contrastive decoding
            out = generator(batch)
            return contrastive(out.probs, out.item_repr, out.cand_mask)
        return generator, generator_step(config, space.utility_weights, judge), infer
    model_class, _ = baseline(name)
    model = model_class(dataclasses.replace(getattr(settings, name), list_length=m), space
                        ).to(device).eval()
    return model, ListModel.step, model.rerank


def _pipeline_rows(space, m, tau, batch, single, config: BenchConfig, workdir: Path,
                   timing) -> list[dict]:
    """The whole NAR4Rec pipeline (generator, K proposals, evaluator choosing): per batch, and
    p50/p99 latency of single requests; in PyTorch, and exported to onnxruntime."""
    from nar4rec.models.evaluator import Evaluator
    from nar4rec.models.nar4rec import NAR4Rec
    from nar4rec.reranker import Reranker

    torch.manual_seed(0)
    settings = config.settings
    reranker = Reranker(
        NAR4Rec(dataclasses.replace(settings.generator, list_length=m, tau=tau), space),
        Evaluator(dataclasses.replace(settings.evaluator, list_length=m), space),
        space.utility_weights, settings.reranker).to(device_of(batch))
    requests = [single[i % len(single)] for i in range(config.latency_requests)]
    with torch.no_grad():
        latencies = _latencies(reranker.rerank, requests, warmup=config.warmup * 10,
                               device=device_of(batch))
    rows = [{"model": "nar4rec_pipeline", "preset": config.preset, "train_s_per_batch": None,
             "infer_s_per_batch": time_inference(reranker.rerank, batch, **timing),
             "proposals": reranker.config.proposals, **latencies}]
    if device_of(batch).type == "cuda":
        rows.append(_cuda_graph_row(reranker, requests, batch, config, timing))
    if config.onnx and device_of(batch).type == "cpu":
        rows.append(_onnx_pipeline_row(reranker, space, m, requests, batch, config, workdir,
                                       timing))
    return rows


def _onnx_pipeline_row(reranker, space, m, requests, batch, config: BenchConfig,
                       workdir: Path, timing) -> dict:
    """The same pipeline exported as one graph (`nar4rec export`'s pipeline.onnx) and run by
    onnxruntime with as many threads as torch has."""
    from nar4rec.export import FEATURE_INPUTS, cpu_session, export_pipeline

    path = workdir / f"{config.preset}-pipeline.onnx"
    export_pipeline(reranker, space, m, path)
    session = cpu_session(path, threads=torch.get_num_threads())

    def feeds(batch: RequestBatch) -> dict[str, np.ndarray]:
        return {k: getattr(batch, k).numpy() for k in FEATURE_INPUTS}

    latencies = _latencies(lambda inputs: session.run(None, inputs),
                           [feeds(request) for request in requests],
                           warmup=config.warmup * 10)
    whole = feeds(batch)
    return {"model": "nar4rec_pipeline_onnx", "preset": config.preset,
            "train_s_per_batch": None,
            "infer_s_per_batch": statistics.median(seconds_per_call(
                lambda: session.run(None, whole), warmup=timing["warmup"],
                repeats=timing["repeats"])),
            "proposals": reranker.config.proposals, **latencies}


def _cuda_graph_row(reranker, requests, batch, config: BenchConfig, timing) -> dict:
    """The same pipeline replayed from CUDA graphs (`cuda_graphs.GraphedReranker`), which
    launches its kernels in one call instead of several hundred."""
    from nar4rec.cuda_graphs import GraphedReranker

    graphed = GraphedReranker(reranker)
    latencies = _latencies(graphed.rerank, requests, warmup=config.warmup * 10,
                           device=device_of(batch))
    return {"model": "nar4rec_pipeline_cuda_graph", "preset": config.preset,
            "train_s_per_batch": None,
            "infer_s_per_batch": time_inference(graphed.rerank, batch, **timing),
            "proposals": reranker.config.proposals, **latencies}


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


def _generator_figures(space, m, tau, batch, timing, settings: RunConfig | None = None,
                       log=print) -> dict:
    """The generator's FLOPs, achieved GFLOP/s against the measured peak, and the cost of
    contrastive decoding next to the forward pass."""
    from torch.utils.flop_counter import FlopCounterMode

    from nar4rec.decode import contrastive

    device = device_of(batch)
    generator, _, _ = build_for_timing("nar4rec", space, m, tau, device, settings)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            out = generator(batch)
        flops = counter.get_total_flops()
        forward = time_inference(generator, batch, **timing)

        def decoding(_):                     # the batch's forward pass, decoded again
            return contrastive(out.probs, out.item_repr, out.cand_mask)
        decode = time_inference(decoding, batch, **timing)
    peak = matmul_gflops(device=device)
    figures = {"flops_per_batch": flops, "forward_s": forward, "gflops": flops / forward / 1e9,
               "matmul_gflops": peak, "share_of_peak": flops / forward / 1e9 / peak,
               "decode_s": decode}
    if device.type == "cuda":
        forward_graph = time_graphed(generator, batch, timing, log, "generator")
        figures["forward_graph_s"] = forward_graph
        figures["gflops_graph"] = flops / forward_graph / 1e9 if forward_graph else None
        figures["decode_graph_s"] = time_graphed(decoding, batch, timing, log,
                                                 "contrastive decoding")
    return figures


def _sweep(space, tau, batch, config: BenchConfig, timing, log) -> list[dict]:
    """Inference seconds per batch of NAR4Rec (forward + contrastive decoding) and Seq2Slate
    (greedy pointer decoding) for each m; training seconds where the logged lists are at least
    m long (they are cut to m)."""
    rows = []
    logged = batch.exposed.shape[1]
    for m in config.lengths:
        row = {"m": m}
        for name in ("nar4rec", "seq2slate"):
            module, step, infer = build_for_timing(name, space, m, tau, device_of(batch),
                                                   config.settings)
            row[f"{name}_infer_s"] = time_inference(infer, batch, **timing)
            row[f"{name}_train_s"] = time_training(module, step, _cut(batch, m), **timing) \
                if m <= logged and m in (5, 6) else None
        row["infer_ratio"] = row["seq2slate_infer_s"] / row["nar4rec_infer_s"]
        if row["nar4rec_train_s"] is not None:
            row["train_ratio"] = row["seq2slate_train_s"] / row["nar4rec_train_s"]
        rows.append(row)
        log(f"m = {m}: NAR4Rec {row['nar4rec_infer_s']:.4f} s, Seq2Slate "
            f"{row['seq2slate_infer_s']:.4f} s per batch (Seq2Slate / NAR4Rec "
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
    if "generator" in result:
        g = result["generator"]
        lines += ["", f"Generator forward: {g['flops_per_batch'] / 1e9:.2f} GFLOP per batch in "
                  f"{g['forward_s']:.4f} s = {g['gflops']:.1f} GFLOP/s, "
                  f"{100 * g['share_of_peak']:.0f}% of the measured matrix-multiply peak "
                  f"({g['matmul_gflops']:.1f} GFLOP/s). Contrastive decoding of the batch: "
                  f"{g['decode_s']:.4f} s ({g['decode_s'] / g['forward_s']:.2f}x the forward "
                  "pass)."]
        if g.get("forward_graph_s"):
            lines[-1] += (f" From a CUDA graph: forward {g['forward_graph_s']:.4f} s = "
                          f"{g['gflops_graph']:.1f} GFLOP/s "
                          f"({100 * g['gflops_graph'] / g['matmul_gflops']:.0f}% of the peak), "
                          f"decoding {cell(g.get('decode_graph_s'))} s.")
    if "sweep" in result:
        lines += ["", "| m | NAR4Rec inference s | Seq2Slate inference s | Seq2Slate / NAR4Rec "
                  "| NAR4Rec training s | Seq2Slate training s | ratio |",
                  "|---|---|---|---|---|---|---|"]
        for row in result["sweep"]:
            lines.append(f"| {row['m']} | {cell(row['nar4rec_infer_s'])} | "
                         f"{cell(row['seq2slate_infer_s'])} | {row['infer_ratio']:.2f}x | "
                         f"{cell(row['nar4rec_train_s'])} | {cell(row['seq2slate_train_s'])} | "
                         + (f"{row['train_ratio']:.2f}x |" if "train_ratio" in row else "n/a |"))
    return "\n".join(lines)


def plot_sweep(result: dict, out: Path) -> bool:
    """Inference seconds per batch against m, NAR4Rec and Seq2Slate."""
    if "sweep" not in result:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nar4rec.report import save_figure

    lengths = [r["m"] for r in result["sweep"]]
    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    axis.plot(lengths, [r["nar4rec_infer_s"] for r in result["sweep"]], "o-",
              label="NAR4Rec (forward + contrastive decoding)")
    axis.plot(lengths, [r["seq2slate_infer_s"] for r in result["sweep"]], "s-",
              label="Seq2Slate (greedy pointer decoding)")
    axis.set_xlabel("list length m")
    axis.set_ylabel(f"seconds per batch of {result['batch']}")
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    save_figure(figure, out)
    return True
