"""Markdown tables from the suites' figure dicts (the dicts `benchmarks/<suite>.run` returns).

Each table holds figures of one run and the ratios between them; the settings a table was
measured with are in its heading so a quick (test-sized) table is never mistaken for a real one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Row = tuple[str, Callable[[dict[str, Any]], str]]


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms"


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def size_table(fig: dict[str, Any]) -> str:
    runs = fig["runs"]
    rows = [
        [stream, *(_count(r[key]) for r in runs)]
        for stream, key in (
            ("video (incl. A2V)", "video"),
            ("audio (incl. V2A, sinks)", "audio"),
            ("shared", "shared"),
            ("total", "total"),
        )
    ]
    if any(r["preset"] == "ltx2" for r in runs):
        ref = fig["ltx2_reference"]
        cells = [f"{r['total'] / ref - 1:+.1%}" if r["preset"] == "ltx2" else "" for r in runs]
        rows.append(["total vs LTX-2's 19 B", *cells])
    title = "### Model size (students built on the meta device)"
    return f"{title}\n\n" + _table(["parameters", *(r["preset"] for r in runs)], rows)


def _streaming_rows(late: int, cache_block: int) -> list[Row]:
    return [
        ("parameters", lambda r: _count(r["params"])),
        (
            f"per-block latency, block 5 / block {late}",
            lambda r: (
                f"{_ms(r['block_latency_s']['early_s'])} / {_ms(r['block_latency_s']['late_s'])}"
            ),
        ),
        (
            f"ratio block {late} / block 5 (target ≤ 1.1)",
            lambda r: f"{r['block_latency_s']['ratio_late_vs_early']:.2f}",
        ),
        (
            f"block at {cache_block} s: recompute-the-prefix / cached",
            lambda r: f"{r['recompute_over_cached']:.2f}×",
        ),
        (
            "tokens/s (per-block tokens × (K+1) calls / latency)",
            lambda r: f"{r['tokens_per_s']:,.0f}",
        ),
        (
            "finished 5 s clip: student (K steps + commit) / teacher (40 Euler, CFG)",
            lambda r: f"{r['student_5s_s']:.3f} / {r['teacher_5s_s']:.3f} s",
        ),
        (
            "speed-up teacher / student vs FLOP ratio 40·P/(K+1) (share)",
            lambda r: (
                f"{r['speedup_teacher_over_student']:.2f}× of "
                f"{r['flop_ratio_40P_over_K1']:.0f} ({r['speedup_share_of_flop_ratio']:.0%})"
            ),
        ),
        ("time to first chunk (prefix + first second)", lambda r: _ms(r["time_to_first_chunk_s"])),
        ("generated fps after the first chunk", lambda r: f"{r['fps_after_first_chunk']:.1f}"),
        ("real-time factor (5 s / student time)", lambda r: f"{r['realtime_factor']:.2f}×"),
    ]


def _graphed_rows(late: int) -> list[Row]:
    g = "`GraphedStream` (CUDA graphs on a GPU, else its static buffers eagerly)"
    return [
        (
            f"{g}: block 5 / block {late}",
            lambda r: (
                f"{_ms(r['graphed']['block_latency_s']['early_s'])} / "
                f"{_ms(r['graphed']['block_latency_s']['late_s'])}"
            ),
        ),
        (
            f"{g}: time to first chunk, fps after it",
            lambda r: (
                f"{_ms(r['graphed']['time_to_first_chunk_s'])}, "
                f"{r['graphed']['fps_after_first_chunk']:.1f}"
            ),
        ),
        (
            f"{g}: fps vs eager, speed-up share of the FLOP ratio",
            lambda r: (
                f"{r['graphed']['fps_graphed_over_eager']:.2f}×, "
                f"{r['graphed']['speedup_share_of_flop_ratio']:.0%}"
            ),
        ),
        (
            f"{g}: largest latent difference from eager (same seed)",
            lambda r: f"{r['graphed']['max_abs_diff_vs_eager']:.2g}",
        ),
    ]


def _cuda_rows(late: int) -> list[Row]:
    return [
        ("peak GPU memory streaming a 5 s clip", lambda r: f"{r['peak_memory_gib']:.2f} GiB"),
        (
            f"MFU at block {late} (of the GPU's dense peak)",
            lambda r: f"{r['mfu']:.1%} of {r['peak_flops'] / 1e12:.0f} TFLOP/s",
        ),
    ]


def streaming_table(fig: dict[str, Any]) -> str:
    runs = fig["runs"]
    late = fig["blocks"] - 2
    rows = _streaming_rows(late, runs[0]["cache_block"])
    if any("mfu" in r for r in runs):
        rows += _cuda_rows(late)
    if any("graphed" in r for r in runs):
        rows += _graphed_rows(late)
    if any("graphs_error" in r for r in runs):
        rows.append(("`GraphedStream` failed", lambda r: r["graphs_error"].replace("|", "/")))
    body = [[label, *(get(r) if _has(get, r) else "–" for r in runs)] for label, get in rows]
    r0 = runs[0]
    title = (
        f"### Streaming ({r0['device']}, {r0['dtype']}, {fig['blocks']}-block clip,"
        f" rolling window {fig['window']} s per modality)"
    )
    return f"{title}\n\n" + _table(["figure", *(r["preset"] for r in runs)], body)


def _has(get: Callable[[dict[str, Any]], str], r: dict[str, Any]) -> bool:
    try:
        get(r)
    except KeyError:
        return False
    return True


def data_table(fig: dict[str, Any]) -> str:
    rows = [
        [
            name,
            f"{r['decode']:.2f}",
            f"{r['decode ratio']:.2f}",
            f"{r['decode+encode']:.2f}",
            f"{r['decode+encode ratio']:.2f}",
        ]
        for name, r in fig["rows"].items()
    ]
    title = f"### Data ({fig['clips']} clips of {fig['seconds']} s on a local S3, samples/s)"
    head = ["pipeline", "decode/s", "ratio", "decode + encode/s", "ratio"]
    return f"{title}\n\n" + _table(head, rows)


def train_table(fig: dict[str, Any]) -> str:
    sps, z = fig["samples_per_s"], fig["zero_bytes_per_rank"]
    rows = [
        ["samples/s, 1 / 2 workers (ZeRO-2)", f"{sps['1']:.2f} / {sps['2']:.2f}"],
        ["ratio 2 workers / 1 worker", f"{fig['ratio_2_over_1']:.2f}"],
        [
            "params + optimizer per rank, ZeRO-2 / ZeRO-3",
            f"{z['2'] / 1e3:.1f} / {z['3'] / 1e3:.1f} kB",
        ],
        ["ratio ZeRO-3 / ZeRO-2 per rank", f"{fig['zero3_over_zero2']:.2f}"],
    ]
    title = f"### Training (tiny, {fig['steps']} steps, local Ray + DeepSpeed on CPU)"
    return f"{title}\n\n" + _table(["figure", "value"], rows)


def serve_table(fig: dict[str, Any]) -> str:
    loc, http = fig["in_process"], fig["http"]
    rows = [
        ["in-process `StreamingGenerator`", _ms(loc["ttfc_s"]), _ms(loc["chunk_s"])],
        ["HTTP through Ray Serve", _ms(http["ttfc_s"]), _ms(http["chunk_s"])],
        [
            "overhead ratio HTTP / in-process",
            f"{fig['overhead_ttfc']:.2f}×",
            f"{fig['overhead_chunk']:.2f}×",
        ],
    ]
    conc = [
        [
            str(c["streams"]),
            f"{c['aggregate_fps']:.1f}",
            _ms(c["mean_ttfc_s"]),
            f"{c['rtf_per_stream']:.2f}×",
        ]
        for c in fig["concurrency"]
    ]
    title = f"### Serving ({fig['model']}, {fig['seconds']} s clips)"
    return "\n\n".join(
        [
            title,
            _table(["path", "time to first chunk", "per chunk"], rows),
            _table(["streams", "aggregate fps", "mean TTFC", "real-time factor per stream"], conc),
        ]
    )


TABLES: dict[str, Callable[[dict[str, Any]], str]] = {
    "size": size_table,
    "streaming": streaming_table,
    "data": data_table,
    "train": train_table,
    "serve": serve_table,
}


def render(suites: dict[str, dict[str, Any]]) -> str:
    """One table per suite that ran, in the order they ran."""
    return "\n\n".join(TABLES[name](fig) for name, fig in suites.items())
