"""What the daemon tells systemd, checked without systemd.

The test plays the service manager: it binds the AF_UNIX datagram socket that
NOTIFY_SOCKET names, with SO_PASSCRED so each message carries its sender's pid,
and hands the daemon pre-bound listening sockets the way socket activation does
(fd 3, LISTEN_FDS=1, LISTEN_PID=<the daemon's pid>).  The daemon is the real
one, started by tests/daemon.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from unittest import mock

import pytest

import daemon as daemon_module
from daemon import APPS, alive, wait_for
from fcgiclient import Address, FCGIClient, Response, make_params
from fcgidaemon import logs, systemd

CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid


# ---------------------------------------------------------------- the fake service manager


@dataclass(frozen=True)
class Message:
    at: float  # time.monotonic() when received
    pid: int  # sender, from SCM_CREDENTIALS
    fields: tuple[str, ...]

    def value(self, key: str) -> str | None:
        prefix = key + "="
        return next((f[len(prefix):] for f in self.fields if f.startswith(prefix)), None)

    def has(self, field: str) -> bool:
        return field in self.fields


class NotifyListener:
    """The NOTIFY_SOCKET end: records every datagram, with the time and the sender's pid."""

    def __init__(self, path: Path) -> None:
        assert len(str(path)) < 100, f"unix socket path too long: {path}"
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.05)
        self.messages: list[Message] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(CREDS.size))
            except TimeoutError:
                continue
            pid = next((CREDS.unpack(cdata[:CREDS.size])[0] for level, kind, cdata in ancdata
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), -1)
            message = Message(time.monotonic(), pid, tuple(data.decode().split("\n")))
            with self._cond:
                self.messages.append(message)
                self._cond.notify_all()

    def snapshot(self) -> list[Message]:
        with self._cond:
            return list(self.messages)

    def with_field(self, field: str) -> list[Message]:
        return [m for m in self.snapshot() if m.has(field)]

    def wait_for(self, field: str, count: int = 1, timeout: float = 15.0) -> Message:
        """The `count`-th message carrying `field` (e.g. "READY=1"), waiting for it (bounded)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in self.messages if m.has(field)]
                if len(found) >= count:
                    return found[count - 1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {count}x {field!r} within {timeout}s; got "
                                         f"{[m.fields for m in self.messages]}")
                self._cond.wait(left)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


def notify_env(listener: NotifyListener, **extra: str) -> dict[str, str]:
    return {"NOTIFY_SOCKET": str(listener.path), **extra}


# ---------------------------------------------------------------- helpers


def get(address: Address, uri: str = "/hello") -> Response:
    with FCGIClient(address, timeout=10) as client:
        return client.request(make_params("GET", uri))


def app_copy(tmp_path: Path, extra_module: str | None = None) -> Path:
    """tests/apps/testapp.py as `liveapp` in a directory of its own, for the test to edit."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "liveapp.py").write_text((APPS / "testapp.py").read_text())
    if extra_module:
        (src / "slowstart.py").write_text(extra_module)
    return src


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


LAUNCHER = """
import os, sys
fd, listen_pid, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
if fd != 3:
    os.dup2(fd, 3)  # the new descriptor is inheritable
    os.close(fd)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid()) if listen_pid == "self" else listen_pid
os.execv(argv[0], argv)  # same pid: LISTEN_PID stays right
"""


@contextlib.contextmanager
def socket_activation(sock: socket.socket, listen_pid: str = "self") -> Iterator[None]:
    """While active, tests/daemon.py starts the daemon the way systemd does: `sock` as fd 3."""
    real_popen = subprocess.Popen

    def popen(cmd: list[str], **kwargs: object) -> subprocess.Popen:
        launcher = [sys.executable, "-c", LAUNCHER, str(sock.fileno()), listen_pid, *cmd]
        return real_popen(launcher, pass_fds=(sock.fileno(),), **kwargs)  # type: ignore[call-overload]

    with mock.patch.object(daemon_module.subprocess, "Popen", popen):
        yield


def listening_tcp() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


