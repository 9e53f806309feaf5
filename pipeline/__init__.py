"""Configs, stages, trainer, tracking, registry and the CLI (docs/contracts.md)."""

from pipeline.ltx2 import register as _register_ltx2

_register_ltx2()  # LTX-2 bundles load wherever pipeline is imported (diffusers only on use)
