"""The trainer's stop on a non-finite step: nothing learned from NaN or infinity is ever applied or saved.

A cache can pass every check and still drive a step to infinity (extreme but finite signals, a learning
rate far too high). The step is checked after its backward pass and before the optimizer applies it: a
non-finite loss or gradient norm stops the run with the step, its records and its sources named, and the
run folder keeps only what earlier, finite steps saved (no final model).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from cache_builder.untrusted import shown

RECORDS_SHOWN = 8


class NonFiniteStep(ValueError):
    """A training step whose loss or gradient is NaN or infinite."""


def stop_if_not_finite(step: int, loss: float, grad_norm: float, layers: dict[str, Path],
                       step_records: Callable[[], list[str]]) -> None:
    """NonFiniteStep naming the step, its record ids (`step_records()`, asked only then) and the sources if
    `loss` or `grad_norm` is not finite."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    record_ids = step_records()
    records = ", ".join(shown(r[:16]) for r in record_ids[:RECORDS_SHOWN])
    more = f" and {len(record_ids) - RECORDS_SHOWN} more" if len(record_ids) > RECORDS_SHOWN else ""
    sources = ", ".join(f"{shown(name)} ({shown(folder)})" for name, folder in layers.items())
    raise NonFiniteStep(
        f"step {step}: loss {loss} and gradient norm {grad_norm} are not both finite; stopped before applying it, "
        f"no final model saved. Records {records}{more}; sources {sources}. Check these records in the caches "
        "(cache-verify --deep) or lower --lr"
    )
