"""The scoreboard: shared memory mapped before the fork, one writer per record, no locks.

* one *worker record* per worker: its own writes at the start and end of every
  request (state, current request, counters, a duration histogram);
* one *pool record*, written only by the manager from its loop: generation,
  reloads, listen queue, and the totals of workers that have exited.

The manager never waits for a worker to report: a hung worker's record keeps
saying "busy since T", which is how `--timeout` and `--slow-log` find it, and any
worker can answer the status page by reading the whole board.  Times are
CLOCK_MONOTONIC (shared by all processes) except the pool's start time.

The manager's writes (the pool record, and folding an exited worker's counters
into it) are bracketed by a sequence number, odd while they are under way, so a
reader can take a `consistent` view: without it, a status page read while a
worker's record was folded missed that worker's requests, and the totals, which
Prometheus takes as counters, went backwards (349 times in 7,468 reads with
workers replaced every 3 requests).
"""

from __future__ import annotations

import bisect
import errno
import mmap
import re
import struct
import time
from dataclasses import dataclass, field
from enum import IntEnum

try:
    from ._speedups import board_finished as _c_finished, board_started as _c_started
except ImportError:  # built without a C compiler (setup.py: optional): the Python writes below
    _c_finished = _c_started = None

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # + Inf
NB = len(BUCKETS) + 1

# pid, generation, state, kept connections, requests, accepted, busy_since, method, uri,
# last_duration, duration_sum, histogram counts; every 8-byte field at a multiple of 8 (see
# _Fields), 256 bytes in all
RECORD = struct.Struct(f"=iiBxH4xQQd8s96sdd{NB}Q")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _shown(raw: bytes) -> str:
    """A request's method or path as the status page and `fcgidaemon status` show it: its bytes
    as UTF-8 (the web server's raw bytes; shown as latin-1, "café" read "cafÃ©"), a byte
    that is not UTF-8 (or a character the 96-byte cut split) as \\xhh, and no control
    character: a newline in a path wrote rows of its own into the text page."""
    text = raw.rstrip(b"\0").decode("utf-8", "backslashreplace")
    return text if text.isprintable() else _CONTROL.sub(lambda m: "\\x%02x" % ord(m.group()), text)


class BoardFull(OSError):
    """No record left for one more worker: like a process limit, the worker cannot start."""


CAPACITY = 1024  # records: config.MAX_WORKERS workers in each of two generations, and stragglers

# start_time(unix), manager_pid, generation, target, phase, reloads_ok, reloads_failed, requests of
# exited workers, accepted of exited workers, listen_queue, listen_queue_max, backlog, all_busy,
# slow, timeouts, duration_sum of exited workers, last_failure, histogram of exited workers;
# padded so that the records after it start at a multiple of 8
POOL = struct.Struct(f"=diiiIIIQQIIIQQQd200s{NB}Q4x")


class SlotState(IntEnum):
    FREE = 0
    STARTING = 1
    IDLE = 2
    BUSY = 3
    RETIRING = 4


@dataclass(frozen=True)
class Slot:
    index: int
    pid: int
    generation: int
    state: SlotState
    conns: int  # connections held open between requests (kept by the web server)
    requests: int
    accepted: int
    busy_since: float
    method: str
    uri: str
    last_duration: float
    duration_sum: float
    histogram: tuple[int, ...]

    def busy_for(self, now: float | None = None) -> float:
        if self.state is not SlotState.BUSY:
            return 0.0
        return (time.monotonic() if now is None else now) - self.busy_since


@dataclass
class Pool:
    start_time: float = 0.0
    manager_pid: int = 0
    generation: int = 0
    target: int = 0
    phase: str = ""
    reloads_ok: int = 0
    reloads_failed: int = 0
    requests_exited: int = 0
    accepted_exited: int = 0
    listen_queue: int = 0
    listen_queue_max: int = 0
    backlog: int = 0
    all_busy: int = 0
    slow: int = 0
    timeouts: int = 0
    duration_sum_exited: float = 0.0
    last_failure: str = ""
    histogram_exited: list[int] = field(default_factory=lambda: [0] * NB)


PHASES = ("starting", "running", "reloading", "stopping", "quitting", "retired")


