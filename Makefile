# The whole set-up on a fresh Debian machine (as root): `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
KILN := $(VENV)/bin/kiln
DEBS := mmdebstrap gpg busybox-static docker.io runc tini nftables skopeo umoci haproxy wrk git iproute2 procps util-linux ca-certificates zsh fish debian-archive-keyring docker-registry apache2-utils
STAMP := $(VENV)/.kiln-installed
SETUP_LOG := build/setup.log

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@mkdir -p build; : > $(SETUP_LOG)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "setup: Debian packages:$$missing (output in $(SETUP_LOG))"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; } \
	      >>$(SETUP_LOG) 2>&1 || { tail -n 30 $(SETUP_LOG); exit 1; }; \
	  fi; \
	fi
	@echo "setup: Python venv and kiln with its dependencies (output in $(SETUP_LOG))"
	@{ test -x $(PY) || python3 -m venv $(VENV); } >>$(SETUP_LOG) 2>&1 || { tail -n 30 $(SETUP_LOG); exit 1; }
	@$(PY) -m pip install -q --upgrade pip >>$(SETUP_LOG) 2>&1 || { tail -n 30 $(SETUP_LOG); exit 1; }
	@$(PY) -m pip install -q -e '.[dev]' >>$(SETUP_LOG) 2>&1 || { tail -n 30 $(SETUP_LOG); exit 1; }
	@touch $(STAMP)
	@echo "setup: done"

demo: setup
	$(PY) examples/demo.py

lint: setup
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/ruff format --check src tests bench examples
	$(VENV)/bin/mypy

# Two workers, one test file each at a time (its module fixtures made once); then the
# tests that watch the whole host's process count, alone.
test: setup lint
	$(VENV)/bin/pytest -q -x -n 2 --dist loadfile -m "not serial" --durations=25
	$(VENV)/bin/pytest -q -x -m serial --durations=10

bench: setup
	$(PY) bench/bake.py
	$(PY) bench/deploy.py
	$(PY) bench/sandbox.py
	$(PY) bench/loop.py
	$(PY) bench/engine.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
