"""Supervision from the scoreboard: hung and slow requests, memory, the pool record, scaling.

A mixin of the manager: these run from its loop on every tick and read what the
workers wrote to shared memory; none of them waits for a worker.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections import deque
from dataclasses import dataclass, field

from . import listenq, logs, worker
from .scoreboard import Slot, SlotState
from .states import WState

log = logging.getLogger("fcgidaemon")

BALANCE_PAUSE = 0.5  # seconds between two requests to the same worker to give connections back
ADOPT_SETTLE = 0.1  # seconds an idle worker is given to take in connections passed to it
SCALE_UP_WINDOW = 0.5  # dynamic mode: seconds of load looked at before adding a worker
SCALE_UP_BUSY = 0.9  # ... and the share of that time the workers were busy, at least
SCALE_DOWN_BUSY = 0.5  # retire one when the rest would have been busy at most this share


@dataclass
class LoadMeter:
    """How busy the serving workers were, over time: the busy seconds of all of them (from each
    one's duration_sum and the request it is running), against the worker-seconds there were.
    Dynamic mode decides from this, not from a look at who is idle at one moment: a single
    client sending one request at a time was seen with its request waiting in the listen
    queue or no worker idle in one look in a few, and grew the pool to --max-workers, 5 of 6
    idle; and with kept connections spread over every worker, the highest one was never idle
    for --idle-timeout, so a burst fixed the pool at its peak for good."""

    keep: float = 10.0  # seconds of samples kept: the longest window asked about
    seen: dict[int, float] = field(default_factory=dict)  # pid: its busy seconds at the last look
    busy: float = 0.0  # busy seconds of the serving workers since the meter started
    capacity: float = 0.0  # worker-seconds since then
    last: float | None = None
    samples: deque = field(default_factory=deque)  # (when, busy, capacity), oldest first

    def look(self, now: float, slots: list[Slot], workers: int) -> None:
        if self.last is not None and now - self.last > 1.0:
            self.reset()  # not looked for a while (a reload in between): what was seen is stale
        seen = {}
        for slot in slots:
            seen[slot.pid] = total = slot.duration_sum + slot.busy_for(now)
            before = self.seen.get(slot.pid)
            if before is not None and total > before:
                self.busy += total - before
        self.seen = seen  # workers gone are forgotten
        if self.last is not None:
            self.capacity += workers * (now - self.last)
        self.last = now
        self.samples.append((now, self.busy, self.capacity))
        while len(self.samples) > 1 and self.samples[1][0] <= now - self.keep:
            self.samples.popleft()

    def share(self, now: float, window: float) -> float | None:
        """The share of the worker-seconds of the last `window` seconds spent busy; None
        until the meter has looked over that long (since it started or was reset)."""
        start = None
        for sample in self.samples:  # the last look at least `window` ago
            if sample[0] > now - window:
                break
            start = sample
        if start is None or self.capacity <= start[2]:
            return None
        return (self.busy - start[1]) / (self.capacity - start[2])

    def reset(self) -> None:
        """After a change of the worker count: decisions look at the new pool only."""
        self.samples.clear()
        self.last = None


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
        takers = [held[w.pid] + w.adopting for w in serving if w is not most and w.pid in idle
                  and self._room(w) > 0]  # (/proc reads: only for an idle one)
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
        """Dynamic mode: one worker more when the workers were busy nearly all of the last
        SCALE_UP_WINDOW; retire the highest slot when, over the last --idle-timeout, one
        fewer would have been busy at most SCALE_DOWN_BUSY of the time."""
        low, high = max(1, self.config.min_workers), self.config.max_workers
        mine = [w for w in self.workers.values() if w.generation == self.serving
                and w.state is not WState.RETIRING]
        if any(w.state is WState.STARTING for w in mine):
            self.load.reset()  # one step at a time: let the last one start
            return
        slots = {w.slot: (w, self.board.read(w.board_index)) for w in mine}
        self.load.look(now, [slot for _, slot in slots.values()], len(mine))
        busy = self.load.share(now, SCALE_UP_WINDOW)
        if busy is not None and busy >= SCALE_UP_BUSY and self.target < high:
            self.target += 1
            self.load.reset()
            log.info("scaling up to %s (busy %.0f%% of the last %gs, listen queue %d)",
                     logs.workers(self.target), busy * 100, SCALE_UP_WINDOW, self.pool.listen_queue)
            self._title()
            return
        top = slots.get(self.target - 1)
        busy = self.load.share(now, self.config.idle_timeout)
        if self.target > low and top is not None and busy is not None \
                and busy * len(mine) <= SCALE_DOWN_BUSY * (len(mine) - 1):
            rec = top[0]
            self.target -= 1
            self.load.reset()
            log.info("scaling down to %s (busy %.0f%% of the last %gs; worker %d retires)",
                     logs.workers(self.target), busy * 100, self.config.idle_timeout, rec.pid)
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
