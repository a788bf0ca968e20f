"""ALFWorld games generated here, in ALFWorld's own format, from the package's own domain, grammar, goal library and
affordance tables (no download): one folder per game with ``game.tw-pddl`` (the domain, the grammar with the task
sentence, the PDDL problem, ``solvable`` and the planner's walkthrough) and ``traj_data.json`` (``task_type`` and
``pddl_params``, what ALFWorld's environment and handcoded expert read).

A game is drawn from its seed: a task type (one of the six), a room (kitchen, living room, bedroom, bathroom) that
has the receptacles the task needs, ``nb_receptacles`` receptacles in it, the target object(s) placed where they may
be, ``nb_distractors`` other objects, and the agent somewhere else. Object and location names follow ALFRED's
mangling (``Apple|+01.59|+00.97|-01.29`` -> ``Apple_bar__plus_01_dot_59...``), which ALFWorld's demangler turns
into "apple 1". Splits: ``train`` and ``valid_seen`` share the rooms' layouts and object sets; ``valid_unseen`` games
use layouts (receptacle instance counts and orders) and target-object / receptacle pairs never drawn for training.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

TASK_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
SPLITS = ("train", "valid_seen", "valid_unseen")
GAMES_VERSION = 2  # bumped whenever a seed would draw another game (2: the unseen pairs are object / receptacle)

# the receptacles of each kind of room (ALFRED's scene types), and how many instances each may have
ROOMS = {
    "kitchen": {
        "CounterTop": 2,
        "Cabinet": 4,
        "Drawer": 3,
        "Fridge": 1,
        "Microwave": 1,
        "SinkBasin": 1,
        "StoveBurner": 2,
        "DiningTable": 1,
        "GarbageCan": 1,
        "CoffeeMachine": 1,
        "Toaster": 1,
        "Shelf": 2,
    },
    "livingroom": {
        "Sofa": 1,
        "ArmChair": 2,
        "CoffeeTable": 1,
        "SideTable": 2,
        "TVStand": 1,
        "Shelf": 3,
        "Drawer": 3,
        "Cabinet": 2,
        "Dresser": 1,
        "GarbageCan": 1,
    },
    "bedroom": {
        "Bed": 1,
        "Desk": 1,
        "Dresser": 1,
        "SideTable": 2,
        "Drawer": 4,
        "Shelf": 3,
        "GarbageCan": 1,
        "LaundryHamper": 1,
        "ArmChair": 1,
    },
    "bathroom": {
        "Toilet": 1,
        "SinkBasin": 2,
        "BathtubBasin": 1,
        "Cabinet": 4,
        "CounterTop": 1,
        "TowelHolder": 1,
        "HandTowelHolder": 1,
        "ToiletPaperHanger": 1,
        "GarbageCan": 1,
        "Drawer": 2,
    },
}
# what each task needs in the room: a receptacle type that does the state change, or a lamp
TASK_NEEDS = {
    "pick_clean_then_place_in_recep": "SinkBasin",
    "pick_heat_then_place_in_recep": "Microwave",
    "pick_cool_then_place_in_recep": "Fridge",
    "look_at_obj_in_light": "DeskLamp",
}
LAMP_HOLDERS = ("Desk", "SideTable", "Dresser")  # lamps are in no receptacle's "may hold" list
MOVABLE = {"Bowl", "Box", "Cup", "Mug", "Pan", "Plate", "Pot"}  # movable receptacles: left out (as ALFWorld does)


@dataclass(frozen=True)
class GameSpec:
    """What a game is drawn from: its seed, split and size."""

    seed: int
    split: str = "train"
    nb_receptacles: int = 6
    nb_distractors: int = 4
    task_types: tuple[str, ...] = TASK_TYPES

    def key(self) -> str:
        types = "all" if self.task_types == TASK_TYPES else "-".join(sorted(t[:9] for t in self.task_types))
        return f"r{self.nb_receptacles}-d{self.nb_distractors}-{types}"


def _tables():
    import alfworld.gen.constants as constants

    holds = {r: set(v) - MOVABLE for r, v in constants.VAL_RECEPTACLE_OBJECTS.items() if r not in MOVABLE}
    actions = {k: set(v) for k, v in constants.VAL_ACTION_OBJECTS.items()}
    return holds, actions, set(constants.OPENABLE_CLASS_LIST)


def _mangle(name: str) -> str:
    """ALFRED's id -> PDDL name (PlannedGameState.fix_pddl_str_chars)."""
    for a, b in (("-", "_minus_"), ("|", "_bar_"), ("+", "_plus_"), (".", "_dot_"), (",", "_comma_")):
        name = name.replace(a, b)
    return name


