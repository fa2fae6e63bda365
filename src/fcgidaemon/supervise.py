"""Supervision from the scoreboard: hung and slow requests, memory, the pool record, scaling.

A mixin of the manager: these run from its loop on every tick and read what the
workers wrote to shared memory; none of them waits for a worker.
"""

from __future__ import annotations

import logging
import os
import signal
import socket

from . import listenq, logs, worker
from .scoreboard import SlotState
from .states import WState

log = logging.getLogger("fcgidaemon")

BALANCE_PAUSE = 0.5  # seconds between two requests to the same worker to give connections back
ADOPT_SETTLE = 0.1  # seconds an idle worker is given to take in connections passed to it


class Supervision:
    """Manager methods that act on what the scoreboard shows."""

    def _check_requests(self, now: float) -> None:
        """--slow-log: dump the stack once; --timeout: dump it, then kill the worker."""
        for rec in list(self.workers.values()):
            if rec.kill_at is not None:
                if now >= rec.kill_at:  # killed: never again, and never counted again while its
                    rec.kill_at = float("inf")  # record still says busy until it is reaped
                    self._kill(rec, signal.SIGKILL)
                continue
            slot = self.board.read(rec.board_index)
            busy = slot.busy_for(now)
            if not busy:
                continue
            what = f"{slot.method} {slot.uri}"
            if self.config.timeout and busy > self.config.timeout:
                log.error("worker %d timed out: busy %.1fs on %s (--timeout %g); stack follows, "
                          "then SIGKILL", rec.pid, busy, what, self.config.timeout)
                self.pool.timeouts += 1
                self._kill(rec, signal.SIGUSR1)
                rec.kill_at = now + 0.2
                if rec.state is not WState.RETIRING:
                    rec.move(WState.RETIRING)  # its replacement starts now
            elif self.config.slow_log and busy > self.config.slow_log and rec.slow_logged != slot.busy_since:
                rec.slow_logged = slot.busy_since
                self.pool.slow += 1
                log.warning("slow request: worker %d busy %.1fs on %s; stack follows", rec.pid, busy, what)
                self._kill(rec, signal.SIGUSR1)

    def _publish(self) -> None:
        """Write the pool record: what every worker's status page shows."""
        pool = self.pool
        pool.generation, pool.target, pool.phase = self.serving, self.target, self.phase.value
        queued = [q for q in (listenq.queue_length(lst.sock) for lst in self.listeners) if q]
        pool.listen_queue = sum(q[0] for q in queued)
        pool.listen_queue_max = max(pool.listen_queue_max, pool.listen_queue)
        if queued:  # the kernel's: --backlog capped by net.core.somaxconn, or systemd's Backlog=
            pool.backlog = sum(q[1] for q in queued)
        serving = [w for w in self.workers.values()
                   if w.generation == self.serving and w.state is WState.READY]
        busy = bool(serving) and all(self.board.read(w.board_index).state is SlotState.BUSY
                                     for w in serving)
        if busy and not self.all_busy_now:
            pool.all_busy += 1
        self.all_busy_now = busy
        self.board.write_pool(pool)

    def _balance(self, now: float) -> None:
        """Even out kept connections: the worker holding the most hands half its lead over the
        one holding the fewest back; `_pass_on` gives each to the worker holding the fewest
        at that moment. A web server opens its kept connections in a burst and they stay where
        they were accepted, so without this one worker can serve twice its share while
        another idles, and the requests on its connections wait behind each other."""
        serving = [w for w in self.workers.values()
                   if w.state is WState.READY and w.generation == self.serving and not w.replace]
        held = {w.pid: self.board.conns(w.board_index) for w in serving}
        # idle, and reading its channel: not one stopped with what we passed it unread
        idle = {w.pid for w in serving
                if self.board.read(w.board_index).state is SlotState.IDLE and not self._stuck(w)}
        for rec in serving:
            # what we passed an idle worker shows in its count once it has had a moment to take
            # it in (one message per poll; reset at once, an idle worker still taking in four
            # counted as holding none, and the crowded one was asked for more); a busy one takes
            # them in only after its request
            if rec.pid in idle and now - rec.passed_at > ADOPT_SETTLE:
                rec.adopting = 0
        if len(serving) < 2:
            return
        most = max(serving, key=lambda w: held[w.pid])
        # only towards an idle worker: a connection given to one stuck in a long request waits
        # behind it (7 of 7 did, 5 s each, while the other worker idled)
        takers = [held[w.pid] + w.adopting for w in serving if w is not most and w.pid in idle]
        lead = held[most.pid] - min(takers, default=held[most.pid])
        if lead < 2 or now - most.balance_asked < BALANCE_PAUSE:
            return
        if most.balance_pending:
            # the last ask waits unread (it reads its channel between turns, and a turn may run
            # many requests) or unanswered: asks piled up behind it each moved connections
            # again, on counts from before the first (all 8 went to the other worker, then
            # 3 came back)
            return
        most.balance_asked = now
        most.balance_pending = True
        log.debug("worker %d holds %d kept connections, %d more than the fewest; asking for %d "
                  "back", most.pid, held[most.pid], lead, lead // 2)
        try:
            most.channel.send(worker.MSG_BALANCE + b" %d" % (lead // 2), socket.MSG_DONTWAIT)
        except OSError as exc:  # its channel is full or gone: a later turn asks again
            most.balance_pending = False
            log.debug("cannot ask worker %d to give connections back: %s", most.pid, exc)

    def _scale(self, now: float) -> None:
        """Dynamic mode: one worker more while requests wait or all are busy; retire the
        highest slot after --idle-timeout idle. Decisions come from the scoreboard."""
        low, high = max(1, self.config.min_workers), self.config.max_workers
        mine = [w for w in self.workers.values() if w.generation == self.serving
                and w.state is not WState.RETIRING]
        if any(w.state is WState.STARTING for w in mine):
            return  # one step at a time: let the last one start
        slots = {w.slot: (w, self.board.read(w.board_index)) for w in mine}
        idle = [s for _, s in slots.values() if s.state is SlotState.IDLE]
        if (self.pool.listen_queue > 0 or not idle) and self.target < high:
            self.target += 1
            log.info("scaling up to %s (listen queue %d, %d idle)", logs.workers(self.target),
                     self.pool.listen_queue, len(idle))
            self._title()
            return
        top = slots.get(self.target - 1)
        if self.target > low and top is not None and top[1].state is SlotState.IDLE:
            rec, slot = top
            idle_since = max(rec.started, slot.busy_since + slot.last_duration)
            if now - idle_since > self.config.idle_timeout and len(idle) > 1:
                self.target -= 1
                log.info("scaling down to %s (worker %d idle %.0fs)", logs.workers(self.target), rec.pid,
                         now - idle_since)
                self._retire(rec)
                self._title()

    def _check_memory(self) -> None:
        limit = self.config.max_memory * 1024 * 1024
        page = os.sysconf("SC_PAGE_SIZE")
        for rec in list(self.workers.values()):
            if rec.state is not WState.READY or rec.replace:
                continue
            try:
                with open(f"/proc/{rec.pid}/statm") as fh:
                    rss = int(fh.read().split()[1]) * page
            except (OSError, ValueError, IndexError):
                continue
            if rss > limit:
                self._mark_for_replacement(rec, f"uses {rss >> 20} MB (--max-memory {self.config.max_memory})")
