"""The `nar4rec` command: every subcommand parses its arguments, calls the library, prints."""

from __future__ import annotations

import argparse
import gc
import json
import sys
from datetime import date
from pathlib import Path

from nar4rec import __version__
from nar4rec.config import parse_sets
from nar4rec.errors import Nar4recError
from nar4rec.registry import COMPARED, MODELS

EXIT_USAGE = 2
EXIT_INVALID = 1


def _simulate(args: argparse.Namespace) -> int:
    from nar4rec.config import load_overrides
    from nar4rec.sim.presets import preset_config
    from nar4rec.sim.simulate import simulate

    sets = list(args.set)
    if args.movielens_dir:
        sets.append(f"movielens_dir={args.movielens_dir}")
    config = load_overrides(preset_config(args.preset), args.config, sets)
    summary = simulate(config, args.requests, args.seed, args.out, overwrite=args.overwrite,
                       progress=False if args.quiet else None)
    if not args.quiet:
        print(format_summary(summary))
        print(f"wrote {args.out}/: train.parquet, valid.parquet, test.parquet, summary.json, "
              "truth/world.npz, truth/oracle_test.parquet")
    return 0


def format_summary(summary: dict) -> str:
    """The simulator summary as a few readable lines."""
    def number(value) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    lines = [
        f"preset {summary['preset']}: n = {summary['n_candidates']} candidates, "
        f"m = {summary['list_length']} shown, behaviours {', '.join(summary['behaviours'])}",
        "requests: " + ", ".join(f"{k} {v:,}" for k, v in summary["requests"].items())
        + f"  ({summary['users']:,} users, {summary['items']:,} items)",
        "expected utility per request on the test split:",
        f"  logging policy     {number(summary['logging_utility'])}",
        f"  item-wise top m    {number(summary['itemwise_top_utility'])}",
        f"  oracle             {number(summary['oracle_utility'])}   ({summary['oracle_method']})",
    ]
    means = summary["behaviour_means"]
    if means:
        names = summary["behaviours"]
        lines.append("expected count per request:  " + "  ".join(f"{b:>13}" for b in names))
        for policy, values in means.items():
            lines.append(f"  {policy:<26}" + "  ".join(f"{values[b]:13.4f}" for b in names))
    lines.append(f"{summary['seconds']} s")
    return "\n".join(lines)


def _validate(args: argparse.Namespace) -> int:
    from nar4rec.data.validate import check_file
    from nar4rec.io import atomic_file

    path = Path(args.path)
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise Nar4recError(f"{path}: no .parquet files in this directory")
    elif path.exists():
        files = [path]
    else:
        raise Nar4recError(f"{path}: no such file or directory")
    reports = [check_file(f) for f in files]
    shown = 0
    problems = 0
    for report in reports:
        for problem in report.problems:
            problems += 1
            if args.max_problems <= 0 or shown < args.max_problems:
                print(problem, file=sys.stderr)
                shown += 1
    if problems > shown:
        print(f"... and {problems - shown} more problems (see --max-problems)", file=sys.stderr)
    if args.json:
        if len(reports) == 1:
            summary = reports[0].summary()
        else:
            summary = _total(reports)
            summary["files"] = {Path(r.file).name: r.summary() for r in reports}
        with atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
    for report in reports:
        verdict = "ok" if report.ok else f"{len(report.problems)} problems"
        c = report.counts
        print(f"{report.file}: {verdict}: {c.requests:,} requests, {c.exposures:,} exposures, "
              "positives " + ", ".join(f"{b} {n:,}" for b, n in c.positives.items()))
    return EXIT_INVALID if problems else 0


def _total(reports) -> dict:
    from nar4rec.data.convert import Counts

    total = Counts()
    for r in reports:
        total.add(r.counts)
    return {**total.as_dict(), "problems": sum(len(r.problems) for r in reports)}


def _prepare_avito(args: argparse.Namespace) -> int:
    from nar4rec.data.avito import prepare_avito

    report = prepare_avito(Path(args.raw_dir), Path(args.out), train_days=args.train_days,
                           valid_days=args.valid_days, memory_limit=args.memory_limit,
                           threads=args.threads, overwrite=args.overwrite)
    print(report.format())
    return 0


