"""Issue 33, item 7 ("schema gaps"): each test reproduces one gap of the params schema, now closed."""
from __future__ import annotations

import math
import sys

import pytest
import yaml

from components.config import ParamsError, load_params, load_raw, load_yaml, validate_params

from .conftest import ROOT, run

PARAMS = ROOT / "params.yaml"


def raw():
    return yaml.safe_load(PARAMS.read_text())


def problems(r) -> str:
    with pytest.raises(ParamsError) as info:
        validate_params(r)
    return str(info.value)


# ---------------------------------------------------------------- 1. strict int / bool


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda r: r["experiments"]["elu"].setdefault("train", {}).update(epochs=True),
         "'experiments.elu.train.epochs': Input should be a valid integer (got True)"),
        (lambda r: r["data"].update(valid_size=False), "'data.valid_size': Input should be a valid integer (got False)"),
        (lambda r: r["data"].update(valid_size=5000.0), "'data.valid_size': Input should be a valid integer (got 5000.0)"),
        (lambda r: r["data"].update(valid_size="5000"), "'data.valid_size': Input should be a valid integer (got '5000')"),
        (lambda r: r["experiments"]["elu"]["model"].update(input_batch_norm=1),
         "'experiments.elu.model.input_batch_norm': Input should be a valid boolean (got 1)"),
        (lambda r: r["runtime"].update(deterministic=0), "'runtime.deterministic': Input should be a valid boolean (got 0)"),
        (lambda r: r["mlflow"].update(enabled="yes"), "'mlflow.enabled': Input should be a valid boolean (got 'yes')"),
        (lambda r: r["experiments"]["opt_adam"]["optimizer"].update(learning_rate=True),
         "'experiments.opt_adam.optimizer.learning_rate': Input should be a valid number (got True)"),
    ],
)
def test_booleans_are_not_numbers_nor_numbers_booleans(mutate, expected):
    r = raw()
    mutate(r)
    assert expected in problems(r)


def test_an_int_is_still_a_float():
    r = raw()
    r["experiments"]["opt_adam"]["optimizer"]["learning_rate"] = 1
    p = validate_params(r)
    lr = p.experiments["opt_adam"].optimizer.learning_rate
    assert lr == 1.0 and isinstance(lr, float)
    p = load_params(PARAMS, ["experiments.elu.optimizer.learning_rate=1"])
    assert p.experiments["elu"].optimizer.learning_rate == 1.0


def test_yaml_1_2_floats_are_floats():
    """``1e-3`` is a string to PyYAML (YAML 1.1); the params loader reads it as the float a user means."""
    p = load_params(PARAMS, ["experiments.opt_sgd.optimizer.learning_rate=1e8", "experiments.elu.optimizer.learning_rate=2E-3",
                             "experiments.opt_adam.optimizer.learning_rate=1.5e-4"])
    assert p.experiments["opt_sgd"].optimizer.learning_rate == 1e8
    assert p.experiments["elu"].optimizer.learning_rate == 2e-3
    assert p.experiments["opt_adam"].optimizer.learning_rate == 1.5e-4


def test_overridden_booleans_and_ints_are_strict_too():
    with pytest.raises(ParamsError, match=r"'experiments.elu.train.epochs': Input should be a valid integer \(got True\)"):
        load_params(PARAMS, ["experiments.elu.train.epochs=true"])
    with pytest.raises(ParamsError, match=r"'mlflow.enabled': Input should be a valid boolean \(got 0\)"):
        load_params(PARAMS, ["mlflow.enabled=0"])


# ---------------------------------------------------------------- 2. finite floats


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", ".NaN"])
def test_floats_must_be_finite(value):
    with pytest.raises(ParamsError, match=r"'experiments.elu.optimizer.learning_rate': Input should be a finite number"):
        load_params(PARAMS, [f"experiments.elu.optimizer.learning_rate={value}"])
    r = raw()
    r["data"]["download_timeout_s"] = math.inf
    assert "'data.download_timeout_s': Input should be a finite number" in problems(r)
    r = raw()
    r["mc_dropout"]["reject_fractions"] = [0.1, math.nan]
    assert "'mc_dropout.reject_fractions.1': Input should be a finite number" in problems(r)


# ---------------------------------------------------------------- 3. duplicate YAML keys


