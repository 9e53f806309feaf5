"""Write (or check) requirements.lock: exact versions of every package the project installs.

    python scripts/lock.py            # resolve pyproject's ranges → requirements.lock, keeping
                                      # the lock's pins wherever they still fit
    python scripts/lock.py --upgrade  # re-resolve everything to the newest versions in range
    python scripts/lock.py --check    # fail if pyproject's ranges and the lock disagree

Why uv's resolver: pip's own (and so pip-tools and `pip install --dry-run --report`, which use it)
backtracks through hundreds of boto3 / aiobotocore / ray / mlflow releases on these ranges and can
end in ResolutionImpossible; `uv pip compile` resolves the same ranges in seconds. uv is only the
*lock* tool: `scripts/setup.sh` installs the lock with plain pip, which needs no resolving when
every version is pinned (and which finds the CPU torch wheel a machine may keep on disk through its
pip configuration; uv does not look there).

torch: the lock pins `torch==2.13.0` without a local label. pip then takes a CPU build 2.13.0+cpu
where pip's configuration offers one (this project's machines) and PyPI's build elsewhere; to keep
CUDA-only wheels out of the lock we resolve against such a CPU wheel when one is found. The lock is
for CPython 3.11 on x86-64 Linux (what the README names); no hashes, since the torch file taken
differs by machine.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
UV = "uv==0.13.9"
PYTHON = "3.11"
PLATFORM = "x86_64-manylinux_2_28"
HEADER = (
    "# Exact versions for CPython 3.11 on x86-64 Linux: pip install -r requirements.lock\n"
    "# Made by `python scripts/lock.py` from pyproject.toml (all extras); do not edit by hand.\n"
)


def read_lock(path: Path = LOCK) -> dict[str, Version]:
    """{canonical name: pinned version} of a lock file (comments and markers ignored)."""
    pins: dict[str, Version] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)(\[[^\]]*\])?==([^\s;]+)(\s*;.*)?", line)
        if m is None:
            raise ValueError(f"{path.name} line {n}: not an exact pin: {line!r}")
        pins[canonicalize_name(m.group(1))] = Version(m.group(3))
    return pins


def project_requirements(
    pyproject: Path = ROOT / "pyproject.toml",
) -> list[tuple[str, Requirement]]:
    """[(where, requirement)] for the dependencies and every optional extra."""
    proj = tomllib.loads(pyproject.read_text())["project"]
    out = [("dependencies", Requirement(r)) for r in proj.get("dependencies", [])]
    for extra, reqs in proj.get("optional-dependencies", {}).items():
        out += [(f"optional-dependencies.{extra}", Requirement(r)) for r in reqs]
    return out


def disagreements(pyproject: Path = ROOT / "pyproject.toml", lock: Path = LOCK) -> list[str]:
    """One line per pyproject requirement the lock leaves out or pins outside its range."""
    pins = read_lock(lock)
    problems = []
    for where, req in project_requirements(pyproject):
        if req.marker is not None and not req.marker.evaluate({"python_version": PYTHON}):
            continue
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{where}: {req} is not in {lock.name}")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{where}: {req} but {lock.name} pins {req.name}=={pins[name]}")
    return problems


def _uv() -> list[str]:
    """A uv command: the one on PATH, else one installed into a throw-away cache venv."""
    if shutil.which("uv"):
        return ["uv"]
    venv = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "omniforcing-uv"
    exe = venv / "bin" / "uv"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", UV], check=True)
    return [str(exe)]


def _cpu_torch_dirs() -> list[str]:
    """Folders of pip's find-links that hold a CPU torch wheel (keeps CUDA wheels out)."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    dirs = re.findall(r"find-links='([^']+)'", out) + os.environ.get("PIP_FIND_LINKS", "").split()
    return sorted({d for d in dirs if any(Path(d).glob("torch-*+cpu-*.whl"))})


def preferences(lock_text: str) -> str:
    """The lock as uv's preferred versions, less torch: its pin has no local label, and
    preferring it would take PyPI's CUDA build (and its nvidia-* wheels) over the CPU wheel."""
    return re.sub(r"^torch==[^\n]*\n", "", lock_text, flags=re.M)


def compile_lock(upgrade: bool = False) -> None:
    """Resolve into requirements.lock. uv prefers the versions already in its output file, so
    seeding it with the current lock changes only what a new or narrowed range needs (adding a
    test tool does not move torch or ray); `upgrade` drops that preference."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "lock.txt"
        if LOCK.exists() and not upgrade:
            out.write_text(preferences(LOCK.read_text()))
        cmd = _uv() + [
            "pip", "compile", str(ROOT / "pyproject.toml"), "--all-extras", "--no-header",
            "--python-version", PYTHON, "--python-platform", PLATFORM, "-o", str(out),
        ]  # fmt: skip
        for d in _cpu_torch_dirs():
            cmd += ["--find-links", d]
        if upgrade:
            cmd.append("--upgrade")
        subprocess.run(cmd, check=True)
        text = re.sub(r"^torch==([0-9.]+)\+\w+", r"torch==\1", out.read_text(), flags=re.M)
        LOCK.write_text(HEADER + text.replace(str(ROOT) + "/", ""))
    print(f"wrote {LOCK.relative_to(ROOT)} ({len(read_lock())} packages)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check the lock against pyproject")
    ap.add_argument("--upgrade", action="store_true", help="newest versions, not the lock's pins")
    args = ap.parse_args()
    if not args.check:
        compile_lock(args.upgrade)
    problems = disagreements()
    for p in problems:
        print(f"lock disagrees with pyproject: {p}", file=sys.stderr)
    if problems:
        print("re-run: python scripts/lock.py", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
