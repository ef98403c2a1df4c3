"""The shared training loop: learning, self-describing checkpoints, resume, DDP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import simulate_small
from nar4rec.errors import Nar4recError
from nar4rec.train import load_checkpoint

SCRIPT = Path(__file__).with_name("train_script.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "data"
    simulate_small(out, requests=1500, n_candidates=20, list_length=5)
    return out


def run_script(*args, launcher=None) -> None:
    path = os.pathsep.join(filter(None, [str(SCRIPT.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    command = [*(launcher or [sys.executable]), str(SCRIPT), *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_loss_falls_and_checkpoints_describe_themselves(data, tmp_path):
    run = tmp_path / "run"
    run_script(data, run, 3)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    checkpoint = load_checkpoint(run / "last.pt")
    assert checkpoint["describe"]["model"] == "evaluator"
    assert "item_id" in checkpoint["describe"]["space"]["cand_cat"]
    assert checkpoint["progress"]["epoch"] == 3
    assert (run / "best.pt").exists()


def test_a_killed_run_resumes_to_the_same_weights(data, tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_script(data, straight, 3)
    run_script(data, interrupted, 1)                 # "killed" after one epoch
    run_script(data, interrupted, 3, "--resume")
    assert (straight / "weights-rank0.txt").read_text() == \
        (interrupted / "weights-rank0.txt").read_text()
    lines = (interrupted / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]


# NAR4Rec, its evaluator for one epoch, then the generator for three: with dropout and lists
# sampled for the evaluator to judge, so that every step draws random numbers; 1200 training
# requests in batches of 64 are 19 steps per epoch, the last of 48 requests.
KILLABLE = ["--set", "evaluator.d_model=16", "--set", "evaluator_train.epochs=1",
            "--set", "generator.d_model=16", "--set", "generator.dropout=0.1",
            "--set", "generator.evaluator_lists=2", "--set", "train.epochs=3",
            "--set", "train.batch_size=64", "--set", "train.checkpoint_every=5",
            "--set", "train.log_every=1", "--set", "train.patience=10",
            "--set", "train.threads=1", "--set", "evaluator_train.threads=1"]
STEPS_PER_EPOCH = 19


def start_training(data: Path, run: Path, *extra: str) -> subprocess.Popen:
    with open(run.with_suffix(".log"), "a") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "nar4rec", "train", "--data", str(data), "--out", str(run),
             "--quiet", *KILLABLE, *extra], stdout=log, stderr=log,
            env={**os.environ, "OMP_NUM_THREADS": "1"})


def finish(process: subprocess.Popen, run: Path) -> None:
    try:
        code = process.wait(timeout=300)
    finally:
        process.kill()                                # our own child, if it hangs
    assert code == 0, run.with_suffix(".log").read_text()[-3000:]


def progress_of(checkpoint: Path) -> dict | None:
    try:
        return load_checkpoint(checkpoint)["progress"]
    except Nar4recError:                              # not written yet
        return None


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_run_killed_mid_epoch_resumes_every_batch_once_to_the_same_weights(data, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    uninterrupted = start_training(data, straight)    # alongside the one to kill
    try:
        # SIGKILL the run once the generator has checkpointed after step 6 of its epoch 1
        process = start_training(data, killed)
        try:
            deadline = time.monotonic() + 300
            while True:
                progress = progress_of(killed / "generator" / "last.pt")
                if progress and progress["epoch"] == 1 and progress["step_in_epoch"] >= 6:
                    break
                assert process.poll() is None and time.monotonic() < deadline, \
                    "the run ended before it could be killed"
                time.sleep(0.01)
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()                            # our own child only; no-op once dead
            assert process.wait(timeout=60) == -signal.SIGKILL
        progress = progress_of(killed / "generator" / "last.pt")
        assert progress["epoch"] == 1 and 0 < progress["step_in_epoch"] < STEPS_PER_EPOCH

        finish(start_training(data, killed, "--resume"), killed)
        finish(uninterrupted, straight)
    finally:
        uninterrupted.kill()                          # only if a check above failed
        uninterrupted.wait(timeout=60)
    for name in ("evaluator/best.pt", "generator/best.pt", "generator/last.pt"):
        ours, theirs = load_checkpoint(killed / name), load_checkpoint(straight / name)
        assert ours["model"].keys() == theirs["model"].keys()
        assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in ours["model"]), \
            f"{name}: the resumed run's weights differ"
    # steps.jsonl (log_every=1): one record per step with the digest of its batch's request
    # ids; every step's loss and batch the same as the uninterrupted run's, each once
    steps = records(killed / "generator" / "steps.jsonl")
    assert steps == records(straight / "generator" / "steps.jsonl")
    assert [r["step"] for r in steps] == list(range(1, 3 * STEPS_PER_EPOCH + 1))
    for epoch in range(3):
        batches = [b for r in steps if r["epoch"] == epoch for b in r["batches"]]
        assert len(batches) == len(set(batches)) == STEPS_PER_EPOCH
    epochs = records(killed / "generator" / "metrics.jsonl")
    expected = records(straight / "generator" / "metrics.jsonl")
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in epochs] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in expected]


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path, data):
    run = tmp_path / "run"
    run_script(data, run, 1)
    broken = tmp_path / "broken.pt"
    shutil.copy(run / "last.pt", broken)
    broken.write_bytes(broken.read_bytes()[:100])
    with pytest.raises(Nar4recError, match="not a readable nar4rec checkpoint"):
        load_checkpoint(broken)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside python")
def test_two_processes_train_and_agree(data, tmp_path):
    run = tmp_path / "ddp"
    run_script(data, run, 2, launcher=[str(TORCHRUN), "--standalone", "--nproc-per-node", "2"])
    digests = {(run / f"weights-rank{r}.txt").read_text() for r in range(2)}
    assert len(digests) == 1, "the two ranks ended with different weights"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[-1]["train_loss"] < records[0]["train_loss"] + 0.05
    assert torch.isfinite(torch.tensor(records[-1]["valid_loss"]))
