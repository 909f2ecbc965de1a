VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

export PROMPTSERVE_STORE_DIR ?= var/prompt-store

.PHONY: install serve test bench docker-smoke
install:
	VENV=$(VENV) bash scripts/install.sh
	$(VENV)/bin/promptserve prepare-model

serve: install
	$(VENV)/bin/promptserve serve --host $(HOST) --port $(PORT)

test: install
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/promptserve bench

# Build the image and run it as a user would (needs a Docker engine; see scripts/docker_smoke.sh)
docker-smoke:
	bash scripts/docker_smoke.sh
