"""Schema of params.yaml's ``claims:`` section (the claims run: ``make claims``, claims/dvc.yaml; the report:
components/claims.py).

Kept apart from components/config.py, whose change re-runs every stage of the chapter: a claim is read only by the
claims step, so editing how claims are checked re-runs that step alone. ``problems(params)`` checks what each claim
names against the rest of params.yaml (experiments, MC-dropout sources, transfer), before any work.
"""
from __future__ import annotations

import builtins
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ClaimsBase(BaseModel):
    """As config.Strict (unknown keys are errors, strict types, no inf/nan)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


EXPERIMENT_METRICS = ("train_accuracy", "valid_accuracy", "test_accuracy", "train_loss", "valid_loss", "test_loss",
                      "seconds_per_epoch", "overfit_gap")
"""What a claim on experiments may compare: a key of metrics/experiments/<name>.json, or ``overfit_gap`` =
train_accuracy - valid_accuracy."""
MC_SIDES = ("mc_dropout", "deterministic")
MC_METRICS = ("accuracy", "ece")
TRANSFER_SIDES = ("b_on_a", "model_b")
TRANSFER_METRICS = ("error_rate_factor", "train_accuracy", "valid_accuracy", "test_accuracy", "train_loss",
                    "valid_loss", "test_loss")
"""``error_rate_factor``: (1 - acc_B) / (1 - acc_BonA) on the test set, compared as its log per transfer seed."""


class ClaimPair(ClaimsBase):
    """One pairwise comparison, ``better`` against ``than`` (an ``order`` gives one per adjacent pair)."""

    id: str
    claim: str
    better: str
    than: str
    metric: str
    expect: Literal["higher", "lower"]
    text: str
    source: str
    quote: str | None = None


class Claim(ClaimsBase):
    """A claim of the chapter as data: ``better`` beats ``than`` on ``metric`` (``expect``: higher or lower is
    better), or every entry of ``order`` beats the next. Sides: an experiment name; ``mc_dropout@<source>`` /
    ``deterministic@<source>`` (an mc_dropout source; metric accuracy or ece); ``b_on_a`` / ``model_b`` (the
    transfer seeds; metric error_rate_factor, or an accuracy / loss)."""

    source: str = Field(pattern=r"^seeds/[0-9]{3}_[0-9a-f]{16}\.txt$",
                        description="the seed document that makes the claim, e.g. seeds/004_664fab4db3c7e4c7.txt")
    line: int | None = Field(None, gt=0, description="1-based line of the quote in the seed document")
    quote: str | None = Field(None, min_length=1, description="the claim in the seed's words (short)")
    text: str = Field(min_length=1, description="the claim as this pipeline tests it")
    metric: str = Field(min_length=1)
    expect: Literal["higher", "lower"]
    better: str | None = None
    than: str | None = None
    order: list[str] | None = Field(None, min_length=2, description="best first; expanded to adjacent pairs")

    @model_validator(mode="after")
    def _one_form(self) -> "Claim":
        pair = self.better is not None or self.than is not None
        if pair and self.order is not None:
            raise ValueError("give either better + than, or order, not both")
        if self.order is None and (self.better is None or self.than is None):
            raise ValueError("give better and than (two sides), or order (a list, best first)")
        sides = self.order if self.order is not None else [self.better, self.than]
        if len(set(sides)) != len(sides):
            raise ValueError(f"a side appears twice: {sides}")
        return self

    def pairs(self, name: str) -> list[ClaimPair]:
        """The pairwise claims: one for better/than; for an order [A, B, C]: A vs B, B vs C."""
        sides = self.order if self.order is not None else [self.better, self.than]
        common = dict(claim=name, metric=self.metric, expect=self.expect, text=self.text, quote=self.quote,
                      source=self.source + (f":{self.line}" if self.line else ""))
        if self.order is None:
            return [ClaimPair(id=name, better=sides[0], than=sides[1], **common)]
        return [ClaimPair(id=f"{name}[{a} vs {b}]", better=a, than=b, **common) for a, b in zip(sides, sides[1:])]


class Claims(ClaimsBase):
    """The claims run (`make claims`) and its report: the seeds it adds and the claims it tests."""

    seeds: builtins.list[int] = Field(default_factory=list,
                             description="seeds a claims run adds to `seed` (every experiment once per seed); "
                                         "empty: the report shows every claim as not shown (one seed)")
    confidence: float = Field(0.95, gt=0, lt=1, description="of the confidence interval of each claim")
    interval: Literal["paired_t"] = Field(
        "paired_t", description="Student t interval of the mean of the per-seed differences (paired by seed)")
    list: dict[str, Claim] = Field(default_factory=dict, description="name -> claim (YAML only: a new claim needs no code)")

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, v: builtins.list[int]) -> builtins.list[int]:
        dup = sorted({s for s in v if v.count(s) > 1})
        if dup:
            raise ValueError(f"seed(s) {dup} listed twice; list each seed once")
        if any(s < 0 for s in v):
            raise ValueError("seeds must be >= 0")
        return v

    def pairs(self) -> builtins.list[ClaimPair]:
        return [p for name, c in self.list.items() for p in c.pairs(name)]


def _claim_problems(params: Any) -> builtins.list[str]:
    """Every claim that names an experiment, MC-dropout source, transfer side or metric that does not exist."""
    out: builtins.list[str] = []
    mc = params.mc_dropout.sources if params.mc_dropout else []
    for name, c in params.claims.list.items():
        sides = c.order if c.order is not None else [c.better, c.than]
        where = f"claims.list.{name}"
        kinds = set()
        for s in sides:
            if "@" in s:
                kind, _, src = s.partition("@")
                kinds.add("mc")
                if kind not in MC_SIDES:
                    out.append(f"{where}: {s!r}: before '@' use {' or '.join(MC_SIDES)} (e.g. mc_dropout@dropout)")
                elif src not in mc:
                    out.append(f"{where}: {s!r}: {src!r} is not an mc_dropout source; mc_dropout.sources: "
                               f"{', '.join(mc) or 'none'}")
            elif s in TRANSFER_SIDES and s not in params.experiments:
                kinds.add("transfer")
                if params.transfer is None:
                    out.append(f"{where}: {s!r} needs the transfer: section")
            elif s in params.experiments:
                kinds.add("experiment")
            else:
                out.append(f"{where}: {s!r} is not an experiment (nor mc_dropout@<source>, deterministic@<source>, "
                           f"b_on_a, model_b); experiments: {', '.join(params.experiments)}")
        if len(kinds) > 1:
            out.append(f"{where}: compares different kinds of sides ({', '.join(sides)}); compare experiments with "
                       "experiments, mc_dropout@x with deterministic@x, b_on_a with model_b")
            continue
        kind = kinds.pop() if kinds else None
        allowed = {"experiment": EXPERIMENT_METRICS, "mc": MC_METRICS, "transfer": TRANSFER_METRICS}.get(kind)
        if allowed is not None and c.metric not in allowed:
            out.append(f"{where}: unknown metric {c.metric!r} for these sides; use one of: {', '.join(allowed)}")
        if kind == "mc" and len({s.partition("@")[2] for s in sides}) > 1:
            out.append(f"{where}: MC dropout is compared with the deterministic pass of the same model "
                       f"(mc_dropout@x vs deterministic@x), not {', '.join(sides)}")
        if kind == "transfer" and c.metric == "error_rate_factor" and (c.better, c.than) != TRANSFER_SIDES:
            out.append(f"{where}: error_rate_factor is B-on-A's against model B's: better: b_on_a, than: model_b")
    return out


def problems(params: Any) -> builtins.list[str]:
    """What is wrong with params.yaml's claims (an empty list: nothing)."""
    out = _claim_problems(params)
    if params.seed in params.claims.seeds:
        out.insert(0, f"claims.seeds: {params.seed} is `seed`, which the main job already runs; claims.seeds "
                      "lists the seeds a claims run adds to it")
    return out
