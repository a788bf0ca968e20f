"""group_advantages: ours vs verl's GRPO estimators (loop and vectorised), from token rewards and uid
strings to [B, L] advantages, the uid-to-index mapping included."""

from __future__ import annotations

import uuid
from functools import lru_cache

import numpy as np
import pytest
import torch

from . import providers, shapes
from .harness import tag, time_it

CASES = shapes.GROUP_ADVANTAGES  # parametrizes `case` (see conftest.py: full or --quick shapes)
OP = "group_advantages"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@lru_cache(maxsize=1)
def inputs(case):
    g = torch.Generator().manual_seed(0)
    groups = case.batch // case.group_size
    # verl's layout: one uuid4 string per prompt, repeated group_size times (interleaved)
    uids = np.repeat(
        np.array([str(uuid.UUID(int=int(x))) for x in torch.randint(0, 2**62, (groups,), generator=g)], dtype=object),
        case.group_size,
    )
    lengths = torch.randint(1, case.length + 1, (case.batch,), generator=g)
    mask = (torch.arange(case.length)[None, :] < lengths[:, None]).float()
    rewards = torch.zeros(case.batch, case.length)
    rewards[torch.arange(case.batch), lengths - 1] = (torch.rand(case.batch, generator=g) < 0.4).float()
    return rewards.to(DEVICE), mask.to(DEVICE), uids


@lru_cache(maxsize=1)
def distinct_uids(case):
    """The same uid strings as distinct objects, their hashes not yet cached (as after a deserialisation that
    does not share repeated objects): every provider hashes and compares every string."""
    return np.array([s.encode().decode() for s in inputs(case)[2]], dtype=object)


@pytest.mark.parametrize("uid_objects", ["repeated", "distinct"])
@pytest.mark.parametrize("provider", list(providers.GROUP_ADVANTAGES))
def test_time(benchmark, provider, uid_objects, case):
    reason = providers.available(provider, DEVICE)
    if reason:
        pytest.skip(reason)
    rewards, mask, uids = inputs(case)
    op = OP
    if uid_objects == "distinct":
        uids, op = distinct_uids(case), f"{OP}[distinct uid objects]"
    tag(benchmark, op=op, provider=provider, mode="fwd", case=case, dtype=torch.float32, device=DEVICE.type)
    fn = providers.GROUP_ADVANTAGES[provider]
    time_it(benchmark, lambda: fn(rewards, mask, uids), DEVICE, budget_s=2.0)
