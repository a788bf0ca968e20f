"""spear.config: README keys, validation of every key, presets, overrides."""

from __future__ import annotations

import math

import pytest
import yaml

from spear.config import ConfigError, SpearConfig, available_presets, iter_keys, load_config, to_dict

# The YAML blocks of the SPEAR README, verbatim.
README_BLOCKS = [
    """
actor_rollout_ref:
  actor:
    # Whether to enable self-imitation loss
    enable_trajectory_replay: False

    # Maximum number of trajectories stored in the self-imitation buffer
    trajectory_buffer_size: 2048

    # Only trajectories with an advantage larger than this threshold will be saved
    trajectory_score_threshold: 1

    # Only trajectories with a step delay less than this tolerance will be remained
    trajectory_tolerate_steps: 10

    # PPO loss coefficient for self-imitation learning
    replay_loss_coef: 1

    # Number of steps for increasing the PPO loss coefficient using a cosine scheduler
    max_replay_loss_steps: 200
""",
    """
actor_rollout_ref:
  actor:
    # How the advantage of trajectories in the replay buffer is re-estimated
    weight_decay_trajectory_replay: -1

    # Number of trajectories' rewards used to calculate the 50th percentile baseline
    baseline_buffer_size: 10240
""",
    """
actor_rollout_ref:
  actor:
    policy_loss:
      # Loss mode for regularization. Options: (see https://arxiv.org/abs/2505.22617)
      #   - vanilla
      #   - clip-cov, default = clip-cov for Dr.BoT
      #   - kl-cov
      #   - gpg
      loss_mode: "vanilla"

      # ================== Hyperparameters for On-policy RL Loss ==================
      # Ratio of tokens to be clipped for clip-cov loss
      clip_cov_ratio: 0.02

      # Lower bound for clip-cov loss
      clip_cov_lb: 1.0

      # Upper bound for clip-cov loss
      clip_cov_ub: 40.0

      # Ratio of tokens to apply KL penalty for kl-cov loss
      kl_cov_ratio: 0.02

      # ================== Hyperparameters for SIL Loss ==========================
      # [Replay Only] Ratio of tokens to be clipped for clip-cov loss
      clip_cov_ratio_replay: 0.02

      # [Replay Only] Lower bound for clip-cov loss
      clip_cov_lb_replay: 1.0

      # [Replay Only] Upper bound for clip-cov loss
      clip_cov_ub_replay: 40.0

      # [Replay Only] Ratio of tokens to apply KL penalty for kl-cov loss
      kl_cov_ratio_replay: 0.02
""",
    """
algorithm:
  # Tool-call reward mode:
  #   - "none"     : Do not use tool-call reward
  #   - "constant" : Use a fixed tool-call reward coefficient (1) during training
  #   - "cosine"   : Decay the tool-call reward coefficient with a cosine scheduler
  use_toolcall_reward: "cosine"

  # Maximum number of steps for the cosine scheduler
  max_toolcall_steps: 100
""",
    """
actor_rollout_ref:
  actor:
    # Whether to use KL loss against the reference model
    use_kl_loss: False

    # Coefficient for KL loss (set to 0.0 if disabled)
    kl_loss_coef: 0.0

    # KL loss type (e.g., "low_var_kl" for GRPO)
    kl_loss_type: low_var_kl
""",
    """
actor_rollout_ref:
  actor:
    # Lower bound of the clipping ratio
    clip_ratio_low: 0.2

    # Upper bound of the clipping ratio
    clip_ratio_high: 0.28
""",
    """
algorithm:
  # Whether to normalize advantages by group standard deviation in GRPO
  norm_adv_by_std_in_grpo: False
""",
    """
actor_rollout_ref:
  actor:
    # Aggregation mode for loss:
    #   - "token-mean" (DAPO)
    #   - "seq-mean-token-sum"
    #   - "seq-mean-token-mean"
    #   - "seq-mean-token-sum-norm" (Dr.GRPO)
    loss_agg_mode: "seq-mean-token-sum-norm"
""",
    """
algorithm:
  # Filter out overlong responses, default = True for Dr.BoT
  filter_overlong_responses: True

  # Filter out incomplete responses (void-turn), default = True for Dr.BoT
  filter_incomplete_responses: True

  # Filter out repetitive responses, default = True for Dr.BoT
  filter_repetitive_responses: True

  # Filter out unreadable responses, default = True for Dr.BoT
  filter_unreadable_responses: True
""",
    """
actor_rollout_ref:
  rollout:
    # Rollout filtering ratio by standard deviation. We use 0.75 in Dr.BoT
    rollout_filter_ratio: 0.75

    # Rollout filter type: "std" (standard deviation)
    rollout_filter_type: std
""",
]


