"""Peak memory of one op (fwd+bwd) in a fresh process.

    python -m bench.memory --op logprobs_entropy --provider cpp --model llama-2-7b --tokens 2048 --dtype float32

Prints one JSON object. The inputs are created first (in place, no temporaries) and one
warm-up call runs (compilation, allocator caches); then the kernel's peak-RSS counter is
reset (/proc/self/clear_refs) and the op runs once more. ``extra_bytes`` is that run's
peak RSS above the RSS just before it; ``extra_beyond_grad_bytes`` subtracts the inputs'
gradients (logits; or hidden and weight), which every provider must produce.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import sys

import torch


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _settle() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure(op: str, provider: str, model: str, tokens: int, dtype: str) -> dict:
    from . import providers
    from .harness import loss_of
    from .shapes import Case

    case = Case(model, tokens)
    dt = getattr(torch, dtype)
    labels = torch.randint(0, case.vocab, (case.tokens,))
    if op == "logprobs_entropy":
        fn = providers.LOGPROBS_ENTROPY[provider]
        inputs = [torch.empty(case.tokens, case.vocab, dtype=dt).normal_().requires_grad_(True)]
    elif op == "linear_logprobs_entropy":
        fn = providers.LINEAR_LOGPROBS_ENTROPY[provider]
        inputs = [
            torch.empty(case.tokens, case.hidden, dtype=dt).normal_().requires_grad_(True),
            torch.empty(case.vocab, case.hidden, dtype=dt).normal_(std=0.02).requires_grad_(True),
        ]
    else:
        raise ValueError(f"unknown op {op}")

    def step():
        return torch.autograd.grad(loss_of(fn(*inputs, labels)), inputs)

    step()
    _settle()
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    grads = step()
    peak = _status_kb("VmHWM")
    extra = (peak - before) * 1024
    return {
        "op": op,
        "provider": provider,
        "case": case.id,
        "dtype": dtype,
        "logits_bytes": case.tokens * case.vocab * torch.finfo(dt).bits // 8,
        "extra_bytes": extra,
        "extra_beyond_grad_bytes": extra - sum(g.numel() * g.element_size() for g in grads),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory")
    p.add_argument("--op", default="logprobs_entropy")
    p.add_argument("--provider", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--dtype", default="float32")
    a = p.parse_args(argv)
    print(json.dumps(measure(a.op, a.provider, a.model, a.tokens, a.dtype)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
