"""Hostile use of the ``spear`` command line: each case is a one-line error with exit code 2 that names the file or
key, and writes nothing (each case here once gave a traceback, a crash after files were written, or silence)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the train extra is not installed")

from helpers import small_overrides  # noqa: E402

from spear.cli import main as cli_main  # noqa: E402
from spear.trainer import STATE_FILE, Trainer, latest_checkpoint  # noqa: E402


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` and its bytes (nothing may change when a command is refused)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_line_error(capsys, argv: list[str]) -> str:
    code = cli_main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit code {code}; stderr: {err}"
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def checkpointed_run(sft_model, tmp_path_factory) -> tuple[Path, list[str]]:
    from helpers import small_cfg

    run = tmp_path_factory.mktemp("hostile") / "run"
    overrides = small_overrides(sft_model, run)
    Trainer(small_cfg(sft_model, run), progress=False).fit()
    assert latest_checkpoint(run) is not None
    return run, overrides


def _copy_run(checkpointed_run, tmp_path) -> tuple[Path, list[str]]:
    src, overrides = checkpointed_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    return run, [o.replace(str(src), str(run)) for o in overrides]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _wrong_keys(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    del state["rng"]
    torch.save(state, path)


def _wrong_shapes(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    for param_state in state["optimizer"]["state"].values():
        param_state["exp_avg"] = torch.zeros(3, 1, 4)
        break
    torch.save(state, path)


def _wrong_step(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    state["step"] = "two"
    torch.save(state, path)


CORRUPTIONS = {
    "truncated": _truncate,
    "empty": lambda p: p.write_bytes(b""),
    "garbage": lambda p: p.write_bytes(os.urandom(4096)),
    "a list": lambda p: torch.save([1, 2, 3], p),
    "missing keys": _wrong_keys,
    "wrong shapes": _wrong_shapes,
    "wrong step": _wrong_step,
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_trainer_state_is_a_one_line_error_and_nothing_is_written(
    checkpointed_run, tmp_path, capsys, corruption
):
    run, overrides = _copy_run(checkpointed_run, tmp_path)
    CORRUPTIONS[corruption](latest_checkpoint(run) / STATE_FILE)
    before = snapshot(run)
    err = one_line_error(capsys, ["train", "--preset", "tiny_math_spear", "--quiet", "--resume", *overrides])
    assert STATE_FILE in err, err
    assert snapshot(run) == before


def test_a_model_without_its_tokenizer_file_is_a_one_line_error(tiny_model, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "tokenizer.json").unlink()  # the tokenizer still loads, with no vocabulary: it encoded text to nothing
    err = one_line_error(capsys, ["eval", "--preset", "tiny_math", "--model", str(model), "env.num_eval_tasks=2"])
    assert "tokenizer" in err and str(model) in err, err


def test_plot_to_an_unwritable_path_is_a_one_line_error(checkpointed_run, capsys):
    run, _ = checkpointed_run
    err = one_line_error(capsys, ["plot", str(run), "--output", "/dev/null/curves.png"])
    assert "/dev/null" in err, err


def test_wandb_not_logged_in_is_refused_before_the_run_directory_is_made(tiny_model, tmp_path, capsys, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc with a key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config" / "wandb"))
    run = tmp_path / "run"
    overrides = small_overrides(tiny_model, run, "trainer.logger=[console,wandb]")
    err = one_line_error(capsys, ["train", "--preset", "tiny_math_spear", "--quiet", *overrides])
    assert "wandb" in err, err
    assert not run.exists()


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.seed=18446744073709551616", "trainer.seed"),  # 2**64: once an overflow after files were written
        ("trainer.seed=-1", "trainer.seed"),
        ("actor_rollout_ref.rollout.n=1000000000", "actor_rollout_ref.rollout.n"),  # once a MemoryError
        ("actor_rollout_ref.rollout.n=1e9", "actor_rollout_ref.rollout.n"),
        ("sft.num_examples=100000000000", "sft.num_examples"),
        ("data.train_batch_size=65536", "data.train_batch_size"),  # x rollout.n episodes per step
        ("trainer.seed=???", "trainer.seed"),  # once silently the default
        ("env.kwargs=[1,2]", "env.kwargs"),
        ("actor_rollout_ref.actor.policy_loss.clip_cov_ratio=2", "clip_cov_ratio"),
        ("actor_rollout_ref.rollout.temperature=1e-6", "rollout.temperature"),  # below the log-prob kernels' range
    ],
)
def test_bad_sizes_and_values_are_refused_before_anything_is_written(tiny_model, tmp_path, capsys, override, key):
    run = tmp_path / "run"
    err = one_line_error(
        capsys, ["train", "--preset", "tiny_math_spear", "--quiet", *small_overrides(tiny_model, run, override)]
    )
    assert key in err, err
    assert not run.exists()


def test_a_killed_checkpoint_write_leaves_nothing_behind_after_the_next_start(checkpointed_run, tmp_path):
    from helpers import small_cfg

    run, overrides = _copy_run(checkpointed_run, tmp_path)
    ckpt = run / "checkpoints"
    dead_pid = 2**22 + 12345  # above the default pid_max: no live process has it
    orphan = ckpt / f".step_000004.tmp{dead_pid}"
    shutil.copytree(latest_checkpoint(run), orphan)  # what a SIGKILL in the middle of save_checkpoint leaves
    (ckpt / f"latest.tmp{dead_pid}").write_text("step_000004")
    live = ckpt / f".step_000004.tmp{os.getppid()}"  # a live writer's temporary is kept
    live.mkdir()
    model_path = next(o.split("=", 1)[1] for o in overrides if o.startswith("actor_rollout_ref.model.path="))
    Trainer(
        small_cfg(model_path, run, "trainer.total_training_steps=4"), resume=True, progress=False, allow_changes=True
    )
    assert not orphan.exists() and not (ckpt / f"latest.tmp{dead_pid}").exists()
    assert live.exists()


def test_an_internal_error_keeps_its_traceback(checkpointed_run, monkeypatch):
    """Only errors about what the user gave are one-liners; a ValueError from inside is a bug and is raised."""
    import spear.trainer.plot

    def broken(*args, **kwargs):
        raise ValueError("internal failure")

    monkeypatch.setattr(spear.trainer.plot, "plot_run", broken)
    with pytest.raises(ValueError, match="internal failure"):
        cli_main(["plot", str(checkpointed_run[0])])
