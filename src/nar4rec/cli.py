"""The `nar4rec` command: every subcommand parses its arguments, calls the library, prints.

Each command is a `Command` beside the function that runs it and the function that declares
its options; the options several commands share are declared once, in the `_*_option` helpers.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

from nar4rec import __version__
from nar4rec.config import parse_sets
from nar4rec.errors import Nar4recError
from nar4rec.registry import COMPARED, MODELS

EXIT_USAGE = 2
EXIT_INVALID = 1
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141   # 128 + SIGPIPE: what a shell reports for `seq 999999 | head -1`'s seq


def plural(count: int, noun: str) -> str:
    """The count and the noun, plural unless the count is 1: "1 problem", "2,000 problems"."""
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, what `--help` says of it, its options and what runs it.

    options: declares the command's arguments on its parser.
    run: called with the parsed arguments, returns the exit status; None for a command whose
        options declare subcommands of their own (`prepare SOURCE`).
    """

    name: str
    help: str
    description: str
    options: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int] | None = None

    def register(self, commands: argparse._SubParsersAction) -> None:
        parser = commands.add_parser(self.name, help=self.help, description=self.description)
        self.options(parser)
        if self.run is not None:
            parser.set_defaults(run=self.run)


# Argument types.

def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from None


def _moment(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD or a time "
                                         f"YYYY-MM-DDTHH:MM[:SS], got {text!r}") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# Options that several commands share, each declared once; `settings`, `what` and the like
# name what the option means for the command at hand.

def _config_option(parser: argparse.ArgumentParser, settings: str,
                   default: str = "none") -> None:
    parser.add_argument("--config", help=f"TOML file of {settings}; --set applies after it "
                                         f"(default: {default})")


def _set_option(parser: argparse.ArgumentParser, setting: str, example: str) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one {setting}, e.g. {example} (repeatable)")


def _overwrite_option(parser: argparse.ArgumentParser, target: str = "--out") -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace an existing {target} (without it, one is an error)")


def _quiet_option(parser: argparse.ArgumentParser, silenced: str) -> None:
    parser.add_argument("--quiet", action="store_true", help=f"print no {silenced}")


def _json_option(parser: argparse.ArgumentParser, contents: str,
                 required: bool = False) -> None:
    parser.add_argument("--json", required=required, help=f"write {contents} here as JSON")


def _report_option(parser: argparse.ArgumentParser, contents: str) -> None:
    parser.add_argument("--report", help=f"write a Markdown report here: {contents}")


def _run_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", dest="run_dir", required=True,
                        help="run directory written by `nar4rec train`")


def _batch_size_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=_positive, default=1024,
                        help="requests per batch (default %(default)s)")


def _models_option(parser: argparse.ArgumentParser, role: str) -> None:
    parser.add_argument("--models", default=",".join(COMPARED),
                        help=f"comma-separated models to {role} (default: %(default)s)")


def _device_option(parser: argparse.ArgumentParser, what: str, note: str) -> None:
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                        help=f"where {what} run (default %(default)s; auto: CUDA when there is "
                             f"one); {note}")


def _duckdb_options(parser: argparse.ArgumentParser) -> None:
    """The conversion engine's options, shared by every `prepare` source."""
    parser.add_argument("--memory-limit", default="2GB",
                        help="DuckDB memory limit; larger inputs spill to disk "
                             "(default %(default)s)")
    parser.add_argument("--threads", type=_positive, default=2,
                        help="DuckDB threads (default %(default)s)")
    _overwrite_option(parser)


# simulate

def _simulate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True, choices=["kuaishou", "avito", "movielens"],
                        help="the world to simulate: kuaishou (n = 60 candidates, m = 6 shown, "
                             "five feed behaviours), avito (n = 5, m = 5, clicks) or movielens "
                             "(n = 30, m = 6, MovieLens-100K's users and items)")
    parser.add_argument("--requests", type=_positive, required=True, help="number of requests")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the world and of the logs (default %(default)s)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--movielens-dir", help="MovieLens-100K folder (u.data, u.item, u.user); "
                        "needed by the movielens preset")
    _config_option(parser, "simulator settings (see docs/simulator.md)")
    _set_option(parser, "simulator setting", "utility_weights.like=3")
    _overwrite_option(parser)
    _quiet_option(parser, "progress bar or summary")


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
        + f"  ({plural(summary['users'], 'user')}, {plural(summary['items'], 'item')})",
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


