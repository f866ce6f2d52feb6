"""Typed warehouse/table declarations (part of the partner contract). No Beam import."""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["TableSpec", "WarehouseSpec"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TableSpec(_Frozen):
    """The partner's main event table (child tables are named ``<name>__<array path>``)."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")
    partition_column: str = Field("_event_time", description="TIMESTAMP column used for time partitioning ('_event_time' is the envelope event time).")
    partition_granularity: str = Field("DAY", pattern="^(HOUR|DAY|MONTH|YEAR)$")
    clustering: tuple[str, ...] = Field(("_user_id",), max_length=4, description="Up to 4 clustering columns (BigQuery's limit).")


class WarehouseSpec(_Frozen):
    """Where rows go: the embedded DuckDB file or BigQuery."""

    kind: str = Field("duckdb", pattern="^(duckdb|bigquery)$")
    path: str = Field("./headwater.duckdb", description="duckdb: database file.")
    project: Optional[str] = Field(None, description="bigquery: project id.")
    dataset: Optional[str] = Field(None, description="bigquery: dataset id.")
    endpoint: Optional[str] = Field(None, description="bigquery: API endpoint override (emulator), e.g. http://127.0.0.1:9050.")
    dead_letter_table: str = Field("dead_letters", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    aggregates_table: str = Field("aggregates", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")

    @model_validator(mode="after")
    def _check(self) -> "WarehouseSpec":
        if self.kind == "bigquery" and not (self.project and self.dataset):
            raise ValueError("bigquery warehouse needs 'project' and 'dataset'")
        return self
