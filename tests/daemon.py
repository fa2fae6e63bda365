"""Starting the real daemon for tests: a subprocess on a free loopback port, torn down by pid.

Readiness is bounded polling of the daemon's own log ("generation N serving"),
never a bare sleep.  Workers are listed from /proc, not guessed from responses.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

from fcgidaemon.control import alive  # noqa: F401 - re-exported for the tests

ROOT = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> object:
    """Poll `predicate` until it returns something true, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return sorted(out)


class TcpSocket(NamedTuple):
    """One row of /proc/net/tcp (IPv4): ports, state (01 established, 0A listening), the
    receive queue's bytes and the socket's inode."""

    local_port: int
    remote_port: int
    state: str
    rx_queue: int
    inode: str


def tcp_sockets() -> list[TcpSocket]:
    with open("/proc/net/tcp") as fh:
        rows = [line.split() for line in fh.readlines()[1:]]
    return [TcpSocket(int(row[1].split(":")[1], 16), int(row[2].split(":")[1], 16), row[3],
                      int(row[4].split(":")[1], 16), row[9]) for row in rows]


class Daemon:
    """One fcgidaemon manager process started by a test."""

    def __init__(self, tmp_path: Path, app: str, args: Sequence[str] = (), *,
                 workers: int = 2, bind: str | None = None, env: dict[str, str] | None = None,
                 pythonpath: Sequence[str | Path] = (), wait: bool = True) -> None:
        self.tmp_path = tmp_path
        self.port = free_port()
        self.bind = bind or f"127.0.0.1:{self.port}"
        self.address: tuple[str, int] | str = (
            self.bind[5:] if self.bind.startswith("unix:") else
            self.bind if self.bind.startswith("/") else ("127.0.0.1", self.port))
        self.log_path = tmp_path / f"daemon-{self.port}.log"
        paths = [str(p) for p in pythonpath] or [str(APPS)]
        cmd = [sys.executable, "-m", "fcgidaemon", app, "--bind", self.bind,
               "--workers", str(workers), "--pythonpath", ",".join(paths),
               "--log-level", "debug", *args]
        full_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("FCGI", "NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_", "JOURNAL_"))}
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.update(env or {})
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     cwd=tmp_path, start_new_session=True)
        self.pid = self.proc.pid
        self.workers_wanted = workers
        if wait:
            try:
                self.wait_serving(1)
            except BaseException:
                self.stop()  # never leave a daemon behind, even one that did not come up
                raise

    # ------------------------------------------------------------------ observing

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.log()))

    def wait_log(self, pattern: str, count: int = 1, timeout: float = 15.0) -> None:
        def seen() -> bool:
            if self.proc.poll() is not None and self.count(pattern) < count:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) before "
                                     f"{pattern!r}; log:\n{self.log()[-3000:]}")
            return self.count(pattern) >= count
        wait_for(seen, timeout, f"{count}x {pattern!r} in the daemon log")

    def wait_serving(self, generation: int, timeout: float = 15.0) -> None:
        pattern = (rf"generation {generation} serving" if generation == 1 else
                   rf"reload complete: generation {generation} serving")
        self.wait_log(pattern, 1, timeout)

    def workers(self) -> list[int]:
        return children(self.pid)

    def wait_workers(self, count: int, timeout: float = 10.0) -> list[int]:
        def exactly() -> list[int] | None:
            found = self.workers()
            return found if len(found) == count else None
        return wait_for(exactly, timeout, f"{count} worker processes")  # type: ignore[return-value]

    # ------------------------------------------------------------------ acting

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def reload(self, generation: int, timeout: float = 15.0) -> None:
        self.signal(signal.SIGHUP)
        self.wait_serving(generation, timeout)

    def wait_exit(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Tear down by pid: TERM, then KILL the whole process group after a bound."""
        if self.proc.poll() is None:
            try:
                self.signal(signal.SIGTERM)
                self.proc.wait(10)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)
        self._log.close()


def run_cli(args: Sequence[str], tmp_path: Path, timeout: float = 20.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m fcgidaemon ARGS` to completion (for bad-config and check tests)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FCGI")}
    full_env.update(env or {})
    proc = subprocess.Popen([sys.executable, "-m", "fcgidaemon", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=full_env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a daemon that should have exited: its whole group goes
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