SIMULATE = Command(
    "simulate", help="simulate request logs with a ground-truth user model",
    description="Simulate request logs (train/valid/test.parquet), the ground truth "
                "(truth/world.npz), the test split's oracle lists (truth/oracle_test.parquet) "
                "and summary.json.",
    options=_simulate_options, run=_simulate)


# validate

def _validate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a .parquet file or a directory of them")
    _json_option(parser, "the summary (requests, exposures, positives)")
    parser.add_argument("--max-problems", type=int, default=100,
                        help="print at most this many problems (0: all); all are counted "
                             "(default %(default)s)")


def _validate(args: argparse.Namespace) -> int:
    from nar4rec.data.format import folder_files
    from nar4rec.data.validate import check_file
    from nar4rec.io import atomic_file

    path = Path(args.path)
    if path.is_dir():
        files = folder_files(path)      # a Spark folder's parts, not _SUCCESS or .crc files
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
        print(f"... and {plural(problems - shown, 'more problem')} (see --max-problems)",
              file=sys.stderr)
    if args.json:
        if len(reports) == 1:
            summary = reports[0].summary()
        else:
            summary = _total(reports)
            summary["files"] = {Path(r.file).name: r.summary() for r in reports}
        with atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
    for report in reports:
        verdict = "ok" if report.ok else plural(len(report.problems), "problem")
        c = report.counts
        if not report.has_labels:
            print(f"{report.file}: {verdict}: a request file to rerank (no logged lists or "
                  f"feedback): {plural(c.requests, 'request')}")
            continue
        print(f"{report.file}: {verdict}: {plural(c.requests, 'request')}, "
              f"{plural(c.exposures, 'exposure')}, "
              "positives " + ", ".join(f"{b} {n:,}" for b, n in c.positives.items()))
    return EXIT_INVALID if problems else 0


def _total(reports) -> dict:
    from nar4rec.data.convert import Counts

    total = Counts()
    for r in reports:
        total.add(r.counts)
    return {**total.as_dict(), "problems": sum(len(r.problems) for r in reports)}


VALIDATE = Command(
    "validate", help="check request-log files against the format",
    description="Check a request-log Parquet file (or every .parquet in a directory) "
                "against docs/data-format.md; print every problem with its row and field. "
                "Exit 1 if any problem is found.",
    options=_validate_options, run=_validate)


# prepare SOURCE

def _prepare_avito_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--raw-dir", required=True,
                        help="folder with trainSearchStream.tsv, SearchInfo.tsv, AdsInfo.tsv, ...")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--train-days", type=_positive, default=21,
                        help="days before the test period (default %(default)s, as in the paper)")
    parser.add_argument("--valid-days", type=int, default=1,
                        help="last days of the training period held out for validation "
                             "(default %(default)s)")
    _duckdb_options(parser)


def _prepare_avito(args: argparse.Namespace) -> int:
    from nar4rec.data.avito import prepare_avito

    report = prepare_avito(Path(args.raw_dir), Path(args.out), train_days=args.train_days,
                           valid_days=args.valid_days, memory_limit=args.memory_limit,
                           threads=args.threads, overwrite=args.overwrite)
    print(report.format())
    return 0


def _prepare_kuairand_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log", nargs="+", required=True, help="one or more log CSV files")
    parser.add_argument("--users", required=True, help="user_features*.csv")
    parser.add_argument("--videos", required=True, help="video_features_basic*.csv")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--negatives", type=int, default=24,
                        help="unexposed candidates added to every request (default %(default)s)")
    parser.add_argument("--window-minutes", type=_positive, default=60,
                        help="negatives come from other users' exposures in this time window "
                             "(default %(default)s)")
    parser.add_argument("--test-days", type=_positive, default=7,
                        help="last days of the logs that go to test (default %(default)s)")
    parser.add_argument("--valid-days", type=int, default=2,
                        help="days before the test days that go to valid (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the choice of negatives (default %(default)s)")
    _duckdb_options(parser)


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


