"""Input checks shared by the public ops and the references: clear ValueErrors, never kernel crashes."""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100
"""Label value that marks a token to skip: its log-prob and entropy are 0 and its row gets no gradient."""

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a positive float, got {type(temperature).__name__}")
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a finite float > 0, got {temperature}")
    return t


def check_labels(labels: torch.Tensor, expected_shape: torch.Size, vocab: int, device: torch.device) -> None:
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise ValueError(f"labels must be an integer tensor (int64), got {labels.dtype}")
    if labels.shape != expected_shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal the leading shape {tuple(expected_shape)}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the inputs are on {device}")
    if labels.numel() == 0:
        return
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        value = labels[tuple(idx)].item()
        raise ValueError(
            f"label {value} at index {tuple(idx)} is out of range for a vocabulary of {vocab} "
            f"(valid: 0..{vocab - 1}, or {IGNORE_INDEX} to ignore the token)"
        )


def check_logits_labels(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """Validates ``logits [..., V]`` and ``labels [...]``; returns the temperature as a float."""
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension: [..., V]")
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    t = check_temperature(temperature)
    vocab = logits.shape[-1]
    if vocab == 0 and logits.numel() == 0 and logits.shape[:-1].numel() > 0:
        raise ValueError("logits have an empty vocabulary dimension (V = 0)")
    check_labels(labels, logits.shape[:-1], vocab, logits.device)
    return t


def check_hidden_weight_labels(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature) -> float:
    """Validates ``hidden [..., H]``, ``weight [V, H]`` (lm_head, no bias) and ``labels [...]``."""
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must be [..., H]")
    if weight.dim() != 2:
        raise ValueError(f"weight must be the lm_head matrix [V, H], got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"hidden size mismatch: hidden [..., {hidden.shape[-1]}] vs weight [V, {weight.shape[1]}]")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if weight.device != hidden.device:
        raise ValueError(f"hidden is on {hidden.device} but weight is on {weight.device}")
    t = check_temperature(temperature)
    if weight.shape[0] == 0 and hidden.shape[:-1].numel() > 0:
        raise ValueError("weight has an empty vocabulary dimension (V = 0)")
    check_labels(labels, hidden.shape[:-1], weight.shape[0], hidden.device)
    return t
