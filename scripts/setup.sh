#!/usr/bin/env bash
# Installs the project, its test tools and the LTX-2 extra into the active virtual environment,
# from requirements.lock (exact versions: pip resolves nothing, so no backtracking), then checks
# that the installed set is consistent. Make the environment first (README):
#   python3.11 -m venv .venv && . .venv/bin/activate && bash scripts/setup.sh
# Newer versions: `python scripts/lock.py` re-resolves pyproject's ranges into the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" && "${OMNIFORCING_SYSTEM_PYTHON:-0}" != 1 ]]; then
  echo "setup.sh: no virtual environment is active; run" >&2
  echo "  python3.11 -m venv .venv && . .venv/bin/activate && bash scripts/setup.sh" >&2
  echo "(or set OMNIFORCING_SYSTEM_PYTHON=1 to install into $(command -v python))" >&2
  exit 2
fi
python -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' 2>/dev/null || {
  echo "setup.sh: requirements.lock is for CPython 3.11; this is $(python -V 2>&1)" >&2
  exit 2
}
start=$SECONDS
# pip 23 warns once per package about the machine's file:// extra indexes; that is noise.
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
# --no-compile: byte-compiling every installed module (torch, ray, mlflow...) up front took 60 %
# of the install (326 s vs 127 s on 2 busy cores); Python compiles what is imported, once.
quiet python -m pip install -q --no-compile -r requirements.lock
quiet python -m pip install -q --no-compile --no-deps -e .
python -m pip check
echo "setup.sh: python environment ready in $((SECONDS - start)) s ($(python -m pip list 2>/dev/null | tail -n +3 | wc -l) packages)"
if ! command -v chromium >/dev/null 2>&1; then  # the browser test drives Debian's chromium
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium (browser test will fail)"
fi
