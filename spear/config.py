"""SPEAR configuration: the keys of the SPEAR README, in its sections, with validation and presets.

    from spear.config import load_config
    cfg = load_config("my.yaml", preset="alfworld_grpo_spear", overrides=["algorithm.max_toolcall_steps=50"])
    cfg.actor_rollout_ref.actor.trajectory_buffer_size

Sources merge in order: defaults (the README's values) < preset < ``source`` (a YAML path or a dict)
< dotted ``key=value`` overrides. Unknown keys and values out of range are a :class:`ConfigError`
naming the key and what is allowed. ``docs/config.md`` lists every key: the README's meaning, the
default, what the reference code did, and our choice.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional  # noqa: UP035 (OmegaConf needs the typing generics)

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from spear_kernels import POLICY_LOSS_MODES, PolicyLossParams
from spear_kernels._validation import MIN_TEMPERATURE

from .advantages import EPISODE_STATS
from .envs import ENVS, make_env

PRESET_DIR = Path(__file__).resolve().parent / "presets"

LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# verl's estimators; a trailing "+" (e.g. k3+) is verl's straight-through variant (the k2 gradient)
KL_ESTIMATORS = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")
KL_LOSS_TYPES = (*KL_ESTIMATORS, *(f"{k}+" for k in KL_ESTIMATORS))
TOOLCALL_REWARD_MODES = ("none", "constant", "cosine")
ADV_ESTIMATORS = ("grpo", "gigpo")
LOGGERS = ("console", "tensorboard", "wandb")


class UserError(ValueError):
    """A problem with what the user gave (a config, a path, a run directory): the CLI prints it on one line and
    exits 2. Any other exception is a bug and keeps its traceback."""


class ConfigError(UserError):
    """A config key is unknown, or its value is out of range or not among the allowed ones."""


@dataclass
class PolicyLossConfig:
    """``actor_rollout_ref.actor.policy_loss``."""

    loss_mode: str = "vanilla"
    clip_cov_ratio: float = 0.02
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 40.0
    kl_cov_ratio: float = 0.02
    clip_cov_ratio_replay: float = 0.02
    clip_cov_lb_replay: float = 1.0
    clip_cov_ub_replay: float = 40.0
    kl_cov_ratio_replay: float = 0.02
    ppo_kl_coef: float = 0.1  # verl's kl_cov penalty coefficient (not a README key)


# the policy-loss keys with a *_replay twin for the self-imitation loss
REPLAY_LOSS_KEYS = ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_ratio")


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.01
    grad_clip: float = 1.0


@dataclass
class ActorConfig:
    """``actor_rollout_ref.actor``: self-imitation, recalibration, Dr.BoT loss settings."""

    # Self-imitation learning
    enable_trajectory_replay: bool = False
    trajectory_buffer_size: int = 2048
    trajectory_score_threshold: float = 1.0
    trajectory_tolerate_steps: int = 10
    replay_loss_coef: float = 1.0
    max_replay_loss_steps: int = 200
    # Advantage recalibration
    weight_decay_trajectory_replay: float = -1.0
    baseline_buffer_size: int = 10240
    # Dr.BoT
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.0
    kl_loss_type: str = "low_var_kl"
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: float = 3.0
    loss_agg_mode: str = "seq-mean-token-sum-norm"
    entropy_coeff: float = 0.0
    policy_loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    # Options reproducing the reference code where it differs from the README (docs/config.md)
    replay_update: str = "separate"  # separate optimizer steps (reference) | mixed into the on-policy batch
    replay_staleness: str = "current"  # current step (README) | newest_capped (reference: newest entry, cap 10)
    replay_baseline: str = "rewards"  # rewards FIFO (README) | group_stats (reference: group means and stds)
    replay_requires_tool_call: bool = False  # admit only trajectories with a tool call (the reference's math fork)
    # verl-agent's invalid-action penalty: each invalid action costs invalid_action_penalty_coef
    use_invalid_action_penalty: bool = False
    invalid_action_penalty_coef: float = 0.1
    # Training loop
    ppo_mini_batch_size: int = 16
    ppo_micro_batch_size: int = 4
    ppo_epochs: int = 1
    optim: OptimConfig = field(default_factory=OptimConfig)

    def loss_params(self, *, replay: bool = False) -> PolicyLossParams:
        """The kernel's :class:`spear_kernels.PolicyLossParams` of the on-policy loss, or of the self-imitation loss
        (the ``*_replay`` clip-cov / kl-cov keys)."""
        pl = self.policy_loss
        params = PolicyLossParams(
            clip_ratio_low=self.clip_ratio_low,
            clip_ratio_high=self.clip_ratio_high,
            clip_ratio_c=self.clip_ratio_c,
            clip_cov_ratio=pl.clip_cov_ratio,
            clip_cov_lb=pl.clip_cov_lb,
            clip_cov_ub=pl.clip_cov_ub,
            kl_cov_ratio=pl.kl_cov_ratio,
            ppo_kl_coef=pl.ppo_kl_coef,
        )
        if not replay:
            return params
        return params.for_replay(**{key: getattr(pl, f"{key}_replay") for key in REPLAY_LOSS_KEYS})


@dataclass
class RolloutConfig:
    """``actor_rollout_ref.rollout``."""

    rollout_filter_ratio: float = 0.75
    rollout_filter_type: str = "std"
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    response_length: int = 512
    max_turns: int = 8
    # slim trainer (``spear train``)
    max_turn_tokens: int = 64  # token budget of one assistant turn
    val_temperature: float = 0.0  # 0 = greedy evaluation
    name: str = "hf"  # the rollout engine: hf (transformers, on the trainer's model) | vllm (the vllm extra)
    kv_cache_gib: float = 1.0  # vllm on a CPU: memory for its KV cache
    gpu_memory_utilization: float = 0.5  # vllm on a GPU: the fraction of the GPU's memory it may take (verl's key)


@dataclass
class ModelConfig:
    """``actor_rollout_ref.model``: a local Hugging Face causal LM directory; null = the built-in tiny model."""

    path: Optional[str] = None  # noqa: UP045 (OmegaConf needs typing generics)
    # the attention kernel: auto = flash_attention_2 on a GPU when flash-attn is installed, else sdpa
    attn_implementation: str = "auto"
    # every dropout probability set to 0 for RL (TRL's GRPO default): the old log-probs and the update must see one
    # policy, or the first PPO ratio is not 1
    disable_dropout: bool = True


@dataclass
class ActorRolloutRefConfig:
    actor: ActorConfig = field(default_factory=ActorConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    model: ModelConfig = field(default_factory=ModelConfig)


@dataclass
class AlgorithmConfig:
    """``algorithm``: intrinsic reward, advantage estimation, Dr.BoT filters."""

    use_toolcall_reward: str = "cosine"
    max_toolcall_steps: int = 100
    toolcall_reward_variant: str = "per_turn"  # per_turn: min(0.1 k, 1) | success: full factor on a success (_qwen3)
    norm_adv_by_std_in_grpo: bool = False
    adv_estimator: str = "grpo"
    gamma: float = 0.95  # GiGPO step-level discount
    step_advantage_w: float = 1.0  # GiGPO step-level weight
    gigpo_mode: str = "mean_std_norm"
    # over what the episode-level mean / std of a group are taken when a trajectory has several samples (GiGPO
    # turns, verl-agent's step rows): trajectories (each once) | steps (every sample: verl-agent's
    # compute_mean_std_cross_all_data=True)
    episode_stats: str = "trajectories"
    filter_overlong_responses: bool = True
    filter_incomplete_responses: bool = True
    filter_repetitive_responses: bool = True
    filter_unreadable_responses: bool = True


@dataclass
class DataConfig:
    """``data``: the rollout batch of the slim trainer."""

    train_batch_size: int = 8  # tasks per step; each is rolled out ``rollout.n`` times (one group)
    max_prompt_length: int = 64


@dataclass
class EnvConfig:
    """``env``: the environment of the slim trainer (``spear.envs``)."""

    name: str = "math"
    num_train_tasks: int = 0  # 0: a new task seed every time; k > 0: training cycles through seeds [0, k)
    num_eval_tasks: int = 64
    eval_seed: int = 1_000_000  # evaluation uses seeds [eval_seed, eval_seed + num_eval_tasks)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # noqa: UP006 - passed to the environment's constructor
    # a second evaluation on other games, logged as val_unseen/*: seeds [eval_seed, eval_seed + unseen_eval_tasks)
    # of an environment built with unseen_kwargs over kwargs (alfworld: {split: valid_unseen}); 0: none
    unseen_eval_tasks: int = 0
    unseen_kwargs: Dict[str, Any] = field(default_factory=dict)  # noqa: UP006


@dataclass
class SftConfig:
    """``sft``: the cold-start supervised fine-tuning on expert trajectories (``spear sft``)."""

    num_examples: int = 2000
    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    # then this many steps on transcripts in which the expert answers every task at once, without the tool
    # (math: expert_direct_prob 1): a cold start that keeps the tool skill but rarely uses it (tiny_math_hard)
    direct_steps: int = 0
    direct_lr: float = 3e-4


@dataclass
class TrainerConfig:
    """``trainer``: the slim single-process trainer (``spear train``)."""

    total_training_steps: int = 100
    save_freq: int = 20  # checkpoint every N steps (and at the end); 0: only at the end
    test_freq: int = 10  # evaluate every N steps (and at the end); 0: only at the end
    val_before_train: bool = True
    cold_start_sft: bool = False  # run the ``sft`` section on the initial model first (saved in <run dir>/sft)
    default_local_dir: str = "runs/spear"
    seed: int = 0
    logger: List[str] = field(default_factory=lambda: ["console", "tensorboard"])  # noqa: UP006
    num_threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    device: str = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
    dtype: str = (
        "auto"  # the policy's weights: auto (bfloat16 on a GPU, float32 on a CPU) | float32 | bfloat16 | float16
    )


@dataclass
class SpearConfig:
    actor_rollout_ref: ActorRolloutRefConfig = field(default_factory=ActorRolloutRefConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    data: DataConfig = field(default_factory=DataConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# ---- validation ---------------------------------------------------------------------------------

ROLLOUT_ENGINES = ("hf", "vllm")  # actor_rollout_ref.rollout.name (spear.trainer.engines)
DTYPES = ("auto", "float32", "bfloat16", "float16")  # trainer.dtype
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")  # actor_rollout_ref.model.attn_implementation

# Sizes are bounded before anything is allocated or written: a typo such as rollout.n=1e9 is a one-line
# error, not a MemoryError after the run directory was made.
MAX_GROUP_SIZE = 4096
MAX_EPISODES_PER_STEP = 65536
MAX_EXAMPLES = 10**7
MAX_STEPS = 10**9
MAX_TOKENS = 2**20
MAX_SEED = 2**62  # the trainer seeds its generators with seed + 0..3: all must fit in int64
MAX_THREADS = 1024  # torch's OpenMP pool fails to start (or crashes) with tens of thousands


def _check_choice(key: str, value: Any, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{key} = {value!r} is not allowed; expected one of {', '.join(map(repr, allowed))}")


def _check_range(
    key: str,
    value: float,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        lb = "-inf" if lo is None else f"{lo}"
        ub = "inf" if hi is None else f"{hi}"
        interval = f"{'(' if lo_open or lo is None else '['}{lb}, {ub}{')' if hi_open or hi is None else ']'}"
        raise ConfigError(f"{key} = {value!r} is out of range; expected a number in {interval}")


def validate(cfg: SpearConfig) -> SpearConfig:
    """Raises :class:`ConfigError` naming the first bad key; returns ``cfg`` (with loss modes normalised)."""
    a, pl = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.actor.policy_loss
    r, alg = cfg.actor_rollout_ref.rollout, cfg.algorithm
    p = "actor_rollout_ref.actor."
    pl.loss_mode = pl.loss_mode.replace("-", "_")  # the README writes clip-cov / kl-cov
    _check_choice(p + "policy_loss.loss_mode", pl.loss_mode, POLICY_LOSS_MODES)
    _check_loss_params(a)
    for key in (
        "trajectory_buffer_size",
        "baseline_buffer_size",
        "ppo_mini_batch_size",
        "ppo_micro_batch_size",
        "ppo_epochs",
    ):
        _check_range(p + key, getattr(a, key), 1, MAX_EXAMPLES)
    _check_range(p + "trajectory_tolerate_steps", a.trajectory_tolerate_steps, 0)
    _check_range(p + "trajectory_score_threshold", a.trajectory_score_threshold)
    _check_range(p + "replay_loss_coef", a.replay_loss_coef, 0)
    _check_range(p + "max_replay_loss_steps", a.max_replay_loss_steps, 0)
    w = a.weight_decay_trajectory_replay
    if not (w == -1 or (isinstance(w, (int, float)) and 0 < w <= 1)):
        raise ConfigError(
            f"{p}weight_decay_trajectory_replay = {w!r} is not allowed; expected -1 (50th-percentile "
            "baseline) or a decay factor in (0, 1]"
        )
    _check_range(p + "kl_loss_coef", a.kl_loss_coef, 0)
    _check_choice(p + "kl_loss_type", a.kl_loss_type, KL_LOSS_TYPES)
    _check_range(p + "invalid_action_penalty_coef", a.invalid_action_penalty_coef, 0)
    _check_choice(p + "loss_agg_mode", a.loss_agg_mode, LOSS_AGG_MODES)
    _check_range(p + "entropy_coeff", a.entropy_coeff)
    _check_choice(p + "replay_update", a.replay_update, ("separate", "mixed"))
    _check_choice(p + "replay_staleness", a.replay_staleness, ("current", "newest_capped"))
    _check_choice(p + "replay_baseline", a.replay_baseline, ("rewards", "group_stats"))
    _check_range(p + "optim.lr", a.optim.lr, 0, lo_open=True)
    _check_range(p + "optim.weight_decay", a.optim.weight_decay, 0)
    _check_range(p + "optim.grad_clip", a.optim.grad_clip, 0, lo_open=True)
    q = "actor_rollout_ref.rollout."
    _check_range(q + "rollout_filter_ratio", r.rollout_filter_ratio, 0, 1, lo_open=True)
    _check_choice(q + "rollout_filter_type", r.rollout_filter_type, ("std",))
    _check_range(q + "n", r.n, 1, MAX_GROUP_SIZE)
    _check_range(q + "temperature", r.temperature, MIN_TEMPERATURE)  # the log-prob kernels' smallest
    _check_range(q + "top_p", r.top_p, 0, 1, lo_open=True)
    _check_range(q + "response_length", r.response_length, 1, MAX_TOKENS)
    _check_range(q + "max_turns", r.max_turns, 1, MAX_TOKENS)
    _check_choice("algorithm.use_toolcall_reward", alg.use_toolcall_reward, TOOLCALL_REWARD_MODES)
    _check_range(q + "max_turn_tokens", r.max_turn_tokens, 1, MAX_TOKENS)
    v = r.val_temperature
    if not (isinstance(v, (int, float)) and (v == 0 or (math.isfinite(v) and v >= MIN_TEMPERATURE))):
        raise ConfigError(f"{q}val_temperature = {v!r} is not allowed; expected 0 (greedy) or >= {MIN_TEMPERATURE}")
    _check_choice(q + "name", r.name, ROLLOUT_ENGINES)
    _check_range(q + "kv_cache_gib", r.kv_cache_gib, 0, 1024, lo_open=True)
    _check_range(q + "gpu_memory_utilization", r.gpu_memory_utilization, 0, 1, lo_open=True)
    path = cfg.actor_rollout_ref.model.path
    if path is not None and (not isinstance(path, str) or not path.strip()):
        raise ConfigError(f"actor_rollout_ref.model.path = {path!r} is not allowed; expected a directory or null")
    _check_range("data.train_batch_size", cfg.data.train_batch_size, 1, MAX_EPISODES_PER_STEP)
    if r.rollout_filter_ratio < 1 and int(r.rollout_filter_ratio * cfg.data.train_batch_size) == 0:
        raise ConfigError(
            f"{q}rollout_filter_ratio={r.rollout_filter_ratio} keeps int({r.rollout_filter_ratio} * "
            f"{cfg.data.train_batch_size}) = 0 of the data.train_batch_size={cfg.data.train_batch_size} groups: "
            "no step would train; raise either"
        )
    if cfg.data.train_batch_size * r.n > MAX_EPISODES_PER_STEP:
        raise ConfigError(
            f"data.train_batch_size x {q}n = {cfg.data.train_batch_size * r.n} episodes per step is too many; "
            f"at most {MAX_EPISODES_PER_STEP}"
        )
    _check_range("data.max_prompt_length", cfg.data.max_prompt_length, 1, MAX_TOKENS)
    _check_choice("env.name", cfg.env.name, ENVS)
    _check_range("env.num_train_tasks", cfg.env.num_train_tasks, 0, MAX_SEED)
    _check_range("env.num_eval_tasks", cfg.env.num_eval_tasks, 1, MAX_EXAMPLES)
    _check_range("env.eval_seed", cfg.env.eval_seed, 0, MAX_SEED)
    _check_range("env.unseen_eval_tasks", cfg.env.unseen_eval_tasks, 0, MAX_EXAMPLES)
    for key in ("kwargs", "unseen_kwargs"):
        if not isinstance(getattr(cfg.env, key), dict):
            raise ConfigError(f"env.{key} = {getattr(cfg.env, key)!r} is not allowed; expected a mapping")
    _check_env_kwargs(cfg)
    if cfg.env.unseen_eval_tasks or cfg.env.unseen_kwargs:
        _check_env_kwargs(cfg, unseen=True)
    _check_range("sft.num_examples", cfg.sft.num_examples, 1, MAX_EXAMPLES)
    _check_range("sft.steps", cfg.sft.steps, 1, MAX_STEPS)
    _check_range("sft.batch_size", cfg.sft.batch_size, 1, MAX_EPISODES_PER_STEP)
    _check_range("sft.lr", cfg.sft.lr, 0, lo_open=True)
    _check_range("sft.direct_steps", cfg.sft.direct_steps, 0, MAX_STEPS)
    _check_range("sft.direct_lr", cfg.sft.direct_lr, 0, lo_open=True)
    if cfg.sft.direct_steps and cfg.env.name != "math":
        raise ConfigError(
            "sft.direct_steps needs an environment whose expert can answer without the tool (math), "
            f"not {cfg.env.name!r}"
        )
    _check_range("sft.weight_decay", cfg.sft.weight_decay, 0)
    t = cfg.trainer
    _check_range("trainer.total_training_steps", t.total_training_steps, 1, MAX_STEPS)
    _check_range("trainer.save_freq", t.save_freq, 0)
    _check_range("trainer.test_freq", t.test_freq, 0)
    _check_range("trainer.seed", t.seed, 0, MAX_SEED)
    _check_range("trainer.num_threads", t.num_threads, 0, MAX_THREADS)
    if not isinstance(t.device, str) or not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", t.device):
        raise ConfigError(f"trainer.device = {t.device!r} is not allowed; expected auto, cpu, cuda or cuda:N")
    _check_choice("trainer.dtype", t.dtype, DTYPES)
    _check_choice(
        "actor_rollout_ref.model.attn_implementation",
        cfg.actor_rollout_ref.model.attn_implementation,
        ATTN_IMPLEMENTATIONS,
    )
    if not isinstance(t.default_local_dir, str) or not t.default_local_dir.strip():
        raise ConfigError(f"trainer.default_local_dir = {t.default_local_dir!r} is not allowed; expected a path")
    for name in t.logger:
        _check_choice("trainer.logger", name, LOGGERS)
    _check_range("algorithm.max_toolcall_steps", alg.max_toolcall_steps, 1)
    _check_choice("algorithm.toolcall_reward_variant", alg.toolcall_reward_variant, ("per_turn", "success"))
    _check_choice("algorithm.adv_estimator", alg.adv_estimator, ADV_ESTIMATORS)
    _check_range("algorithm.gamma", alg.gamma, 0, 1)
    _check_range("algorithm.step_advantage_w", alg.step_advantage_w, 0)
    _check_choice("algorithm.gigpo_mode", alg.gigpo_mode, ("mean_std_norm", "mean_norm"))
    _check_choice("algorithm.episode_stats", alg.episode_stats, EPISODE_STATS)
    return cfg


def _check_loss_params(a: ActorConfig) -> None:
    """The on-policy and the replay loss parameters through :meth:`spear_kernels.PolicyLossParams.check`, the one
    range check, with its message naming the config keys (``clip_cov_ub_replay``, ...)."""
    for replay in (False, True):
        params = a.loss_params(replay=replay)
        for name in PolicyLossParams.names():  # a non-number is named before the ranges are checked
            value = getattr(params, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{_loss_key(name, replay)} = {value!r} is not a number")
        try:
            params.check()
        except ValueError as err:
            message = str(err)
            if replay:
                message = re.sub(rf"\b({'|'.join(REPLAY_LOSS_KEYS)})\b", r"\1_replay", message)
            name = re.match(r"[a-z_]+", str(err)).group(0)
            raise ConfigError(f"{_loss_key(name, replay)}: {message}") from None


def _loss_key(name: str, replay: bool) -> str:
    if name in REPLAY_LOSS_KEYS or name == "ppo_kl_coef":
        return f"actor_rollout_ref.actor.policy_loss.{name}{'_replay' if replay and name in REPLAY_LOSS_KEYS else ''}"
    return f"actor_rollout_ref.actor.{name}"


def env_kwargs(cfg: SpearConfig, *, unseen: bool = False) -> dict:
    """The environment's constructor arguments: ``rollout.max_turns``, ``env.kwargs`` and, for the unseen
    evaluation, ``env.unseen_kwargs`` over them."""
    extra = dict(cfg.env.unseen_kwargs) if unseen else {}
    return {"max_turns": cfg.actor_rollout_ref.rollout.max_turns, **dict(cfg.env.kwargs), **extra}


def env_kwargs_error(cfg: SpearConfig, err: Exception, *, unseen: bool = False) -> ConfigError:
    key = "env.kwargs + env.unseen_kwargs" if unseen else "env.kwargs"
    given = {**cfg.env.kwargs, **cfg.env.unseen_kwargs} if unseen else dict(cfg.env.kwargs)
    return ConfigError(f"{key} {given} do not fit environment {cfg.env.name!r}: {err}")


def _check_env_kwargs(cfg: SpearConfig, *, unseen: bool = False) -> None:
    """The environment accepts ``env.kwargs`` (with ``rollout.max_turns``; with ``unseen``, ``env.unseen_kwargs``
    over them): constructing one checks them (it reads no data and starts no game)."""
    try:
        env = make_env(cfg.env.name, **env_kwargs(cfg, unseen=unseen))
    except (TypeError, ValueError) as err:
        raise env_kwargs_error(cfg, err, unseen=unseen) from None
    close = getattr(env, "close", None)
    if close is not None:
        close()


# ---- loading ------------------------------------------------------------------------------------


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _preset_chain(preset: str, _seen: tuple[str, ...] = ()) -> list[str]:
    """The preset after the presets it extends (a top-level ``base: <preset>`` or ``base: [<preset>, ...]`` key,
    applied in order), most basic first."""
    path = PRESET_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(available_presets())}")
    if preset in _seen:
        raise ConfigError(f"preset {_seen[0]!r}: 'base' keys form a cycle through {preset!r}")
    base = OmegaConf.load(path).get("base", None)
    bases = [] if base is None else [base] if isinstance(base, str) else list(base)
    chain: list[str] = []
    for name in bases:
        chain += [n for n in _preset_chain(name, (*_seen, preset)) if n not in chain]
    return [*chain, preset]


def _as_node(source: Any, what: str) -> DictConfig:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"{what}: no such file {path}")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"{what} {path}: not UTF-8 text (byte {err.start})") from None
        try:
            _refuse_aliases(text)
            node = OmegaConf.create(text) if text.strip() else OmegaConf.create({})
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"{what} {path}: invalid YAML{where}: {problem}") from None
        what = f"{what} {path}"
    elif isinstance(source, Mapping):
        node = OmegaConf.create(dict(source))
    elif isinstance(source, DictConfig):
        node = source
    else:
        raise ConfigError(f"{what} must be a YAML path, a dict or None, got {type(source).__name__}")
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{what} must hold a mapping at the top level")
    return node


def _refuse_aliases(text: str) -> None:
    """YAML aliases (``*name``, merge keys ``<<: *name``) are refused: a few hundred bytes of nested aliases expand
    to gigabytes (a "billion laughs"), and no config needs them. Scanning the tokens is linear in the text."""
    for token in yaml.scan(text, Loader=yaml.SafeLoader):
        if isinstance(token, yaml.AliasToken):
            line = token.start_mark.line + 1
            raise yaml.YAMLError(
                f"a YAML alias (*{token.value}) at line {line}: aliases are not supported in spear configs; "
                "write the values out"
            )


def _mismatched_key(base: Any, node: Any, prefix: str = "") -> str | None:
    """The first dotted key where ``node`` puts a non-mapping over a mapping of ``base`` (or the reverse)."""
    if not isinstance(node, DictConfig) or not isinstance(base, DictConfig):
        return None
    for k in node:
        if k not in base:
            continue
        b, n = base._get_node(k), node._get_node(k)
        if isinstance(b, DictConfig) != isinstance(n, DictConfig):
            return f"{prefix}{k}"
        found = _mismatched_key(b, n, f"{prefix}{k}.")
        if found:
            return found
    return None


def _missing_key(node: DictConfig, prefix: str = "") -> str | None:
    """The first dotted key whose value is OmegaConf's ``???`` (merging it would silently keep the old value)."""
    for k in node:
        if OmegaConf.is_missing(node, k):
            return f"{prefix}{k}"
        child = node._get_node(k)
        if isinstance(child, DictConfig):
            found = _missing_key(child, f"{prefix}{k}.")
            if found:
                return found
    return None


