"""Configs, stages, trainer, tracking, registry and the CLI (docs/contracts.md)."""

from pipeline.after_import import after_import as _after_import


def _register_ltx2(_bundle_module: object) -> None:
    from pipeline.ltx2 import register

    register()


# LTX-2 bundles load wherever pipeline is imported (diffusers only on use); registered when
# model.bundle is, so that `import pipeline` alone (every Ray worker's setup hook) stays light.
_after_import("model.bundle", _register_ltx2)
