"""Whole-folder atomic output: a folder is written under a temporary name and renamed when complete, so a
crash or a refused input never leaves a half-written folder under the final name."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class InteropError(ValueError):
    """Input or output that export/import must refuse; the message names the problem and the fix."""


@contextmanager
def staged_folder(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; on success it replaces `final`, on error it is removed.

    An existing `final` is refused unless `overwrite`; then it is swapped out only once the new one is complete.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise InteropError(f"{final} already exists; choose another --out or pass --overwrite")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