def _with_duplicate(tmp_path, after: str, dup: str):
    text = PARAMS.read_text()
    assert after in text
    lines = text.splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if line.startswith(after)) + 1
    lines.insert(first, dup + "\n")
    (tmp_path / "params.yaml").write_text("".join(lines))
    return tmp_path / "params.yaml", first, first + 1  # file, first key's line, duplicate's line (1-based)


def test_duplicate_keys_are_refused_with_key_and_line(tmp_path):
    path, first, dup = _with_duplicate(tmp_path, "  valid_size: 5000", "  valid_size: 100")
    with pytest.raises(ParamsError) as info:
        load_params(path)
    msg = str(info.value)
    assert f"duplicate key 'valid_size' on line {dup} (first on line {first})" in msg and str(path) in msg
    with pytest.raises(ParamsError, match="duplicate key 'valid_size'"):
        load_raw(path)  # pipeline.py reads params through load_raw


def test_duplicate_experiment_names_are_refused(tmp_path):
    path, first, dup = _with_duplicate(tmp_path, "  opt_sgd:", "  opt_sgd: {description: again, optimizer: {name: adam}}")
    with pytest.raises(ParamsError, match=f"duplicate key 'opt_sgd' on line {dup} \\(first on line {first}\\)"):
        load_params(path)


def test_duplicate_keys_in_an_override_value_and_merge_keys():
    with pytest.raises(ParamsError, match="duplicate key 'name'"):
        load_params(PARAMS, ["experiments.elu.optimizer={name: sgd, learning_rate: 0.1, name: adam}"])
    # a '<<' merge followed by the key it overrides is not a duplicate
    assert load_yaml("a: &a {k: 1, j: 2}\nb: {<<: *a, k: 3}\n")["b"] == {"k": 3, "j": 2}
    with pytest.raises(ParamsError, match="duplicate key 'k' on line 3 \\(first on line 2\\)"):
        load_yaml("a:\n  k: 1\n  k: 2\n", "x.yaml")


def test_duplicate_key_fails_the_cli_before_any_work(tmp_path):
    path, _, dup = _with_duplicate(tmp_path, "  valid_size: 5000", "  valid_size: 100")
    proc = run([sys.executable, "-m", "components", "download"], cwd=tmp_path, check=False, PYTHONPATH=str(ROOT))
    assert proc.returncode == 2 and f"duplicate key 'valid_size' on line {dup}" in proc.stderr
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------- 4. a bad default is one problem


def test_a_bad_default_is_one_problem_named_under_defaults():
    r = raw()
    r["defaults"]["train"]["epochs"] = -1
    msg = problems(r)
    lines = [line for line in msg.splitlines() if line.startswith("  - ")]
    assert len(lines) == 1, msg
    assert "(1 problem(s))" in msg
    assert lines[0].startswith("  - 'defaults.train.epochs': Input should be greater than 0 (got -1) (inherited by ")
    assert "'experiments.leaky_relu.train.epochs' and " in lines[0]  # where it bites, once


def test_an_unknown_key_under_defaults_is_one_problem_with_the_allowed_keys():
    r = raw()
    r["defaults"]["train"]["epoch"] = 5
    msg = problems(r)
    lines = [line for line in msg.splitlines() if line.startswith("  - ")]
    assert len(lines) == 1, msg
    assert lines[0].startswith("  - unknown key 'defaults.train.epoch'; allowed keys here: batch_size, diagnostics, early_stopping, epochs")


def test_defaults_and_an_experiments_own_problems_stay_apart():
    r = raw()
    r["defaults"]["optimizer"]["learning_rate"] = True
    r["experiments"]["opt_adam"]["optimizer"]["learning_rate"] = -1  # opt_adam sets its own: its own problem
    msg = problems(r)
    lines = [line for line in msg.splitlines() if line.startswith("  - ")]
    assert len(lines) == 2, msg
    assert any(line.startswith("  - 'defaults.optimizer.learning_rate': Input should be a valid number (got True)") for line in lines)
    assert any(line.startswith("  - 'experiments.opt_adam.optimizer.learning_rate': Input should be greater than 0") for line in lines)


def test_a_bad_default_overridden_by_every_entry_is_still_an_error_of_nobody_else():
    """An experiment that sets the key itself does not inherit the bad default: it is not counted."""
    r = raw()
    r["defaults"]["train"]["batch_size"] = 0
    for name in list(r["experiments"])[1:]:
        r["experiments"][name].setdefault("train", {})["batch_size"] = 32
    for m in ("model_a", "model_b"):
        r["transfer"][m].setdefault("train", {})["batch_size"] = 32
    first = next(iter(r["experiments"]))
    msg = problems(r)
    assert f"(inherited by 1 entry: 'experiments.{first}.train.batch_size')" in msg


