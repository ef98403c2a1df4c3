"""NAR4Rec's evaluator against DNN: item relevance alone and feedback in context, on a split.

    python benchmarks/evaluator_relevance.py --data runs/dec/{kuaishou,movielens}-{0,1}/data \
        --split valid --out runs/evrel --json runs/evrel/valid.json

For every data directory, DNN and each evaluator variant below are trained on the training
split (`nar4rec train --model evaluator`, the evaluator alone, seconds each) into
OUT/<data's parent name>/<variant>/, then scored on the split two ways:
    topm_utility  the true utility of the m candidates it rates best one by one, in that order
                  (the evaluator scores each candidate alone at the first position,
                  `Reranker.item_wise_scores`): relevance without list context.
    bce           the mean binary cross-entropy of its behaviour predictions for the logged
                  items, each in its logged list (the evaluator) or alone (DNN): the loss both
                  are trained on (`System.predict_feedback`).
Finished runs are reused. Choose on --split valid; check on the test split of other seeds.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from nar4rec.config import RunConfig, dataset_settings, load_overrides
from nar4rec.data.loader import RequestLoader
from nar4rec.evaluation import evaluate_run
from nar4rec.io import atomic_file
from nar4rec.runs import load_run, read_run, split_files, train_run

EPOCHS = ["evaluator_train.epochs=3"]
VARIANTS = {
    "dnn": ("dnn", ["train.epochs=3"]),
    "default": ("evaluator", EPOCHS),
    "epochs10": ("evaluator", ["evaluator_train.epochs=10", "evaluator_train.patience=2"]),
    "causal": ("evaluator", [*EPOCHS, "evaluator.causal=true"]),
    "interaction": ("evaluator", [*EPOCHS, "evaluator.user_interaction=true"]),
    "layers2": ("evaluator", [*EPOCHS, "evaluator.layers=2"]),
    "dropout": ("evaluator", [*EPOCHS, "evaluator.dropout=0.1"]),
    "alone": ("evaluator", [*EPOCHS, "evaluator.alone_weight=1"]),
    "causal_alone": ("evaluator", [*EPOCHS, "evaluator.causal=true", "evaluator.alone_weight=1"]),
    "causal_interaction_alone": ("evaluator", [*EPOCHS, "evaluator.causal=true",
                                               "evaluator.user_interaction=true",
                                               "evaluator.alone_weight=1"]),
    "causal_interaction": ("evaluator", [*EPOCHS, "evaluator.causal=true",
                                         "evaluator.user_interaction=true"]),
    "causal_interaction_d128": ("evaluator", [*EPOCHS, "evaluator.causal=true",
                                              "evaluator.user_interaction=true",
                                              "evaluator.d_model=128"]),
}


@torch.no_grad()
def logged_bce(run: Path, data: Path, split: str) -> float:
    """The mean per-behaviour BCE of the run's feedback predictions for the logged items."""
    loaded = load_run(run)
    total, cells = 0.0, 0
    for batch in RequestLoader(split_files(data, split), loaded.space, batch_size=1024):
        probs = loaded.system.predict_feedback(batch, batch.exposed)           # (B, M, K)
        cell = torch.nn.functional.binary_cross_entropy(
            probs.clamp(1e-7, 1 - 1e-7), batch.feedback, reduction="none")
        total += float(cell[batch.exposed_mask].sum())
        cells += int(batch.exposed_mask.sum()) * cell.shape[-1]
    return total / cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", type=Path, required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--split", default="valid")
    parser.add_argument("--out", type=Path, default=Path("runs/evrel"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown} (known: {', '.join(VARIANTS)})")
    results = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    for data in args.data:
        label = data.parent.name
        seed = json.loads((data / "summary.json").read_text()).get("seed", 0)
        for name in names:
            key = f"{label}/{name}/{args.split}"
            if key in results:
                continue
            model, settings = VARIANTS[name]
            out = args.out / label / name
            if not (out / "done").exists():
                config = load_overrides(RunConfig(), None, [
                    *settings, f"train.seed={seed}", f"evaluator_train.seed={seed}"],
                    defaults=dataset_settings(data))
                train_run(data, out, model=model, config=config, progress=False, overwrite=True)
            report = evaluate_run(out, data, split=args.split)
            phase = read_run(out)["phases"]
            results[key] = {"topm_utility": report["metrics"]["utility"],
                            "bce": logged_bce(out, data, args.split),
                            "logging": report["metrics"]["logging_utility"],
                            "seconds": sum(p["seconds"] for p in phase.values())}
            print(f"{key}: top m {results[key]['topm_utility']:.4f}, BCE "
                  f"{results[key]['bce']:.5f}", flush=True)
            if args.json:
                with atomic_file(args.json) as tmp:
                    tmp.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\n| data / variant ({args.split}) | item-wise top m utility | vs DNN | "
          f"BCE in context | vs DNN |")
    print("|---|---|---|---|---|")
    for key, values in results.items():
        label, name, split = key.split("/")
        if split != args.split:
            continue
        dnn = results.get(f"{label}/dnn/{split}", {})
        print(f"| {label} / {name} | {values['topm_utility']:.4f} | "
              f"{values['topm_utility'] - dnn.get('topm_utility', math.nan):+.4f} | "
              f"{values['bce']:.5f} | "
              f"{values['bce'] - dnn.get('bce', math.nan):+.5f} |")


if __name__ == "__main__":
    main()
