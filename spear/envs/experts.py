"""Expert transcripts: each environment's scripted expert played through, as text pieces.

They feed the cold-start SFT and the tiny model's tokenizer corpus.
"""

from __future__ import annotations

from collections.abc import Iterable


def expert_transcripts(
    env_name: str, seeds: Iterable[int], env_kwargs: dict | None = None
) -> list[list[tuple[str, bool]]]:
    """Expert episodes as ``[(text, is_assistant), ...]``: the prompt, then alternating turns and observations."""
    from . import make_env

    env = make_env(env_name, **(env_kwargs or {}))
    out = []
    for seed in seeds:
        pieces = [(env.reset(seed), False)]
        for turn in env.expert_turns():
            pieces.append((turn, True))
            result = env.step(turn)
            if result.observation:
                pieces.append((result.observation, False))
            if result.done:
                break
        out.append(pieces)
    if hasattr(env, "close"):
        env.close()
    return out
