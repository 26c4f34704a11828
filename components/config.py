"""The one params schema: params.yaml is validated here before any step does work.

Both the DVC stages and the Kubeflow components load their parameters through ``load_params``;
an unknown key, a wrong type or an impossible value is a ``ParamsError`` that names the key and
what is allowed, raised before any data is read or any model is built.
"""
from __future__ import annotations

import copy
import os
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .claims_schema import Claims, problems as claims_problems

DEFAULT_PARAMS = "params.yaml"

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


class ParamsError(ValueError):
    """params.yaml (or an override) does not fit the schema; the message names each bad key."""


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping holds the same key twice (plain YAML loaders silently keep the last value)."""


class ParamsLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys and reads YAML 1.2 floats (``1e-3``, ``1.0e5``) as floats,
    not strings (the schema takes no string for a number)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:  # the keys as written: '<<' merges may repeat a key (the later one wins)
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader names it below
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise DuplicateKeyError(
                        f"duplicate key {key!r} on line {line} (first on line {first}) in the mapping that starts on "
                        f"line {node.start_mark.line + 1}: YAML would silently keep the last value; keep one")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str, source: str = DEFAULT_PARAMS) -> Any:
    """Parse params YAML with ``ParamsLoader``; a duplicate key or a syntax error is a ``ParamsError``."""
    try:
        return yaml.load(text, Loader=ParamsLoader)  # noqa: S506 - a SafeLoader subclass
    except DuplicateKeyError as err:
        raise ParamsError(f"{source}: {err}") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{source} is not valid YAML: {err}") from None


class Strict(BaseModel):
    """Every section: unknown keys are errors; ``true`` is not an int nor ``1`` a bool (strict), yet an int is a
    float (``learning_rate: 1``); ``.inf`` / ``.nan`` are not numbers here."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class FileSpec(Strict):
    name: str = Field(min_length=1, description="file name on every mirror")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="pinned SHA-256 of the file")


class FashionMnistFiles(Strict):
    train_images: FileSpec
    train_labels: FileSpec
    test_images: FileSpec
    test_labels: FileSpec


class TaskB(Strict):
    """Task B of the transfer-learning experiment: a binary task on two classes."""

    positive_class: int = Field(6, ge=0, le=9, description="label 1.0 (book: Shirt = 6)")
    negative_class: int = Field(5, ge=0, le=9, description="label 0.0 (book: Sandal = 5)")
    train_size: int = Field(200, gt=0, description="the first N task-B images of the train split")

    @model_validator(mode="after")
    def _distinct(self) -> "TaskB":
        if self.positive_class == self.negative_class:
            raise ValueError("positive_class and negative_class must differ")
        return self


def check_mirrors(v: list[str]) -> list[str]:
    for m in v:
        if "://" in m and not m.startswith(("http://", "https://", "file://")):
            raise ValueError(f"mirror {m!r}: only local directories, file://, http:// and https:// are supported")
    return v


class Data(Strict):
    dataset: Literal["fashion_mnist"] = "fashion_mnist"
    mirrors: list[str] = Field(min_length=1, description="tried in order; a local directory or an http(s) URL")
    files: FashionMnistFiles
    download_timeout_s: float = Field(60.0, gt=0)
    valid_size: int = Field(5000, gt=0, description="the FIRST N training images are the validation split")
    max_train_rows: int | None = Field(None, gt=0, description="use only the first N rows of the training file (tiny runs)")
    max_test_rows: int | None = Field(None, gt=0, description="use only the first N rows of the test file (tiny runs)")
    task_b: TaskB = TaskB()

    _mirrors = field_validator("mirrors")(lambda cls, v: check_mirrors(v))

    @model_validator(mode="after")
    def _sizes(self) -> "Data":
        if self.max_train_rows is not None and self.valid_size >= self.max_train_rows:
            raise ValueError(f"valid_size ({self.valid_size}) must be smaller than max_train_rows ({self.max_train_rows})")
        return self


# ---------------------------------------------------------------- experiments (model / optimizer / schedule)

ActivationName = Literal["relu", "leaky_relu", "prelu", "elu", "selu", "gelu", "swish", "mish", "sigmoid", "tanh"]
InitializerName = Literal[
    "glorot_uniform", "glorot_normal", "he_normal", "he_uniform", "lecun_normal", "lecun_uniform", "variance_scaling"
]


def _named(v: Any) -> Any:
    """Accept the shorthand ``relu`` for ``{name: relu}``."""
    return {"name": v} if isinstance(v, str) else v


