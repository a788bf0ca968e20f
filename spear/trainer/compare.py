"""``spear compare``: methods against each other on one task, over seeds, from one shared cold-start SFT model.

    spear compare                                   # the built-in task, 5 methods x 5 seeds, two runs at a time
    spear compare --task tiny_math --methods grpo spear --seeds 0 1 2 --steps 30
    spear compare --quick                           # 2 seeds, few steps: a smoke check

Each (method, seed) is a ``spear train`` run of the presets ``[method_<method>, <task>]`` in
``<output>/<method>_seed<seed>``, started from ``<output>/sft``. Runs go in subprocesses (``--jobs`` at a time, one
torch thread each); an interrupted compare resumes: finished runs are read back, unfinished ones resume from their
last checkpoint, and the SFT model is reused while its config is unchanged. Outputs: ``results.json`` (every run's
curves and summary, every method's means with 95% bootstrap intervals over seeds), ``results.md`` and
``curves.png``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from ..config import ConfigError, SpearConfig, UserError, available_presets, load_config, to_dict

METHODS = {
    "grpo": "GRPO",
    "drbot": "GRPO + Dr.BoT",
    "spear": "GRPO + SPEAR",
    "spear_replay_only": "SPEAR: replay only",
    "spear_toolreward_only": "SPEAR: tool reward only",
    "grpo_spear": "GRPO + SPEAR (no Dr.BoT)",
    "gigpo": "GiGPO",
    "gigpo_spear": "GiGPO + SPEAR (no Dr.BoT)",
    "drbot_gigpo": "GiGPO + Dr.BoT",
    "drbot_gigpo_spear": "GiGPO + Dr.BoT + SPEAR",
}
# the paper's names for two of them (Dr.BoT(GRPO) is method_drbot; Dr.BoT(GRPO) + SPEAR is method_spear)
ALIASES = {"drbot_grpo": "drbot", "drbot_grpo_spear": "spear"}
DEFAULT_METHODS = ("grpo", "drbot", "spear", "spear_replay_only", "spear_toolreward_only")
# the seed's results table: (its row name, the base method, the base + SPEAR method)
PAPER_ROWS = (
    ("GRPO", "grpo", "grpo_spear"),
    ("Dr.BoT(GRPO)", "drbot", "spear"),
    ("GiGPO", "gigpo", "gigpo_spear"),
    ("Dr.BoT(GiGPO)", "drbot_gigpo", "drbot_gigpo_spear"),
)
PAPER_METHODS = tuple(m for _, base, plus in PAPER_ROWS for m in (base, plus))
DEFAULT_TASK = "tiny_math_hard"
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
# the per-run summary: key -> (label, unit scale for the table)
SUMMARY = {
    "auc": ("success AUC (%)", 100.0),
    "final": ("final success (%)", 100.0),
    "unseen_final": ("final success, unseen games (%)", 100.0),
    "steps_to_threshold": ("steps to threshold", 1.0),
    "tool_turns": ("tool calls / episode", 1.0),
    "replay_events": ("replay events", 1.0),
    "replay_share": ("replay share of update rows (%)", 100.0),
    "signal_groups": ("groups with a signal (%)", 100.0),
}
# keys a run has only when its task reports them (the unseen evaluation: env.unseen_eval_tasks)
OPTIONAL = {"unseen_final"}
# the seed's ALFWorld columns, by ALFWorld's task type
TASK_TYPE_NAMES = {
    "pick_and_place_simple": "Pick",
    "look_at_obj_in_light": "Look",
    "pick_clean_then_place_in_recep": "Clean",
    "pick_heat_then_place_in_recep": "Heat",
    "pick_cool_then_place_in_recep": "Cool",
    "pick_two_obj_and_place": "Pick2",
}


# ---- one run --------------------------------------------------------------------------------------


def run_config(task: str, method: str, overrides: Sequence[str], extra: Sequence[str]) -> SpearConfig:
    """The config of one run: ``method_<method>``, then the task preset (a task may size the method's replay buffer
    for its batch), then the user's overrides, then ``extra``."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    return load_config(preset=[f"method_{method}", task], overrides=[*overrides, *extra])


