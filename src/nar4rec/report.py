"""An evaluation as a plain-text table (the terminal) and as a Markdown report with curves."""

from __future__ import annotations

import json
import math
from pathlib import Path

from nar4rec.io import atomic_file

METRIC_ORDER = ("auc", "logloss", "ndcg", "ndcg_all_requests", "recall@6", "recall@10",
                "utility", "logging_utility", "oracle_utility", "captured_lift")
NDCG_NOTE = ("`ndcg`: NDCG of each request's logged items ranked by the predicted click "
             "probability, averaged over the requests with a click (the mean the paper's "
             "Table 2 figures imply); `ndcg_all_requests` counts the requests without a click "
             "as 0.")
METRIC_NOTES = {
    "auc": "how well the score separates the clicked logged items from the others (0.5: "
           "chance)",
    "logloss": "cross-entropy of the predicted click (n = m) or exposure (n > m) probability; "
               "lower is better",
    "ndcg": "NDCG of each request's shown items ordered by the score, over the requests with "
            "a click: would the order put the clicked items first?",
    "ndcg_all_requests": "the same NDCG with the requests without a click counted as 0",
    "recall@k": "share of the logged list among the top k candidates by score: how closely "
                "the model imitates the logging policy (the logged lists score 1 at k >= m)",
    "click_recall@k": "share of a request's clicked items among its top k candidates by "
                      "score, over the requests with a click (the logged lists hold every "
                      "click: only shown items can be clicked)",
    "utility": "true expected utility per request of the returned lists (the simulator's)",
    "logging_utility": "the same for the logged lists",
    "oracle_utility": "the same for the simulator's best lists",
    "captured_lift": "(utility - logging) / (oracle - logging): the share of the possible "
                     "gain over the logged lists",
}
REFERENCE_NAMES = {"logged": "logged lists", "upstream": "upstream order"}
OFFLINE_CAVEAT = ("Without a simulator these figures come from the logged feedback, which "
                  "exists only for the items that were shown: they favour the logged lists "
                  "and cannot say whether users would engage more with the model's lists. "
                  "An online test (or an off-policy estimate) can.")
VARIANT_NOTES = {
    "nar4rec": "the pipeline: generator proposals, evaluator picks",
    "generator_greedy": "generator alone, greedy decoding",
    "generator_contrastive": ("generator alone, contrastive decoding (reranker.contrastive_k, "
                              "contrastive_alpha)"),
    "generator_beam": "generator alone, beam search (width 4)",
    "generator_top_k": "generator alone, one top-k sampled list",
    "generator_dpp": "generator alone, DPP (greedy MAP) decoding",
    "evaluator_top_m": "top m candidates by the evaluator's item-wise score",
    "logging": "the logged lists",
    "upstream": "the top m candidates by the ranking stage's upstream_score",
    "oracle": "the simulator's best list",
}


def _number(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}"


def metric_names(result: dict) -> list[str]:
    """The metrics of an evaluation in reading order (METRIC_ORDER, recall@k by k)."""
    present = set(result["metrics"])
    for values in result.get("references", {}).values():
        present |= set(values)
    recalls = sorted((n for n in present if n.startswith(("recall@", "click_recall@"))),
                     key=lambda n: (n.startswith("click"), int(n.split("@")[1])))
    ordered = [n for n in METRIC_ORDER if n in present and not n.startswith("recall@")]
    at = ordered.index("ndcg_all_requests") + 1 if "ndcg_all_requests" in ordered else (
        ordered.index("ndcg") + 1 if "ndcg" in ordered else len(ordered))
    return ordered[:at] + recalls + ordered[at:]


def metric_note(name: str) -> str:
    return METRIC_NOTES.get(name) or METRIC_NOTES.get(name.split("@")[0] + "@k", "")


def _columns(result: dict) -> list[tuple[str, dict]]:
    """(header, metrics) of the model and of each reference."""
    return [(result["model"], result["metrics"])] + [
        (REFERENCE_NAMES.get(name, name), values)
        for name, values in result.get("references", {}).items()]