def _coord(rng: random.Random) -> str:
    return f"{rng.uniform(-3, 3):+06.2f}"


def _instance_id(kind: str, rng: random.Random) -> str:
    coords = f"{_coord(rng)}|{_coord(rng)}|{_coord(rng)}"
    if kind.endswith("Basin"):  # ALFRED names a basin after its fixture: Sink|x|y|z|SinkBasin -> "sinkbasin 1"
        return _mangle(f"{kind[: -len('Basin')]}|{coords}|{kind}")
    return _mangle(f"{kind}|{coords}")


def draw_game(spec: GameSpec) -> dict:
    """The problem of one game: ``{"task_type", "pddl_params", "problem"}`` (PDDL text)."""
    holds, actions, openable = _tables()
    rng = random.Random(f"alfworld:{spec.split}:{spec.key()}:{spec.seed}")
    unseen = spec.split == "valid_unseen"
    for _attempt in range(200):
        task = rng.choice(spec.task_types)
        need = TASK_NEEDS.get(task)
        rooms = [
            name
            for name, recs in ROOMS.items()
            if need is None or need in recs or (need == "DeskLamp" and any(h in recs for h in LAMP_HOLDERS))
        ]
        room = rng.choice(rooms)
        kinds = ROOMS[room]
        # the task's object: pickupable (some receptacle of the room may hold it), and able to change as asked
        candidates = sorted({o for r in kinds for o in holds.get(r, ())})
        if task == "pick_clean_then_place_in_recep":
            candidates = [o for o in candidates if o in actions["Cleanable"]]
        elif task == "pick_heat_then_place_in_recep":
            candidates = [o for o in candidates if o in actions["Heatable"]]
        elif task == "pick_cool_then_place_in_recep":
            candidates = [o for o in candidates if o in actions["Coolable"]]
        candidates = [o for o in candidates if "Sliced" not in o and o not in actions["Toggleable"]]
        if not candidates:
            continue
        obj = rng.choice(candidates)
        targets = [r for r in kinds if obj in holds.get(r, ()) and r != need]
        if task == "look_at_obj_in_light":
            targets = [None]
        if not targets:
            continue
        recep = rng.choice(targets)
        # the unseen split: object / receptacle pairs (by a hash) that training never draws, and other layouts
        pair_hash = int(hashlib.sha256(f"{obj}:{recep}".encode()).hexdigest(), 16) % 4
        if (pair_hash == 0) != unseen:
            continue
        # the receptacles: the ones the task needs, then others of the room, up to nb_receptacles
        wanted = [k for k in (recep, need) if k is not None and k in kinds]
        lamp_holder = None
        if task == "look_at_obj_in_light":
            lamp_holder = rng.choice([h for h in LAMP_HOLDERS if h in kinds])
            wanted.append(lamp_holder)
        sources = [r for r in kinds if obj in holds.get(r, ()) and r not in (recep, need)]
        if not sources:
            continue
        wanted.append(rng.choice(sources))
        pool = [k for k in kinds for _ in range(kinds[k])]
        rng.shuffle(pool)
        layout = list(dict.fromkeys(wanted))
        for k in pool:
            if len(layout) >= max(spec.nb_receptacles, len(set(wanted))):
                break
            layout.append(k)
        if unseen:  # another order of instances: the same kinds, laid out differently
            rng.shuffle(layout)
        else:
            layout.sort(key=lambda k: (list(kinds).index(k), rng.random()))
        return _problem(spec, rng, task, obj, recep, need, lamp_holder, layout, holds, actions, openable)
    raise RuntimeError(f"could not draw a game for {spec}")


