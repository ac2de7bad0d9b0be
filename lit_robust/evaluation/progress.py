"""Progress bars for the long evaluations (tiers, AutoAttack, sanity checks, certification).

One rule everywhere: ``progress=True`` shows a tqdm bar on stderr, ``False`` hides it, ``None``
(the default) shows it only when stderr is a terminal, so logs, CI and captured output stay
clean. Code that runs inside a Lightning Trainer passes ``False``: the Trainer has its own bar.
"""

from __future__ import annotations

import sys
from typing import Optional

from tqdm import tqdm


def progress_enabled(progress: Optional[bool]) -> bool:
    """``progress`` itself, or (None) whether stderr is a terminal."""
    if progress is None:
        return sys.stderr is not None and sys.stderr.isatty()
    return bool(progress)


def progress_bar(progress: Optional[bool], desc: str, total: Optional[float] = None, unit: str = "it") -> tqdm:
    """A transient tqdm bar named ``desc`` on stderr (disabled, and silent, unless :func:`progress_enabled`)."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True,
                disable=not progress_enabled(progress))


def show_accuracy(bar: tqdm, accuracy: float, name: str = "acc") -> None:
    """Shows the running accuracy after the bar's counter, e.g. ``acc=45.0%``."""
    bar.set_postfix_str(f"{name}={accuracy:.1%}")
