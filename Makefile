# walstore: every target works on a fresh Debian machine (root, or sudo available).
#   make run    install and start one embedded node (no etcd) on :8080, data in ./data/wal
#   make test   install what the tests need (etcd-server, strace, ...) and run them all
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT     := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get
# Debian packages: the compiler and headers build the cffi extension; the rest are the
# real parts the tests start (etcd, PostgreSQL for the bench smoke test), the fault tools
# (strace, fiu, faketime; unshare/nsenter and ip for namespaces) and load tools (wrk, curl).
BUILD_PKGS := gcc libc6-dev python3-dev python3-venv
TEST_PKGS  := etcd-server strace fiu-utils faketime wrk curl postgresql-15 util-linux iproute2
BENCH_PKGS := postgresql-15 wrk etcd-server
HTTP_PORT ?= 8080
DATA_DIR  ?= ./data/wal

.PHONY: install system-deps test-deps build-native dist openapi run test test-fast bench bench-wal lint fuzz simulate chaos clean

# apt only for what is missing, so a machine with everything installed never needs root.
define apt_ensure
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	  $(APT) update -qq && $(APT) install -y -qq --no-install-recommends $$missing; fi
endef

system-deps:
	@if ! command -v gcc >/dev/null || ! $(PY) -c 'import venv, ensurepip' 2>/dev/null || \
	   ! $(PY) -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))'; then \
	  $(MAKE) --no-print-directory apt-build-pkgs; fi

apt-build-pkgs:
	$(call apt_ensure,$(BUILD_PKGS))

test-deps: install
	$(call apt_ensure,$(TEST_PKGS))

# Every extra (test, lint, fuzz, eventsourcing) goes into the one dev venv; versions that ship in the
# package (and the build tools) are the ones pinned in constraints.txt, as in the image.
# The package check (tests/test_package.py) keeps a wheel cache in $(VENV)/wheelhouse.
$(STAMP): setup.py pyproject.toml MANIFEST.in constraints.txt $(wildcard native/*.c native/*.h native/*.cdef native/*.py)
	$(MAKE) --no-print-directory system-deps
	[ -x $(BIN)/python ] || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -U pip setuptools wheel cffi
	$(BIN)/pip install -q -c constraints.txt -e '.[test,lint,fuzz,eventsourcing]'
	touch $(STAMP)

install: $(STAMP)

# The editable install builds the extension in place (walstore/_walstore_native*.so): that
# in-tree file is the one `import walstore._native` loads, so rebuilding means re-running
# the same pip build, never a second build that could leave a stale copy elsewhere.
build-native: $(STAMP)
	rm -f walstore/_walstore_native*.so walstore/_walstore_native.c
	$(BIN)/pip install -q -c constraints.txt --no-deps --no-build-isolation -e .
	$(BIN)/python -c 'import walstore._native as n; print("native module:", n.module_path())'

# The sdist, and the wheel built from it, in dist/ (tests/test_package.py installs both).
dist: install
	$(BIN)/python -m build --no-isolation --outdir dist .

# docs/openapi.yaml is the API's description; the node serves it from this JSON copy at
# GET /openapi.json (no YAML parser at run time). tests/test_openapi.py keeps them equal.
openapi: install
	$(BIN)/python -c 'import json, sys, yaml; json.dump(yaml.safe_load(open("docs/openapi.yaml")), sys.stdout, indent=1, ensure_ascii=False); print()' > walstore/http/openapi.json

run: install
	mkdir -p $(DATA_DIR)
	NODE_ID=$${NODE_ID:-event-store-0} HTTP_PORT=$(HTTP_PORT) DATA_DIR=$(DATA_DIR) $(BIN)/walstore serve

# The tests mostly wait on real processes (leases, timeouts, sleeps), not on the CPU, so
# `make test` runs them on one pytest-xdist worker more than this 2-core machine has cores,
# each worker a whole test file at a time (a module's fixtures start once). TEST_WORKERS=0
# runs them in one process, one after another. `make chaos` stays serial: its rows assert
# failover times.
TEST_WORKERS ?= 3

test: test-deps
	$(BIN)/python -m pytest -q -m 'not chaos' -n $(TEST_WORKERS) --dist loadfile

test-fast: install
	$(BIN)/python -m pytest -q -m 'not slow and not chaos'

chaos: test-deps
	$(BIN)/python -m pytest -q -m 'chaos or fault'

bench: test-deps
	$(call apt_ensure,$(BENCH_PKGS))
	$(BIN)/walstore bench all --dir /var/tmp

bench-wal: install
	$(BIN)/walstore bench wal

# The deterministic simulator (docs/simulation.md); `make test` runs a fixed budget of it.
simulate: install
	$(BIN)/walstore simulate --seeds $${SEEDS:-1000} --keep-going

fuzz: install
	$(BIN)/python -m walstore.fuzz --seconds $${FUZZ_SECONDS:-60}

lint: install
	$(BIN)/ruff check walstore tests native
	$(BIN)/ruff format --check walstore tests native
	$(BIN)/mypy

clean:
	rm -rf build dist *.egg-info walstore/_walstore_native*.so walstore/_walstore_native.c \
	  native/*.o .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
