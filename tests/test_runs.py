"""The generator-evaluator pipeline and the train / evaluate / rerank workflow and commands."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from helpers import simulate_small
from nar4rec.config import RunConfig, load_overrides
from nar4rec.data.features import FeatureSpace
from nar4rec.data.loader import RequestLoader
from nar4rec.decode import contrastive
from nar4rec.errors import Nar4recError
from nar4rec.evaluation import evaluate_run
from nar4rec.metrics import list_utility
from nar4rec.models.evaluator import Evaluator, EvaluatorConfig
from nar4rec.models.nar4rec import NAR4Rec, NAR4RecConfig
from nar4rec.reranker import Reranker, RerankerConfig
from nar4rec.runs import load_run, rerank_file, train_run
from nar4rec.sim.world import World

M = 5
SMALL = ["generator.d_model=32", "evaluator.d_model=32", "train.epochs=3",
         "evaluator_train.epochs=3", "train.batch_size=128", "evaluator_train.batch_size=128"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "data"
    simulate_small(out, requests=3000, n_candidates=20, list_length=M)
    return out


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A NAR4Rec system trained for three short epochs (about 20 s on 2 cores)."""
    out = tmp_path_factory.mktemp("runs") / "nar4rec"
    config = load_overrides(RunConfig(), None, SMALL)
    train_run(data, out, config=config, progress=False)
    return out


@pytest.fixture(scope="module")
def batch(data):
    space = FeatureSpace.fit([data / "train.parquet"])
    return next(iter(RequestLoader([data / "test.parquet"], space, batch_size=64))), space


def untrained_reranker(space, evaluator_config: dict | None = None, **config) -> Reranker:
    """A reranker of untrained modules whose proposals are the generator's (the paper's), and
    the evaluator's only where `config` asks for them."""
    config = {"evaluator_alphas": (), "evaluator_top_m": False, **config}
    torch.manual_seed(0)
    generator = NAR4Rec(NAR4RecConfig(list_length=M, d_model=32), space)
    evaluator = Evaluator(EvaluatorConfig(list_length=M, d_model=32, **(evaluator_config or {})),
                          space)
    return Reranker(generator, evaluator, space.utility_weights, RerankerConfig(**config))


def assert_valid_lists(lists: torch.Tensor, cand_mask: torch.Tensor) -> None:
    for row, mask in zip(lists.tolist(), cand_mask, strict=True):
        placed = [i for i in row if i >= 0]
        assert len(placed) == len(set(placed)) == min(len(row), int(mask.sum()))
        assert all(mask[i] for i in placed)
        assert row[:len(placed)] == placed            # -1 only at the end


def test_the_evaluator_returns_the_best_of_the_proposals(batch):
    batch, space = batch
    reranker = untrained_reranker(space, alphas=(0.0, 0.6), samples=3)
    out = reranker.rerank(batch)
    assert out.proposals.shape == (len(batch), 5, M)
    for k in range(5):
        assert_valid_lists(out.proposals[:, k], batch.cand_mask)
    predicted = reranker.item_utility(batch, out.proposals).sum(-1)          # (B, K)
    assert torch.equal(out.chosen, predicted.argmax(1))
    assert torch.allclose(out.utility, predicted.max(1).values)
    rows = torch.arange(len(batch))
    assert torch.equal(out.lists, out.proposals[rows, out.chosen])
    assert torch.allclose(out.item_scores.sum(1), out.utility, atol=1e-5)
    assert (out.chosen != 0).any(), "an untrained evaluator should not always pick proposal 0"