def summarize_run(records: Sequence[dict], total_steps: int, threshold: float) -> dict:
    """A run's evaluation curve and summary from its ``metrics.jsonl`` records.

    ``auc``: the area under the evaluation success curve over ``[0, total_steps]`` (trapezoids between evaluations)
    divided by ``total_steps``: the mean success over training. ``steps_to_threshold``: the first evaluated step with
    success >= ``threshold`` (``total_steps`` when never reached: censored, and ``reached`` says so).
    ``unseen_final``: the last evaluation's success on the unseen games (when the run evaluated on them);
    ``by_type`` / ``unseen_by_type``: the last evaluation's success per task type. ``replay_share``: replayed rows
    / (replayed + on-policy rows) over the run. ``signal_groups``: the mean share of groups whose scores differ (the
    groups that give GRPO a non-zero advantage).
    """
    evals = [(int(r["step"]), float(r["val/success"])) for r in records if "val/success" in r]
    if not evals or evals[0][0] != 0 or evals[-1][0] != total_steps:
        raise UserError(
            f"the run needs evaluations at step 0 and at step {total_steps}; it has steps {[s for s, _ in evals]}"
        )
    area = sum((s1 - s0) * (v0 + v1) / 2 for (s0, v0), (s1, v1) in zip(evals, evals[1:], strict=False))
    reached = [s for s, v in evals if v >= threshold]
    train = [r for r in records if "train/success" in r]
    replayed = sum(float(r.get("replay/batch_size", 0.0)) for r in train)
    on_policy = sum(float(r.get("rollout_filter/rows_kept", 0.0)) for r in train)
    tool = [(int(r["step"]), float(r["val/tool_turns"])) for r in records if "val/tool_turns" in r]
    last = [r for r in records if "val/success" in r][-1]
    optional = {"unseen_final": float(last["val_unseen/success"])} if "val_unseen/success" in last else {}
    return optional | {
        "curve": {"step": [s for s, _ in evals], "success": [v for _, v in evals]},
        "tool_curve": {"step": [s for s, _ in tool], "tool_turns": [v for _, v in tool]},
        "train_success": [float(r["train/success"]) for r in train],
        "replay_steps": [int(r["step"]) for r in train if "replay/batch_size" in r],
        "auc": area / total_steps,
        "final": evals[-1][1],
        "steps_to_threshold": float(reached[0]) if reached else float(total_steps),
        "reached": bool(reached),
        "tool_turns": tool[-1][1] if tool else 0.0,
        "replay_events": float(train[-1].get("replay/events", 0.0)) if train else 0.0,
        "replay_share": replayed / (replayed + on_policy) if replayed + on_policy else 0.0,
        "signal_groups": _mean([float(r["advantage/signal_groups"]) for r in train if "advantage/signal_groups" in r]),
        "by_type": _by_type(last, "val/success/"),
        "unseen_by_type": _by_type(last, "val_unseen/success/"),
    }


def _by_type(record: dict, prefix: str) -> dict[str, float]:
    return {k[len(prefix) :]: float(v) for k, v in sorted(record.items()) if k.startswith(prefix)}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


# ---- statistics -----------------------------------------------------------------------------------


