"""The one registry of steps. ``dvc.yaml`` is rendered from it and ``pipeline.py`` builds its
Kubeflow components from it, so the two cannot drift (tests/test_registry.py proves it).

A step names its inputs and outputs as keyword arguments of its module's ``run`` function, each
bound to a path in the DVC workspace; under Kubeflow the same arguments are bound to artifact
paths instead. ``params`` lists the params.yaml keys whose change must re-run the step.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, replace
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
    seeds: str | None = None  # params key of a list of seeds: one stage per seed (x entry), "{seed}" in paths
    plot_y: str = "val_accuracy"
    plot_axes: dict[str, tuple[str, str]] = field(default_factory=dict)  # plots kwarg -> (x, y) when not (epoch, plot_y)
    gpu: bool = False  # a training step: a GPU task on Kubeflow

    @property
    def paths(self) -> dict[str, str]:
        return {**self.inputs, **self.outputs, **self.metrics, **self.plots}

    def bind(self, item: str | None, seed: int | None = None) -> dict[str, str]:
        """The step's paths with ``{item}`` (and ``{seed}``) filled in."""
        return {k: v.replace("{item}", item or "").replace("{seed}", "" if seed is None else str(seed))
                for k, v in self.paths.items()}


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
        plots={"history_path": "plots/experiments/{item}.csv", "diagnostics_path": "plots/diagnostics/{item}.csv"},
        plot_axes={"diagnostics_path": ("depth", "grad_norm")},
        params=("seed", "runtime", "defaults", "experiments.{item}"),
        code=("train", "models", "config", "dataset", "diagnostics"),
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
        inputs={"splits_dir": "data/splits", "models_dir": "models/experiments"},
        outputs={"artifacts_dir": "reports/mc_dropout"},
        metrics={"metrics_path": "metrics/mc_dropout.json"},
        params=("seed", "experiments", "mc_dropout"),
        code=("models", "train", "dataset"),
        gpu=True,
        description="MC dropout on each trained dropout model of mc_dropout.sources: batched stochastic passes, BN in inference mode.",
    ),
    Step(
        name="selu_simulation",
        module="selu_simulation",
        outputs={"figure_path": "reports/selu_simulation.png"},
        metrics={"metrics_path": "metrics/selu_simulation.json"},
        plots={"csv_path": "plots/selu_simulation.csv"},
        plot_axes={"csv_path": ("layer", "selu_std")},
        params=("selu_simulation",),
        code=("config",),
        description="The book's NumPy simulation: 1,000 random dense layers keep mean ~0 / std ~1 with SELU (vs ReLU, tanh).",
    ),
    Step(
        name="report",
        module="report",
        inputs={"experiments_dir": "metrics/experiments", "model_a_metrics": "metrics/transfer/model_a.json",
                "model_b_metrics": "metrics/transfer/model_b.json", "b_on_a_metrics": "metrics/transfer/b_on_a.json",
                "mc_json": "metrics/mc_dropout.json", "histories_dir": "plots/experiments", "card_json": "metrics/dataset_card.json",
                "selu_simulation_json": "metrics/selu_simulation.json"},
        outputs={"figures_dir": "reports/figures", "report_md": "reports/report.md"},
        metrics={"report_json": "metrics/report.json", "summary_json": "metrics/summary.json"},
        params=("seed", "experiments", "transfer.seeds"),
        code=("data/book_values.yaml",),
        description="Gather every experiment into one table (Markdown + JSON) with the book's values and learning curves.",
    ),
)


def _reused(name: str, new_name: str, description: str) -> Step:
    return replace(next(s for s in STEPS if s.name == name), name=new_name, description=description)