class Activation(Strict):
    name: ActivationName
    negative_slope: float | None = Field(None, ge=0, description="leaky_relu only (Keras default 0.3)")
    alpha: float | None = Field(None, gt=0, description="elu only (default 1.0)")

    @model_validator(mode="after")
    def _fits(self) -> "Activation":
        if self.negative_slope is not None and self.name != "leaky_relu":
            raise ValueError("negative_slope applies to leaky_relu only")
        if self.alpha is not None and self.name != "elu":
            raise ValueError("alpha applies to elu only")
        return self


class Initializer(Strict):
    name: InitializerName
    scale: float = Field(1.0, gt=0, description="variance_scaling only")
    mode: Literal["fan_in", "fan_out", "fan_avg"] = "fan_in"
    distribution: Literal["truncated_normal", "untruncated_normal", "uniform"] = "truncated_normal"


class Block(Strict):
    units: int = Field(gt=0)
    repeat: int = Field(1, gt=0)


class DropoutSpec(Strict):
    kind: Literal["dropout", "alpha_dropout"] = "dropout"
    rate: float = Field(gt=0, lt=1)
    where: Literal["every", "output"] = Field(
        "every", description="every = before each Dense (the book's dropout models); output = before the output only"
    )


class Regularizer(Strict):
    l1: float = Field(0.0, ge=0)
    l2: float = Field(0.0, ge=0)
    output: bool = Field(True, description="also regularize the output layer (the book does)")


class ModelSpec(Strict):
    hidden: list[Block] = Field(min_length=1)
    activation: Activation
    initializer: Initializer = Initializer(name="glorot_uniform")
    output_initializer: Initializer = Initializer(name="glorot_uniform")
    batch_norm: Literal["none", "before", "after"] = Field(
        "none", description="BN before the activation (Dense without bias) or after it"
    )
    input_batch_norm: bool = False
    dropout: DropoutSpec | None = None
    regularizer: Regularizer | None = None
    max_norm: float | None = Field(None, gt=0, description="max-norm constraint on hidden kernels")

    _activation = field_validator("activation", mode="before")(lambda cls, v: _named(v))
    _init = field_validator("initializer", "output_initializer", mode="before")(lambda cls, v: _named(v))

    @property
    def depth(self) -> int:
        return sum(b.repeat for b in self.hidden)


OPTIMIZER_FIELDS = {
    "sgd": {"momentum", "nesterov"},
    "adagrad": {"epsilon"},
    "rmsprop": {"rho", "momentum", "epsilon"},
    "adam": {"beta_1", "beta_2", "epsilon"},
    "adamax": {"beta_1", "beta_2", "epsilon"},
    "nadam": {"beta_1", "beta_2", "epsilon"},
    "adamw": {"beta_1", "beta_2", "epsilon", "weight_decay"},
}


class OptimizerSpec(Strict):
    name: Literal["sgd", "adagrad", "rmsprop", "adam", "adamax", "nadam", "adamw"]
    learning_rate: float = Field(gt=0)
    momentum: float | None = Field(None, ge=0, lt=1)
    nesterov: bool | None = None
    rho: float | None = Field(None, gt=0, lt=1)
    beta_1: float | None = Field(None, gt=0, lt=1)
    beta_2: float | None = Field(None, gt=0, lt=1)
    epsilon: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    clipvalue: float | None = Field(None, gt=0)
    clipnorm: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _fields_fit_the_optimizer(self) -> "OptimizerSpec":
        allowed = OPTIMIZER_FIELDS[self.name]
        for f in ("momentum", "nesterov", "rho", "beta_1", "beta_2", "epsilon", "weight_decay"):
            if getattr(self, f) is not None and f not in allowed:
                raise ValueError(f"'{f}' does not apply to {self.name}; it takes: {', '.join(sorted(allowed)) or 'none'}")
        return self


class PowerSchedule(Strict):
    kind: Literal["power"]
    decay_steps: int = Field(gt=0)
    decay_rate: float = Field(1.0, gt=0)


class ExponentialSchedule(Strict):
    kind: Literal["exponential"]
    decay_rate: float = Field(0.1, gt=0, lt=1)
    decay_epochs: float = Field(20, gt=0, description="lr = lr0 * decay_rate ** (epoch / decay_epochs), per step")


class PiecewiseSchedule(Strict):
    kind: Literal["piecewise"]
    boundaries_epochs: list[int] = Field(min_length=1)
    values: list[float] = Field(min_length=2)

    @model_validator(mode="after")
    def _lengths(self) -> "PiecewiseSchedule":
        if len(self.values) != len(self.boundaries_epochs) + 1:
            raise ValueError("values must have exactly one more entry than boundaries_epochs")
        if any(b <= a for a, b in zip(self.boundaries_epochs, self.boundaries_epochs[1:])):
            raise ValueError("boundaries_epochs must increase")
        return self


