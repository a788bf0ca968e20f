"""policy_loss + token-mean aggregation: ours vs verl's loss functions, per mode, fwd / bwd / fwd+bwd;
the limit is one streaming read of the four [B, L] inputs."""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from . import providers, shapes
from .harness import MODES, tag, time_it

CASES = shapes.POLICY_LOSS  # parametrizes `case` (see conftest.py: full or --quick shapes)
OP = "policy_loss"
# mode@ratio: clip_cov / kl_cov at verl's default ratio (2e-4) and at the SPEAR presets' replay ratio (0.02)
LOSS_MODES = ["vanilla", "clip_cov", "clip_cov@0.02", "kl_cov", "kl_cov@0.02", "gpg"]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@lru_cache(maxsize=1)
def inputs(case):
    g = torch.Generator().manual_seed(0)
    shape = (case.batch, case.length)
    old = -torch.rand(shape, generator=g) * 3
    log_prob = old + torch.randn(shape, generator=g) * 0.2
    adv = (torch.randn(case.batch, 1, generator=g) * 1.5).expand(shape).contiguous()
    lengths = torch.randint(1, case.length + 1, (case.batch,), generator=g)
    mask = (torch.arange(case.length)[None, :] < lengths[:, None]).float()
    return tuple(t.to(DEVICE) for t in (log_prob, old, adv, mask))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loss_mode", LOSS_MODES)
@pytest.mark.parametrize("provider", list(providers.POLICY_LOSS))
def test_time(benchmark, provider, loss_mode, mode, case):
    reason = providers.available(provider, DEVICE)
    if reason:
        pytest.skip(reason)
    log_prob, old, adv, mask = inputs(case)
    fn = providers.POLICY_LOSS[provider]
    tag(
        benchmark,
        op=f"{OP}[{loss_mode}]",
        provider=provider,
        mode=mode,
        case=case,
        dtype=torch.float32,
        device=DEVICE.type,
    )
    if mode == "fwd":
        with torch.no_grad():
            time_it(benchmark, lambda: fn(log_prob, old, adv, mask, loss_mode), DEVICE, budget_s=2.0)
        return
    x = log_prob.detach().requires_grad_(True)
    if mode == "bwd":
        loss = fn(x, old, adv, mask, loss_mode)
        time_it(benchmark, lambda: torch.autograd.grad(loss, x, retain_graph=True), DEVICE, budget_s=2.0)
    else:
        time_it(benchmark, lambda: torch.autograd.grad(fn(x, old, adv, mask, loss_mode), x), DEVICE, budget_s=2.0)


@pytest.mark.parametrize("loss_mode", LOSS_MODES)
def test_limit(benchmark, loss_mode, case):
    reason = providers.available("limit", DEVICE)
    if reason:
        pytest.skip(reason)
    stacked = torch.stack(inputs(case)).contiguous()  # the four inputs' bytes, read once
    tag(
        benchmark,
        op=f"{OP}[{loss_mode}]",
        provider="limit",
        mode="fwd",
        case=case,
        dtype=torch.float32,
        device=DEVICE.type,
    )
    time_it(benchmark, lambda: providers.stream_read(stacked), DEVICE, budget_s=1.0)
