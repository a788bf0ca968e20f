"""spear's algorithm pieces against verl 0.9.1's: GRPO advantages, loss aggregation, KL penalties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_close
from verl.trainer.ppo import core_algos

from spear import advantages, losses


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_advantages_match_verl(norm):
    g = torch.Generator().manual_seed(0)
    b, length = 48, 9
    rewards_tok = torch.zeros(b, length)
    rewards_tok[:, -1] = (torch.rand(b, generator=g) < 0.5).float()
    mask = (torch.rand(b, length, generator=g) < 0.8).float()
    uids = np.array([f"p{i // 8}" for i in range(b)], dtype=object)
    ours = advantages.grpo_advantages(rewards_tok, mask, uids, norm_adv_by_std_in_grpo=norm)
    theirs, _ = core_algos.compute_grpo_outcome_advantage(rewards_tok, mask, uids, norm_adv_by_std_in_grpo=norm)
    assert_close("grpo", ours, theirs, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "mode", ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
)
@pytest.mark.parametrize("global_info", [{}, {"dp_size": 2, "batch_num_tokens": 300, "global_batch_size": 24}])
def test_agg_loss_matches_verl(mode, global_info):
    g = torch.Generator().manual_seed(1)
    loss_mat = torch.randn(12, 33, generator=g)
    mask = (torch.rand(12, 33, generator=g) < 0.7).float()
    mask[4] = 0  # a fully masked sequence is excluded
    ours = losses.agg_loss(loss_mat, mask, mode, **global_info)
    theirs = core_algos.agg_loss(loss_mat, mask, mode, **global_info)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    with_scale = losses.agg_loss(loss_mat, mask, mode, loss_scale_factor=100, **global_info)
    assert with_scale.item() == pytest.approx(
        core_algos.agg_loss(loss_mat, mask, mode, loss_scale_factor=100, **global_info).item(), rel=1e-6
    )
    assert losses.agg_loss(loss_mat, torch.zeros_like(mask), mode).item() == 0.0  # verl: NaN for some modes
    if global_info and mode != "token-sum":  # token-sum needs no global normaliser
        with pytest.raises(ValueError, match="global"):
            losses.agg_loss(loss_mat, mask, mode, dp_size=2)


@pytest.mark.parametrize("kl_type", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k3+", "low_var_kl+"])
def test_kl_penalty_matches_verl(kl_type):
    g = torch.Generator().manual_seed(2)
    logp = (torch.randn(4, 20, generator=g) - 1).requires_grad_(True)
    ref = logp.detach() + torch.randn(4, 20, generator=g) * 2
    ours = losses.kl_penalty(logp, ref, kl_type)
    (gr,) = torch.autograd.grad(ours.sum(), logp)
    theirs = core_algos.kl_penalty(logp, ref, kl_type)
    (gt,) = torch.autograd.grad(theirs.sum(), logp)
    assert_close("value", ours, theirs, atol=1e-6, rtol=1e-6)
    assert_close("grad", gr, gt, atol=1e-6, rtol=1e-6)