class PerformanceSchedule(Strict):
    kind: Literal["performance"]
    factor: float = Field(0.5, gt=0, lt=1)
    patience: int = Field(5, gt=0)
    monitor: str = "val_loss"


class RangeTest(Strict):
    epochs: int = Field(1, gt=0)
    batch_size: int = Field(128, gt=0)
    min_lr: float = Field(1e-5, gt=0)
    max_lr: float = Field(10.0, gt=0)
    divide_min_by: float = Field(10.0, ge=1, description="max_lr = lr at the lowest (smoothed) loss / this")


class OneCycleSchedule(Strict):
    kind: Literal["one_cycle"]
    max_lr: float | None = Field(None, gt=0, description="null = pick it with the LR-range test")
    start_div: float = Field(10.0, gt=1, description="start lr = max_lr / start_div")
    end_div: float = Field(1000.0, gt=1, description="last lr = start lr / end_div")
    annihilation: float = Field(0.1, gt=0, lt=1, description="fraction of the steps spent annihilating")
    range_test: RangeTest = RangeTest()


Schedule = Annotated[
    Union[PowerSchedule, ExponentialSchedule, PiecewiseSchedule, PerformanceSchedule, OneCycleSchedule],
    Field(discriminator="kind"),
]


class EarlyStopping(Strict):
    monitor: str = "val_loss"
    patience: int = Field(gt=0)
    restore_best_weights: bool = True


class DiagnosticThresholds(Strict):
    """The verdict rule of components/diagnostics.py (tuned on the real 100-layer SELU / ReLU nets)."""

    vanishing_ratio: float = Field(0.01, gt=0, description="vanishing if first/last hidden RMS gradient < this")
    exploding_ratio: float = Field(100.0, gt=0, description="exploding if first/last hidden RMS gradient > this")
    min_act_std: float = Field(0.1, ge=0, description="vanishing (activations collapse) if a hidden activation std < this")
    min_grad_norm: float = Field(1e-8, ge=0, description="vanishing if a hidden kernel's gradient norm < this")

    @model_validator(mode="after")
    def _order(self) -> "DiagnosticThresholds":
        if self.vanishing_ratio >= self.exploding_ratio:
            raise ValueError("vanishing_ratio must be smaller than exploding_ratio")
        return self


class Diagnostics(Strict):
    """Gradient norm per Dense kernel and activation mean/std per hidden layer, on a fixed probe batch."""

    enabled: bool = False
    probe_rows: int = Field(256, gt=0, description="evenly spaced rows of the train split (fixed, no RNG)")
    every_n_epochs: int = Field(1, gt=0, description="probe after every n-th epoch (and before the first, and after the last)")
    thresholds: DiagnosticThresholds = DiagnosticThresholds()


class TrainSpec(Strict):
    epochs: int = Field(gt=0)
    batch_size: int = Field(32, gt=0)
    inputs: Literal["scaled", "standardized"] = Field("scaled", description="scaled = /255; standardized = per-pixel z-score")
    early_stopping: EarlyStopping | None = None
    diagnostics: Diagnostics = Field(default_factory=Diagnostics,
                                     description="per-layer gradient / activation health (components/diagnostics.py)")


class Experiment(Strict):
    description: str = ""
    family: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$",
                               description="the group it belongs to (MLflow tag `family`, the report's groups); "
                                           "unset: from the name's prefix")
    task: Literal["full", "a", "b"] = "full"
    model: ModelSpec
    optimizer: OptimizerSpec
    schedule: Schedule | None = None
    train: TrainSpec


PREFIX_FAMILIES = {
    "leaky": "activations", "prelu": "activations", "elu": "activations", "act": "activations",
    "selu": "selu", "relu": "selu", "bn": "batch_norm", "clip": "clipping", "init": "initializers",
    "opt": "optimizers", "lr": "lr_schedules", "l1": "regularization", "l2": "regularization",
    "dropout": "regularization", "alpha": "regularization", "max": "regularization", "model": "transfer",
    "b": "transfer",
}


def family_of(name: str, exp: "Experiment | None" = None) -> str:
    """An experiment's family: its ``family:`` in params.yaml, else guessed from its name's prefix ("other")."""
    if exp is not None and exp.family:
        return exp.family
    return PREFIX_FAMILIES.get(name.split("_")[0], "other")