def _prepare_mind_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--behaviors", nargs="+", required=True, help="behaviors.tsv file(s)")
    parser.add_argument("--news", required=True, help="news.tsv")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--split", choices=["day", "impression"], default="day",
                        help="day: the last days are valid and test (default); impression: "
                             "--holdout of the impressions each, by a hash of their id")
    parser.add_argument("--test-from", type=_day,
                        help="first test day (default: the last day)")
    parser.add_argument("--valid-from", type=_day,
                        help="first validation day (default: the day before --test-from)")
    parser.add_argument("--holdout", type=float, default=0.1,
                        help="with --split impression, the share of impressions in each of "
                             "valid and test (default %(default)s)")
    _duckdb_options(parser)


def _prepare_mind(args: argparse.Namespace) -> int:
    from nar4rec.data.mind import prepare_mind

    report = prepare_mind([Path(p) for p in args.behaviors], Path(args.news), Path(args.out),
                          split=args.split, test_from=args.test_from,
                          valid_from=args.valid_from, holdout=args.holdout,
                          memory_limit=args.memory_limit, threads=args.threads,
                          overwrite=args.overwrite)
    print(report.format())
    return 0


PREPARE_SOURCES = (
    Command("avito", help="Kaggle Avito Context Ad Clicks",
            description="Convert the Kaggle Avito Context Ad Clicks files: one request per "
                        "search with contextual ads.",
            options=_prepare_avito_options, run=_prepare_avito),
    Command("kuairand", help="KuaiRand logs",
            description="Convert KuaiRand logs: a request is the videos one user was shown at "
                        "one time_ms.",
            options=_prepare_kuairand_options, run=_prepare_kuairand),
    Command("mind", help="Microsoft News (MIND)",
            description="Convert MIND: a request is an impression.",
            options=_prepare_mind_options, run=_prepare_mind),
)


def _prepare_options(parser: argparse.ArgumentParser) -> None:
    sources = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    for source in PREPARE_SOURCES:
        source.register(sources)


PREPARE = Command(
    "prepare", help="convert a public dataset to the format",
    description="Convert a public dataset to the request-log format with time-based "
                "train/valid/test splits.",
    options=_prepare_options)


# split

def _split_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log", help="a request log: a .parquet file, or a folder of .parquet "
                                    "part files with one schema")
    parser.add_argument("--out", required=True, help="output data directory")
    parser.add_argument("--valid", type=float, default=0.1,
                        help="share of the requests, the latest before test, that go to "
                             "valid (default %(default)s; not used with --valid-from)")
    parser.add_argument("--test", type=float, default=0.1,
                        help="share of the requests, the latest, that go to test "
                             "(default %(default)s; not used with --test-from)")
    cut = ("YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS], UTC unless an offset such as +02:00 is "
           "given; requests at that time or later go to {}")
    parser.add_argument("--valid-from", type=_moment, metavar="TIME",
                        help="first time of valid, " + cut.format("valid or test") +
                             " (default: set by --valid)")
    parser.add_argument("--test-from", type=_moment, metavar="TIME",
                        help="first time of test, " + cut.format("test") +
                             " (default: set by --test)")
    _overwrite_option(parser)


def _split(args: argparse.Namespace) -> int:
    from nar4rec.data.split import split_by_time

    summary = split_by_time(args.log, args.out, valid=args.valid, test=args.test,
                            valid_from=args.valid_from, test_from=args.test_from,
                            overwrite=args.overwrite)
    for split, info in summary["splits"].items():
        print(f"{split}: {plural(info['requests'], 'request')}, {info['first']} to "
              f"{info['last']}")
    print(f"wrote {args.out}/: train.parquet, valid.parquet, test.parquet, summary.json")
    return 0


SPLIT = Command(
    "split", help="split your own request log by time into train/valid/test",
    description="Split one request log (docs/data-format.md) by its timestamp column into "
                "the data directory every other command reads: train.parquet, "
                "valid.parquet, test.parquet (same schema and metadata as the log; rows "
                "keep the log's order within a split) and summary.json. By default test is "
                "the latest 10 % of the requests and valid the 10 % before it; requests at a "
                "cut's timestamp go to the later split. Only the timestamp column is held in "
                "memory; the rest of the log is streamed.",
    options=_split_options, run=_split)


