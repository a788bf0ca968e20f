"""ALFWorld on its own engine: generated games in ALFWorld's format that the engine loads and the planner's
walkthrough wins (every task type), the splits' promise (unseen pairs never drawn for training), the integrity of
the cache, the memoised grammar's byte-identical output, the step protocol in both layouts, and ALFWorld's own
downloaded-data layout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("alfworld", reason="the alfworld extra is not installed (pip install 'spear-core[alfworld]')")

from spear.envs import make_env  # noqa: E402
from spear.envs.alfworld import AlfWorldEnv, downloaded_games  # noqa: E402
from spear.envs.alfworld_games import TASK_TYPES, GameSpec, draw_game, game_is_intact, write_game  # noqa: E402

SMALL = {"nb_receptacles": 4, "nb_distractors": 2}


@pytest.fixture(scope="module")
def cache(private_cache):
    return private_cache


@pytest.mark.parametrize("task", TASK_TYPES)
def test_the_walkthrough_wins_a_generated_game_of_every_task_type(cache, task):
    env = make_env("alfworld", max_turns=30, task_types=[task], **SMALL)
    prompt = env.reset(3)
    assert env.task_type == task and "Your task is to:" in prompt and "Admissible actions: [" in prompt
    turns = env.expert_turns()
    assert turns, "the planner found no walkthrough"
    taken = 0
    for turn in turns:
        result, taken = env.step(turn), taken + 1
        assert result.info["valid"], (turn, env.admissible())
        if result.done:
            break
    assert result.done and result.info["won"] and result.reward == env.win_reward and taken == len(turns)
    env.close()


def test_unseen_pairs_are_never_drawn_for_training():
    def pairs(split):
        out = set()
        for seed in range(120):
            params = draw_game(GameSpec(seed, split, **SMALL))["pddl_params"]
            out.add((params["object_target"], params["parent_target"]))
        return out

    train, unseen = pairs("train"), pairs("valid_unseen")
    assert len(train) > 20 and len(unseen) > 5
    assert not train & unseen
    assert draw_game(GameSpec(5, "train", **SMALL)) == draw_game(GameSpec(5, "train", **SMALL))


def test_a_damaged_game_is_regenerated(cache):
    folder = write_game(GameSpec(1, "train", **SMALL), cache / "alfworld")
    original = (folder / "game.tw-pddl").read_bytes()
    assert game_is_intact(folder)
    (folder / "game.tw-pddl").write_bytes(original[: len(original) // 2])  # a write cut short
    assert not game_is_intact(folder)
    again = write_game(GameSpec(1, "train", **SMALL), cache / "alfworld")
    assert again == folder and (folder / "game.tw-pddl").read_bytes() == original


CONCURRENT = r"""
import json, sys
from pathlib import Path
from spear.envs.alfworld_games import GameSpec, write_game
for seed in range(6):
    folder = write_game(GameSpec(seed, "valid_unseen", 3, 1), Path(sys.argv[1]))
    json.loads((folder / "traj_data.json").read_text())  # what the environment reads right after
    json.loads((folder / "game.tw-pddl").read_text())
    assert folder.parent.parent.parent.parent == Path(sys.argv[1])  # the planner's sys.argv is put back
"""


def test_processes_generating_the_same_games_at_once(tmp_path):
    # `spear compare` starts runs together that generate the same unseen games: one writer per game (a lock), and
    # a game another process finished is never replaced under a reader
    procs = [
        subprocess.Popen([sys.executable, "-c", CONCURRENT, str(tmp_path)], stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    games = sorted(tmp_path.glob("v*/valid_unseen/*/game_*[0-9]"))
    assert len(games) == 6 and all(game_is_intact(g) for g in games)


WALK = r"""
import json, random, sys
import spear.envs.alfworld as alf
if sys.argv[1] == "stock":
    alf._MEMOISED = True  # leave TextWorld's own parsing in place
env = alf.AlfWorldEnv(max_turns=40, nb_receptacles=4, nb_distractors=2)
rng, out = random.Random(0), []
for seed in (0, 1):
    out.append(env.reset(seed))
    for _ in range(25):
        r = env.step("<action>" + rng.choice(env.admissible()) + "</action>")
        out.append(r.observation)
        if r.done:
            break
