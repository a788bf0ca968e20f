"""verl 0.9.1's real training loop on this CPU: ``RayPPOTrainer.fit`` with a local Ray cluster, FSDP2 workers over
gloo, the ``hf`` rollout server with weight sync, and the ``spear_env`` agent loop on the math environment.

Each run is a subprocess (``python -m verl.trainer.main_ppo`` / ``python -m spear.verl.recipe.main``) with the CPU
mode loaded through ``VERL_USE_EXTERNAL_MODULES``, as a user runs it; the tests read verl's file logger.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the train extra is not installed")

from spear.config import load_config  # noqa: E402
from spear.trainer import run_sft  # noqa: E402
from spear.trainer.models import build_tiny_model  # noqa: E402
from spear.verl.recipe import AGENT_LOOPS_YAML, cpu, data  # noqa: E402

ENV_KWARGS = {"min_ops": 1, "max_ops": 2, "expert_direct_prob": 0.0}
RUN_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("verl")


@pytest.fixture(scope="module")
def sft_model(workdir) -> Path:
    """The built-in tiny Qwen2 after a short SFT on the math expert: it calls the tool and answers, sometimes
    correctly, so rewards vary within groups and most responses pass the Dr.BoT filters."""
    base = build_tiny_model(workdir / "tiny", "math", corpus_episodes=500)
    cfg = load_config(
        preset="tiny_math",
        overrides=[
            "sft.steps=300",
            "sft.num_examples=1024",
            *[f"env.kwargs.{k}={v}" for k, v in ENV_KWARGS.items()],
        ],
    )
    out = workdir / "tiny-sft"
    run_sft(cfg, out, model_path=base, progress=False)
    return out


@pytest.fixture(scope="module")
def dataset(workdir) -> dict[str, Path]:
    return data.write(workdir / "data", "math", train=32, val=8, env_kwargs=ENV_KWARGS)


def common_overrides(
    model: Path, dataset: dict[str, Path], run_dir: Path, workers: int = 1, prompt: int = 32, response: int = 96
) -> list[str]:
    return [
        *cpu.overrides(workers),
        f"data.train_files={dataset['train']}",
        f"data.val_files={dataset['val']}",
        "data.train_batch_size=4",
        f"data.max_prompt_length={prompt}",
        f"data.max_response_length={response}",
        f"actor_rollout_ref.model.path={model}",
        "actor_rollout_ref.rollout.n=4",
        f"actor_rollout_ref.rollout.prompt_length={prompt}",
        f"actor_rollout_ref.rollout.response_length={response}",
        # each rank's share of the 16 rows of a step, in one micro-batch (verl needs it to divide the share)
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={16 // workers}",
        f"actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu={16 // workers}",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.actor.optim.lr=1e-3",
        # a non-zero entropy bonus: every update has a gradient, whatever the rewards of the sampled groups
        "actor_rollout_ref.actor.entropy_coeff=0.01",
        "trainer.test_freq=0",
        "trainer.val_before_train=false",
        "trainer.logger=[console,file]",
        f"trainer.default_local_dir={run_dir}",
    ]


def run_verl(module: str, overrides: list[str], workdir: Path, name: str) -> list[dict]:
    """Runs verl's entry point ``module`` to the end; returns the metrics it logged, one dict per step."""
    log = workdir / f"{name}.jsonl"
    env = {
        **os.environ,
        "VERL_USE_EXTERNAL_MODULES": "spear.verl.recipe.cpu",
        "VERL_PLATFORM": "cpu",
        "VERL_FILE_LOGGER_PATH": str(log),
        "RAY_TMPDIR": str(workdir / "ray"),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HYDRA_FULL_ERROR": "1",
        "SPEAR_CACHE": str(workdir / "cache"),
    }
    (workdir / "ray").mkdir(exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", module, *overrides],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    (workdir / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        raise AssertionError(f"{module} exited with {proc.returncode}; the last lines:\n{tail}")
    return [json.loads(line)["data"] | {"step": json.loads(line)["step"]} for line in log.read_text().splitlines()]


def test_stock_grpo_with_a_spear_loss(sft_model, dataset, workdir):
    """verl's own GRPO trainer with ``spear_clip_cov`` and ``spear_grpo``, the agent loop and the hf rollout."""
    steps = run_verl(
        "verl.trainer.main_ppo",
        [
            *common_overrides(sft_model, dataset, workdir / "stock"),
            "trainer.use_v1=false",
            "algorithm.adv_estimator=spear_grpo",
            "actor_rollout_ref.actor.policy_loss.loss_mode=spear_clip_cov",
            "actor_rollout_ref.rollout.agent.default_agent_loop=spear_env",
            f"actor_rollout_ref.rollout.agent.agent_loop_config_path={AGENT_LOOPS_YAML}",
            *[f"+spear.env.kwargs.{k}={v}" for k, v in ENV_KWARGS.items()],
            "+spear.actor_rollout_ref.rollout.max_turns=4",
            "+spear.actor_rollout_ref.rollout.max_turn_tokens=16",
            "trainer.total_training_steps=2",
            "trainer.save_freq=0",
        ],
        workdir,
        "stock",
    )
    assert [s["step"] for s in steps] == [1, 2]
    for s in steps:
        assert s["actor/grad_norm"] > 0
        assert s["actor/pg_clipfrac"] >= 0
        # the rollout samples from the policy being trained (fp32 hf rollout vs the FSDP actor's forward)
        assert s["training/rollout_actor_probs_pearson_corr"] > 0.99
        assert s["num_turns/max"] >= 3  # multi-turn: at least one tool call and its observation


def spear_overrides(model, dataset, run_dir, workers: int = 1, save_freq: int = 1) -> list[str]:
    return [
        *common_overrides(model, dataset, run_dir, workers),
        *[f"+spear.env.kwargs.{k}={v}" for k, v in ENV_KWARGS.items()],
        "spear.env.name=math",
        "spear.actor_rollout_ref.rollout.max_turns=4",
        "spear.actor_rollout_ref.rollout.max_turn_tokens=16",
        "spear.actor_rollout_ref.rollout.rollout_filter_ratio=0.5",
        # a replay batch of one row once more than 1.5 good rows are stored: replay fires within a few steps
        "spear.actor_rollout_ref.actor.trajectory_buffer_size=1",
        "spear.actor_rollout_ref.actor.max_replay_loss_steps=4",
        "spear.algorithm.max_toolcall_steps=10",
        # a reference policy and the KL term on-policy (replay has none: it needs no reference log-probs)
        "actor_rollout_ref.actor.use_kl_loss=true",
        "actor_rollout_ref.actor.kl_loss_coef=0.01",
        f"trainer.save_freq={save_freq}",
    ]


def assert_on_policy_update(s: dict) -> None:
    """The step's on-policy update ran (a gradient, the KL term), unless Dr.BoT's response filters masked every row
    the rollout filter kept: the tiny policy's sampled responses can all be overlong or incomplete, and then only
    replay trains that step (verl logs no on-policy grad norm)."""
    if "actor/grad_norm" in s:
        assert s["actor/grad_norm"] > 0 and s["actor/kl_loss"] >= 0
    else:
        assert s["filter/any"] >= s["rollout_filter/rows_kept"], s


def test_spear_recipe_replays_and_resumes(sft_model, dataset, workdir):
    run_dir = workdir / "spear"
    first = run_verl(
        "spear.verl.recipe.main",
        [*spear_overrides(sft_model, dataset, run_dir), "trainer.total_training_steps=3"],
        workdir,
        "spear_first",
    )
    assert [s["step"] for s in first] == [1, 2, 3]
    for s in first:
        assert_on_policy_update(s)
        assert 0 < s["toolcall/factor"] <= 1
        assert s["rollout_filter/groups_kept"] == 2  # ratio 0.5 of 4 groups
        assert s["rollout_filter/rows_kept"] == 8  # the dropped groups' rows left the batch
        assert "filter/incomplete" in s and "filter/overlong" in s
    assert any("actor/grad_norm" in s for s in first)
    # the rollout server got the trainer's weights after every update
    loads = [s["rollout/weight_loads"] for s in first]
    assert loads == sorted(loads) and loads[-1] >= loads[0] + 2, loads
    replays = [s for s in first if "replay/batch_size" in s]
    assert replays, "the replay buffer never triggered"
    for s in replays:
        assert s["replay/batch_size"] == 1
        assert s["actor/grad_norm_replay"] > 0
        assert 0 < s["replay/weight"] <= 1
    assert first[-1]["replay/events"] == len(replays)
    assert (run_dir / "global_step_3" / "spear_replay.pt").is_file()
    # resume from the step-3 checkpoint (model, optimizer, buffer) for one more step
    resumed = run_verl(
        "spear.verl.recipe.main",
        [*spear_overrides(sft_model, dataset, run_dir), "trainer.total_training_steps=4"],
        workdir,
        "spear_resumed",
    )
    assert [s["step"] for s in resumed] == [4]
    assert resumed[0]["replay/events"] >= first[-1]["replay/events"]  # the buffer's state came back
    assert_on_policy_update(resumed[0])


USER_TASKS = {  # env: (kwargs, prompt length, response length, turn tokens)
    "math_code": ({"families": "[power_sum,mod_power]", "pool_size": 1}, 64, 128, 32),
    "alfworld": ({"nb_receptacles": 4, "nb_distractors": 2, "task_types": "[pick_and_place_simple]"}, 320, 192, 16),
}


@pytest.mark.parametrize(
    "env_name",
    # verl's whole loop on each (about 2 min here) runs with -m slow, to keep the default run under 15 minutes; the
    # default run covers both agent loops (tests/verl/test_agent_loop_envs.py, a stub server) and verl's whole loop
    # on math (the tests above)
    [pytest.param("alfworld", marks=pytest.mark.slow), pytest.param("math_code", marks=pytest.mark.slow)],
)
def test_spear_recipe_on_the_users_tasks(env_name, workdir):
    """One SPEAR step of verl's real loop on the code-interpreter math and on ALFWorld's engine (an untrained tiny
    model: the plumbing, not learning): the episodes run against verl's rollout server, the sandbox's / game's
    replies come back masked, and the update has a gradient."""
    if env_name == "alfworld":
        pytest.importorskip("alfworld", reason="the alfworld extra is not installed")
    kwargs, prompt, response, turn_tokens = USER_TASKS[env_name]
    parsed = {
        k: (v.strip("[]").split(",") if isinstance(v, str) and v.startswith("[") else v) for k, v in kwargs.items()
    }
    os.environ.setdefault("SPEAR_CACHE", str(workdir / "cache"))
    model = build_tiny_model(workdir / f"tiny_{env_name}", env_name, env_kwargs=parsed, corpus_episodes=8)
    dataset = data.write(workdir / f"data_{env_name}", env_name, train=8, val=4, env_kwargs=parsed)
    steps = run_verl(
        "spear.verl.recipe.main",
        [
            *common_overrides(model, dataset, workdir / f"user_{env_name}", prompt=prompt, response=response),
            f"spear.env.name={env_name}",
            *[f"+spear.env.kwargs.{k}={v}" for k, v in kwargs.items()],
            "spear.actor_rollout_ref.rollout.max_turns=2",
            f"spear.actor_rollout_ref.rollout.max_turn_tokens={turn_tokens}",
            # an untrained model's episodes are incomplete and unreadable: keep them, this checks the plumbing
            "spear.algorithm.filter_incomplete_responses=false",
            "spear.algorithm.filter_unreadable_responses=false",
            "spear.algorithm.filter_repetitive_responses=false",
            "spear.algorithm.filter_overlong_responses=false",
            "trainer.total_training_steps=1",
            "trainer.save_freq=0",
        ],
        workdir,
        f"user_{env_name}",
    )
    assert [s["step"] for s in steps] == [1]
    assert steps[0]["actor/grad_norm"] > 0
    assert steps[0]["num_turns/max"] >= 3  # a turn, the environment's reply, another turn


@pytest.mark.slow
def test_spear_recipe_on_two_fsdp2_ranks(sft_model, dataset, workdir):
    """Two actor ranks (FSDP2 over gloo, two rollout replicas): each rank's share of every mini-batch."""
    run_dir = workdir / "spear2"
    steps = run_verl(
        "spear.verl.recipe.main",
        [*spear_overrides(sft_model, dataset, run_dir, 2, save_freq=0), "trainer.total_training_steps=2"],
        workdir,
        "spear_2ranks",
    )
    assert [s["step"] for s in steps] == [1, 2]
    assert all(s["actor/grad_norm"] > 0 for s in steps)
