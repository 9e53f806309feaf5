"""Run a function when a module is imported, without importing it (stdlib only).

`pipeline` is imported by every Ray worker process of a job (the `worker_process_setup_hook`
lives in pipeline.ray_patches), most of which — Ray Train's controller and its helper actors,
Ray Data's coordinators — never touch torch. What `import pipeline` has to arrange for other
modules (LTX-2's codecs registered with model.bundle, the guard patched into Ray Train's
placement-group cleaner) therefore waits here until that module is imported: importing torch
in each of those processes cost ~3 s of CPU apiece on a 2-core box.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

_PENDING: dict[str, list[Callable[[ModuleType], None]]] = {}


def after_import(name: str, callback: Callable[[ModuleType], None]) -> None:
    """callback(module) now if `name` is imported, else right after its import runs (once,
    however often the same callback is asked for)."""
    if name in sys.modules:
        callback(sys.modules[name])
        return
    pending = _PENDING.setdefault(name, [])
    if callback not in pending:
        pending.append(callback)
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader, name: str) -> None:
        self.inner, self.name = inner, name

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        for callback in _PENDING.pop(self.name, []):
            callback(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the real loader of a module with callbacks pending; other imports are untouched."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in _PENDING:
            return None
        sys.meta_path.remove(self)  # find the real spec without recursing into ourselves
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, name)
        return spec
