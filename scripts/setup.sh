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
# Byte-compiled once here, in parallel: pip compiles module by module on one core (326 s of
# install against 127 s without), and the bytecode must exist before the tests — where
# PYTHONDONTWRITEBYTECODE is set (as on our CI machine), every process, each Ray worker
# included, would otherwise compile torch, ray and mlflow again at import: without it the tests
# were 78 % done after 45 minutes, against 18 minutes for all of them before. compileall's
# exit status is ignored as pip's is (a few packages ship files that are not Python 3.11).
quiet python -m pip install -q --no-compile -r requirements.lock
quiet python -m pip install -q --no-compile --no-deps -e .
python -m pip check
site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
python -m compileall -q -j 0 "$site" model pipeline data deploy >/dev/null || true
echo "setup.sh: python environment ready in $((SECONDS - start)) s ($(python -m pip list 2>/dev/null | tail -n +3 | wc -l) packages)"
if ! command -v chromium >/dev/null 2>&1; then  # the browser test drives Debian's chromium
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium (browser test will fail)"
fi
