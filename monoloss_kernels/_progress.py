"""Progress bars for long passes over data: tqdm when it is installed (an optional
dependency), nothing otherwise."""

import sys
from collections.abc import Iterable


def progress_bar(iterable: Iterable, *, desc: str, enabled: bool | None = None, total: int | None = None,
                 unit: str = "batch") -> Iterable:
    """`iterable`, wrapped in a tqdm bar on stderr when `enabled` (None: when stderr is
    a terminal) and tqdm is importable."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True)