def _prepare_kuairand(args: argparse.Namespace) -> int:
    from nar4rec.data.kuairand import prepare_kuairand

    report = prepare_kuairand([Path(p) for p in args.log], Path(args.users), Path(args.videos),
                              Path(args.out), negatives=args.negatives,
                              window_minutes=args.window_minutes, test_days=args.test_days,
                              valid_days=args.valid_days, seed=args.seed,
                              memory_limit=args.memory_limit, threads=args.threads,
                              overwrite=args.overwrite)
    print(report.format())
    return 0


def _prepare_mind(args: argparse.Namespace) -> int:
    from nar4rec.data.mind import prepare_mind

    report = prepare_mind([Path(p) for p in args.behaviors], Path(args.news), Path(args.out),
                          split=args.split, test_from=args.test_from,
                          valid_from=args.valid_from, holdout=args.holdout,
                          memory_limit=args.memory_limit, threads=args.threads,
                          overwrite=args.overwrite)
    print(report.format())
    return 0


def _train(args: argparse.Namespace) -> int:
    from nar4rec.config import dataset_settings, load_overrides
    from nar4rec.runs import RunConfig, train_run

    config = load_overrides(RunConfig(), args.config, list(args.set),
                            defaults=dataset_settings(args.data))
    info = train_run(args.data, args.out, model=args.model, config=config,
                     reuse={"evaluator": args.evaluator} if args.evaluator else None,
                     resume=args.resume, overwrite=args.overwrite,
                     progress=False if args.quiet else None)
    if not args.quiet:
        for phase, result in info["phases"].items():
            if "copied_from" in result:
                print(f"{phase}: copied from {result['copied_from']}")
            else:
                print(f"{phase}: {result['epochs_run']} epochs in {result['seconds']:.1f} s, "
                      f"best valid loss {result['best_valid_loss']:.4f} "
                      f"(epoch {result['best_epoch']})")
        print(f"wrote {args.out}/")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from nar4rec.io import atomic_file
    from nar4rec.report import format_evaluation, write_report
    from nar4rec.runs import evaluate_run

    result = evaluate_run(args.run_dir, args.data, split=args.split, batch_size=args.batch_size,
                          sets=parse_sets(args.set))
    if args.json:
        with atomic_file(args.json) as tmp:
            Path(tmp).write_text(json.dumps(result, indent=1) + "\n")
    if args.report:
        write_report(result, args.report)
    print(format_evaluation(result))
    return 0


def _rerank(args: argparse.Namespace) -> int:
    from nar4rec.runs import rerank_file

    count = rerank_file(args.run_dir, args.data, args.out, batch_size=args.batch_size,
                        sets=parse_sets(args.set))
    print(f"reranked {count:,} requests into {args.out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from nar4rec.export import export_run

    manifest = export_run(args.run_dir, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}/: {', '.join(g['file'] for g in manifest['graphs'].values())}, "
          "manifest.json")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from nar4rec.serve import Backend, create_app

    backend = Backend(run=args.run_dir, export=args.export, threads=args.threads,
                      device=args.device)
    app = create_app(backend, max_candidates=args.max_candidates,
                     max_body_bytes=args.max_body_bytes)
    # Two threads share the GIL, the event loop and the batcher: a 0.5 ms switch interval
    # (5 ms by default) lets a parsed request reach the batcher sooner, and freezing what is
    # loaded keeps the garbage collector's full passes short (both measured with
    # benchmarks/load_test.py, docs/benchmarks.md).
    gc.collect()
    gc.freeze()
    sys.setswitchinterval(0.0005)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from nar4rec.compare import compare, format_tables, write_json, write_report
    from nar4rec.config import dataset_settings, load_overrides
    from nar4rec.runs import RunConfig

    config = load_overrides(RunConfig(), args.config, list(args.set),
                            defaults=dataset_settings(args.data))
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    runs = Path(args.runs) if args.runs else Path(args.json).with_name(
        Path(args.json).stem + "-runs")
    result = compare(args.data, runs, models=models, seeds=args.seeds, config=config,
                     resume=args.resume, overwrite=args.overwrite, time_batch=args.time_batch,
                     progress=False if args.quiet else None,
                     log=(lambda _: None) if args.quiet else print)
    write_json(result, args.json)
    if args.report:
        write_report(result, args.report)
    print(format_tables(result))
    return 0


