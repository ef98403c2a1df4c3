"""The shared training loop: learning, self-describing checkpoints, resume, DDP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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
