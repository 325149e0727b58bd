"""A deterministic simulator for the election core (`sidecar/election.py`).

`python -m tests.sim --help` runs it from the command line; `tests/test_simulation.py`
runs thousands of seeds of it. See `cluster.py` for the invariants and `scenarios.py` for
the scenarios and the recovery bound.
"""

from .cluster import InvariantViolation, Simulation
from .scenarios import SCENARIOS, Outcome, percentiles, recovery_bound, run

__all__ = [
    "SCENARIOS",
    "InvariantViolation",
    "Outcome",
    "Simulation",
    "percentiles",
    "recovery_bound",
    "run",
]
