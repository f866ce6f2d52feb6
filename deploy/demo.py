"""`headwater demo`: the main job on embedded defaults.

Writes realistic synthetic events for three partners (gzipped JSONL, JSONL,
Avro; nested, arrays, PII, a few hostile lines), runs the unified pipeline into
``./headwater.duckdb`` and prints rows per table, dead letters by reason, the
top users by aggregate, and the reconciliation events in = rows + dead letters + duplicates.
"""
from __future__ import annotations

import gzip
import os
import random
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Optional, TextIO

import orjson

from deploy import synth
from ingest.contract import Contract, load_contract

__all__ = ["generate", "run_demo", "summarize", "example_contract_path"]


def example_contract_path() -> Path:
    return Path(__file__).resolve().parent.parent / "examples" / "headwater.yaml"


def generate(root: Path, events_per_partner: int = 10_000, seed: int = 7) -> dict[str, int]:
    """Write the demo's input files under ``root/data``; returns records written per partner (hostile ones included)."""
    import fastavro

    rng = random.Random(seed)
    data = root / "data"
    counts: dict[str, int] = {}
    # acme_bank: two gzipped JSONL chunks; the second adds an attribute (schema evolution), plus hostile lines.
    (data / "acme_bank").mkdir(parents=True, exist_ok=True)
    half = events_per_partner // 2
    n = 0
    for chunk, (lo, hi) in enumerate([(0, half), (half, events_per_partner)]):
        with gzip.open(data / "acme_bank" / f"chunk-{chunk:03d}.jsonl.gz", "wb") as fh:
            for i in range(lo, hi):
                fh.write(orjson.dumps(synth.acme_event(i, rng, extra=chunk == 1)) + b"\n")
                n += 1
            if chunk == 1:
                for line in synth.hostile_lines(synth.acme_event(hi - 1, random.Random(seed), extra=True)):
                    fh.write(line + b"\n")
                    n += 1
    counts["acme_bank"] = n
    (data / "orbit_offers").mkdir(parents=True, exist_ok=True)
    with open(data / "orbit_offers" / "offers-000.jsonl", "wb") as fh:
        for i in range(events_per_partner):
            ev = synth.orbit_event(i, rng)
            if i == 17:  # a type conflict under the partner's 'freeze' policy -> dead letter naming the column
                ev["product"]["terms"]["apr"] = "n/a"
            fh.write(orjson.dumps(ev) + b"\n")
    counts["orbit_offers"] = events_per_partner
    (data / "nimbus_pay").mkdir(parents=True, exist_ok=True)
    with open(data / "nimbus_pay" / "activity-000.avro", "wb") as fh:
        fastavro.writer(fh, fastavro.parse_schema(synth.NIMBUS_AVRO_SCHEMA),
                        (synth.nimbus_record(i, rng) for i in range(events_per_partner)))
    counts["nimbus_pay"] = events_per_partner
    return counts


def _progress(stop: threading.Event, out: TextIO, total: int) -> None:
    """Live progress: a rewritten line on a terminal, a line every 10 s otherwise (CI logs)."""
    from ingest import progress

    tty = out.isatty()
    t0 = time.monotonic()
    last = -1
    while not stop.wait(1.0 if tty else 10.0):
        done = progress.parsed()
        if done == last and not tty:
            continue
        last = done
        elapsed = time.monotonic() - t0
        phase = "parsing" if done < total else "aggregating and writing"
        line = f"  {phase}: {done:,}/{total:,} records parsed, {elapsed:,.0f}s"
        out.write(f"\r{line:<78}" if tty else line + "\n")
        out.flush()
    if tty:
        out.write("\n")


