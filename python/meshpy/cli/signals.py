"""Signals for the commands that serve until stopped."""

from __future__ import annotations

import signal
import threading

__all__ = ["stop_on_sigterm"]


def stop_on_sigterm() -> None:
    """SIGTERM ends the process as Ctrl-C does: through `finally` blocks, so announcements
    are withdrawn, sessions closed and child processes stopped."""

    def handler(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
