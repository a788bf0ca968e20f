"""The ``spear`` command line: ``train``, ``sft``, ``eval``, ``plot``, ``compare`` and ``build-model``.

    spear train --preset tiny_math_spear                      # the README's main job
    spear train --config my.yaml actor_rollout_ref.actor.optim.lr=1e-4 --resume
    spear sft --preset tiny_math --output runs/sft
    spear eval --preset tiny_math --model runs/tiny_math_spear/checkpoints/step_000080
    spear plot runs/tiny_math_spear
    spear compare --env math --seeds 0 1

Config keys come from ``--preset`` < ``--config`` < ``key=value`` overrides (``docs/config.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import ConfigError, available_presets, load_config
from .models import ModelLoadError

COMPARE_METHODS = ("grpo", "drbot", "spear")
METHOD_NAMES = {"grpo": "GRPO", "drbot": "GRPO + Dr.BoT", "spear": "GRPO + SPEAR"}


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a YAML config file")
    p.add_argument("--preset", help=f"a preset name ({', '.join(available_presets())})")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def _load(args):
    return load_config(args.config, preset=args.preset, overrides=args.overrides)


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a dependency of the trainer
        pass


def cmd_train(args) -> int:
    from .plot import plot_run
    from .trainer import Trainer

    cfg = _load(args)
    trainer = Trainer(cfg, resume=args.resume, progress=not args.quiet)
    final = trainer.fit()
    png = plot_run(trainer.run_dir)
    print(json.dumps({"run_dir": str(trainer.run_dir), "step": trainer.step, **final, "plot": str(png)}, indent=1))
    return 0


def cmd_sft(args) -> int:
    from .trainer import evaluate, run_sft

    cfg = _load(args)
    out = Path(args.output or Path(cfg.trainer.default_local_dir) / "sft")
    summary = run_sft(cfg, out, model_path=args.model, progress=not args.quiet)
    if not args.no_eval:
        from .models import load_policy

        model, tokenizer = load_policy(out)
        summary.update(evaluate(model, tokenizer, cfg))
    print(json.dumps(summary, indent=1))
    return 0


def cmd_eval(args) -> int:
    from .models import default_model_path, load_policy
    from .trainer import evaluate

    cfg = _load(args)
    path = args.model or cfg.actor_rollout_ref.model.path or default_model_path(cfg.env.name)
    model, tokenizer = load_policy(path)
    print(json.dumps({"model": str(path), **evaluate(model, tokenizer, cfg)}, indent=1))
    return 0


def cmd_plot(args) -> int:
    from .plot import plot_run

    print(plot_run(args.run_dir, args.output))
    return 0


def cmd_build_model(args) -> int:
    from .models import build_tiny_model

    print(build_tiny_model(args.output, args.env))
    return 0


def cmd_compare(args) -> int:
    """GRPO, Dr.BoT and SPEAR from one cold-start SFT model, same environment and seeds; prints a success table."""
    from .models import default_model_path, load_policy
    from .plot import success_table
    from .trainer import Trainer, evaluate, latest_checkpoint, read_metrics, run_sft, sft_is_current

    out = Path(args.output or f"runs/compare_{args.env}")
    presets = {m: f"tiny_{args.env}_{m}" for m in COMPARE_METHODS}
    for name in presets.values():
        if name not in available_presets():
            raise ConfigError(f"spear compare --env {args.env}: no preset {name!r}")
    base = load_config(preset=f"tiny_{args.env}", overrides=args.overrides)
    sft_dir = out / "sft"
    base_model = base.actor_rollout_ref.model.path or default_model_path(base.env.name)
    if not sft_is_current(base, base_model, sft_dir):
        run_sft(base, sft_dir, model_path=base_model, progress=not args.quiet)
    model, tokenizer = load_policy(sft_dir)
    start = evaluate(model, tokenizer, base)["val/success"]
    rows: dict[str, dict[str, float]] = {"SFT (start)": {f"seed {s}": start for s in args.seeds}}
    for method, preset in presets.items():
        rows[METHOD_NAMES[method]] = {}
        for seed in args.seeds:
            run_dir = out / f"{method}_seed{seed}"
            extra = [
                f"actor_rollout_ref.model.path={sft_dir}",
                "trainer.cold_start_sft=false",
                f"trainer.seed={seed}",
                f"trainer.default_local_dir={run_dir}",
            ]
            if args.steps:
                extra.append(f"trainer.total_training_steps={args.steps}")
            cfg = load_config(preset=preset, overrides=list(args.overrides) + extra)
            latest = latest_checkpoint(run_dir)
            done = latest is not None and latest.name == f"step_{cfg.trainer.total_training_steps:06d}"
            if not done:
                if not args.quiet:
                    print(f"== {METHOD_NAMES[method]}, seed {seed} -> {run_dir}", file=sys.stderr)
                Trainer(cfg, resume=latest is not None, progress=not args.quiet).fit()
            evals = [r for r in read_metrics(run_dir) if "val/success" in r]
            rows[METHOD_NAMES[method]][f"seed {seed}"] = evals[-1]["val/success"]
    table = success_table(rows, [f"seed {s}" for s in args.seeds])
    (out / "results.md").write_text(
        f"Evaluation success (%) on {base.env.num_eval_tasks} held-out {args.env} tasks after "
        f"{args.steps or 'the preset'} steps.\n\n{table}\n"
    )
    print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spear", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run the SPEAR trainer")
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of the run directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sft", help="cold-start SFT on expert trajectories")
    _config_args(p)
    p.add_argument("--model", help="the model to fine-tune (default: actor_rollout_ref.model.path or the tiny model)")
    p.add_argument("--output", help="where to save the model (default: <trainer.default_local_dir>/sft)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("eval", help="evaluate a model on the held-out tasks")
    _config_args(p)
    p.add_argument("--model", help="a model directory (default: actor_rollout_ref.model.path or the tiny model)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("plot", help="write PNG curves of a run")
    p.add_argument("run_dir")
    p.add_argument("--output", help="the PNG path (default: RUN_DIR/plots/curves.png)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("compare", help="GRPO vs Dr.BoT vs SPEAR on the same environment and seeds")
    p.add_argument("--env", default="math", help="the environment (presets tiny_<env>_{grpo,drbot,spear})")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=0, help="training steps per run (default: the preset's)")
    p.add_argument("--output", help="the output directory (default: runs/compare_<env>)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("build-model", help="build the tiny Qwen2 model and tokenizer for an environment")
    p.add_argument("--env", default="math")
    p.add_argument("--output", required=True)
    p.set_defaults(func=cmd_build_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_transformers()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except (ConfigError, ModelLoadError, FileNotFoundError, ImportError, ValueError) as err:
        print(f"spear {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
