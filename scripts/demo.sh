#!/usr/bin/env bash
# The main job: installs what is missing, makes a volume, mounts it, runs real programs
# on it (cp, tar, git, sqlite3, python, gcc), prints what happened, unmounts, checks;
# then shows a reserved reader keeping its latency under mclock, not under fifo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