# train

def _train_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="nar4rec", choices=list(MODELS),
                        help="the model to train (default %(default)s): " + "; ".join(
                            f"{name}: {summary}" for name, (_, summary) in MODELS.items()))
    parser.add_argument("--data", required=True, help="data directory (train and valid splits)")
    parser.add_argument("--out", required=True, help="run directory")
    _config_option(parser, "settings, with tables [generator], [evaluator], [train], "
                           "[evaluator_train], [reranker], [features] and one per baseline "
                           "(see docs/models.md)")
    _set_option(parser, "setting", "generator.d_model=128 or train.epochs=5")
    parser.add_argument("--evaluator", metavar="RUN", help="reuse the trained evaluator of this "
                        "run instead of training one (a model with an evaluator phase: nar4rec)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run from its last checkpoint")
    parser.add_argument("--force", action="store_true",
                        help="with --resume: continue even on other data than the run was "
                             "trained on (default: refused)")
    _overwrite_option(parser, "run in --out")
    _quiet_option(parser, "progress bars or summary")


def _train(args: argparse.Namespace) -> int:
    from nar4rec.config import dataset_settings, load_overrides
    from nar4rec.runs import RunConfig, train_run

    config = load_overrides(RunConfig(), args.config, list(args.set),
                            defaults=dataset_settings(args.data))
    info = train_run(args.data, args.out, model=args.model, config=config,
                     reuse={"evaluator": args.evaluator} if args.evaluator else None,
                     resume=args.resume, overwrite=args.overwrite, force=args.force,
                     progress=False if args.quiet else None)
    if not args.quiet:
        for phase, result in info["phases"].items():
            if "copied_from" in result:
                print(f"{phase}: copied from {result['copied_from']}")
            else:
                print(f"{phase}: {plural(result['epochs_run'], 'epoch')} in "
                      f"{result['seconds']:.1f} s, best valid loss "
                      f"{result['best_valid_loss']:.4f} (epoch {result['best_epoch']})")
        print(f"wrote {args.out}/")
    return 0


TRAIN = Command(
    "train", help="train a reranker into a run directory",
    description="Train NAR4Rec (the evaluator, then the generator), the evaluator alone, "
                "or a baseline (dnn, dcn, prm, edge_rerank, seq2slate, pier) on "
                "DIR/train.parquet, validating on DIR/valid.parquet, into one run "
                "directory (run.json, evaluator/ and generator/, or model/). Settings: "
                "the defaults, then the data set's (Avito: batch size 1024, as in the "
                "paper), then --config, then --set.",
    options=_train_options, run=_train)


# evaluate

def _evaluate_options(parser: argparse.ArgumentParser) -> None:
    _run_option(parser)
    parser.add_argument("--data", required=True, help="data directory")
    parser.add_argument("--split", default="test", help="split to evaluate (default %(default)s)")
    _json_option(parser, "the metrics")
    _report_option(parser, "the metrics and the training curves")
    _set_option(parser, "reranker setting", "reranker.alphas=[0.6] or reranker.samples=0")
    _batch_size_option(parser)


def _evaluate(args: argparse.Namespace) -> int:
    from nar4rec.evaluation import evaluate_run
    from nar4rec.report import format_evaluation, write_report

    result = evaluate_run(args.run_dir, args.data, split=args.split, batch_size=args.batch_size,
                          sets=parse_sets(args.set))
    return _publish(result, args, write_report, format_evaluation)


def _publish(result: dict, args: argparse.Namespace, write_report: Callable[[dict, str], None],
             format_result: Callable[[dict], str]) -> int:
    """Write a result as --json and --report where asked, and print it."""
    from nar4rec.io import atomic_file

    if args.json:
        with atomic_file(args.json) as tmp:
            Path(tmp).write_text(json.dumps(result, indent=1) + "\n")
    if args.report:
        write_report(result, args.report)
    print(format_result(result))
    return 0


