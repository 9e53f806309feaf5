"""`omniforcing data ...`: synth, inspect, fit-codec, fit-drawer (a typer sub-app).

Holds only argument parsing, rich progress bars and printing; the work is in data/shards.py and
data/inspect.py. `register(app)` adds the `data` group; pipeline/cli.py calls it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

data_app = typer.Typer(help="Shards: synthesise, inspect, fit the embedded codecs.")
console = Console(stderr=True)


@contextmanager
def _progress(label: str, total: int | None) -> Iterator[Callable[[int], None]]:
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(label, total=total)
        yield lambda done: bar.update(task, completed=done)


def _print(report: dict[str, Any]) -> None:
    typer.echo(json.dumps(report, indent=1, sort_keys=True))


@data_app.command()
def synth(
    out: Annotated[str, typer.Option(help="local folder or s3://bucket/prefix")],
    clips: Annotated[int, typer.Option(min=1, help="number of clips")],
    seconds: Annotated[float, typer.Option(help="clip length; 1 + 8k frames at 24 fps")] = 5.04,
    shard_size: Annotated[int, typer.Option(min=1, help="samples per shard")] = 64,
    seed: Annotated[int, typer.Option(help="same seed -> same shards")] = 0,
    height: Annotated[int, typer.Option(min=8)] = 64,
    width: Annotated[int, typer.Option(min=8)] = 64,
    balls: Annotated[int, typer.Option(min=1, max=4, help="at most this many balls per clip")] = 2,
) -> None:
    """Render synthetic bouncing-ball clips into webdataset shards (mp4 + json) + index.json."""
    from data.synth import synth as run

    with _progress("synth", clips) as tick:
        try:
            index = run(
                out, clips, seconds, shard_size, seed, height, width, progress=tick, max_balls=balls
            )
        except ValueError as err:
            raise typer.BadParameter(str(err)) from err
    _print({"out": out, "shards": len(index["shards"]), "samples": index["total_samples"],
            "bytes": index["total_bytes"]})  # fmt: skip


@data_app.command()
def inspect(
    path: Annotated[str, typer.Argument(help="local folder or s3://bucket/prefix")],
    sheet: Annotated[str, typer.Option(help="contact-sheet PNG to write")] = "contact_sheet.png",
    sheet_clips: Annotated[int, typer.Option(min=1, help="clips on the sheet")] = 4,
) -> None:
    """Samples, total duration, fps / sample-rate histogram, bad samples, contact sheet."""
    from data.inspect import inspect_shards
    from data.shards import read_index

    index = read_index(path)
    with _progress("inspect", index["total_samples"] if index else None) as tick:
        report = inspect_shards(path, sheet=sheet, sheet_clips=sheet_clips, progress=tick)
    _print(report)


@data_app.command("fit-codec")
def fit_codec(
    path: Annotated[str, typer.Argument(help="local folder or s3://bucket/prefix")],
    out: Annotated[str, typer.Option(help="folder for codec.json + codec.safetensors")],
    max_clips: Annotated[int | None, typer.Option(min=1, help="fit on at most this many")] = None,
    grid: Annotated[int, typer.Option(min=1, help="latent cells per side (preset's)")] = 8,
) -> None:
    """Fit the embedded codecs on the shards; report video PSNR and contacts kept (40 ms)."""
    from data.inspect import fit_codec as run

    with _progress("round trip", max_clips) as tick:
        report = run(path, out, max_clips=max_clips, progress=tick, grid=grid)
    _print(report)


@data_app.command("fit-drawer")
def fit_drawer(
    source: Annotated[str, typer.Argument(help="a bundle folder or a codec folder (codec.json)")],
    out: Annotated[str, typer.Option(help="where to write it back, with the drawer")],
    steps: Annotated[int, typer.Option(min=1, help="training steps")] = 3000,
    batch: Annotated[int, typer.Option(min=1, help="latents per step")] = 16,
    width: Annotated[int, typer.Option(min=8, help="drawer channels at the cell grid")] = 48,
    seed: Annotated[int, typer.Option(help="first world seed of the training clips")] = 0,
    balls: Annotated[int, typer.Option(min=1, max=4, help="at most this many balls")] = 2,
    record: Annotated[str | None, typer.Option(help="folder for drawer-fit.json + PNG")] = None,
    context: Annotated[
        int, typer.Option(min=0, max=1, help="previous latents the drawer reads (0: none)")
    ] = 1,
    noise: Annotated[
        float, typer.Option(min=0.0, help="half the latents noised, sigma up to this")
    ] = 0.0,
    boundary: Annotated[
        float, typer.Option(min=0.0, help="weight of the frame-step loss across group boundaries")
    ] = 0.0,
    consistency: Annotated[
        float, typer.Option(min=0.0, help="weight of re-encoded frames vs the latents drawn")
    ] = 0.0,
    warm: Annotated[bool, typer.Option(help="start from the drawer SOURCE already has")] = False,
    lr: Annotated[float, typer.Option(min=0.0, help="peak learning rate")] = 1e-3,
) -> None:
    """Teach the video codec to draw: fit a CellDrawer on world clips; report PSNR and peak."""
    from data.draw import fit_and_save

    with _progress("fit drawer", steps) as tick:
        try:
            report = fit_and_save(source, out, steps, batch, width, seed, balls,
                                  record=record, progress=lambda s, _loss: tick(s),
                                  context=context, noise=noise, boundary=boundary, warm=warm,
                                  lr=lr, consistency=consistency)  # fmt: skip
        except (ValueError, FileNotFoundError) as err:
            raise typer.BadParameter(str(err)) from err
    _print(report)


def register(app: typer.Typer) -> None:
    """Attach the `data` command group to the root CLI."""
    app.add_typer(data_app, name="data")
