# Two entry points (see README): `make demo` and `make test`. Both create .venv and install on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test,plots]"
	touch $(STAMP)

.PHONY: install demo test test-real bench
install: $(STAMP)

# The main job: a chat completion with the real Qwen2.5-Coder-0.5B-Instruct (fetched and verified on first run).
demo: $(STAMP)
	$(BIN)/jaxspec generate --model qwen2.5-coder-0.5b-instruct --chat --max-new-tokens 96 \
		--prompt "Write a Python function that checks whether a number is prime."

# The default suite (tiny random models and ../shared/assets; no downloads). Its time is mostly XLA compiles,
# one core each, so it runs one worker per core (pytest-xdist), a test module per worker (modules share
# compiled programs).
test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 -n auto --dist loadfile

# Real-weight tests (fetch the registry models on first use) and slow tests; .ci/run runs both suites.
test-real: $(STAMP)
	$(BIN)/python -m pytest -q --durations=10 -m "real or slow"
