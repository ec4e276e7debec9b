# Two commands on a fresh machine: `make run` (the demo) and `make test`.
# python3.12 resolves through pyenv's .python-version here, or from PATH elsewhere;
# any python >= 3.12 found first is used.
VENV   := .venv
STAMP  := $(VENV)/.installed
SYSTEM := $(VENV)/.system
BYTECODE := $(VENV)/.bytecode
# Debian packages: the OWASP Core Rule Set for the WAF, redis-server for the shared rate-limit
# store's tests, curl for the HTTP/2-over-TLS tests, pebble (Let's Encrypt's test CA) for the
# ACME tests, uap-core (ua-parser's test User-Agents) for the bot-class tests, gpg for the
# signature checks of `edge waf update`. Installed once if missing (root or sudo).
DEBS   := modsecurity-crs:/usr/share/modsecurity-crs/rules redis-server:redis-server curl:curl pebble:pebble uap-core:/usr/share/uap-core/tests gpg:gpg
PYTHON ?= $(shell for p in python3.12 python3.13 python3.14 python3; do \
            $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { echo $$p; break; }; \
          done)

.PHONY: run test bench bench-hardening venv system clean

venv: $(STAMP) $(BYTECODE)

system: $(SYSTEM)

$(SYSTEM): Makefile
	@missing=""; for d in $(DEBS); do pkg=$${d%%:*}; what=$${d#*:}; \
	  { test -e "$$what" || command -v "$$what" >/dev/null; } || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  echo "installing Debian packages:$$missing"; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing >/dev/null; \
	fi
	@mkdir -p $(VENV) && touch $@

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "edge needs Python >= 3.12 (python3.12 on PATH, or pyenv)"; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

# `edge run` serves under python -O (no asserts), whose bytecode pip does not write: compiled once
# here. Without it every start compiles ~900 modules again wherever Python writes no bytecode
# (PYTHONDONTWRITEBYTECODE, a read-only install): 1.4 s of a 2 s start (bench/startup.py).
$(BYTECODE): $(STAMP)
	$(VENV)/bin/python -O -m compileall -q -j 0 $(VENV)/lib addons edgecli >/dev/null
	touch $@

run: $(STAMP) $(BYTECODE) $(SYSTEM)
	$(VENV)/bin/edge demo

test: $(STAMP) $(BYTECODE) $(SYSTEM)
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP) $(BYTECODE)
	bash bench/run.sh

bench-hardening: $(STAMP)
	$(VENV)/bin/python bench/hardening.py

clean:
	rm -rf $(VENV) *.egg-info
