"""What every benchmark prints: a table for people, then one JSON line for machines (its last line of output).

    python -m benchmarks.NAME --help

Benchmarks run as modules from the repository root, so they share this helper and need no import-path edits.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from typing import Callable

ALIGN_AND_WIDTH = re.compile(r"(?P<align>[<>^]?)(?P<width>\d*)")


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """Median wall-clock seconds of `repeats` calls of `run`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """`rows` as aligned text: one column per (header, key, format spec), e.g. ("median s", "median_s", ">10.3f").

    A spec's alignment and width apply to its header too."""
    def header(name: str, spec: str) -> str:
        layout = ALIGN_AND_WIDTH.match(spec)
        return format(name, (layout["align"] or ">") + layout["width"])

    lines = ["".join(header(name, spec) for name, _, spec in columns)]
    lines += ["".join(format(row[key], spec) for _, key, spec in columns) for row in rows]
    return "\n".join(lines)


def json_line(benchmark: str, **fields) -> str:
    """The machine-readable result: {"benchmark": name, ...fields} on one line."""
    return json.dumps({"benchmark": benchmark, **fields})