def _leaves(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@pytest.mark.parametrize("block", README_BLOCKS, ids=[f"block{i}" for i in range(len(README_BLOCKS))])
def test_every_readme_block_loads_verbatim(block, tmp_path):
    path = tmp_path / "readme.yaml"
    path.write_text(block)
    cfg = to_dict(load_config(path))
    flat = dict(_leaves(cfg))
    for key, value in _leaves(yaml.safe_load(block)):
        expected = value.replace("-", "_") if key.endswith("loss_mode") else value
        assert flat[key] == expected, key


def test_defaults_follow_the_readme():
    a = load_config().actor_rollout_ref.actor
    assert (a.enable_trajectory_replay, a.trajectory_buffer_size, a.trajectory_score_threshold) == (False, 2048, 1)
    assert (a.trajectory_tolerate_steps, a.replay_loss_coef, a.max_replay_loss_steps) == (10, 1, 200)
    assert (a.weight_decay_trajectory_replay, a.baseline_buffer_size) == (-1, 10240)
    assert (a.policy_loss.loss_mode, a.policy_loss.clip_cov_ratio, a.policy_loss.clip_cov_ub) == ("vanilla", 0.02, 40)
    assert load_config().algorithm.use_toolcall_reward == "cosine"


BAD_VALUES = {
    "actor_rollout_ref.actor.policy_loss.loss_mode": "ppo2",
    "actor_rollout_ref.actor.kl_loss_type": "js",
    "actor_rollout_ref.actor.loss_agg_mode": "mean",
    "actor_rollout_ref.actor.replay_update": "interleaved",
    "actor_rollout_ref.actor.replay_staleness": "oldest",
    "actor_rollout_ref.actor.replay_baseline": "mean",
    "actor_rollout_ref.rollout.rollout_filter_type": "var",
    "actor_rollout_ref.rollout.name": "sglang",
    "algorithm.use_toolcall_reward": "linear",
    "algorithm.toolcall_reward_variant": "all",
    "algorithm.adv_estimator": "ppo",
    "algorithm.gigpo_mode": "median",
    "algorithm.episode_stats": "episodes",
    "trainer.device": "tpu",
    "trainer.dtype": "float64",
    "actor_rollout_ref.model.attn_implementation": "flash",
    "actor_rollout_ref.actor.weight_decay_trajectory_replay": 0,
    "actor_rollout_ref.actor.clip_ratio_c": 1.0,
    "actor_rollout_ref.actor.policy_loss.clip_cov_ub": 0.5,  # below clip_cov_lb
    "actor_rollout_ref.actor.policy_loss.clip_cov_ub_replay": 0.5,
    "actor_rollout_ref.rollout.rollout_filter_ratio": 0.0,
    "actor_rollout_ref.rollout.top_p": 1.5,
    "algorithm.gamma": 1.5,
    "actor_rollout_ref.model.path": "''",
    "env.name": "chess",
    "env.kwargs": 5,
    "env.unseen_kwargs": 5,
    "trainer.default_local_dir": "''",
    "trainer.logger": "[slack]",
}


def _bad_value(key, default):
    if key in BAD_VALUES:
        return BAD_VALUES[key]
    if isinstance(default, bool):
        return "maybe"
    if isinstance(default, (int, float)):
        return -1e9  # every numeric key without an entry above has a lower bound or must be finite
    raise AssertionError(f"no bad value for {key}")


@pytest.mark.parametrize("key, default", list(iter_keys()), ids=[k for k, _ in iter_keys()])
def test_a_bad_value_in_each_key_is_a_clear_error(key, default):
    bad = _bad_value(key, default)
    if key.endswith(("trajectory_score_threshold", "entropy_coeff", "clip_cov_lb", "clip_cov_lb_replay")):
        bad = math.nan  # any finite value is allowed
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"{key}={bad}"])
    assert key.split(".")[-1] in str(err.value), str(err.value)


