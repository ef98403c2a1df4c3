"""The command line: help everywhere, clear one-line errors, no half-written outputs."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import simulate_small
from nar4rec.cli import EXIT_BROKEN_PIPE, EXIT_INVALID, build_parser, main, plural


def parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command, parser) for `nar4rec` and every command and subcommand under it."""
    yield list(path), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, command in action.choices.items():
                yield from parsers(command, (*path, name))


PARSERS = list(parsers(build_parser()))
COMMANDS = [command for command, _ in PARSERS]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "data"
    simulate_small(out, requests=300)
    return out


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


@pytest.mark.parametrize("command, parser", [
    pytest.param(command, parser, id=" ".join(command) or "nar4rec")
    for command, parser in PARSERS])
def test_every_option_says_what_it_means_and_its_default(command, parser):
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"nar4rec {' '.join(command)} {name}: no help"
        default = action.default
        if default is None or default == [] or default is argparse.SUPPRESS \
                or isinstance(default, bool):
            continue    # nothing to state: unset, an empty list or a flag
        assert str(default) in formatter._expand_help(action), \
            f"nar4rec {' '.join(command)} {name}: the help does not state the default {default}"


def into_head(args: list[str], *, buffered: bool) -> subprocess.CompletedProcess:
    """Run `nar4rec ARGS` with its output piped into `head -1` that has already printed its line
    and gone, as in `(echo title; nar4rec ARGS) | head -1`, but with that order certain."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    read_end, write_end = os.pipe()
    with subprocess.Popen(["head", "-1"], stdin=read_end, stdout=subprocess.DEVNULL) as head:
        os.close(read_end)
        os.write(write_end, b"title\n")
        head.wait()
    try:
        return subprocess.run([sys.executable, "-m", "nar4rec", *args], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, env=env)
    finally:
        os.close(write_end)


@pytest.mark.skipif(shutil.which("head") is None, reason="no `head` here")
@pytest.mark.parametrize("args, buffered", [
    pytest.param(["--help"], True, id="help"),
    # printed at the end, when Python flushes stdout
    pytest.param(["validate", "DATA"], True, id="validate"),
    # printed at once, inside the command
    pytest.param(["validate", "DATA"], False, id="validate-PYTHONUNBUFFERED"),
])
def test_output_into_a_pipe_whose_reader_has_gone_ends_quietly(data, args, buffered):
    done = into_head([str(data) if a == "DATA" else a for a in args], buffered=buffered)
    assert done.stderr == ""           # no traceback, no "Exception ignored", no error line
    assert done.returncode == EXIT_BROKEN_PIPE


def test_plural():
    assert plural(1, "problem") == "1 problem"
    assert [plural(n, "epoch") for n in (0, 2)] == ["0 epochs", "2 epochs"]
    assert plural(12_000, "request") == "12,000 requests"


def test_counts_of_one_are_in_the_singular(data, tmp_path, capsys):
    table = pq.read_table(data / "valid.parquet").slice(0, 1)
    index = table.schema.get_field_index("exposed")
    exposed = table.column("exposed").to_pylist()
    exposed[0][0] = 99                 # outside the candidates: one problem
    table = table.set_column(index, table.schema.field(index),
                             pa.array(exposed, type=table.schema.field(index).type))
    for name in ("a", "b"):
        pq.write_table(table, tmp_path / f"{name}.parquet")
    assert main(["validate", str(tmp_path), "--max-problems", "1"]) == EXIT_INVALID
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2
    assert all(": 1 problem: 1 request, 6 exposures, " in line for line in lines), out
    assert "... and 1 more problem (see --max-problems)" in err


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