def summarize(contract: Contract, inputs: Optional[int] = None, out: TextIO = sys.stdout) -> dict:
    """Print rows per table, dead letters by reason, top users per aggregate; return the figures."""
    from sinks.duckdb_store import open_readonly

    wh = contract.warehouse
    con = open_readonly(wh.path)
    try:
        tables = [r[0] for r in con.execute(
            "SELECT table_name FROM _headwater_tables ORDER BY table_name").fetchall()]
        out.write("\nRows per table\n")
        figures: dict = {"tables": {}, "dead_letters": {}}
        for t in tables:
            n = con.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]
            ncols = len(con.execute(f'DESCRIBE "{t}"').fetchall())
            figures["tables"][t] = n
            out.write(f"  {t:<40} {n:>9,} rows  {ncols:>3} columns\n")
        out.write("\nDead letters by reason\n")
        for partner, reason, n, example in con.execute(
                f'SELECT partner, reason, count(*), any_value(message) FROM "{wh.dead_letter_table}" '
                "GROUP BY 1, 2 ORDER BY 1, 2").fetchall():
            figures["dead_letters"][(partner, reason)] = n
            out.write(f"  {partner:<14} {reason:<18} {n:>6,}   e.g. {example[:70]}\n")
        out.write("\nTop users by aggregate (latest version per key)\n")
        for p in contract.partners:
            for a in p.aggregates:
                first = a.metrics[0].name
                rows = con.execute(
                    f"""SELECT key, metrics FROM "{wh.aggregates_table}"
                        WHERE partner = ? AND aggregate = ? AND "window" = 'lifetime'
                        QUALIFY row_number() OVER (PARTITION BY key ORDER BY version DESC) = 1
                        ORDER BY CAST(json_extract(metrics, '$.{first}') AS DOUBLE) DESC NULLS LAST, key LIMIT 3""",
                    [p.name, a.name]).fetchall()
                for key, metrics in rows:
                    out.write(f"  {p.name}.{a.name:<20} {key:<16} {metrics[:90]}\n")
        main_rows = sum(figures["tables"].get(p.table.name, 0) for p in contract.partners)
        # event-level dead letters: everything before the warehouse except aggregate-only failures
        # (an event whose metric value was unusable still has its rows)
        dead = con.execute(f'SELECT count(*) FROM "{wh.dead_letter_table}" '
                           "WHERE source NOT IN ('warehouse', 'aggregate')").fetchone()[0]
        main_tables = {p.table.name for p in contract.partners}
        sink_coords = con.execute(f'SELECT DISTINCT coords FROM "{wh.dead_letter_table}" '
                                  "WHERE source = 'warehouse'").fetchall()
        # a rejected main row is a lost event; a rejected child row is not (its event has a main row)
        sink_dead = sum(1 for (c,) in sink_coords if c[len("table:"):].split("/", 1)[0] in main_tables)
        figures.update(main_rows=main_rows, dead=dead + sink_dead)
    finally:
        con.close()
    if inputs is not None:
        from ingest import progress

        dups = progress.duplicates()
        figures["duplicates"] = dups
        ok = inputs == main_rows + dead + sink_dead + dups
        out.write(f"\nReconciliation: {inputs:,} records in = {main_rows:,} event rows + {dead + sink_dead:,} dead letters"
                  f" + {dups:,} duplicates dropped  -> {'OK' if ok else 'MISMATCH'}\n")
        figures["reconciled"] = ok
    return figures


def run_demo(workdir: Path = Path("."), events_per_partner: int = 10_000, beam_argv: tuple[str, ...] = (),
             out: TextIO = sys.stdout) -> dict:
    from ingest import pipeline, progress

    os.chdir(workdir)
    root = Path("headwater-demo")
    root.mkdir(exist_ok=True)
    key = root / "mask.key"
    if not key.exists():
        key.write_text(secrets.token_hex(32))
        key.chmod(0o600)
    contract = load_contract(example_contract_path())
    db = Path(contract.warehouse.path)
    for f in (db, db.with_suffix(db.suffix + ".wal")):
        f.unlink(missing_ok=True)
    out.write(f"headwater demo: writing synthetic events for {len(contract.partners)} partners under {root}/data\n")
    counts = generate(root, events_per_partner)
    total = sum(counts.values())
    out.write(f"  {total:,} records: " + ", ".join(f"{p} {n:,}" for p, n in counts.items()) + "\n")
    out.write(f"running the pipeline into {db} ...\n")
    progress.reset()
    stop = threading.Event()
    th = threading.Thread(target=_progress, args=(stop, out, total), daemon=True)
    th.start()
    t0 = time.monotonic()
    try:
        pipeline.run(contract, ["--direct_running_mode=in_memory", *beam_argv])
    finally:
        stop.set()
        th.join()
    elapsed = time.monotonic() - t0
    out.write(f"done in {elapsed:.1f}s ({total / elapsed:,.0f} records/s)\n")
    figures = summarize(contract, inputs=total, out=out)
    out.write(f"\nExplore: duckdb {db}  (or: python -c \"import duckdb; print(duckdb.sql('FROM acme_events LIMIT 5'))\")\n")
    return figures
