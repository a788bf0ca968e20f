"""The rollout-engine benchmark (``python -m bench.rollout_engines``) on a micro model, so the script cannot rot:
every available engine generates the asked-for tokens and the table has a row for each."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers", reason="the train extra is not installed")

from . import rollout_engines  # noqa: E402


def test_every_available_engine_is_measured(tmp_path, capsys):
    from spear.trainer.engines import vllm_available

    out = tmp_path / "rows.json"
    args = ["--configs", "micro", "--prompts", "3", "--tokens", "4", "--rounds", "1", "--threads", "1"]
    assert rollout_engines.main([*args, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    engines = ["hf", "vllm"] if vllm_available() else ["hf"]
    assert [r["engine"] for r in rows] == engines
    for r in rows:
        assert 0 < r["generated"] <= 3 * 4 and r["tokens_per_s"] > 0 and r["params"] > 0
    table = capsys.readouterr().out
    assert table.count("| micro |") == len(engines)
