# Two commands on a fresh machine with only python3 (>= 3.10):
#   make demo   runs MoBA forward/backward on the best device present, checks it, times it
#   make test   runs the test suite (Triton kernels under TRITON_INTERPRET=1 on CPU-only machines)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-gpu bench clean

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/flashmoba demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup tests

# On a machine with a GPU: the H100 suite (skipped elsewhere).
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q tests/gpu

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
