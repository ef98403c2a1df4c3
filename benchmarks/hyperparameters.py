"""The paper's Figs. 3 and 4 on the simulator: NAR4Rec's sensitivity to its hyper-parameters.

    python benchmarks/hyperparameters.py --preset kuaishou --requests 20000 --seeds 0,1 \
        --out runs/hp [--movielens-dir ../shared/data/ml-100k] [--set KEY=VALUE ...]

writes OUT/hyperparameters.json (after every point), OUT/fig3.png and OUT/fig4.png, and prints
a Markdown table of every point (those of this command's grids; use one --out per preset).

For each seed the preset is simulated once (OUT/PRESET-SEED/data; the seed also sets every
training seed and the reranker's sampling seed), then (section 5.2.3):

- Fig. 3: NAR4Rec and PIER trained at each learning rate (`train.learning_rate`; NAR4Rec's
  evaluator's `evaluator_train.learning_rate` likewise), each batch size (`train.batch_size`,
  `evaluator_train.batch_size`) and each number of epochs (`train.epochs`,
  `evaluator_train.epochs`: the most trained; the best validation checkpoint is kept, with
  early stopping after `patience` epochs without improvement).
- Fig. 4: NAR4Rec trained at each contrastive-loss weight omega (`generator.omega`) and margin
  rho (`generator.rho`), reusing the default run's evaluator (these settings are the
  generator's only); and, without retraining, the default run's generator decoded alone by
  contrastive decoding (eq. 16) at each weight alpha and each candidate-set size k
  (`reranker.contrastive_k`; k = 0: every candidate, the literal eq. 16).

Every other setting is RunConfig's default with the data set's settings, the results protocol
of docs/results.md (`train.epochs=3`, `evaluator_train.epochs=3`) and the user's `--config` and
`--set`. The point of each grid that equals those settings is one run ("default"), trained once
and shared by every panel.

Each point is measured on the TEST split: by the simulator's truth, the captured lift
(method - logging) / (oracle - logging) of the lists returned (NAR4Rec: the pipeline, proposals
chosen by the evaluator; the alpha panel: the generator's decoded lists), and by the paper's
offline metric, Recall@6 on presets with n > m and NDCG on presets with n = m. Fig. 3 uses the
metric of Tables 2 and 3 (`evaluation.evaluate_run`: candidates ranked by the model's score;
NAR4Rec's NDCG is its evaluator's click prediction). Fig. 4 measures the lists themselves
(candidates ranked by their position in the list, unplaced ones last), since the evaluator's
NDCG cannot see a generator setting.

These curves are a sensitivity report on the test split: no default was chosen from them
(defaults are chosen on the validation split elsewhere, e.g. benchmarks/decoding_sweep.py).

Finished runs are kept and their evaluations cached in OUT/hyperparameters.json, so an
interrupted command continues where it stopped; a finished run trained with other settings
than the command asks for (a changed `--set`, or a changed default) is an error: use another
`--out`. The reranker's settings (`reranker.*`) are not training settings: every NAR4Rec run is
evaluated with the current ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nar4rec import decode, metrics
from nar4rec.config import (
    PAPER_SETTINGS,
    RunConfig,
    apply_overrides,
    dataset_settings,
    load_overrides,
)
from nar4rec.data.batch import RequestBatch
from nar4rec.data.loader import RequestLoader
from nar4rec.evaluation import evaluate_run
from nar4rec.io import atomic_file
from nar4rec.report import save_figure
from nar4rec.runs import load_run, phases_of, read_run, split_files, train_run
from nar4rec.sim.presets import preset_config
from nar4rec.sim.simulate import simulate
from nar4rec.sim.world import World

PROTOCOL = ("train.epochs=3", "evaluator_train.epochs=3")   # docs/results.md
RESULTS_FILE = "hyperparameters.json"
DEFAULT = "default"
RECALL_K = 6
NAMES = {"nar4rec": "NAR4Rec", "pier": "PIER"}


@dataclass(frozen=True)
class Parameter:
    """One swept setting: the RunConfig keys each model sets to the grid's value."""

    name: str                        # in run names and the JSON
    label: str                       # axis label
    option: str                      # command-line option of its grid
    grid: str                        # the default grid
    kind: type
    figure: int
    log: bool                        # a geometric grid: log-scale x
    keys: dict[str, tuple[str, ...]]

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self.keys)


