"""MLflow model registry: promote a finished student run, load a Bundle back by URI.

`promote(run, name, alias)` registers the run's consolidated Bundle as a pyfunc model version and
moves the alias: the best evaluated step's (`best/step-<n>`, kept by pipeline/fidelity.py while
training) when the run has one, else (or with `which="last"`) the `bundle` artifact that
`pipeline.trainer` publishes at the end of a stage; the version's description names the step.
The pyfunc is logged as *models from code* (a small Python file, no cloudpickle) with the Bundle
directory as its artifact. `load_bundle(uri)` turns `models:/name@alias`, `runs:/…` or a local
folder back into a `model.Bundle` (`bundle_dir(uri)`: only its local folder, downloaded if need
be); it imports only mlflow and model (no training code, no Ray).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

STUDENT_STAGES = ("self-forcing", "ode")

# The pyfunc's code: it only exposes the Bundle folder; serving builds the generator itself.
_MODEL_CODE = '''"""OmniForcing Bundle as an MLflow pyfunc (models from code; no pickled objects)."""
import mlflow
from mlflow.pyfunc import PythonModel


class OmniForcingBundle(PythonModel):
    def load_context(self, context):
        self.bundle_dir = context.artifacts["bundle"]

    def predict(self, context, model_input: list[str], params=None):
        """The Bundle itself, whatever the prompts: deploy/ builds the streaming generator from
        it. (The type hint gives MLflow a signature instead of a warning at every log.)"""
        import pipeline  # noqa: F401 — registers LTX-2's codec/text-encoder classes
        from model.bundle import Bundle

        return Bundle.from_pretrained(self.bundle_dir)


mlflow.models.set_model(OmniForcingBundle())
'''


class PromotionError(ValueError):
    """The run cannot be promoted (wrong stage, unfinished, no exported Bundle)."""


def _find_student_run(client: Any, run: str, experiment: str) -> Any:
    from pipeline import tracking

    if run != "latest":
        try:
            return client.get_run(run)
        except Exception:  # noqa: BLE001 — MlflowException for unknown ids
            raise PromotionError(f"run {run!r} does not exist in the tracking store") from None
    exp = client.get_experiment_by_name(experiment)
    runs = []
    for stage in STUDENT_STAGES if exp else ():  # tag filters take no IN: one query per stage
        filt = (
            f"tags.`{tracking.STAGE_TAG}` = '{stage}' AND tags.`{tracking.STATUS_TAG}` = 'finished'"
        )
        runs += client.search_runs(
            [exp.experiment_id], filt, order_by=["attributes.start_time DESC"], max_results=1
        )
    runs.sort(key=lambda r: r.info.start_time, reverse=True)
    if not runs:
        raise PromotionError(
            f"no finished student run ({'/'.join(STUDENT_STAGES)}) in experiment {experiment!r}"
        )
    return runs[0]


def _check_promotable(run: Any) -> None:
    from pipeline import tracking

    tags, rid = run.data.tags, run.info.run_id
    stage = tags.get(tracking.STAGE_TAG)
    if stage not in STUDENT_STAGES:
        raise PromotionError(
            f"run {rid} is stage {stage!r}; only a student stage ({', '.join(STUDENT_STAGES)}) can be promoted"
        )
    if tags.get(tracking.STATUS_TAG) != "finished" or not tags.get(tracking.EXPORT_TAG):
        raise PromotionError(
            f"run {rid} has no finished student checkpoint (status={tags.get(tracking.STATUS_TAG)!r}, "
            f"export={tags.get(tracking.EXPORT_TAG)!r}); finish or resume it first"
        )


def chosen_bundle(run: Any, which: str = "best") -> tuple[str, dict[str, Any]]:
    """(artifact path, what it is) of the Bundle to register: with `which="best"` the best step
    the run's fidelity evaluation kept (`train.fidelity`, pipeline/fidelity.py) when it has one,
    else — and with `which="last"` — the final export. `what`: which, step, and for the best
    its metric and value."""
    from pipeline import fidelity, tracking

    if which not in ("best", "last"):
        raise PromotionError(f"which={which!r}: choose 'best' or 'last'")
    tags = run.data.tags
    if which == "best" and tags.get(fidelity.BEST_EXPORT_TAG):
        return tags[fidelity.BEST_EXPORT_TAG], {
            "which": "best",
            "step": int(tags[fidelity.BEST_STEP_TAG]),
            "metric": tags.get(fidelity.BEST_METRIC_TAG),
            "value": float(tags[fidelity.BEST_VALUE_TAG]),
        }
    step = tags.get(tracking.CKPT_STEP_TAG)
    return tags[tracking.EXPORT_TAG], {"which": "last", "step": int(step) if step else None}


def describe(rid: str, what: dict[str, Any]) -> str:
    """One line naming the run, the step and why that step (the registry's description)."""
    if what["which"] == "best":
        start = " (the stage's starting weights)" if what["step"] == 0 else ""
        return (
            f"step {what['step']}{start} of run {rid}: the best evaluated step by "
            f"{what['metric']} = {what['value']:.4g}"
        )
    return f"step {what['step']} of run {rid}: the last step (final export)"


def promote(
    run: str = "latest",
    name: str = "omniforcing-student",
    alias: str = "champion",
    tracking_uri: str | None = None,
    experiment: str = "omniforcing",
    which: str = "best",
) -> dict[str, Any]:
    """Register the run's Bundle as a new version of `name` and point `alias` at it: the best
    evaluated step's (`chosen_bundle`) unless `which="last"` or the run kept no best. The
    version's description and the returned `description` say which step it is."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or mlflow.get_tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    found = _find_student_run(client, run, experiment)
    _check_promotable(found)
    rid = found.info.run_id
    path, what = chosen_bundle(found, which)
    mlflow.set_tracking_uri(uri)
    with tempfile.TemporaryDirectory() as d:
        bundle = client.download_artifacts(rid, path, d)
        code = Path(d) / "omniforcing_bundle_model.py"
        code.write_text(_MODEL_CODE)
        with mlflow.start_run(run_id=rid):
            info = mlflow.pyfunc.log_model(
                name="student",
                python_model=str(code),
                artifacts={"bundle": bundle},
                registered_model_name=name,
                # Explicit requirements: inferring them loads the model in a subprocess (slow).
                pip_requirements=requirements(Path(bundle)),
            )
    version = str(info.registered_model_version)
    text = describe(rid, what)
    client.update_model_version(name, version, description=text)
    client.set_registered_model_alias(name, alias, version)
    return {
        "name": name,
        "version": version,
        "alias": alias,
        "run_id": rid,
        "uri": f"models:/{name}@{alias}",
        "step": what["step"],
        "which": what["which"],
        "description": text,
    }


def requirements(root: Path) -> list[str]:
    """What a registered bundle needs installed to serve: ours, plus diffusers, transformers and
    accelerate (diffusers builds the VAEs on it) pinned to the versions installed where it is
    registered, when its codecs or text encoder are LTX-2's (their classes name `LTX2`)."""
    from importlib.metadata import version

    config = json.loads((_find_bundle_dir(root) / "config.json").read_text())
    classes = [entry.get("class", "") for entry in config.get("codecs", {}).values()]
    classes.append(str(config.get("text_encoder", {}).get("class", "")))
    out = ["mlflow", "torch", "safetensors"]
    if any("LTX2" in name for name in classes):
        out += [f"{pkg}=={version(pkg)}" for pkg in ("diffusers", "transformers", "accelerate")]
    return out


def _find_bundle_dir(root: Path) -> Path:
    """The folder holding a Bundle (config.json + manifest.json) inside a downloaded model."""
    if (root / "config.json").is_file() and (root / "manifest.json").is_file():
        return root
    for cfg in sorted(root.rglob("manifest.json")):
        if (cfg.parent / "config.json").is_file() and (cfg.parent / "model.safetensors").is_file():
            return cfg.parent
    raise FileNotFoundError(
        f"no Bundle (config.json + manifest.json + model.safetensors) under {root}"
    )


def bundle_dir(uri: str, dst: str | Path | None = None) -> Path:
    """The local Bundle folder of `models:/name@alias`, `models:/name/3`, `runs:/id/path` (downloaded
    to `dst`, else a temp folder) or a folder, without loading the Bundle."""
    local = Path(uri)
    if "://" not in uri and ":/" not in uri:
        if not local.is_dir():
            raise FileNotFoundError(f"bundle folder {uri!r} does not exist")
        return _find_bundle_dir(local)
    import mlflow

    target = Path(dst) if dst else Path(tempfile.mkdtemp(prefix="omni-bundle-"))
    try:
        path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target))
    except Exception as err:  # noqa: BLE001 — MlflowException/RestException: say which URI
        raise FileNotFoundError(f"cannot download model {uri!r}: {err}") from None
    return _find_bundle_dir(Path(path))


