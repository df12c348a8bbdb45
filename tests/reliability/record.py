"""What the reliability tests did, appended as JSON lines to $STEPQUANT_RELIABILITY_LOG (when set) for
`benchmarks/reliability.py` to turn into RELIABILITY.md."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager

LOG = os.environ.get("STEPQUANT_RELIABILITY_LOG")


def record(kind: str, name: str, **facts) -> None:
    if LOG:
        with open(LOG, "a") as f:
            f.write(json.dumps({"kind": kind, "name": name, **facts}) + "\n")


class Tally:
    """Counts fuzz cases and how each ended; the slowest case's time."""

    def __init__(self) -> None:
        self.cases = 0
        self.rejected = 0  # a StepquantError: refused with the one-line message
        self.accepted = 0
        self.slowest = 0.0

    @contextmanager
    def case(self):
        from stepquant.errors import StepquantError

        t0 = time.perf_counter()
        self.cases += 1
        try:
            yield
            self.accepted += 1
        except StepquantError as exc:
            assert str(exc) and "\n" not in str(exc)
            self.rejected += 1
        finally:
            self.slowest = max(self.slowest, time.perf_counter() - t0)
