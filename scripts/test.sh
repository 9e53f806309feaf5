#!/usr/bin/env bash
# The test command (README): the whole suite on CPU, real services started by the fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 DS_ACCELERATOR=cpu
python -m pytest -q --durations=25 tests "$@"
