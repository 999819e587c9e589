# Two commands on a fresh machine: `make demo` and `make test` (both install what they need).
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/llm-assets
export DAGSTER_HOME ?= $(CURDIR)/.dagster
# Python's usual caching of bytecode in the venv (and __pycache__/, git-ignored): with
# PYTHONDONTWRITEBYTECODE set, as on some CI machines, every process would compile torch,
# transformers and dagster again on import (~27 s of the demo's first import).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test ui install browser services clean-state

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	@# Python 3.11's venv brings pip 23.2, whose resolver took 59-81 s over our ~230 packages here;
	@# pip 26.3 resolves the same set (same versions) in 22-25 s.
	$(PY) -m pip install -q 'pip>=26'
	@# No byte-compiling of the ~40,000 files (52 s on both cores): each module's bytecode is written
	@# when it is first imported (the demo's imports are ~6,500 modules, ~27 s): the unexport above.
	$(PY) -m pip install -q --no-compile -e '.[dev]'
	@# dagster 1.13's asset-selection parser needs antlr 4.13; dvc (via hydra/omegaconf) pins 4.9
	@# and only `dvc exp` params need that. Without this, every string selection fails.
	$(PY) -m pip install -q --no-compile --no-deps 'antlr4-python3-runtime==4.13.2'
	touch $@

install: $(VENV)/.installed

demo: install
	$(CLI) init
	@# everything but monitoring and the compressed candidates (configs/compress.yaml runs those)
	$(CLI) materialize --config configs/demo.yaml --select 'not group:monitoring and not key:distilled_model and not key:pruned_model'
	@# serve the release on loopback, send it 40 training-like prompts, stop it (the log is flushed) ...
	$(PY) -m llm_assets.serving.load --requests 40 --concurrency 4
	@# ... and compare that traffic with the training prompts
	$(CLI) materialize --config configs/demo.yaml --select drift_report

# tests/test_ui_browser.py drives the web UI with Playwright and Debian's chromium (Playwright's
# own browser download cannot reach its CDN here). sudo only where we are not root.
SUDO := $(shell [ "$$(id -u)" = 0 ] || ! command -v sudo >/dev/null || echo sudo)
browser:
	command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# Debian's servers the tests start on loopback themselves (never as system services): PostgreSQL
# for the Dagster instance, Redis for Celery and the shared LSH index, Prometheus (with promtool).
services:
	command -v redis-server >/dev/null && command -v prometheus >/dev/null && { command -v pg_ctl >/dev/null || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; } || { $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql redis-server prometheus; }

# One pytest worker per core, each given whole files (module fixtures are built once), files with
# a slow test first, and each worker its share of the cores' threads (tests/conftest.py).
# TEST_WORKERS=1: one process.
TEST_WORKERS ?= $(shell nproc)
test: install browser services
	$(PY) -m pytest -ra -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

ui: install
	$(CLI) init
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

# Forget every materialization and artifact (keeps .venv and the DVC remote).
clean-state:
	rm -rf .dagster data/lake data/releases data/serving dvc.lock
