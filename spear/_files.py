"""Files written atomically through ``<name>.tmp<pid>`` temporaries, and the cleanup of the ones a killed writer left
behind (a checkpoint, an SFT model, a built-in model, a generated game)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

# ``...tmp<pid>`` with an optional extension after the pid (a generated game's ``.z8`` / ``.json``)
_TEMPORARY = re.compile(r"\.tmp(\d+)(\.[A-Za-z0-9]+)?$")


def temporary_name(name: str, suffix: str = "") -> str:
    """``<name>.tmp<pid><suffix>``: this process's temporary for ``name``."""
    return f"{name}.tmp{os.getpid()}{suffix}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_orphaned_temporaries(directory: Path, pattern: str) -> int:
    """Deletes the ``directory/pattern`` entries named like :func:`temporary_name` whose writer is dead (a SIGKILL
    mid-write leaves them behind); a live writer's are kept. Returns how many were removed."""
    if not directory.is_dir():
        return 0
    removed = 0
    for path in directory.glob(pattern):
        match = _TEMPORARY.search(path.name)
        if match and int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1))):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed += 1
    return removed


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing), waited for: one writer at a time across processes
    (two runs of ``spear compare`` generating the same game)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