EVALUATE = Command(
    "evaluate", help="measure a trained run on a data split",
    description="Offline metrics (AUC/LogLoss/NDCG for n = m, Recall@6/10 and LogLoss for "
                "n > m) and, on simulated data, the true utility of the returned lists "
                "against the logging policy and the oracle.",
    options=_evaluate_options, run=_evaluate)



# ope

def _estimators(text: str) -> tuple[str, ...]:
    from nar4rec.ope import ESTIMATORS

    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in ESTIMATORS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown estimator {unknown[0] if unknown else ''!r}"
                                         f" (known: {', '.join(ESTIMATORS)})")
    return names


def _ope_options(parser: argparse.ArgumentParser) -> None:
    _run_option(parser)
    parser.add_argument("--data", required=True,
                        help="data directory of logs with the logging policy's probabilities "
                             "(log_propensity, logging_* columns; docs/ope.md)")
    parser.add_argument("--split", default="test", help="split to read (default %(default)s)")
    parser.add_argument("--estimators", type=_estimators,
                        default="dm,ips,snips,iips,pbm,rips,cascade_dr,pi",
                        help="comma-separated estimators (default %(default)s)")
    parser.add_argument("--reward-model", type=Path, metavar="RUN",
                        help="the run whose click model the direct method and Cascade-DR use "
                             "(nar4rec, evaluator, dnn, dcn or edge_rerank; default: --run "
                             "when it is one of those)")
    parser.add_argument("--max-weight", type=float,
                        help="clip importance weights at this value (default: no clipping)")
    parser.add_argument("--samples", type=_positive, default=1024,
                        help="logging lists drawn per request for Monte Carlo marginals and "
                             "the pseudo-inverse's Gamma (default %(default)s)")
    _json_option(parser, "the estimates")
    _report_option(parser, "the estimates")
    _batch_size_option(parser)


def _ope(args: argparse.Namespace) -> int:
    from nar4rec.offpolicy import format_ope, ope_run, write_ope_report

    result = ope_run(args.run_dir, args.data, split=args.split, reward_model=args.reward_model,
                     estimators=args.estimators, max_weight=args.max_weight, samples=args.samples,
                     batch_size=args.batch_size)
    return _publish(result, args, write_ope_report, format_ope)


OPE = Command(
    "ope", help="estimate a run's value from logs (off-policy evaluation)",
    description="Estimate the expected utility (and each behaviour) of a run's lists from "
                "logs of another policy: direct method, IPS, SNIPS, item-position IPS, the "
                "position-based model, RIPS, Cascade-DR and the pseudo-inverse, with 95 %% "
                "intervals and effective sample sizes; on simulated data the true value "
                "beside them (docs/ope.md).",
    options=_ope_options, run=_ope)


# rerank

def _rerank_options(parser: argparse.ArgumentParser) -> None:
    _run_option(parser)
    parser.add_argument("--data", required=True,
                        help="a .parquet request log or request file to rerank (the "
                             "exposed, feedback_ and log_propensity columns are not read)")
    parser.add_argument("--out", required=True, help="output .parquet file")
    _set_option(parser, "reranker setting", "reranker.alphas=[0.6] or reranker.samples=0")
    _batch_size_option(parser)
    _explore_options(parser, "the output then holds explored, log_propensity, "
                     "logging_prefix_log_propensity and logging_marginal")


def _rerank(args: argparse.Namespace) -> int:
    from nar4rec.runs import rerank_file

    count = rerank_file(args.run_dir, args.data, args.out, batch_size=args.batch_size,
                        sets=parse_sets(args.set), exploration=_exploration(args),
                        seed=args.explore_seed)
    print(f"reranked {plural(count, 'request')} into {args.out}")
    return 0


RERANK = Command(
    "rerank", help="rerank every request of a file",
    description="Write, for every request of a request-log file or of a request file to "
                "rerank (only what the ranking stage knows), the list the run returns: "
                "request_id, user_id, items, positions, scores, predicted_utility.",
    options=_rerank_options, run=_rerank)


# export

def _export_options(parser: argparse.ArgumentParser) -> None:
    _run_option(parser)
    parser.add_argument("--out", required=True, help="output directory")
    _overwrite_option(parser)


def _export(args: argparse.Namespace) -> int:
    from nar4rec.export import export_run

    manifest = export_run(args.run_dir, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}/: {', '.join(g['file'] for g in manifest['graphs'].values())}, "
          "manifest.json")
    return 0


