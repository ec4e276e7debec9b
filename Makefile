# Two commands on a fresh machine: `make run` (the demo) and `make test`.
# python3.12 resolves through pyenv's .python-version here, or from PATH elsewhere;
# any python >= 3.12 found first is used.
VENV   := .venv
STAMP  := $(VENV)/.installed
PYTHON ?= $(shell for p in python3.12 python3.13 python3.14 python3; do \
            $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { echo $$p; break; }; \
          done)

.PHONY: run test bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "edge needs Python >= 3.12 (python3.12 on PATH, or pyenv)"; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/edge demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	bash bench/run.sh

clean:
	rm -rf $(VENV) *.egg-info
