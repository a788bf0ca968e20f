"""The ``spear`` command line: ``train``, ``sft``, ``eval``, ``plot``, ``compare`` and ``build-model``.

    spear train --preset tiny_math_spear                      # the README's main job
    spear train --config my.yaml actor_rollout_ref.actor.optim.lr=1e-4 --resume
    spear sft --preset tiny_math --output runs/sft
    spear eval --preset tiny_math --model runs/tiny_math_spear/checkpoints/step_000080
    spear plot runs/tiny_math_spear
    spear compare --seeds 0 1 2 3 4 --jobs 2

Config keys come from ``--preset`` < ``--config`` < ``key=value`` overrides (``docs/config.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import UserError, available_presets, load_config
from .trainer.compare import ALIASES, DEFAULT_METHODS, DEFAULT_TASK, METHODS, PAPER_METHODS

# `spear compare --quick`: a smoke check of the whole pipeline in about a minute
QUICK_STEPS = 4
QUICK_OVERRIDES = (
    "sft.steps=40",
    "sft.num_examples=400",
    "env.num_eval_tasks=16",
    "trainer.test_freq=2",
    "trainer.save_freq=2",
)


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
    from .trainer import Trainer
    from .trainer.plot import plot_run

    cfg = _load(args)
    trainer = Trainer(cfg, resume=args.resume, progress=not args.quiet, allow_changes=args.allow_changes)
    final = trainer.fit()
    png = plot_run(trainer.run_dir)
    print(json.dumps({"run_dir": str(trainer.run_dir), "step": trainer.step, **final, "plot": str(png)}, indent=1))
    return 0


def cmd_sft(args) -> int:
    from .trainer import run_sft

    cfg = _load(args)
    out = Path(args.output or Path(cfg.trainer.default_local_dir) / "sft")
    summary = run_sft(cfg, out, model_path=args.model, progress=not args.quiet)
    if not args.no_eval:
        summary.update(_evaluate(cfg, out))
    print(json.dumps(summary, indent=1))
    return 0


def _evaluate(cfg, path) -> dict:
    """The held-out evaluation of the model in ``path`` on the rollout engine ``rollout.name`` names."""
    from .trainer import evaluate
    from .trainer.engines import make_engine
    from .trainer.models import load_configured_policy

    model, tokenizer = load_configured_policy(cfg, path)
    engine = make_engine(cfg, model, tokenizer, path)
    try:
        return evaluate(engine, tokenizer, cfg)
    finally:
        engine.close()


def cmd_eval(args) -> int:
    from .trainer import default_model_path

    cfg = _load(args)
    path = args.model or cfg.actor_rollout_ref.model.path or default_model_path(cfg.env.name)
    print(json.dumps({"model": str(path), **_evaluate(cfg, path)}, indent=1))
    return 0


def cmd_plot(args) -> int:
    from .trainer.plot import plot_run

    print(plot_run(args.run_dir, args.output))
    return 0


def cmd_build_model(args) -> int:
    from .trainer import build_tiny_model

    print(build_tiny_model(args.output, args.env))
    return 0


def cmd_compare(args) -> int:
    """Methods against each other over seeds from one cold-start SFT model (:mod:`spear.trainer.compare`)."""
    from .trainer.compare import DEFAULT_METHODS, DEFAULT_SEEDS, PAPER_METHODS, run_compare

    methods = args.methods or list(PAPER_METHODS if args.table == "paper" else DEFAULT_METHODS)
    seeds = args.seeds or (list(DEFAULT_SEEDS[:2]) if args.quick else list(DEFAULT_SEEDS))
    steps = args.steps or (QUICK_STEPS if args.quick else 0)
    overrides = list(args.overrides)
    if args.quick:
        overrides = [*QUICK_OVERRIDES, *overrides]
    results = run_compare(
        task=args.task,
        methods=methods,
        seeds=seeds,
        steps=steps,
        output=args.output,
        jobs=args.jobs,
        threshold=args.threshold,
        overrides=overrides,
        log=(lambda _msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True)),
    )
    if args.table == "paper":
        if "paper_table" not in results:
            raise UserError("--table paper needs a base method with its + SPEAR method among --methods")
        print(results["paper_table"])
    else:
        print(results["table"])
    if results["type_tables"]:
        print(results["type_tables"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spear", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run the SPEAR trainer")
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of the run directory")
    p.add_argument(
        "--allow-changes",
        action="store_true",
        help="with --resume: let trainer.{total_training_steps,save_freq,test_freq,logger,num_threads,"
        "val_before_train} differ from the run's config (any other change is refused)",
    )
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
    p.add_argument("--output", help="the PNG path, or a directory for curves.png (default: RUN_DIR/plots/curves.png)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("compare", help="methods against each other over seeds, with 95%% intervals")
    p.add_argument("--task", default=DEFAULT_TASK, help=f"the task preset (default {DEFAULT_TASK})")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=[*METHODS, *ALIASES],
        metavar="METHOD",
        help=f"methods (presets method_<name>): {', '.join(METHODS)}; {', '.join(ALIASES)} name drbot and spear "
        f"(default: {' '.join(DEFAULT_METHODS)}; with --table paper: {' '.join(PAPER_METHODS)})",
    )
    p.add_argument(
        "--table",
        choices=["methods", "paper"],
        default="methods",
        help="the table printed: one row per method, or the seed's results table (each base, + SPEAR, the "
        "difference; also written to results_paper.md whenever such pairs ran)",
    )
    p.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: 0 1 2 3 4; --quick: 0 1)")
    p.add_argument("--steps", type=int, default=0, help="training steps per run (default: the task preset's)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one torch thread each (default 2)")
    p.add_argument("--threshold", type=float, default=0.5, help="success for 'steps to threshold' (default 0.5)")
    p.add_argument("--output", help="the output directory (default: runs/compare_<task>)")
    p.add_argument("--quick", action="store_true", help="a smoke check: 2 seeds, few steps, a short SFT")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run and the SFT")
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
    except (UserError, OSError, ImportError) as err:  # OSError: missing or unwritable paths; other errors are bugs
        print(f"spear {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
