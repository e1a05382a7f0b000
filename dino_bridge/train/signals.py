"""A graceful stop: SIGINT (Ctrl-C) or SIGTERM (a cluster's preemption notice) finishes the current
iteration, writes a checkpoint and exits, so the same command resumes exactly. A second signal
stops at once (the last checkpoint stays the resume point).

The exit code says how the run ended (the shell's convention, 128 + the signal number): 130 after
SIGINT, 143 after SIGTERM — in both cases, for a graceful stop, after its checkpoint — so a
script or scheduler can requeue the same command. ``exit_code_for`` maps a signal number to it."""

from __future__ import annotations

import logging
import signal
import threading

logger = logging.getLogger("dino_bridge")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code_for(signum: int) -> int:
    """130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signum)


class StoppedAtOnce(KeyboardInterrupt):
    """A second signal arrived: the run stops without a new checkpoint."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


class GracefulStop:
    """Context manager; ``requested`` turns true at the first SIGINT/SIGTERM, ``signum`` names it."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:  # the second signal: give up at once
            self._restore()
            raise StoppedAtOnce(signum)
        self.requested = True
        self.signum = int(signum)
        logger.warning(
            "%s received: stopping after this iteration with a checkpoint (send it again to stop now)",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __exit__(self, *exc) -> None:
        self._restore()
