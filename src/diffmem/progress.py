"""Progress bars: tqdm behind one switch for the whole command line.

Library functions keep their own `progress` flags; the command line can still turn every bar off at once
(`-q/--quiet`, `--no-progress`, or standard error not a terminal: `diffmem.cli.main` calls `set_bars(False)`).
tqdm's own TQDM_DISABLE cannot do this: a caller's explicit `disable=False` wins over it.
"""

from __future__ import annotations

from tqdm import tqdm

#: Whether bars may show at all (the command line's switch).
SWITCH = {"bars": True}


def set_bars(enabled: bool) -> None:
    """Allow progress bars (the default) or turn every one off."""
    SWITCH["bars"] = enabled


def progress_bar(*args, disable: bool = False, **kwargs) -> tqdm:
    """`tqdm(*args, **kwargs)`, disabled when `disable` is true or bars are switched off."""
    return tqdm(*args, disable=disable or not SWITCH["bars"], **kwargs)
