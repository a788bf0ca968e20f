"""Checkpoints: the layout of ``<run>/checkpoints`` (atomic step directories, the ``latest`` pointer), reading a
trainer state back with clear errors, the resume config check, and the cleanup of temporaries a kill left behind."""

from __future__ import annotations

import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, UserError

STATE_FILE = "trainer_state.pt"
CHECKPOINT_VERSION = 1


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the run (the CLI prints it on one line)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_orphaned_temporaries(directory: Path, pattern: str) -> None:
    """Deletes ``directory/pattern`` entries named ``...tmp<pid>`` whose writer is dead (a SIGKILL mid-save leaves
    them behind); a live writer's are kept."""
    if not directory.is_dir():
        return
    for path in directory.glob(pattern):
        match = re.search(r"\.tmp(\d+)$", path.name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``<run_dir>/checkpoints/latest`` points to, or None."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    pointer = ckpt_dir / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text(errors="replace").strip()
    if not re.fullmatch(r"step_[0-9]{6,}", name):
        raise UserError(f"{pointer} names {name!r}, not a checkpoint of this run directory (step_NNNNNN)")
    path = ckpt_dir / name
    return path if (path / STATE_FILE).is_file() else None


# keys a resumed run may change with --allow-changes (they change when or how the run reports, not what it trains)
RESUMABLE_KEYS = (
    "trainer.total_training_steps",
    "trainer.save_freq",
    "trainer.test_freq",
    "trainer.logger",
    "trainer.num_threads",
    "trainer.val_before_train",
)
_IGNORED_ON_RESUME = ("trainer.default_local_dir",)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "kwargs":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(saved: dict, new: dict, *, allow_changes: bool = False) -> None:
    """Refuses to resume a run with a different config: a ``ConfigError`` naming every key that differs.
    With ``allow_changes``, the keys of ``RESUMABLE_KEYS`` may differ."""
    a, b = _flat(saved), _flat(new)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in _IGNORED_ON_RESUME)
    refused = [k for k in changed if not (allow_changes and k in RESUMABLE_KEYS)]
    if refused:
        detail = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in refused)
        hint = ""
        if all(k in RESUMABLE_KEYS for k in refused):
            hint = " (these may change with --allow-changes)"
        raise ConfigError(f"--resume: the config differs from the run's config.json: {detail}{hint}")


def write_checkpoint(ckpt_dir: Path, step: int, model, tokenizer, state: dict[str, Any]) -> Path:
    """Saves ``step_NNNNNN`` (the model and tokenizer in HF format, ``state`` in :data:`STATE_FILE`) through a
    temporary directory, then points ``latest`` at it: a kill at any moment leaves the previous checkpoint whole."""
    name = f"step_{step:06d}"
    final = ckpt_dir / name
    tmp = ckpt_dir / f".{name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save({"version": CHECKPOINT_VERSION, "step": step, **state}, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = ckpt_dir / f"latest.tmp{os.getpid()}"
    pointer_tmp.write_text(name)
    os.replace(pointer_tmp, ckpt_dir / "latest")
    return final


def load_checkpoint_state(path: Path, apply: Callable[[dict], None]) -> None:
    """Reads ``path/STATE_FILE`` and hands it to ``apply``; anything unreadable, of another version, or that does not
    fit the run (``apply`` raising) is a :class:`CheckpointError` that says what to do."""
    file = path / STATE_FILE
    hint = "delete that checkpoint directory and write the previous step's name into checkpoints/latest"
    try:
        state = torch.load(file, weights_only=True)
    except Exception as err:  # truncated, empty or garbage: whatever the unpickler raises
        reason = "not a checkpoint file" if isinstance(err, pickle.UnpicklingError) else _first_line(err)
        raise CheckpointError(f"{file} cannot be read ({reason}); {hint}") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        found = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{file}: not a version-{CHECKPOINT_VERSION} trainer state (found {found!r})")
    try:
        apply(state)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
        raise CheckpointError(f"{file} does not fit this run ({_first_line(err)}); {hint}") from None
