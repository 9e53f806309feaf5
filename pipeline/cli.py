"""The `omniforcing` command: the composition root.

Each package contributes its commands through a `register(app)` function so that this file stays
a table of contents. `deploy` is imported lazily inside `register_all` because the CLI is the one
place allowed to see every layer.
"""

from __future__ import annotations

import importlib
import os

import typer

app = typer.Typer(
    name="omniforcing",
    help="Distil an audio+video DiT into a streaming generator, track it, promote it, serve it.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

# Modules that expose `register(app: typer.Typer) -> None`; a missing one is skipped so that a
# partial checkout still has a working CLI.
_COMMAND_MODULES = (
    "data.cli",
    "pipeline.commands",
    "pipeline.eval_commands",
    "pipeline.ltx2.cli",  # `import ltx2`
    "deploy.demo",
    "deploy.cli",
    "benchmarks.cli",  # `bench`; skipped where the benchmarks package is not installed
)


def register_all(target: typer.Typer) -> None:
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            # Skip only the module itself or its missing package, never a broken import inside.
            if err.name is None or not (name == err.name or name.startswith(err.name + ".")):
                raise
            continue
        module.register(target)


register_all(app)


def main() -> None:
    # Commands draw their own progress; MLflow's tqdm bar per (small) bundle download would
    # interleave with it. Set the variable to "true" to see them.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    app()


if __name__ == "__main__":
    main()
