"""Turn a pytest-benchmark JSON into the report: ratio tables, charts, and the Triton AOT resource table.

    python -m bench.report [bench/results/latest.json] [--out bench/results] [--no-aot]

Every ratio compares rows measured in the same run. "speed-up vs X" is X's median time over
ours; "of read limit" / "of exp limit" is that limit's median time over ours (1.0 = running at it): one
streaming read of the bytes the op moves, and the exps it computes on this CPU capability ("cpu" column).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

OURS = ("cpp", "triton")
PEER_ORDER = ("torch", "verl", "verl-vectorized", "verl-compile", "verl-fused", "liger", "flash-attn")


def load_rows(path: Path) -> tuple[list[dict], dict]:
    data = json.loads(path.read_text())
    rows = []
    for b in data.get("benchmarks", []):
        info = dict(b.get("extra_info", {}))
        if "op" not in info:
            continue
        info["median_s"] = b["stats"]["median"]
        info["rounds"] = b["stats"]["rounds"]
        rows.append(info)
    machine = next((r for r in rows), {})
    return rows, machine


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.2f}"


LIMIT_NAMES = {"limit": "read limit", "limit-exp": "exp limit"}


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f}"


def timing_tables(rows: list[dict]) -> list[str]:
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        if r["mode"] == "memory":
            continue
        groups[(r["op"], r["case"], r["dtype"], r["mode"])][r["provider"]] = r
    out = []
    by_op: dict[str, list[tuple]] = defaultdict(list)
    for key in sorted(groups):
        by_op[key[0]].append(key)
    for op, keys in by_op.items():
        providers = sorted({p for k in keys for p in groups[k]}, key=_provider_rank)
        ours = [p for p in providers if p in OURS]
        limits = [p for p in providers if p.startswith("limit")]
        peers = [p for p in providers if p not in OURS and p not in limits]
        head = ["case", "dtype", "mode", "cpu", *[f"{p} (ms)" for p in providers]]
        for o in ours:
            head += [f"{o}: speed-up vs {p}" for p in peers]
            head += [f"{o}: of {LIMIT_NAMES.get(lim, lim)}" for lim in limits]
        out.append(f"### {op}: time\n")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + " --- |" * len(head))
        for key in keys:
            g = groups[key]
            cpu = next((r.get("spear_cpu_capability") for r in g.values() if r.get("spear_cpu_capability")), "-")
            cells = [key[1], key[2], key[3], str(cpu)]
            cells += [_ms(g[p]["median_s"]) if p in g else "-" for p in providers]
            for o in ours:
                for p in peers:
                    ok = o in g and p in g
                    cells.append(f"{g[p]['median_s'] / g[o]['median_s']:.1f}x" if ok else "-")
                for lim in limits:
                    ok = o in g and lim in g
                    cells.append(f"{g[lim]['median_s'] / g[o]['median_s']:.2f}" if ok else "-")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return out


def memory_tables(rows: list[dict]) -> list[str]:
    mem = [r for r in rows if r["mode"] == "memory"]
    if not mem:
        return []
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in mem:
        groups[(r["op"], r["case"], r["dtype"])][r["provider"]] = r
    providers = sorted({r["provider"] for r in mem}, key=_provider_rank)
    head = ["op", "case", "dtype", "logits (MB)", *[f"{p}: extra beyond grad (MB)" for p in providers]]
    head += [f"{o}: extra / logits" for o in providers if o in OURS]
    head += [f"{o}: peak vs {p}" for o in providers if o in OURS for p in providers if p not in OURS]
    out = ["### peak memory of fwd+bwd (fresh process; above the RSS before the call)\n"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + " --- |" * len(head))
    for key in sorted(groups):
        g = groups[key]
        logits = next(iter(g.values())).get("logits_bytes", 0)
        cells = [*key, _mb(logits)]
        cells += [_mb(g[p]["extra_beyond_grad_bytes"]) if p in g else "-" for p in providers]
        for o in (p for p in providers if p in OURS):
            cells.append(f"{g[o]['extra_beyond_grad_bytes'] / logits:.2%}" if o in g and logits else "-")
        for o in (p for p in providers if p in OURS):
            for p in (q for q in providers if q not in OURS):
                ok = o in g and p in g
                cells.append(f"{g[o]['extra_bytes'] / g[p]['extra_bytes']:.3f}x" if ok else "-")
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    return out


def _provider_rank(p: str) -> tuple:
    if p in OURS:
        return (0, OURS.index(p))
    if p.startswith("limit"):
        return (2, p)
    return (1, PEER_ORDER.index(p) if p in PEER_ORDER else 99, p)


def charts(rows: list[dict], out_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench.report: matplotlib is not installed; no charts", file=sys.stderr)
        return []
    paths = []
    for op in sorted({r["op"] for r in rows}):
        timed = [r for r in rows if r["op"] == op and r["mode"] != "memory"]
        if not timed:
            continue
        labels = sorted({(r["case"], r["dtype"], r["mode"]) for r in timed})
        providers = sorted({r["provider"] for r in timed}, key=_provider_rank)
        fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(labels)), 4.5))
        width = 0.8 / len(providers)
        for i, p in enumerate(providers):
            vals = []
            for lab in labels:
                match = [r for r in timed if (r["case"], r["dtype"], r["mode"]) == lab and r["provider"] == p]
                vals.append(match[0]["median_s"] * 1e3 if match else 0)
            ax.bar([j + i * width for j in range(len(labels))], vals, width, label=p)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
        ax.set_xticklabels(["\n".join(lab) for lab in labels], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("median time (ms, log scale)")
        ax.set_title(f"{op}: time per call (lower is better)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def aot_table() -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "spear_kernels.aot"], capture_output=True, text=True, env=env, timeout=1800
    )
    if proc.returncode not in (0, 1) or "| kernel |" not in proc.stdout:
        return ["### Triton AOT resources\n", f"(not available: {proc.stderr.strip().splitlines()[-1:]})", ""]
    body = proc.stdout[proc.stdout.index("| kernel |") :].strip()
    return ["### Triton kernels compiled for sm_80 / sm_90 (cuobjdump -res-usage)\n", body, ""]


def machine_line(machine: dict) -> str:
    if not machine:
        return ""
    v = machine.get("versions", {})
    gpu = machine.get("gpu") or "none"
    return (
        f"Machine: {machine.get('cpu')} ({machine.get('threads')} threads, kernels built for "
        f"{machine.get('spear_cpu_capability')}), GPU: {gpu}; torch {v.get('torch')}, triton {v.get('triton')}, "
        f"verl {v.get('verl')}."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument(
        "json",
        nargs="*",
        type=Path,
        default=[Path("bench/results/latest.json")],
        help="pytest-benchmark JSON file(s); rows of several runs are merged",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--no-aot", action="store_true", help="skip the Triton AOT resource table")
    args = parser.parse_args(argv)
    rows, machine = [], {}
    for path in args.json:
        if not path.exists():
            print(
                f"bench.report: {path} does not exist; run `make bench` (or pytest bench --benchmark-json=...)",
                file=sys.stderr,
            )
            return 2
        more, info = load_rows(path)
        rows += more
        machine = machine or info
    if not rows:
        print(f"bench.report: no spear benchmark rows in {', '.join(map(str, args.json))}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["## Benchmarks", "", machine_line(machine), ""]
    lines += timing_tables(rows)
    lines += memory_tables(rows)
    if not args.no_aot:
        lines += aot_table()
    pngs = charts(rows, args.out)
    lines += [f"![{p.stem}]({p.name})" for p in pngs]
    text = "\n".join(lines) + "\n"
    (args.out / "report.md").write_text(text)
    print(text)
    print(f"bench.report: wrote {args.out / 'report.md'} and {len(pngs)} chart(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