def test_proposals_with_the_evaluators_similarity(batch):
    """Evaluator alphas add one contrastive list each, decoded with the evaluator's pairwise
    similarities, between the generator's alphas and the samples; alpha 0 is greedy."""
    batch, space = batch
    redundant = {"similarity_heads": 2, "shared_values": True}
    reranker = untrained_reranker(space, redundant, alphas=(0.0,), evaluator_alphas=(0.0, 0.5),
                                  samples=2)
    out = reranker.rerank(batch)
    assert reranker.config.proposals == 5 and out.proposals.shape == (len(batch), 5, M)
    for k in range(5):
        assert_valid_lists(out.proposals[:, k], batch.cand_mask)
    assert torch.equal(out.proposals[:, 1], out.proposals[:, 0])            # both greedy
    with torch.no_grad():
        generated = reranker.generator(batch)
        expected = contrastive(generated.probs, None, batch.cand_mask, alpha=0.5,
                               pairwise=reranker.evaluator.candidate_similarity(batch))
    assert torch.equal(out.proposals[:, 2], expected)
    assert not torch.equal(out.proposals[:, 2], out.proposals[:, 0])
    predicted = reranker.item_utility(batch, out.proposals).sum(-1)
    assert torch.equal(out.chosen, predicted.argmax(1))
    with pytest.raises(ValueError, match="evaluator_alphas needs an evaluator"):
        untrained_reranker(space, {"similarity_heads": 0, "shared_values": False},
                           evaluator_alphas=(0.1,))
    with pytest.raises(ValueError, match="evaluator_alphas must lie in"):
        RerankerConfig(evaluator_alphas=(-0.1,))


def test_the_evaluators_top_m_is_proposed_last(batch):
    """`evaluator_top_m` appends the evaluator's item-wise top m to the generator's lists;
    the evaluator then returns it only where no generated list scores higher."""
    batch, space = batch
    reranker = untrained_reranker(space, alphas=(0.0, 0.3), samples=1, evaluator_top_m=True)
    out = reranker.rerank(batch)
    assert reranker.config.proposals == 4 and out.proposals.shape == (len(batch), 4, M)
    assert torch.equal(out.proposals[:, 3], reranker.evaluator_top_m(batch).lists)
    plain = untrained_reranker(space, alphas=(0.0, 0.3), samples=1).rerank(batch)
    assert torch.equal(out.proposals[:, :3], plain.proposals)
    predicted = reranker.item_utility(batch, out.proposals).sum(-1)
    assert torch.equal(out.chosen, predicted.argmax(1))
    assert (out.chosen == 3).any()
    with pytest.raises(ValueError, match="evaluator_top_m needs an evaluator"):
        Reranker(reranker.generator, None, space.utility_weights,
                 RerankerConfig(evaluator_top_m=True, evaluator_alphas=()))


def test_proposals_are_repeatable_and_the_sampler_seeded(batch):
    batch, space = batch
    first = untrained_reranker(space, samples=2, seed=3).propose(batch)
    again = untrained_reranker(space, samples=2, seed=3).propose(batch)
    other = untrained_reranker(space, samples=2, seed=4).propose(batch)
    assert torch.equal(first, again)
    assert not torch.equal(first[:, -2:], other[:, -2:])
    assert torch.equal(first[:, :-2], other[:, :-2])                # decoded lists: no seed


def test_a_requests_list_does_not_depend_on_its_batch(batch):
    batch, space = batch
    reranker = untrained_reranker(space, samples=4)
    together = reranker.rerank(batch).proposals
    for row in (0, 5, 17):
        alone = reranker.rerank(slice_batch(batch, row)).proposals
        assert torch.equal(alone[0], together[row])
    swapped = reranker.rerank(slice_batch(batch, [17, 0])).proposals
    assert torch.equal(swapped[0], together[17]) and torch.equal(swapped[1], together[0])


def slice_batch(batch, rows):
    rows = [rows] if isinstance(rows, int) else rows
    return dataclasses.replace(batch, **{
        name: value[rows] for name, value in vars(batch).items()
        if isinstance(value, torch.Tensor)})


def test_requests_with_fewer_candidates_than_positions(batch):
    batch, space = batch
    batch = dataclasses.replace(batch, cand_mask=batch.cand_mask.clone())
    batch.cand_mask[0, 3:] = False                                   # 3 candidates < m = 5
    batch.cand_mask[1, 1:] = False
    for reranker in (untrained_reranker(space), untrained_reranker(space, select="first")):
        out = reranker.rerank(batch)
        assert_valid_lists(out.lists, batch.cand_mask)
        assert (out.lists[0, 3:] == -1).all() and (out.lists[1, 1:] == -1).all()
        assert (out.item_scores[0, 3:] == 0).all()


