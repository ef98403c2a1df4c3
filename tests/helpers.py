"""Small builders shared by tests."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nar4rec.data.batch import PAD, RequestBatch
from nar4rec.data.format import FormatSpec, RequestLogWriter
from nar4rec.sim.presets import preset_config
from nar4rec.sim.simulate import simulate


def small_config(preset: str, **overrides):
    """A preset shrunk so that a few thousand requests simulate in a second."""
    config = preset_config(preset)
    sizes = {"n_users": 500, "n_items": 2000, "chunk_size": 1000} if preset != "movielens" \
        else {"chunk_size": 1000}
    return dataclasses.replace(config, **{**sizes, **overrides})


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def simulate_small(out: Path, preset: str = "kuaishou", requests: int = 3000, seed: int = 0,
                   **overrides) -> dict:
    return simulate(small_config(preset, **overrides), requests, seed, out, progress=False)


def plackett_luce_log(path: Path, *, marginal: bool = True, seed: int = 0) -> pa.Table:
    """A small log whose lists a Plackett-Luce logger drew, with every logging_ column right:
    requests of 2 to 5 candidates (n) showing 2 or 3 (m), exact marginals; the last request's
    logging policy is unknown (nulls in the logging_ columns)."""
    from nar4rec.propensity import pl_log_prob, pl_marginals, pl_prefix_log_probs, pl_sample

    rng = np.random.default_rng(seed)
    n = np.array([3, 5, 4, 5, 2, 4])
    m = np.array([2, 3, 3, 2, 2, 3])
    score = rng.normal(size=(len(n), 5)).astype(np.float32)
    temperature = np.array([1.0, 0.5, 2.0, 1.0, 0.3, 1.0])
    logits = np.where(np.arange(5) < n[:, None], score / temperature[:, None], -np.inf)
    lists = pl_sample(logits, 3, rng)[:, 0]
    lists = np.where(np.arange(3) < m[:, None], lists, -1)                  # (R, 3)
    marginals = pl_marginals(logits, 3)                   # exact: 60 ordered lists of 3
    known = np.arange(len(n)) < len(n) - 1
    columns = {
        "request_id": np.arange(len(n)), "user_id": np.arange(len(n)) % 2,
        "timestamp": pa.array(np.arange(len(n)) * 1000, pa.timestamp("ms", tz="UTC")),
        "item_id": [list(range(10 * r, 10 * r + k)) for r, k in enumerate(n)],
        "exposed": [row[:k].tolist() for row, k in zip(lists, m, strict=True)],
        "feedback_click": [[0.0] * k for k in m],
        "log_propensity": pl_log_prob(logits, lists),
        "logging_score": [row[:k].tolist() if ok else None
                          for row, k, ok in zip(score, n, known, strict=True)],
        "logging_temperature": [t if ok else None for t, ok in zip(temperature, known,
                                                                   strict=True)],
        "logging_marginal": [marginals[r, :k, :j].tolist() if ok else None
                             for r, (k, j, ok) in enumerate(zip(n, m, known, strict=True))],
        "logging_prefix_log_propensity": [
            row[:k].tolist() if ok else None
            for row, k, ok in zip(pl_prefix_log_probs(logits, lists), m, known, strict=True)],
    }
    spec = FormatSpec(behaviours=("click",), utility_weights={"click": 1.0},
                      has_upstream_score=False, has_log_propensity=True,
                      has_logging_score=True, has_logging_marginal=marginal,
                      has_logging_prefix=True)
    with RequestLogWriter(path, spec) as writer:
        writer.write(columns)
    return pq.read_table(path)


def train_tiny(root: Path, *, requests: int = 1500, n_candidates: int = 20, list_length: int = 5,
               d_model: int = 32, steps: int = 10, settings: tuple[str, ...] = ()) -> Path:
    """Simulate into root/data and train a small NAR4Rec for a few steps into root/run."""
    from nar4rec.config import RunConfig, load_overrides
    from nar4rec.runs import train_run

    simulate_small(root / "data", requests=requests, n_candidates=n_candidates,
                   list_length=list_length)
    config = load_overrides(RunConfig(), None, [
        f"generator.d_model={d_model}", f"evaluator.d_model={d_model}", "train.epochs=1",
        "evaluator_train.epochs=1", f"train.steps_per_epoch={steps}",
        f"evaluator_train.steps_per_epoch={steps}", *settings])
    train_run(root / "data", root / "run", config=config, progress=False)
    return root / "run"


def ragged(batch: RequestBatch, lengths: list[int]) -> RequestBatch:
    """The first len(lengths) requests of `batch`, cut to `lengths` candidates each; exposed
    lists keep the first min(m, n) positions, pointing at candidates 0..n-1."""
    rows = len(lengths)
    n = torch.tensor(lengths)
    width = batch.cand_mask.shape[1]
    cand_mask = torch.arange(width)[None, :] < n[:, None]                   # (R, N)
    m = batch.exposed.shape[1]
    exposed_mask = torch.arange(m)[None, :] < n.clamp(max=m)[:, None]       # (R, M)
    exposed = torch.stack([torch.randperm(max(k, m))[:m] % k for k in lengths])
    return dataclasses.replace(
        batch,
        request_id=batch.request_id[:rows], user_id=batch.user_id[:rows],
        item_id=batch.item_id[:rows], user_cat=batch.user_cat[:rows],
        user_num=batch.user_num[:rows],
        cand_cat=batch.cand_cat[:rows].masked_fill(~cand_mask[..., None], PAD),
        cand_num=batch.cand_num[:rows].masked_fill(~cand_mask[..., None], 0.0),
        upstream_score=batch.upstream_score[:rows].masked_fill(~cand_mask, 0.0),
        cand_mask=cand_mask, exposed=exposed * exposed_mask, exposed_mask=exposed_mask,
        feedback=batch.feedback[:rows] * exposed_mask[..., None],
        log_propensity=batch.log_propensity[:rows])


def train_every_model(data: Path, root: Path, *, steps: int = 3) -> Path:
    """Every registered model trained `steps` steps of one epoch at hidden size 16 into
    root/<model> (plumbing tests: the weights do not matter, the interface does)."""
    from nar4rec.config import RunConfig, load_overrides
    from nar4rec.registry import MODELS
    from nar4rec.runs import train_run

    config = load_overrides(RunConfig(), None, [
        "train.epochs=1", f"train.steps_per_epoch={steps}", "evaluator_train.epochs=1",
        f"evaluator_train.steps_per_epoch={steps}", "train.batch_size=64",
        "evaluator_train.batch_size=64", "generator.d_model=16", "evaluator.d_model=16",
        "dnn.d_model=16", "dcn.d_model=16", "prm.d_model=16", "edge_rerank.d_model=16",
        "seq2slate.d_model=16", "pier.d_model=16"])
    for model in MODELS:
        train_run(data, root / model, model=model, config=config, progress=False)
    return root
