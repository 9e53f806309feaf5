"""Cluster launch files: the RayService's Serve config resolves to our app builder."""

from pathlib import Path

import pytest
import yaml

from deploy.app import app_builder

ROOT = Path(__file__).resolve().parents[1]


def _serve_config() -> dict:
    doc = yaml.safe_load((ROOT / "deploy/cluster/rayservice.yaml").read_text())
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def test_rayservice_app_builds_from_its_args():
    from ray.serve.schema import ServeDeploySchema

    cfg = _serve_config()
    ServeDeploySchema.model_validate(cfg)
    app = cfg["applications"][0]
    assert app["import_path"] == "deploy.app:app_builder"
    built = app_builder(app["args"])
    assert type(built).__name__ == "Application"


def test_app_builder_rejects_unknown_args():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['replicaz'\]"):
        app_builder({"replicaz": 2})
