"""A bad params.yaml is named key by key before any step does work."""
from __future__ import annotations

import sys

import pytest
import yaml

from components.config import ParamsError, load_params, validate_params

from .conftest import ROOT, run


def raw():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_repo_params_are_valid():
    validate_params(raw())


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda r: r["data"].update(valid_sise=10), "unknown key 'data.valid_sise'; allowed keys here: dataset, "),
        (lambda r: r.update(sede=1), "unknown key 'sede'"),
        (lambda r: r["data"].update(valid_size=-5), "'data.valid_size': Input should be greater than 0 (got -5)"),
        (lambda r: r["data"].update(valid_size="many"), "'data.valid_size'"),
        (lambda r: r["data"].update(dataset="mnist"), "'data.dataset': Input should be 'fashion_mnist' (got 'mnist')"),
        (lambda r: r["data"]["files"]["train_images"].update(sha256="abc"), "'data.files.train_images.sha256'"),
        (lambda r: r["data"]["task_b"].update(positive_class=5), "positive_class and negative_class must differ"),
        (lambda r: r["data"].update(max_train_rows=100, valid_size=100), "must be smaller than max_train_rows"),
    ],
)
def test_bad_params_name_the_key(mutate, expected):
    r = raw()
    mutate(r)
    with pytest.raises(ParamsError) as info:
        validate_params(r)
    assert expected in str(info.value)


def test_override_is_validated(tmp_path):
    with pytest.raises(ParamsError, match="data.valid_size"):
        load_params(ROOT / "params.yaml", ["data.valid_size=0"])
    assert load_params(ROOT / "params.yaml", ["data.valid_size=7"]).data.valid_size == 7


def test_step_fails_before_any_work(tmp_path):
    r = raw()
    r["data"]["valid_sise"] = 10
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(r))
    proc = run([sys.executable, "-m", "components", "download"], cwd=tmp_path, check=False, PYTHONPATH=str(ROOT))
    assert proc.returncode == 2
    assert "unknown key 'data.valid_sise'" in proc.stderr
    assert not (tmp_path / "data").exists()  # nothing was fetched or written
