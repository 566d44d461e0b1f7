# Two commands on a fresh machine with only python3 (>= 3.10):
#   make demo   runs MoBA forward/backward on the best device present, checks it, times it
#   make test   runs the test suite (Triton kernels under TRITON_INTERPRET=1 on CPU-only machines)
# and, for contributors:
#   make lint   ruff check + ruff format --check
#   make docs   the documentation site with its API reference, built with --strict into build/site/
#   make wheel  builds the wheel in an isolated environment (no torch: the version is read statically)
#               and checks it: LICENSE, py.typed and the version of flashmoba/__init__.py inside, no license
#               deprecation warning in the build log
#   make bench  the attention benchmark (a CUDA GPU machine; writes runs/bench/attention.json)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LINT_PATHS := flashmoba tests benchmarks

.PHONY: demo test test-gpu lint docs wheel bench clean

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

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir build/site

wheel: $(STAMP)
	rm -rf build/wheel && mkdir -p build/wheel
	$(BIN)/python -m pip wheel -v --no-deps --wheel-dir build/wheel . > build/wheel/build.log 2>&1 \
		|| { cat build/wheel/build.log; exit 1; }
	! grep -iE "license.*deprecat|deprecat.*license" build/wheel/build.log
	$(BIN)/python -c "$$WHEEL_CHECK"

define WHEEL_CHECK
import glob, re, zipfile
src = open('flashmoba/__init__.py').read()
version = re.search(r'^__version__ = \"([^\"]+)\"', src, re.M).group(1)
(path,) = glob.glob('build/wheel/flashmoba-*.whl')
names = zipfile.ZipFile(path).namelist()
assert path.endswith(f'flashmoba-{version}-py3-none-any.whl'), (path, version)
assert 'flashmoba/py.typed' in names, 'py.typed missing'
assert f'flashmoba-{version}.dist-info/licenses/LICENSE' in names, 'LICENSE missing'
print(f'{path}: version {version}, LICENSE and py.typed inside')
endef
export WHEEL_CHECK

# On a machine with a CUDA GPU: MoBA forward+backward vs the dense baselines (see docs/benchmarks.md).
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_attention.py --seqlens 8192 65536 --out runs/bench/attention.json

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build/site build/wheel
