# Two commands: `make run` and `make test`. Both set themselves up on a fresh
# machine that has only python3 and make.
VENV    ?= .venv
# The interpreter .venv is made with (`make clean` first to change it). chatq's
# hot paths are Python: an optimised CPython build (profile-guided, as
# distributions ship) serves ~14 % more per CPU than pyenv's default build;
# README.md, "The interpreter".
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
CONFIG  ?= config/tenants.toml

.PHONY: test lint typecheck unit run bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

test: lint typecheck unit

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The installed names (chatq.config, ...) as links to the top-level folders.
LINKS   := $(VENV)/typecheck/chatq
$(LINKS): $(STAMP)
	mkdir -p $(LINKS)
	for d in config shared supervisor tenant_worker; do ln -sfn ../../../$$d $(LINKS)/$$d; done

typecheck: $(STAMP) $(LINKS)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(VENV)/bin/pytest

run: $(STAMP)
	$(VENV)/bin/chatq run --config $(CONFIG)

bench: $(STAMP)
	$(PY) bench/queue_bench.py
	$(PY) bench/worker_bench.py
	$(PY) bench/tenants_bench.py
	$(PY) bench/supervisor_bench.py
	$(PY) bench/whatsapp_bench.py
	$(PY) bench/gateway_bench.py
	$(PY) bench/recovery_bench.py
	$(PY) bench/density_bench.py
	$(PY) bench/retention_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache .ruff_cache