def test_evaluator_top_m_sorts_by_item_wise_score(batch):
    batch, space = batch
    reranker = untrained_reranker(space)
    scores = reranker.item_wise_scores(batch)                        # (B, n)
    out = reranker.evaluator_top_m(batch)
    expected = scores.topk(M, dim=1).indices
    assert torch.equal(out.lists, expected)
    only_evaluator = Reranker(None, reranker.evaluator, space.utility_weights)
    assert torch.equal(only_evaluator.rerank(batch).lists, expected)


def test_reranker_config_checks_its_values():
    with pytest.raises(ValueError, match="alphas must lie in"):
        RerankerConfig(alphas=(1.5,))
    with pytest.raises(ValueError, match="select must be one of"):
        RerankerConfig(select="best")
    assert RerankerConfig(alphas=[0.1, 0.2], samples=1, evaluator_alphas=[],
                          evaluator_top_m=False).proposals == 3
    # the default: greedy, two evaluator-similarity lists, the evaluator's item-wise top m
    assert RerankerConfig().proposals == 1 + 2 + 1


def test_nested_settings_from_set_and_toml(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[generator]\nd_model = 48\nheads = 4\n[train]\nepochs = 7\n")
    config = load_overrides(RunConfig(), toml, ["generator.omega=0.05", "reranker.alphas=[0.2]"])
    assert config.generator.d_model == 48 and config.generator.omega == 0.05
    assert config.train.epochs == 7 and config.reranker.alphas == (0.2,)
    with pytest.raises(Nar4recError, match="unknown setting 'd_modle'"):
        load_overrides(RunConfig(), None, ["generator.d_modle=3"])
    with pytest.raises(Nar4recError, match="must be a multiple of heads"):
        load_overrides(RunConfig(), None, ["generator.d_model=30"])


def test_the_shipped_list_aware_config_builds_its_pipeline(batch):
    """configs/list-aware.toml (the configuration results.md reports) applies cleanly and
    gives the reranker its evaluator-similarity proposals."""
    batch, space = batch
    path = Path(__file__).parents[1] / "configs" / "list-aware.toml"
    config = load_overrides(RunConfig(), path, [])
    assert config.evaluator.causal and config.evaluator.similarity_heads > 0
    torch.manual_seed(0)
    reranker = Reranker(
        NAR4Rec(dataclasses.replace(config.generator, list_length=M), space),
        Evaluator(dataclasses.replace(config.evaluator, list_length=M), space),
        space.utility_weights, config.reranker)
    out = reranker.rerank(batch)
    extra = len(config.reranker.evaluator_alphas)
    assert extra > 0 and config.reranker.evaluator_top_m and reranker.config.proposals == (
        len(config.reranker.alphas) + extra + config.reranker.samples + 1)
    assert out.proposals.shape == (len(batch), reranker.config.proposals, M)
    for k in range(reranker.config.proposals):
        assert_valid_lists(out.proposals[:, k], batch.cand_mask)


def test_the_shipped_paper_config_is_the_papers_settings():
    """configs/paper.toml and `PAPER_SETTINGS` (what `compare` trains as nar4rec_paper) set
    the same values, and each differs from the default it sets back."""
    from nar4rec.config import PAPER_SETTINGS, paper_config

    path = Path(__file__).parents[1] / "configs" / "paper.toml"
    from_file = load_overrides(RunConfig(), path, [])
    assert from_file == paper_config(RunConfig())
    defaults = RunConfig()
    for key, value in PAPER_SETTINGS.items():
        section, name = key.split(".")
        assert getattr(getattr(from_file, section), name) == value
        assert getattr(getattr(defaults, section), name) != value, key


def test_a_stored_run_without_a_newer_setting_reads_the_value_it_was_trained_with():
    """run.json files written before stop 24 lack alone_weight (and older ones the Gumbel
    settings): they were trained at the paper's values, and must not turn into today's
    defaults when read (to resume, time or export them)."""
    from nar4rec.config import PAPER_SETTINGS, stored_section

    stored = json.loads(json.dumps(dataclasses.asdict(RunConfig())))    # as run.json holds it
    for key in PAPER_SETTINGS:
        section, name = key.split(".")
        del stored[section][name]
    stored["evaluator"]["d_model"] = 48                                   # a value it has
    read = RunConfig.from_dict(stored)
    for key, value in PAPER_SETTINGS.items():
        section, name = key.split(".")
        assert getattr(getattr(read, section), name) == value, key
    assert read.evaluator.d_model == 48
    # a file that holds the settings keeps them, defaults and all
    assert RunConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(RunConfig())))) \
        == RunConfig()
    assert stored_section("evaluator", {"causal": True})["causal"] is True
    assert stored_section("dnn", {"d_model": 8}) == {"d_model": 8}