def listening_unix(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(64)
    return sock


# ---------------------------------------------------------------- READY, RELOADING, STOPPING


def test_ready_is_sent_once_when_the_first_generation_serves(start_daemon, notify, tmp_path):
    src = app_copy(tmp_path, "import time\ntime.sleep(0.4)\nfrom liveapp import application\n")
    started = time.monotonic()
    d = start_daemon("slowstart", workers=2, pythonpath=[src], env=notify_env(notify), wait=False)
    ready = notify.wait_for("READY=1")
    # not before the workers are ready: both imported the (slow) app and said so
    assert ready.at - started >= 0.4
    assert d.count(r"worker \d+ ready") == 2 and d.count(r"generation 1 serving") == 1
    assert get(d.address).status == 200  # no polling: READY means serving
    assert ready.pid == d.pid
    assert ready.value("STATUS") == "serving gen 1, 2/2 workers"
    time.sleep(0.3)  # bounded window in which nothing else may arrive
    assert [m.fields for m in notify.snapshot()] == [("READY=1", "STATUS=serving gen 1, 2/2 workers")]


def test_sighup_sends_reloading_with_monotonic_usec_then_ready(start_daemon, notify):
    d = start_daemon(workers=2, env=notify_env(notify))
    notify.wait_for("READY=1")
    before = monotonic_usec()
    d.signal(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING=1")
    ready = notify.wait_for("READY=1", count=2)
    stamp = int(reloading.value("MONOTONIC_USEC") or "")
    assert before <= stamp <= monotonic_usec()
    assert stamp - before < 1_000_000  # sent when the reload started, not later
    assert reloading.value("STATUS") == "reloading: starting gen 2"
    assert ready.value("STATUS") == "serving gen 2, 2/2 workers"
    assert d.count(r"reload complete: generation 2 serving") == 1
    messages = notify.snapshot()
    assert messages.index(reloading) < messages.index(ready)
    assert {m.pid for m in messages} == {d.pid}  # workers never notify


def test_failed_reload_sends_ready_with_the_reason(start_daemon, notify, tmp_path):
    src = app_copy(tmp_path)
    d = start_daemon("liveapp", workers=2, pythonpath=[src], env=notify_env(notify))
    notify.wait_for("READY=1")
    (src / "liveapp.py").write_text((src / "liveapp.py").read_text() + "\ndef broken(:\n")
    d.signal(signal.SIGHUP)
    notify.wait_for("RELOADING=1")
    ready = notify.wait_for("READY=1", count=2)
    status = ready.value("STATUS") or ""
    assert re.fullmatch(r"reload failed: SyntaxError in .*liveapp\.py:\d+: .*, still serving gen 1",
                        status), status
    assert get(d.address).body.startswith(b"hello v1 ")
    assert d.proc.poll() is None
    # fixed and reloaded: STATUS says it serves, and no longer "last failure: ..." (it did, for
    # good; the status page still has the last failure)
    (src / "liveapp.py").write_text((APPS / "testapp.py").read_text())
    d.signal(signal.SIGHUP)
    again = notify.wait_for("READY=1", count=3)
    assert again.value("STATUS") == "serving gen 3, 2/2 workers", again.value("STATUS")


def test_sigterm_sends_stopping(start_daemon, notify):
    d = start_daemon(workers=2, env=notify_env(notify))
    ready = notify.wait_for("READY=1")
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    stopping = notify.wait_for("STOPPING=1")
    stopped = notify.wait_for("STATUS=stopped")
    after_ready = [m.fields for m in notify.snapshot() if m.at > ready.at]
    assert after_ready == [stopping.fields, stopped.fields] == [("STOPPING=1", "STATUS=stopping"),
                                                              ("STATUS=stopped",)]


# ---------------------------------------------------------------- WATCHDOG


def test_watchdog_pings_every_half_watchdog_usec(start_daemon, notify):
    d = start_daemon(workers=2, env=notify_env(notify, WATCHDOG_USEC="400000"))
    ready = notify.wait_for("READY=1")
    window = 2.0
    time.sleep(window + 0.1)
    pings = [m for m in notify.with_field("WATCHDOG=1") if ready.at < m.at <= ready.at + window]
    assert 8 <= len(pings) <= 11, [round(m.at - ready.at, 3) for m in pings]  # every ~0.2 s
    gaps = [b.at - a.at for a, b in zip(pings, pings[1:])]
    assert max(gaps) < 0.35, gaps
    assert {m.pid for m in notify.snapshot()} == {d.pid}  # workers inherit WATCHDOG_USEC, stay silent


def test_no_watchdog_pings_when_watchdog_pid_is_another_process(start_daemon, notify):
    start_daemon(workers=1, env=notify_env(notify, WATCHDOG_USEC="200000", WATCHDOG_PID="1"))
    notify.wait_for("READY=1")
    time.sleep(0.5)
    assert notify.with_field("WATCHDOG=1") == []


def test_an_upgraded_manager_pings_the_watchdog_only_once_it_is_the_main_process(start_daemon, notify):
    """After SIGUSR2 the new manager sent WATCHDOG=1 from its first turn, before the old one had
    told systemd MAINPID=<new>: systemd refuses those (NotifyAccess=main), one journal warning
    each ("reception only permitted for main PID"; seen in the sandbox). Now the first comes
    after the hand-over."""
    d = start_daemon(workers=1, env=notify_env(notify, WATCHDOG_USEC="200000"))
    notify.wait_for("READY=1")
    d.signal(signal.SIGUSR2)
    d.wait_log(r"handed over to manager \d+", timeout=15)
    new = int(re.search(r"handed over to manager (\d+)", d.log()).group(1))
    try:
        handover = next(m for m in notify.snapshot() if m.pid == new and m.value("MAINPID") == str(new))
        wait_for(lambda: any(m.pid == new for m in notify.with_field("WATCHDOG=1")), 5,
                 "the new manager's first ping")
        first = min(m.at for m in notify.with_field("WATCHDOG=1") if m.pid == new)
        print(f"\nfirst ping of the new manager {first - handover.at:+.3f}s after MAINPID={new}")
        assert first > handover.at
    finally:
        os.kill(new, signal.SIGTERM)
        wait_for(lambda: not alive(new), 10, "the new manager to stop")


# ---------------------------------------------------------------- socket activation


def test_serves_on_a_passed_tcp_socket_and_not_on_its_own_bind(start_daemon, notify):
    with listening_tcp() as passed:  # the test keeps its copy open, as systemd does
        with socket_activation(passed):
            d = start_daemon(workers=2, env=notify_env(notify))
        notify.wait_for("READY=1")
        host, port = passed.getsockname()
        assert get((host, port)).status == 200
    assert d.count(rf"listening on 127\.0\.0\.1:{port} \(passed\)") == 1
    with pytest.raises(ConnectionRefusedError):  # --bind was ignored
        socket.create_connection(d.address, timeout=2).close()


def test_never_unlinks_a_passed_unix_socket(start_daemon, notify, tmp_path):
    path = tmp_path / "passed.sock"
    passed = listening_unix(path)
    with passed:
        with socket_activation(passed):
            d = start_daemon(workers=2, env=notify_env(notify))
        notify.wait_for("READY=1")
        assert get(str(path)).status == 200
        d.signal(signal.SIGTERM)
        assert d.wait_exit() == 0
        assert stat.S_ISSOCK(os.lstat(path).st_mode)  # still there for the next start
        with socket.socket(socket.AF_UNIX) as probe:  # and still the one "systemd" holds
            probe.connect(str(path))


def test_passed_sockets_for_another_pid_are_ignored(start_daemon):
    with listening_tcp() as passed:
        with socket_activation(passed, listen_pid="1"):
            d = start_daemon(workers=1)
        assert get(d.address).status == 200  # bound its own --bind
    assert d.count(r"\(passed\)") == 0


# ---------------------------------------------------------------- in-process units


def test_notify_outside_systemd_sends_nothing(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    assert systemd.under_systemd() is False


def test_notify_sends_one_datagram(monkeypatch, notify):
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    assert systemd.notify("READY=1", "STATUS=x") is True
    assert notify.wait_for("READY=1").fields == ("READY=1", "STATUS=x")


def test_hand_over_main_pid_is_one_message(monkeypatch, notify):
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    assert systemd.hand_over_main_pid(4242, "upgraded") is True
    assert notify.wait_for("MAINPID=4242").fields == ("MAINPID=4242", "STATUS=upgraded")


def test_a_successor_takes_over_the_watchdog():
    env = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "100"}
    systemd.successor_environment(env, 200)
    assert env == {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "200"}
    env = {"NOTIFY_SOCKET": "/run/x"}  # no watchdog configured: nothing to take over
    systemd.successor_environment(env, 200)
    assert env == {"NOTIFY_SOCKET": "/run/x"}


@pytest.mark.parametrize("usec, pid, expected", [
    ("400000", None, 0.2), ("400000", "self", 0.2), ("400000", "1", None),
    (None, None, None), ("0", None, None), ("junk", None, None),
])
def test_watchdog_interval(monkeypatch, usec, pid, expected):
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(os.getpid()) if value == "self" else value)
    assert systemd.watchdog_interval() == expected


# ---------------------------------------------------------------- journald, without journald


def test_journal_only_when_stderr_is_the_journal_stream(monkeypatch, tmp_path):
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert systemd.stderr_is_journal() is True
    other = os.stat(tmp_path)  # inherited by a process whose stderr went elsewhere
    monkeypatch.setenv("JOURNAL_STREAM", f"{other.st_dev}:{other.st_ino}")
    assert systemd.stderr_is_journal() is False
    monkeypatch.delenv("JOURNAL_STREAM")
    assert systemd.stderr_is_journal() is False
    assert isinstance(logs.make_handler(), logging.StreamHandler)


def test_an_application_error_is_one_journal_entry_with_fields(monkeypatch):
    sent: list[tuple[str, dict]] = []
    monkeypatch.setattr(systemd, "journal_send", lambda message, fields: sent.append((message, fields)))
    monkeypatch.setattr(systemd, "stderr_is_journal", lambda: True)
    logger = logging.getLogger("fcgidaemon.test-journal")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = logs.make_handler()
    logger.addHandler(handler)
    saved = dict(logs._context)
    try:
        logs.set_context(role="worker", generation=7)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.error("application error on GET %s", "/x?y=1", exc_info=True,
                         extra={"request_uri": "/x?y=1"})
        logs.set_context(role="manager", generation=7)
        logger.info("manager line")
    finally:
        logger.removeHandler(handler)
        logs._context.update(saved)
    (message, fields), (_, manager_fields) = sent
    assert message.startswith("[worker gen 7] application error on GET /x?y=1\nTraceback")
    assert message.rstrip().endswith("RuntimeError: boom")
    assert fields["PRIORITY"] == 3 and fields["GENERATION"] == 7
    assert fields["WORKER_PID"] == os.getpid() and fields["REQUEST_URI"] == "/x?y=1"
    assert fields["SYSLOG_IDENTIFIER"] == "fcgidaemon" and isinstance(fields["CODE_LINE"], int)
    assert manager_fields["PRIORITY"] == 6 and "WORKER_PID" not in manager_fields
    assert "REQUEST_URI" not in manager_fields
