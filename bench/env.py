"""What a benchmark row records about the machine and the software it ran on."""

from __future__ import annotations

import importlib.metadata
import platform
from functools import lru_cache

import torch


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


@lru_cache(maxsize=1)
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def machine_info() -> dict:
    info = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "versions": {d: _version(d) for d in ("torch", "triton", "verl", "spear-core", "liger-kernel")},
    }
    try:
        from spear_kernels import _C

        info["spear_cpu_capability"] = _C.cpu_capability()
    except ImportError:
        info["spear_cpu_capability"] = None
    return info