class BOnA(Strict):
    """Fine-tune a clone of model A on task B: frozen reused layers, then unfrozen and re-compiled."""

    frozen_epochs: int = Field(4, gt=0)
    frozen_learning_rate: float = Field(0.01, gt=0, description="seed 001: optimizer='SGD', Keras' default 0.01")
    unfrozen_epochs: int = Field(16, gt=0)
    unfrozen_learning_rate: float = Field(1e-4, gt=0)


class Transfer(Strict):
    seeds: list[int] = Field(min_length=1, description="the B side (model_b, b_on_a) is run once per seed")
    model_a: Experiment
    model_b: Experiment
    b_on_a: BOnA = BOnA()

    @model_validator(mode="after")
    def _tasks(self) -> "Transfer":
        if self.model_a.task != "a" or self.model_b.task != "b":
            raise ValueError("model_a must have task: a and model_b task: b")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds must be distinct")
        return self


class SeluSimulation(Strict):
    """The book's NumPy demo: a deep stack of random dense layers (no training) keeps mean ~0 / std ~1 with SELU."""

    layers: int = Field(1000, gt=0)
    units: int = Field(100, gt=0)
    rows: int = Field(500, gt=1, description="standardized random inputs, N(0, 1)")
    seed: int = Field(42, ge=0, description="np.random.seed, as in the book")
    print_every: int = Field(100, gt=0, description="the layers reported (0, 100, 200, ...)")
    activations: list[Literal["selu", "relu", "tanh", "sigmoid", "elu"]] = Field(
        ["selu", "relu", "tanh"], min_length=1,
        description="each with its init: relu/elu He N(0, 2/n), the others LeCun N(0, 1/n) (the book's SELU setup)")


