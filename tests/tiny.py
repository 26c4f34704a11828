"""Tiny params for end-to-end runs: a slice of the real data, 1 epoch, every experiment kept."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def tiny_params(raw: dict | None = None, rows: int = 600, epochs: int = 1, mirrors: list[str] | None = None) -> dict:
    raw = copy.deepcopy(raw or yaml.safe_load((ROOT / "params.yaml").read_text()))
    raw["data"].update(max_train_rows=rows, valid_size=rows // 6, max_test_rows=rows // 3)
    raw["data"]["task_b"]["train_size"] = 20
    if mirrors is not None:
        raw["data"]["mirrors"] = mirrors
    for exp in list(raw["experiments"].values()) + [raw["transfer"]["model_a"], raw["transfer"]["model_b"]]:
        exp.setdefault("train", {})["epochs"] = epochs
        sched = exp.get("schedule") or {}
        if sched.get("kind") == "piecewise":
            sched["boundaries_epochs"] = [1, 2]
    raw["transfer"]["seeds"] = raw["transfer"]["seeds"][:2]
    raw["transfer"]["b_on_a"].update(frozen_epochs=1, unfrozen_epochs=1)
    raw["mc_dropout"]["samples"] = 10
    raw["runtime"]["checkpoint_dir"] = ".checkpoints"
    return raw


def write_tiny(path: Path, **kw) -> dict:
    raw = tiny_params(**kw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return raw
