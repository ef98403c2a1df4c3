"""What `layers.attend`'s explicit path for short key sequences buys: A/B in one process.

    python benchmarks/attention_few_keys.py --presets avito,kuaishou [--workdir runs/bench/work]

The untrained generator of `nar4rec bench` (default size) on a batch of 1024 simulated
requests of each preset, timed with `layers.FEW_KEYS` at 0 (every attention through
`scaled_dot_product_attention`) and at its default, alternating which goes first: inference
(forward + contrastive decoding) and one training step, medians. Both settings run in the same
process on the same batch, so the VM's drift between runs does not enter the ratio.
"""

from __future__ import annotations

import argparse
import functools
import statistics
from pathlib import Path

import torch

import nar4rec.models.layers as layers
from nar4rec.bench import build_for_timing, seconds_per_call, time_training
from nar4rec.data.features import FeatureSpace
from nar4rec.data.loader import RequestLoader
from nar4rec.sim.presets import preset_config
from nar4rec.sim.simulate import simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="avito,kuaishou")
    parser.add_argument("--workdir", default="runs/bench/work",
                        help="simulated data, made here when missing (as nar4rec bench does)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    default = layers.FEW_KEYS
    for preset in args.presets.split(","):
        data = Path(args.workdir) / f"{preset}-data"
        if not (data / "train.parquet").exists():
            simulate(preset_config(preset), 3072, 0, data, overwrite=True, progress=False)
        space = FeatureSpace.fit([data / "train.parquet"])
        batch = next(iter(RequestLoader([data / "train.parquet"], space, batch_size=1024)))
        generator, step, infer = build_for_timing("nar4rec", space, batch.exposed.shape[1], 0.0)
        infer_s = {0: [], default: []}
        train_s = {0: [], default: []}
        for round_ in range(args.rounds):
            for few in ((default, 0) if round_ % 2 else (0, default)):
                layers.FEW_KEYS = few
                with torch.no_grad():
                    infer_s[few] += seconds_per_call(functools.partial(infer, batch), warmup=2,
                                                     repeats=5)
                train_s[few].append(time_training(generator, step, batch, warmup=1, repeats=3))
        layers.FEW_KEYS = default
        for few, name in ((0, "fused kernel for every attention"),
                          (default, f"explicit path up to {default} keys")):
            print(f"{preset}, {name}: inference {statistics.median(infer_s[few]):.4f} s, "
                  f"training step {statistics.median(train_s[few]):.4f} s per batch of 1024")


if __name__ == "__main__":
    main()
