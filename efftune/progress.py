"""Progress on stderr for everything that can take more than a few seconds: downloads, the
BIG-bench index, dequantising the default model, evaluations, training steps.

Bars are tqdm's, on stderr, so stdout keeps only results (the CLI's last line is JSON).
`TQDM_DISABLE=1` in the environment turns every bar off (tqdm reads `TQDM_*` variables); the
one-line notes (`note`) stay.
"""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

# Bars of work that is usually quick (an evaluation of a few examples) appear only once it has
# run this long, so fast calls (tests, LoraHub's many small evaluations) print nothing.
QUIET_SECONDS = 1.0


def progress_bar(total: float | None = None, desc: str = "", unit: str = "it", *, leave: bool = True,
                 enable: bool = True, delay: float = 0.0, **kwargs) -> tqdm:
    """A tqdm bar on stderr; `enable=False` gives a disabled one (every call on it does nothing)."""
    if not enable:  # else `disable` stays unset, so that TQDM_DISABLE can still turn it off
        kwargs["disable"] = True
    return tqdm(total=total, desc=desc, unit=unit, leave=leave, delay=delay, file=sys.stderr, dynamic_ncols=True,
                **kwargs)


def note(message: str) -> None:
    """One line on stderr that does not tear an open bar."""
    tqdm.write(message, file=sys.stderr)


class SideTime:
    """Time spent off a bar's own work, e.g. evaluations between training steps. Inside
    `with side_time:` the bar's clock stands still, so its rate and time estimate count the steps
    only (tqdm's would otherwise jump after every evaluation); `seconds` adds the time up for a
    postfix of its own."""

    def __init__(self, bar: tqdm):
        self.bar, self.seconds = bar, 0.0

    def __enter__(self) -> "SideTime":
        self._t0 = self._clock()
        return self

    def _clock(self) -> float:
        return getattr(self.bar, "_time", time.time)()  # the bar's own clock (tqdm's is time.time)

    def __exit__(self, *exc) -> None:
        spent = self._clock() - self._t0
        self.seconds += spent
        if not self.bar.disable:  # move the bar's start and last update forward by the time spent
            self.bar.start_t += spent
            self.bar.last_print_t += spent

    def postfix(self, name: str = "eval") -> dict[str, str]:
        """`{name: "25s"}` once any time was spent, else nothing."""
        return {name: f"{self.seconds:.0f}s"} if self.seconds else {}
