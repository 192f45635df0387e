# The two commands of README.md: `make demo` and `make test`. Both run the set-up first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test
setup:
	./scripts/setup.sh

demo: setup
	$(VENV)/bin/dsf demo

test: setup
	$(PY) -m pytest -q -ra
