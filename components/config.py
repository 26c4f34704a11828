"""The one params schema: params.yaml is validated here before any step does work.

Both the DVC stages and the Kubeflow components load their parameters through ``load_params``;
an unknown key, a wrong type or an impossible value is a ``ParamsError`` that names the key and
what is allowed, raised before any data is read or any model is built.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PARAMS = "params.yaml"

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


class ParamsError(ValueError):
    """params.yaml (or an override) does not fit the schema; the message names each bad key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class Data(Strict):
    dataset: Literal["fashion_mnist"] = "fashion_mnist"
    mirrors: list[str] = Field(min_length=1, description="tried in order; a local directory or an http(s) URL")
    files: FashionMnistFiles
    download_timeout_s: float = Field(60.0, gt=0)
    valid_size: int = Field(5000, gt=0, description="the FIRST N training images are the validation split")
    max_train_rows: int | None = Field(None, gt=0, description="use only the first N rows of the training file (tiny runs)")
    max_test_rows: int | None = Field(None, gt=0, description="use only the first N rows of the test file (tiny runs)")
    task_b: TaskB = TaskB()

    @field_validator("mirrors")
    @classmethod
    def _mirrors(cls, v: list[str]) -> list[str]:
        for m in v:
            if "://" in m and not m.startswith(("http://", "https://", "file://")):
                raise ValueError(f"mirror {m!r}: only local directories, file://, http:// and https:// are supported")
        return v

    @model_validator(mode="after")
    def _sizes(self) -> "Data":
        if self.max_train_rows is not None and self.valid_size >= self.max_train_rows:
            raise ValueError(f"valid_size ({self.valid_size}) must be smaller than max_train_rows ({self.max_train_rows})")
        return self


class Params(Strict):
    seed: int = Field(42, ge=0, description="global seed: Python, NumPy and TensorFlow")
    data: Data


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source} does not fit the params schema ({err.error_count()} problem(s)); nothing was run:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parent = e["loc"][:-1]
            allowed = _allowed_keys(parent)
            msg = f"unknown key '{key}'" + (f"; allowed keys here: {', '.join(allowed)}" if allowed else "")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
            msg = f"'{key}': {e['msg']}{shown}"
        lines.append(f"  - {msg}")
    return "\n".join(lines)


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model found by following ``loc`` from ``Params`` (best effort)."""
    model: Any = Params
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


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        if not isinstance(cur.get(k), dict):
            cur[k] = {}
        cur = cur[k]
    cur[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` with the value parsed as YAML (``epochs=3`` gives an int)."""
    if "=" not in text:
        raise ParamsError(f"override {text!r} must look like key.subkey=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def validate_params(raw: dict[str, Any], source: str = DEFAULT_PARAMS) -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"{source} must be a YAML mapping at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_errors(err, source)) from None


def load_raw(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    path = Path(path or os.environ.get("PARAMS_FILE", DEFAULT_PARAMS))
    if not path.exists():
        raise ParamsError(f"params file {path} not found (run from the repository root, or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from None
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    return raw


def load_params(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> Params:
    """Read, override (``key=value``) and validate params; raise ``ParamsError`` naming the bad keys."""
    raw = load_raw(path, overrides)
    return validate_params(raw, str(path or os.environ.get("PARAMS_FILE", DEFAULT_PARAMS)))
