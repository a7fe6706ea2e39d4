# Every target creates .venv and installs the project (with mlflow and the test tools) first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run ui test lint bench bench-scale bench-rlm-code screenshots clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[mlflow,test,dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job: a synthetic RLM benchmark loop reporting to ./mlflow.db (no server needed).
run: $(STAMP)
	$(VENV)/bin/rlm-mlflow run --task "Create a DSPy signature" --environment dspy \
		--steps 2000 --runs 2 --depth 1 --traces true

# The MLflow UI on what `make run` wrote: http://127.0.0.1:5000
ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

test: $(STAMP)
	$(PY) -m pytest -n 3

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Every contender on the same workload and servers, interleaved rounds, medians and ratios;
# writes benchmarks/results/latest.json and bench.png.
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/bench.py

# Many producer processes against one mlflow server on PostgreSQL: ours vs the ceiling.
bench-scale: $(STAMP)
	$(PY) benchmarks/bench_scale.py

# The real rlm-code runner: its loop time with no MLflow, ours (server unreachable / up), and
# rlm-code's own sink; writes benchmarks/results/rlm-code-latest.json.
bench-rlm-code: $(STAMP)
	$(PY) benchmarks/bench_rlm_code.py

# The docs' pictures of MLflow's UI, from a real browser: needs a Python with playwright and
# Debian's chromium (neither is one of our dependencies); writes docs/images/benchmarks-*.png
# and traces-*.png.
PLAYWRIGHT_PYTHON ?= python3
screenshots: $(STAMP)
	$(PLAYWRIGHT_PYTHON) benchmarks/ui_shots.py --venv $(VENV)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
