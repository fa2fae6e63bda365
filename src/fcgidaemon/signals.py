"""Signals become events: the handlers only record, the main loop does the work.

A handler appends the signal number to a queue and `signal.set_wakeup_fd` wakes
the loop's selector.  No other code runs inside a handler, so a signal can never
interrupt the manager half-way through changing its worker table.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
from types import FrameType
from typing import Iterable


class SignalQueue:
    """Records signals and wakes a selector; `drain` hands them to the loop in order."""

    def __init__(self, signums: Iterable[int]) -> None:
        self._pending: collections.deque[int] = collections.deque()
        self._reader, self._writer = socket.socketpair()
        for end in (self._reader, self._writer):
            end.setblocking(False)
        self._old_wakeup = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        self.signums = tuple(signums)
        for signum in self.signums:
            signal.signal(signum, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self._pending.append(signum)

    def fileno(self) -> int:
        return self._reader.fileno()

    def drain(self) -> list[int]:
        """The signals received since the last call, oldest first."""
        try:
            while self._reader.recv(4096):
                pass
        except BlockingIOError:
            pass
        out = []
        while self._pending:
            out.append(self._pending.popleft())
        return out

    def pending(self) -> tuple[int, ...]:
        """The signals received and not drained yet (they stay queued)."""
        return tuple(self._pending)

    def fds(self) -> tuple[int, int]:
        return self._reader.fileno(), self._writer.fileno()

    def close(self) -> None:
        """Restore default dispositions (used in a freshly forked child)."""
        signal.set_wakeup_fd(-1)
        for signum in self.signums:
            signal.signal(signum, signal.SIG_DFL)
        self._reader.close()
        self._writer.close()


def name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def describe_status(status: int) -> str:
    """Human form of a wait status: 'exit 0', 'killed by SIGKILL'."""
    if os.WIFSIGNALED(status):
        return f"killed by {name(os.WTERMSIG(status))}"
    return f"exit {os.waitstatus_to_exitcode(status)}"
