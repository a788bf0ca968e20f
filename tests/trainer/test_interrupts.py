"""Real SIGINT and SIGKILL sent to ``spear train`` at random moments (start-up, rollouts, updates, evaluations,
checkpoint writes), resumed to the end: parameters and metrics are bit-identical to an uninterrupted run and every
step is logged once. The default run does one seed with both signals; ``-m slow`` runs more seeds."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the train extra is not installed")

from helpers import small_overrides  # noqa: E402

from spear.trainer import TIMING_PREFIXES, latest_checkpoint, read_metrics  # noqa: E402
from spear.trainer.models import load_policy  # noqa: E402

STEPS = 4
EXTRA = (
    f"trainer.total_training_steps={STEPS}",
    "trainer.save_freq=1",
    "trainer.test_freq=2",
    "trainer.num_threads=1",
    "actor_rollout_ref.actor.trajectory_buffer_size=2",
    "actor_rollout_ref.actor.trajectory_score_threshold=-10",  # replay runs, so the buffer is part of the state
)


def start(model: Path, run: Path, *, resume: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "spear.cli", "train", "--preset", "tiny_math_spear", "--quiet"]
    cmd += small_overrides(model, run, *EXTRA) + (["--resume"] if resume else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def final_state(run: Path):
    model, _ = load_policy(latest_checkpoint(run))
    records = [{k: v for k, v in r.items() if not k.startswith(TIMING_PREFIXES)} for r in read_metrics(run)]
    return model.state_dict(), records


@pytest.fixture(scope="module")
def reference(sft_model, tmp_path_factory):
    """The uninterrupted run, and how long it took (the window the signals are sent in)."""
    run = tmp_path_factory.mktemp("interrupts") / "straight"
    t0 = time.perf_counter()
    code, err = finish(start(sft_model, run, resume=False))
    assert code == 0, err
    return final_state(run), time.perf_counter() - t0


def interrupted_run(model: Path, run: Path, seed: int, signals: list[int], window: float) -> list[str]:
    """Runs to the end, sending ``signals`` one per start at a random moment in ``window`` seconds; a start resumes
    when the run has a checkpoint. Returns what happened, for the failure message."""
    rng = random.Random(seed)
    log = []
    pending = list(signals)
    while True:
        resume = latest_checkpoint(run) is not None
        proc = start(model, run, resume=resume)
        sent = None
        if pending:
            delay = rng.uniform(0.2, window)
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                sent = pending.pop(0)
                proc.send_signal(sent)
        code, err = finish(proc)
        log.append(f"resume={resume} signal={sent and signal.Signals(sent).name} exit={code}")
        if code == 0:
            return log
        assert sent is not None, f"failed without a signal: {log}\n{err}"
        assert len(log) < 10, log


def check_same(reference_state, run: Path, log: list[str]) -> None:
    (params, records), _ = reference_state
    got_params, got_records = final_state(run)
    assert [r["step"] for r in got_records] == list(range(STEPS + 1)), (log, [r["step"] for r in got_records])
    assert got_records == records, log
    for name, value in params.items():
        assert torch.equal(value, got_params[name]), (name, log)


@pytest.mark.parametrize("seed", [0])
def test_sigint_and_sigkill_at_random_moments_resume_bit_identically(reference, sft_model, tmp_path, seed):
    run = tmp_path / "run"
    log = interrupted_run(sft_model, run, seed, [signal.SIGINT, signal.SIGKILL], reference[1])
    check_same(reference, run, log)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL, signal.SIGTERM], ids=lambda s: s.name)
def test_repeated_interrupts_over_seeds(reference, sft_model, tmp_path, seed, sig):
    run = tmp_path / "run"
    log = interrupted_run(sft_model, run, seed, [sig, sig, sig], reference[1])
    check_same(reference, run, log)
