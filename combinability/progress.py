"""One progress-bar style for training, alignment and sweeps.

Every long loop of the library shows its progress through :func:`progress_bar`: the same
look everywhere, and by default only on a terminal (a log file or a CI job gets no bar).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = ["progress_bar", "BAR_FORMAT"]

#: ``desc: 42%|████     | 21/50 [00:03<00:04, 6.1 step/s, loss=0.3]``; tqdm's default layout,
#: fixed here so that a change of tqdm's default does not make the library's bars differ.
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
_BAR_FORMAT_NO_TOTAL = "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}{postfix}]"


def progress_bar(total: int | None, desc: str, unit: str, enabled: bool) -> tqdm:
    """A progress bar in the library's one style, written to standard error.

    Parameters
    ----------
    total : int or None
        Number of steps; ``None`` when unknown (a counter without a bar).
    desc : str
        What is running, e.g. ``"train mlp"``, ``"weight matching"``, ``"sweep subcube"``.
    unit : str
        What one step is, e.g. ``"step"``, ``"sweep"``, ``"eval"``.
    enabled : bool
        ``False``: no bar at all. ``True``: a bar on a terminal only (tqdm's ``disable=None``),
        so that log files and CI output stay free of bar redraws.

    Returns
    -------
    tqdm.tqdm
        Use it as a context manager, or call ``close()`` when done; it does not stay on
        screen after closing (``leave=False``).
    """
    from tqdm.auto import tqdm

    fmt = BAR_FORMAT if total is not None else _BAR_FORMAT_NO_TOTAL
    return tqdm(total=total, desc=desc, unit=unit, disable=None if enabled else True, leave=False,
                file=sys.stderr, dynamic_ncols=True, bar_format=fmt)
