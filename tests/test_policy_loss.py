"""policy_loss: every backend against the reference, and against verl 0.9.1's own loss functions."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from omegaconf import OmegaConf
from verl.trainer.ppo import core_algos  # verl 0.9.1 is a dev dependency: the reference we match

import spear_kernels as sk
from spear_kernels import reference

BACKENDS = ["torch", *[b for b in ("cpp", "triton") if b in sk.available_backends()]]
MODES = ["vanilla", "clip_cov", "kl_cov", "gpg"]
VERL_FN = {
    "vanilla": core_algos.compute_policy_loss_vanilla,
    "clip_cov": core_algos.compute_policy_loss_clip_cov,
    "kl_cov": core_algos.compute_policy_loss_kl_cov,
    "gpg": core_algos.compute_policy_loss_gpg,
}
TIGHT = {"atol": 1e-6, "rtol": 1e-6}


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


def verl_config(p):
    return OmegaConf.create(
        {
            "clip_ratio": p["clip_ratio_low"],
            "clip_ratio_low": p["clip_ratio_low"],
            "clip_ratio_high": p["clip_ratio_high"],
            "clip_ratio_c": p["clip_ratio_c"],
            "policy_loss": {
                k: p[k] for k in ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_ratio", "ppo_kl_coef")
            },
            "global_batch_info": {},
        }
    )


def run_verl(mode, log_prob, old, adv, mask, p, monkeypatch):
    """verl's loss with token-sum aggregation; returns (per-token loss matrix, d/d log_prob, metrics)."""
    captured = {}
    real_agg = core_algos.agg_loss

    def capture(loss_mat, **kw):
        captured["loss_mat"] = loss_mat.detach().clone()
        return real_agg(loss_mat=loss_mat, **kw)

    monkeypatch.setattr(core_algos, "agg_loss", capture)
    lp = log_prob.clone().requires_grad_(True)
    loss, metrics = VERL_FN[mode](old, lp, adv, mask, "token-sum", verl_config(p))
    loss.backward()
    return captured["loss_mat"], lp.grad, metrics


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["vanilla", "gpg", "kl_cov"])
def test_matches_verl_exactly(mode, backend, monkeypatch):
    log_prob, old, adv, mask = make_batch(seed=1)
    p = params()
    v_loss, v_grad, v_metrics = run_verl(mode, log_prob, old, adv, mask, p, monkeypatch)
    loss, grad, stats = run_ours(mode, log_prob, old, adv, mask, p, backend)
    assert_close("loss_mat * mask", loss * mask, v_loss * mask, **TIGHT)
    assert_close("d loss / d log_prob", grad, v_grad, **TIGHT)
    for name in ("pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"):
        if f"actor/{name}" in v_metrics:
            assert stats[name].item() == pytest.approx(v_metrics[f"actor/{name}"], rel=1e-5, abs=1e-7), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ratio", [1e-4, 2e-3, 0.02, 0.05, 0.4, 1.0])
