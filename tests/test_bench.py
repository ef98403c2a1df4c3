"""`nar4rec bench`: every figure is there and consistent (timings are not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nar4rec import cli
from nar4rec.bench import BenchConfig, format_bench, matmul_gflops, run_bench
from nar4rec.config import RunConfig, load_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_measures_every_figure(tmp_path):
    config = BenchConfig(preset="kuaishou", models=("nar4rec", "seq2slate", "dnn"), batch=32,
                         steps=2, warmup=1, latency_requests=20, lengths=(2, 5, 6),
                         onnx=False)
    result = run_bench(config, tmp_path, log=lambda _: None)
    assert result["batch"] == 32 and result["list_length"] == 6 and result["candidates"] == 60
    rows = {row["model"]: row for row in result["rows"]}
    assert set(rows) == {"nar4rec", "seq2slate", "dnn", "nar4rec_pipeline"}
    for name in ("nar4rec", "seq2slate", "dnn"):
        assert rows[name]["train_s_per_batch"] > 0 and rows[name]["infer_s_per_batch"] > 0
    for name in ("nar4rec_pipeline", "seq2slate", "dnn"):     # each whole system, batch 1
        assert 0 < rows[name]["latency_ms_p50"] <= rows[name]["latency_ms_p99"]
        assert rows[name]["latency_requests"] == 20
    assert "latency_ms_p50" not in rows["nar4rec"]     # the generation alone (Table 4)
    for name in ("nar4rec", "seq2slate", "dnn"):
        arithmetic = result["arithmetic"][name]
        assert arithmetic["flops_per_batch"] > 1e5 and result["matmul_gflops"] > 0
        assert arithmetic["gflops"] == pytest.approx(
            arithmetic["flops_per_batch"] / arithmetic["forward_s"] / 1e9)
        # a training step: forward and backward, so more arithmetic than the forward pass
        assert arithmetic["train_flops_per_batch"] > 1.5 * arithmetic["flops_per_batch"]
        assert arithmetic["train_s"] == rows[name]["train_s_per_batch"]
        assert arithmetic["train_gflops"] == pytest.approx(
            arithmetic["train_flops_per_batch"] / arithmetic["train_s"] / 1e9)
    assert "A training step" in format_bench(result)
    assert [row["m"] for row in result["sweep"]] == [2, 5, 6]
    for row in result["sweep"]:
        assert row["infer_ratio"] == pytest.approx(row["seq2slate_infer_s"]
                                                   / row["nar4rec_infer_s"])
        assert ("train_ratio" in row) == (row["m"] in (5, 6))      # trained where lists allow


def test_generator_flops_grow_with_the_batch(tmp_path):
    """The FLOP count is of the model, not a constant: twice the requests, twice the FLOPs."""
    small = run_bench(BenchConfig(models=("nar4rec",), batch=16, steps=1, warmup=1,
                                  latency_requests=2, lengths=(), onnx=False), tmp_path,
                      log=lambda _: None)
    large = run_bench(BenchConfig(models=("nar4rec",), batch=32, steps=1, warmup=1,
                                  latency_requests=2, lengths=(), onnx=False), tmp_path,
                      log=lambda _: None)
    ratio = (large["arithmetic"]["nar4rec"]["flops_per_batch"]
             / small["arithmetic"]["nar4rec"]["flops_per_batch"])
    assert ratio == pytest.approx(2.0, rel=0.05)
    assert matmul_gflops(size=128, repeats=2) > 0


def test_bench_times_the_configuration_it_is_given(tmp_path):
    """`settings` (the command's --config and --set) reach every timed model: the list-aware
    configuration's extra proposals and judged generator training, a smaller d_model's
    FLOPs."""
    path = Path(__file__).parents[1] / "configs" / "list-aware.toml"

    def bench(sets):
        config = BenchConfig(models=("nar4rec", "dnn"), batch=16, steps=1, warmup=1,
                             latency_requests=2, lengths=(), onnx=False,
                             settings=load_overrides(RunConfig(), path, sets))
        return run_bench(config, tmp_path, log=lambda _: None)

    wide, narrow = bench([]), bench(["generator.d_model=32", "dnn.hidden=[16]"])
    rows = {row["model"]: row for row in wide["rows"]}
    assert rows["nar4rec_pipeline"]["proposals"] == 4 + 4 + 4 + 1
    assert rows["nar4rec"]["train_s_per_batch"] > 0
    assert wide["settings"]["evaluator"]["similarity_heads"] == 4
    assert (narrow["arithmetic"]["nar4rec"]["flops_per_batch"]
            < 0.6 * wide["arithmetic"]["nar4rec"]["flops_per_batch"])
    assert (narrow["arithmetic"]["dnn"]["flops_per_batch"]
            < wide["arithmetic"]["dnn"]["flops_per_batch"])
    assert list(narrow["settings"]["dnn"]["hidden"]) == [16]


def test_bench_command(tmp_path, capsys):
    out, report = tmp_path / "bench.json", tmp_path / "bench.md"
    code = cli.main(["bench", "--preset", "avito", "--models", "nar4rec,seq2slate", "--batch",
                     "16", "--steps", "1", "--warmup", "1", "--latency-requests", "5",
                     "--json", str(out), "--report", str(report), "--quiet",
                     "--workdir", str(tmp_path / "work"), "--set", "reranker.samples=2"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["preset"] == "avito" and result["list_length"] == 5
    assert "seq2slate / nar4rec" in report.read_text()
    assert (tmp_path / "bench-sweep.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "| nar4rec_pipeline |" in printed and "| nar4rec_system_onnx |" in printed
    assert "seq2slate_system_onnx" not in printed        # refused: no graph, no row
    onnx = next(row for row in result["rows"] if row["model"] == "nar4rec_system_onnx")
    assert 0 < onnx["latency_ms_p50"] <= onnx["latency_ms_p99"] and onnx["infer_s_per_batch"] > 0
    assert onnx["latency_requests"] == 5
    reranker = result["settings"]["reranker"]
    assert reranker["samples"] == 2 and onnx["proposals"] == (
        len(reranker["alphas"]) + 2 + len(reranker["evaluator_alphas"])
        + reranker["evaluator_top_m"])
    import onnx as onnx_package
    graph = onnx_package.load(str(tmp_path / "work" / "avito-nar4rec.onnx")).graph
    assert onnx["onnx_operations"] >= len(graph.node) > 50          # the top level at least
    assert sum(onnx["onnx_top_operations"].values()) <= onnx["onnx_operations"]
    assert "Operations of each exported system graph" in printed
    assert cli.main(["bench", "--models", "nope", "--json", str(out)]) == 2


def test_bench_on_a_missing_gpu_is_a_clear_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the error cannot arise")
    code = cli.main(["bench", "--device", "cuda", "--json", str(tmp_path / "bench.json")])
    assert code == 2 and "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_on_the_gpu(tmp_path):
    config = BenchConfig(preset="avito", models=("nar4rec", "seq2slate", "pier"), batch=64,
                         steps=2, warmup=1, latency_requests=10, lengths=(5,), device="cuda")
    result = run_bench(config, tmp_path, log=lambda _: None)
    assert result["device"] == "cuda" and result["machine"]["gpu"]
    rows = {row["model"]: row for row in result["rows"]}
    assert set(rows) == {"nar4rec", "seq2slate", "pier", "nar4rec_pipeline",
                         "nar4rec_system_cuda_graph", "seq2slate_system_cuda_graph",
                         "pier_system_cuda_graph"}                           # no onnx row
    assert all(row["infer_s_per_batch"] > 0 for row in rows.values())
    assert rows["nar4rec"]["infer_s_per_batch_cuda_graph"] > 0
    graphed = rows["nar4rec_system_cuda_graph"]
    assert 0 < graphed["latency_ms_p50"] <= graphed["latency_ms_p99"]
    assert result["arithmetic"]["nar4rec"]["share_of_peak"] > 0
    assert result["arithmetic"]["nar4rec"]["gflops_graph"] > 0
    assert "CUDA graph" in format_bench(result)
