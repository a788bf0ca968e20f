"""``spear compare``: per-run summaries, bootstrap intervals, method composition, and a quick end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch

from spear.cli import main
from spear.config import ConfigError, load_config, to_dict
from spear.trainer import compare


def _records(curve, tool=None, replay=None, rows=8):
    """metrics.jsonl records: evaluations at the steps of ``curve`` ({step: success}), one training record per
    step 1..T with ``rows`` on-policy rows and ``replay`` ({step: replayed rows})."""
    replay = replay or {}
    total = max(curve)
    out, events = [], 0
    for step in range(total + 1):
        r = {"step": step}
        if step:
            r.update({"train/success": 0.1 * step, "rollout_filter/rows_kept": float(rows)})
            if step in replay:
                events += 1
                r["replay/batch_size"] = float(replay[step])
            r["replay/events"] = float(events)
        if step in curve:
            r["val/success"] = curve[step]
            r["val/tool_turns"] = (tool or {}).get(step, 0.0)
        out.append(r)
    return out


def test_summarize_run_hand_computed():
    # success 0 -> .2 at step 2 -> .6 at step 4: area 2 * .1 + 2 * .4 = 1.0 over 4 steps
    records = _records({0: 0.0, 2: 0.2, 4: 0.6}, tool={4: 1.5}, replay={3: 8})
    s = compare.summarize_run(records, total_steps=4, threshold=0.5)
    assert s["auc"] == pytest.approx(0.25)
    assert s["final"] == 0.6 and s["steps_to_threshold"] == 4 and s["reached"]
    assert s["tool_turns"] == 1.5 and s["replay_events"] == 1 and s["replay_steps"] == [3]
    assert s["replay_share"] == pytest.approx(8 / (8 + 4 * 8))
    never = compare.summarize_run(_records({0: 0.0, 4: 0.4}), total_steps=4, threshold=0.5)
    assert never["steps_to_threshold"] == 4 and not never["reached"] and never["auc"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="step 0"):
        compare.summarize_run(_records({1: 0.0, 4: 0.4}), total_steps=4, threshold=0.5)
    with pytest.raises(ValueError, match="step 5"):
        compare.summarize_run(_records({0: 0.0, 4: 0.4}), total_steps=5, threshold=0.5)


def test_bootstrap_ci():
    assert compare.bootstrap_ci([0.3]) == (0.3, 0.3, 0.3)
    values = [0.1, 0.2, 0.3, 0.4, 0.9]
    mean, low, high = compare.bootstrap_ci(values)
    assert mean == pytest.approx(0.38) and min(values) <= low < mean < high <= max(values)
    assert compare.bootstrap_ci(values) == (mean, low, high)  # seeded
    # the percentile bootstrap of a mean: close to the normal interval for many seeds
    x = torch.linspace(0, 1, 200).tolist()
    _, lo, hi = compare.bootstrap_ci(x)
    half = 1.96 * torch.tensor(x).std(unbiased=False).item() / 200**0.5
    assert lo == pytest.approx(0.5 - half, abs=0.01) and hi == pytest.approx(0.5 + half, abs=0.01)
    with pytest.raises(ValueError):
        compare.bootstrap_ci([])


def test_aggregate_table_and_overlap():
    runs = {
        "grpo": {s: compare.summarize_run(_records({0: 0.0, 4: v}), 4, 0.5) for s, v in enumerate([0.1, 0.2, 0.3])},
        "spear": {s: compare.summarize_run(_records({0: 0.0, 4: v}), 4, 0.5) for s, v in enumerate([0.7, 0.8, 0.9])},
    }
    summary = compare.aggregate(runs)
    assert summary["spear"]["final"]["values"] == [0.7, 0.8, 0.9]
    assert summary["spear"]["reached"] == {"count": 3, "of": 3} and summary["grpo"]["reached"]["count"] == 0
    assert compare.non_overlapping(summary, "spear", "grpo") and not compare.non_overlapping(summary, "grpo", "spear")
    table = compare.markdown_table(summary, 0.05)
    assert "| GRPO + SPEAR | " in table and "(3/3 reached)" in table and "| SFT start | 5.0 |" in table


def test_paper_table_pairs_each_base_with_its_spear_row():
    def runs(values):
        return {s: compare.summarize_run(_records({0: 0.0, 4: v}), 4, 0.5) for s, v in enumerate(values)}

    summary = compare.aggregate(
        {"grpo": runs([0.1, 0.2, 0.3]), "grpo_spear": runs([0.3, 0.3, 0.6]), "gigpo": runs([0.5, 0.6, 0.7])}
    )
    # paired by seed: 0.2, 0.1, 0.3 -> mean 0.2
    mean, low, high = compare.paired_difference(summary, "grpo", "grpo_spear")
    assert mean == pytest.approx(0.2) and 0.1 - 1e-9 <= low < mean < high <= 0.3 + 1e-9
    table = compare.paper_table(summary)
    lines = table.splitlines()
    assert len(lines) == 4  # header, rule, GRPO, + SPEAR (GiGPO has no + SPEAR run: left out)
    assert lines[2].startswith("| GRPO | 20.0 [") and lines[3].startswith("| + SPEAR | 40.0 [")
    assert "| +20.0 [" in lines[3] and "| no |" in lines[3]  # the intervals [10, 30] and [30, 60] touch
    apart = compare.aggregate({"drbot": runs([0.1, 0.1, 0.1]), "spear": runs([0.5, 0.6, 0.7])})
    assert "| yes |" in compare.paper_table(apart).splitlines()[3]
    with pytest.raises(ValueError, match="paper"):
        compare.paper_table(compare.aggregate({"gigpo": runs([0.5])}))


def test_unseen_games_and_task_types_in_the_summary_and_tables():
    def run(final, unseen, pick, look):
        records = _records({0: 0.0, 4: final})
        records[-1].update(
            {"val_unseen/success": unseen, "val/success/pick_and_place_simple": pick}
            | {"val/success/look_at_obj_in_light": look, "val_unseen/success/look_at_obj_in_light": unseen}
        )
        return compare.summarize_run(records, 4, 0.5)

    s = run(0.5, 0.25, 0.75, 0.25)
    assert s["unseen_final"] == 0.25 and s["by_type"] == {"look_at_obj_in_light": 0.25, "pick_and_place_simple": 0.75}
    assert s["unseen_by_type"] == {"look_at_obj_in_light": 0.25}
    assert "unseen_final" not in compare.summarize_run(_records({0: 0.0, 4: 0.5}), 4, 0.5)
    summary = compare.aggregate(
        {
            "grpo": {i: run(0.1 * i, 0.05 * i, 0.2, 0.1 * i) for i in range(3)},
            "grpo_spear": {i: run(0.5 + 0.1 * i, 0.3, 0.8, 0.4) for i in range(3)},
        }
    )
    assert summary["grpo"]["unseen_final"]["values"] == pytest.approx([0.0, 0.05, 0.1])
    assert summary["grpo_spear"]["by_type"]["pick_and_place_simple"]["mean"] == pytest.approx(0.8)
    paper = compare.paper_table(summary).splitlines()
    assert "unseen games: final success (%)" in paper[0]
    assert "| 5.0 [0.0, 10.0] |" in paper[2] and "| 30.0 [30.0, 30.0] |" in paper[3]
    types = compare.task_type_table(summary).splitlines()
    assert types[0] == "| method | Pick | Look |"  # the seed's column order, not the alphabet's
    assert types[3] == "| GRPO + SPEAR (no Dr.BoT) | 80.0 [80.0, 80.0] | 40.0 [40.0, 40.0] |"
    assert compare.task_type_table(summary, "unseen_by_type").splitlines()[0] == "| method | Look |"
    methods = compare.markdown_table(summary, 0.1, 0.05)
    assert "final success, unseen games (%)" in methods and methods.splitlines()[-1].startswith(
        "| SFT start | 10.0 | 10.0 | 5.0 |"
    )
    # a method without the unseen evaluation drops the column from the shared tables
    plain = compare.summarize_run(_records({0: 0.0, 4: 0.5}), 4, 0.5)
    mixed = compare.aggregate({"grpo": {0: run(0.1, 0.1, 0.1, 0.1)}, "grpo_spear": {0: plain}})
    assert "unseen" not in compare.paper_table(mixed) and "unseen" not in compare.markdown_table(mixed, 0.1)
    assert compare.task_type_table(compare.aggregate({"grpo": {0: plain}})) == ""


def test_the_paper_methods_are_base_plus_spear():
    for _, base, plus in compare.PAPER_ROWS:
        b, p = (compare.run_config("tiny_alfworld", m, [], []) for m in (base, plus))
        assert (
            not b.actor_rollout_ref.actor.enable_trajectory_replay
            and p.actor_rollout_ref.actor.enable_trajectory_replay
        )
        assert b.algorithm.use_toolcall_reward == "none" and p.algorithm.use_toolcall_reward == "cosine"
        assert b.algorithm.adv_estimator == p.algorithm.adv_estimator
        assert b.algorithm.filter_incomplete_responses == p.algorithm.filter_incomplete_responses  # Dr.BoT or not
        assert b.actor_rollout_ref.actor.clip_ratio_high == p.actor_rollout_ref.actor.clip_ratio_high
    assert compare.run_config("tiny_math", "gigpo", [], []).algorithm.adv_estimator == "gigpo"


def test_methods_compose_a_task_with_a_method_preset():
    spear = compare.run_config("tiny_math", "spear", [], [])
    assert to_dict(spear) == to_dict(
        load_config(preset="tiny_math_spear", overrides=["trainer.default_local_dir=runs/spear"])
    )
    replay_only = compare.run_config("tiny_math", "spear_replay_only", [], [])
    tool_only = compare.run_config("tiny_math", "spear_toolreward_only", [], [])
    assert (
        replay_only.actor_rollout_ref.actor.enable_trajectory_replay
        and replay_only.algorithm.use_toolcall_reward == "none"
    )
    assert not tool_only.actor_rollout_ref.actor.enable_trajectory_replay
    assert tool_only.algorithm.use_toolcall_reward == spear.algorithm.use_toolcall_reward == "cosine"
    for cfg in (replay_only, tool_only):  # one switch off, the rest of SPEAR unchanged
        assert cfg.actor_rollout_ref.actor.policy_loss == spear.actor_rollout_ref.actor.policy_loss
        assert cfg.env == spear.env
    # the task preset comes after the method: tiny_math_hard sizes SPEAR's buffer for its batch
    hard = compare.run_config(compare.DEFAULT_TASK, "spear", [], [])
    assert (hard.actor_rollout_ref.actor.trajectory_buffer_size, hard.sft.direct_steps) == (8, 20)
    assert compare.run_config(compare.DEFAULT_TASK, "grpo", [], []).algorithm.use_toolcall_reward == "none"
    with pytest.raises(ConfigError, match="unknown method"):
        compare.run_config("tiny_math", "ppo", [], [])


def test_compare_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown task preset"):
        compare.run_compare(task="nope", output=tmp_path)
    with pytest.raises(ConfigError, match="distinct"):
        compare.run_compare(task="tiny_math", seeds=[1, 1], output=tmp_path)
    with pytest.raises(ConfigError, match="jobs"):
        compare.run_compare(task="tiny_math", jobs=0, output=tmp_path)


TINY = [
    "sft.steps=30",
    "sft.num_examples=200",
    "env.num_eval_tasks=8",
    "trainer.test_freq=2",
    "trainer.save_freq=2",
    "data.train_batch_size=2",
    "actor_rollout_ref.rollout.n=4",
    "actor_rollout_ref.actor.ppo_mini_batch_size=8",
    "actor_rollout_ref.actor.trajectory_buffer_size=1",
]


def test_compare_quick_runs_writes_its_outputs_and_resumes(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = [
        "compare",
        "--quick",
        "--task",
        "tiny_math",
        "--methods",
        "grpo",
        "spear",
        "--steps",
        "2",
        "--quiet",
        "--output",
        str(out),
        *TINY,
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| GRPO | " in table and "| GRPO + SPEAR | " in table
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1] and set(results["runs"]) == {"grpo", "spear"}
    for method in ("grpo", "spear"):
        for seed in ("0", "1"):
            run = results["runs"][method][seed]
            assert run["curve"]["step"] == [0, 2] and 0 <= run["auc"] <= 1
        assert len(results["summary"][method]["auc"]["values"]) == 2
    assert (out / "curves.png").stat().st_size > 10_000 and (out / "results.md").read_text().count("|") > 20
    # the runs trained with their seeds, in their own directories, from the shared SFT model
    cfg = json.loads((out / "spear_seed1" / "config.json").read_text())
    assert cfg["trainer"]["seed"] == 1 and cfg["actor_rollout_ref"]["model"]["path"] == str((out / "sft").resolve())
    # a second call reads the finished runs back: nothing retrains
    logs = {p: p.stat().st_mtime_ns for p in out.glob("*_seed*/metrics.jsonl")}
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*_seed*/metrics.jsonl")} == logs
    assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]


ALFWORLD_TINY = [
    "sft.steps=6",
    "sft.num_examples=8",
    "sft.batch_size=8",
    "env.num_train_tasks=3",
    "env.num_eval_tasks=3",
    "env.unseen_eval_tasks=3",
    "trainer.test_freq=1",
    "trainer.save_freq=1",
    "data.train_batch_size=2",  # Dr.BoT's rollout filter keeps int(0.75 x 2) = 1 group
    "actor_rollout_ref.rollout.n=2",
    "actor_rollout_ref.rollout.max_turns=3",
    "actor_rollout_ref.actor.ppo_mini_batch_size=8",
    "actor_rollout_ref.actor.trajectory_buffer_size=1",
]


def test_the_paper_table_on_alfworld_smoke(tmp_path, capsys):
    """`spear compare --table paper` on tiny_alfworld, shrunk: the eight methods on one seed (seed 1: not the
    default's first), one step each, the seen and the unseen evaluation, the per-task-type tables."""
    pytest.importorskip("alfworld", reason="the alfworld extra is not installed (pip install 'spear-core[alfworld]')")
    out = tmp_path / "paper"
    argv = ["compare", "--table", "paper", "--task", "tiny_alfworld", "--seeds", "1", "--steps", "1"]
    assert main([*argv, "--quiet", "--output", str(out), *ALFWORLD_TINY]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("| method | final success (%) | + SPEAR: difference (%) | intervals apart |")
    assert "unseen games: final success (%)" in printed[0]
    assert printed[10] == "" and printed[11] == "Final success per task type (%):"
    assert [line.split("|")[1].strip() for line in printed[2:10]] == [
        name for row, _, _ in compare.PAPER_ROWS for name in (row, "+ SPEAR")
    ]
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == set(compare.PAPER_METHODS) and results["seeds"] == [1]
    for method in compare.PAPER_METHODS:
        run = results["runs"][method]["1"]
        assert run["curve"]["step"] == [0, 1] and 0 <= run["unseen_final"] <= 1
        # the task types of the games played (3 seen, 3 unseen) are reported, and only those
        assert set(run["by_type"]) <= set(compare.TASK_TYPE_NAMES) and run["by_type"]
        assert set(run["unseen_by_type"]) <= set(compare.TASK_TYPE_NAMES) and run["unseen_by_type"]
        cfg = json.loads((out / f"{method}_seed1" / "config.json").read_text())
        assert cfg["env"]["unseen_kwargs"] == {"split": "valid_unseen"} and cfg["trainer"]["seed"] == 1
    paper = (out / "results_paper.md").read_text()
    assert "unseen games" in paper and "Final success per task type (%)" in paper
    assert "Final success per task type on the unseen games (%)" in paper and "| SFT start |" in paper
    assert "val_unseen/success" in results["sft"]
