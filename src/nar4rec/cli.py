"""The `nar4rec` command: every subcommand parses its arguments, calls the library, prints."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

from nar4rec import __version__
from nar4rec.errors import Nar4recError

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
                          test_from=args.test_from, valid_from=args.valid_from,
                          memory_limit=args.memory_limit, threads=args.threads,
                          overwrite=args.overwrite)
    print(report.format())
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
    mind.add_argument("--test-from", type=_day, help="first test day (default: the last day)")
    mind.add_argument("--valid-from", type=_day,
                      help="first validation day (default: the day before --test-from)")
    engine_options(mind)
    mind.set_defaults(run=_prepare_mind)
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