def test_a_trained_system_beats_the_logging_policy(run, data):
    report = evaluate_run(run, data)
    values = report["metrics"]
    assert set(values) >= {"recall@6", "recall@10", "logloss", "utility", "logging_utility",
                           "oracle_utility", "captured_lift"}
    assert values["utility"] > values["logging_utility"]
    lift = (values["utility"] - values["logging_utility"]) / \
        (values["oracle_utility"] - values["logging_utility"])
    assert values["captured_lift"] == pytest.approx(lift)
    assert 0 < values["recall@6"] <= values["recall@10"] <= 1
    variants = report["variants"]
    assert variants["nar4rec"]["utility"] == pytest.approx(values["utility"])
    assert variants["oracle"]["utility"] >= max(v["utility"] for v in variants.values()) - 1e-9
    assert variants["generator_greedy"]["utility"] > variants["logging"]["utility"]
    # The simulator's own numbers for the same lists agree with the evaluation's.
    oracle = pq.read_table(data / "truth" / "oracle_test.parquet")
    assert values["oracle_utility"] == pytest.approx(
        np.mean(oracle.column("oracle_utility").to_numpy()), rel=1e-6)
    assert values["logging_utility"] == pytest.approx(
        np.mean(oracle.column("logging_utility").to_numpy()), rel=1e-6)


def test_random_lists_are_worse_than_the_trained_system(run, data):
    loaded = load_run(run)
    world = World.load(data)
    loader = RequestLoader([data / "test.parquet"], loaded.space, batch_size=1024)
    generator = torch.Generator().manual_seed(0)
    ours, random = [], []
    for batch in loader:
        ours.append(list_utility(world, batch, loaded.reranker.rerank(batch).lists))
        noise = torch.rand(batch.cand_mask.shape, generator=generator)
        random_lists = noise.masked_fill(~batch.cand_mask, -1).topk(M, dim=1).indices
        random.append(list_utility(world, batch, random_lists))
    assert np.concatenate(ours).mean() > np.concatenate(random).mean() * 1.1


def test_item_wise_protocol_when_every_candidate_is_shown(tmp_path):
    data = tmp_path / "avito"
    simulate_small(data, preset="avito", requests=1500)
    run = tmp_path / "run"
    # Avito's batch of 1024 would leave 1,200 training requests two steps an epoch
    config = load_overrides(RunConfig(), None, ["evaluator_train.epochs=2",
                                                "evaluator_train.batch_size=128",
                                                "evaluator.d_model=16",
                                                "features.min_count=3"])
    train_run(data, run, model="evaluator", config=config, progress=False)
    kept = load_run(run).space.cand_cat["item_id"].size
    assert kept < FeatureSpace.fit([data / "train.parquet"]).cand_cat["item_id"].size
    report = evaluate_run(run, data)
    assert report["model"] == "evaluator"
    assert {"auc", "logloss", "ndcg", "ndcg_all_requests"} <= set(report["metrics"])
    assert "recall@6" not in report["metrics"]
    # ndcg averages over the requests with a click, ndcg_all_requests over all (0 without one).
    test = list(RequestLoader([data / "test.parquet"], load_run(run).space, batch_size=512))
    clicked = sum(int(((b.feedback[..., 0] > 0) & b.exposed_mask).any(1).sum()) for b in test)
    requests = sum(len(b) for b in test)
    assert 0 < clicked < requests
    assert report["metrics"]["ndcg_all_requests"] == \
        pytest.approx(report["metrics"]["ndcg"] * clicked / requests, rel=1e-9)
    in_batches = evaluate_run(run, data, batch_size=32)["metrics"]       # weighted per batch
    for name in ("ndcg", "ndcg_all_requests"):
        assert in_batches[name] == pytest.approx(report["metrics"][name], rel=1e-9)
    assert 0.5 < report["metrics"]["auc"] <= 1
    assert set(report["variants"]) == {"evaluator_top_m", "logging", "upstream", "oracle"}