def _pool_bytes(pool: Pool) -> bytes:
    return POOL.pack(pool.start_time, pool.manager_pid, pool.generation, pool.target,
                     PHASES.index(pool.phase) if pool.phase in PHASES else 0,
                     pool.reloads_ok, pool.reloads_failed, pool.requests_exited, pool.accepted_exited,
                     pool.listen_queue, pool.listen_queue_max, pool.backlog, pool.all_busy, pool.slow,
                     pool.timeouts, pool.duration_sum_exited,
                     pool.last_failure.encode("utf-8", "replace")[:200], *pool.histogram_exited)


# offsets inside a worker record, for the small writes on the request path
_OFF_STATE = 8
_OFF_CONNS = 10
_OFF_REQUESTS = 16
_OFF_ACCEPTED = 24
_OFF_BUSY = 32
_OFF_METHOD = 40
_OFF_URI = 48
_OFF_LAST = 144
_OFF_SUM = 152
_OFF_HIST = 160


SEQ = struct.Struct("=Q")  # at offset 0; the pool record follows, then the worker records
_POOL_AT = SEQ.size
CONSISTENT_TRIES = 100  # at 1 ms apart
_RECORDS_AT = _POOL_AT + POOL.size
assert RECORD.size % 8 == 0 and _RECORDS_AT % 8 == 0, "8-byte fields must stay aligned"


class _Fields:
    """The board seen as arrays of 8-byte unsigned ints, 8-byte floats and 2-byte unsigned ints,
    for a worker's writes to its own record: `q[i] = n` is one store of the whole field.
    struct.pack_into, which these replace, clears the bytes it packs into before writing them,
    so a status page copying the board in between read a live worker's counter as 0 and the
    totals went backwards; an 8-byte field at an address that is a multiple of 8 is also never
    split between two cache lines, so a copy sees it old or new, never half of each."""

    def __init__(self, mem: mmap.mmap) -> None:
        whole = memoryview(mem)
        self.q = whole.cast("Q")
        self.d = whole.cast("d")
        self.h = whole.cast("H")