def test_the_unseen_evaluation_kwargs_are_checked_with_the_environment():
    cfg = load_config(overrides=["env.unseen_eval_tasks=4", "env.unseen_kwargs.max_ops=2"])
    assert cfg.env.unseen_kwargs == {"max_ops": 2} and cfg.env.kwargs == {}
    with pytest.raises(ConfigError, match="env.unseen_kwargs.*min_ops"):
        load_config(overrides=["env.unseen_eval_tasks=4", "env.unseen_kwargs.min_ops=0"])
    with pytest.raises(ConfigError, match="unseen_kwargs.*colour"):  # checked even while the evaluation is off
        load_config(overrides=["env.unseen_kwargs.colour=1"])


def test_unknown_keys_are_errors():
    with pytest.raises(ConfigError, match="trajectory_buffer_sise"):
        load_config({"actor_rollout_ref": {"actor": {"trajectory_buffer_sise": 10}}})
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(overrides=["algorithm.use_tool_reward=none"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["algorithm.max_toolcall_steps"])
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(preset="nope")
    with pytest.raises(ConfigError, match="no such file"):
        load_config("/nonexistent/spear.yaml")


def test_precedence_defaults_preset_source_overrides():
    cfg = load_config(
        {"algorithm": {"max_toolcall_steps": 7}},
        preset="alfworld_grpo_spear",
        overrides=["actor_rollout_ref.rollout.n=4"],
    )
    assert cfg.algorithm.max_toolcall_steps == 7  # source over preset (200)
    assert cfg.actor_rollout_ref.rollout.n == 4  # override over preset (8)
    assert cfg.actor_rollout_ref.actor.trajectory_tolerate_steps == 5  # preset over default (10)
    assert isinstance(cfg, SpearConfig)


def test_presets_reproduce_the_reference_settings():
    assert len([p for p in available_presets() if not p.startswith(("tiny_", "method_"))]) == 15
    for name in available_presets():
        load_config(preset=name)
    a = load_config(preset="alfworld_grpo_spear")
    act, pl, ro, alg = (
        a.actor_rollout_ref.actor,
        a.actor_rollout_ref.actor.policy_loss,
        a.actor_rollout_ref.rollout,
        a.algorithm,
    )
    assert ro.n == 8 and act.optim.lr == 1e-6
    assert (pl.loss_mode, pl.clip_cov_ratio, pl.clip_cov_lb, pl.clip_cov_ub) == ("clip_cov", 0.0002, 1, 5)
    assert (pl.clip_cov_ratio_replay, pl.clip_cov_lb_replay, pl.clip_cov_ub_replay) == (0.02, 2, 60)
    assert (act.trajectory_buffer_size, act.trajectory_tolerate_steps, act.baseline_buffer_size) == (2048, 5, 10240)
    assert (act.max_replay_loss_steps, alg.use_toolcall_reward, alg.max_toolcall_steps) == (200, "cosine", 200)
    assert alg.filter_overlong_responses and alg.filter_incomplete_responses
    assert alg.filter_repetitive_responses and alg.filter_unreadable_responses
    assert (ro.rollout_filter_ratio, ro.rollout_filter_type) == (0.75, "std")
    assert (act.loss_agg_mode, act.entropy_coeff, act.trajectory_score_threshold) == (
        "seq-mean-token-sum-norm",
        0.001,
        0,
    )
    assert act.enable_trajectory_replay
    m = load_config(preset="math_qwen3_32b_spear").actor_rollout_ref
    assert m.rollout.n == 16 and m.actor.max_replay_loss_steps == 300 and m.actor.entropy_coeff == 0
    assert (m.actor.policy_loss.clip_cov_ratio, m.actor.policy_loss.clip_cov_lb, m.actor.policy_loss.clip_cov_ub) == (
        0.0002,
        1,
        5,
    )
    assert (
        m.actor.policy_loss.clip_cov_ratio_replay,
        m.actor.policy_loss.clip_cov_lb_replay,
        m.actor.policy_loss.clip_cov_ub_replay,
    ) == (0.0002, 1, 5)
    assert load_config(preset="alfworld_gigpo_spear").algorithm.adv_estimator == "gigpo"
    assert not load_config(preset="alfworld_grpo_drbot").actor_rollout_ref.actor.enable_trajectory_replay
    math = load_config(preset="math_qwen3_32b_spear")
    assert (math.actor_rollout_ref.actor.trajectory_tolerate_steps, math.algorithm.max_toolcall_steps) == (5, 200)
    assert math.algorithm.toolcall_reward_variant == "success"  # the _qwen3 reward


REFERENCE_SPEAR = [
    "alfworld_grpo_spear",
    "alfworld_gigpo_spear",
    "webshop_grpo_spear",
    "webshop_gigpo_spear",
    "math_qwen3_32b_spear",
]


def test_reference_presets_set_the_reference_buffer_options():
    """The presets that reproduce the reference scripts run the reference buffer (group-stats baseline, staleness
    from the newest entry capped at 10); the reference Dr.BoT scripts ran vanilla clipping, as method_drbot does."""
    for name in REFERENCE_SPEAR:
        a = load_config(preset=name).actor_rollout_ref.actor
        assert (a.replay_baseline, a.replay_staleness) == ("group_stats", "newest_capped"), name
    drbot = [p for p in available_presets() if p.endswith("_drbot")]
    assert len(drbot) == 8
    for name in drbot:
        assert load_config(preset=name).actor_rollout_ref.actor.policy_loss.loss_mode == "vanilla", name


def test_docs_page_lists_every_key():
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "config.md").read_text()
    for key, _ in iter_keys():
        assert f"`{key}`" in page, key


