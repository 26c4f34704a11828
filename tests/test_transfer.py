"""B-on-A: a clone of A (A untouched), a new head, frozen layers still in phase 1 and moving in phase 2."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from components import train, transfer
from components.experiment import train_experiment

from .conftest import ROOT, cli_sets, run, ws_params


@pytest.fixture(scope="module")
def model_a(tiny_ws):
    p = ws_params(tiny_ws)
    data = train.load_task(tiny_ws / "data/splits", "a")
    model, metrics, _, extras = train_experiment("model_a", p.transfer.model_a, p, data)
    extras["checkpoint"].clear()
    assert model.output_shape[-1] == 8
    return model


def test_b_on_a_clones_freezes_then_unfreezes(tiny_ws, model_a):
    p = ws_params(tiny_ws, **{"transfer.b_on_a.frozen_epochs": 2, "transfer.b_on_a.unfrozen_epochs": 2})
    data = train.load_task(tiny_ws / "data/splits", "b")
    a_before = [w.copy() for w in model_a.get_weights()]
    snaps = {}

    def snap(phase, model):
        snaps[phase] = [w.copy() for w in model.get_weights()]
        snaps[phase + "_layers"] = list(model.layers)

    model, metrics, history = transfer.train_b_on_a(p, model_a, data, seed=42, on_phase_end=snap)
    # A is untouched, and no layer object is shared with it
    assert all(np.array_equal(x, y) for x, y in zip(a_before, model_a.get_weights()))
    assert not {id(l) for l in model.layers} & {id(l) for l in model_a.layers}
    # the clone starts with A's weights (all but A's head), and a new 1-unit sigmoid head
    clone = snaps["clone"]
    for x, y in zip(clone[:-2], a_before[:-2]):
        np.testing.assert_array_equal(x, y)
    assert model.layers[-1].units == 1 and model.layers[-1].activation.__name__ == "sigmoid"
    assert clone[-2].shape == (50, 1)
    # phase 1 (frozen): reused layers do not move, the head does
    for x, y in zip(snaps["clone"][:-2], snaps["frozen"][:-2]):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(snaps["clone"][-2], snaps["frozen"][-2])
    # phase 2 (unfrozen, re-compiled): reused layers move
    assert not np.array_equal(snaps["frozen"][0], snaps["unfrozen"][0])
    assert [h["phase"] for h in history] == ["frozen", "frozen", "unfrozen", "unfrozen"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert 0 <= metrics["test_accuracy"] <= 1


def test_b_on_a_killed_in_the_unfrozen_phase_resumes_and_matches_an_uninterrupted_run(tiny_ws, model_a, tmp_path):
    """The b_on_a stage killed (-9) after epoch 2 of 3 of the unfrozen phase: the rerun takes the frozen phase
    from its checkpoint, goes on with the unfrozen one from epoch 2 (new optimizer after the re-compile, its
    own slots restored) and ends with the weights of a run that was never interrupted, on params' threads."""
    import json

    import keras

    sets = {"transfer.b_on_a.frozen_epochs": 1, "transfer.b_on_a.unfrozen_epochs": 3, "transfer.seeds": "[42]"}
    model_a.save(tmp_path / "model_a.keras")
    # model_b's metrics in the format run_model_b writes (only B's accuracy enters B-on-A's outputs)
    (tmp_path / "model_b.json").write_text(json.dumps(transfer._summary("model_b", {42: {"test_accuracy": 0.9, "test_loss": 0.3}})))
    binds = {"model_a_path": tmp_path / "model_a.keras", "model_b_metrics": tmp_path / "model_b.json",
             "models_dir": tmp_path / "b_on_a", "metrics_path": tmp_path / "b_on_a.json", "history_path": tmp_path / "b_on_a.csv"}
    args = ([sys.executable, "-m", "components", "b_on_a"] + cli_sets(sets)
            + [a for k, v in binds.items() for a in ("--bind", f"{k}={v}")])
    killed = run(args, cwd=tiny_ws, check=False, PYTHONPATH=str(ROOT), CH11_FAULT_KILL_AFTER_EPOCH="2")
    assert killed.returncode in (-9, 137), killed.stderr[-2000:]
    assert not (tmp_path / "b_on_a.json").exists()
    resumed = run(args, cwd=tiny_ws, PYTHONPATH=str(ROOT))
    assert "initialized before the runtime settings" not in resumed.stderr, "B-on-A did not train on params' threads"
    assert "(frozen): training had already ended after epoch 1" in resumed.stderr, resumed.stderr[-3000:]
    assert "(unfrozen): resuming after epoch 2/3" in resumed.stderr, resumed.stderr[-3000:]
    assert not list((tiny_ws / ".checkpoints").glob("b_on_a-42-*")), "resume state should be cleared after success"
    got = keras.models.load_model(tmp_path / "b_on_a" / "seed_42.keras").get_weights()
    ref, _, _ = transfer.train_b_on_a(ws_params(tiny_ws, **sets), model_a, train.load_task(tiny_ws / "data/splits", "b"), seed=42)
    assert len(got) == len(ref.get_weights())
    assert all(np.array_equal(a, b) for a, b in zip(got, ref.get_weights())), "resumed B-on-A differs from an uninterrupted one"


def test_error_rate_reduction():
    assert transfer.error_rate_reduction(0.9695, 0.9925) == pytest.approx(4.0667, rel=1e-3)  # the book's factor of 4
    assert transfer.error_rate_reduction(0.98, 0.97) < 1
