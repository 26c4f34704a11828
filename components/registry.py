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
    description: str = ""
    entry: str = "run"  # the function of ``module`` that does the work
    foreach: str | None = None  # params key (a mapping or a list): one stage per entry, "{item}" in paths
    plot_y: str = "val_accuracy"
    gpu: bool = False  # a training step: a GPU task on Kubeflow

    @property
    def paths(self) -> dict[str, str]:
        return {**self.inputs, **self.outputs, **self.metrics, **self.plots}

    def bind(self, item: str | None) -> dict[str, str]:
        """The step's paths with ``{item}`` filled in."""
        return {k: v.replace("{item}", item or "") for k, v in self.paths.items()}


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
        code=("dataset",),
        description="Fit per-pixel mean/std on the training split only.",
    ),
    Step(
        name="experiment",
        module="experiment",
        foreach="experiments",
        inputs={"splits_dir": "data/splits", "scaler_path": "data/scaler.npz"},
        outputs={"model_path": "models/experiments/{item}.keras", "artifacts_dir": "reports/experiments/{item}"},
        metrics={"metrics_path": "metrics/experiments/{item}.json"},
        plots={"history_path": "plots/experiments/{item}.csv"},
        params=("seed", "runtime", "defaults", "experiments.{item}"),
        code=("train", "models", "config", "dataset"),
        gpu=True,
        description="Train one experiment of params.yaml (model/optimizer/schedule spec) and evaluate it.",
    ),
    Step(
        name="model_a",
        module="transfer",
        entry="run_model_a",
        inputs={"splits_dir": "data/splits"},
        outputs={"model_path": "models/transfer/model_a.keras"},
        metrics={"metrics_path": "metrics/transfer/model_a.json"},
        plots={"history_path": "plots/transfer/model_a.csv"},
        params=("seed", "runtime", "defaults", "transfer.model_a"),
        code=("experiment", "train", "models", "config", "dataset"),
        gpu=True,
        description="Pretrain model A on task A (8 classes).",
    ),
    Step(
        name="model_b",
        module="transfer",
        entry="run_model_b",
        inputs={"splits_dir": "data/splits"},
        outputs={"models_dir": "models/transfer/model_b"},
        metrics={"metrics_path": "metrics/transfer/model_b.json"},
        plots={"history_path": "plots/transfer/model_b.csv"},
        params=("runtime", "defaults", "transfer.seeds", "transfer.model_b"),
        code=("experiment", "train", "models", "config", "dataset"),
        gpu=True,
        description="Model B from scratch on the 200 task-B images, once per seed.",
    ),
    Step(
        name="b_on_a",
        module="transfer",
        entry="run_b_on_a",
        inputs={"splits_dir": "data/splits", "model_a_path": "models/transfer/model_a.keras",
                "model_b_metrics": "metrics/transfer/model_b.json"},
        outputs={"models_dir": "models/transfer/b_on_a"},
        metrics={"metrics_path": "metrics/transfer/b_on_a.json"},
        plots={"history_path": "plots/transfer/b_on_a.csv"},
        params=("runtime", "defaults", "transfer.seeds", "transfer.model_b", "transfer.b_on_a"),
        code=("train", "models", "config", "dataset"),
        gpu=True,
        description="Clone A, new sigmoid head: frozen 4 epochs, unfrozen + re-compiled 16 epochs; per seed.",
    ),
    Step(
        name="mc_dropout",
        module="mc_dropout",
        foreach="mc_dropout.sources",
        inputs={"splits_dir": "data/splits", "model_path": "models/experiments/{item}.keras"},
        outputs={"artifacts_dir": "reports/mc_dropout/{item}"},
        metrics={"metrics_path": "metrics/mc_dropout/{item}.json"},
        params=("seed", "mc_dropout.samples", "mc_dropout.batch_rows", "mc_dropout.ece_bins", "mc_dropout.reject_fractions"),
        code=("models", "train", "dataset"),
        gpu=True,
        description="MC dropout on a trained dropout model: batched stochastic passes, BN in inference mode.",
    ),
    Step(
        name="report",
        module="report",
        inputs={"experiments_dir": "metrics/experiments", "transfer_dir": "metrics/transfer",
                "mc_dir": "metrics/mc_dropout", "histories_dir": "plots/experiments", "card_json": "metrics/dataset_card.json"},
        outputs={"figures_dir": "reports/figures", "report_md": "reports/report.md"},
        metrics={"report_json": "metrics/report.json"},
        params=("experiments", "transfer.seeds"),
        code=("data/book_values.yaml",),
        description="Gather every experiment into one table (Markdown + JSON) with the book's values and learning curves.",
    ),
)


def foreach_entries(params: Any, key: str) -> list[str]:
    """The entries a foreach step runs over (experiment names, MC-dropout sources)."""
    obj: Any = params
    for part in key.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return []
    return list(obj.keys()) if isinstance(obj, dict) else list(obj)


def get(name: str) -> Step:
    for s in STEPS:
        if s.name == name:
            return s
    raise KeyError(f"unknown step {name!r}; steps: {', '.join(s.name for s in STEPS)}")


def _dvc_path(p: str, foreach: str | None) -> str:
    if foreach is None:
        return p
    return p.replace("{item}", "${key}" if _foreach_is_mapping(foreach) else "${item}")


def _foreach_is_mapping(foreach: str) -> bool:
    return foreach == "experiments"


def dvc_stage(step: Step) -> dict[str, Any]:
    code = [f"components/{c}" if "." in c else f"components/{c}.py" for c in (step.module, *step.code)]
    deps = code + list(step.inputs.values())
    fe = step.foreach
    stage: dict[str, Any] = {"desc": step.description}
    cmd = f"python -m components {step.name}"
    if fe:
        cmd += " ${key}" if _foreach_is_mapping(fe) else " ${item}"
    stage["cmd"] = cmd
    stage["deps"] = [_dvc_path(d, fe) for d in deps]
    if step.params:
        stage["params"] = [_dvc_path(p, fe) for p in step.params]
    stage["outs"] = [_dvc_path(p, fe) for p in step.outputs.values()]
    if step.metrics:
        stage["metrics"] = [{_dvc_path(p, fe): {"cache": False}} for p in step.metrics.values()]
    if step.plots:
        stage["plots"] = [{_dvc_path(p, fe): {"cache": False, "x": "epoch", "y": step.plot_y}} for p in step.plots.values()]
    if fe:
        return {"foreach": "${" + fe + "}", "do": stage}
    return stage


HEADER = "# Rendered from components/registry.py by `make dvc-yaml`; do not edit by hand (a test checks it).\n"


def render_dvc_yaml() -> str:
    doc = {"stages": {s.name: dvc_stage(s) for s in STEPS}}
    return HEADER + yaml.safe_dump(doc, sort_keys=False, width=120)
