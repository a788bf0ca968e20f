"""pytest options for the benchmark suites (root conftest, so they apply however pytest is invoked).

pytest bench                      # full shapes, timings into pytest-benchmark
pytest bench --quick              # tiny shapes: a smoke run of every suite (CI)
pytest bench --benchmark-json=bench/results/latest.json && python -m bench.report
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="tiny shapes: check that every suite still runs")


@pytest.fixture(scope="session")
def shape_set(request) -> str:
    return "quick" if request.config.getoption("--quick") else "full"


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        if not hasattr(metafunc.module, "CASES"):
            raise pytest.UsageError(f"{metafunc.module.__name__} uses `case` but defines no CASES shape set")
        quick = metafunc.config.getoption("--quick")
        cases = metafunc.module.CASES["quick" if quick else "full"]
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])
