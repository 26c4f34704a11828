"""dvc.yaml is rendered from the one step registry: a hand edit or a registry change without
re-rendering fails here."""
from __future__ import annotations

import yaml

from components import registry
from components.config import Params

from .conftest import ROOT


def test_dvc_yaml_is_rendered_from_the_registry():
    assert (ROOT / "dvc.yaml").read_text() == registry.render_dvc_yaml(), (
        "dvc.yaml drifted from components/registry.py: run `make dvc-yaml`"
    )


def test_every_stage_param_exists_in_the_schema():
    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name, stage in doc["stages"].items():
        for key in stage.get("params", []):
            model = Params
            for part in key.split("."):
                assert part in model.model_fields, f"stage {name}: param {key} is not in the schema"
                model = model.model_fields[part].annotation
                model = getattr(model, "__args__", (model,))[0] if not hasattr(model, "model_fields") else model
