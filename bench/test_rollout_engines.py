"""The rollout-engine benchmark (``python -m bench.rollout_engines``) on a micro model, so the script cannot rot: the
asked-for tokens are generated and the table has the row. The hf engine only: tests/trainer/test_vllm_engine.py
covers the vllm engine, whose start-up would double this smoke run."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers", reason="the train extra is not installed")

from . import rollout_engines  # noqa: E402


def test_the_benchmark_measures_an_engine(tmp_path, capsys):
    out = tmp_path / "rows.json"
    args = ["--configs", "micro", "--engines", "hf", "--prompts", "3", "--tokens", "4", "--rounds", "1"]
    assert rollout_engines.main([*args, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["engine"] for r in rows] == ["hf"]
    assert rows[0]["generated"] == 3 * 4 and rows[0]["tokens_per_s"] > 0 and rows[0]["params"] > 0
    assert capsys.readouterr().out.count("| micro |") == 1
