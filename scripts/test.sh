#!/usr/bin/env bash
# Runs sluice's whole test suite on a fresh Debian machine: installs what is missing
# (apt packages, .venv, the package), then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pytest -q "$@"
