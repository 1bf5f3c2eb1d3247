# Two commands do all set-up on a fresh Linux or macOS machine: `make run` and `make test`.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
PYTHON  ?= python3
TORCH   := torch==2.13.0
MODEL   ?=
DEMO    := $(HOME)/.cache/expertswap/demo-qwen3-moe

.PHONY: run test setup

setup: $(STAMP)

# torch first: the pinned CPU wheel installs quickly, and a bare "torch" requirement would pull GBs of CUDA.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
ifeq ($(MODEL),)
	@test -f $(DEMO)/config.json || $(PY) -c "from expertswap.engine.synthetic import build_model; build_model('qwen3_moe', '$(DEMO)')"
	@echo "No MODEL=... given: chatting with a tiny random-weight demo model (its replies are noise)."
	$(VENV)/bin/expertswap-cli chat --model $(DEMO) --budget 50%
else
	$(VENV)/bin/expertswap-cli chat --model "$(MODEL)" --budget "$(or $(BUDGET),50%)"
endif

test: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q