EXPORT = Command(
    "export", help="write a run's models as ONNX",
    description="Write generator.onnx, evaluator.onnx (dynamic batch, candidate and list "
                "counts) and manifest.json (inputs, outputs, list length, behaviours, "
                "weights, reranker settings, feature vocabularies) for onnxruntime.",
    options=_export_options, run=_export)


# compare

def _compare_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="data directory (train, valid, test)")
    _models_option(parser, "train and compare")
    parser.add_argument("--seeds", type=_positive, default=1,
                        help="train every model with seeds 0..SEEDS-1 (default %(default)s)")
    _json_option(parser, "the tables", required=True)
    _report_option(parser, "the tables, and a chart of the lifts beside it (NAME-lifts.png)")
    parser.add_argument("--runs", help="run directories (default: beside --json, NAME-runs/)")
    _config_option(parser, "settings shared by every run, over the data set's (batch size "
                           "1024 on Avito, as in the paper)")
    _set_option(parser, "setting of every run", "train.epochs=3")
    parser.add_argument("--time-batch", type=_positive, default=256,
                        help="requests per batch in the timing table (default %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse finished runs in --runs, continue unfinished ones")
    _overwrite_option(parser, "--runs")
    _quiet_option(parser, "progress bars or progress lines; the tables are still printed")


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


COMPARE = Command(
    "compare", help="train and compare NAR4Rec and the baselines",
    description="Train every model on DIR's train split (several seeds), evaluate on its "
                "test split, and lay the results out as the paper's Tables 2-7 (JSON, and "
                "Markdown with a chart of the lifts).",
    options=_compare_options, run=_compare)


# bench

def _bench_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="kuaishou", choices=["kuaishou", "avito"],
                        help="shapes to time: kuaishou (n = 60, m = 6) or avito (n = 5, m = 5) "
                             "(default %(default)s)")
    _models_option(parser, "time")
    parser.add_argument("--batch", type=_positive, default=1024,
                        help="requests per batch (default %(default)s, as in the paper)")
    parser.add_argument("--steps", type=_positive, default=100,
                        help="timed steps per figure, after --warmup untimed ones "
                             "(default %(default)s)")
    parser.add_argument("--warmup", type=_positive, default=5,
                        help="untimed steps before each figure's timed ones "
                             "(default %(default)s)")
    parser.add_argument("--latency-requests", type=_positive, default=1000,
                        help="single requests timed through the pipeline (default %(default)s)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (default %(default)s: torch's choice); "
                             "onnxruntime gets as many")
    parser.add_argument("--no-onnx", dest="onnx", action="store_false",
                        help="skip timing each model's system exported to onnxruntime (each "
                             "export takes up to a minute or two)")
    _device_option(parser, "the models", "the onnxruntime rows are measured on the CPU only")
    _config_option(parser, "model settings, as for train",
                   default="every model at its default size")
    _set_option(parser, "model setting", "reranker.samples=8")
    parser.add_argument("--workdir", help="keep the simulated data here (default: a temporary "
                        "directory)")
    _json_option(parser, "every figure", required=True)
    _report_option(parser, "the tables, and the inference time against m beside it "
                           "(NAME-sweep.png)")
    _quiet_option(parser, "progress lines; the tables are still printed")


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


BENCH = Command(
    "bench", help="time training and inference of every model (Table 4)",
    description="On simulated data of a preset's shape: training and inference seconds per "
                "batch of every model (same hidden size), the NAR4Rec pipeline's "
                "single-request latency (p50, p99) in PyTorch and under onnxruntime, the "
                "generator's GFLOP/s next to this "
                "machine's matrix-multiply peak, and NAR4Rec against Seq2Slate for m = 2..10.",
    options=_bench_options, run=_bench)


# serve