PARAMETERS = (
    Parameter("lr", "learning rate", "--lrs", "1e-4,3e-4,1e-3,3e-3", float, 3, True,
              {"nar4rec": ("train.learning_rate", "evaluator_train.learning_rate"),
               "pier": ("train.learning_rate",)}),
    Parameter("batch", "batch size", "--batch-sizes", "64,128,256,512,1024", int, 3, True,
              {"nar4rec": ("train.batch_size", "evaluator_train.batch_size"),
               "pier": ("train.batch_size",)}),
    Parameter("epochs", "epochs", "--epochs", "1,2,3,5", int, 3, False,
              {"nar4rec": ("train.epochs", "evaluator_train.epochs"),
               "pier": ("train.epochs",)}),
    Parameter("omega", "omega (contrastive-loss weight)", "--omegas", "0,0.001,0.01,0.1,1",
              float, 4, True, {"nar4rec": ("generator.omega",)}),
    Parameter("rho", "rho (contrastive-loss margin)", "--rhos", "0,0.25,0.5,0.75", float, 4,
              False, {"nar4rec": ("generator.rho",)}),
)
ALPHA = "alpha"


def parse_grid(text: str, kind=float) -> list:
    return [kind(v) for v in text.split(",") if v.strip()]


def setting(config, key: str):
    for part in key.split("."):
        config = getattr(config, part)
    return config


def finished(run: Path, model: str) -> bool:
    try:
        info = read_run(run)
    except Exception:
        return False
    return set(phases_of(model)) <= set(info["phases"])


def differing_settings(info: dict, config: RunConfig) -> list[str]:
    """The training settings a run recorded that differ from `config` (list_length and a
    resolved tau, filled in by training, excepted; the reranker's are applied at evaluation)."""
    wanted = json.loads(json.dumps(dataclasses.asdict(config)))
    differ = []
    for section, recorded in info["config"].items():
        if section == "reranker":
            continue
        for key, value in recorded.items():
            want = wanted[section].get(key)
            if key == "list_length" or (key == "tau" and want is None):
                continue
            if value != want:
                differ.append(f"{section}.{key}={value} (asked: {want})")
    return differ


# ---------------------------------------------------------------------------------------------
# Lists on the test split


def list_scores(lists: torch.Tensor, candidates: int) -> torch.Tensor:
    """(B, n) score of each candidate by its position in the (B, m) lists: m for the first,
    1 for the last, 0 where not placed."""
    batch, m = lists.shape
    placed = lists >= 0
    rank_score = (m - torch.arange(m, dtype=torch.float32)).expand(batch, m)        # (B, m)
    scores = torch.zeros(batch, candidates + 1)                                     # +1: NO_ITEM
    scores.scatter_(1, torch.where(placed, lists, candidates), rank_score * placed)
    return scores[:, :candidates]                                                   # (B, n)


def list_offline(batch: RequestBatch, lists: torch.Tensor, exposure: bool
                 ) -> tuple[float, float]:
    """The offline metric of lists on one batch and its weight: Recall@6 (n > m) or NDCG over
    the requests with a click (n = m), candidates ranked by their place in the list."""
    scores = list_scores(lists, batch.cand_mask.shape[1])                          # (B, n)
    if exposure:
        return (metrics.recall_at_k(scores, batch.exposed, batch.exposed_mask,
                                    batch.cand_mask, RECALL_K),
                float(batch.exposed_mask.any(1).sum()))
    logged = scores.gather(1, batch.exposed.clamp_min(0))                          # (B, M)
    labels = batch.feedback[..., 0]
    clicked = ((labels > 0) & batch.exposed_mask).any(1)
    return metrics.ndcg(logged, labels, batch.exposed_mask), float(clicked.sum())


