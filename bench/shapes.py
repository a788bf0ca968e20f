"""Named model configs and the shape sets each suite runs. Suites take shapes from here, never inline."""

from __future__ import annotations

from dataclasses import dataclass

MODELS = {
    # name: (hidden size, vocabulary size)
    "qwen2.5-0.5b": (896, 151936),
    "qwen2.5-7b": (3584, 152064),
    "llama-3-8b": (4096, 128256),
    "llama-2-7b": (4096, 32000),
    "tiny": (64, 1031),  # quick mode: keeps the suites from rotting in CI
}


@dataclass(frozen=True)
class Case:
    model: str
    tokens: int

    @property
    def hidden(self) -> int:
        return MODELS[self.model][0]

    @property
    def vocab(self) -> int:
        return MODELS[self.model][1]

    @property
    def id(self) -> str:
        return f"{self.model}-T{self.tokens}"


LINEAR_LOGPROBS_ENTROPY = {
    "full": [Case("qwen2.5-0.5b", 512)],
    "extended": [Case("qwen2.5-7b", 256), Case("llama-3-8b", 256)],
    "quick": [Case("tiny", 64)],
}

LOGPROBS_ENTROPY = {
    "full": [Case("llama-2-7b", 2048), Case("qwen2.5-0.5b", 2048)],
    "extended": [Case("qwen2.5-7b", 2048), Case("llama-3-8b", 2048)],
    "quick": [Case("tiny", 64)],
}


@dataclass(frozen=True)
class RolloutCase:
    """A rollout batch: ``batch`` responses in groups of ``group_size``, responses ``length`` tokens wide."""

    batch: int
    group_size: int
    length: int

    @property
    def id(self) -> str:
        return f"B{self.batch}-n{self.group_size}-L{self.length}"


GROUP_ADVANTAGES = {
    # length 1: the op itself (one score per response -> its advantage), every provider doing the same work;
    # length 512: verl's whole estimator contract, token rewards [B, L] -> advantages [B, L], where summing the
    # rewards and broadcasting over the mask (the same for every provider) dominate.
    "full": [
        RolloutCase(1024, 8, 1),
        RolloutCase(1024, 16, 1),
        RolloutCase(16384, 8, 1),
        RolloutCase(16384, 16, 1),
        RolloutCase(16384, 16, 512),
    ],
    "quick": [RolloutCase(64, 8, 16)],
}

POLICY_LOSS = {
    "full": [RolloutCase(256, 8, 4096)],
    "quick": [RolloutCase(8, 4, 64)],
}
