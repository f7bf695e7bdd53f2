# vhostmem: the two quick-start commands are `make run` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install system-deps run test test-unit test-qemu test-workers lint bench vm fuzz clean

install: $(STAMP)

# Re-run pip only when the project metadata changed; creating the venv is idempotent.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Debian packages the QEMU and peer tests need (QEMU, qemu-storage-daemon, busybox).
system-deps:
	bash qemu/install-deps.sh

run: install
	$(VENV)/bin/vhostmem serve

lint: install
	$(VENV)/bin/ruff check .

test: install system-deps lint
	$(PY) -m pytest -q

test-unit: install
	$(PY) -m pytest -q -m "not qemu and not qsd"

test-qemu: install system-deps
	$(PY) -m pytest -q -m qemu

# The suites that drive served rings, with every vhostmem ring in data-plane worker processes.
test-workers: install system-deps
	VHOSTMEM_TEST_WORKERS=2 $(PY) -m pytest -q tests/conformance tests/hostile tests/qemu \
		tests/vhostmem/test_workers.py -k "not qsd"

bench: install system-deps
	$(PY) bench/run_all.py

vm: install system-deps
	$(PY) -m qemu.launch --interactive

# Both atheris targets, bounded: the framer alone, then framer + session + rings + blk.
fuzz: install
	$(PY) -m pip install -q atheris
	$(PY) tests/fuzz/fuzz_framer.py -runs=1000000
	$(PY) tests/fuzz/fuzz_session.py -runs=1000000

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
