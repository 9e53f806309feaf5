"""Several runs' fidelity curves on one figure: `fidelity/<figure>` against the optimizer step, as
logged by `train.fidelity.every` (pipeline/fidelity.py), with the teacher's reference figure as a
dashed line and an optional starting point at step 0 (e.g. the ODE student the runs start from).

    python -m benchmarks.fidelity_curves --tracking-uri sqlite:///runs/demo/mlflow.db \
        --run "lr 3e-4=<run id>" --run "lr 1e-4=<run id>" --start sync_40ms=0.607 --out curves.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from matplotlib import pyplot as plt
from mlflow.tracking import MlflowClient

FIGURES = ("sync_40ms", "median_offset_ms", "reversals_per_clip")


def curves(client: MlflowClient, run_id: str, figure: str) -> list[tuple[int, float]]:
    history = client.get_metric_history(run_id, f"fidelity/{figure}")
    return sorted((m.step, m.value) for m in history)


def plot(client: MlflowClient, runs: dict[str, str], start: dict[str, float], out: Path) -> None:
    fig, axes = plt.subplots(1, len(FIGURES), figsize=(5 * len(FIGURES), 3.6))
    for ax, figure in zip(axes, FIGURES, strict=True):
        teacher = None
        for label, run_id in runs.items():
            points = curves(client, run_id, figure)
            if figure in start:
                points = [(0, start[figure]), *points]
            ax.plot(*zip(*points, strict=True), marker="o", ms=3, label=label)
            metrics = client.get_run(run_id).data.metrics
            teacher = metrics.get(f"fidelity/teacher/{figure}", teacher)
        if teacher is not None:
            ax.axhline(teacher, ls="--", color="k", lw=1, label="teacher")
        if figure == "median_offset_ms":
            ax.set_yscale("log")  # a collapsed run's offsets are seconds, a good one's tens of ms
        ax.set_title(figure, fontsize=10)
        ax.set_xlabel("optimizer step of the stage")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--run", action="append", required=True, help="LABEL=RUN_ID (repeat)")
    p.add_argument("--start", action="append", default=[], help="FIGURE=VALUE at step 0")
    p.add_argument("--out", type=Path, default=Path("fidelity_curves.png"))
    args = p.parse_args()
    runs = dict(r.rsplit("=", 1) for r in args.run)  # a label may hold "="
    start = {k: float(v) for k, v in (s.split("=", 1) for s in args.start)}
    plot(MlflowClient(args.tracking_uri), runs, start, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
