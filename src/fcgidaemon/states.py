"""The manager's explicit states: its phases, each worker's state and the one transition table.

A worker record moves only along `TRANSITIONS`; `WorkerRecord.move` refuses
anything else, so an impossible transition is a loud bug, not silent drift.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from enum import Enum


class Phase(Enum):
    STARTING = "starting"  # first generation not ready yet
    RUNNING = "running"
    RELOADING = "reloading"  # a new generation is starting beside the serving one
    STOPPING = "stopping"  # graceful: workers finish their requests
    QUITTING = "quitting"  # quick: workers exit at once
    RETIRED = "retired"  # a new manager took over (SIGUSR2): our workers hand over and leave

ENDING = (Phase.STOPPING, Phase.QUITTING, Phase.RETIRED)


class WState(Enum):
    STARTING = "starting"  # forked, importing the application
    READY = "ready"  # serving
    RETIRING = "retiring"  # told to finish and leave


TRANSITIONS: dict[WState, set[WState]] = {
    WState.STARTING: {WState.READY, WState.RETIRING},
    WState.READY: {WState.RETIRING},
    WState.RETIRING: set(),
}


@dataclass
class WorkerRecord:
    pid: int
    slot: int
    generation: int
    channel: socket.socket
    state: WState = WState.STARTING
    started: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # ready-by while starting, kill-at while retiring
    failure: str | None = None  # import failure reported by the worker
    board_index: int = 0
    replace: bool = False  # hit --max-requests/--max-memory: retire once a replacement is ready
    slow_logged: float = 0.0  # busy_since of the request whose stack was already logged
    kill_at: float | None = None  # --timeout: SIGKILL after the stack dump
    balance_asked: float = 0.0  # when we last asked it to give kept connections back
    balance_pending: bool = False  # asked, and it has not answered yet (MSG_BALANCED)
    adopting: int = 0  # connections passed to it that its count may not show yet
    passed_at: float = 0.0  # when we last passed it connections
    inbox: socket.socket | None = None  # the worker's end of `channel`, kept (handover.py)
    killed: bool = False  # sent SIGKILL while starting: a ready report read after that is void

    def move(self, new: WState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"worker {self.pid}: {self.state.value} -> {new.value} not allowed")
        self.state = new
