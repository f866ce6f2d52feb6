"""Launch-time checks that need more than the contract's own types (files, keys, cross-partner names).

``preflight(contract)`` raises :class:`ContractError` naming the partner and the field.
With ``check_sources`` (default) live sources are checked too (``ingest.live_check``: broker
reachable, topics present, Pub/Sub endpoint/credentials, subscription present or creatable).
"""
from __future__ import annotations

import glob
import os

from flatten.mask import MaskKeyError, load_mask_key
from ingest.contract import Contract, ContractError, FileSource

__all__ = ["preflight"]


def preflight(contract: Contract, check_files: bool = True, check_sources: bool = True,
              create_subscriptions: bool = True) -> None:
    errors: list[str] = []
    m = contract.masking
    needs_key = any(p.columns for p in contract.partners)
    # With masking.key_secret the workers read the key from Secret Manager (ingest/mask_key.py); the
    # launching machine need not be able to.
    if needs_key and not m.key_secret:
        try:
            load_mask_key(m.key_env, m.key_file, m.allow_dev_key)
        except MaskKeyError as exc:
            errors.append(f"masking: {exc}")
    wh = contract.warehouse
    reserved = {wh.dead_letter_table.lower(), wh.aggregates_table.lower()}
    owners: dict[str, str] = {}
    for i, p in enumerate(contract.partners):
        t = p.table.name.lower()
        if t in reserved or t.startswith("_headwater"):
            errors.append(f"partner {p.name!r}: table.name: {p.table.name!r} is reserved for headwater's own tables")
        if t in owners:
            errors.append(f"partner {p.name!r}: table.name: {p.table.name!r} is already used by partner {owners[t]!r}")
        owners[t] = p.name
        for j, c in enumerate(p.columns):
            if c.path == p.envelope.event_time:
                errors.append(f"partner {p.name!r}: columns[{j}].path: the event time {c.path!r} cannot be masked")
        for k, s in enumerate(p.sources):
            if check_files and isinstance(s, FileSource) and "://" not in s.pattern:
                if not glob.glob(os.path.expanduser(s.pattern)):
                    errors.append(f"partner {p.name!r}: sources[{k}].pattern: no file matches {s.pattern!r}")
    if check_sources:
        from ingest.live_check import check_live_sources

        errors += check_live_sources(contract, create_subscriptions=create_subscriptions)
    if errors:
        raise ContractError("contract: " + f"{len(errors)} error(s)\n  " + "\n  ".join(errors))