def _bench(args: argparse.Namespace) -> int:
    import tempfile

    from nar4rec.bench import BenchConfig, format_bench, plot_sweep, run_bench
    from nar4rec.config import load_overrides
    from nar4rec.io import atomic_file
    from nar4rec.runs import RunConfig

    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    config = BenchConfig(preset=args.preset, models=models, batch=args.batch, steps=args.steps,
                         warmup=args.warmup, latency_requests=args.latency_requests,
                         threads=args.threads, onnx=args.onnx, device=args.device,
                         settings=load_overrides(RunConfig(), args.config, list(args.set)))
    log = (lambda _: None) if args.quiet else print
    if args.workdir:
        result = run_bench(config, args.workdir, log=log)
    else:
        with tempfile.TemporaryDirectory(prefix="nar4rec-bench-") as workdir:
            result = run_bench(config, workdir, log=log)
    with atomic_file(args.json) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1) + "\n")
    text = format_bench(result)
    if args.report:
        report = Path(args.report)
        chart = report.with_name(report.stem + "-sweep.png")
        lines = [f"# nar4rec bench: {args.preset}", "", text]
        if plot_sweep(result, chart):
            lines += ["", f"![inference time against m]({chart.name})"]
        with atomic_file(report) as tmp:
            Path(tmp).write_text("\n".join(lines) + "\n")
    print(text)
    return 0


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def run_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", dest="run_dir", required=True,
                        help="run directory written by `nar4rec train`")