# CIFAR-10 (exercise 8) is a pipeline of its own: cifar10/dvc.yaml in a DVC project of its own
# (`dvc init --subdir`), so the chapter's `dvc repro` / `dvc status` never see it. Its paths are
# relative to cifar10/; it reads cifar10/params.yaml (schema: config.Cifar10Params).
CIFAR10_STEPS: tuple[Step, ...] = (
    Step(
        name="cifar10_download",
        module="cifar10",
        entry="run_download",
        outputs={"out_dir": "data/raw"},
        params=("data.mirrors", "data.archive"),
        code=("download", "config"),
        description="Fetch cifar-10-python.tar.gz (the authors' MD5 and the pinned SHA-256 checked); needs a network.",
    ),
    Step(
        name="cifar10_split",
        module="cifar10",
        entry="run_split",
        inputs={"raw_dir": "data/raw"},
        outputs={"out_dir": "data/splits", "card_md": "reports/dataset_card.md"},
        metrics={"card_json": "metrics/dataset_card.json"},
        params=("data.archive", "data.train_rows", "data.test_rows", "data.valid_size", "data.max_train_rows",
                "data.max_test_rows"),
        code=("split", "dataset", "config"),
        description="Read the pickle batches inside the tarball (never extracted), check them; write train/valid/test Parquet.",
    ),
    _reused("standardize", "cifar10_standardize", "Fit per-pixel mean/std on the CIFAR-10 training split only."),
    _reused("experiment", "cifar10_experiment", "Train one variant of exercise 8 (cifar10/params.yaml) and evaluate it."),
    _reused("mc_dropout", "cifar10_mc_dropout", "MC dropout on the alpha-dropout variant of exercise 8."),
    Step(
        name="cifar10_summary",
        module="cifar10",
        entry="run_summary",
        inputs={"experiments_dir": "metrics/experiments", "mc_json": "metrics/mc_dropout.json"},
        outputs={"summary_md": "reports/summary.md"},
        metrics={"summary_json": "metrics/summary.json"},
        params=("experiments", "mc_dropout.sources"),
        description="One table of the variants: validation and test accuracy, epochs, best epoch, seconds per epoch.",
    ),
)


# A claims run (`make claims`): every experiment again with each seed of ``claims.seeds``, MC dropout on each
# seed's dropout models, then the claims report, which pairs these with the main job's runs (its seed ``seed``).
# A pipeline of its own (claims/dvc.yaml) in the chapter's DVC project and workspace: it reads the main job's
# data and metrics, and a plain `dvc repro` of the chapter never runs it.
CLAIMS_SEEDS = "claims.seeds"
CLAIMS_EXPERIMENT_SUFFIX = "-claims"
_EXPERIMENT = next(s for s in STEPS if s.name == "experiment")
_MC_DROPOUT = next(s for s in STEPS if s.name == "mc_dropout")
CLAIMS_STEPS: tuple[Step, ...] = (
    replace(_EXPERIMENT, name="claims_experiment", seeds=CLAIMS_SEEDS,
            outputs={"model_path": "models/claims/seed_{seed}/{item}.keras",
                     "artifacts_dir": "reports/claims/seed_{seed}/{item}",
                     "history_path": "plots/claims/seed_{seed}/{item}.csv",
                     "diagnostics_path": "plots/claims/seed_{seed}/diagnostics/{item}.csv"},
            metrics={"metrics_path": "metrics/claims/seed_{seed}/{item}.json"}, plots={},
            params=("runtime", "defaults", "experiments.{item}"),
            description="Train one experiment of params.yaml again, with one seed of claims.seeds."),
    replace(_MC_DROPOUT, name="claims_mc_dropout", seeds=CLAIMS_SEEDS,
            inputs={"splits_dir": "data/splits", "models_dir": "models/claims/seed_{seed}"},
            outputs={"artifacts_dir": "reports/claims/mc_dropout/seed_{seed}"},
            metrics={"metrics_path": "metrics/claims/mc_dropout/seed_{seed}.json"},
            params=("experiments", "mc_dropout"),
            description="MC dropout on one seed's dropout models (mc_dropout.sources)."),
    Step(
        name="claims",
        module="claims",
        inputs={"experiments_dir": "metrics/experiments", "claims_dir": "metrics/claims",
                "mc_json": "metrics/mc_dropout.json", "model_b_metrics": "metrics/transfer/model_b.json",
                "b_on_a_metrics": "metrics/transfer/b_on_a.json"},
        outputs={"report_md": "reports/claims.md", "forest_png": "reports/claims_forest.png"},
        metrics={"claims_json": "metrics/claims.json"},
        params=("seed", "claims", "experiments", "transfer.seeds", "mc_dropout.sources"),
        code=("config", "claims_schema", "data/book_values.yaml"),
        description="Each claim of params.yaml over the seeds: paired difference, 95 % CI, verdict; forest plot.",
    ),
)


# The DVC-only first stage of a pipeline: it validates the whole params.yaml (all keys are its params) and writes a
# constant file that every stage without inputs depends on, so DVC runs it before any other stage and a rejected
# value (`dvc exp run -S ...` or an edit) stops the run before DVC deletes any output. Its output is `persist`ed
# (DVC never deletes it) and never changes, so it re-runs nothing downstream. Kubeflow needs no such stage:
# pipeline.py validates the params before it compiles anything.
PARAMS_CHECK = "metrics/params_check.json"


