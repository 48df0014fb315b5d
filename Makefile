# Two commands matter: `make run` (the local server on its embedded defaults) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BENCH_BEFORE ?= b50d0e6  # the local server before uvicorn (bench/http_server.py compares against it)
STAMP := $(VENV)/.installed-stamp

.PHONY: run test chromium-check unit contract integration e2e infra lint format coverage bench mutation smoke smoke-needs-env clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/batch-api serve

test: $(STAMP) chromium-check
	JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION=20 $(PY) -m pytest -n 2 --dist loadfile -q

# the web console's browser tests (tests/e2e/test_console.py) run when Chromium is here, else are skipped
chromium-check:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null \
		|| echo "Chromium not installed: the console's browser tests will be skipped (apt-get install chromium chromium-driver)"

unit: $(STAMP)
	$(PY) -m pytest -m unit -q

contract: $(STAMP)
	$(PY) -m pytest -m contract -q

integration: $(STAMP)
	$(PY) -m pytest -m integration -q

e2e: $(STAMP) chromium-check
	$(PY) -m pytest -m e2e -q

infra: $(STAMP)
	JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION=20 $(PY) -m pytest -m infra -q

lint: $(STAMP)
	$(VENV)/bin/ruff check functions tests bench infra
	$(VENV)/bin/ruff format --check functions tests bench infra
	$(VENV)/bin/mypy functions infra

format: $(STAMP)
	$(VENV)/bin/ruff check --fix functions tests bench infra
	$(VENV)/bin/ruff format functions tests bench infra

coverage: $(STAMP)
	JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION=20 $(PY) -m pytest -n 2 --dist loadfile -q --cov --cov-report=term-missing:skip-covered

bench: $(STAMP)
	$(PY) bench/upstream_client.py --output bench/results/upstream_client.md
	$(PY) bench/memory_200mb.py
	$(PY) bench/pipeline_overhead.py
	$(PY) bench/http_server.py --before $(BENCH_BEFORE)

# After `cdk deploy`, with your AWS credentials: a small batch end to end (infra/smoke.py).
# SMOKE_ARGS passes more flags, e.g. SMOKE_ARGS="--model gpt-4o-mini --timeout 1200".
smoke: $(if $(ENV),$(STAMP),smoke-needs-env)
	$(PY) -m infra.smoke --env "$(ENV)" $(SMOKE_ARGS)

smoke-needs-env:
	@echo "make smoke: set ENV to an environment in cdk.json, e.g. make smoke ENV=dev" >&2; exit 2

# mutmut wants the package at the top of its tree: it runs in a copy laid out that way (.mutation/)
mutation: $(STAMP)
	rm -rf .mutation && mkdir .mutation
	cp -r functions/batch_api tests events docs pyproject.toml .mutation/
	cd .mutation && ../$(PY) -m mutmut run --max-children 2 > mutmut.log 2>&1 || true
	$(PY) bench/mutation_report.py .mutation

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .mutation
