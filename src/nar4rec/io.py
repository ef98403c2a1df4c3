"""Atomic outputs: nothing half-written is ever left under its final name.

A file or folder is written beside its target under a hidden temporary name,
`.NAME.p<pid>@<host>.XXXXXXXX.partial`, and renamed to NAME when complete. A process killed
before that (SIGKILL, power loss) leaves the temporary behind; the next write into the same
target removes those of its writers that are no longer running on this host (and the
untagged `.NAME.XXXXXXXX.partial` of earlier versions), so they do not pile up.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from nar4rec.errors import Nar4recError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())


def _prefix(path: Path) -> str:
    """The temporary names' prefix for `path`: the target and this writer (pid, host)."""
    return f".{path.name}.p{os.getpid()}@{_host()}."


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                 # another user's process: running
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries (`.partial`, `.old`) that writers of `path` left when they were
    killed: those tagged with this host and a process that no longer runs, and untagged ones
    (earlier versions). Those of a writer still running, or of another host, are kept.
    Returns what was removed."""
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.") + r"(?:p(\d+)@([A-Za-z0-9-]*)\.)?"
                         r"[a-z0-9_]+\.(?:partial|old)")
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        pid, host = match.group(1), match.group(2)
        if pid is not None and (host != _host() or _running(int(pid))):
            continue
        stale = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_prefix(path), suffix=".partial", dir=path.parent)
    except OSError as exc:
        raise Nar4recError(f"{path}: cannot write here ({exc.strerror})") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())   # mkstemp makes 0600; publish like open() would
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; it becomes `path` only if the block succeeds.

    An existing non-empty `path` is an error unless `overwrite`, in which case it is replaced
    whole, after the new content is complete.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise Nar4recError(f"{path}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise Nar4recError(f"{path}: directory exists and is not empty (use --overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".partial", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())        # mkdtemp makes 0700
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".old", dir=path.parent))
            os.replace(path, old / "content")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