print(json.dumps(out))
"""


def test_memoised_grammar_output_is_byte_identical(cache):
    runs = {
        mode: subprocess.run(
            [sys.executable, "-c", WALK, mode], capture_output=True, text=True, timeout=300, env=dict(os.environ)
        )
        for mode in ("stock", "memoised")
    }
    for mode, run in runs.items():
        assert run.returncode == 0, (mode, run.stderr[-2000:])
    stock, memo = (json.loads(runs[m].stdout.strip().splitlines()[-1]) for m in ("stock", "memoised"))
    assert len(stock) > 20 and stock == memo


def test_invalid_actions_turn_limit_and_the_history_window(cache):
    env = AlfWorldEnv(max_turns=4, history_length=2, **SMALL)
    env.reset(2)
    bad = env.step("<action>fly to the moon</action>")
    assert not bad.done and not bad.info["valid"] and "Nothing happens." in bad.observation
    untagged = env.step("go somewhere")
    assert not untagged.info["valid"]
    third = env.step(f"<action>{env.admissible()[0]}</action>")
    assert third.info["valid"] and "[step 1]" not in third.observation and "[step 2]" in third.observation
    assert "[step 3]" in third.observation  # the last two steps only
    last = env.step("<action>look</action>")
    assert last.done and last.reward == 0.0 and not last.info["won"]
    with pytest.raises(RuntimeError):
        env.step("<action>look</action>")


def test_whole_trajectory_layout_answers_with_obs(cache):
    env = AlfWorldEnv(max_turns=5, per_step_prompts=False, **SMALL)
    env.reset(2)
    out = env.step(f"<action>{env.admissible()[0]}</action>")
    assert out.observation.startswith("<obs>") and out.observation.endswith("</obs>\n")
    assert "Admissible actions: [" in out.observation and "Your task is to" not in out.observation


def test_alfworlds_downloaded_layout(cache, tmp_path):
    root = tmp_path / "data" / "json_2.1.1" / "train"
    for i, name in enumerate(("pick_and_place_simple-A-None-B-1/trial_1", "movable_x/trial_1", "Sliced_y/trial_1")):
        src = write_game(GameSpec(i, "train", **SMALL), cache / "alfworld")
        dst = root / name
        dst.mkdir(parents=True)
        shutil.copy(src / "game.tw-pddl", dst / "game.tw-pddl")
        shutil.copy(src / "traj_data.json", dst / "traj_data.json")
    unsolvable = root / "pick_and_place_simple-C-None-D-2/trial_1"
    unsolvable.mkdir(parents=True)
    game = json.loads((root / "pick_and_place_simple-A-None-B-1/trial_1/game.tw-pddl").read_text())
    (unsolvable / "game.tw-pddl").write_text(json.dumps({**game, "solvable": False}))
    (unsolvable / "traj_data.json").write_text("{}")
    found = downloaded_games(tmp_path / "data", "train")
    assert [p.parent.parent.name for p in found] == ["pick_and_place_simple-A-None-B-1"]
    env = AlfWorldEnv(data_path=str(tmp_path / "data"), max_turns=20)
    env.reset(7)
    assert env.game_file(7) == found[0]
    for turn in env.expert_turns():
        result = env.step(turn)
    assert result.done and result.info["won"]
    with pytest.raises(FileNotFoundError, match="alfworld-download"):
        AlfWorldEnv(data_path=str(tmp_path / "nothing")).reset(0)


def test_an_empty_alfworld_data_variable_means_generated_games(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path))  # what importing alfworld sets, with nothing downloaded
    env = AlfWorldEnv(**SMALL)
    assert env.data_path is None and Path(env.game_file(0)).is_relative_to(cache)


@pytest.mark.parametrize(
    "kwargs",
    [{"split": "test"}, {"task_types": ["fly"]}, {"nb_receptacles": 1}, {"max_turns": 0}, {"history_length": -1}],
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        AlfWorldEnv(**kwargs)
