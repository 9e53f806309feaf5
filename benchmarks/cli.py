"""`omniforcing bench`: run the benchmark suites in one process and write benchmarks/RESULTS.md.

Only argument handling and orchestration live here: each suite's measurement code is its own
module's `run(...)` (benchmarks/<suite>.py), the tables are benchmarks/tables.py, the header and
the region writing benchmarks/report.py. Suites are imported when they run, so registering this
command costs the CLI nothing at import time. A suite that raises does not stop the others: the
finished suites' tables are still written, the failure is a line in RESULTS.md and under
"failed" in --json (rewritten after every suite), and the command exits 1 at the end.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

SUITES = ("size", "streaming", "data", "train", "serve")
# Suite → (full-size kwargs, --quick kwargs) for its `run`. Quick sizes are for tests: the
# figures are real measurements but too small to quote.
SETTINGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "size": ({}, {}),
    "streaming": (
        {"blocks": 52, "cache_block": 20, "graphs": True},
        {"blocks": 12, "cache_block": 8, "graphs": True},
    ),
    "data": ({}, {"clips": 2, "seconds": 1.04, "shard_size": 2, "repeats": 1}),
    "train": ({}, {"steps": 3}),
    "serve": ({}, {"seconds": 1, "streams": (1, 2), "repeats": 1}),
}

console = Console(stderr=True)


def _suites(only: str) -> list[str]:
    asked = [s.strip() for s in only.split(",") if s.strip()]
    unknown = sorted(set(asked) - set(SUITES))
    if unknown or not asked:
        raise typer.BadParameter(f"unknown suite(s) {unknown}; choose from {','.join(SUITES)}")
    return [s for s in SUITES if s in asked]


def _presets(preset: str | None, quick: bool, device: str) -> list[str]:
    from model.config import PRESETS

    if preset is None:  # ltx2 only makes sense on a GPU; the CPU gets the small presets
        names = ["tiny"] if quick else ["ltx2"] if device.startswith("cuda") else ["tiny", "demo"]
    else:
        names = [p.strip() for p in preset.split(",") if p.strip()]
    bad = [p for p in names if p not in PRESETS]
    if bad or not names:
        raise typer.BadParameter(f"unknown preset(s) {bad}; choose from {','.join(PRESETS)}")
    return names


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise typer.BadParameter("--device cuda, but torch sees no CUDA device")
    if not device.startswith(("cpu", "cuda")):
        raise typer.BadParameter(f"--device must be cpu or cuda[:n], got {device!r}")


def run_suites(
    names: list[str],
    quick: bool,
    device: str,
    presets: list[str],
    after_each: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """{suite: figures}, {suite: wall seconds} and {suite: error} of the suites that raised.

    Each suite runs in turn in this process. A suite that raises is logged and recorded, and the
    rest still run: one broken suite must not throw away the figures of the others (a full bench
    takes tens of minutes). `after_each(result)` sees the result so far after every suite.
    """
    result: dict[str, Any] = {"suites": {}, "wall_s": {}, "failed": {}}
    for name in names:
        kwargs = dict(SETTINGS[name][1 if quick else 0])
        if name == "streaming":  # the only suite with a device and model-size choice
            kwargs.update(presets=presets, device=device)
        console.print(f"bench: {name} …")
        start = time.perf_counter()
        try:
            result["suites"][name] = importlib.import_module(f"benchmarks.{name}").run(**kwargs)
        except Exception as err:  # not BaseException: Ctrl-C still stops the whole bench
            console.print_exception()
            result["failed"][name] = " ".join(f"{type(err).__name__}: {err}".split())
            console.print(f"[red]bench: {name} failed[/]: {result['failed'][name]}")
        result["wall_s"][name] = time.perf_counter() - start
        if name not in result["failed"]:
            console.print(f"bench: {name} done in {result['wall_s'][name]:.1f} s")
        if after_each is not None:
            after_each(result)
    return result


def _command(names: list[str], quick: bool, device: str, preset: str | None, out: Path,
             json_out: Path | None) -> str:  # fmt: skip
    # The options as parsed, so the line reruns exactly this bench whatever the caller typed.
    parts = ["omniforcing bench", f"--only {','.join(names)}", f"--device {device}"]
    parts += ["--quick"] if quick else []
    parts += [f"--preset {preset}"] if preset else []
    parts += [f"--out {out}"] + ([f"--json {json_out}"] if json_out else [])
    return " ".join(parts)


def bench(
    only: Annotated[
        str, typer.Option(help=f"Comma-separated suites to run: {','.join(SUITES)}.")
    ] = ",".join(SUITES),
    quick: Annotated[
        bool, typer.Option(help="Smallest sizes (tests); not figures to quote.")
    ] = False,
    device: Annotated[
        str, typer.Option(help="Device of the streaming suite (cpu | cuda); the others use CPU.")
    ] = "cpu",
    preset: Annotated[
        str | None,
        typer.Option(help="Streaming presets, comma-separated (default: tiny,demo; ltx2 on cuda)."),
    ] = None,
    out: Annotated[
        Path, typer.Option(help="Results file; only its bench region is rewritten.")
    ] = Path("benchmarks/RESULTS.md"),
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also dump every raw figure as JSON here.")
    ] = None,
) -> None:
    """Run the benchmark suites and write their tables into the bench region of RESULTS.md."""
    from benchmarks import report, tables

    names = _suites(only)
    _check_device(device)
    presets = _presets(preset, quick, device)
    command = _command(names, quick, device, preset, out, json_out)
    info = report.machine()  # before the suites: the load average is the box's, not ours
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    commit = report.git_commit()

    def dump(result: dict[str, Any]) -> None:  # after every suite: a later crash keeps these
        if json_out:
            raw = {"command": command, "date": date, "commit": commit, "machine": info, **result}
            report.write_atomic(json_out, json.dumps(raw, indent=2) + "\n")

    result = run_suites(names, quick, device, presets, after_each=dump)
    walls = ", ".join(f"{k} {v:.0f} s" for k, v in result["wall_s"].items())
    failed = [f"suite {k} failed: {v}" for k, v in result["failed"].items()]
    parts = [report.header(info, command, date, commit), f"Wall time per suite: {walls}."]
    parts += ["\n\n".join(failed)] if failed else []  # one paragraph each: one line each
    parts += [tables.render(result["suites"])] if result["suites"] else []
    report.update_results(out, "\n\n".join(parts))
    console.print(f"[green]wrote[/] {out}" + (f" and {json_out}" if json_out else ""))
    if failed:
        console.print(
            f"[red]bench: {len(failed)} suite(s) failed[/]: {', '.join(result['failed'])}"
        )
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
