"""Backfill plans: a bounded historical run of one partner's events through the unified pipeline.

A backfill is the partner's contract with its sources replaced by file globs
(local, ``gs://``, ``s3://``); every step after the source is the stream's own,
and row ids are deterministic, so a backfill over events the stream already
wrote adds nothing, and one over missing events fills exactly the gap.
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ingest.contract import Contract, ContractError, FileSource

__all__ = ["BackfillPlan", "backfill_contract"]


class BackfillPlan(BaseModel):
    """What to backfill. ``patterns`` are globs of JSONL(.gz) or Avro chunks."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    partner: str
    patterns: tuple[str, ...] = Field(min_length=1)
    format: Literal["auto", "jsonl", "avro"] = "auto"
    warehouse_path: Optional[str] = Field(None, description="duckdb: write into another file (e.g. a dry run)")

    @field_validator("patterns")
    @classmethod
    def _non_empty(cls, v: Sequence[str]) -> tuple[str, ...]:
        if any(not p.strip() for p in v):
            raise ValueError("empty pattern")
        return tuple(v)


def backfill_contract(contract: Contract, plan: BackfillPlan) -> Contract:
    """The contract a backfill runs: only ``plan.partner``, its sources replaced by the plan's file globs."""
    partner = contract.partner(plan.partner)
    if contract.warehouse.kind != "duckdb" and plan.warehouse_path:
        raise ContractError(f"backfill: warehouse_path only applies to the duckdb warehouse, not {contract.warehouse.kind}")
    sources = tuple(FileSource(kind="file", pattern=p, format=plan.format) for p in plan.patterns)
    new_partner = partner.model_copy(update={"sources": sources})
    warehouse = contract.warehouse
    if plan.warehouse_path:
        warehouse = warehouse.model_copy(update={"path": plan.warehouse_path})
    return contract.model_copy(update={"partners": (new_partner,), "warehouse": warehouse})