def _merge(base: DictConfig, node: DictConfig, what: str) -> DictConfig:
    missing = _missing_key(node)
    if missing:
        raise ConfigError(f"{what}: {missing} = ??? is not a value; give one or leave the key out")
    try:
        return OmegaConf.merge(base, node)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or _mismatched_key(base, node) or "?"
        msg = str(err).splitlines()[0]
        if "not in struct" in msg or "Key '" in msg and "not in" in msg:
            raise ConfigError(f"{what}: unknown key {key!r}") from None
        raise ConfigError(f"{what}: bad value for {key!r}: {msg}") from None


def load_config(
    source: Any = None, *, preset: str | Sequence[str] | None = None, overrides: Iterable[str] = ()
) -> SpearConfig:
    """Builds a validated :class:`SpearConfig`.

    Args:
        source: a YAML file path, a dict (nested like the YAML), or None for the defaults.
        preset: a name from :func:`available_presets` (``spear/presets/<name>.yaml``), or several applied in order
            (``["method_spear", "tiny_math_hard"]``: a method, then a task), applied before ``source``.
        overrides: dotted ``key=value`` strings, e.g. ``["algorithm.max_toolcall_steps=50"]``, applied last.
    """
    cfg = OmegaConf.structured(SpearConfig)
    names = [] if preset is None else [preset] if isinstance(preset, str) else list(preset)
    chain: list[str] = []
    for top in names:
        chain += [name for name in _preset_chain(top) if name not in chain]
    for name in chain:
        node = _as_node(PRESET_DIR / f"{name}.yaml", f"preset {name}")
        node.pop("base", None)
        cfg = _merge(cfg, node, f"preset {name}")
    if source is not None:
        cfg = _merge(cfg, _as_node(source, "config"), "config")
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
    if overrides:
        try:
            dotlist = OmegaConf.from_dotlist(overrides)
        except (OmegaConfBaseException, yaml.YAMLError, ValueError) as err:  # ValueError: a 5000-digit integer
            key = getattr(err, "full_key", None)
            raise ConfigError(f"overrides: {f'{key}: ' if key else ''}{str(err).splitlines()[0]}") from None
        cfg = _merge(cfg, dotlist, "override")
    try:
        obj = OmegaConf.to_object(cfg)  # resolves ${...} interpolations
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from None
    _check_strings(obj)
    return validate(obj)


def _check_strings(value: Any, key: str = "") -> None:
    """No NUL byte in any string value (a path with one fails deep inside the OS calls)."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ConfigError(f"{key} = {value!r} holds a NUL byte")
        return
    if is_dataclass(value):
        items = [(f.name, getattr(value, f.name)) for f in fields(value)]
    elif isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = list(enumerate(value))
    else:
        return
    for name, item in items:
        _check_strings(item, f"{key}.{name}" if key else str(name))


def to_dict(cfg: SpearConfig) -> dict:
    """Plain nested dict (for checkpoints, logs and YAML dumps)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def iter_keys(obj: Any = None, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """Every leaf key of the config with its default, dotted (``actor_rollout_ref.actor.trajectory_buffer_size``)."""
    obj = SpearConfig() if obj is None else obj
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            yield from iter_keys(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value
