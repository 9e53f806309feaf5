#!/usr/bin/env bash
# The test command (README): the whole suite on CPU, real services started by the fixtures.
# Two test processes by default (each with its own Ray, MLflow server and S3 endpoint): about a
# third of a serial run's wall time is spent waiting on services, which the other process fills.
# OMNIFORCING_TEST_WORKERS=0 runs everything in this process.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 DS_ACCELERATOR=cpu
workers="${OMNIFORCING_TEST_WORKERS:-2}"
par=()
if [ "$workers" != 0 ]; then par=(-n "$workers" --dist loadfile); fi
python -m pytest -q "${par[@]}" --durations=25 tests "$@"
