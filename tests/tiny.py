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


def keep_experiments(raw: dict, names) -> dict:
    """``raw`` cut to the experiments ``names``: MC-dropout sources among them, and the claims whose sides are still
    there (an order keeps its remaining members, if two are left), so that the cut params still validate."""
    names = set(names)
    raw["experiments"] = {k: v for k, v in raw["experiments"].items() if k in names}
    if raw.get("mc_dropout"):
        raw["mc_dropout"]["sources"] = [s for s in raw["mc_dropout"]["sources"] if s in names]
    sources = raw["mc_dropout"]["sources"] if raw.get("mc_dropout") else []
    sides = names | {"b_on_a", "model_b"} | {f"{k}@{s}" for k in ("mc_dropout", "deterministic") for s in sources}
    claims = (raw.get("claims") or {}).get("list") or {}
    for name, c in list(claims.items()):
        if c.get("order"):
            c["order"] = [s for s in c["order"] if s in sides]
            if len(c["order"]) < 2:
                del claims[name]
        elif not {c["better"], c["than"]} <= sides:
            del claims[name]
    return raw
