"""The command line: help everywhere, clear one-line errors, no half-written outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nar4rec.cli import build_parser

COMMANDS = [[], ["simulate"], ["validate"], ["prepare"], ["prepare", "avito"],
            ["prepare", "kuairand"], ["prepare", "mind"]]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nar4rec", *args], capture_output=True,
                          text=True)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "nar4rec")
def test_every_command_has_help(command):
    done = run(*command, "--help")
    assert done.returncode == 0
    assert "usage: nar4rec" in done.stdout


def test_the_parser_knows_every_documented_command():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"simulate", "validate", "prepare"} <= set(commands)


def test_simulate_then_validate(tmp_path):
    out = tmp_path / "data"
    done = run("simulate", "--preset", "avito", "--requests", "900", "--seed", "1",
               "--out", str(out), "--set", "n_users=200", "--set", "n_items=500",
               "--set", "utility_weights.click=2.5")
    assert done.returncode == 0, done.stderr
    assert "oracle" in done.stdout and "logging policy" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["utility_weights"] == {"click": 2.5}
    assert summary["oracle_method"] == "exhaustive"
    assert set(p.name for p in out.iterdir()) == {"train.parquet", "valid.parquet",
                                                   "test.parquet", "summary.json", "truth"}
    done = run("validate", str(out), "--json", str(tmp_path / "v.json"))
    assert done.returncode == 0, done.stderr
    totals = json.loads((tmp_path / "v.json").read_text())
    assert totals["requests"] == 900
    # An existing output is not overwritten by accident.
    again = run("simulate", "--preset", "avito", "--requests", "900", "--out", str(out))
    assert again.returncode == 2 and "--overwrite" in again.stderr


@pytest.mark.parametrize("args, message", [
    (["simulate", "--preset", "kuaishou", "--requests", "100", "--set", "nonsense=1"],
     "unknown setting 'nonsense'"),
    (["simulate", "--preset", "kuaishou", "--requests", "100", "--set", "n_users=many"],
     "cannot read 'many' as int"),
    (["simulate", "--preset", "movielens", "--requests", "100"], "--movielens-dir"),
    (["simulate", "--preset", "movielens", "--requests", "100", "--movielens-dir", "/nowhere"],
     "/nowhere/u.data"),
    (["simulate", "--preset", "kuaishou", "--requests", "100", "--config", "/nowhere.toml"],
     "no such config file"),
])
def test_bad_settings_fail_cleanly_and_leave_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    done = run(*args, "--out", str(out))
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_config_file_overrides(tmp_path):
    config = tmp_path / "sim.toml"
    config.write_text("n_users = 300\nn_items = 800\n[utility_weights]\nclick = 3.0\n")
    out = tmp_path / "data"
    done = run("simulate", "--preset", "avito", "--requests", "300", "--out", str(out),
               "--config", str(config), "--quiet")
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["users"] == 300 and summary["utility_weights"]["click"] == 3.0
    config.write_text("n_users = [")
    done = run("simulate", "--preset", "avito", "--requests", "300", "--out",
               str(tmp_path / "other"), "--config", str(config))
    assert done.returncode == 2 and "not valid TOML" in done.stderr
