# Two commands on a fresh machine: `make demo` and `make test` (both install what they need).
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/llm-assets
export DAGSTER_HOME ?= $(CURDIR)/.dagster

.PHONY: demo test ui install browser services clean-state

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	@# pip byte-compiles its ~40,000 files one at a time (75 s here); compileall does it on every core
	@# (48 s). Not skipped: with PYTHONDONTWRITEBYTECODE set, every process would compile on import.
	$(PY) -m pip install -q --no-compile -e '.[dev]'
	@# dagster 1.13's asset-selection parser needs antlr 4.13; dvc (via hydra/omegaconf) pins 4.9
	@# and only `dvc exp` params need that. Without this, every string selection fails.
	$(PY) -m pip install -q --no-compile --no-deps 'antlr4-python3-runtime==4.13.2'
	@# Exit 1 on files written for newer Pythons (torch ships py312-only ones), which pip skips too.
	@# Not plotly's 13,600 generated validators (8 s): a drift report imports ~160 of them.
	-$(PY) -m compileall -q -j 0 -x '/plotly/validators/' $$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))') >/dev/null
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
