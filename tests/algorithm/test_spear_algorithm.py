"""The algorithm pieces: schedules, rewards, filters, advantages, losses, replay buffer (verl parity: tests/verl)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from spear import advantages, filters, losses, rewards, schedules
from spear.config import load_config
from spear.replay import TrajectoryReplayBuffer

# ---- schedules -----------------------------------------------------------------------------------


def test_toolcall_reward_factor_at_1_half_end_and_after():
    cos = [schedules.toolcall_reward_factor(t, "cosine", 100) for t in (1, 50, 100, 101)]
    assert cos[0] == pytest.approx((math.cos(math.pi / 100) + 1) / 2) and cos[0] > 0.9997
    assert cos[1:] == [pytest.approx(0.5), pytest.approx(0.0, abs=1e-12), 0.0]
    assert [schedules.toolcall_reward_factor(t, "constant", 100) for t in (1, 50, 100, 101)] == [1.0] * 4
    assert [schedules.toolcall_reward_factor(t, "none", 100) for t in (1, 50, 100, 101)] == [0.0] * 4
    with pytest.raises(ValueError, match="use_toolcall_reward"):
        schedules.toolcall_reward_factor(1, "linear", 100)


def test_replay_loss_weight_at_1_half_end_and_after():
    w = [schedules.replay_loss_weight(t, 2.0, 200) for t in (1, 100, 200, 201)]
    assert w[0] == pytest.approx(1 - math.cos(math.pi / 200)) and w[0] < 1.3e-4
    assert w[1:] == [pytest.approx(1.0), 2.0, 2.0]
    assert schedules.replay_loss_weight(5, 0.7, 0) == 0.7


@settings(max_examples=50, deadline=None)
@given(t=st.integers(1, 400), big_t=st.integers(1, 300))
def test_schedules_are_monotone_and_bounded(t, big_t):
    f0, f1 = (schedules.toolcall_reward_factor(x, "cosine", big_t) for x in (t, t + 1))
    assert 0.0 <= f1 <= f0 <= 1.0
    w0, w1 = (schedules.replay_loss_weight(x, 1.0, big_t) for x in (t, t + 1))
    assert 0.0 <= w0 <= w1 <= 1.0


# ---- rewards and filters -------------------------------------------------------------------------


def test_toolcall_bonus():
    assert_close(
        "per_turn",
        rewards.toolcall_bonus([0, 1, 3, 10, 25], 0.5),
        torch.tensor([0, 0.05, 0.15, 0.5, 0.5]),
        atol=1e-7,
        rtol=0,
    )
    # the reference's _qwen3 reward: the full factor for a successful trajectory that used the tool, the per-turn
    # bonus otherwise (failures, and successes without a tool call)
    assert_close(
        "success",
        rewards.toolcall_bonus([0, 1, 7, 2, 0], 0.5, variant="success", success=[True, True, False, False, False]),
        torch.tensor([0, 0.5, 0.35, 0.1, 0]),
        atol=1e-7,
        rtol=0,
    )
    with pytest.raises(ValueError, match="needs each trajectory's success"):
        rewards.toolcall_bonus([1], 0.5, variant="success")
    with pytest.raises(ValueError, match="'per_turn' or 'success'"):
        rewards.toolcall_bonus([1], 0.5, variant="any")
    with pytest.raises(ValueError):
        rewards.toolcall_bonus([-1], 1.0)
    token_rewards = torch.zeros(3, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    out = rewards.add_to_last_token(token_rewards, mask, torch.tensor([1.0, 2.0, 3.0]))
    assert out.tolist() == [[0, 1, 0, 0], [0, 0, 0, 2], [0, 0, 0, 0]] and token_rewards.sum() == 0


def test_response_filters():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert filters.overlong(mask, 4).tolist() == [True, False]
    loop = list(range(20)) * 10  # one 20-gram, 10 times
    assert filters.repetitive([loop, loop[:-1], list(range(300))]).tolist() == [True, False, False]
    assert filters.repetitive([[7] * 29], torch.ones(1, 29)).tolist() == [True]  # 29 tokens: ten 20-grams of 7s
    assert filters.repetitive([[7] * 28]).tolist() == [False]
    texts = ["fine", "bad \ufffd byte", "mojibake \u00ef\u00bf\u00bd", "twice \u00c3\u00af\u00c2\u00bf\u00c2\u00bd"]
    assert filters.unreadable(texts).tolist() == [False, True, True, True]
    new_mask, counts = filters.apply_response_filters(mask.float(), {"overlong": torch.tensor([True, False])})
    assert new_mask.tolist() == [[0, 0, 0, 0], [1, 1, 0, 0]] and counts == {"filter/overlong": 1, "filter/any": 1}


def test_rollout_std_filter():
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 5.0, 2.0, 2.0])
    ids = ["a", "a", "b", "b", "c", "c", "d", "d"]  # stds: a 0, b .707, c 3.54, d 0
    keep, stats = filters.rollout_std_filter(scores, ids, 0.5)
    assert keep.tolist() == [False, False, True, True, True, True, False, False]
    assert stats["rollout_filter/groups_kept"] == 2
    assert stats["rollout_filter/std_after"] > stats["rollout_filter/std_before"]
    keep, _ = filters.rollout_std_filter(scores, ids, 1.0)
    assert bool(keep.all())


# ---- advantages ----------------------------------------------------------------------------------


def test_gigpo_hand_computed():
    # one prompt group, two trajectories: A sees o1 then o2 and wins at the end; B sees o1 then o3 and fails
    adv = advantages.gigpo_advantages(
        torch.tensor([0.0, 1.0, 0.0, 0.0]),
        ["g", "g", "g", "g"],
        ["A", "A", "B", "B"],
        torch.tensor([0, 1, 0, 1]),
        ["o1", "o2", "o1", "o3"],
        gamma=0.5,
        step_advantage_w=1.0,
        mode="mean_norm",
    )
    # episode: A 1, B 0 -> +-0.5; steps: returns A (0.5, 1), B (0, 0); anchor o1 groups A0 and B0 -> +-0.25
    assert_close("gigpo", adv, torch.tensor([0.75, 0.5, -0.75, -0.5]), atol=1e-6, rtol=0)
    assert_close(
        "returns",
        advantages.discounted_returns(torch.tensor([1.0, 1.0, 1.0]), ["x"] * 3, torch.tensor([2, 0, 1]), 0.5),
        torch.tensor([1.0, 1.75, 1.5]),
        atol=1e-6,
        rtol=0,
    )


# ---- losses against verl -------------------------------------------------------------------------


def test_actor_loss_combines_terms():
    cfg = load_config(
        overrides=[
            "actor_rollout_ref.actor.entropy_coeff=0.5",
            "actor_rollout_ref.actor.use_kl_loss=true",
            "actor_rollout_ref.actor.kl_loss_coef=0.25",
            "actor_rollout_ref.actor.kl_loss_type=mse",
            "actor_rollout_ref.actor.loss_agg_mode=token-mean",
        ]
    )
    a = cfg.actor_rollout_ref.actor
    g = torch.Generator().manual_seed(3)
    logp = torch.randn(3, 5, generator=g) - 1
    old, ref = logp + 0.1, logp - 0.2
    adv, mask, ent = torch.randn(3, 5, generator=g), torch.ones(3, 5), torch.rand(3, 5, generator=g)
    total, metrics = losses.actor_loss(logp, ent, old, adv, mask, a, ref_log_prob=ref)
    pg, _ = losses.compute_policy_loss(logp, old, adv, mask, a)
    expected = pg - 0.5 * ent.mean() + 0.25 * (0.5 * 0.2**2)
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert {"pg_loss", "entropy", "kl_loss", "pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"} <= metrics.keys()
    _, replay_metrics = losses.actor_loss(logp, ent, old, adv, mask, a, ref_log_prob=ref, replay=True)
    assert "pg_loss_replay" in replay_metrics and "pg_clipfrac_replay" in replay_metrics
    with pytest.raises(ValueError, match="reference"):
        losses.actor_loss(logp, ent, old, adv, mask, a)


# ---- replay buffer -------------------------------------------------------------------------------


def _step_batch(step, rewards_list, groups, length=6):
    """A step's trajectories: per-row tensors tagged with the step, Dr.GRPO advantages (R - group mean)."""
    r = torch.tensor(rewards_list, dtype=torch.float32)
    adv = advantages.grpo_advantages(r[:, None], torch.ones(len(r), 1), groups, norm_adv_by_std_in_grpo=False)[:, 0]
    b = len(r)
    tensors = {
        "input_ids": torch.arange(b * length).view(b, length) + 1000 * step,
        "old_log_probs": torch.full((b, length), -float(step)),
    }
    return tensors, r, adv, groups, torch.ones(b, length)