def reranker_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a reranker setting, e.g. reranker.alphas=[0.6] or "
                             "reranker.samples=0")
    parser.add_argument("--batch-size", type=_positive, default=1024)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nar4rec",
        description="Reranking for recommender systems: data, simulation and NAR4Rec.")
    parser.add_argument("--version", action="version", version=f"nar4rec {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sim = commands.add_parser(
        "simulate", help="simulate request logs with a ground-truth user model",
        description="Simulate request logs (train/valid/test.parquet), the ground truth "
                    "(truth/world.npz), the test split's oracle lists (truth/oracle_test.parquet) "
                    "and summary.json.")
    sim.add_argument("--preset", required=True, choices=["kuaishou", "avito", "movielens"])
    sim.add_argument("--requests", type=_positive, required=True, help="number of requests")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--out", required=True, help="output directory")
    sim.add_argument("--movielens-dir", help="MovieLens-100K folder (u.data, u.item, u.user); "
                     "needed by the movielens preset")
    sim.add_argument("--config", help="TOML file of simulator settings (see docs/simulator.md)")
    sim.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override one setting, e.g. utility_weights.like=3 (repeatable)")
    sim.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    sim.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    sim.set_defaults(run=_simulate)

    val = commands.add_parser(
        "validate", help="check request-log files against the format",
        description="Check a request-log Parquet file (or every .parquet in a directory) "
                    "against docs/data-format.md; print every problem with its row and field. "
                    "Exit 1 if any problem is found.")
    val.add_argument("path", help="a .parquet file or a directory of them")
    val.add_argument("--json", help="write the summary (requests, exposures, positives) here")
    val.add_argument("--max-problems", type=int, default=100,
                     help="print at most this many problems (0: all); all are counted")
    val.set_defaults(run=_validate)

    prep = commands.add_parser("prepare", help="convert a public dataset to the format",
                               description="Convert a public dataset to the request-log format "
                                           "with time-based train/valid/test splits.")
    sources = prep.add_subparsers(dest="source", required=True, metavar="SOURCE")

    def engine_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--memory-limit", default="2GB",
                       help="DuckDB memory limit; larger inputs spill to disk (default 2GB)")
        p.add_argument("--threads", type=_positive, default=2)
        p.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    avito = sources.add_parser("avito", help="Kaggle Avito Context Ad Clicks",
                               description="Convert the Kaggle Avito Context Ad Clicks files: "
                                           "one request per search with contextual ads.")
    avito.add_argument("--raw-dir", required=True,
                       help="folder with trainSearchStream.tsv, SearchInfo.tsv, AdsInfo.tsv, ...")
    avito.add_argument("--out", required=True)
    avito.add_argument("--train-days", type=_positive, default=21,
                       help="days before the test period (the paper: 21)")
    avito.add_argument("--valid-days", type=int, default=1,
                       help="last days of the training period held out for validation")
    engine_options(avito)
    avito.set_defaults(run=_prepare_avito)

    kuai = sources.add_parser("kuairand", help="KuaiRand logs",
                              description="Convert KuaiRand logs: a request is the videos one "
                                          "user was shown at one time_ms.")
    kuai.add_argument("--log", nargs="+", required=True, help="one or more log CSV files")
    kuai.add_argument("--users", required=True, help="user_features*.csv")
    kuai.add_argument("--videos", required=True, help="video_features_basic*.csv")
    kuai.add_argument("--out", required=True)
    kuai.add_argument("--negatives", type=int, default=24,
                      help="unexposed candidates added to every request")
    kuai.add_argument("--window-minutes", type=_positive, default=60,
                      help="negatives come from other users' exposures in this time window")
    kuai.add_argument("--test-days", type=_positive, default=7)
    kuai.add_argument("--valid-days", type=int, default=2)
    kuai.add_argument("--seed", type=int, default=0)
    engine_options(kuai)
    kuai.set_defaults(run=_prepare_kuairand)

    mind = sources.add_parser("mind", help="Microsoft News (MIND)",
                              description="Convert MIND: a request is an impression.")
    mind.add_argument("--behaviors", nargs="+", required=True, help="behaviors.tsv file(s)")
    mind.add_argument("--news", required=True, help="news.tsv")
    mind.add_argument("--out", required=True)
    mind.add_argument("--split", choices=["day", "impression"], default="day",
                      help="day: the last days are valid and test (default); impression: "
                           "--holdout of the impressions each, by a hash of their id")
    mind.add_argument("--test-from", type=_day, help="first test day (default: the last day)")
    mind.add_argument("--valid-from", type=_day,
                      help="first validation day (default: the day before --test-from)")
    mind.add_argument("--holdout", type=float, default=0.1,
                      help="with --split impression, the share of impressions in each of "
                           "valid and test (default 0.1)")
    engine_options(mind)
    mind.set_defaults(run=_prepare_mind)

    tr = commands.add_parser(
        "train", help="train a reranker into a run directory",
        description="Train NAR4Rec (the evaluator, then the generator), the evaluator alone, "
                    "or a baseline (dnn, dcn, prm, edge_rerank, seq2slate, pier) on "
                    "DIR/train.parquet, validating on DIR/valid.parquet, into one run "
                    "directory (run.json, evaluator/ and generator/, or model/). Settings: "
                    "the defaults, then the data set's (Avito: batch size 1024, as in the "
                    "paper), then --config, then --set.")
    tr.add_argument("--model", default="nar4rec", choices=list(MODELS),
                    help="the model to train (default nar4rec): " + "; ".join(
                        f"{name}: {summary}" for name, (_, summary) in MODELS.items()))
    tr.add_argument("--data", required=True, help="data directory (train and valid splits)")
    tr.add_argument("--out", required=True, help="run directory")
    tr.add_argument("--config", help="TOML file with tables [generator], [evaluator], [train], "
                    "[evaluator_train], [reranker], [features] and one per baseline "
                    "(see docs/models.md)")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one setting, e.g. generator.d_model=128 or train.epochs=5")
    tr.add_argument("--evaluator", metavar="RUN", help="reuse the trained evaluator of this "
                    "run instead of training one (a model with an evaluator phase: nar4rec)")
    tr.add_argument("--resume", action="store_true",
                    help="continue an interrupted run from its last checkpoint")
    tr.add_argument("--overwrite", action="store_true", help="replace an existing run")
    tr.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    tr.set_defaults(run=_train)

    ev = commands.add_parser(
        "evaluate", help="measure a trained run on a data split",
        description="Offline metrics (AUC/LogLoss/NDCG for n = m, Recall@6/10 and LogLoss for "
                    "n > m) and, on simulated data, the true utility of the returned lists "
                    "against the logging policy and the oracle.")
    run_option(ev)
    ev.add_argument("--data", required=True, help="data directory")
    ev.add_argument("--split", default="test", help="split to evaluate (default test)")
    ev.add_argument("--json", help="write the metrics here")
    ev.add_argument("--report", help="write a Markdown report (with training curves) here")
    reranker_options(ev)
    ev.set_defaults(run=_evaluate)

    rr = commands.add_parser(
        "rerank", help="rerank every request of a file",
        description="Write, for every request of a request-log file, the list the run "
                    "returns: request_id, user_id, items, positions, scores, "
                    "predicted_utility.")
    run_option(rr)
    rr.add_argument("--data", required=True, help="a request-log .parquet file")
    rr.add_argument("--out", required=True, help="output .parquet file")
    reranker_options(rr)
    rr.set_defaults(run=_rerank)

    ex = commands.add_parser(
        "export", help="write a run's models as ONNX",
        description="Write generator.onnx, evaluator.onnx (dynamic batch, candidate and list "
                    "counts) and manifest.json (inputs, outputs, list length, behaviours, "
                    "weights, reranker settings, feature vocabularies) for onnxruntime.")
    run_option(ex)
    ex.add_argument("--out", required=True, help="output directory")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ex.set_defaults(run=_export)

    cp = commands.add_parser(
        "compare", help="train and compare NAR4Rec and the baselines",
        description="Train every model on DIR's train split (several seeds), evaluate on its "
                    "test split, and lay the results out as the paper's Tables 2-7 (JSON, and "
                    "Markdown with a chart of the lifts).")
    cp.add_argument("--data", required=True, help="data directory (train, valid, test)")
    cp.add_argument("--models", default=",".join(COMPARED),
                    help="comma-separated models (default: all seven)")
    cp.add_argument("--seeds", type=_positive, default=1, help="training seeds 0..N-1")
    cp.add_argument("--json", required=True, help="write the tables here")
    cp.add_argument("--report", help="write a Markdown report here (and PATH-lifts.png)")
    cp.add_argument("--runs", help="run directories (default: beside --json, NAME-runs/)")
    cp.add_argument("--config", help="TOML file of settings shared by every run (over the "
                    "data set's: batch size 1024 on Avito, as in the paper)")
    cp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one setting for every run, e.g. train.epochs=3")
    cp.add_argument("--time-batch", type=_positive, default=256,
                    help="requests per batch in the timing table (default 256)")
    cp.add_argument("--resume", action="store_true",
                    help="reuse finished runs in --runs, continue unfinished ones")
    cp.add_argument("--overwrite", action="store_true", help="replace an existing --runs")
    cp.add_argument("--quiet", action="store_true", help="no progress bars")
    cp.set_defaults(run=_compare)

    bn = commands.add_parser(
        "bench", help="time training and inference of every model (Table 4)",
        description="On simulated data of a preset's shape: training and inference seconds per "
                    "batch of every model (same hidden size), the NAR4Rec pipeline's "
                    "single-request latency (p50, p99) in PyTorch and under onnxruntime, the "
                    "generator's GFLOP/s next to this "
                    "machine's matrix-multiply peak, and NAR4Rec against Seq2Slate for m = 2..10.")
    bn.add_argument("--preset", default="kuaishou", choices=["kuaishou", "avito"])
    bn.add_argument("--models", default=",".join(COMPARED),
                    help="comma-separated models (default: every registered one)")
    bn.add_argument("--batch", type=_positive, default=1024)
    bn.add_argument("--steps", type=_positive, default=100,
                    help="timed steps per figure, after --warmup untimed ones (default 100)")
    bn.add_argument("--warmup", type=_positive, default=5)
    bn.add_argument("--latency-requests", type=_positive, default=1000,
                    help="single requests timed through the pipeline (default 1000)")
    bn.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (default: torch's choice); onnxruntime gets "
                         "as many")
    bn.add_argument("--no-onnx", dest="onnx", action="store_false",
                    help="skip the pipeline under onnxruntime (its export takes a minute)")
    bn.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                    help="where the models run (default cpu; auto: CUDA when there is one); "
                         "the onnxruntime row is measured on the CPU only")
    bn.add_argument("--config", help="TOML file of model settings, as for train (default: "
                    "every model at its default size)")
    bn.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one model setting, e.g. reranker.samples=8")
    bn.add_argument("--workdir", help="keep the simulated data here (default: a temporary "
                    "directory)")
    bn.add_argument("--json", required=True, help="write every figure here")
    bn.add_argument("--report", help="write Markdown tables here (and PATH-sweep.png)")
    bn.add_argument("--quiet", action="store_true")
    bn.set_defaults(run=_bench)

    sv = commands.add_parser(
        "serve", help="serve a run or an export over HTTP",
        description="POST /v1/rerank, GET /healthz, GET /metrics, OpenAPI page at /docs.")
    source = sv.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", dest="run_dir", help="a run directory (PyTorch)")
    source.add_argument("--export", help="an export directory (onnxruntime)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--threads", type=_positive, default=1,
                    help="intra-op threads of the model (default 1)")
    sv.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                    help="where a run's models run (default cpu); on a GPU, requests are "
                         "replayed from CUDA graphs")
    sv.add_argument("--max-candidates", type=_positive, default=1000)
    sv.add_argument("--max-body-bytes", type=_positive, default=1_000_000)
    sv.set_defaults(run=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except Nar4recError as exc:
        print(f"nar4rec: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError:
        print("nar4rec: error: out of memory", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"nar4rec: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("nar4rec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
