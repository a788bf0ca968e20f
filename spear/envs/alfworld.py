"""ALFWorld on its own engine (``alfworld==0.4.2``: TextWorld's PDDL game engine with ALFWorld's domain, grammar and
demangler), played as verl-agent plays it.

Games are generated here in ALFWorld's format (:mod:`spear.envs.alfworld_games`: the six task types, a size knob,
train / valid_seen / valid_unseen splits) and cached under ``$SPEAR_CACHE/alfworld``; with ``data_path`` (default
``$ALFWORLD_DATA``, where ``alfworld-download`` puts them) the same environment plays ALFWorld's own games of that
split instead (``json_2.1.1/<split>/**/game.tw-pddl``, the solvable ones, as ``AlfredTWEnv`` selects them).

Each step the agent sees a prompt (:meth:`AlfWorldEnv.prompt`) holding the task, the step count, the last
``history_length`` observation / action pairs, the current observation and the admissible actions, and answers with
``<action>command</action>`` (optionally after ``<think>...</think>``). The command is lower-cased and must be one of
the admissible ones; anything else is an invalid action (nothing happens; ``use_invalid_action_penalty`` charges
for it). The episode ends on a win (reward ``win_reward``, verl-agent's 10) or after ``max_turns`` steps. The
prompt is rebuilt every step (``per_step_prompts``): a long episode never grows the context beyond its window, and
the slim trainer trains one row per step (verl-agent's layout).

Speed: TextWorld re-parses the grammar's templates with tatsu at every step (over 90% of a step); the parses are
memoised here (byte-identical output, a test checks). The engine is not thread-safe (``fast_downward`` swaps
``sys.argv`` / ``sys.stdout`` while a game loads): one lock guards every load.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import glob
import os
import random
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from .alfworld_games import SPLITS, TASK_TYPES, GameSpec, write_game
from .base import StepResult, cache_dir, extract_tag, require_packages

_ENGINE_LOCK = threading.RLock()
_MEMOISED = False


def memoise_grammar() -> None:
    """Caches TextWorld's parses of grammar templates and rule conditions (they are the same strings every step);
    derivations get a deep copy, so what they mutate is never the cached parse."""
    global _MEMOISED
    if _MEMOISED:
        return
    import textworld.envs.pddl.textgen as textgen
    from textworld.logic import Rule

    parse = textgen._parse_and_convert

    @functools.lru_cache(maxsize=4096)
    def cached(text: str, rule_name: str):
        return parse(text, rule_name=rule_name)

    def parse_and_convert(text, rule_name="symbols", **kwargs):
        if kwargs.get("trace"):
            return parse(text, rule_name=rule_name, **kwargs)
        return copy.deepcopy(cached(text, rule_name))

    textgen._parse_and_convert = parse_and_convert
    # conditions are parsed into Rules that are only read (matched against the state)
    Rule.parse_conjunctive_query = staticmethod(functools.lru_cache(maxsize=4096)(Rule.parse_conjunctive_query))
    _MEMOISED = True


def open_game(game_file: str | Path, *, planner: bool = False):
    """A TextWorld environment on one ALFWorld game (ALFWorld's demangler and infos; with ``planner``, its planner
    expert in ``extra.expert_plan``), loaded under the engine lock."""
    require_packages("alfworld", "alfworld", "alfworld", "textworld")
    import textworld
    from alfworld.agents.environment.alfred_tw_env import (
        AlfredDemangler,
        AlfredExpert,
        AlfredExpertType,
        AlfredInfos,
    )
    from textworld.envs import PddlEnv

    memoise_grammar()
    infos = textworld.EnvInfos(
        admissible_commands=True, won=True, lost=True, feedback=True, policy_commands=planner, extras=["gamefile"]
    )
    env = AlfredInfos(AlfredDemangler(PddlEnv(infos), shuffle=False))
    if planner:
        env = AlfredExpert(env, expert_type=AlfredExpertType.PLANNER)
    with engine_guard():
        env.load(str(game_file))
    return env


@contextlib.contextmanager
def engine_guard() -> Iterator[None]:
    """Holds the engine lock and restores ``sys.argv`` and ``sys.stdout``, which ``fast_downward`` overwrites while it
    grounds a game (loading it) or plans (the planner expert's reset)."""
    with _ENGINE_LOCK:
        argv, stdout = list(sys.argv), sys.stdout
        try:
            yield
        finally:
            sys.argv[:] = argv
            sys.stdout = stdout


def downloaded_games(data_path: str | Path, split: str) -> list[Path]:
    """ALFWorld's own games of ``split`` under ``data_path``, as ``AlfredTWEnv`` selects them: folders with both
    ``traj_data.json`` and a solvable ``game.tw-pddl``, no movable-receptacle or sliced tasks, sorted."""
    import json

    root = Path(data_path) / "json_2.1.1" / split
    games = []
    for game in sorted(glob.glob(str(root / "**" / "game.tw-pddl"), recursive=True)):
        folder = Path(game).parent
        if "movable" in str(folder) or "Sliced" in str(folder) or not (folder / "traj_data.json").is_file():
            continue
        try:
            if not json.loads(Path(game).read_text()).get("solvable", False):
                continue
        except (OSError, ValueError):
            continue
        games.append(Path(game))
    return games


class AlfWorldEnv:
    """See the module docstring.

    Args:
        max_turns: steps per episode (verl-agent: 50).
        split: ``train``, ``valid_seen`` or ``valid_unseen``.
        nb_receptacles, nb_distractors: the generated games' size.
        task_types: a subset of the six (default: all).
        history_length: observation / action pairs in the prompt (verl-agent: 2).
        win_reward: the reward of a won episode (verl-agent: 10).
        think: ask for ``<think>...</think>`` before the action (verl-agent's prompt); the action is read either way.
        data_path: ALFWorld's downloaded data (default: ``$ALFWORLD_DATA`` when it holds games of ``split``, else the
            generated games).
        num_games: 0 plays game ``seed`` itself; k > 0 plays game ``seed % k`` (a fixed set of k games).
        per_step_prompts: True (verl-agent's layout): each step's observation is the whole next prompt and the
            trainer trains one row per step; False: one growing trajectory, each step answered with
            ``<obs>feedback Admissible actions: [...]</obs>`` (what verl's ``spear_env`` agent loop plays).
    """

    name = "alfworld"
    stop_strings = ("</action>",)
    fail_reward = 0.0
    per_step_prompts = True

    def __init__(
        self,
        max_turns: int = 50,
        split: str = "train",
        nb_receptacles: int = 6,
        nb_distractors: int = 4,
        task_types: tuple[str, ...] | list[str] | None = None,
        history_length: int = 2,
        win_reward: float = 10.0,
        think: bool = False,
        data_path: str | None = None,
        num_games: int = 0,
        per_step_prompts: bool = True,
    ):
        if max_turns < 1 or history_length < 0 or num_games < 0:
            raise ValueError("max_turns >= 1, history_length >= 0 and num_games >= 0 are needed")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        task_types = tuple(task_types) if task_types else TASK_TYPES
        unknown = [t for t in task_types if t not in TASK_TYPES]
        if unknown or not task_types:
            raise ValueError(f"unknown task types {unknown}; known: {', '.join(TASK_TYPES)}")
        if not (2 <= nb_receptacles <= 40) or not (0 <= nb_distractors <= 60):
            raise ValueError("nb_receptacles in [2, 40] and nb_distractors in [0, 60] are needed")
        self.max_turns, self.split, self.history_length = max_turns, split, history_length
        self.win_reward, self.think, self.num_games = float(win_reward), bool(think), int(num_games)
        self.sizes = (int(nb_receptacles), int(nb_distractors), task_types)
        self.per_step_prompts = bool(per_step_prompts)
        self.data_path = data_path
        self._downloaded: list[Path] | None = None
        if data_path is None and os.environ.get("ALFWORLD_DATA"):
            # alfworld-download's data, when it is there (importing alfworld sets the variable to its cache even
            # when nothing was downloaded: an empty one means the generated games)
            found = downloaded_games(os.environ["ALFWORLD_DATA"], split)
            if found:
                self.data_path, self._downloaded = os.environ["ALFWORLD_DATA"], found
        self._env = None
        self._game: Path | None = None
        self._state = None
        self._history: list[tuple[str, str]] = []
        self._task = ""
        self._turn = 0
        self._done = True
        self.task_type = ""

    # ---- games ----------------------------------------------------------------------------------------------

    def game_file(self, seed: int) -> Path:
        """The game ``seed`` plays (generated on first use, or ALFWorld's own with ``data_path``)."""
        index = int(seed) % self.num_games if self.num_games else int(seed)
        if self.data_path:
            if self._downloaded is None:
                self._downloaded = downloaded_games(self.data_path, self.split)
                if not self._downloaded:
                    raise FileNotFoundError(
                        f"no solvable ALFWorld games under {self.data_path}/json_2.1.1/{self.split} "
                        "(run alfworld-download, or leave data_path unset for generated games)"
                    )
            return self._downloaded[index % len(self._downloaded)]
        receptacles, distractors, types = self.sizes
        spec = GameSpec(index, self.split, receptacles, distractors, types)
        return write_game(spec, cache_dir() / "alfworld") / "game.tw-pddl"

    # ---- the episode ----------------------------------------------------------------------------------------

    def reset(self, seed: int) -> str:
        import json

        game = self.game_file(seed)
        if self._env is None or self._game != game:
            self.close()
            self._env = open_game(game)
            self._game = game
        self._state = self._env.reset()
        self.task_type = json.loads((game.parent / "traj_data.json").read_text()).get("task_type", "")
        intro = self._state.feedback.replace("-= Welcome to TextWorld, ALFRED! =-", "").strip()
        observation, _, task = intro.partition("Your task is to: ")
        self._task = task.strip()
        self._observation = observation.strip()
        self._history = []
        self._turn = 0
        self._done = False
        return self.prompt()

    def admissible(self) -> list[str]:
        """The admissible commands, without ``help`` (as verl-agent shows them)."""
        return [c for c in self._state["admissible_commands"] if c != "help"]

    def prompt(self) -> str:
        """What the agent sees before its next action (rebuilt each step: a bounded history window)."""
        lines = [f"You are in an ALFRED household. Your task is to: {self._task}"]
        if self._turn and self.history_length:
            recent = self._history[-self.history_length :]
            lines.append(
                f"You have taken {self._turn} step(s). The last {len(recent)} observation(s) and your action(s):"
            )
            for i, (obs, action) in enumerate(recent, start=self._turn - len(recent) + 1):
                lines.append(f"[step {i}] observation: {obs} action: {action}")
        lines.append(f"Step {self._turn + 1}. Current observation: {self._observation}")
        lines.append(f"Admissible actions: [{', '.join(self.admissible())}]")
        form = "<think>...</think><action>an admissible action</action>" if self.think else "<action>...</action>"
        lines.append(f"Answer with {form}.")
        return "\n".join(lines) + "\n"

    def expert_turns(self) -> list[str]:
        """The planner's walkthrough of the game (its ``game.tw-pddl`` walkthrough), one action per step."""
        import json

        if self._state is None:
            raise RuntimeError("call reset() first")
        walkthrough = json.loads(Path(self._game).read_text()).get("walkthrough") or []
        return [f"<action>{c}</action>" for c in walkthrough]

    def step(self, action_text: str) -> StepResult:
        if self._done or self._state is None:
            raise RuntimeError("the episode is over; call reset()")
        self._turn += 1
        command = extract_tag(action_text, "action")
        command = " ".join(command.lower().split()) if command is not None else None
        valid = command is not None and command in self.admissible()
        if valid:
            self._state, _, game_over = self._env.step(command)
            feedback = self._state.feedback.strip()
            won = bool(self._state["won"])
        else:
            feedback, won, game_over = "Nothing happens.", False, False
        self._history.append((self._observation, command if command is not None else action_text.strip()[:80]))
        self._observation = feedback
        info = {"won": won, "tool_call": True, "valid": valid, "task_type": self.task_type}
        if won or game_over or self._turn >= self.max_turns:
            self._done = True
            return StepResult("", self.win_reward if won else 0.0, True, {**info, "complete": valid})
        if self.per_step_prompts:
            return StepResult(self.prompt(), 0.0, False, info)
        return StepResult(
            f"<obs>{feedback} Admissible actions: [{', '.join(self.admissible())}]</obs>\n", 0.0, False, info
        )

    def close(self) -> None:
        if self._env is not None:
            try:
                with _ENGINE_LOCK:
                    self._env.close()
            except Exception:  # pragma: no cover - the engine's own cleanup
                pass
            self._env = None
            self._game = None

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def random_rollout_speed(env: AlfWorldEnv, seeds, steps: int, rng: random.Random) -> float:
    """Environment steps per second with random admissible actions (the README's measurement)."""
    import time

    done_steps, t0 = 0, time.perf_counter()
    for seed in seeds:
        env.reset(seed)
        for _ in range(steps):
            result = env.step(f"<action>{rng.choice(env.admissible())}</action>")
            done_steps += 1
            if result.done:
                break
    return done_steps / (time.perf_counter() - t0)
