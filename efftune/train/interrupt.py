"""Ctrl-C and SIGTERM during training: finish the step, write a checkpoint, then stop.

`StopSignals` turns the first SIGINT/SIGTERM into a request the training loop reads at each step
boundary; a second one stops at once. `RunInterrupted` is what the run raises then: a
KeyboardInterrupt (so code that handles Ctrl-C handles it) with the exit code the shell expects
(128 + signal number: 130 for SIGINT, 143 for SIGTERM) and a message that says what was kept.
"""
from __future__ import annotations

import signal
import sys
import threading


class RunInterrupted(KeyboardInterrupt):
    """`checkpoint`: the one the training loop wrote on its way out (None: it wrote none)."""

    def __init__(self, message: str, signum: int = signal.SIGINT, checkpoint=None):
        super().__init__(message)
        self.signum = int(signum)
        self.checkpoint = checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Within `with StopSignals() as stop:` SIGINT and SIGTERM set `stop.signum` (first one) and
    raise RunInterrupted (second one); the previous handlers are back afterwards. Outside the main
    thread (where Python cannot install handlers) it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise RunInterrupted("stopped at once by a second signal; the last checkpoint written is kept",
                                 signum)
        self.signum = signum
        print(f"\nefftune: {signal.Signals(signum).name} received: finishing this step and writing a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
