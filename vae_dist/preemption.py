"""Stop signals: SIGTERM (SLURM's `--signal=TERM@120` warning, `kill`) and SIGINT (Ctrl-C).

A handler only remembers the signal; the Trainer agrees on it at its next sync point (the
maximum over ranks), so every rank stops after the same step and writes one checkpoint.
"""

from __future__ import annotations

import signal


class StopSignal:
    """Remembers SIGTERM/SIGINT. `received` is this process's own; the loop acts only on
    `agreed`, which every rank sets at the same step."""

    def __init__(self):
        self.received = 0
        self.agreed = 0
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