def _problem(spec, rng, task, obj, recep, need, lamp_holder, layout, holds, actions, openable) -> dict:
    receptacles = [(kind, _instance_id(kind, rng)) for kind in layout]
    locations = {
        rid: _mangle(f"loc|{rng.randint(-9, 9)}|{rng.randint(-9, 9)}|{rng.randint(0, 3)}|{30 * rng.randint(0, 2)}")
        for _, rid in receptacles
    }
    agent_loc = _mangle(f"loc|{rng.randint(10, 19)}|{rng.randint(10, 19)}|{rng.randint(0, 3)}|30")
    while len(set(locations.values())) < len(locations):  # one location per receptacle
        locations = {
            rid: _mangle(f"loc|{rng.randint(-30, 30)}|{rng.randint(-30, 30)}|{rng.randint(0, 3)}|0")
            for _, rid in receptacles
        }
    objects: list[tuple[str, str, str]] = []  # (kind, id, receptacle id)

    def place(kind: str, avoid: tuple = ()) -> None:
        spots = [rid for k, rid in receptacles if kind in holds.get(k, ()) and k not in avoid]
        objects.append((kind, _instance_id(kind, rng), rng.choice(spots)))

    count = 2 if task == "pick_two_obj_and_place" else 1
    for _ in range(count + rng.randint(0, 1)):
        place(obj, avoid=(recep, need) if recep else (need,))
    if task == "look_at_obj_in_light":
        holder = next(rid for k, rid in receptacles if k == lamp_holder)
        objects.append(("DeskLamp", _instance_id("DeskLamp", rng), holder))
    placeable = sorted({o for k, _ in receptacles for o in holds.get(k, ())} - {obj} - actions["Toggleable"])
    placeable = [o for o in placeable if "Sliced" not in o]
    for _ in range(spec.nb_distractors):
        if placeable:
            place(rng.choice(placeable))
    kinds_r = sorted({k for k, _ in receptacles})
    kinds_o = sorted({k for k, _, _ in objects})
    lines = ["(define (problem plan_spear)", "(:domain alfred)", "(:objects", "agent1 - agent"]
    lines += [f"{k}Type - otype" for k in kinds_o] + [f"{k}Type - rtype" for k in kinds_r]
    lines += [f"{oid} - object" for _, oid, _ in objects] + [f"{rid} - receptacle" for _, rid in receptacles]
    lines += [f"{loc} - location" for loc in sorted(set(locations.values()) | {agent_loc})] + [")", "(:init"]
    for kind, rid in receptacles:
        lines.append(f"(receptacleType {rid} {kind}Type)")
        lines.append(f"(receptacleAtLocation {rid} {locations[rid]})")
        if kind in openable:
            lines.append(f"(openable {rid})")
    for kind, oid, rid in objects:
        lines += [f"(objectType {oid} {kind}Type)", f"(inReceptacle {oid} {rid})"]
        lines.append(f"(objectAtLocation {oid} {locations[rid]})")
        if kind in actions["Toggleable"]:
            lines.append(f"(toggleable {oid})")
        else:
            lines.append(f"(pickupable {oid})")
        for prop, table in (("cleanable", "Cleanable"), ("heatable", "Heatable"), ("coolable", "Coolable")):
            if kind in actions[table]:
                lines.append(f"({prop} {oid})")
    for kr in kinds_r:
        for ko in kinds_o:
            if ko in holds.get(kr, ()):
                lines.append(f"(canContain {kr}Type {ko}Type)")
    lines += [f"(atLocation agent1 {agent_loc})", ")"]
    import alfworld.gen.goal_library as glib

    goal = glib.gdict[task]["pddl"].format(obj=obj, recep=recep or "", toggle="DeskLamp", mrecep="")
    problem = "\n".join(lines) + "\n" + _mangle_goal(goal)
    params = {
        "object_target": obj,
        "parent_target": recep or "",
        "toggle_target": "DeskLamp" if task == "look_at_obj_in_light" else "",
        "mrecep_target": "",
        "object_sliced": False,
    }
    return {"task_type": task, "pddl_params": params, "problem": problem}


