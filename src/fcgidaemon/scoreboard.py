"""The scoreboard: one record per worker in shared memory, mapped before the fork.

A worker writes its own record at the start and end of every request (no locks:
each record has one writer); the manager reads all of them from its loop.  The
manager never waits for a worker to report anything: a hung worker's record
simply keeps saying "busy since T", which is how `--timeout` and `--slow-log`
find it.  Times are CLOCK_MONOTONIC, which all processes share.
"""

from __future__ import annotations

import mmap
import struct
import time
from dataclasses import dataclass
from enum import IntEnum

RECORD = struct.Struct("=iiB3xQQd8s96sd")
# pid, generation, state, requests, accepted, busy_since, method, uri, last_duration
CAPACITY = 1024


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
    requests: int
    accepted: int
    busy_since: float
    last_duration: float
    method: str
    uri: str

    def busy_for(self, now: float | None = None) -> float:
        if self.state is not SlotState.BUSY:
            return 0.0
        return (time.monotonic() if now is None else now) - self.busy_since


# field offsets inside a record, for the worker's small writes on the request path
_OFF_STATE = 8
_OFF_REQUESTS = 12
_OFF_ACCEPTED = 20
_OFF_BUSY = 28  # busy_since, method and uri are contiguous: one pack per request start
_OFF_LAST = 140
_BUSY = struct.Struct("=d8s96s")
_DONE = struct.Struct("=Q")


class Scoreboard:
    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self.mem = mmap.mmap(-1, RECORD.size * capacity, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self._free = list(range(capacity - 1, -1, -1))

    # ------------------------------------------------------------------ manager side

    def allocate(self, pid: int, generation: int) -> int:
        index = self._free.pop()
        RECORD.pack_into(self.mem, index * RECORD.size, pid, generation, SlotState.STARTING,
                         0, 0, 0.0, b"", b"", 0.0)
        return index

    def set_pid(self, index: int, pid: int) -> None:
        struct.pack_into("=i", self.mem, index * RECORD.size, pid)

    def release(self, index: int) -> None:
        RECORD.pack_into(self.mem, index * RECORD.size, 0, 0, SlotState.FREE, 0, 0, 0.0, b"", b"", 0.0)
        self._free.append(index)

    def read(self, index: int) -> Slot:
        pid, gen, state, reqs, acc, since, method, uri, last = RECORD.unpack_from(
            self.mem, index * RECORD.size)
        return Slot(index, pid, gen, SlotState(state), reqs, acc, since, last,
                    method.rstrip(b"\0").decode("latin-1"), uri.rstrip(b"\0").decode("latin-1"))

    # ------------------------------------------------------------------ worker side

    def set_state(self, index: int, state: SlotState) -> None:
        self.mem[index * RECORD.size + _OFF_STATE] = state

    def request_started(self, index: int, method: str, uri: str) -> None:
        base = index * RECORD.size
        _BUSY.pack_into(self.mem, base + _OFF_BUSY, time.monotonic(),
                        method.encode("latin-1", "replace")[:8], uri.encode("latin-1", "replace")[:96])
        self.mem[base + _OFF_STATE] = SlotState.BUSY

    def request_finished(self, index: int, requests: int, state: SlotState = SlotState.IDLE) -> None:
        base = index * RECORD.size
        since = struct.unpack_from("=d", self.mem, base + _OFF_BUSY)[0]
        struct.pack_into("=d", self.mem, base + _OFF_LAST, time.monotonic() - since)
        _DONE.pack_into(self.mem, base + _OFF_REQUESTS, requests)
        self.mem[base + _OFF_STATE] = state

    def connection_accepted(self, index: int) -> None:
        base = index * RECORD.size + _OFF_ACCEPTED
        count = _DONE.unpack_from(self.mem, base)[0]
        _DONE.pack_into(self.mem, base, count + 1)
