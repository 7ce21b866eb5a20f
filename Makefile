# Every target installs what it needs first: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench coverage lint clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Confide needs Python 3.11+)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/python -m confide.enclave.bytecode   # checked-hash bytecode the enclave runs (enclave/bytecode.py)
	$(BIN)/python -m compileall -q src >/dev/null   # the CLI's own bytecode, even where PYTHONDONTWRITEBYTECODE is set
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash examples/demo.sh

# Two workers (pytest-xdist), each test file on one worker (module fixtures: servers, clusters).
# tests/test_api_fuzz.py runs on its own: schemathesis gives every API operation's case the same
# node id, and xdist would run one of them per test function.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --ignore=tests/test_api_fuzz.py
	$(BIN)/python -m pytest -q tests/test_api_fuzz.py

bench: $(STAMP)
	$(BIN)/python bench/core.py
	$(BIN)/python bench/attest.py
	$(BIN)/python bench/platform_tasks.py
	$(BIN)/python bench/cli.py
	$(BIN)/python bench/flow.py  # confidential word count on Spark local[2] vs plain PySpark (needs java)
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/inference_tasks.py  # infer as platform tasks, each mode, with an accelerator process
	$(BIN)/python bench/channels.py
	$(BIN)/python bench/analytics.py

coverage: $(STAMP)  # TCB lines executed by the enclave tests -> bench/results/tcb_coverage.json
	$(BIN)/python bench/tcb_coverage.py

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/mypy src --ignore-missing-imports

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