def params_guard(name: str) -> Step:
    return Step(
        name=name,
        module="params_guard",
        outputs={"out_path": PARAMS_CHECK},
        code=("config", "claims_schema"),
        description="Validate params.yaml (every key) before any other stage runs: a rejected value touches no output.",
    )


@dataclass(frozen=True)
class Pipeline:
    """A DVC pipeline rendered from this registry: its steps, its folder (dvc.yaml and params.yaml live
    there; a folder other than "." is a DVC project of its own), the schema of its params.yaml, its params
    guard (a DVC-only first stage, see ``params_guard``) and its summary: the one metrics file DVC shows
    (`dvc metrics show`, `dvc exp show`); the other metrics files are plain outputs (cache: false), for
    `dvc metrics show <file>`."""

    name: str
    steps: tuple[Step, ...]  # the steps that run on Kubeflow too (pipeline.py)
    directory: str = "."
    schema: str = "Params"  # a class of components.config
    guard: Step | None = None
    summary: str | None = None  # a metrics path of one of the steps (None: DVC shows none of this pipeline's)
    shared_workspace: bool = False  # its dvc.yaml is in ``directory``, its stages run in the repository root
    mlflow_suffix: str = ""  # its runs go to the MLflow experiment ``mlflow.experiment_name`` + this

    @property
    def dvc_steps(self) -> tuple[Step, ...]:
        """The stages of dvc.yaml: the params guard first, then the steps."""
        return ((self.guard,) if self.guard else ()) + self.steps

    @property
    def dvc_yaml(self) -> str:
        return os.path.normpath(os.path.join(self.directory, "dvc.yaml"))

    @property
    def params_file(self) -> str:
        """The params.yaml its stages read."""
        return "params.yaml" if self.shared_workspace else os.path.normpath(os.path.join(self.directory, "params.yaml"))

    @property
    def root(self) -> str:
        """The repository root seen from the pipeline's stages ("" for the main and claims pipelines)."""
        rel = "." if self.shared_workspace else os.path.relpath(".", self.directory)
        return "" if rel == "." else rel + "/"


PIPELINES: dict[str, Pipeline] = {
    "main": Pipeline("main", STEPS, guard=params_guard("check_params"), summary="metrics/summary.json"),
    "cifar10": Pipeline("cifar10", CIFAR10_STEPS, directory="cifar10", schema="Cifar10Params",
                        guard=params_guard("cifar10_check_params"), summary="metrics/summary.json"),
    # a claims run's runs (one per experiment and seed) apart from the chapter's (one per experiment)
    "claims": Pipeline("claims", CLAIMS_STEPS, directory="claims", shared_workspace=True,
                       mlflow_suffix=CLAIMS_EXPERIMENT_SUFFIX),
}


def pipeline_of(step_name: str) -> Pipeline:
    return next(p for p in PIPELINES.values() if any(s.name == step_name for s in p.dvc_steps))


def is_guard(step: Step) -> bool:
    return any(p.guard == step for p in PIPELINES.values())


def foreach_entries(params: Any, key: str) -> list[str]:
    """The entries a foreach step runs over (experiment names, MC-dropout sources)."""
    obj: Any = params
    for part in key.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return []
    return list(obj.keys()) if isinstance(obj, dict) else list(obj)


# Sections every task's params keep: required (data), global (seed), how-not-what (runtime, mlflow).
ALWAYS_KEPT = ("data", "seed", "runtime", "mlflow")


def task_params(raw: dict[str, Any], step: Step, item: str | None = None) -> dict[str, Any]:
    """The slice of params one task sees on Kubeflow: what its DVC stage declares (+ ``ALWAYS_KEPT``).

    Kubeflow caches a task on its inputs, so a task gets only the params it depends on: editing one
    experiment re-runs that experiment (and what reads it), as with DVC. ``raw`` must have its defaults
    merged (config.resolve_defaults); ``experiments`` is cut to the declared entries and a foreach over
    ``mc_dropout.sources`` to its own item.
    """
    keep: dict[str, Any] = {k: raw[k] for k in ALWAYS_KEPT if k in raw}
    for key in step.params:
        top, _, rest = key.replace("{item}", item or "").partition(".")
        if top == "experiments" and rest:
            name = rest.split(".", 1)[0]
            keep.setdefault("experiments", {})[name] = raw["experiments"][name]
        elif top in raw:
            keep[top] = raw[top]
    if step.foreach == "mc_dropout.sources" and "mc_dropout" in keep:
        keep["mc_dropout"] = {**keep["mc_dropout"], "sources": [item]}
    return copy.deepcopy(keep)


