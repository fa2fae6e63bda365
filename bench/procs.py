"""Processes the benchmark starts: spawn in their own session, measure, tear down by pid.

Every server is started with ``start_new_session=True``, so its pid is also its
process group and session id: the whole tree (workers, re-forked children,
orphans) is found by session id and killed by process group, never by name.
Every process started is registered so an error anywhere still stops it.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

LOOPBACK = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
STOP_GRACE = 10.0

_running: dict[int, "Proc"] = {}


class StartError(RuntimeError):
    """A process did not come up; the message carries the tail of its log."""


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    stop_signal: int = signal.SIGTERM
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, limit: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except FileNotFoundError:
            return ""

    def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop signal to the leader, then SIGKILL to its process group; idempotent."""
        _running.pop(self.pid, None)
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, self.stop_signal)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(grace)


def spawn(name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
          cwd: str | Path | None = None, stop_signal: int = signal.SIGTERM) -> Proc:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                 start_new_session=True)
    proc = Proc(name, popen, log_path, stop_signal)
    _running[proc.pid] = proc
    return proc


@contextlib.contextmanager
def running(proc: Proc) -> Iterator[Proc]:
    try:
        yield proc
    finally:
        proc.stop()


def stop_all() -> None:
    """Last resort (error paths, signals): stop everything still registered."""
    for proc in list(_running.values()):
        proc.stop(grace=3.0)


# --------------------------------------------------------------------------- ports


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: Proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StartError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        with contextlib.suppress(OSError):
            socket.create_connection((LOOPBACK, port), timeout=1.0).close()
            return
        time.sleep(0.05)
    raise StartError(f"{proc.name} not listening on {port} after {timeout:g}s:\n{proc.log_tail()}")


# --------------------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # fields from 3 (state) on


def session_pids(sid: int) -> list[int]:
    """Every live process whose session is `sid` (the tree of a process we spawned)."""
    return _pids_where(3, sid)


def children(pid: int) -> list[int]:
    return _pids_where(1, pid)


def _pids_where(field: int, value: int) -> list[int]:
    """Live processes whose /proc/PID/stat field (counted from 3, the state) is `value`."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and int(fields[field]) == value:
                out.append(int(entry))
    return sorted(out)


def cpu_seconds(sid: int) -> float:
    """utime+stime (+ those of reaped children) summed over the session's processes."""
    ticks = 0
    for pid in session_pids(sid):
        fields = _stat_fields(pid)
        if fields is not None:  # utime stime cutime cstime are fields 14-17
            ticks += sum(int(x) for x in fields[11:15])
    return ticks / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy (user, nice, system, irq, softirq), machine-wide.

    /proc/stat is not namespaced: it includes work of other containers on this
    machine, which is how a run notices load that is not its own.
    """
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / CLK_TCK


def other_load(window: float = 0.5) -> float:
    """Cores busy over `window` seconds while this process (and what it started) idles.

    Meant to be called when nothing the benchmark started is working, so all of
    it is load from elsewhere.
    """
    busy0, own0 = machine_busy_seconds(), own_seconds()
    time.sleep(window)
    return max(0.0, machine_busy_seconds() - busy0 - (own_seconds() - own0)) / window


def wait_quiet(limit: float, threshold: float = 0.3) -> float:
    """Wait up to `limit` s for a window with less than `threshold` cores of other load."""
    started = time.monotonic()
    while time.monotonic() - started < limit and other_load() >= threshold:
        pass
    return time.monotonic() - started


class LoadMeter:
    """Cores of CPU used from its creation until `other_cores()` by processes the benchmark
    did not start: machine-wide busy time less this process, its reaped children and the
    sessions named (servers it started)."""

    def __init__(self, sessions: Sequence[int] = ()) -> None:
        self.sessions = sorted(set(sessions))
        self.busy0, self.own0 = machine_busy_seconds(), own_seconds()
        self.ours0 = sum(cpu_seconds(sid) for sid in self.sessions)
        self.t0 = time.monotonic()

    def other_cores(self) -> float:
        busy = machine_busy_seconds() - self.busy0
        own = own_seconds() - self.own0
        ours = sum(cpu_seconds(sid) for sid in self.sessions) - self.ours0
        return round(max(0.0, busy - own - ours) / max(1e-6, time.monotonic() - self.t0), 3)


def own_seconds() -> float:
    """CPU seconds of this process and its reaped children (wrk, after subprocess.run)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def smaps_rollup(pid: int) -> dict[str, int]:
    """Fields of /proc/PID/smaps_rollup in kB (Rss, Pss, Private_Clean, ...)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[name.strip()] = int(parts[0])
    return out
