"""Bad bundles fail with one line naming the file and key: a missing file, a truncated
safetensors file, an unknown config key, a wrong shape, a pickled `.pt` where weights are
expected (never unpickled). Through `Bundle.from_pretrained`, `omniforcing generate` (one line,
exit 2, no traceback) and the Serve app's model loading (a real local Serve app)."""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save_file
from typer.testing import CliRunner

from model.bundle import FILES, Bundle, BundleError, sha256_file


def _weights(d: Path) -> dict[str, torch.Tensor]:
    """The DiT weights, read into memory (not mmapped: the file is rewritten next)."""
    return load((d / "model.safetensors").read_bytes())


def _reseal(d: Path) -> None:
    """Rewrite manifest.json as if the bundle had been written so (past the checksums)."""
    (d / "manifest.json").write_text(json.dumps({n: sha256_file(d / n) for n in FILES}))


def _missing(d: Path) -> None:
    (d / "text.safetensors").unlink()


def _truncated(d: Path) -> None:
    path = d / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    _reseal(d)


def _unknown_key(d: Path) -> None:
    config = json.loads((d / "config.json").read_text())
    config["model"]["attention_sparsity"] = 0.5
    (d / "config.json").write_text(json.dumps(config))
    _reseal(d)


def _wrong_shape(d: Path) -> None:
    state = _weights(d)
    key = sorted(k for k in state if k.endswith(".weight") and state[k].dim() == 2)[0]
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    save_file(state, d / "model.safetensors")
    _reseal(d)


def _pickle(d: Path) -> None:
    """A torch.save (pickle) checkpoint where the weights are expected."""
    state = _weights(d)
    torch.save(state, d / "model.safetensors")
    _reseal(d)


def _pt_beside(d: Path) -> None:
    torch.save(_weights(d), d / "model.pt")
    (d / "model.safetensors").unlink()


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing": (_missing, r"text\.safetensors missing"),
    "truncated": (_truncated, r"model\.safetensors: not a readable safetensors file"),
    "unknown-key": (
        _unknown_key,
        r"config\.json: model: unknown key\(s\) \['attention_sparsity'\]",
    ),
    "wrong-shape": (_wrong_shape, r"model\.safetensors: weights do not match .*: file \("),
    "pickle": (_pickle, r"model\.safetensors: not a readable safetensors file"),
    "pt-beside": (_pt_beside, r"model\.safetensors missing"),
}


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a, **_k):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def _bad(tiny_bundle_dir: Path, tmp_path: Path, case: str) -> Path:
    d = tmp_path / case
    shutil.copytree(tiny_bundle_dir, d)
    CASES[case][0](d)
    return d


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_bundle_fails_naming_file_and_key(
    case: str, tiny_bundle_dir: Path, tmp_path: Path, no_unpickling: None
) -> None:
    from pipeline.cli import app

    d = _bad(tiny_bundle_dir, tmp_path, case)
    with pytest.raises(BundleError, match=CASES[case][1]) as err:
        Bundle.from_pretrained(d)
    assert "\n" not in str(err.value)
    res = CliRunner().invoke(app, ["generate", "--model", str(d), "--prompt", "a red ball"])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert str(d) in lines[0]


def test_serve_refuses_a_bad_bundle_in_one_line(
    tiny_bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh Serve app whose replica cannot load its bundle: `omniforcing serve` exits 2 with
    the replica's one-line reason (Serve's own error is a traceback)."""
    import ray

    from pipeline.cli import app

    d = _bad(tiny_bundle_dir, tmp_path, "wrong-shape")
    started = not ray.is_initialized()
    # One failed replica start is enough here (Serve tries 3 by default); read by the Serve
    # controller, so it only applies when this test starts Ray.
    monkeypatch.setenv("RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT", "1")
    try:
        res = CliRunner().invoke(
            app, ["serve", "--model", str(d), "--port", "0", "--replica-cpus", "0.5"]
        )
    finally:
        from ray import serve

        serve.shutdown()
        if started:
            ray.shutdown()
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2, res.output
    assert lines[-1].startswith(f"error: {d} could not be served: {d}/model.safetensors: weights")
