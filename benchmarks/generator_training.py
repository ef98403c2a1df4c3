"""The generator's training objectives judged by the evaluator, compared on a split.

    python benchmarks/generator_training.py \
        --runs runs/dec/kuaishou-0/run runs/dec/movielens-0/run \
        --split valid --out runs/gen --json runs/gen/valid.json

Each given run is a trained NAR4Rec run (its data directory is read from run.json). For every
configuration below, a generator is trained on the run's training split into
OUT/<run's parent name>/<configuration>/, reusing the run's trained evaluator (only the
generator's objective differs; the evaluator, the features and the decoding stay the run's),
and the pipeline's lists, and the generator's greedy lists, are scored on the split by the
simulator's truth (`evaluation.evaluate_run`). "paper" is the run itself. Finished runs are
reused. Choose on --split valid; check the choice on the test split of other seeds.

The configurations (--configs picks some):
    paper           the run as trained (the paper's objective: L_ul on the logged lists)
    self_critical   + eq. 15 on 16 sampled lists judged against the greedy list, weight 16
    gumbel_log      + CONGRATS' consistency training, alpha 0.5, L_con = -sum w log sigmoid
    gumbel_utility  + the same with L_con = minus the predicted utility, alpha 2
    dpo             + DPO between the best and worst of 16 judged lists, beta 0.1, weight 1
    dpo_strong      + the same with beta 0.5, weight 4
    gumbel_critical gumbel_utility and self_critical together
The candidates for the default (stop 24), trained as `nar4rec train` trains by default (10
epochs, patience 2, both phases), each with its own evaluator where it sets one:
    gumbel_default  gumbel_utility alone
    improved        + a causal evaluator with the user interaction term, trained on items
                    alone too, and its item-wise top m proposed
    list_aware_gumbel  + the list-aware evaluator (causal, redundancy inputs), items alone,
                    four evaluator-similarity proposals and its top m (the stop 24 default
                    with --proposals lean)
--proposals evaluates the runs that propose the evaluator's lists under other proposal sets
(PROPOSALS; settings `nar4rec evaluate --set` can change after training).
Every judged configuration trains up to 8 epochs (patience 3): their validation loss, the
evaluator's utility for the greedy lists, keeps improving after the logged lists' likelihood
has stopped (docs/results.md, the list-aware configuration).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from nar4rec.config import RunConfig, load_overrides, parse_sets
from nar4rec.evaluation import evaluate_run
from nar4rec.io import atomic_file
from nar4rec.runs import phases_of, read_run, train_run

JUDGED = ["train.epochs=8", "train.patience=3"]
DEFAULT_EPOCHS = ["train.epochs=10", "train.patience=2", "evaluator_train.epochs=10",
                  "evaluator_train.patience=2"]
GUMBEL = ["generator.gumbel_weight=2", "generator.gumbel_objective=utility"]
# the evaluator as issue 21's investigation left it (benchmarks/evaluator_relevance.py)
IMPROVED_EVALUATOR = ["evaluator.causal=true", "evaluator.user_interaction=true",
                      "evaluator.alone_weight=1"]
LIST_AWARE_EVALUATOR = ["evaluator.causal=true", "evaluator.similarity_heads=4",
                        "evaluator.shared_values=true"]
CONFIGS = {
    "paper": None,
    "self_critical": [*JUDGED, "generator.evaluator_lists=16", "generator.evaluator_weight=16"],
    "gumbel_log": [*JUDGED, "generator.gumbel_weight=0.5"],
    "gumbel_utility": [*JUDGED, "generator.gumbel_weight=2",
                       "generator.gumbel_objective=utility"],
    "dpo": [*JUDGED, "generator.preference_lists=16"],
    "dpo_strong": [*JUDGED, "generator.preference_lists=16", "generator.preference_beta=0.5",
                   "generator.preference_weight=4"],
    "gumbel_critical": [*JUDGED, "generator.gumbel_weight=2", "generator.gumbel_objective=utility",
                        "generator.evaluator_lists=16", "generator.evaluator_weight=16"],
    # the candidates for the default, trained as `nar4rec train` trains by default (10 epochs,
    # patience 2, both phases), each with its own evaluator
    "gumbel_default": [*DEFAULT_EPOCHS, *GUMBEL],
    "improved": [*DEFAULT_EPOCHS, *GUMBEL, *IMPROVED_EVALUATOR, "reranker.evaluator_top_m=true"],
    "list_aware_gumbel": [*DEFAULT_EPOCHS, *GUMBEL, *LIST_AWARE_EVALUATOR,
                          "evaluator.alone_weight=1",
                          "reranker.evaluator_alphas=[0.01,0.02,0.05,0.1]",
                          "reranker.evaluator_top_m=true"],
}


# proposal sets, applied at evaluation (`nar4rec evaluate --set`): fewer proposals cost less
# to serve (the evaluator scores each)
PROPOSALS = {
    "as_trained": [],
    "no_samples": ["reranker.samples=0"],
    "greedy_and_evaluator": ["reranker.samples=0", "reranker.alphas=[0]"],
    "lean": ["reranker.samples=0", "reranker.alphas=[0]", "reranker.evaluator_alphas=[0.02,0.1]"],
}


def applies(proposals: str, settings: list[str]) -> bool:
    """Whether a proposal set applies to a configuration: every set to one that proposes the
    evaluator's top m, a set with evaluator_alphas only to one that has them."""
    if proposals == "as_trained":
        return True
    alphas = "reranker.evaluator_alphas"
    needs_alphas = any(s.startswith(alphas) for s in PROPOSALS[proposals])
    return "reranker.evaluator_top_m=true" in settings and (
        not needs_alphas or any(s.startswith(alphas) for s in settings))