def format_evaluation(result: dict) -> str:
    """A few aligned lines: the metrics beside the references', each verdict, then each
    variant's true utility."""
    lines = [f"{result['model']} on {result['data']} ({result['split']}, "
             f"{result['requests']:,} requests, {result['protocol']})"]
    columns = _columns(result)
    lines.append(f"  {'':<19}" + "".join(f"{header:>17}" for header, _ in columns))
    for name in metric_names(result):
        lines.append(f"  {name:<19}" + "".join(
            f"{_number(values.get(name)):>17}" for _, values in columns))
    if "ndcg_all_requests" in result["metrics"]:
        lines.append("  (ndcg: over the requests with a click; ndcg_all_requests: over all, "
                     "0 without a click)")
    for verdict in result.get("verdicts", []):
        lines.append(f"  {verdict['sentence']}")
    if "variants" in result:
        lines.append(f"  {'true utility of':<26}{'utility':>10}{'captured lift':>15}")
        for name, values in result["variants"].items():
            lines.append(f"    {name:<24}{_number(values['utility']):>10}"
                         f"{_number(values.get('captured_lift')):>15}")
    else:
        lines.append(f"  {OFFLINE_CAVEAT}")
    return "\n".join(lines)


def write_report(result: dict, path: str | Path) -> None:
    """A Markdown report of one evaluation, with the run's training curves as a PNG beside it."""
    path = Path(path)
    run_dir = Path(result["run"])
    curves = path.with_name(path.stem + "-curves.png")
    plotted = plot_training_curves(run_dir, curves)
    columns = _columns(result)
    lines = [f"# {result['model']}: evaluation on {result['split']}", "",
             f"Run `{run_dir}`, data `{result['data']}`, {result['requests']:,} requests; "
             f"protocol: {result['protocol']}.", ""]
    if result.get("verdicts"):
        lines += ["## Against the references", ""]
        lines += [f"- {verdict['sentence']}" for verdict in result["verdicts"]]
        lines.append("")
    lines += ["| metric | " + " | ".join(header for header, _ in columns) + " | what it says |",
              "|---|" + "---|" * (len(columns) + 1)]
    lines += [f"| {name} | " + " | ".join(_number(values.get(name)) for _, values in columns)
              + f" | {metric_note(name)} |" for name in metric_names(result)]
    lines += ["", "References: the logged lists in the order they were shown; the upstream "
              "order ranks candidates by the data's `upstream_score` (absent when the data "
              "has none). A reference has no probability, so no logloss."]
    if "variants" not in result:
        lines += ["", OFFLINE_CAVEAT]
    if "variants" in result:
        lines += ["", "## True expected utility per request (simulator ground truth)", "",
                  "| lists | utility | captured lift | what they are |", "|---|---|---|---|"]
        lines += [f"| {name} | {_number(v['utility'])} | {_number(v.get('captured_lift'))} | "
                  f"{VARIANT_NOTES.get(name, '')} |" for name, v in result["variants"].items()]
        behaviours = next(iter(result["behaviour_means"].values()))
        lines += ["", "## Expected count of each behaviour per request", "",
                  "| lists | " + " | ".join(behaviours) + " |",
                  "|---|" + "---|" * len(behaviours)]
        lines += [f"| {name} | " + " | ".join(_number(v) for v in means.values()) + " |"
                  for name, means in result["behaviour_means"].items()]
        lines += ["", "Captured lift = (method - logging) / (oracle - logging)."]
    if plotted:
        lines += ["", "## Training curves", "", f"![training curves]({curves.name})"]
    lines.append("")
    with atomic_file(path) as tmp:
        Path(tmp).write_text("\n".join(lines))


def plot_training_curves(run_dir: Path, out: Path) -> bool:
    """Training loss by step and validation loss by epoch of each phase; False if none."""
    import json

    from nar4rec.config import RUN_FILE

    recorded = json.loads((run_dir / RUN_FILE).read_text())["phases"] \
        if (run_dir / RUN_FILE).exists() else {}
    phases = [p for p in recorded if (run_dir / p / "metrics.jsonl").exists()]
    if not phases:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(phases), figsize=(5.5 * len(phases), 3.6),
                                squeeze=False)
    for axis, phase in zip(axes[0], phases, strict=True):
        steps = _records(run_dir / phase / "steps.jsonl")
        epochs = _records(run_dir / phase / "metrics.jsonl")
        if steps:
            axis.plot([r["step"] for r in steps], [r["train_loss"] for r in steps],
                      lw=1, label="train (running mean)")
        axis.plot([r["step"] for r in epochs], [r["train_loss"] for r in epochs], "o-",
                  label="train (epoch)")
        axis.plot([r["step"] for r in epochs], [r["valid_loss"] for r in epochs], "s-",
                  label="validation (epoch)")
        axis.set_title(phase)
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    save_figure(figure, out)
    return True


def save_figure(figure, out: Path) -> None:
    """Lay out a matplotlib figure, write it as a PNG atomically, and close it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    with atomic_file(out) as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    plt.close(figure)


def _records(path: Path) -> list[dict]:
    """JSON lines, keeping the last record of each step (a resumed run may repeat some)."""
    if not path.exists():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]
