# Entry points (README): `make run` (set up + the main job) and `make test` (set up + the tests).
# Both create/reuse one virtual environment at .venv.
PYTHON ?= python3
VENV ?= .venv
# torch is installed first, from this spec, and the C++ extension is built against it.
# GPU users: make TORCH_SPEC=torch==2.6.0 TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.spear-installed
BENCH_JSON ?= bench/results/latest.json

.PHONY: setup run bench bench-quick report test lint aot clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.h)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet '$(TORCH_SPEC)' $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) \
		setuptools wheel cmake ninja pybind11
	$(BIN)/python -m pip install --quiet --no-build-isolation -e '.[dev]'
	@touch $@

# The main job: every benchmark suite against its peers and the limit, then the report.
run: bench

bench: setup
	$(BIN)/python -m pytest bench -q -p no:cacheprovider --benchmark-json=$(BENCH_JSON)
	$(BIN)/python -m bench.report $(BENCH_JSON)

report: setup
	$(BIN)/python -m bench.report $(BENCH_JSON)

# The tests, plus every benchmark suite once on tiny shapes (so the suites cannot rot).
test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests bench --quick --benchmark-disable -q -p no:cacheprovider

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

aot: setup
	env -u TRITON_INTERPRET $(BIN)/python -m spear_kernels.aot

clean:
	rm -rf build *.egg-info spear_kernels/_C*.so bench/results