# ---------------------------------------------------------------- 5. check-params takes --params and -S


def test_check_params_takes_params_and_overrides(tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text(PARAMS.read_text())
    cmd = [sys.executable, "-m", "components", "check-params", "--params", str(other)]
    ok = run(cmd + ["-S", "experiments.elu.train.epochs=3"], cwd=tmp_path, check=False, PYTHONPATH=str(ROOT))
    assert ok.returncode == 0 and "params are valid" in ok.stderr + ok.stdout
    bad = run(cmd + ["-S", "experiments.elu.train.epochs=0"], cwd=tmp_path, check=False, PYTHONPATH=str(ROOT))
    assert bad.returncode == 2 and "'experiments.elu.train.epochs': Input should be greater than 0" in bad.stderr
    assert str(other) in bad.stderr  # the file it checked
    typo = run(cmd + ["--set", "experiments.elu_typo.train.epochs=3"], cwd=tmp_path, check=False, PYTHONPATH=str(ROOT))
    assert typo.returncode == 2 and "'elu_typo'" in typo.stderr


def test_check_params_of_the_cifar10_pipeline():
    proc = run([sys.executable, "-m", "components", "check-params", "cifar10", "-S", "data.valid_size=1000"],
               cwd=ROOT / "cifar10", check=False, PYTHONPATH=str(ROOT))
    assert proc.returncode == 0 and "params are valid" in proc.stderr + proc.stdout


# ---------------------------------------------------------------- 6. -S cannot invent an experiment by accident


def test_an_override_into_a_missing_experiment_is_refused():
    with pytest.raises(ParamsError) as info:
        load_params(PARAMS, ["experiments.elu_typo.train.epochs=3"])
    msg = str(info.value)
    assert "there is no 'elu_typo' in 'experiments' of" in msg
    assert "leaky_relu, " in msg and ", elu, " in msg  # the existing names
    assert "-S +experiments.elu_typo.train.epochs=3" in msg  # how to mean it
    with pytest.raises(ParamsError, match="'elu_typo'"):
        load_raw(PARAMS, ["experiments.elu_typo=3"])  # pipeline.py's path, and the entry itself


def test_plus_adds_a_new_experiment_built_on_defaults():
    p = load_params(PARAMS, ["+experiments.my_new.model.activation=elu", "experiments.my_new.train.epochs=2"])
    new = p.experiments["my_new"]
    assert new.model.activation.name == "elu" and new.train.epochs == 2
    assert new.optimizer == p.experiments["opt_sgd"].optimizer  # the rest from defaults
    assert load_params(PARAMS, ["+experiments.elu.train.epochs=4"]).experiments["elu"].train.epochs == 4  # existing: fine


@pytest.mark.parametrize(
    "override, check",
    [
        ("experiments.opt_sgd.train.epochs=3", lambda p: p.experiments["opt_sgd"].train.epochs == 3),  # not in the file
        ("experiments.elu.train.diagnostics.enabled=true", lambda p: p.experiments["elu"].train.diagnostics.enabled),
        ("runtime.checkpoint_dir=/tmp/ckpt", lambda p: p.runtime.checkpoint_dir == "/tmp/ckpt"),
        ("runtime.cluster.mixed_precision=true", lambda p: p.runtime.cluster.mixed_precision),
        ("mlflow.enabled=false", lambda p: p.mlflow.enabled is False),
        ("kubeflow.checkpoints.pvc=ch11-ckpt", lambda p: p.kubeflow.checkpoints.pvc == "ch11-ckpt"),
        ("kubeflow.gpu.node_selector.pool=gpu-a", lambda p: p.kubeflow.gpu.node_selector["pool"] == "gpu-a"),
        ("defaults.train.early_stopping.patience=3", lambda p: p.experiments["opt_sgd"].train.early_stopping.patience == 3),
        ("transfer.model_a.train.epochs=2", lambda p: p.transfer.model_a.train.epochs == 2),
        ("selu_simulation.layers=300", lambda p: p.selu_simulation.layers == 300),
    ],
)
def test_schema_keys_absent_from_the_file_are_still_settable(override, check):
    assert check(load_params(PARAMS, [override]))
