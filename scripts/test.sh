#!/usr/bin/env bash
# Runs sluice's whole test suite on a fresh Debian machine: installs what is missing
# (apt packages, .venv, the package), then pytest. Extra arguments go to pytest.
# Two worker processes (pytest-xdist), each test file on one worker: most of a mounted
# test is waiting (a daemon starting, a FUSE round trip), so two workers use two CPUs
# where one would leave one idle. SLUICE_TEST_WORKERS=0 runs everything in one process
# (as does `-n 0` among the arguments).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pytest -q -n "${SLUICE_TEST_WORKERS:-2}" --dist loadfile "$@"
