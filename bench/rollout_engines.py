"""Rollout throughput of the two engines, ``hf`` (transformers with a KV cache) and ``vllm``, on Qwen2 configs of three
sizes with random weights: tokens generated per second for a batch of prompts, the engine's start-up, and (vLLM) the
time of one weight sync from a trainer's model.

    python -m bench.rollout_engines                      # tiny, ~50M, ~500M; 64 prompts x 16 tokens; 1 thread
    python -m bench.rollout_engines --configs tiny --prompts 8 --tokens 4 --threads 2 --json out.json

Each (config, engine) runs in its own process, so neither engine's start-up, threads or memory touches the other's.
The engine is warmed up on the same batch first; the time is the best of ``--rounds`` timed batches.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    # the built-in tiny model's shape (spear.trainer.models)
    "tiny": dict(
        hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=384
    ),
    # ~47M parameters
    "50m": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=2048,
        vocab_size=32000,
    ),
    # Qwen2.5-0.5B's shape (~494M parameters)
    "500m": dict(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
    ),
    # a smoke-test size for the test suite
    "micro": dict(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=128
    ),
}
ENGINES = ("hf", "vllm")
PROMPT_LEN = 32


def model_dir(config: str) -> Path:
    """The config's model with random weights (seed 0) and the tiny math tokenizer, built once into the cache."""
    from spear.envs.base import cache_dir
    from spear.trainer.models import default_model_path

    path = cache_dir() / "bench-models" / f"qwen2-{config}"
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(default_model_path("math"))
    sizes = {"vocab_size": len(tokenizer), **CONFIGS[config]}
    torch.manual_seed(0)
    cfg = Qwen2Config(
        **sizes,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    Qwen2ForCausalLM(cfg).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, path)
    return path


def measure(config: str, engine_name: str, *, prompts: int, tokens: int, threads: int, rounds: int) -> dict:
    """One (config, engine) in this process: tokens/s of ``prompts`` prompts x ``tokens`` new tokens at T = 1."""
    import torch

    torch.set_num_threads(threads)
    from spear.trainer.engines import HFEngine, VLLMEngine
    from spear.trainer.models import load_policy

    path = model_dir(config)
    model, tokenizer = load_policy(path)
    params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    high = min(len(tokenizer), model.config.vocab_size)
    contexts = torch.randint(3, high, (prompts, PROMPT_LEN), generator=g).tolist()
    t0 = time.perf_counter()
    if engine_name == "hf":
        engine = HFEngine(model, tokenizer)
    else:
        engine = VLLMEngine(path, max_model_len=PROMPT_LEN + tokens + 8, seed=0, kv_cache_gib=1.0)
    startup = time.perf_counter() - t0
    kw = dict(max_new_tokens=[tokens] * prompts, stop_ids=set(), temperature=1.0, generator=g)
    engine.generate(contexts, **kw)  # warm-up
    best, generated = float("inf"), 0
    for _ in range(rounds):
        t = time.perf_counter()
        out = engine.generate(contexts, **kw)
        elapsed = time.perf_counter() - t
        if elapsed < best:
            best, generated = elapsed, sum(map(len, out))
    sync = engine.sync_weights(model) if engine_name == "vllm" else 0.0
    engine.close()
    return {
        "config": config,
        "params": params,
        "engine": engine_name,
        "threads": threads,
        "prompts": prompts,
        "new_tokens": tokens,
        "generated": generated,
        "seconds": best,
        "tokens_per_s": generated / best,
        "startup_s": startup,
        "weight_sync_s": sync,
    }


def run_one(config: str, engine: str, args) -> dict:
    """:func:`measure` in a fresh interpreter (vLLM's CPU worker binds its threads to ``threads`` cores)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env["VLLM_CPU_OMP_THREADS_BIND"] = "0" if args.threads == 1 else f"0-{args.threads - 1}"
    cmd = [sys.executable, "-m", "bench.rollout_engines", "--one", config, engine]
    cmd += ["--prompts", str(args.prompts), "--tokens", str(args.tokens), "--threads", str(args.threads)]
    cmd += ["--rounds", str(args.rounds)]
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"{config}/{engine} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = [
        "| config | parameters | engine | threads | start-up (s) | tokens/s | vllm / hf | weight sync (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    hf = {r["config"]: r["tokens_per_s"] for r in rows if r["engine"] == "hf"}
    for r in rows:
        ratio = f"{r['tokens_per_s'] / hf[r['config']]:.2f}x" if r["engine"] == "vllm" and r["config"] in hf else "-"
        sync = f"{r['weight_sync_s']:.3f}" if r["engine"] == "vllm" else "-"
        lines.append(
            f"| {r['config']} | {r['params'] / 1e6:,.1f}M | {r['engine']} | {r['threads']} | {r['startup_s']:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {ratio} | {sync} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,50m,500m")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--one", nargs=2, metavar=("CONFIG", "ENGINE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        row = measure(*args.one, prompts=args.prompts, tokens=args.tokens, threads=args.threads, rounds=args.rounds)
        print(json.dumps(row))
        return 0
    from spear.trainer.engines import vllm_available

    engines = [e for e in args.engines.split(",") if e != "vllm" or vllm_available()]
    if len(engines) < len(args.engines.split(",")):
        print("vLLM is not installed (make setup-vllm): measuring hf only", file=sys.stderr)
    rows = []
    for config in args.configs.split(","):
        if config not in CONFIGS:
            parser.error(f"unknown config {config!r}; known: {', '.join(CONFIGS)}")
        for engine in engines:
            rows.append(run_one(config, engine, args))
            print(f"{config} {engine}: {rows[-1]['tokens_per_s']:,.0f} tokens/s", file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