# step: (rewards, groups); groups of four; the trainer's order is drop_stale, sample, (updates), add
SCENARIO = {
    1: ([1, 1, 0, 0, 2, 0, 0, 0], ["a"] * 4 + ["b"] * 4),
    2: ([3, 3, 0, 0, 0, 0, 0, 0], ["c"] * 4 + ["d"] * 4),
    3: ([5, 4, 0, 0, 6, 1, 0, 1], ["e"] * 4 + ["f"] * 4),
    4: ([7, 7, 7, 0, 0, 0, 0, 0], ["g"] * 4 + ["h"] * 4),
    5: ([0, 0, 0, 0, 0, 0, 0, 9], ["i"] * 4 + ["j"] * 4),
}


def _run_scenario(buf, steps, log):
    for t in steps:
        log.append(("dropped", t, buf.drop_stale(t)))
        batch = buf.sample()
        log.append(
            (
                "replay",
                t,
                None
                if batch is None
                else (batch["rewards"].tolist(), batch["advantages"].tolist(), batch["tensors"]["input_ids"].tolist()),
            )
        )
        log.append(("admitted", t, buf.add(t, *_step_batch(t, *SCENARIO[t]))))
        log.append(("size", t, len(buf)))


def test_replay_scenario_hand_computed():
    """B = 2 (trigger: more than 3 rows above the baseline), threshold 0, tolerance 2, baseline FIFO of 8 rewards.

    step 1: admits R 1, 1, 2 (advantages .5, .5, 1.5); FIFO [1,1,0,0,2,0,0,0].
    step 2: p50 = 0 -> 3 good rows, no trigger; admits R 3, 3; FIFO [3,3,0,0,0,0,0,0].
    step 3: nothing stale (age 2 <= 2); p50 = 0 -> 5 good rows > 3: replay. A = R - 0 = R for all five,
            N = 5 -> min(2^2, B) = 2 rows sampled; buffer cleared. Admits R 5, 4, 6; FIFO [5,4,0,0,6,1,0,1].
    step 4: p50 = 1 -> 3 good rows, no trigger; admits R 7, 7, 7; FIFO [7,7,7,0,0,0,0,0].
    step 5: nothing stale; p50 = 0 -> 6 good rows: replay, A = R, 2 rows sampled, cleared. Admits R 9.
    """
    buf = TrajectoryReplayBuffer(
        buffer_size=2, score_threshold=0.0, tolerate_steps=2, weight_decay=-1, baseline_size=8, seed=0
    )
    log = []
    _run_scenario(buf, [1, 2, 3, 4, 5], log)
    replays = {t: v for kind, t, v in log if kind == "replay"}
    assert [t for t, v in replays.items() if v is not None] == [3, 5]
    r3, a3, ids3 = replays[3]
    assert len(r3) == 2 and set(r3) <= {1.0, 2.0, 3.0} and a3 == r3  # baseline 0: A = R
    assert all(row[0] // 1000 in (1, 2) for row in ids3)  # data from steps <= t - 1
    r5, a5, _ = replays[5]
    assert len(r5) == 2 and set(r5) <= {4.0, 5.0, 6.0, 7.0} and a5 == r5
    admitted = [v for kind, _, v in log if kind == "admitted"]
    assert admitted == [3, 2, 3, 3, 1]
    sizes = [v for kind, _, v in log if kind == "size"]
    assert sizes == [3, 5, 3, 6, 1]
    assert buf.replay_events == 2 and buf.baseline() == 0.0


def test_replay_staleness_and_recalibration_modes():
    buf = TrajectoryReplayBuffer(buffer_size=1, score_threshold=0.0, tolerate_steps=1, baseline_size=4, seed=0)
    buf.add(1, *_step_batch(1, [1, 0, 3, 1], ["a", "a", "b", "b"]))  # admits R 1 and 3
    assert buf.drop_stale(2) == 0 and buf.drop_stale(3) == 2 and len(buf) == 0
    # newest_capped: ages measured from the newest entry, not from the current step
    capped = TrajectoryReplayBuffer(buffer_size=1, score_threshold=0.0, tolerate_steps=1, staleness="newest_capped")
    capped.add(1, *_step_batch(1, [1, 0, 3, 1], ["a", "a", "b", "b"]))
    assert capped.drop_stale(50) == 0
    # w in (0, 1]: A = w * stored advantage, nothing dropped
    decay = TrajectoryReplayBuffer(buffer_size=1, score_threshold=0.0, weight_decay=0.5, baseline_size=4)
    decay.add(1, *_step_batch(1, [1, 0, 3, 1], ["a", "a", "b", "b"]))  # advantages .5 and 1 stored
    assert sorted(decay.recalibrated_advantages().tolist()) == [0.25, 0.5]
    # -1 with std normalisation: divided by p50 of the group stds (+ 1e-6)
    norm = TrajectoryReplayBuffer(buffer_size=1, score_threshold=0.0, baseline_size=4, norm_adv_by_std=True)
    norm.add(1, *_step_batch(1, [1, 0, 3, 1], ["a", "a", "b", "b"]))  # FIFO [1,0,3,1] p50 1; stds .707, 1.414
    p50_std = (0.70710678 + 1.41421356) / 2  # the 50th percentile interpolates between the two stds
    expected = (torch.tensor([1.0, 3.0]) - 1.0) / (p50_std + 1e-6)
    assert_close("normalised", norm.recalibrated_advantages(), expected, atol=1e-5, rtol=1e-5)


def test_newest_capped_ages_entries_out_right_before_admission_as_the_reference():
    """The reference runs ``remove_old`` (age from the newest stored entry, tolerance capped at 10) after the update
    and before admitting the step's rows, and samples without dropping. With admissions at every step 1..12, the
    replay at step 13 still sees step 1's rows (aged out by step 13's admission, not before its replay)."""
    buf = TrajectoryReplayBuffer(
        buffer_size=1000, score_threshold=0.0, tolerate_steps=50, staleness="newest_capped", baseline_size=4
    )
    for t in range(1, 13):
        buf.drop_stale(t)
        assert buf.sample() is None  # B = 1000: never triggers here
        buf.add(t, *_step_batch(t, [1, 0, 3, 1], ["a", "a", "b", "b"]))
    buf.drop_stale(13)
    assert min(r["step"] for r in buf._rows) == 1  # a replay at step 13 would see step 1
    buf.add(13, *_step_batch(13, [1, 0, 3, 1], ["a", "a", "b", "b"]))  # ages from step 12: step 1 is 11 old
    assert min(r["step"] for r in buf._rows) == 2 and buf.dropped_before_add == 2


def test_decay_mode_triggers_on_every_stored_row():
    """With ``w in (0, 1]`` the trigger counts every stored row (the reference's ``get_buffer_size``), not only the
    rows above the p50 baseline: 4 stored rows with B = 2 (trigger > 3) replay although none beats the baseline."""
    buf = TrajectoryReplayBuffer(buffer_size=2, score_threshold=0.0, weight_decay=0.5, baseline_size=16)
    buf.add(1, *_step_batch(1, [0, 0, 0, 0, 0, 0, 0, 0], list("aaaabbbb")))  # fills the baseline with 0
    buf.add(2, *_step_batch(2, [0, 0, 0, 1, 0, 0, 0, 1], list("ccccdddd")))  # admits the two rows with R = 1
    buf.add(3, *_step_batch(3, [0, 0, 0, 1, 0, 0, 0, 1], list("eeeeffff")))
    buf._baseline.extend([5.0] * 16)  # a baseline above every stored reward
    assert len(buf) == 4 and buf.num_good() == 4 and buf.ready()
    batch = buf.sample()
    assert batch is not None and len(batch["rewards"]) == 2
    assert_close("decayed", batch["advantages"], torch.full((2,), 0.5 * 0.75), atol=1e-6, rtol=0)
    minus_one = TrajectoryReplayBuffer(buffer_size=2, score_threshold=0.0, weight_decay=-1, baseline_size=16)
    minus_one._rows = [{"step": 2, "reward": 1.0, "advantage": 0.75, "group": "c", "tensors": {}} for _ in range(4)]
    minus_one._baseline.extend([5.0] * 16)
    assert minus_one.num_good() == 0 and not minus_one.ready()  # -1 counts the rows above the baseline only


def test_replay_state_dict_round_trip_continues_identically():
    def fresh():
        return TrajectoryReplayBuffer(buffer_size=2, score_threshold=0.0, tolerate_steps=2, baseline_size=8, seed=3)

    straight, log_straight = fresh(), []
    _run_scenario(straight, [1, 2, 3, 4, 5], log_straight)
    first, log_resumed = fresh(), []
    _run_scenario(first, [1, 2, 3, 4], log_resumed)
    state = first.state_dict()
    torch.save(state, "/dev/null")  # checkpointable
    resumed = fresh()
    resumed.load_state_dict(state)
    _run_scenario(resumed, [5], log_resumed)
    assert log_resumed == log_straight


def test_stored_rows_are_copies():
    buf = TrajectoryReplayBuffer(buffer_size=1, score_threshold=0.0)
    tensors, r, adv, groups, mask = _step_batch(1, [1, 0, 3, 1], ["a", "a", "b", "b"])
    buf.add(1, tensors, r, adv, groups, mask)
    tensors["input_ids"].fill_(-7)
    tensors["old_log_probs"].fill_(99.0)
    stored = buf.state_dict()["rows"][0]["tensors"]
    assert bool((stored["input_ids"] >= 0).all()) and bool((stored["old_log_probs"] == -1.0).all())


def test_rows_with_empty_masks_are_not_admitted():
    buf = TrajectoryReplayBuffer(buffer_size=1, score_threshold=0.0)
    tensors, r, adv, groups, mask = _step_batch(1, [1, 0, 3, 1], ["a", "a", "b", "b"])
    mask[2] = 0
    assert buf.add(1, tensors, r, adv, groups, mask) == 1


@settings(max_examples=40, deadline=None)
@given(n_good=st.integers(1, 300), cap=st.integers(1, 64))
def test_replay_batch_is_a_power_of_two_capped_by_the_buffer_size(n_good, cap):
    buf = TrajectoryReplayBuffer(buffer_size=cap, score_threshold=0.0, baseline_size=1, seed=1)
    # one zero reward fixes the baseline at 0; n_good rows with reward 1 and advantage 1
    buf.add(0, {"x": torch.zeros(1, 2)}, torch.zeros(1), torch.zeros(1), ["z"], torch.ones(1, 2))
    buf._rows = [
        {"step": 0, "reward": 1.0, "advantage": 1.0, "group": i, "tensors": {"x": torch.full((2,), i)}}
        for i in range(n_good)
    ]
    batch = buf.sample()
    if n_good > 1.5 * cap:
        assert batch is not None and len(buf) == 0
        assert len(batch["rewards"]) == min(2 ** int(math.log2(n_good)), cap)
        picked = batch["tensors"]["x"][:, 0].tolist()
        assert len(set(picked)) == len(picked)  # without replacement
    else:
        assert batch is None and len(buf) == n_good
