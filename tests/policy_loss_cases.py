"""The policy-loss test batches and runners shared by the kernel tests and the verl parity tests."""

from __future__ import annotations

import torch

import spear_kernels as sk


def make_batch(b=12, length=257, seed=0, log_ratio_scale=0.3, masked_rows=(3,)):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, length, generator=g) * 3
    log_prob = old + torch.randn(b, length, generator=g) * log_ratio_scale
    adv = (torch.randn(b, 1, generator=g) * 1.5).expand(b, length).contiguous()
    adv += torch.randn(b, length, generator=g) * 0.1  # token-level variety (GiGPO-like), never exactly 0
    lengths = torch.randint(1, length + 1, (b,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).float()
    for r in masked_rows:
        mask[r] = 0.0  # a fully masked response
    return log_prob, old, adv, mask


def params(**over):
    p = dict(
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=3.0,
        clip_cov_ratio=0.02,
        clip_cov_lb=0.05,
        clip_cov_ub=5.0,
        kl_cov_ratio=0.02,
        ppo_kl_coef=0.1,
    )
    p.update(over)
    return p


def run_ours(mode, log_prob, old, adv, mask, p, backend, generator=None):
    lp = log_prob.clone().requires_grad_(True)
    loss_mat, stats = sk.policy_loss(lp, old, adv, mask, mode=mode, backend=backend, generator=generator, **p)
    (loss_mat * mask).sum().backward()
    return loss_mat.detach(), lp.grad, stats


def clip_cov_candidates(log_prob, old, adv, mask, p):
    """The clip-cov candidate set, written out from its definition."""
    ratio = (log_prob - old).clamp(-20, 20).exp()
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1 - p["clip_ratio_low"], 1 + p["clip_ratio_high"])
    mean = lambda x: (x * mask).sum() / (mask.sum() + 1e-8)  # noqa: E731
    cov = (adv - mean(adv)) * (log_prob - mean(log_prob))
    return (mask > 0) & ~(pg2 > pg1) & (cov > p["clip_cov_lb"]) & (cov < p["clip_cov_ub"])
