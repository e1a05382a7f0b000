"""A graceful stop: SIGINT (Ctrl-C) or SIGTERM (a cluster's preemption notice) finishes the current
iteration, writes a checkpoint and exits, so the same command resumes exactly. A second signal
stops at once (the last checkpoint stays the resume point)."""

from __future__ import annotations

import logging
import signal
import threading

logger = logging.getLogger("dino_bridge")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    """Context manager; ``requested`` turns true at the first SIGINT/SIGTERM."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:  # the second signal: give up at once
            self._restore()
            raise KeyboardInterrupt
        self.requested = True
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