def test_tiny_presets_extend_their_base():
    base = load_config(preset="tiny_math")
    for method in ("grpo", "drbot", "spear"):
        cfg = load_config(preset=f"tiny_math_{method}")
        assert cfg.env == base.env and cfg.sft == base.sft and cfg.data == base.data
        assert cfg.trainer.default_local_dir == f"runs/tiny_math_{method}"
    assert load_config(preset="tiny_math_spear").actor_rollout_ref.actor.enable_trajectory_replay
    assert not load_config(preset="tiny_math_drbot").actor_rollout_ref.actor.enable_trajectory_replay
    assert load_config(preset="tiny_math_grpo").algorithm.norm_adv_by_std_in_grpo


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"a: [1\n", r"invalid YAML at line 2, column 1"),
        (b"trainer:\n  seed: 1\ntrainer:\n  seed: 2\n", r"invalid YAML at line 3, column 1: found duplicate key"),
        (b'x: !!python/object/apply:os.system ["id"]\n', r"invalid YAML at line 1, column 4: could not determine"),
        (b"\xff\xfe\x00bad", r"not UTF-8 text \(byte 0\)"),
        (b"env:\n  kwargs: [1, 2]\n", r"bad value for 'env.kwargs'"),
        (b"- 1\n- 2\n", r"must hold a mapping"),
    ],
    ids=["syntax", "duplicate_key", "python_tag", "not_utf8", "kwargs_list", "top_level_list"],
)
def test_bad_config_files_are_one_line_errors_naming_the_file(tmp_path, content, match):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path)
    assert "\n" not in str(info.value)
    if "kwargs" not in match:
        assert str(path) in str(info.value)
