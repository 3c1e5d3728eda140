# The two commands of the README. Each does its own set-up first
# (Debian packages, .venv, Python packages); a second run is quick.
SHELL := /bin/bash
VENV := .venv/bin
PYTEST_ARGS ?=

.PHONY: setup dev test test-quick reliability protos protos-check docs bench clean

setup:
	@scripts/setup.sh

## make dev: the whole cluster on this machine, ready for `cgate db connect`
dev: setup
	$(VENV)/cachegate dev

## make test: the full suite, as CI runs it
test: setup protos-check
	$(VENV)/python -m pytest $(PYTEST_ARGS)

## make test-quick: the unit tests only (no real processes)
test-quick: setup
	$(VENV)/python -m pytest -m "not slow" $(PYTEST_ARGS)

## make reliability: the full reliability run (faults, fuzzing, 1,000 sessions; docs/reliability.md)
reliability: setup
	CACHEGATE_RELIABILITY=full $(VENV)/python -m pytest -m reliability -s -rxs $(PYTEST_ARGS)

## make bench: the benchmark against stunnel and direct TLS, about two minutes (docs/performance.md)
bench: setup
	$(VENV)/python -m bench --quick

protos: setup
	scripts/gen_protos.sh

## make docs: regenerate the command reference in docs/cli.md from the CLIs' --help (a test fails when it is stale)
docs: setup
	$(VENV)/python -m services.cli.gendocs

protos-check: setup
	scripts/gen_protos.sh --check

clean:
	rm -rf .venv .pytest_cache
