"""How close the oracle's search gets to the true best list, and what it costs.

    python benchmarks/oracle_gap.py [--requests 2000] [--preset kuaishou]

Small cases (n!/(n-m)! up to 5,040 lists) are compared with exhaustive search; the full
preset is compared with a much wider search (beam 64, 10 rounds of local search over every
unused candidate), since exhaustive search over 60!/54! lists is out of reach.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from nar4rec.sim.oracle import beam_search, exhaustive, local_search
from nar4rec.sim.policy import sample_requests
from nar4rec.sim.presets import preset_config
from nar4rec.sim.simulate import build_world


def search(world, terms, m, beam, rounds, replacements):
    lists, utility = beam_search(world, terms, m, beam)
    return local_search(world, terms, lists, utility, rounds, replacements)


def compare(name, found, best, seconds, requests):
    ratio = found / best
    exact = np.mean(found >= best - 1e-6)
    print(f"| {name} | {ratio.mean():.5f} | {ratio.min():.4f} | {exact:.1%} | "
          f"{1000 * seconds / requests:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="kuaishou")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = preset_config(args.preset)
    world = build_world(config, args.seed)
    c = world.config
    rng = np.random.default_rng(args.seed)
    requests = sample_requests(world, args.requests, rng)
    print(f"preset {args.preset}, {args.requests} requests; default search: beam {c.oracle_beam}, "
          f"{c.oracle_local_rounds} local rounds, {c.oracle_replacements} replacements\n")
    print("| case | mean search / best | worst | exactly best | ms per request |")
    print("|---|---|---|---|---|")
    for n, m in [(5, 5), (6, 4), (8, 4), (7, 5), (10, 4)]:
        small = dataclasses.replace(world, config=dataclasses.replace(c, n_candidates=n,
                                                                       list_length=m))
        terms = small.candidate_terms(requests.users, requests.items[:, :n])
        started = time.perf_counter()
        _, best = exhaustive(small, terms, m)
        exhaustive_seconds = time.perf_counter() - started
        started = time.perf_counter()
        _, found = search(small, terms, m, c.oracle_beam, c.oracle_local_rounds,
                          c.oracle_replacements)
        compare(f"n={n}, m={m}: default search vs exhaustive ({exhaustive_seconds:.1f} s)",
                found, best, time.perf_counter() - started, args.requests)
    n, m = c.n_candidates, c.list_length
    terms = world.candidate_terms(requests.users, requests.items)
    started = time.perf_counter()
    _, reference = search(world, terms, m, 64, 10, n - m)
    reference_seconds = time.perf_counter() - started
    for beam, rounds, replacements in [(1, 0, 0), (1, 4, 10), (4, 4, 10),
                                       (c.oracle_beam, c.oracle_local_rounds,
                                        c.oracle_replacements), (16, 4, 20)]:
        started = time.perf_counter()
        _, found = search(world, terms, m, beam, rounds, replacements)
        compare(f"n={n}, m={m}: beam {beam}, {rounds} rounds, {replacements} replacements vs "
                f"wide search ({1000 * reference_seconds / args.requests:.0f} ms per request)",
                found, np.maximum(reference, found), time.perf_counter() - started,
                args.requests)


if __name__ == "__main__":
    main()