def _mangle_goal(goal: str) -> str:
    return goal.replace("#", "-")


# ---- writing games: cached atomically, with an integrity check ------------------------------------------------


def _domain_and_grammar() -> tuple[str, str]:
    import alfworld

    data = Path(alfworld.__file__).parent / "data"
    return (data / "alfred.pddl").read_text(), (data / "alfred.twl2").read_text()


def solve(game_file: Path) -> list[str] | None:
    """The planner's walkthrough of a game (ALFWorld's ``AlfredExpert`` with the planner), or None if unsolvable."""
    from .alfworld import engine_guard, open_game  # one engine at a time (the planner swaps sys.argv / sys.stdout)

    env = open_game(game_file, planner=True)
    try:
        with engine_guard():
            state = env.reset()
        plan = list(state.get("extra.expert_plan") or state.get("policy_commands") or [])
    except Exception:  # an unsolvable problem: the planner raises
        return None
    finally:
        env.close()
    return plan or None


def write_game(spec: GameSpec, root: Path) -> Path:
    """Generates (or reuses) the game of ``spec`` under ``root``; returns its folder. Written to a temporary folder
    and renamed into place, with ``spear_game.json`` (the spec and the files' hashes) last: a folder whose hashes
    do not match is regenerated."""
    folder = root / f"v{GAMES_VERSION}" / spec.split / spec.key() / f"game_{spec.seed:06d}"
    if game_is_intact(folder):
        return folder
    from .._files import file_lock

    folder.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(folder.parent / f"{folder.name}.lock"):  # another process may be writing the same game
        if not game_is_intact(folder):
            _generate(spec, folder)
    return folder


def _generate(spec: GameSpec, folder: Path) -> None:
    from .._files import remove_orphaned_temporaries, temporary_name

    remove_orphaned_temporaries(folder.parent, f"{folder.name}.tmp*")
    drawn = draw_game(spec)
    domain, grammar = _domain_and_grammar()
    from alfworld.agents.utils.misc import get_templated_task_desc

    traj = {"task_type": drawn["task_type"], "pddl_params": drawn["pddl_params"]}
    state = random.getstate()
    random.seed(f"alfworld-task:{spec.seed}")  # ALFWorld picks the task sentence with the global random
    try:
        task_sentence = get_templated_task_desc(traj)
    finally:
        random.setstate(state)
    tmp = folder.with_name(temporary_name(folder.name))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    game = {
        "pddl_domain": domain,
        "grammar": grammar.replace("UNKNOWN GOAL", task_sentence),
        "pddl_problem": drawn["problem"],
        "solvable": None,
        "walkthrough": None,
    }
    (tmp / "traj_data.json").write_text(json.dumps({**traj, "task_desc": task_sentence}, indent=1))
    (tmp / "game.tw-pddl").write_text(json.dumps(game))
    walkthrough = solve(tmp / "game.tw-pddl")
    game["solvable"], game["walkthrough"] = walkthrough is not None, walkthrough
    (tmp / "game.tw-pddl").write_text(json.dumps(game))
    (tmp / "spear_game.json").write_text(json.dumps({"spec": spec.__dict__, "hashes": _hashes(tmp)}, default=list))
    if folder.exists():  # a damaged game (its hashes do not match): replaced under the lock
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def _hashes(folder: Path) -> dict[str, str]:
    return {
        name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in ("game.tw-pddl", "traj_data.json")
    }


def game_is_intact(folder: Path) -> bool:
    try:
        meta = json.loads((folder / "spear_game.json").read_text())
        return meta["hashes"] == _hashes(folder)
    except (OSError, ValueError, KeyError):
        return False
