"""Test configuration: every module in tests/fixtures/ is a pytest plugin (real services live there)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
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

# The end-to-end files, longest first (seconds of a serial run on 2 cores, session 20). scripts/
# test.sh runs two test processes (`-n 2 --dist loadfile`) that take files in collection order:
# starting these first lets the short tests fill the gaps beside them instead of one long test
# running alone at the end.
HEAVY_FIRST = (
    "test_demo.py",  # 236
    "test_resume.py",  # 178
    "test_killed_mid_checkpoint.py",  # 92
    "test_ltx2_e2e.py",  # 92
    "test_mlflow_outage.py",  # 87
    "test_train_teacher.py",  # 68
    "test_s3_outage.py",  # 55
    "test_self_forcing.py",  # 40
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept within