@torch.no_grad()
def test_lists(run: Path, data: Path, exposure: bool, decodings: dict[str, tuple[float, int]],
               sets: dict) -> dict[str, dict[str, float]]:
    """Mean true utility and offline metric on the test split of the pipeline's lists
    ("pipeline", with the reranker settings `sets`) and of the generator's contrastive
    decodings {label: (alpha, k)}."""
    loaded = load_run(run, sets=sets)
    world = World.load(data)
    utility: dict[str, float] = {}
    offline: dict[str, list[float]] = {}
    requests = 0
    for batch in RequestLoader(split_files(data, "test"), loaded.space, batch_size=1024):
        out = loaded.reranker.generator(batch)
        lists = {"pipeline": loaded.reranker.choose(batch, out).lists}
        for label, (alpha, k) in decodings.items():
            lists[label] = decode.contrastive(
                out.probs, out.item_repr, out.cand_mask, alpha=alpha, k=k or None,
                similarity=loaded.config.reranker.similarity)                    # (B, m)
        for label, chosen in lists.items():
            utility[label] = utility.get(label, 0.0) + float(
                metrics.list_utility(world, batch, chosen).sum())
            value, weight = list_offline(batch, chosen, exposure)
            total = offline.setdefault(label, [0.0, 0.0])
            if weight > 0 and not math.isnan(value):
                total[0] += value * weight
                total[1] += weight
        requests += len(batch)
    return {label: {"utility": utility[label] / requests,
                    "offline": offline[label][0] / offline[label][1] if offline[label][1]
                    else math.nan}
            for label in utility}


# ---------------------------------------------------------------------------------------------
# Runs and points


