#!/usr/bin/env bash
# The scoring benchmark's own environment (bench/.env): the authors' reference package
# `network-pruner` 2.16 beside the same torch 2.13.0 the project uses, so both run in one process.
# torch goes in first and every later install is constrained to it, so network-pruner cannot pull
# another torch. fair-edge itself is imported from the repository root (bench puts it on sys.path);
# its scoring needs only torch, numpy, scipy and tqdm, installed here at the project's pinned versions.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=bench/.env
PY=${PYTHON:-python3}
STAMP=$ENV/.reference-installed
if [ -f "$STAMP" ] && [ "$STAMP" -nt bench/setup_reference_env.sh ]; then
  exit 0
fi
test -x $ENV/bin/python || $PY -m venv $ENV
$ENV/bin/python -m pip install -q --upgrade pip
$ENV/bin/python -m pip install -q torch==2.13.0
CONS=$(mktemp)
trap 'rm -f "$CONS"' EXIT
{ echo "torch==2.13.0"; grep -E '^(numpy|scipy|tqdm)==' constraints.txt; } >"$CONS"
$ENV/bin/python -m pip install -q -c "$CONS" numpy scipy tqdm "network-pruner==2.16"
$ENV/bin/python -c "import torch, tqdm, Network_Pruner; assert torch.__version__.startswith('2.13.0'), torch.__version__"
touch "$STAMP"
