"""Typed warehouse/table declarations (part of the partner contract). No Beam import."""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["TableSpec", "WarehouseSpec", "BigQueryWriteOptions"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TableSpec(_Frozen):
    """The partner's main event table (child tables are named ``<name>__<array path>``)."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")
    partition_column: str = Field("_event_time", description="TIMESTAMP column used for time partitioning ('_event_time' is the envelope event time).")
    partition_granularity: str = Field("DAY", pattern="^(HOUR|DAY|MONTH|YEAR)$")
    clustering: tuple[str, ...] = Field(("_user_id",), max_length=4, description="Up to 4 clustering columns (BigQuery's limit).")


class BigQueryWriteOptions(_Frozen):
    """How the BigQuery sink writes (docs/bigquery.md). Defaults suit production; tests shorten the backoff."""

    method: str = Field("auto", pattern="^(auto|streaming_inserts|file_loads)$",
                        description="auto: streaming inserts for unbounded input, load jobs for bounded input.")
    insert_batch_rows: int = Field(500, ge=1, le=10_000, description="Rows per insertAll request (BigQuery suggests 500).")
    load_batch_rows: int = Field(50_000, ge=1, le=10_000_000, description="Rows per load job.")
    max_buffering_s: float = Field(2.0, gt=0, le=600, description="Streaming: longest a row waits for its batch to fill.")
    max_attempts: int = Field(5, ge=1, le=50, description="Attempts per request on transient errors (5xx, 429, timeouts) before the rows are isolated and dead-lettered.")
    initial_backoff_s: float = Field(1.0, ge=0, le=60, description="First retry delay; doubles per attempt (with jitter).")
    max_backoff_s: float = Field(60.0, ge=0, le=3600)
    request_timeout_s: float = Field(120.0, gt=0, le=3600, description="Per HTTP request / per load job wait.")


class WarehouseSpec(_Frozen):
    """Where rows go: the embedded DuckDB file or BigQuery."""

    kind: str = Field("duckdb", pattern="^(duckdb|bigquery)$")
    path: str = Field("./headwater.duckdb", description="duckdb: database file.")
    project: Optional[str] = Field(None, description="bigquery: project id.")
    dataset: Optional[str] = Field(None, description="bigquery: dataset id.")
    endpoint: Optional[str] = Field(None, description="bigquery: API endpoint override (emulator), e.g. http://127.0.0.1:9050.")
    dead_letter_table: str = Field("dead_letters", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    aggregates_table: str = Field("aggregates", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    bigquery: BigQueryWriteOptions = Field(BigQueryWriteOptions(), description="bigquery: write method, batching, retries.")

    @model_validator(mode="after")
    def _check(self) -> "WarehouseSpec":
        if self.kind == "bigquery" and not (self.project and self.dataset):
            raise ValueError("bigquery warehouse needs 'project' and 'dataset'")
        return self