@dataclass
class Study:
    """One preset and seed: its data, its settings, and the cache of evaluations."""

    args: argparse.Namespace
    seed: int
    base: Path
    data: Path
    config: RunConfig
    cache: dict
    points: list[dict]
    write: Callable[[], None]

    def run_dir(self, model: str, name: str) -> Path:
        return self.base / f"{model}-{name}"

    def train(self, model: str, name: str, config: RunConfig,
              evaluator_from: Path | None = None) -> Path:
        run = self.run_dir(model, name)
        recorded = read_run(run) if (run / "run.json").exists() else None
        differ = differing_settings(recorded, config) if recorded else []
        if recorded and finished(run, model):
            if differ:
                raise SystemExit(f"{run}: trained with other settings than asked "
                                 f"({'; '.join(differ[:3])}); use another --out")
            return run
        started = time.perf_counter()
        resume = recorded is not None and not differ
        train_run(self.data, run, model=model, config=None if resume else config,
                  resume=resume, overwrite=not resume, progress=False,
                  reuse={"evaluator": evaluator_from} if evaluator_from else None)
        print(f"{self.args.preset} seed {self.seed} {model} {name}: trained in "
              f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        return run

    def evaluation(self, run: Path, decodings: dict[str, tuple[float, int]] | None = None
                   ) -> dict:
        """The run's test evaluation (cached while its phases are unchanged), with the
        test_lists of `decodings` when given."""
        key = str(run.relative_to(self.args.out))
        info = read_run(run)
        reranker = json.loads(json.dumps(dataclasses.asdict(self.config.reranker)))
        sets = {f"reranker.{name}": value for name, value in
                dataclasses.asdict(self.config.reranker).items()} \
            if "reranker" in info["config"] else None             # a baseline has none
        entry = self.cache.get(key)
        if entry is None or entry["phases"] != info["phases"] or (
                sets and entry.get("reranker") != reranker):
            result = evaluate_run(run, self.data, sets=sets)
            entry = {"phases": info["phases"], "reranker": reranker if sets else None,
                     "protocol": result["protocol"], "metrics": result["metrics"],
                     "variants": result["variants"], "lists": {}}
            self.cache[key] = entry
        if decodings is not None:
            wanted = {"pipeline", *decodings}
            if not wanted <= set(entry["lists"]):
                exposure = entry["protocol"].startswith("exposure")
                entry["lists"].update(test_lists(run, self.data, exposure, decodings, sets))
        return entry

    def point(self, parameter: str, value: float, line: str, run: Path, lift: float,
              offline: float, utility: float) -> None:
        figure = next((p.figure for p in PARAMETERS if p.name == parameter), 4)
        self.points.append({
            "figure": figure, "parameter": parameter, "value": value, "line": line,
            "seed": self.seed, "run": str(run), "captured_lift": lift, "offline": offline,
            "utility": utility})
        self.write()


def offline_name(protocol: str) -> str:
    return f"recall@{RECALL_K}" if protocol.startswith("exposure") else "ndcg"


def point_config(study: Study, parameter: Parameter, model: str, value) -> tuple[str, RunConfig]:
    """The run name ("default" when the value changes nothing) and its settings."""
    keys = parameter.keys[model]
    if all(setting(study.config, key) == value for key in keys):
        return DEFAULT, study.config
    config = apply_overrides(study.config, dict.fromkeys(keys, value), source=parameter.option)
    return f"{parameter.name}={value:g}", config


def one_seed(study: Study, grids: dict[str, list], figures: set[int]) -> None:
    default = study.train("nar4rec", DEFAULT, study.config)       # always: the reference
    study.evaluation(default)
    for parameter in PARAMETERS:
        if parameter.figure not in figures:
            continue
        for model in parameter.models:
            for value in grids[parameter.name]:
                name, config = point_config(study, parameter, model, value)
                reuse = default if parameter.figure == 4 and name != DEFAULT else None
                run = study.train(model, name, config, evaluator_from=reuse)
                if parameter.figure == 3:
                    entry = study.evaluation(run)
                    study.point(parameter.name, value, model, run,
                                entry["metrics"]["captured_lift"],
                                entry["metrics"][offline_name(entry["protocol"])],
                                entry["metrics"]["utility"])
                else:
                    entry = study.evaluation(run, {})
                    lists = entry["lists"]["pipeline"]
                    study.point(parameter.name, value, model, run,
                                lift_of(entry, lists["utility"]), lists["offline"],
                                lists["utility"])
    if 4 in figures:
        decodings = {decoding_label(alpha, k): (alpha, k)
                     for k in grids["k"] for alpha in grids[ALPHA]}
        entry = study.evaluation(default, decodings)
        for k in grids["k"]:
            for alpha in grids[ALPHA]:
                lists = entry["lists"][decoding_label(alpha, k)]
                study.point(ALPHA, alpha, k_label(k), default, lift_of(entry, lists["utility"]),
                            lists["offline"], lists["utility"])


def lift_of(entry: dict, utility: float) -> float:
    """Captured lift of a mean test utility, with the run's test logging and oracle utility."""
    return metrics.captured_lift(utility, entry["metrics"]["logging_utility"],
                                 entry["metrics"]["oracle_utility"])


def decoding_label(alpha: float, k: int) -> str:
    return f"contrastive k={k} alpha={alpha:g}"


def k_label(k: int) -> str:
    return "k = all (eq. 16)" if k == 0 else f"k = {k}"


# ---------------------------------------------------------------------------------------------
# Tables and figures


def series(points: list[dict], parameter: str, metric: str) -> dict[str, dict[float, list]]:
    """{line: {value: [metric of each seed]}} of one parameter, in the order first seen."""
    lines: dict[str, dict[float, list]] = {}
    for point in points:
        if point["parameter"] == parameter:
            lines.setdefault(point["line"], {}).setdefault(point["value"], []).append(
                point[metric])
    return lines


def _cell(values: list[float]) -> str:
    values = np.array(values, dtype=float)
    if np.isnan(values).all():
        return "n/a"
    text = f"{np.nanmean(values):.4f}"
    if len(values) > 1:
        text += f" ({np.nanmin(values):.4f} - {np.nanmax(values):.4f})"
    return text


def tables(points: list[dict], offline: str, seeds: list[int]) -> str:
    """Every point as Markdown: one table per parameter, a column per line and metric."""
    out = [(f"Test split; mean over seeds {', '.join(map(str, seeds))} (min - max in brackets)"
            if len(seeds) > 1 else f"Test split; seed {seeds[0]}")
           + ". A sensitivity report: no default was chosen from it."]
    labels = {p.name: (p.figure, p.label) for p in PARAMETERS}
    labels[ALPHA] = (4, "alpha (contrastive decoding of the generator alone)")
    for name, (figure, label) in labels.items():
        lifts, offlines = series(points, name, "captured_lift"), series(points, name, "offline")
        if not lifts:
            continue
        lines = list(lifts)
        values = sorted({v for line in lifts.values() for v in line})
        kind = "lists' " if figure == 4 else ""
        header = [f"{NAMES.get(line, line)} {metric}" for line in lines
                  for metric in ("captured lift", kind + offline)]
        out += ["", f"### Fig. {figure}: {label}", "", f"| {name} | " + " | ".join(header) + " |",
                "|---|" + "---|" * len(header)]
        for value in values:
            cells = [_cell(source[line].get(value, [math.nan])) for line in lines
                     for source in (lifts, offlines)]
            out.append(f"| {value:g} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _axis_scale(axis, values: list[float], log: bool) -> None:
    """Log x for a geometric grid (symlog when it holds 0), ticks at the grid's values."""
    positive = [v for v in values if v > 0]
    if log and len(positive) >= 2:
        if len(positive) < len(values):
            axis.set_xscale("symlog", linthresh=min(positive))
        else:
            axis.set_xscale("log", base=2 if all(float(v).is_integer() for v in values) else 10)
    axis.set_xticks(values, [f"{v:g}" for v in values])
    axis.minorticks_off()


def _panel(axis, lines: dict[str, dict[float, list]], label: str, ylabel: str,
           log: bool, default: float | None) -> None:
    values = sorted({v for line in lines.values() for v in line})
    if default is not None and values[0] <= default <= values[-1]:
        axis.axvline(default, color="grey", ls=":", lw=1, label=f"default ({default:g})")
    for index, (line, by_value) in enumerate(lines.items()):
        xs = sorted(by_value)
        ys = [np.array(by_value[x], dtype=float) for x in xs]
        color = f"C{index}"
        axis.plot(xs, [y.mean() for y in ys], "o-", color=color, label=NAMES.get(line, line))
        if any(len(y) > 1 for y in ys):
            axis.fill_between(xs, [y.min() for y in ys], [y.max() for y in ys], color=color,
                              alpha=0.2, lw=0)
    _axis_scale(axis, values, log)
    axis.set_xlabel(label)
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)


def plot(points: list[dict], figure: int, offline: str, defaults: dict, title: str,
         out: Path) -> bool:
    """Captured lift (top row) and the offline metric (bottom row) of each parameter, the
    default setting dotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(p.name, p.label, p.log) for p in PARAMETERS if p.figure == figure]
    if figure == 4:
        panels.append((ALPHA, "alpha (contrastive decoding)", False))
    panels = [panel for panel in panels if series(points, panel[0], "offline")]
    if not panels:
        return False
    chart, axes = plt.subplots(2, len(panels), figsize=(4.6 * len(panels), 7.2), squeeze=False)
    kind = "lists' " if figure == 4 else ""
    for column, (name, label, log) in enumerate(panels):
        default = defaults.get(name)
        _panel(axes[0, column], series(points, name, "captured_lift"), label, "captured lift",
               log, default)
        _panel(axes[1, column], series(points, name, "offline"), label, kind + offline, log,
               default)
        if figure == 4:
            axes[0, column].set_title(
                f"default run's generator alone (default k = {defaults['k']})"
                if name == ALPHA else "retrained generator; pipeline lists", fontsize=9)
    chart.suptitle(title, fontsize=10)
    save_figure(chart, out)
    return True


# ---------------------------------------------------------------------------------------------


def simulate_once(args, seed: int, data: Path) -> None:
    summary = data / "summary.json"
    if summary.exists():
        requests = sum(json.loads(summary.read_text())["requests"].values())
        if requests != args.requests:
            raise SystemExit(f"{data}: simulated with {requests} requests, not "
                             f"{args.requests}; use another --out")
        return
    overrides = [f"movielens_dir={args.movielens_dir}"] if args.preset == "movielens" else []
    config = load_overrides(preset_config(args.preset), None, overrides)
    simulate(config, args.requests, seed, data, overwrite=True, progress=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="kuaishou")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--movielens-dir", default="../shared/data/ml-100k")
    parser.add_argument("--out", default="runs/hp")
    parser.add_argument("--figures", default="3,4", help="which figures: 3, 4 or 3,4")
    for parameter in PARAMETERS:
        parser.add_argument(parameter.option, default=parameter.grid,
                            help=f"Fig. {parameter.figure}: {parameter.label} grid")
    parser.add_argument("--alphas", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9",
                        help="Fig. 4: contrastive decoding weights")
    parser.add_argument("--ks", default="2,3,5,10,0",
                        help="Fig. 4: contrastive candidate-set sizes (0: every candidate)")
    parser.add_argument("--config", help="TOML file of RunConfig settings")
    parser.add_argument("--set", action="append", default=[], help="RunConfig key=value")
    args = parser.parse_args(argv)

    figures = {int(f) for f in parse_grid(args.figures, int)}
    if not figures or not figures <= {3, 4}:
        parser.error("--figures: 3, 4 or 3,4")
    grids = {p.name: parse_grid(getattr(args, p.option[2:].replace("-", "_")), p.kind)
             for p in PARAMETERS}
    grids[ALPHA] = parse_grid(args.alphas)
    grids["k"] = parse_grid(args.ks, int)
    seeds = parse_grid(args.seeds, int)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_FILE
    previous = json.loads(results_path.read_text()) if results_path.exists() else {}
    cache = previous.get("evaluations", {})
    points: list[dict] = []
    offline = "recall@6 / ndcg"
    defaults: dict[str, float] = {}

    def write() -> None:
        result = {"preset": args.preset, "requests": args.requests, "seeds": seeds,
                  "config": args.config, "sets": args.set, "grids": grids,
                  "figures": sorted(figures), "defaults": defaults, "offline_metric": offline,
                  "note": "sensitivity report on the test split; no default was chosen from "
                          "it",
                  "points": points, "evaluations": cache}
        with atomic_file(results_path) as tmp:
            Path(tmp).write_text(json.dumps(result, indent=1))

    started = time.perf_counter()
    for seed in seeds:
        base = out / f"{args.preset}-{seed}"
        data = base / "data"
        simulate_once(args, seed, data)
        config = load_overrides(RunConfig(), args.config, [
            *PROTOCOL, f"train.seed={seed}", f"evaluator_train.seed={seed}",
            f"reranker.seed={seed}", *args.set],
            defaults={**dataset_settings(data), **PAPER_SETTINGS})   # the paper's NAR4Rec
        defaults.update({p.name: setting(config, p.keys["nar4rec"][0]) for p in PARAMETERS})
        defaults.update({ALPHA: config.reranker.contrastive_alpha,
                         "k": config.reranker.contrastive_k})
        study = Study(args, seed, base, data, config, cache, points, write)
        one_seed(study, grids, figures)
        default = cache[str(study.run_dir("nar4rec", DEFAULT).relative_to(out))]
        offline = offline_name(default["protocol"])
        write()
    title = (f"{args.preset}, {args.requests:,} requests, test split; "
             + (f"mean over seeds {args.seeds} (band: min - max)" if len(seeds) > 1
                else f"seed {seeds[0]}")
             + "; a sensitivity report, no default chosen from it")
    for figure in sorted(figures):
        if plot(points, figure, offline, defaults, f"Fig. {figure}: {title}",
                out / f"fig{figure}.png"):
            print(f"wrote {out / f'fig{figure}.png'}", file=sys.stderr)
    print(tables(points, offline, seeds))
    print(f"\n{len(points)} points in {time.perf_counter() - started:.0f} s; "
          f"{results_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