class MissingInput(FileNotFoundError):
    """An input of a step is not there; the message names it and the stage that makes it."""

    def __str__(self) -> str:
        return self.strerror or "missing input"


def producer(path: str, pipeline: Pipeline) -> Step | None:
    """The step of ``pipeline`` that writes workspace ``path``: the file itself, a folder it fills (one file per
    foreach entry) or the folder the file lives in."""
    path = path.rstrip("/")
    for s in pipeline.steps:
        for out in (*s.outputs.values(), *s.metrics.values(), *s.plots.values()):
            if out == path or out.startswith(path + "/") or path.startswith(out.rstrip("/") + "/"):
                return s
    return None


def missing_hint(step: Step, item: str | None, paths: dict[str, Any], *missing: Any) -> str | None:
    """What to tell a user when ``missing`` (paths the step needed) are not there: which, which stages make
    them and how to run those. None when one of them is not an input of the step."""
    workspace = step.bind(item)
    pipeline = pipeline_of(step.name)
    names, makers, elsewhere = [], [], []
    for target in missing:
        target = os.path.normpath(str(target))
        kwarg = next((k for k in step.inputs if target == (g := os.path.normpath(str(paths.get(k, workspace[k]))))
                      or target.startswith(g + os.sep)), None)
        if kwarg is None:
            return None
        names.append(f"{target} (input {kwarg})")
        maker = producer(workspace[kwarg], pipeline)
        if maker is not None and maker.name not in makers:
            makers.append(maker.name)
        if os.path.normpath(str(paths.get(kwarg, workspace[kwarg]))) != os.path.normpath(workspace[kwarg]):
            elsewhere.append(f"{workspace[kwarg]} in the DVC workspace")  # --bind, a Kubeflow artifact
    what = (f"{names[0]} is missing" if len(names) == 1 else f"{len(names)} inputs are missing: {', '.join(names)}")
    if not makers:
        return what
    if elsewhere:
        return f"{what}; stage {', '.join(makers)} writes {', '.join(elsewhere)}"
    if pipeline.shared_workspace:
        stages = " ".join(f"{pipeline.dvc_yaml}:{m}" for m in makers)
        return f"{what}: run `dvc repro {stages}` (or `make {pipeline.name}`)"
    where = "" if pipeline.directory == "." else f" in {pipeline.directory}/ (a DVC project of its own)"
    whole = " (or `make repro` for the whole chapter)" if pipeline.name == "main" else ""
    return f"{what}: run `dvc repro {' '.join(makers)}`{where}{whole}"


def check_inputs(step: Step, item: str | None, paths: dict[str, Any]) -> None:
    """Fail at once, before any heavy import, when an input of the step is not there."""
    missing = [paths[k] for k in step.inputs if k in paths and not os.path.exists(paths[k])]
    if missing:
        raise MissingInput(2, missing_hint(step, item, paths, *missing), str(missing[0]))


def with_seed(params: Any, seed: int) -> Any:
    """``params`` for one run of a seeds step: its ``seed`` is that seed (the rest as in params.yaml)."""
    return params.model_copy(update={"seed": int(seed)})


def for_pipeline(step: Step, params: Any) -> Any:
    """The params a step runs with: its pipeline's ``mlflow_suffix`` appended to the MLflow experiment's name."""
    suffix = pipeline_of(step.name).mlflow_suffix
    if not suffix or getattr(params, "mlflow", None) is None:
        return params
    name = params.mlflow.experiment_name + suffix
    return params.model_copy(update={"mlflow": params.mlflow.model_copy(update={"experiment_name": name})})


def call(step: Step, params: Any, item: str | None, paths: dict[str, Any]) -> Any:
    """Run ``step``: its module's entry function with the params, the foreach entry and its paths (the run()
    arguments named in the registry). The one call `python -m components` and a Kubeflow task both make.
    A missing input fails here, before the step's module (and TensorFlow) is imported."""
    import importlib

    check_inputs(step, item, paths)
    from . import tracking

    fn = getattr(importlib.import_module(f"components.{step.module}"), step.entry)
    params = for_pipeline(step, params)
    with tracking.watch():  # a tracking server lost mid-step: the step ends, writes its outputs, then fails
        return fn(params=params, **({"name": item} if step.foreach else {}), **paths)