def _serve_options(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", dest="run_dir", help="a run directory (PyTorch)")
    source.add_argument("--export", help="an export directory (onnxruntime)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=8000,
                        help="port to listen on (default %(default)s)")
    parser.add_argument("--threads", type=_positive, default=1,
                        help="intra-op threads of the model (default %(default)s)")
    _device_option(parser, "a run's models",
                   "on a GPU, requests are replayed from CUDA graphs")
    parser.add_argument("--max-candidates", type=_positive, default=1000,
                        help="refuse (413) a request with more candidates "
                             "(default %(default)s)")
    parser.add_argument("--max-body-bytes", type=_positive, default=1_000_000,
                        help="refuse (413) a request body larger than this "
                             "(default %(default)s)")
    parser.add_argument("--body-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="answer 408 to a request whose body has not arrived this long "
                             "after it started (default %(default)s)")
    _explore_options(parser, "answers carry log_propensity, prefix_log_propensity and "
                     "logging_marginal")


def _explore_options(parser: argparse.ArgumentParser, carried: str) -> None:
    parser.add_argument("--explore", type=float, default=0.0, metavar="EPSILON",
                        help="exploring mode: show a Plackett-Luce draw over the upstream "
                             "order instead of the model's list to this share of requests; "
                             f"{carried}, for `nar4rec ope` on the logs (default "
                             "%(default)s: off; docs/ope.md)")
    parser.add_argument("--explore-temperature", type=float, default=1.0,
                        help="temperature of that draw over the request-standardised "
                             "upstream score (default %(default)s)")
    parser.add_argument("--explore-seed", type=int,
                        help="seed of the exploring draws (default: fresh ones)")
    parser.add_argument("--model-process", action="store_true",
                        help="run the model in a process of its own, so that parsing requests "
                             "and running the model use two cores instead of sharing one "
                             "interpreter lock (docs/serving.md)")


def _exploration(args: argparse.Namespace):
    from nar4rec.exploration import Exploration

    if not args.explore:
        return None
    return Exploration(epsilon=args.explore, temperature=args.explore_temperature)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from nar4rec.serve import Backend, create_app

    backend = Backend(run=args.run_dir, export=args.export, threads=args.threads,
                      device=args.device, exploration=_exploration(args),
                      seed=args.explore_seed)
    app = create_app(backend, max_candidates=args.max_candidates,
                     max_body_bytes=args.max_body_bytes, body_seconds=args.body_timeout,
                     model_process=args.model_process)
    # Two threads share the GIL, the event loop and the batcher: a 0.5 ms switch interval
    # (5 ms by default) lets a parsed request reach the batcher sooner, and freezing what is
    # loaded keeps the garbage collector's full passes short (both measured with
    # benchmarks/load_test.py, docs/benchmarks.md).
    gc.collect()
    gc.freeze()
    sys.setswitchinterval(0.0005)
    print(f"serving {backend.model} ({backend.kind}) on http://{args.host}:{args.port} "
          "(POST /v1/rerank; /healthz, /metrics, /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


SERVE = Command(
    "serve", help="serve a run or an export over HTTP",
    description="POST /v1/rerank, GET /healthz, GET /metrics, OpenAPI page at /docs.",
    options=_serve_options, run=_serve)


COMMANDS = (SIMULATE, VALIDATE, PREPARE, SPLIT, TRAIN, EVALUATE, OPE, RERANK, EXPORT, COMPARE,
            BENCH, SERVE)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nar4rec",
        description="Reranking for recommender systems: data, simulation and NAR4Rec.")
    parser.add_argument("--version", action="version", version=f"nar4rec {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit status (0 when it succeeded)."""
    try:
        try:
            return _run(build_parser().parse_args(argv))
        finally:
            # Whatever is still buffered (all of it, when stdout is a pipe) goes now, so that a
            # reader that has gone shows here rather than as a traceback at exit.
            sys.stdout.flush()
    except BrokenPipeError:
        # The reader stopped early (`nar4rec ... | head -1`): the rest of the output goes
        # nowhere and the command ends quietly (the recipe of the Python docs, signal module,
        # "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _run(args: argparse.Namespace) -> int:
    """The command's own exit status, or one line on stderr and EXIT_USAGE for an error."""
    try:
        return args.run(args)
    except Nar4recError as exc:
        print(f"nar4rec: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError:
        print("nar4rec: error: out of memory", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        raise   # not an error of the command: main ends quietly
    except OSError as exc:
        print(f"nar4rec: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("nar4rec: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