def test_kl_cov_selection_matches_verl_at_every_ratio(ratio, backend, monkeypatch):
    """A batch large enough that the C++ kernel selects with per-thread heaps at small ratios, through a sampled
    threshold at larger ones, and falls back to every valid token at 1.0: the chosen tokens are verl's."""
    log_prob, old, adv, mask = make_batch(b=16, length=2500, seed=4)
    p = params(kl_cov_ratio=ratio)
    v_loss, v_grad, _ = run_verl("kl_cov", log_prob, old, adv, mask, p, monkeypatch)
    loss, grad, _ = run_ours("kl_cov", log_prob, old, adv, mask, p, backend)
    assert_close("loss_mat * mask", loss * mask, v_loss * mask, **TIGHT)
    assert_close("d loss / d log_prob", grad, v_grad, **TIGHT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_cov_selection_is_exact_when_the_sample_misleads(backend, monkeypatch):
    """Every other token has a wide covariance spread and the rest almost none: a sample of the even positions
    puts the threshold too high, fewer than k tokens pass it, and the kernel must fall back to all of them."""
    g = torch.Generator().manual_seed(5)
    shape = (16, 2500)
    even = (torch.arange(shape[1]) % 2 == 0).expand(shape)
    adv = torch.where(even, 1.0, -1.0)
    log_prob = torch.where(even, torch.randn(shape, generator=g), 0.01 * torch.randn(shape, generator=g)) - 2.0
    old = log_prob + 0.1 * torch.randn(shape, generator=g)
    mask = torch.ones(shape)
    p = params(kl_cov_ratio=0.02)
    v_loss, v_grad, _ = run_verl("kl_cov", log_prob, old, adv, mask, p, monkeypatch)
    loss, grad, _ = run_ours("kl_cov", log_prob, old, adv, mask, p, backend)
    assert_close("loss_mat * mask", loss * mask, v_loss * mask, **TIGHT)
    assert_close("d loss / d log_prob", grad, v_grad, **TIGHT)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k_vs_candidates", ["fewer", "more"])
def test_clip_cov_matches_verl_up_to_the_random_choice(backend, k_vs_candidates, monkeypatch):
    log_prob, old, adv, mask = make_batch(seed=2)
    p = params(clip_cov_ratio=0.01 if k_vs_candidates == "fewer" else 0.5)
    cand = clip_cov_candidates(log_prob, old, adv, mask, p)
    v_loss, v_grad, v_metrics = run_verl("clip_cov", log_prob, old, adv, mask, p, monkeypatch)
    loss, grad, stats = run_ours("clip_cov", log_prob, old, adv, mask, p, backend, torch.Generator().manual_seed(5))
    ours_sel = (loss == 0) & (mask > 0)
    verl_sel = (v_loss == 0) & (mask > 0)
    k = max(int(p["clip_cov_ratio"] * mask.sum().item()), 1)
    assert int(cand.sum()) > 0
    assert bool((verl_sel <= cand).all()) and bool((ours_sel <= cand).all()), "a zeroed token is not a candidate"
    assert int(ours_sel.sum()) == int(verl_sel.sum()) == min(k, int(cand.sum()))
    neither = (mask > 0) & ~ours_sel & ~verl_sel
    assert_close("loss on unselected tokens", loss[neither], v_loss[neither], **TIGHT)
    assert_close("grad on unselected tokens", grad[neither], v_grad[neither], **TIGHT)
    assert bool((grad[ours_sel] == 0).all())
    assert stats["pg_clipfrac"].item() == pytest.approx(v_metrics["actor/pg_clipfrac"], rel=1e-5)
    assert stats["ppo_kl"].item() == pytest.approx(v_metrics["actor/ppo_kl"], rel=1e-5, abs=1e-7)
    if k_vs_candidates == "fewer":
        assert int(cand.sum()) > k, "the random choice must be exercised"


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backends_match_reference(backend, mode, dtype):
    log_prob, old, adv, mask = make_batch(seed=3, b=9, length=1001)
    log_prob = log_prob.to(dtype)
    p = params()
    loss, grad, stats = run_ours(mode, log_prob, old, adv, mask, p, backend, torch.Generator().manual_seed(0))
    r_loss, r_grad, r_stats = run_ours(mode, log_prob, old, adv, mask, p, "torch", torch.Generator().manual_seed(0))
    assert grad.dtype == dtype
    if mode == "clip_cov":  # different random streams: same count, same loss off the selections
        sel, r_sel = (loss == 0) & (mask > 0), (r_loss == 0) & (mask > 0)
        assert int(sel.sum()) == int(r_sel.sum()) > 0
        keep = (mask > 0) & ~sel & ~r_sel
        loss, r_loss, grad, r_grad = loss[keep], r_loss[keep], grad[keep], r_grad[keep]
    else:
        loss, r_loss = loss * mask, r_loss * mask
    tol = TIGHT if dtype == torch.float32 else {"atol": 1e-6, "rtol": 8e-3}
    assert_close("loss", loss, r_loss, **TIGHT)
    assert_close("grad", grad.float(), r_grad.float(), **tol)
    for name, value in stats.items():
        assert value.dim() == 0 and value.dtype == torch.float32
        assert value.item() == pytest.approx(r_stats[name].item(), rel=1e-5, abs=1e-7), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_extreme_log_ratios_stay_finite(backend, mode):
    log_prob, old, adv, mask = make_batch(seed=4)
    log_prob = old + torch.where(torch.rand(old.shape) < 0.5, 50.0, -50.0)
    adv[0] = 0.0  # A = 0 times exp(50) is where verl's unclamped losses give NaN
    loss, grad, stats = run_ours(
        mode,
        log_prob,
        old,
        adv,
        mask,
        params(clip_cov_lb=-1e30, clip_cov_ub=1e30),
        backend,
        torch.Generator().manual_seed(0),
    )
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert all(torch.isfinite(v) for v in stats.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_zero_advantages_and_fully_masked_batch(backend, mode):
    log_prob, old, adv, mask = make_batch(seed=6)
    loss, grad, stats = run_ours(mode, log_prob, old, torch.zeros_like(adv), mask, params(), backend)
    if mode == "kl_cov":  # the KL penalty is the only loss left, on the selected tokens
        assert bool((loss >= 0).all())
    else:
        assert bool((loss == 0).all()) and bool((grad == 0).all())
    loss, grad, stats = run_ours(mode, log_prob, old, adv, torch.zeros_like(mask), params(), backend)
    assert torch.isfinite(loss).all() and bool((grad == 0).all())
    assert all(v.item() == 0.0 for v in stats.values()), stats


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_cov_without_candidates_is_plain_clipping(backend):
    log_prob, old, adv, mask = make_batch(seed=7)
    p = params(clip_cov_lb=1e6, clip_cov_ub=2e6)  # no covariance falls in the window
    loss, _, stats = run_ours("clip_cov", log_prob, old, adv, mask, p, backend)
    ratio = (log_prob - old).exp()
    expected = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.28))
    assert_close("loss", loss, expected, **TIGHT)
    assert stats["pg_clipfrac"].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["clip_cov", "kl_cov"])