def test_rerank_writes_one_valid_list_per_request(run, data, tmp_path):
    out = tmp_path / "lists.parquet"
    count = rerank_file(run, data / "test.parquet", out)
    table = pq.read_table(out)
    source = pq.read_table(data / "test.parquet", columns=["request_id", "item_id"])
    assert count == table.num_rows == source.num_rows
    assert table.column("request_id").to_pylist() == source.column("request_id").to_pylist()
    for items, positions, candidates in zip(table.column("items").to_pylist(),
                                            table.column("positions").to_pylist(),
                                            source.column("item_id").to_pylist(), strict=True):
        assert len(items) == M and len(set(positions)) == M
        assert items == [candidates[p] for p in positions]
    assert not list(tmp_path.glob(".*"))                              # no temporary left


def test_evaluator_reuse_and_resume(run, data, tmp_path):
    reused = tmp_path / "vanilla"
    config = load_overrides(RunConfig(), None, [*SMALL, "train.epochs=1",
                                                "generator.objective=likelihood"])
    info = train_run(data, reused, config=config, reuse={"evaluator": run}, progress=False)
    assert info["phases"]["evaluator"] == {"copied_from": str(run)}
    original = torch.load(run / "evaluator" / "best.pt", weights_only=True)["model"]
    copied = torch.load(reused / "evaluator" / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(original[k], copied[k]) for k in original)
    # A run "killed" before the generator's phase finished resumes it, keeping the evaluator.
    state = json.loads((reused / "run.json").read_text())
    del state["phases"]["generator"]
    (reused / "run.json").write_text(json.dumps(state))
    with pytest.raises(Nar4recError, match="generator has not finished"):
        load_run(reused)
    info = train_run(data, reused, config=config, reuse={"evaluator": run}, resume=True,
                     progress=False)
    assert "generator" in info["phases"] and "copied_from" in info["phases"]["evaluator"]
    assert load_run(reused).config.generator.objective == "likelihood"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nar4rec", *args], capture_output=True,
                          text=True)


def test_commands_end_to_end_and_their_errors(run, data, tmp_path):
    done = cli("evaluate", "--run", str(run), "--data", str(data), "--json",
               str(tmp_path / "m.json"), "--report", str(tmp_path / "r.md"),
               "--set", "reranker.samples=0")
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["model"] == "nar4rec" and "captured_lift" in result["metrics"]
    assert "captured lift" in done.stdout
    assert "![training curves](r-curves.png)" in (tmp_path / "r.md").read_text()
    assert (tmp_path / "r-curves.png").read_bytes()[:4] == b"\x89PNG"

    done = cli("train", "--data", str(data), "--out", str(run), "--quiet")
    assert done.returncode == 2 and "already exists; use --resume" in done.stderr
    done = cli("evaluate", "--run", str(tmp_path), "--data", str(data))
    assert done.returncode == 2 and "not a run directory" in done.stderr
    done = cli("evaluate", "--run", str(run), "--data", str(data), "--set",
               "generator.d_model=8")
    assert done.returncode == 2 and "only these settings after training: reranker.*" \
        in done.stderr
    done = cli("train", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "r2"))
    assert done.returncode == 2 and "no such data directory" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("judged", [
    "generator.evaluator_lists=4",                        # self-critical
    "generator.gumbel_weight=0.5",                        # CONGRATS' consistency training
    "generator.preference_lists=4"])                      # DPO between judged lists
