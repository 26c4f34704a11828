"""Schema of params.yaml's ``claims:`` section (the claims run: ``make claims``, claims/dvc.yaml).

Kept apart from components/config.py, whose change re-runs every stage of the chapter: a claim is read only by the
claims step, so editing how claims are checked re-runs that step alone. ``Claims.check(params)`` validates what a
claim names against the rest of params.yaml (experiments, MC-dropout sources), before any work.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ClaimsBase(BaseModel):
    """As config.Strict (unknown keys are errors, strict types, no inf/nan)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Claims(ClaimsBase):
    seeds: list[int] = Field(default_factory=list, description="the seeds a claims run (make claims) adds to `seed`")

    def check(self, params: Any) -> None:
        """Raise ValueError naming what is wrong when a claim does not fit ``params`` (the whole params.yaml)."""
        if params.seed in self.seeds:
            raise ValueError(f"claims.seeds: {params.seed} is the main job's seed (`seed`); list only the seeds a claims "
                             "run adds")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"claims.seeds: a seed is listed twice: {self.seeds}")