def test_tiny_ratio_selects_exactly_one_token(backend, mode):
    log_prob, old, adv, mask = make_batch(seed=8)
    p = params(clip_cov_ratio=1e-9, kl_cov_ratio=1e-9, clip_cov_lb=-1e30, clip_cov_ub=1e30)
    loss, _, _ = run_ours(mode, log_prob, old, adv, mask, p, backend, torch.Generator().manual_seed(0))
    ratio = (log_prob - old).exp()
    plain = -adv * ratio
    if mode == "clip_cov":
        changed = (loss == 0) & (mask > 0)
    else:
        changed = ((loss - plain).abs() > 1e-5) & (mask > 0)
    assert int(changed.sum()) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_cov_is_reproducible_with_a_generator(backend):
    log_prob, old, adv, mask = make_batch(seed=9)
    p = params(clip_cov_ratio=0.005)
    runs = [
        run_ours("clip_cov", log_prob, old, adv, mask, p, backend, torch.Generator().manual_seed(s))[0]
        for s in (1, 1, 2)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2]), "a different seed should (almost surely) pick other tokens"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_value_error(backend):
    log_prob, old, adv, mask = make_batch(b=2, length=5, masked_rows=())
    bad = {
        "mode": dict(mode="ppo"),
        "clip_ratio_c": dict(clip_ratio_c=1.0),
        "clip_ratio_low": dict(clip_ratio_low=1.5),
        "clip_cov window": dict(mode="clip_cov", clip_cov_lb=5.0, clip_cov_ub=1.0),
        "clip_cov_ratio": dict(mode="clip_cov", clip_cov_ratio=0.0),
        "kl_cov_ratio": dict(mode="kl_cov", kl_cov_ratio=-1.0),
    }
    for name, kw in bad.items():
        with pytest.raises(ValueError):
            sk.policy_loss(log_prob, old, adv, mask, backend=backend, **kw)
            pytest.fail(name)
    with pytest.raises(ValueError, match="shape"):
        sk.policy_loss(log_prob, old[:, :3], adv, mask, backend=backend)
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        sk.policy_loss(log_prob[0], old[0], adv[0], mask[0], backend=backend)


def test_reference_is_the_spec_for_vanilla():
    """The reference against the formulas written out by hand on a few tokens."""
    log_prob = torch.tensor([[0.0, 0.5, -0.5, 30.0]])
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 1.0, -1.0, -2.0]])
    mask = torch.ones(1, 4)
    loss, stats = reference.policy_loss(log_prob, old, adv, mask, mode="vanilla")
    r = torch.tensor([1.0, 1.6487213, 0.60653066, 4.8516520e08])  # exp(clamp(d, -20, 20))
    expected = torch.tensor([[-1.0, -1.28, max(0.60653066, 0.8), min(2 * r[3].item(), 2 * 3.0)]])
    expected[0, 2] = max(r[2].item(), 0.8)  # -A * ratio with A = -1, clipped below at 0.8
    assert_close("vanilla", loss, expected, atol=1e-6, rtol=1e-6)
    assert stats["pg_clipfrac_lower"].item() == pytest.approx(0.25)