class MCDropout(Strict):
    sources: list[str] = Field(min_length=1, description="experiments with dropout whose models are sampled")
    samples: int = Field(100, gt=0)
    batch_rows: int = Field(500, gt=0, description="test rows per batched pass (rows x samples per forward call)")
    ece_bins: int = Field(15, gt=1)
    reject_fractions: list[float] = Field([0.05, 0.1, 0.2, 0.3])

    @field_validator("reject_fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < f < 1 for f in v):
            raise ValueError("each reject fraction must be in (0, 1)")
        return v


class Tuning(Strict):
    """How fast, not what: none of these change the hyper-parameters (batch size, epochs) or reach a saved model.
    What is not here is Keras' and TensorFlow's default (XLA: Keras' "auto", on for GPUs; tf.data's autotuning)."""

    steps_per_execution: int = Field(1000, gt=0, description="train steps fused into one graph call")
    intra_op_threads: int = Field(0, ge=0, description="0 = TensorFlow's default")
    inter_op_threads: int = Field(0, ge=0, description="0 = TensorFlow's default")
    mixed_precision: bool = Field(False, description="mixed_float16 on a GPU (ignored on a CPU)")


PROFILE_ENV = "CH11_RUNTIME_PROFILE"


def where_running() -> Literal["local", "cluster"]:
    """The runtime profile for this process: ``cluster`` inside a Kubernetes pod (Kubeflow), else ``local``;
    ``$CH11_RUNTIME_PROFILE`` overrides it."""
    chosen = os.environ.get(PROFILE_ENV) or ("cluster" if os.environ.get("KUBERNETES_SERVICE_HOST") else "local")
    if chosen not in ("local", "cluster"):
        raise ParamsError(f"${PROFILE_ENV}={chosen!r}: expected 'local' or 'cluster'")
    return chosen  # type: ignore[return-value]


class Runtime(Strict):
    """How the steps run, never what they compute. ``local`` tunes a small CPU box (the one `make repro` runs on);
    ``cluster`` is TensorFlow's defaults, for Kubeflow's CPU and GPU pods. The profile is picked by where the step
    runs (``where_running``), not in params."""

    local: Tuning = Tuning(intra_op_threads=1, inter_op_threads=2)
    cluster: Tuning = Tuning()
    deterministic: bool = True
    eval_batch_size: int = Field(1000, gt=0)
    checkpoint_dir: str = Field(".checkpoints", description="resume state of interrupted training (not a DVC output)")

    @property
    def tuning(self) -> Tuning:
        return getattr(self, where_running())


class Registry(Strict):
    models: list[Literal["model_a", "b_on_a", "best_variant"]] = ["model_a", "b_on_a", "best_variant"]
    alias: str = Field("champion", pattern=r"^[a-zA-Z_][a-zA-Z0-9_-]*$")
    metric: Literal["valid_accuracy", "test_accuracy"] = Field(
        "valid_accuracy", description="the alias moves to a new version only if it beats the current one on this"
    )
    name_prefix: str = "ch11"


class MLflow(Strict):
    enabled: bool = True
    experiment_name: str = Field("ch11-training-deep-nets", min_length=1)
    log_models: bool = True
    registry: Registry = Registry()


class Toleration(Strict):
    key: str = "nvidia.com/gpu"
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = "NoSchedule"


_CPU = r"^[0-9]+(\.[0-9]+)?m?$"
_MEMORY = r"^[0-9]+(\.[0-9]+)?(K|M|G|T|Ki|Mi|Gi|Ti)?$"


class Resources(Strict):
    """Requests and limits of one kind of task (a profile namespace with a ResourceQuota rejects pods without
    both), and how long one try of such a task may run before Kubernetes stops it."""

    cpu: str = Field("1", pattern=_CPU, description="CPU request, e.g. '2' or '500m'")
    memory: str = Field("4G", pattern=_MEMORY, description="memory request")
    cpu_limit: str = Field("2", pattern=_CPU, description="CPU limit; the task's TensorFlow threads follow it")
    memory_limit: str = Field("4G", pattern=_MEMORY, description="memory limit (the pod is OOM-killed above it)")
    timeout_seconds: int = Field(3600, gt=0, description="one try of the task, at most (kubernetes.set_timeout)")


# Where each managed Kubernetes puts its GPU nodes: the node selector and toleration of `kubeflow.gpu.preset`.
# {type} is `kubeflow.gpu.type` (GKE: an accelerator such as nvidia-l4; EKS: an instance type such as g5.xlarge).
GPU_PRESETS: dict[str, dict[str, Any]] = {
    "nvidia-operator": {"node_selector": {"nvidia.com/gpu.present": "true"}},  # GPU feature discovery's label
    "gke": {"node_selector": {"cloud.google.com/gke-accelerator": "{type}"}},
    "eks": {"node_selector": {"node.kubernetes.io/instance-type": "{type}"}},
    "none": {"node_selector": {}},
}


class Gpu(Strict):
    """What a training task (experiment, model_a, model_b, b_on_a, mc_dropout) asks of the cluster."""

    required: bool = Field(True, description="a GPU task that sees no GPU fails at once (the request was dropped); false = run on CPU")
    accelerator: str = Field("nvidia.com/gpu", min_length=1, description="the extended resource requested")
    count: int = Field(1, ge=1)
    preset: Literal["nvidia-operator", "gke", "eks", "none"] = Field(
        "nvidia-operator", description="how GPU nodes are found: NVIDIA GPU operator's label, GKE's, EKS's, or none")
    type: str | None = Field(None, pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*$",
                             description="GKE: accelerator (nvidia-l4, nvidia-tesla-t4); EKS: instance type (g5.xlarge)")
    node_selector: dict[str, str] = Field(default_factory=dict, description="added to the preset's")
    tolerations: list[Toleration] = Field(default_factory=lambda: [Toleration()])
    resources: Resources = Resources(cpu="4", memory="16G", cpu_limit="4", memory_limit="16G", timeout_seconds=6 * 3600)

    @model_validator(mode="after")
    def _preset_type(self) -> "Gpu":
        if self.preset in ("gke", "eks") and not self.type:
            raise ValueError(f"gpu.preset {self.preset!r} needs gpu.type: "
                             + ("a GKE accelerator, e.g. nvidia-l4" if self.preset == "gke" else "an EC2 instance type, e.g. g5.xlarge"))
        return self

    def selector(self) -> dict[str, str]:
        preset = {k: v.format(type=self.type) for k, v in GPU_PRESETS[self.preset]["node_selector"].items()}
        return {**preset, **self.node_selector}


class Retry(Strict):
    num_retries: int = Field(2, ge=0)
    backoff_seconds: int = Field(60, ge=0)
    backoff_factor: float = Field(2.0, ge=1)
    backoff_max_seconds: int = Field(3600, gt=0)


class MlflowSecret(Strict):
    """The Kubernetes secret the tasks read MLflow's address and credentials from (never in params or YAML)."""

    name: str = Field("mlflow-tracking", pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    keys: dict[str, str] = Field(
        default_factory=lambda: {"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"},
        description="secret key -> environment variable, each required (the pod does not start without it)",
    )
    optional_keys: dict[str, str] = Field(
        default_factory=lambda: {k: k for k in (
            "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",  # a server with auth
            "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},  # its artifact store (S3, MinIO)
        description="secret key -> environment variable, set only where the secret has the key",
    )
    optional: bool = Field(False, description="true: tasks start even when the secret is missing (local sqlite in the pod)")


class CheckpointVolume(Strict):
    """Where Kubeflow's training tasks keep their resume state, so that a retried task goes on from its last epoch."""

    pvc: str | None = Field(
        None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="an existing PersistentVolumeClaim the training tasks mount (ReadWriteMany when tasks run on "
                    "several nodes); null = resume state in the pod, lost when a retry starts a new pod")
    mount_path: str = Field("/checkpoints", pattern=r"^/[^\s]*$", description="where the claim is mounted in the pod")


class DataVolume(Strict):
    """For clusters without internet egress: a claim that holds the four Fashion-MNIST files (the same names and
    SHA-256 as `data.files`), mounted read-only on the download task and tried before the public mirrors."""

    pvc: str | None = Field(None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", description="null = public mirrors only")
    sub_path: str = Field("", pattern=r"^[^/\s][^\s]*$|^$", description="folder of the files inside the claim")
    mount_path: str = Field("/mnt/ch11-data", pattern=r"^/[^\s]*$")


class Kubeflow(Strict):
    """How pipeline.py compiles the steps for a Kubeflow cluster; never what is trained (DVC ignores it)."""

    pipeline_name: str = Field("ch11-training-deep-nets", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    image: str = Field("ghcr.io/your-org/ch11-pipeline:0.1.0", min_length=1, description="CPU image (Dockerfile, target cpu)")
    gpu_image: str = Field("ghcr.io/your-org/ch11-pipeline:0.1.0-gpu", min_length=1, description="GPU image (target gpu)")
    image_pull_secrets: list[str] = Field(default_factory=list, description="docker-registry secrets of a private registry")
    parallelism: int = Field(8, ge=1, description="foreach tasks (experiments, MC dropout) running at once")
    caching: bool = True
    cpu_resources: Resources = Resources()
    gpu: Gpu = Gpu()
    retry: Retry = Retry()
    mlflow_secret: MlflowSecret = MlflowSecret()
    checkpoints: CheckpointVolume = CheckpointVolume()
    data_volume: DataVolume = DataVolume()


CROSS_CHECK_SEP = "\n  - "  # between the problems of one check across sections (one line each in the error)


class Params(Strict):
    seed: int = Field(42, ge=0, description="global seed: Python, NumPy and TensorFlow")
    data: Data
    runtime: Runtime = Runtime()
    defaults: dict[str, Any] = Field(default_factory=dict, description="merged under every experiment and transfer model")
    experiments: dict[str, Experiment] = Field(default_factory=dict)
    transfer: Transfer | None = None
    mc_dropout: MCDropout | None = None
    selu_simulation: SeluSimulation = SeluSimulation()
    mlflow: MLflow = MLflow()
    kubeflow: Kubeflow = Kubeflow()
    claims: Claims = Field(default_factory=Claims, description="the chapter's claims and the seeds that test them")

    @model_validator(mode="after")
    def _references(self) -> "Params":
        if self.mc_dropout:
            for src in self.mc_dropout.sources:
                exp = self.experiments.get(src)
                if exp is None:
                    raise ValueError(f"mc_dropout.sources: {src!r} is not an experiment; experiments: {', '.join(self.experiments)}")
                if exp.model.dropout is None:
                    raise ValueError(f"mc_dropout.sources: experiment {src!r} has no dropout to sample")
        for name in self.experiments:
            if not name.replace("_", "").isalnum():
                raise ValueError(f"experiment name {name!r}: use letters, digits and '_' only")
        problems = claims_problems(self)
        if problems:
            raise ValueError(CROSS_CHECK_SEP.join(problems))
        return self


# ---------------------------------------------------------------- CIFAR-10 (exercise 8): cifar10/params.yaml

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class ArchiveSpec(FileSpec):
    md5: str = Field(pattern=r"^[0-9a-f]{32}$", description="MD5 published by the dataset's authors (checked too)")


class Cifar10Data(Strict):
    dataset: Literal["cifar10"] = "cifar10"
    mirrors: list[str] = Field(min_length=1, description="tried in order; a local directory or an http(s) base URL")
    archive: ArchiveSpec
    download_timeout_s: float = Field(60.0, gt=0)
    train_rows: int = Field(50_000, gt=0, description="images the five training batches must hold together (checked)")
    test_rows: int = Field(10_000, gt=0, description="images test_batch must hold (checked)")
    valid_size: int = Field(5000, gt=0, description="the FIRST N training images are the validation split")
    max_train_rows: int | None = Field(None, gt=0, description="use only the first N training images (quick trial runs)")
    max_test_rows: int | None = Field(None, gt=0, description="use only the first N test images (quick trial runs)")

    _mirrors = field_validator("mirrors")(lambda cls, v: check_mirrors(v))

    @model_validator(mode="after")
    def _sizes(self) -> "Cifar10Data":
        train = min(self.train_rows, self.max_train_rows or self.train_rows)
        if self.valid_size >= train:
            raise ValueError(f"valid_size ({self.valid_size}) must be smaller than the training images used ({train})")
        return self


class Cifar10Params(Params):
    """cifar10/params.yaml: the sections of params.yaml, with CIFAR-10's data and no transfer learning."""

    data: Cifar10Data  # type: ignore[assignment]
    transfer: None = None


def deep_merge(base: Any, over: Any) -> Any:
    """``over`` on top of ``base``: mappings merge key by key, anything else replaces."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = deep_merge(base.get(k), v) if k in base else v
        return out
    return copy.deepcopy(over)


def resolve_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """Merge ``defaults`` under each experiment and transfer model (the experiment's own keys win)."""
    raw = copy.deepcopy(raw)
    defaults = raw.get("defaults") or {}
    if isinstance(raw.get("experiments"), dict):
        raw["experiments"] = {
            k: deep_merge(defaults, v) if isinstance(v, dict) else v for k, v in raw["experiments"].items()
        }
    transfer = raw.get("transfer")
    if isinstance(transfer, dict):
        for k in ("model_a", "model_b"):
            if isinstance(transfer.get(k), dict):
                transfer[k] = deep_merge(defaults, transfer[k])
    return raw


def _inherited(entry: Any, defaults: Any, path: tuple[Any, ...]) -> bool:
    """True when the value at ``path`` of a merged entry came from ``defaults`` alone (the entry does not set it)."""
    e, d = entry, defaults
    for part in path:
        if not isinstance(e, dict):
            return False  # the entry's own value: a list, a scalar, a shorthand such as ``relu``
        if part in e:
            e, d = e[part], (d.get(part) if isinstance(d, dict) else None)
        elif isinstance(d, dict) and part in d:
            return True
        # else: in neither, a tag pydantic put into the location (a union member's name): skip it
    return False


def _defaults_loc(loc: tuple[Any, ...], raw: Any) -> tuple[Any, ...] | None:
    """``('defaults', *path)`` when the error at ``loc`` (in an experiment or a transfer model, where ``defaults``
    is merged) is about a value that entry inherited from ``defaults``; else None."""
    if not isinstance(raw, dict) or not isinstance(raw.get("defaults"), dict) or len(loc) < 2:
        return None
    if loc[0] == "experiments" and isinstance(raw.get("experiments"), dict):
        entry = raw["experiments"].get(loc[1])
    elif loc[0] == "transfer" and loc[1] in ("model_a", "model_b") and isinstance(raw.get("transfer"), dict):
        entry = raw["transfer"].get(loc[1])
    else:
        return None
    if isinstance(entry, dict) and _inherited(entry, raw["defaults"], loc[2:]):
        return ("defaults", *loc[2:])
    return None


def _format_errors(err: ValidationError, source: str, schema: type[Params] = Params, raw: Any = None) -> str:
    """One line per problem. A bad value under ``defaults`` is one problem named ``defaults.<key>`` (with the
    entries that inherit it), not one per experiment. ``raw``: the params before ``defaults`` were merged."""
    problems: list[list[Any]] = []  # [message, keys of the entries inheriting it from defaults (or None)]
    from_defaults: dict[str, list[str]] = {}
    for e in err.errors():
        loc = tuple(e["loc"])
        shown = _defaults_loc(loc, raw)
        key = ".".join(str(p) for p in (shown or loc))
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1], schema)
            msg = f"unknown key '{key}'" + (f"; allowed keys here: {', '.join(allowed)}" if allowed else "")
        elif not loc and e["type"] == "value_error":  # checks across sections: each message names its keys
            problems.extend([m, None] for m in str(e["msg"]).removeprefix("Value error, ").split(CROSS_CHECK_SEP))
            continue
        else:
            got = e.get("input")
            shown_got = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
            msg = f"'{key}': {e['msg']}{shown_got}"
        if shown is None:
            problems.append([msg, None])
        elif msg in from_defaults:
            from_defaults[msg].append(".".join(str(p) for p in loc))
        else:
            from_defaults[msg] = [".".join(str(p) for p in loc)]
            problems.append([msg, from_defaults[msg]])
    lines = [f"{source} does not fit the params schema ({len(problems)} problem(s)); nothing was run:"]
    for msg, where in problems:
        if where:
            more = f" and {len(where) - 1} more" if len(where) > 1 else ""
            msg += f" (inherited by {len(where)} entr{'y' if len(where) == 1 else 'ies'}: '{where[0]}'{more})"
        lines.append(f"  - {msg}")
    return "\n".join(lines)


def _allowed_keys(loc: tuple[Any, ...], schema: type[Params] = Params) -> list[str]:
    """Field names of the model found by following ``loc`` from ``schema`` (best effort)."""
    model: Any = schema
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part) if isinstance(part, str) else None
        if field is None:
            # a dict/list entry: keep the model of its values
            continue
        ann = field.annotation
        model = _model_of(ann)
        if model is None:
            return []
    return sorted(getattr(model, "model_fields", {}).keys())


def _model_of(ann: Any) -> Any:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        m = _model_of(arg)
        if m is not None:
            return m
    return None


def _entry_model(ann: Any) -> Any:
    """The model of the entries when ``ann`` is a mapping of names to models (``experiments``), else None."""
    if get_origin(ann) is dict:
        args = get_args(ann)
        value = args[1] if len(args) == 2 else None
        return value if isinstance(value, type) and issubclass(value, BaseModel) else None
    if get_origin(ann) in (Union, types.UnionType):
        for arg in get_args(ann):
            m = _entry_model(arg)
            if m is not None:
                return m
    return None


def _refuse_new_entries(raw: Any, keys: list[str], schema: type[Params], text: str, source: str) -> None:
    """An override may set any key of the schema, present in the file or not, but not bring in a new entry of a
    mapping of named entries (``experiments``): ``experiments.elu_typo.train.epochs=3`` would train a new,
    defaults-only experiment. ``+key=value`` asks for the new entry."""
    model: Any = schema
    cur: Any = raw
    entries: Any = None  # the model of the entries when ``cur`` maps names to entries
    for i, k in enumerate(keys):
        if entries is not None:
            if not (isinstance(cur, dict) and k in cur):
                section = ".".join(keys[:i])
                names = ", ".join(str(n) for n in cur) if isinstance(cur, dict) and cur else "none"
                raise ParamsError(
                    f"override {text!r}: there is no {k!r} in '{section}' of {source} (its entries: {names}); "
                    f"a typo? To add a new entry, prefix the key with '+': -S +{text}")
            model, entries = entries, None
        else:
            field = getattr(model, "model_fields", {}).get(k) if model is not None else None
            ann = field.annotation if field is not None else None
            entries = _entry_model(ann)
            model = None if entries is not None else _model_of(ann)
        cur = cur.get(k) if isinstance(cur, dict) else None


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        if not isinstance(cur.get(k), dict):
            cur[k] = {}
        cur = cur[k]
    cur[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` with the value parsed as YAML (``epochs=3`` gives an int); the key keeps a leading ``+``."""
    if "=" not in text:
        raise ParamsError(f"override {text!r} must look like key.subkey=value")
    key, raw = text.split("=", 1)
    return key.strip(), load_yaml(raw, f"override {text!r}")


def apply_override(raw: dict[str, Any], text: str, schema: type[Params] = Params, source: str = DEFAULT_PARAMS) -> None:
    """Set ``key.sub=value`` in ``raw`` (in place). ``+key.sub=value`` may also add a new named entry (a new
    experiment); without the ``+`` that is an error naming the entry and the existing ones."""
    key, value = parse_override(text)
    create = key.startswith("+")
    key = key[1:].strip() if create else key
    keys = key.split(".")
    if not all(k.strip() for k in keys):
        raise ParamsError(f"override {text!r}: empty key in {key!r}")
    if not create:
        _refuse_new_entries(raw, keys, schema, text, source)
    _set_dotted(raw, key, value)


def validate_params(raw: dict[str, Any], source: str = DEFAULT_PARAMS, schema: type[Params] = Params) -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"{source} must be a YAML mapping at the top level")
    try:
        return schema.model_validate(resolve_defaults(raw))
    except ValidationError as err:
        raise ParamsError(_format_errors(err, source, schema, raw)) from None


def load_raw(
    path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None, schema: type[Params] = Params
) -> dict[str, Any]:
    """The params file as a dict (duplicate keys refused), with the overrides applied (see ``apply_override``)."""
    path = Path(path or os.environ.get("PARAMS_FILE", DEFAULT_PARAMS))
    if not path.exists():
        raise ParamsError(f"params file {path} not found (run from the repository root, or pass --params)")
    raw = load_yaml(path.read_text(), str(path)) or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must be a YAML mapping at the top level")
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        apply_override(raw, item, schema, str(path))
    return raw


def load_params(
    path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None, schema: type[Params] = Params
) -> Params:
    """Read, override (``key=value``) and validate params; raise ``ParamsError`` naming the bad keys."""
    raw = load_raw(path, overrides, schema)
    return validate_params(raw, str(path or os.environ.get("PARAMS_FILE", DEFAULT_PARAMS)), schema)