def bootstrap_ci(values: Sequence[float], *, resamples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean over seeds and its 95% percentile-bootstrap interval (seeds resampled with
    replacement). One value gives a zero-width interval."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    means = x[np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    return float(x.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _stats(values: Sequence[float]) -> dict:
    mean, low, high = bootstrap_ci(values)
    return {"mean": mean, "low": low, "high": high, "values": list(values)}


def aggregate(runs: dict[str, dict[int, dict]]) -> dict[str, dict[str, dict]]:
    """Per method and summary key (the :data:`OPTIONAL` ones when every run has them): mean, 95% bootstrap
    interval, and the per-seed values; ``by_type`` / ``unseen_by_type``: the same per task type that every run
    evaluated."""
    out: dict[str, dict[str, dict]] = {}
    for method, by_seed in runs.items():
        seeds = sorted(by_seed)
        out[method] = {}
        for key in SUMMARY:
            if key in OPTIONAL and not all(key in by_seed[s] for s in seeds):
                continue
            out[method][key] = _stats([by_seed[s][key] for s in seeds])
        out[method]["reached"] = {"count": sum(by_seed[s]["reached"] for s in seeds), "of": len(seeds)}
        for key in ("by_type", "unseen_by_type"):
            types = [t for t in by_seed[seeds[0]].get(key, {}) if all(t in by_seed[s].get(key, {}) for s in seeds)]
            out[method][key] = {t: _stats([by_seed[s][key][t] for s in seeds]) for t in types}
    return out


def _cell(stats: dict, scale: float = 100.0) -> str:
    return f"{stats['mean'] * scale:.1f} [{stats['low'] * scale:.1f}, {stats['high'] * scale:.1f}]"


def markdown_table(summary: dict[str, dict[str, dict]], sft_success: float, sft_unseen: float | None = None) -> str:
    """Mean [95% interval] per method and summary key (those every method has)."""
    keys = [k for k in SUMMARY if all(k in stats for stats in summary.values())]
    lines = [
        "| method | " + " | ".join(SUMMARY[k][0] for k in keys) + " |",
        "|" + " --- |" * (len(keys) + 1),
    ]
    for method, stats in summary.items():
        cells = []
        for k in keys:
            cell = _cell(stats[k], SUMMARY[k][1])
            if k == "steps_to_threshold":
                cell += f" ({stats['reached']['count']}/{stats['reached']['of']} reached)"
            cells.append(cell)
        lines.append(f"| {METHODS[method]} | " + " | ".join(cells) + " |")
    start = [
        f"{100 * sft_success:.1f}"
        if k in ("auc", "final")
        else f"{100 * sft_unseen:.1f}"
        if k == "unseen_final" and sft_unseen is not None
        else ""
        for k in keys
    ]
    lines.append("| SFT start | " + " | ".join(start) + " |")
    return "\n".join(lines)


def paired_difference(summary: dict, base: str, plus: str, key: str = "final") -> tuple[float, float, float]:
    """``(mean, low, high)`` of ``plus - base`` on ``key`` over the seeds both ran (paired by seed; 95% bootstrap)."""
    a, b = summary[base][key]["values"], summary[plus][key]["values"]
    return bootstrap_ci([y - x for x, y in zip(a, b, strict=True)])


def paper_table(summary: dict[str, dict[str, dict]]) -> str:
    """The seed's results table in shape, for the pairs of :data:`PAPER_ROWS` that ran: each base method, then
    ``+ SPEAR`` with its difference in final success (paired by seed, 95% interval) and whether the two methods'
    intervals on final success are apart. Success AUC, steps to threshold, the unseen games' final success (when
    evaluated) and replay events beside."""
    pairs = [(name, base, plus) for name, base, plus in PAPER_ROWS if base in summary and plus in summary]
    if not pairs:
        raise UserError(
            "--table paper needs at least one base method with its + SPEAR method: "
            + ", ".join(f"{base} + {plus}" for _, base, plus in PAPER_ROWS)
        )
    unseen = all("unseen_final" in summary[m] for _, base, plus in pairs for m in (base, plus))
    head = ["method", "final success (%)", "+ SPEAR: difference (%)", "intervals apart", "success AUC (%)"]
    head += ["steps to threshold"] + (["unseen games: final success (%)"] if unseen else []) + ["replay events"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def cells(stats) -> str:
        stt = stats["steps_to_threshold"]
        out = [_cell(stats["auc"]), f"{stt['mean']:.1f} ({stats['reached']['count']}/{stats['reached']['of']} reached)"]
        out += [_cell(stats["unseen_final"])] if unseen else []
        return " | ".join(out + [f"{stats['replay_events']['mean']:.1f}"])

    for name, base, plus in pairs:
        mean, low, high = paired_difference(summary, base, plus)
        apart = "yes" if non_overlapping(summary, plus, base, "final") else "no"
        lines.append(f"| {name} | {_cell(summary[base]['final'])} | | | {cells(summary[base])} |")
        lines.append(
            f"| + SPEAR | {_cell(summary[plus]['final'])} | {100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] "
            f"| {apart} | {cells(summary[plus])} |"
        )
    return "\n".join(lines)


def _task_types(summary: dict[str, dict[str, dict]], key: str) -> list[str]:
    """The task types any method reported under ``key``, in the seed's column order."""
    order = list(TASK_TYPE_NAMES)
    return sorted(
        {t for stats in summary.values() for t in stats.get(key, {})},
        key=lambda t: (order.index(t) if t in order else len(order), t),
    )


def task_type_table(summary: dict[str, dict[str, dict]], key: str = "by_type") -> str:
    """Final success per task type (the seed's ALFWorld columns), mean [95% interval] per method; ``key``:
    ``by_type`` (the evaluation games) or ``unseen_by_type``. Empty when no run reported task types."""
    types = _task_types(summary, key)
    if not types:
        return ""
    lines = [
        "| method | " + " | ".join(TASK_TYPE_NAMES.get(t, t) for t in types) + " |",
        "|" + " --- |" * (len(types) + 1),
    ]
    for method, stats in summary.items():
        row = [_cell(stats[key][t]) if t in stats.get(key, {}) else "" for t in types]
        lines.append(f"| {METHODS[method]} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_compare(runs: dict[str, dict[int, dict]], out: Path, title: str) -> Path:
    """Mean evaluation success and tool calls per episode against the step, with 95% bootstrap bands over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for method, by_seed in runs.items():
        seeds = sorted(by_seed)
        for ax, curve, key in ((axes[0], "curve", "success"), (axes[1], "tool_curve", "tool_turns")):
            steps = by_seed[seeds[0]][curve]["step"]
            if not steps or any(by_seed[s][curve]["step"] != steps for s in seeds):
                continue
            stats = [bootstrap_ci([by_seed[s][curve][key][i] for s in seeds]) for i in range(len(steps))]
            (line,) = ax.plot(steps, [m for m, _, _ in stats], marker="o", markersize=3, label=METHODS[method])
            ax.fill_between(
                steps, [lo for _, lo, _ in stats], [hi for _, _, hi in stats], alpha=0.2, color=line.get_color()
            )
        train = [by_seed[s]["train_success"] for s in seeds]
        width = min(len(t) for t in train)
        if width:
            mean = [sum(t[i] for t in train) / len(train) for i in range(width)]
            smooth = [sum(mean[max(0, i - 4) : i + 1]) / len(mean[max(0, i - 4) : i + 1]) for i in range(width)]
            axes[2].plot(range(1, width + 1), smooth, label=METHODS[method])
    for ax, name in zip(
        axes,
        (
            "evaluation success",
            "tool calls per episode (evaluation)",
            "training success (mean over seeds, 5-step average)",
        ),
        strict=True,
    ):
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


# ---- the experiment -------------------------------------------------------------------------------


_children: set[subprocess.Popen] = set()  # the runs in progress (interrupted together)
_children_lock = threading.Lock()


def _train(cfg_path: Path, run_dir: Path, resume: bool) -> None:
    cmd = [sys.executable, "-m", "spear.cli", "train", "--config", str(cfg_path), "--quiet"]
    if resume:
        cmd += ["--resume", "--allow-changes"]  # e.g. more --steps; a changed method or task is still refused
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(run_dir / "train.log", "a") as log:
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        with _children_lock:
            _children.add(child)
        try:
            code = child.wait()
        finally:
            with _children_lock:
                _children.discard(child)
    if code != 0:
        raise RuntimeError(f"the run in {run_dir} failed (exit {code}); see {run_dir / 'train.log'}")


def _interrupt_children() -> None:
    """SIGINT to every run in progress: each finishes its current step, saves it and exits (``--resume`` goes on)."""
    with _children_lock:
        for child in list(_children):
            if child.poll() is None:
                child.send_signal(signal.SIGINT)


# what `spear compare` sets for every run itself: an override of one of these would be silently replaced
COMPARE_OWNS = {
    "trainer.seed": "--seeds",
    "trainer.default_local_dir": "--output",
    "trainer.cold_start_sft": "the shared cold-start SFT",
    "trainer.val_before_train": "the step-0 evaluation every run has",
    "trainer.num_threads": "one thread per run (--jobs runs at a time)",
    "trainer.logger": "console logging into each run's train.log",
}


def run_compare(
    *,
    task: str = DEFAULT_TASK,
    methods: Sequence[str] = DEFAULT_METHODS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    steps: int = 0,
    output: str | Path | None = None,
    jobs: int = 2,
    threshold: float = 0.5,
    overrides: Sequence[str] = (),
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True),
) -> dict:
    """Runs (or resumes) the comparison and writes ``results.json``, ``results.md`` and ``curves.png`` in ``output``;
    returns the results."""
    from .checkpoint import latest_checkpoint
    from .evaluation import evaluate
    from .metrics import read_metrics
    from .models import default_model_path, load_configured_policy
    from .sft import run_sft, sft_is_current

    if task not in available_presets():
        raise ConfigError(f"unknown task preset {task!r}; available: {', '.join(available_presets())}")
    methods = list(dict.fromkeys(ALIASES.get(m, m) for m in methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"unknown methods {unknown}; available: {', '.join(METHODS)}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must be distinct and non-empty, got {list(seeds)}")
    if jobs < 1 or steps < 0 or not 0 < threshold <= 1:
        raise ConfigError("--jobs must be >= 1, --steps >= 0 and --threshold in (0, 1]")
    for item in overrides:
        key = item.split("=", 1)[0].strip().lstrip("+")
        if key in COMPARE_OWNS:
            raise ConfigError(f"spear compare sets {key} for every run itself (use {COMPARE_OWNS[key]}): drop {item!r}")
    out = Path(output or f"runs/compare_{task}")
    base = load_config(preset=task, overrides=overrides)
    out.mkdir(parents=True, exist_ok=True)
    sft_dir = out / "sft"
    base_model = base.actor_rollout_ref.model.path or default_model_path(base.env.name)
    if not sft_is_current(base, base_model, sft_dir):
        log(f"== cold-start SFT of {base_model} -> {sft_dir}")
        run_sft(base, sft_dir, model_path=base_model, progress=False)
    model, tokenizer = load_configured_policy(base, sft_dir)
    sft_eval = evaluate(model, tokenizer, base)
    del model
    unseen_text = f", on unseen games {sft_eval['val_unseen/success']:.3f}" if "val_unseen/success" in sft_eval else ""
    log(
        f"== SFT start: success {sft_eval['val/success']:.3f}{unseen_text}, "
        f"tool calls/episode {sft_eval['val/tool_turns']:.2f}"
    )

    plans = []
    for method in methods:
        for seed in seeds:
            run_dir = out / f"{method}_seed{seed}"
            extra = [
                f"actor_rollout_ref.model.path={sft_dir.resolve()}",
                "trainer.cold_start_sft=false",
                "trainer.val_before_train=true",
                f"trainer.seed={seed}",
                f"trainer.default_local_dir={run_dir.resolve()}",
                "trainer.num_threads=1",
                "trainer.logger=[console]",
            ]
            if steps:
                extra.append(f"trainer.total_training_steps={steps}")
            cfg = run_config(task, method, overrides, extra)
            plans.append((method, seed, run_dir, cfg))
    total = {m: cfg.trainer.total_training_steps for m, _, _, cfg in plans}

    stopping = threading.Event()  # set on Ctrl-C or a failed run: queued runs do not start

    def launch(plan) -> None:
        if stopping.is_set():
            return
        try:
            start(plan)
        except BaseException:
            stopping.set()
            raise

    def start(plan) -> None:
        method, seed, run_dir, cfg = plan
        latest = latest_checkpoint(run_dir)
        if latest is not None and latest.name == f"step_{cfg.trainer.total_training_steps:06d}":
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg_path = run_dir / "compare_config.yaml"
        cfg_path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        t0 = time.perf_counter()
        log(f"== {METHODS[method]}, seed {seed}: {'resuming' if latest else 'starting'} -> {run_dir}")
        _train(cfg_path, run_dir, resume=latest is not None)
        log(f"== {METHODS[method]}, seed {seed}: done in {time.perf_counter() - t0:.0f} s")

    pool = ThreadPoolExecutor(max_workers=jobs)
    futures = [pool.submit(launch, plan) for plan in plans]
    try:
        for future in futures:
            future.result()
    except BaseException:  # Ctrl-C (or a failed run): no queued run starts; the running ones stop at a step boundary
        stopping.set()
        for future in futures:
            future.cancel()
        _interrupt_children()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()

    runs: dict[str, dict[int, dict]] = {m: {} for m in methods}
    for method, seed, run_dir, cfg in plans:
        runs[method][seed] = summarize_run(read_metrics(run_dir), cfg.trainer.total_training_steps, threshold)
    summary = aggregate(runs)
    results = {
        "task": task,
        "methods": list(methods),
        "seeds": list(seeds),
        "total_steps": total,
        "threshold": threshold,
        "overrides": list(overrides),
        "sft": sft_eval,
        "summary": summary,
        "runs": {m: {str(s): r for s, r in by_seed.items()} for m, by_seed in runs.items()},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    steps_text = ", ".join(sorted({str(v) for v in total.values()}))
    table = markdown_table(summary, sft_eval["val/success"], sft_eval.get("val_unseen/success"))
    unseen = (
        f" and on {base.env.unseen_eval_tasks} unseen games ({_kwargs_text(base.env.unseen_kwargs)})"
        if base.env.unseen_eval_tasks
        else ""
    )
    setting = (
        f"`{task}`: {len(seeds)} seeds ({', '.join(map(str, seeds))}), {steps_text} steps; final success on "
        f"{base.env.num_eval_tasks} evaluation tasks{unseen}, mean [95% bootstrap interval over seeds]"
    )
    types = _type_tables(summary, sft_eval)
    (out / "results.md").write_text(f"{setting}; threshold {threshold:g}.\n\n{table}\n{types}")
    plot_compare(runs, out / "curves.png", f"{task}: mean over {len(seeds)} seeds, 95% bootstrap bands")
    results["table"] = table
    results["type_tables"] = types
    if any(base in summary and plus in summary for _, base, plus in PAPER_ROWS):
        results["paper_table"] = paper_table(summary)
        (out / "results_paper.md").write_text(
            f"{setting}; the difference is paired by seed; the seed's table in shape.\n\n"
            f"{results['paper_table']}\n{types}"
        )
    return results


def _kwargs_text(kwargs: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in kwargs.items()) or "env.kwargs"


def _type_tables(summary: dict, sft_eval: dict) -> str:
    """The per-task-type tables (evaluation games, then unseen games) as a markdown section, with the SFT start."""
    text = ""
    for key, prefix, title in (
        ("by_type", "val/success/", "Final success per task type (%)"),
        ("unseen_by_type", "val_unseen/success/", "Final success per task type on the unseen games (%)"),
    ):
        table = task_type_table(summary, key)
        if table:
            start = [
                f"{100 * sft_eval[prefix + t]:.1f}" if prefix + t in sft_eval else "" for t in _task_types(summary, key)
            ]
            text += f"\n{title}:\n\n{table}\n| SFT start | " + " | ".join(start) + " |\n"
    return text


def non_overlapping(summary: dict, better: str, worse: str, key: str = "auc") -> bool:
    """True when ``better``'s 95% interval on ``key`` lies entirely above ``worse``'s."""
    return summary[better][key]["low"] > summary[worse][key]["high"]


__all__ = [
    "ALIASES",
    "DEFAULT_METHODS",
    "PAPER_METHODS",
    "PAPER_ROWS",
    "paired_difference",
    "paper_table",
    "DEFAULT_SEEDS",
    "DEFAULT_TASK",
    "METHODS",
    "aggregate",
    "bootstrap_ci",
    "markdown_table",
    "non_overlapping",
    "run_compare",
    "run_config",
    "summarize_run",
    "task_type_table",
]