def test_training_on_the_generators_own_lists(run, data, tmp_path, judged):
    """The generator trains with the run's evaluator judging its own lists, and validation
    reports the evaluator's utility for its greedy lists."""
    from nar4rec.bench import time_training
    from nar4rec.models.nar4rec import greedy_judged_utility

    out = tmp_path / "judged"
    config = load_overrides(RunConfig(), None, [*SMALL, "train.epochs=1", judged])
    train_run(data, out, config=config, reuse={"evaluator": run}, progress=False)
    system = load_run(out)
    valid_loss = json.loads((out / "generator" / "metrics.jsonl").read_text()
                            .splitlines()[0])["valid_loss"]
    reranker = system.reranker
    judged, count = 0.0, 0
    with torch.no_grad():
        for batch in RequestLoader([data / "valid.parquet"], system.space, batch_size=256):
            judged += float(greedy_judged_utility(reranker.generator(batch), batch,
                                                  reranker.evaluator,
                                                  system.space.utility_weights)) * len(batch)
            count += len(batch)
    assert valid_loss == pytest.approx(-judged / count, rel=1e-4)
    assert judged / count > 0
    # `nar4rec compare` and `bench` time such a run's training step with its evaluator judging
    module, step = system.system.training_step()
    assert time_training(module, step, batch, warmup=1, repeats=1) > 0


def test_no_valid_split_warns_and_resume_needs_the_run_and_its_data(data, tmp_path, caplog):
    only_train = tmp_path / "only-train"
    only_train.mkdir()
    (only_train / "train.parquet").symlink_to(data / "train.parquet")
    run = tmp_path / "run"
    config = load_overrides(RunConfig(), None, ["train.epochs=1", "train.steps_per_epoch=2"])
    with caplog.at_level(logging.WARNING, logger="nar4rec"):
        train_run(only_train, run, model="dnn", config=config, progress=False)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "\n" not in warned[0]
    assert "no 'valid' split" in warned[0] and "training loss" in warned[0]

    (tmp_path / "empty").mkdir()
    for missing in (tmp_path / "nothing", tmp_path / "empty"):
        with pytest.raises(Nar4recError, match=f"{missing}: no run to resume"):
            train_run(only_train, missing, model="dnn", resume=True, progress=False)
    assert not (tmp_path / "nothing").exists() and not any((tmp_path / "empty").iterdir())

    # Other data (here: with a valid split) is refused unless forced; a copy is the same data.
    with pytest.raises(Nar4recError, match="trained on other data"):
        train_run(data, run, model="dnn", resume=True, progress=False)
    assert train_run(data, run, model="dnn", resume=True, force=True, progress=False)["phases"]
    copy = shutil.copytree(only_train, tmp_path / "copy")
    assert not (copy / "train.parquet").is_symlink()
    assert train_run(copy, run, model="dnn", resume=True, progress=False)["phases"]


def test_training_into_a_log_file_writes_a_line_per_epoch(data, tmp_path):
    """Without a terminal (output to a file, as under nohup) there is no progress bar, so
    `nar4rec train` writes one line per epoch of each phase; --quiet writes none."""
    settings = [f"--set={s}" for s in ("train.epochs=2", "evaluator_train.epochs=2",
                                       "train.steps_per_epoch=3",
                                       "evaluator_train.steps_per_epoch=3",
                                       "generator.d_model=16", "evaluator.d_model=16")]
    done = cli("train", "--data", str(data), "--out", str(tmp_path / "logged"), *settings)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if ": epoch " in line]
    assert [line.split(":")[0] + line.split(":")[1] for line in lines] == [
        "evaluator epoch 0", "evaluator epoch 1", "generator epoch 0", "generator epoch 1"]
    assert all("train loss" in line and "valid loss" in line for line in lines)
    quiet = cli("train", "--data", str(data), "--out", str(tmp_path / "quiet"), "--quiet",
                *settings)
    assert quiet.returncode == 0 and ": epoch " not in quiet.stderr
