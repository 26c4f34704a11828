"""The one registry of steps. ``dvc.yaml`` is rendered from it and ``pipeline.py`` builds its
Kubeflow components from it, so the two cannot drift (tests/test_registry.py proves it).

A step names its inputs and outputs as keyword arguments of its module's ``run`` function, each
bound to a path in the DVC workspace; under Kubeflow the same arguments are bound to artifact
paths instead. ``params`` lists the params.yaml keys whose change must re-run the step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml


@dataclass(frozen=True)
class Step:
    name: str
    module: str  # components.<module>, whose run(params?, **paths) does the work
    inputs: dict[str, str] = field(default_factory=dict)  # run() kwarg -> path (DVC dep)
    outputs: dict[str, str] = field(default_factory=dict)  # run() kwarg -> path (DVC out, cached)
    metrics: dict[str, str] = field(default_factory=dict)  # run() kwarg -> JSON path (DVC metric, not cached)
    plots: dict[str, str] = field(default_factory=dict)  # run() kwarg -> CSV path (DVC plot, not cached)
    params: tuple[str, ...] = ()
    code: tuple[str, ...] = ()  # extra modules whose change re-runs the step
    takes_params: bool = True
    description: str = ""

    @property
    def paths(self) -> dict[str, str]:
        return {**self.inputs, **self.outputs, **self.metrics, **self.plots}


STEPS: tuple[Step, ...] = (
    Step(
        name="download",
        module="download",
        outputs={"out_dir": "data/raw"},
        params=("data.dataset", "data.mirrors", "data.files"),
        description="Fetch the four Fashion-MNIST IDX files from the first mirror that serves them with the pinned SHA-256.",
    ),
    Step(
        name="split",
        module="split",
        inputs={"raw_dir": "data/raw"},
        outputs={"out_dir": "data/splits", "card_md": "reports/dataset_card.md"},
        metrics={"card_json": "metrics/dataset_card.json"},
        params=("data.files", "data.valid_size", "data.max_train_rows", "data.max_test_rows", "data.task_b"),
        code=("idx", "dataset"),
        description="Parse IDX strictly; write train/valid/test Parquet for the full task and tasks A and B.",
    ),
    Step(
        name="standardize",
        module="standardize",
        inputs={"splits_dir": "data/splits"},
        outputs={"scaler_path": "data/scaler.npz"},
        metrics={"metrics_path": "metrics/scaler.json"},
        takes_params=False,
        code=("dataset",),
        description="Fit per-pixel mean/std on the training split only.",
    ),
)


def get(name: str) -> Step:
    for s in STEPS:
        if s.name == name:
            return s
    raise KeyError(f"unknown step {name!r}; steps: {', '.join(s.name for s in STEPS)}")


def dvc_stage(step: Step) -> dict[str, Any]:
    deps = [f"components/{m}.py" for m in (step.module, *step.code)] + list(step.inputs.values())
    stage: dict[str, Any] = {"desc": step.description, "cmd": f"python -m components {step.name}", "deps": deps}
    if step.params:
        stage["params"] = list(step.params)
    stage["outs"] = list(step.outputs.values())
    if step.metrics:
        stage["metrics"] = [{p: {"cache": False}} for p in step.metrics.values()]
    if step.plots:
        stage["plots"] = [{p: {"cache": False}} for p in step.plots.values()]
    return stage


HEADER = "# Rendered from components/registry.py by `python -m components render-dvc`; do not edit by hand.\n"


def render_dvc_yaml() -> str:
    doc = {"stages": {s.name: dvc_stage(s) for s in STEPS}}
    return HEADER + yaml.safe_dump(doc, sort_keys=False, width=120)
