"""Connections passed between workers through the manager (a mixin of the manager).

A retiring worker's kept connections go to the new generation, a crowded worker's to an idle
one (the balance), an old manager's to us after an upgrade. A kept connection may have a
request waiting in it, and a connection closed on the way lost that request (the web server
saw a reset or an early end: 502). So one is closed only when no worker is left to serve it:

* passed to a worker that never read it (it died, was killed at --timeout, or left just
  after its last look at its channel), it is taken back when that worker is reaped: the
  manager keeps the worker's end of the channel open (`inbox`), so what waits there unread
  outlives the worker instead of being closed with it;
* with no ready worker to take it (every one of them died at once), it waits here until one
  is ready, for at most --ready-timeout;
* during a graceful stop, a worker still finishing takes it in and serves what waits on it
  before leaving.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import time
from typing import TYPE_CHECKING

from . import control, sockets, worker
from .fastcgi import SIOCINQ, queued
from .scoreboard import SlotState
from .states import ENDING, Phase, WorkerRecord, WState
from .supervise import ADOPT_SETTLE

if TYPE_CHECKING:
    from .manager import Manager

log = logging.getLogger("fcgidaemon")

ROOM_UNKNOWN = 1 << 30  # room of a worker whose limit we cannot read


class HandOver:
    """Manager state and methods for passing connections on."""

    parked: list[tuple[int, float]]  # (connection, when) held until a worker is ready to take it

    def _init_handover(self) -> None:
        self.parked = []

    def parked_fds(self) -> list[int]:
        return [fd for fd, _ in self.parked]

    def _pass_on(self: "Manager", fds: list[int], source: WorkerRecord | None) -> None:
        """Give connections to the worker that will serve them soonest; `source`, the worker
        they came from, only when no other can take them."""
        if not fds:
            return
        other = self._other_manager()
        if other is not None:
            self._pass_to_manager(other, fds)
            return
        target = self._taker(source, len(fds))
        if target is None and self.phase not in ENDING:
            self._park(fds)
            return
        if target is None:
            log.warning("no worker left to take %d connection(s); closing them", len(fds))
            close_all(fds)
            return
        sent = 0
        try:
            for sent in range(0, len(fds), worker.FDS_PER_MESSAGE):
                socket.send_fds(target.channel, [worker.MSG_ADOPT],
                                fds[sent:sent + worker.FDS_PER_MESSAGE])
            sent = len(fds)
        except OSError as exc:
            log.warning("cannot pass %d connection(s) to worker %d: %s", len(fds) - sent,
                        target.pid, exc)
        finally:
            close_all(fds)
        if sent:
            target.adopting += sent
            target.passed_at = time.monotonic()
            log.debug("passed %d connection(s) to worker %d", sent, target.pid)

    def _other_manager(self: "Manager") -> int | None:
        """The manager our connections go to instead of our workers: the new one, once it has
        taken over (an upgrade); or the old one, if we stop before the upgrade that started us
        completed (it failed): the old one serves on, and its web servers' kept connections
        that our workers had taken are its again rather than closed."""
        if self.phase is Phase.RETIRED and self.upgrade is not None:
            return self.upgrade.pid
        if self.phase is Phase.STOPPING and self.predecessor is not None and not self.took_over:
            return self.predecessor
        return None

    def _pass_to_manager(self: "Manager", pid: int, fds: list[int]) -> None:
        """To manager `pid`, which passes them on in turn (it reads as many descriptors per
        command as a worker does per message)."""
        try:
            for start in range(0, len(fds), worker.FDS_PER_MESSAGE):
                control.send_fds(pid, "adopt", fds[start:start + worker.FDS_PER_MESSAGE])
        except (OSError, control.ControlError) as exc:  # gone (ControlError: no socket left)
            log.warning("cannot pass %d connection(s) to manager %d: %s; closing them", len(fds), pid, exc)
        else:
            log.debug("passed %d connection(s) to manager %d", len(fds), pid)
        finally:
            close_all(fds)

    def _taker(self: "Manager", source: WorkerRecord | None, need: int = 1) -> WorkerRecord | None:
        """A ready worker of the serving generation other than `source`; else `source` itself
        (a balance hand-back that found no other worker ready: back to the one that sent
        them). Stopping gracefully, else any worker still finishing (one of a generation a
        reload retired included): each serves what waits on what it takes in before it
        leaves, and one that leaves first has them taken back. Quitting: none. Never one
        without room for `need` more descriptors (`_room`)."""
        if self.phase is Phase.QUITTING:
            return None
        ready = [w for w in self.workers.values()
                 if w.state is WState.READY and w.generation == self.serving]
        targets = [w for w in ready if w is not source]
        if not targets and self.phase is Phase.STOPPING:
            finishing = [w for w in self.workers.values() if w.state is not WState.STARTING]
            targets = [w for w in finishing if w is not source] or finishing
        elif not targets and any(w is source for w in ready) and self.phase not in ENDING:
            targets = [source]  # type: ignore[list-item] - found among `ready`: not None
        for rec in sorted(targets, key=self._load):
            if self._room(rec) >= need:
                return rec
        return None

    @staticmethod
    def _room(rec: WorkerRecord) -> int:
        """How many more descriptors worker `rec` may open (its RLIMIT_NOFILE less those it
        has). Connections passed to a worker at its limit were dropped by the kernel as the
        message arrived (MSG_CTRUNC): the balancer, seeing an idle worker holding few (one
        that could not accept for want of descriptors), passed it 9 of 10 kept connections,
        each lost with its next request. Unknown (no permission): taken as room enough."""
        try:
            limit = resource.prlimit(rec.pid, resource.RLIMIT_NOFILE)[0]
            used = len(os.listdir(f"/proc/{rec.pid}/fd"))
        except OSError:
            return ROOM_UNKNOWN
        return ROOM_UNKNOWN if limit == resource.RLIM_INFINITY else limit - used

    def _load(self: "Manager", rec: WorkerRecord) -> tuple[bool, int, int, float]:
        """One reading its channel before one that is not (`_stuck`), idle before busy (a busy
        worker takes a connection in only after its request, and it may be a long one), then
        fewest kept connections (counting those just passed to it), then the one busy for the
        longest (likely to finish first)."""
        slot = self.board.read(rec.board_index)
        return (self._stuck(rec), 0 if slot.state is SlotState.IDLE else 1,
                slot.conns + rec.adopting, slot.busy_since)

    def _stuck(self, rec: WorkerRecord) -> bool:
        """Whether what we passed `rec` still waits unread in its channel (we hold its end:
        `inbox`) after the moment an idle worker takes to read it: a worker stopped (a
        debugger attached, SIGSTOP) or stuck. Its scoreboard record still says idle, holding
        none, so the balancer passed it connections every half second, each then waiting, its
        request with it, until the worker ran again. A busy worker reads only after its
        request: its `_load` puts it after the idle ones already."""
        if rec.inbox is None or time.monotonic() - rec.passed_at <= ADOPT_SETTLE:
            return False
        try:
            return queued(rec.inbox, SIOCINQ) > 0
        except OSError as exc:  # not expected on a socket we hold: said, and taken as read
            log.debug("cannot read worker %d's channel queue: %s", rec.pid, exc)
            return False

    def _take_back(self: "Manager", rec: WorkerRecord) -> None:
        """A worker has been reaped: the connections we passed it that it never read are in
        its end of the channel, which we kept open. Passed on, not closed with it."""
        inbox, rec.inbox = rec.inbox, None
        if inbox is None:
            return
        taken: list[int] = []
        try:
            inbox.setblocking(False)
            while True:
                try:
                    msg, fds = sockets.recv_fds(inbox, worker.MAX_MESSAGE, worker.FDS_PER_MESSAGE)
                except BlockingIOError:
                    break
                if not msg and not fds:
                    break
                if msg == worker.MSG_ADOPT:
                    taken += fds
                else:  # a retire or balance ask it did not live to read
                    close_all(fds)
        except OSError as exc:
            log.warning("cannot read what worker %d left unread: %s", rec.pid, exc)
        finally:
            inbox.close()
        if taken:
            log.info("worker %d left %d connection(s) passed to it unread; passing them on",
                     rec.pid, len(taken))
            self._pass_on(taken, rec)

    def _park(self, fds: list[int]) -> None:
        """Hold connections no worker can take now (see `_unpark`, `_expire_parked`)."""
        now = time.monotonic()  # (close-on-exec as received: sockets.recv_fds; and kept out of
        self.parked += [(fd, now) for fd in fds]  # forked workers by their close list, _spawn)
        log.warning("no ready worker (with descriptors to spare) to take %d connection(s); "
                    "holding them until one is ready",
                    len(fds))

    def _unpark(self: "Manager") -> None:
        """A worker is ready, or the manager is stopping: the held connections go on (not
        to a new generation's first ready worker while its reload runs: held on, as before)."""
        if self.parked and (self.phase in ENDING or self._taker(None) is not None):
            fds = self.parked_fds()
            self.parked.clear()
            self._pass_on(fds, None)

    def _expire_parked(self: "Manager", now: float) -> None:
        """Held longer than --ready-timeout with no worker ready: closed, said once a batch."""
        expired = [fd for fd, since in self.parked if now - since > self.config.ready_timeout]
        if expired:
            log.warning("no worker ready within %gs to take %d connection(s); closing them",
                        self.config.ready_timeout, len(expired))
            self.parked = [(fd, since) for fd, since in self.parked if fd not in expired]
            close_all(expired)


def close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError as exc:  # EBADF would be our bug: said, not hidden
            log.warning("cannot close a passed connection: %s", exc)
