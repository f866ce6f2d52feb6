"""Long run (not collected by pytest, not in CI): the drifted-PII property on many examples.

    HEADWATER_LOCAL=... python tests/long/pii_drift.py [--examples 100000] [--seed N]

(Independent runs with different seeds can share the examples: two of 50,000 on two cores.)

Runs ``tests/ingest/test_pii_drift_property.py``'s property (ParseEnvelope + FlattenEvents stages, compiled
and Python paths, every output scanned for every planted raw value) on N hypothesis examples and prints
the count, the time, the outcome mix and the first failure if any (exit 1).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

from flatten.fast import native_available  # noqa: E402
from tests.ingest import test_pii_drift_property as prop  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=None, help="hypothesis seed (independent runs in parallel)")
    args = ap.parse_args(argv)
    seen = collections.Counter()
    t0 = time.monotonic()

    @settings(max_examples=args.examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(prop.case())
    def run(c):
        anns, payload, secrets = c
        outputs = prop.pipeline_outputs(anns, payload)
        seen["examples"] += 1
        seen["secrets"] += len(secrets)
        seen["dead_letter" if any(o.startswith(b"hmac-sha256:") for o in outputs) else "rows"] += 1
        try:
            prop.assert_no_raw(secrets, outputs)
        except AssertionError:
            seen["failures"] += 1  # (hypothesis then shrinks and reports it; counted so progress lines show it)
            raise
        finally:
            if seen["examples"] % 10_000 == 0:
                print(f"  {seen['examples']:,} examples, {seen['failures']} failing, {time.monotonic() - t0:,.0f}s",
                      flush=True)

    print(f"pii drift property: {args.examples:,} examples, seed {args.seed}, native accelerator: "
          f"{native_available()}", flush=True)
    if args.seed is not None:
        run = seed(args.seed)(run)
    try:
        run()
    except AssertionError as exc:
        print(f"FAILED after {seen['examples']:,} examples: {exc}")
        return 1
    print(f"OK: {seen['examples']:,} examples ({seen['rows']:,} with rows, {seen['dead_letter']:,} dead-lettered), "
          f"{seen['secrets']:,} planted raw values, none found in any output; {time.monotonic() - t0:,.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