class Scoreboard:
    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        size = _POOL_AT + POOL.size + RECORD.size * capacity
        self.mem = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self._fields = _Fields(self.mem)  # the mmap can no longer be closed: it lives as long as we do
        self._free = list(range(capacity - 1, -1, -1))

    def _base(self, index: int) -> int:
        return _RECORDS_AT + index * RECORD.size

    def _seq(self) -> int:
        return SEQ.unpack_from(self.mem, 0)[0]

    def _bump(self) -> None:
        SEQ.pack_into(self.mem, 0, self._seq() + 1)

    # ------------------------------------------------------------------ manager side

    def allocate(self, pid: int, generation: int) -> int:
        if not self._free:  # retiring generations still finishing, one reload after another
            raise BoardFull(errno.EAGAIN, f"all {self.capacity} worker records are in use")
        index = self._free.pop()
        RECORD.pack_into(self.mem, self._base(index), pid, generation, SlotState.STARTING,
                         0, 0, 0, 0.0, b"", b"", 0.0, 0.0, *([0] * NB))
        return index

    def set_pid(self, index: int, pid: int) -> None:
        struct.pack_into("=i", self.mem, self._base(index), pid)

    def release(self, index: int, pool: Pool) -> None:
        """Fold an exited worker's counters into the pool totals and free its record, as one
        change for readers (see `consistent`)."""
        slot = self.read(index)
        pool.requests_exited += slot.requests
        pool.accepted_exited += slot.accepted
        pool.duration_sum_exited += slot.duration_sum
        pool.histogram_exited = [a + b for a, b in zip(pool.histogram_exited, slot.histogram)]
        self._bump()
        self.mem[_POOL_AT:_POOL_AT + POOL.size] = _pool_bytes(pool)
        RECORD.pack_into(self.mem, self._base(index), 0, 0, SlotState.FREE, 0, 0, 0, 0.0, b"", b"",
                         0.0, 0.0, *([0] * NB))
        self._bump()
        self._free.append(index)

    def write_pool(self, pool: Pool) -> None:
        """The manager's loop calls this on every turn: only a change is written (each write
        makes a reader's consistent() start again)."""
        packed = _pool_bytes(pool)
        if self.mem[_POOL_AT:_POOL_AT + POOL.size] != packed:
            self._bump()
            self.mem[_POOL_AT:_POOL_AT + POOL.size] = packed
            self._bump()

    # ------------------------------------------------------------------ readers (anyone)

    def read(self, index: int, copy: bytes | None = None) -> Slot:
        values = RECORD.unpack_from(self.mem if copy is None else copy, self._base(index))
        pid, gen, state, conns, reqs, acc, since, method, uri, last, total = values[:11]
        return Slot(index, pid, gen, SlotState(state), conns, reqs, acc, since,
                    _shown(method), _shown(uri), last, total, tuple(values[11:]))

    def conns(self, index: int) -> int:
        """The kept connections a worker holds (cheaper than read() for the balancer)."""
        return self._fields.h[(self._base(index) + _OFF_CONNS) // 2]

    def consistent(self) -> tuple[Pool, list[Slot]]:
        """The pool record and every worker record as they were at one moment when the manager
        was changing neither (workers' own writes only ever raise their counters): a copy of the
        whole board, taken between two equal, even sequence numbers, then read at leisure.

        The copy is one memcpy, tens of microseconds. Reading the records in place took a
        millisecond or more under load, while a manager replacing workers every few requests
        changed the board more often than that: all CONSISTENT_TRIES attempts could fail, and
        the last reading, taken across a fold, counted a worker twice (totals then went
        backwards). After CONSISTENT_TRIES the last copy is still used: a status page must
        answer."""
        for _ in range(CONSISTENT_TRIES):
            before = self._seq()
            if before % 2 == 0:
                copy = self.mem[:]
                if self._seq() == before:
                    break
            time.sleep(0.001)  # the manager is between its two writes (maybe not running): wait
        else:
            copy = self.mem[:]
        return self.read_pool(copy), self.slots(copy)

    def read_pool(self, copy: bytes | None = None) -> Pool:
        values = POOL.unpack_from(self.mem if copy is None else copy, _POOL_AT)
        head = list(values[:16])
        head[4] = PHASES[head[4]] if head[4] < len(PHASES) else "?"
        failure = values[16].rstrip(b"\0").decode("utf-8", "replace")
        return Pool(*head, failure, list(values[17:]))

    def slots(self, copy: bytes | None = None) -> list[Slot]:
        """Every record in use, in index order (from `copy`, a copy of the board, if given)."""
        mem = self.mem if copy is None else copy
        return [self.read(index, copy) for index in range(self.capacity)
                if mem[self._base(index) + _OFF_STATE] != SlotState.FREE]

    # ------------------------------------------------------------------ worker side

    def set_state(self, index: int, state: SlotState) -> None:
        self.mem[self._base(index) + _OFF_STATE] = state

    def set_conns(self, index: int, conns: int) -> None:
        self._fields.h[(self._base(index) + _OFF_CONNS) // 2] = min(conns, 0xFFFF)

    def request_started(self, index: int, method: str, uri: str) -> float:
        """Mark the worker busy with this request; returns the start time it recorded.
        On the request path: _speedups.board_started does the same writes (1.6 us -> 0.3 us)."""
        if _c_started is not None:
            return _c_started(self.mem, _RECORDS_AT + index * RECORD.size, method, uri)
        base = self._base(index)
        mem = self.mem
        now = time.monotonic()
        self._fields.d[(base + _OFF_BUSY) // 8] = now
        # text, for people: a copy taken while it changes may show a mix of two requests' names
        mem[base + _OFF_METHOD:base + _OFF_URI] = method.encode("latin-1", "replace")[:8].ljust(8, b"\0")
        mem[base + _OFF_URI:base + _OFF_LAST] = uri.encode("latin-1", "replace")[:96].ljust(96, b"\0")
        mem[base + _OFF_STATE] = SlotState.BUSY
        return now

    def request_finished(self, index: int, requests: int, since: float,
                         state: SlotState = SlotState.IDLE) -> None:
        """`since`: what request_started returned (not read back: this is the request path).
        _speedups.board_finished does the same writes (1.4 us -> 0.2 us)."""
        if _c_finished is not None:
            _c_finished(self.mem, _RECORDS_AT + index * RECORD.size, requests, since, state)
            return
        base = self._base(index)
        q, d = self._fields.q, self._fields.d
        took = time.monotonic() - since
        d[(base + _OFF_LAST) // 8] = took
        d[(base + _OFF_SUM) // 8] += took
        q[(base + _OFF_HIST) // 8 + bisect.bisect_left(BUCKETS, took)] += 1
        q[(base + _OFF_REQUESTS) // 8] = requests
        self.mem[base + _OFF_STATE] = state

    def connection_accepted(self, index: int) -> None:
        self._fields.q[(self._base(index) + _OFF_ACCEPTED) // 8] += 1
