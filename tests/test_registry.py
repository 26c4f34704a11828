"""dvc.yaml is rendered from the one step registry: a hand edit or a registry change without
re-rendering fails here."""
from __future__ import annotations

import pytest
import yaml

from components import config, registry

from .conftest import ROOT

PIPELINES = list(registry.PIPELINES.values())


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: p.name)
def test_dvc_yaml_is_rendered_from_the_registry(pipeline):
    assert (ROOT / pipeline.dvc_yaml).read_text() == registry.render_dvc_yaml(pipeline.name), (
        f"{pipeline.dvc_yaml} drifted from components/registry.py: run `make dvc-yaml`"
    )


def _stages(pipeline):
    doc = yaml.safe_load((ROOT / pipeline.dvc_yaml).read_text())
    for name, stage in doc["stages"].items():
        yield name, stage.get("do", stage)


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: p.name)
def test_every_stage_param_exists_in_the_schema_and_the_params_file(pipeline):
    """DVC fails on a declared param missing from params.yaml; the schema must know it too."""
    raw = yaml.safe_load((ROOT / pipeline.params_file).read_text())
    for name, stage in _stages(pipeline):
        for key in stage.get("params", []):
            if isinstance(key, dict):  # a whole file: the params guard
                assert list(key) == ["params.yaml"] and name == pipeline.guard.name, (name, key)
                continue
            if "${" in key:
                continue
            model = getattr(config, pipeline.schema)
            node = raw
            for part in key.split("."):
                assert part in model.model_fields, f"stage {name}: param {key} is not in the schema"
                assert isinstance(node, dict) and part in node, f"stage {name}: param {key} is not in {pipeline.params_file}"
                node = node[part]
                model = model.model_fields[part].annotation
                model = getattr(model, "__args__", (model,))[0] if not hasattr(model, "model_fields") else model


def test_cifar10_is_not_part_of_the_main_pipeline():
    main = {s.name for s in registry.STEPS}
    assert not main & {s.name for s in registry.CIFAR10_STEPS}
    assert "cifar10" not in (ROOT / "dvc.yaml").read_text()
    assert (ROOT / "cifar10" / ".dvc" / "config").is_file(), "cifar10/ must be a DVC project of its own (dvc init --subdir)"


@pytest.mark.parametrize("step", [s for p in PIPELINES for s in p.dvc_steps], ids=lambda s: s.name)
def test_each_step_function_takes_exactly_the_registry_names(step):
    """The registry is the one list of a step's inputs and outputs: its function's arguments are those names (plus
    params, and the foreach entry's name), as `registry.call` passes them for DVC and Kubeflow alike."""
    import importlib
    import inspect

    fn = getattr(importlib.import_module(f"components.{step.module}"), step.entry)
    expected = set(step.paths) | ({"name"} if step.foreach else set())
    parameters = inspect.signature(fn).parameters
    required = {n for n, p in parameters.items() if p.default is inspect.Parameter.empty} - {"params"}
    assert required <= expected <= set(parameters) and "params" in parameters, step.name  # (+ options with defaults)
