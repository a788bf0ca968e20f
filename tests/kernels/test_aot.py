"""`python -m spear_kernels.aot` compiles every Triton kernel for sm_80/sm_90 with no spills."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from spear_kernels._triton import aot_specs


def test_aot_compiles_every_kernel_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out_json = tmp_path / "aot.json"
    proc = subprocess.run(
        [sys.executable, "-m", "spear_kernels.aot", "--arch", "80", "90", "--json", str(out_json)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out_json.read_text())
    expected = {(spec["name"], arch) for spec in aot_specs() for arch in ("sm_80", "sm_90")}
    assert {(r["kernel"], r["arch"]) for r in rows} == expected
    for r in rows:
        assert r["ok"] and r["local"] == 0, r
        assert 0 < r["reg"] <= 255, r
    assert "| logprobs_entropy_fwd[fp32] | sm_90 |" in proc.stdout


def test_aot_refuses_to_run_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "spear_kernels.aot"], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "unset TRITON_INTERPRET" in proc.stderr
