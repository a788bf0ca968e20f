"""Who computes each op: ours and every peer that runs here, plus the physical limit.

A provider is a function ``(logits, labels) -> (logp, entropy)``. ``available(name, device)``
says whether it can run in this process; the suites skip (with the reason) the ones that cannot.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from functools import cache

import torch

import spear_kernels as sk
from spear_kernels import reference


def _verl_eager(logits: torch.Tensor, labels: torch.Tensor):
    from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

    return logprobs_from_logits(logits, labels), entropy_from_logits(logits)


@cache
def _verl_compiled_fn():
    return torch.compile(_verl_eager, dynamic=False)


def _verl_compiled(logits, labels):
    return _verl_compiled_fn()(logits, labels)


LOGPROBS_ENTROPY: dict[str, Callable] = {
    "cpp": lambda z, y: sk.logprobs_entropy(z, y, backend="cpp"),
    "triton": lambda z, y: sk.logprobs_entropy(z, y, backend="triton"),
    "torch": lambda z, y: reference.logprobs_entropy(z, y),
    "verl": _verl_eager,
    "verl-compile": _verl_compiled,
}

OURS = {"cpp", "triton"}


def available(provider: str, device: torch.device) -> str | None:
    """None if ``provider`` runs on ``device`` here, else the reason it does not."""
    if provider == "cpp":
        if device.type != "cpu":
            return "cpp runs on CPU tensors"
        return None if "cpp" in sk.available_backends() else "spear_kernels._C is not built"
    if provider == "triton":
        return None if device.type == "cuda" and "triton" in sk.available_backends() else "triton needs CUDA"
    if provider.startswith("verl"):
        return None if importlib.util.find_spec("verl") else "verl is not installed (pip install -e .[bench])"
    if provider == "limit" and device.type != "cpu":
        return "the streaming-read limit is measured on CPU"
    return None


def stream_read(x: torch.Tensor) -> float:
    """The memory-bound limit: read every byte of ``x`` once, as fast as this machine can."""
    from spear_kernels import _cpp

    return _cpp.stream_read(x)
