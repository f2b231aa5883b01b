"""Turn SIGTERM (preemption, `scancel`) and Ctrl-C into a request the loop honours at a step boundary."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

logger = logging.getLogger(__name__)


class StopRequest:
    """Context manager: while active, SIGTERM / SIGINT set `requested` instead of killing the process;
    the loop then saves a checkpoint and returns. A second Ctrl-C gets the default behaviour back."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("Received %s: saving a checkpoint at the end of this step, then stopping.",
                       signal.Signals(signum).name)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
