"""spear.verl.plugin: registration through verl's entry point, parity with verl's built-ins, the lm_head hook."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import assert_close
from omegaconf import OmegaConf
from verl.trainer.ppo import core_algos

from spear.verl import plugin as verl_plugin
from spear_kernels import reference


def actor_config(**policy):
    return OmegaConf.create(
        {
            "clip_ratio": 0.2,
            "clip_ratio_low": 0.2,
            "clip_ratio_high": 0.28,
            "clip_ratio_c": 3.0,
            "policy_loss": {
                "clip_cov_ratio": 0.02,
                "clip_cov_lb": 0.05,
                "clip_cov_ub": 5.0,
                "kl_cov_ratio": 0.02,
                "ppo_kl_coef": 0.1,
                **policy,
            },
            "global_batch_info": {},
        }
    )


def batch(seed=0, b=6, length=40):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, length, generator=g) * 2
    log_prob = old + torch.randn(b, length, generator=g) * 0.3
    adv = torch.randn(b, length, generator=g)
    mask = (torch.rand(b, length, generator=g) < 0.8).float()
    return old, log_prob, adv, mask


def test_entry_point_registers_everything_on_import_verl():
    code = (
        "import verl\n"
        "from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, ADV_ESTIMATOR_REGISTRY\n"
        "names = [n for n in POLICY_LOSS_REGISTRY if n.startswith('spear_')]\n"
        "print(sorted(names), 'spear_grpo' in ADV_ESTIMATOR_REGISTRY)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_PLUGINS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == (
        "['spear_clip_cov', 'spear_gpg', 'spear_kl_cov', 'spear_vanilla'] True"
    )


@pytest.mark.parametrize("mode", ["vanilla", "kl_cov", "gpg"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_losses_match_verl_builtins(mode, agg):
    old, log_prob, adv, mask = batch(seed=1)
    cfg = actor_config()
    grads = []
    results = []
    for name in (mode, f"spear_{mode}"):
        lp = log_prob.clone().requires_grad_(True)
        loss, metrics = core_algos.get_policy_loss_fn(name)(old, lp, adv, mask, agg, cfg)
        loss.backward()
        grads.append(lp.grad)
        results.append((loss.item(), metrics))
    (v_loss, v_metrics), (s_loss, s_metrics) = results
    assert s_loss == pytest.approx(v_loss, rel=1e-5, abs=1e-7)
    assert_close("grad", grads[1], grads[0], atol=1e-6, rtol=1e-5)
    assert s_metrics.keys() == v_metrics.keys()
    for k, v in v_metrics.items():
        assert s_metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k


def test_clip_cov_zeroes_the_same_number_of_tokens_as_verl():
    old, log_prob, adv, mask = batch(seed=2, b=10, length=100)
    cfg = actor_config()
    _, v_metrics = core_algos.get_policy_loss_fn("clip_cov")(old, log_prob, adv, mask, "token-mean", cfg)
    _, s_metrics = core_algos.get_policy_loss_fn("spear_clip_cov")(old, log_prob, adv, mask, "token-mean", cfg)
    assert s_metrics["actor/pg_clipfrac"] == pytest.approx(v_metrics["actor/pg_clipfrac"], rel=1e-6)
    assert s_metrics["actor/pg_clipfrac"] > 0


def test_rollout_correction_weights_are_applied():
    old, log_prob, adv, mask = batch(seed=3)
    weights = torch.rand(old.shape)
    cfg = actor_config()
    v, _ = core_algos.get_policy_loss_fn("vanilla")(old, log_prob, adv, mask, "token-mean", cfg, weights)
    s, _ = core_algos.get_policy_loss_fn("spear_vanilla")(old, log_prob, adv, mask, "token-mean", cfg, weights)
    assert s.item() == pytest.approx(v.item(), rel=1e-5)


@pytest.mark.parametrize("norm", [True, False])
def test_spear_grpo_through_verls_registry(norm):
    g = torch.Generator().manual_seed(4)
    rewards = torch.zeros(32, 7)
    rewards[:, -1] = (torch.rand(32, generator=g) < 0.5).float()
    mask = torch.ones(32, 7)
    uids = np.array([f"u{i // 4}" for i in range(32)], dtype=object)
    cfg = OmegaConf.create({"norm_adv_by_std_in_grpo": norm})
    ours, _ = core_algos.get_adv_estimator_fn("spear_grpo")(
        token_level_rewards=rewards, response_mask=mask, index=uids, config=cfg
    )
    theirs, _ = core_algos.get_adv_estimator_fn("grpo")(rewards, mask, uids, norm_adv_by_std_in_grpo=norm)
    assert_close("advantages", ours, theirs, atol=1e-6, rtol=1e-6)


def test_patch_fused_kernels_routes_verls_hook():
    import verl.utils.kernel.linear_cross_entropy as kernel

    original = kernel.linear_cross_entropy
    try:
        patched = verl_plugin.patch_fused_kernels()
        assert "verl.utils.kernel.linear_cross_entropy" in patched
        assert kernel.linear_cross_entropy is verl_plugin.spear_linear_cross_entropy
        g = torch.Generator().manual_seed(5)
        hidden = torch.randn(1, 9, 16, generator=g, requires_grad=True)
        weight = torch.randn(50, 16, generator=g, requires_grad=True)
        labels = torch.randint(0, 50, (1, 9), generator=g)
        logp, ent = kernel.linear_cross_entropy(hidden, weight, labels, 0.7)
        assert logp.shape == ent.shape == (1, 9) and logp.dtype == torch.float32
        ref_lp, ref_ent = reference.linear_logprobs_entropy(hidden, weight, labels, temperature=0.7)
        assert_close("logp", logp, ref_lp, atol=1e-5, rtol=1e-5)
        assert_close("entropy", ent, ref_ent, atol=1e-5, rtol=1e-5)
        (logp.sum() + ent.sum()).backward()
        assert hidden.grad is not None and weight.grad is not None
        assert verl_plugin.patch_fused_kernels() == []  # idempotent
    finally:
        verl_plugin.unpatch_fused_kernels()
    assert kernel.linear_cross_entropy is original


def _ppo_loss_inputs(global_info: bool):
    """verl's actor-worker loss inputs: unpadded per-token model outputs, a left-padded prompt, a right-padded
    response, and (optionally) the global batch info that data parallelism sets."""
    from verl.utils import tensordict_utils as tu

    g = torch.Generator().manual_seed(5)
    b, p, length = 4, 5, 7
    plen, rlen = [3, 5, 2, 4], [7, 4, 6, 1]
    attn = torch.zeros(b, p + length, dtype=torch.long)
    for i in range(b):
        attn[i, p - plen[i] : p] = 1
        attn[i, p : p + rlen[i]] = 1
    nnz = int(attn.sum())
    info = (
        {"dp_size": 2, "batch_num_tokens": 40, "global_batch_size": 8}
        if global_info
        else {"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None}
    )
    td = tu.get_tensordict(
        {
            "prompts": torch.zeros(b, p, dtype=torch.long),
            "responses": torch.zeros(b, length, dtype=torch.long),
            "attention_mask": attn,
            "response_mask": attn[:, p:].float(),
            "old_log_probs": -torch.rand(b, length, generator=g) * 2,
            "advantages": torch.randn(b, length, generator=g),
        },
        non_tensor_dict=info,
    )
    log_probs = -torch.rand(nnz, generator=g) * 2
    entropy = torch.rand(nnz, generator=g)
    return td, log_probs, entropy


@pytest.mark.parametrize("mode", ["vanilla", "clip_cov", "kl_cov", "gpg"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("global_info", [False, True], ids=["local", "global_batch_info"])
def test_losses_through_verls_ppo_loss_with_an_actor_config(mode, agg, global_info):
    from verl.workers.config.actor import FSDPActorConfig, PolicyLossConfig
    from verl.workers.utils.losses import ppo_loss

    results = []
    for name in (mode, f"spear_{mode}"):
        td, log_probs, entropy = _ppo_loss_inputs(global_info)
        log_probs.requires_grad_(True)
        entropy.requires_grad_(True)
        cfg = FSDPActorConfig(
            strategy="fsdp",
            rollout_n=1,
            ppo_mini_batch_size=4,
            ppo_micro_batch_size_per_gpu=4,
            use_torch_compile=False,
            loss_agg_mode=agg,
            entropy_coeff=0.01,
            clip_ratio_high=0.28,
            policy_loss=PolicyLossConfig(loss_mode=name, clip_cov_ratio=0.2, clip_cov_lb=-5.0, clip_cov_ub=5.0),
        )
        loss, metrics = ppo_loss(cfg, {"log_probs": log_probs, "entropy": entropy}, td)
        loss.backward()
        results.append((loss.detach(), metrics, log_probs.grad, entropy.grad))
    (v_loss, v_metrics, v_glp, v_gent), (s_loss, s_metrics, s_glp, s_gent) = results
    assert s_metrics.keys() == v_metrics.keys()
    assert_close("entropy grad", s_gent, v_gent, atol=1e-7, rtol=1e-6)
    if mode == "clip_cov":
        # the zeroed tokens are drawn at random (verl: torch's global RNG; ours: a seeded generator): same
        # count, and the gradient is zero exactly where one of the two zeroed a token or agrees elsewhere
        zeroed_v, zeroed_s = (v_glp == 0).sum(), (s_glp == 0).sum()
        assert zeroed_v == zeroed_s and zeroed_v > 0
        both = (v_glp != 0) & (s_glp != 0)
        assert_close("log-prob grad", s_glp[both], v_glp[both], atol=1e-7, rtol=1e-5)
        return
    assert s_loss.item() == pytest.approx(v_loss.item(), rel=1e-5, abs=1e-7)
    assert_close("log-prob grad", s_glp, v_glp, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("norm", [True, False])
def test_spear_grpo_through_verls_compute_advantage(norm):
    from verl import DataProto
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.ray_trainer import compute_advantage

    g = torch.Generator().manual_seed(6)
    rewards = torch.zeros(24, 9)
    mask = torch.ones(24, 9)
    mask[::3, 6:] = 0
    rewards[torch.arange(24), mask.sum(-1).long() - 1] = torch.randint(0, 3, (24,), generator=g).float()
    uids = np.array([f"q{i // 6}" for i in range(24)], dtype=object)
    out = []
    for estimator in ("grpo", "spear_grpo"):
        data = DataProto.from_dict(
            tensors={"token_level_rewards": rewards.clone(), "response_mask": mask.clone()},
            non_tensors={"uid": uids.copy()},
        )
        cfg = AlgoConfig(adv_estimator=estimator, norm_adv_by_std_in_grpo=norm)
        data = compute_advantage(data, estimator, norm_adv_by_std_in_grpo=norm, config=cfg)
        out.append(data.batch["advantages"])
    assert out[0].abs().sum() > 0
    assert_close("advantages", out[1], out[0], atol=1e-6, rtol=1e-6)
