"""Test configuration: every module in tests/fixtures/ is a pytest plugin (real services live there)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Tiny models gain nothing from intra-op threads, and threads spin badly when Ray workers,
# servers and the test process share two cores.
torch.set_num_threads(1)

pytest_plugins = sorted(
    f"tests.fixtures.{p.stem}"
    for p in (Path(__file__).parent / "fixtures").glob("*.py")
    if p.stem != "__init__"
)
