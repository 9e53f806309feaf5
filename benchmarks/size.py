"""Model size per stream for each preset, built on the meta device (no memory, no weights).

A2V counts for video (its queries), V2A and the audio sinks for audio (`AVDiT.param_counts`).
`run(...)` returns the counts (used by `omniforcing bench`); `main()` prints them.
Usage: python benchmarks/size.py [--preset tiny demo ltx2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if not __package__:  # run as a script: import from the repo root, not from this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from model import AVDiT, preset

LTX2_PARAMS = 19e9  # the published LTX-2 size the ltx2 preset mirrors


def run(presets: tuple[str, ...] = ("tiny", "demo", "ltx2")) -> dict:
    """Parameters per stream of each preset's student (causal: it has the audio sinks)."""
    runs = []
    for name in presets:
        with torch.device("meta"):
            counts = AVDiT(preset(name, causal=True)).param_counts()
        runs.append({"preset": name, **counts})
    return {"runs": runs, "ltx2_reference": LTX2_PARAMS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", nargs="+", default=["tiny", "demo", "ltx2"])
    print(json.dumps(run(tuple(ap.parse_args().preset)), indent=2))


if __name__ == "__main__":
    main()