def trained(base: Path, out: Path, settings: list[str] | None) -> tuple[Path, float]:
    """The run of one configuration (the base run for "paper"), trained if not yet; the
    training seconds (0 when reused)."""
    if settings is None:
        return base, 0.0
    if (out / "run.json").exists() and set(read_run(out)["phases"]) >= set(phases_of("nar4rec")):
        return out, 0.0
    info = read_run(base)
    config = load_overrides(RunConfig.from_dict(info["config"]), None, settings)
    start = time.perf_counter()
    # a configuration that sets the evaluator, or how it trains, trains its own
    own_evaluator = any(s.startswith(("evaluator.", "evaluator_train.")) for s in settings)
    train_run(info["data"], out, config=config,
              reuse=None if own_evaluator else {"evaluator": base}, progress=False,
              resume=(out / "run.json").exists())
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", type=Path, required=True)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--split", default="valid")
    parser.add_argument("--proposals", default="as_trained",
                        help=f"proposal sets to evaluate each run under ({', '.join(PROPOSALS)})")
    parser.add_argument("--out", type=Path, default=Path("runs/gen"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configurations {unknown} (known: {', '.join(CONFIGS)})")
    results = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    for base in args.runs:
        label = base.parent.name
        data = read_run(base)["data"]
        for name, proposals in [(n, p) for n in names for p in args.proposals.split(",")]:
            if not applies(proposals, CONFIGS[name] or []):
                continue
            key = f"{label}/{name}{'' if proposals == 'as_trained' else '+' + proposals}/" \
                  f"{args.split}"
            if key in results:
                continue
            run, seconds = trained(base, args.out / label / name, CONFIGS[name])
            report = evaluate_run(run, data, split=args.split,
                                  sets=parse_sets(PROPOSALS[proposals]) or None)
            variants = report["variants"]
            results[key] = {"utility": report["metrics"]["utility"],
                            "greedy": variants["generator_greedy"]["utility"],
                            "evaluator_top_m": variants["evaluator_top_m"]["utility"],
                            "logging": report["metrics"]["logging_utility"],
                            "captured_lift": report["metrics"].get("captured_lift", math.nan),
                            "seconds": seconds}
            print(f"{key}: pipeline {results[key]['utility']:.4f}, greedy "
                  f"{results[key]['greedy']:.4f}, {seconds:.0f} s", flush=True)
            if args.json:
                with atomic_file(args.json) as tmp:
                    tmp.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\n| run / configuration ({args.split}) | pipeline utility | greedy | vs paper |")
    print("|---|---|---|---|")
    for key, values in results.items():
        label, name, split = key.split("/")
        if split != args.split:
            continue
        paper = results.get(f"{label}/paper/{split}", {}).get("utility", math.nan)
        print(f"| {label} / {name} | {values['utility']:.4f} | {values['greedy']:.4f} | "
              f"{values['utility'] - paper:+.4f} |")


if __name__ == "__main__":
    main()
