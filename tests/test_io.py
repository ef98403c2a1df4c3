"""Atomic outputs: a killed writer leaves no half-written target, and the next write into
the same place removes the temporaries it left (not those of a writer still running)."""

from __future__ import annotations

import signal
import subprocess
import sys

from nar4rec.io import atomic_dir, atomic_file

WRITER = """
import os, signal, sys
from pathlib import Path
from nar4rec.io import atomic_dir, atomic_file
root, then = Path(sys.argv[1]), sys.argv[2]
with atomic_dir(root / "out", overwrite=True) as tmp:
    (tmp / "whole").write_text(then)
    with atomic_file(root / "log.txt") as log:
        log.write_text(then)
        print("writing", flush=True)
        if then == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.stdin.readline()
"""


def test_the_next_write_removes_what_a_killed_writer_left(tmp_path):
    done = subprocess.run([sys.executable, "-c", WRITER, str(tmp_path), "killed"],
                          capture_output=True)
    assert done.returncode == -signal.SIGKILL
    killed = sorted(p.name for p in tmp_path.iterdir())
    assert len(killed) == 2 and all(name.endswith(".partial") for name in killed)
    untagged = tmp_path / ".out.k2j3h4g5.partial"         # left by an earlier version
    untagged.mkdir()
    other = tmp_path / ".output.k2j3h4g5.partial"         # another target's
    other.mkdir()
    running = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), "running"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert running.stdout.readline() == "writing\n"
        live = sorted(set(p.name for p in tmp_path.iterdir()) - {*killed, untagged.name,
                                                                   other.name})
        assert len(live) == 2

        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "whole").write_text("next")
        with atomic_file(tmp_path / "log.txt") as log:
            log.write_text("next")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [*live, other.name, "log.txt", "out"])
        assert (tmp_path / "out" / "whole").read_text() == "next"
    finally:
        running.communicate("\n", timeout=30)
    assert running.returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.name, "log.txt", "out"])
    assert (tmp_path / "log.txt").read_text() == "running"
