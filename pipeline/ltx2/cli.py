"""`omniforcing import ltx2 --from PATH --out BUNDLE`: a diffusers LTX-2.0 pipeline folder (local
or s3://) → a full teacher bundle; a transformer folder alone (sharded or not) → a DiT-only
bundle (model.dit_bundle).

Errors (unsupported config options, missing / unexpected / mis-shaped weights) are one line with
exit code 2. The message on success says which kind was written, and for a DiT-only bundle what
it lacks (it cannot serve or teach until the rest is imported).
"""

from __future__ import annotations

from typing import Annotated

import typer

import_app = typer.Typer(help="Import weights from other formats.", no_args_is_help=True)

_DTYPES = ("float32", "float16", "bfloat16")


@import_app.command("ltx2")
def ltx2_cmd(
    source: Annotated[
        str,
        typer.Option(
            "--from",
            help="diffusers LTX2VideoTransformer3DModel folder (or a pipeline folder holding one "
            "in transformer/), local or s3://",
        ),
    ],
    out: Annotated[str, typer.Option(help="DiT bundle folder to write.")],
    latent_hw: Annotated[
        str, typer.Option(help="Latent grid h,w the model works at (LTX-2: 512×768 → 16,24).")
    ] = "16,24",
    dtype: Annotated[str, typer.Option(help="Weights on disk: " + ", ".join(_DTYPES))] = "bfloat16",
    max_len: Annotated[
        int, typer.Option(help="Prompt tokens of the Gemma text encoder (LTX-2: 1024).")
    ] = 1024,
    video_lookahead: Annotated[
        int,
        typer.Option(
            min=0,
            help="Video latents (8 frames each) a stream holds back so the non-causal decoder "
            "sees what follows: less drift at chunk boundaries, more latency (3 = one second).",
        ),
    ] = 0,
    audio_lookahead: Annotated[
        int, typer.Option(min=0, help="Audio latents (40 ms each) held back for the vocoder.")
    ] = 2,
) -> None:
    """Import LTX-2.0 (diffusers format): a whole pipeline folder → a teacher bundle; a
    transformer alone → a DiT-only bundle."""
    import json

    import torch

    from pipeline.commands import console, user_errors
    from pipeline.ltx2.importer import MISSING, import_ltx2

    with user_errors():
        if dtype not in _DTYPES:
            raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(_DTYPES)}")
        try:
            h, w = (int(x) for x in latent_hw.split(","))
        except ValueError:
            raise ValueError(
                f"--latent-hw {latent_hw!r}: expected two integers, e.g. 16,24"
            ) from None
        path = import_ltx2(
            source,
            out,
            (h, w),
            getattr(torch, dtype),
            max_len=max_len,
            lookahead=(video_lookahead, audio_lookahead),
        )
    config = json.loads((path / "config.json").read_text())
    if config.get("format") == "omniforcing-dit":
        missing = config["source"].get("missing", MISSING)
        note = f"DiT only: {missing}; read it with model.dit_bundle.load_dit_bundle"
    else:
        note = "teacher bundle: DiT, LTX-2's VAEs + vocoder, Gemma 3 + connectors"
    console.print(f"[green]imported[/] {path} ({note})", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(import_app, name="import")
