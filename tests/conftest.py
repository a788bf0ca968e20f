import os

import pytest
import torch

# Triton kernels run on CPU tensors through Triton's interpreter when no GPU is present.
# It must be set before any spear_kernels Triton module is imported (it is read at @triton.jit time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A very small model (1 layer, hidden 32) with the math tokenizer: fast enough for many trainer runs."""
    pytest.importorskip("transformers", reason="the train extra is not installed")
    from spear.trainer.models import build_tiny_model

    path = tmp_path_factory.mktemp("models") / "micro-math"
    return build_tiny_model(
        path,
        "math",
        corpus_episodes=300,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
    )


@pytest.fixture(scope="session")
def sft_model(tiny_model, tmp_path_factory):
    """The micro model after a short SFT: it writes tags and sometimes solves tasks, so rewards vary."""
    from helpers import small_cfg

    from spear.trainer import run_sft

    out = tmp_path_factory.mktemp("models") / "micro-math-sft"
    cfg = small_cfg(
        tiny_model, out.parent / "unused", "sft.steps=120", "sft.lr=5e-3", "sft.num_examples=512", "sft.batch_size=16"
    )
    run_sft(cfg, out, progress=False)
    return out
