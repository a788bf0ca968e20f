"""Datasets for verl's trainer from the built-in environments: one parquet row per task seed.

    python -m spear.verl.recipe.data --env math --train 256 --val 64 --out data/math

Each row is verl's RLHF dataset format: ``prompt`` (one user message: the environment's first observation, for
verl's prompt-length filter and logs), ``agent_name: spear_env`` (the agent loop that plays the episode),
``data_source``, ``reward_model`` (unused: the agent loop scores the episode) and ``extra_info.seed`` (the task).
Training seeds are ``[0, train)``; validation seeds ``[eval_seed, eval_seed + val)``, held out as in the slim
trainer. The environment's settings (``spear.env.kwargs``) must be the run's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ...envs import make_env
from .agent_loop import AGENT_NAME


def rows(env_name: str, seeds, env_kwargs: dict | None = None) -> list[dict]:
    env = make_env(env_name, **(env_kwargs or {}))
    out = []
    for i, seed in enumerate(seeds):
        prompt = env.reset(int(seed))
        out.append(
            {
                "data_source": f"spear/{env_name}",
                "prompt": [{"role": "user", "content": prompt}],
                "agent_name": AGENT_NAME,
                "ability": "agent",
                "reward_model": {"style": "rule", "ground_truth": ""},
                "extra_info": {"seed": int(seed), "index": i, "env": env_name},
            }
        )
    if hasattr(env, "close"):
        env.close()
    return out


def write(
    out_dir: str | Path,
    env_name: str = "math",
    *,
    train: int = 256,
    val: int = 64,
    eval_seed: int = 1_000_000,
    env_kwargs: dict | None = None,
) -> dict[str, Path]:
    """Writes ``train.parquet`` and ``val.parquet`` under ``out_dir``; returns their paths."""
    import pandas as pd

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, seeds in (("train", range(train)), ("val", range(eval_seed, eval_seed + val))):
        path = out / f"{split}.parquet"
        pd.DataFrame(rows(env_name, seeds, env_kwargs)).to_parquet(path)
        paths[split] = path
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="math")
    parser.add_argument("--train", type=int, default=256)
    parser.add_argument("--val", type=int, default=64)
    parser.add_argument("--eval-seed", type=int, default=1_000_000)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    for split, path in write(args.out, args.env, train=args.train, val=args.val, eval_seed=args.eval_seed).items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