def bundle_files(uri: str, names: tuple[str, ...], dst: str | Path | None = None) -> Path:
    """A local folder holding only `names` (e.g. config.json, codecs.safetensors) of the Bundle
    at `uri` (a folder: itself; `models:/…` / `runs:/…`: downloaded to `dst`, else a temp
    folder), so a reader of the codecs never fetches an ltx2 DiT. Names not in the Bundle are
    a FileNotFoundError naming the URI."""
    if "://" not in uri and ":/" not in uri:
        return bundle_dir(uri)
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    target = Path(dst) if dst else Path(tempfile.mkdtemp(prefix="omni-bundle-"))
    try:
        repo = get_artifact_repository(uri)
        root = _find_remote_bundle(repo)
        for name in names:
            repo.download_artifacts(f"{root}/{name}" if root else name, str(target))
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 — MlflowException/RestException: say which URI
        raise FileNotFoundError(f"cannot download {list(names)} of {uri!r}: {err}") from None
    return _find_bundle_dir_of(target, names)


def _find_remote_bundle(repo: Any, depth: int = 4) -> str:
    """The artifact path of the Bundle folder (config.json + manifest.json) in a repository."""
    level = [""]
    for _ in range(depth):
        nxt = []
        for path in level:
            items = repo.list_artifacts(path or None)
            names = {Path(i.path).name for i in items}
            if {"config.json", "manifest.json"} <= names:
                return path
            nxt += [i.path for i in items if i.is_dir]
        level = nxt
    raise FileNotFoundError("no Bundle (config.json + manifest.json) in the artifacts")


def _find_bundle_dir_of(target: Path, names: tuple[str, ...]) -> Path:
    """The downloaded folder that holds `names` (downloads keep the artifact sub-path)."""
    for cfg in sorted(target.rglob(names[0])):
        if all((cfg.parent / n).is_file() for n in names):
            return cfg.parent
    raise FileNotFoundError(f"{target}: {list(names)} not downloaded")


def load_bundle(
    uri: str, dst: str | Path | None = None, device: Any = None, dtype: Any = None
) -> Any:
    """A `model.Bundle` from `models:/name@alias`, `models:/name/3`, `runs:/id/path` or a folder;
    `device`/`dtype` go to `Bundle.from_pretrained` (the DiT is read straight onto them)."""
    from model.bundle import Bundle

    return Bundle.from_pretrained(bundle_dir(uri, dst), device=device, dtype=dtype)
