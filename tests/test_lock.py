"""requirements.lock against pyproject's ranges: the check CI runs, and that it can fail."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lock", ROOT / "scripts" / "lock.py")
lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock)


def test_the_shipped_lock_agrees_with_pyproject() -> None:
    assert lock.disagreements() == []
    pins = lock.read_lock()
    assert pins["torch"] == Version("2.13.0")  # no local label: the lock installs anywhere
    for name in ("ray", "deepspeed", "mlflow", "s3fs", "webdataset", "diffusers", "moto"):
        assert name in pins


def _project(tmp_path: Path, deps: list[str]) -> Path:
    body = ", ".join(f'"{d}"' for d in deps)
    p = tmp_path / "pyproject.toml"
    p.write_text(f'[project]\nname = "x"\ndependencies = [{body}]\n')
    return p


def test_a_pin_outside_a_range_or_a_missing_package_is_named(tmp_path: Path) -> None:
    lock_file = tmp_path / "requirements.lock"
    lock_file.write_text("# header\nray==2.60.0\n    # via x\nnumpy==2.4.6\n")
    assert lock.disagreements(_project(tmp_path, ["ray>=2.50,<2.61"]), lock_file) == []
    problems = lock.disagreements(_project(tmp_path, ["ray<2.60", "mlflow>=3"]), lock_file)
    assert len(problems) == 2
    assert "ray<2.60" in problems[0] and "ray==2.60.0" in problems[0]
    assert "mlflow>=3 is not in requirements.lock" in problems[1]


def test_a_line_that_is_not_an_exact_pin_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "requirements.lock"
    bad.write_text("ray>=2.50\n")
    with pytest.raises(ValueError, match="line 1: not an exact pin"):
        lock.read_lock(bad)


def test_the_lock_seeds_uv_with_its_pins_except_torch(tmp_path: Path) -> None:
    # uv prefers the versions already in its output file: every pin but torch's (whose
    # label-less pin would select PyPI's CUDA build over the CPU wheel).
    seeded = tmp_path / "seed.txt"
    seeded.write_text(lock.preferences(lock.LOCK.read_text()))
    pins, kept = lock.read_lock(lock.LOCK), lock.read_lock(seeded)
    assert "torch" in pins and "torch" not in kept
    assert kept == {k: v for k, v in pins.items() if k != "torch"}