def get(name: str) -> Step:
    steps = [s for p in PIPELINES.values() for s in p.dvc_steps]
    for s in steps:
        if s.name == name:
            return s
    raise KeyError(f"unknown step {name!r}; steps: {', '.join(s.name for s in steps)}")


def _dvc_path(p: str, foreach: str | None, seeds: str | None = None) -> str:
    if seeds and foreach:  # a matrix: ${item.name} x ${item.seed}
        return p.replace("{item}", "${item.name}").replace("{seed}", "${item.seed}")
    if seeds:
        return p.replace("{seed}", "${item}")
    if foreach is None:
        return p
    return p.replace("{item}", "${key}" if _foreach_is_mapping(foreach) else "${item}")


def _foreach_is_mapping(foreach: str) -> bool:
    return foreach == "experiments"


def dvc_stage(step: Step, root: str = "", pipeline: Pipeline | None = None) -> dict[str, Any]:
    """The stage of ``step``; ``root`` is the repository root seen from the dvc.yaml's folder ("" or "../");
    ``pipeline`` gives the params guard (a dep of every stage without inputs) and the summary metrics file."""
    code = [f"{root}components/{c}" if "." in c else f"{root}components/{c}.py" for c in (step.module, *step.code)]
    deps = code + list(step.inputs.values())
    guard = pipeline.guard if pipeline else None
    if guard and step != guard and not step.inputs:  # every other stage is downstream of one of these
        deps += list(guard.outputs.values())
    fe, sd = step.foreach, step.seeds
    stage: dict[str, Any] = {"desc": step.description}
    if pipeline is not None and pipeline.shared_workspace:
        stage["wdir"] = os.path.relpath(".", pipeline.directory)
    cmd = (f"PYTHONPATH={root.rstrip('/')} " if root else "") + f"python -m components {step.name}"
    if fe:
        cmd += " ${item.name}" if sd else " ${key}" if _foreach_is_mapping(fe) else " ${item}"
    if sd:
        cmd += " --seed ${item.seed}" if fe else " --seed ${item}"
    stage["cmd"] = cmd
    stage["deps"] = [_dvc_path(d, fe, sd) for d in deps]
    if guard and step == guard:  # all of params.yaml, then an output DVC never deletes (and git keeps)
        stage["params"] = [{"params.yaml": None}]
        stage["outs"] = [{p: {"cache": False, "persist": True}} for p in step.outputs.values()]
        return stage
    if step.params:
        stage["params"] = [_dvc_path(p, fe, sd) for p in step.params]
    stage["outs"] = [_dvc_path(p, fe, sd) for p in step.outputs.values()]
    summary = pipeline.summary if pipeline else None
    shown = [p for p in step.metrics.values() if p == summary]
    stage["outs"] += [{_dvc_path(p, fe, sd): {"cache": False}} for p in step.metrics.values() if p not in shown]
    if shown:
        stage["metrics"] = [{_dvc_path(p, fe, sd): {"cache": False}} for p in shown]
    if step.plots:
        axes = {k: step.plot_axes.get(k, ("epoch", step.plot_y)) for k in step.plots}
        stage["plots"] = [{_dvc_path(p, fe, sd): {"cache": False, "x": axes[k][0], "y": axes[k][1]}} for k, p in step.plots.items()]
    if fe and sd:
        return {"matrix": {"name": "${" + fe + "}", "seed": "${" + sd + "}"}, **stage}
    if fe or sd:
        return {"foreach": "${" + (fe or sd) + "}", "do": stage}
    return stage


HEADER = "# Rendered from components/registry.py by `make dvc-yaml`; do not edit by hand (a test checks it).\n"


def render_dvc_yaml(pipeline: str = "main") -> str:
    p = PIPELINES[pipeline]
    doc: dict[str, Any] = {}
    if p.shared_workspace:  # ${...} in its stages come from the chapter's params.yaml
        doc["vars"] = [os.path.relpath("params.yaml", p.directory)]
    doc["stages"] = {s.name: dvc_stage(s, p.root, p) for s in p.dvc_steps}
    return HEADER + yaml.safe_dump(doc, sort_keys=False, width=120)
