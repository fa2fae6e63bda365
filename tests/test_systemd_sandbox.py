"""fcgidaemon under a real systemd (252, Debian 12), booted in the team's sandbox.

The unit files of deploy/systemd are installed unchanged (tests/sandbox.py),
with the hardening on and a non-root service user; the application is a copy
of tests/apps/testapp.py in /xchg/app, which the test edits from the host.
Every client runs inside the sandbox's network namespace.  The module boots one
sandbox and tears it down at the end; each test stops the units it started.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from daemon import APPS, wait_for
from sandbox import (Sandbox, SandboxUnavailable, finish, install_fcgidaemon, unavailable_reason,
                     wait_line)

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or "")

SERVICE = "fcgidaemon.service"
SOCKET = "fcgidaemon.socket"
TCP = "127.0.0.1:9005"
ENV_FILE = "FCGIDAEMON_APP=liveapp\nFCGIDAEMON_PYTHONPATH=/xchg/app\nFCGIDAEMON_WORKERS=2\n"
SOCKET_DROPIN = "/etc/systemd/system/fcgidaemon.socket.d/10-test-unix.conf"
WATCHDOG_DROPIN = "/etc/systemd/system/fcgidaemon.service.d/20-test-watchdog.conf"


@dataclass
class App:
    """The application the service runs, edited through the host's side of /xchg."""

    path: Path

    def write(self, version: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.parent.chmod(0o755)
        text = (APPS / "testapp.py").read_text().replace('VERSION = "v1"', f'VERSION = "{version}"')
        self.path.write_text(text)
        self.path.chmod(0o644)

    def break_it(self) -> None:
        self.path.write_text(self.path.read_text() + "\ndef broken(:\n")


@pytest.fixture(scope="module")
def sb(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    try:
        sandbox = Sandbox.boot()
    except SandboxUnavailable as exc:
        pytest.skip(str(exc))
    failed_before = request.session.testsfailed
    try:
        install_fcgidaemon(sandbox)
        yield sandbox
    finally:  # the sandbox's journal is kept (in its state directory) only when something failed
        sandbox.down(keep_logs=request.session.testsfailed > failed_before)


@pytest.fixture
def app(sb: Sandbox) -> Iterator[App]:
    """Version v1 of the app and the site's /etc/default/fcgidaemon; every unit stopped after."""
    live = App(sb.xchg / "app" / "liveapp.py")
    live.write("v1")
    sb.write("/etc/default/fcgidaemon", ENV_FILE)
    yield live
    sb.systemctl("stop", SOCKET, SERVICE, "fcgidaemon@*.service", check=False)
    sb.systemctl("reset-failed", check=False)


def get(sb: Sandbox, uri: str = "/hello", address: str = TCP) -> dict[str, Any]:
    return sb.client("get", address, uri)


def version_of(sb: Sandbox, address: str = TCP) -> str:
    reply = get(sb, "/id", address)
    assert reply["status"] == 200, reply
    return re.search(r"version=(\S+)", reply["body"]).group(1)  # type: ignore[union-attr]


def main_pid(sb: Sandbox, unit: str = SERVICE) -> int:
    return int(sb.show(unit, "MainPID")["MainPID"])


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    started = time.monotonic()
    result = fn(*args, **kwargs)
    return result, time.monotonic() - started


def invocation_id(sb: Sandbox, unit: str = SERVICE) -> str:
    return sb.show(unit, "InvocationID")["InvocationID"]


def journal_text(sb: Sandbox, invocation: str) -> str:
    """What one run of the service logged (MESSAGE fields only)."""
    sb.run("journalctl", "--sync")
    return sb.run("journalctl", "--no-pager", "-o", "cat", f"_SYSTEMD_INVOCATION_ID={invocation}").stdout


def app_errors(sb: Sandbox, invocation: str) -> list[dict[str, Any]]:
    entries = sb.journal("-u", SERVICE, "-p", "err")
    return [e for e in entries if e.get("_SYSTEMD_INVOCATION_ID") == invocation]


# ---------------------------------------------------------------- the unit files


def test_unit_files_pass_systemd_analyze_verify(sb):
    done = sb.run("systemd-analyze", "verify", f"/etc/systemd/system/{SERVICE}",
                  f"/etc/systemd/system/{SOCKET}", "fcgidaemon@demo.service", check=False)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


# ---------------------------------------------------------------- start, reload, stop


def test_start_returns_when_requests_are_served(sb, app):
    _, took = timed(sb.systemctl, "start", SERVICE)
    reply = get(sb)  # right after `start` returned: READY=1 means serving
    assert reply["status"] == 200 and reply["body"].startswith("hello v1 "), reply
    props = sb.show(SERVICE, "ActiveState", "SubState", "StatusText", "MainPID", "NRestarts")
    assert props["ActiveState"] == "active" and props["SubState"] == "running"
    assert props["StatusText"] == "serving gen 1, 2/2 workers"
    pid = props["MainPID"]
    assert sb.run("ps", "-o", "user=", "-p", pid).stdout.strip() == "fcgidaemon"  # User= applies
    assert sb.run("cat", "/run/fcgidaemon/fcgidaemon.pid").stdout.strip() == pid
    print(f"\nsystemctl start: {took:.2f}s")


def test_reload_under_load_waits_for_the_new_code(sb, app):
    sb.systemctl("start", SERVICE)
    load = sb.client_in_background("load", TCP, "--seconds", "4", "--clients", "6", "--kept", "3")
    wait_line(load, "started", 15)
    time.sleep(1.0)  # a second of v1 traffic first
    app.write("v2")
    reload, took = timed(sb.systemctl, "reload", SERVICE, check=False)
    versions = [version_of(sb) for _ in range(5)]  # right after `reload` returned
    result = finish(load, 40)
    assert reload.returncode == 0, reload.stderr
    assert versions == ["v2"] * 5
    assert result["failures"] == 0 and result["stuck"] == 0, result
    assert result["versions"].get("v1", 0) > 0 and result["versions"].get("v2", 0) > 0, result
    assert sb.show(SERVICE, "StatusText")["StatusText"] == "serving gen 2, 2/2 workers"
    print(f"\nreload under load: returned after {took:.2f}s; load {result}")


def test_reload_with_broken_code_fails_and_the_old_code_keeps_serving(sb, app):
    sb.systemctl("start", SERVICE)
    pid = main_pid(sb)
    app.break_it()
    reload, took = timed(sb.systemctl, "reload", SERVICE, check=False)
    assert reload.returncode != 0
    assert version_of(sb) == "v1"
    props = sb.show(SERVICE, "ActiveState", "SubState", "StatusText", "MainPID")
    assert (props["ActiveState"], props["SubState"], int(props["MainPID"])) == ("active", "running", pid)
    assert re.fullmatch(r"reload failed: SyntaxError in /xchg/app/liveapp\.py:\d+: .*, "
                        r"still serving gen 1", props["StatusText"]), props["StatusText"]
    invocation = invocation_id(sb)
    errors = [e["MESSAGE"] for e in app_errors(sb, invocation)]
    assert any(m.startswith("[manager gen 2] reload to generation 2 failed: SyntaxError") and
               "def broken(:" in m for m in errors), errors
    print(f"\nfailed reload: systemctl reload exit {reload.returncode} after {took:.2f}s")


def test_stop_lets_an_in_flight_request_finish(sb, app):
    sb.systemctl("start", SERVICE)
    request = sb.client_in_background("get", TCP, "/sleep?s=3")
    wait_for(lambda: sb.run("pgrep", "-f", r"busy [0-9.]*s GET /sleep", check=False).returncode == 0,
             10, "a worker busy with /sleep")
    _, took = timed(sb.systemctl, "stop", SERVICE)
    reply = finish(request, 30)
    assert reply["status"] == 200 and reply["body"].startswith("slept 3 "), reply
    props = sb.show(SERVICE, "ActiveState", "Result")
    assert props == {"ActiveState": "inactive", "Result": "success"}  # no SIGKILL, no timeout
    assert 1.5 < took < 40
    print(f"\nsystemctl stop with a 3 s request in flight: {took:.2f}s")


def test_a_killed_manager_is_restarted_and_its_workers_do_not_linger(sb, app):
    sb.systemctl("start", SERVICE)
    old = main_pid(sb)
    workers = sb.run("pgrep", "-P", str(old)).stdout.split()
    sb.run("kill", "-KILL", str(old))
    wait_for(lambda: sb.show(SERVICE, "NRestarts", "ActiveState", "SubState") ==
             {"NRestarts": "1", "ActiveState": "active", "SubState": "running"}, 15, "a restart")
    assert main_pid(sb) != old
    alive = sb.run("ps", "-o", "pid=", "-p", ",".join(workers), check=False).stdout.split()
    assert alive == []
    assert get(sb)["status"] == 200


def test_sigusr2_upgrade_makes_the_new_manager_the_main_pid(sb, app):
    sb.write(WATCHDOG_DROPIN, "[Service]\nWatchdogSec=2\n")  # so a silent watchdog shows quickly
    sb.systemctl("daemon-reload")
    try:
        sb.systemctl("start", SERVICE)
        old = main_pid(sb)
        sb.run("kill", "-USR2", str(old))
        wait_for(lambda: sb.run("kill", "-0", str(old), check=False).returncode != 0, 15,
                 "the old manager to exit")
        time.sleep(2.5)  # longer than WatchdogSec: the new manager must be the one pinging
        props = sb.show(SERVICE, "ActiveState", "SubState", "MainPID", "NRestarts")
        assert (props["ActiveState"], props["SubState"], props["NRestarts"]) == ("active", "running", "0")
        new = int(props["MainPID"])
        assert new not in (0, old)
        assert get(sb)["status"] == 200
        sb.systemctl("reload", SERVICE)  # reload and stop work on the new manager
        assert main_pid(sb) == new and get(sb)["status"] == 200
        sb.systemctl("stop", SERVICE)
        state = sb.show(SERVICE, "ActiveState", "Result")
        assert state == {"ActiveState": "inactive", "Result": "success"}, state  # a graceful stop
    finally:
        sb.systemctl("stop", SERVICE, check=False)
        sb.run("rm", "-f", WATCHDOG_DROPIN)
        sb.systemctl("daemon-reload")


# ---------------------------------------------------------------- journald


def test_journal_has_the_daemon_lines_and_one_entry_per_app_traceback(sb, app):
    sb.systemctl("start", SERVICE)
    assert get(sb, "/error?x=1")["status"] == 500
    invocation = invocation_id(sb)
    lines = journal_text(sb, invocation)
    assert "[manager gen 0] listening on 127.0.0.1:9005" in lines
    assert "[manager gen 1] generation 1 serving: 2 workers" in lines
    errors = wait_for(lambda: app_errors(sb, invocation), 10, "an error entry")
    assert len(errors) == 1, [e["MESSAGE"] for e in errors]  # one entry, not one per line
    entry = errors[0]
    message = entry["MESSAGE"]
    assert message.startswith("[worker gen 1] application error on GET /error?x=1\nTraceback")
    assert message.rstrip().endswith("RuntimeError: boom before headers")
    assert entry["PRIORITY"] == "3" and entry["REQUEST_URI"] == "/error?x=1"
    assert entry["GENERATION"] == "1" and entry["WORKER_PID"] == entry["_PID"]
    assert entry["SYSLOG_IDENTIFIER"] == "fcgidaemon" and entry["_SYSTEMD_UNIT"] == SERVICE


# ---------------------------------------------------------------- socket activation


def test_restart_with_the_socket_unit_loses_no_connection(sb, app):
    sb.systemctl("start", SOCKET)
    assert sb.show(SERVICE, "ActiveState")["ActiveState"] == "inactive"
    load = sb.client_in_background("load", TCP, "--seconds", "4", "--clients", "4")
    wait_line(load, "started", 15)
    wait_for(lambda: sb.show(SERVICE, "SubState")["SubState"] == "running", 15,
             "the first connection to start the service")
    old, first = main_pid(sb), invocation_id(sb)
    time.sleep(0.5)
    _, took = timed(sb.systemctl, "restart", SERVICE)
    result = finish(load, 40)
    assert main_pid(sb) != old
    assert result["failures"] == 0 and result["stuck"] == 0 and result["requests"] > 0, result
    for invocation in (first, invocation_id(sb)):  # both managers served the socket systemd passed
        assert "listening on 127.0.0.1:9005 (passed)" in journal_text(sb, invocation)
    print(f"\nrestart under load with {SOCKET}: {took:.2f}s; load {result}")


def test_a_passed_unix_socket_survives_the_service(sb, app):
    path = "/run/fcgidaemon.sock"
    sb.write(SOCKET_DROPIN, f"[Socket]\nListenStream=\nListenStream={path}\nSocketUser=fcgidaemon\n"
                            "SocketGroup=www-data\nSocketMode=0660\n")
    sb.systemctl("daemon-reload")
    try:
        sb.systemctl("start", SOCKET)
        assert get(sb, address=path)["status"] == 200  # socket activation
        sb.systemctl("stop", SERVICE)
        assert sb.run("stat", "-c", "%F %U %G %a", path).stdout.strip() == "socket fcgidaemon www-data 660"
        assert get(sb, address=path)["status"] == 200  # activated again on the same socket
    finally:
        sb.systemctl("stop", SOCKET, SERVICE, check=False)
        sb.run("rm", "-f", SOCKET_DROPIN)
        sb.systemctl("daemon-reload")


# ---------------------------------------------------------------- the template


def test_template_instance_serves_its_own_unix_socket(sb, app):
    """... beside fcgidaemon.service, which neither re-owns the instance's socket when it starts
    nor deletes it when it stops (the instance's directory was under the service's own)."""
    sb.write("/etc/fcgidaemon/demo.toml", 'app = "liveapp"\npythonpath = ["/xchg/app"]\nworkers = 2\n')
    unit, sock = "fcgidaemon@demo.service", "/run/fcgidaemon-demo/fcgi.sock"
    sb.systemctl("start", unit)
    assert version_of(sb, sock) == "v1"
    owned = "socket fcgidaemon www-data 660"
    assert sb.run("stat", "-c", "%F %U %G %a", sock).stdout.strip() == owned
    sb.systemctl("start", SERVICE)
    sb.systemctl("stop", SERVICE)
    assert sb.run("stat", "-c", "%F %U %G %a", sock).stdout.strip() == owned
    app.write("v2")
    sb.systemctl("reload", unit)
    assert version_of(sb, sock) == "v2"
    assert sb.show(unit, "StatusText")["StatusText"] == "serving gen 2, 2/2 workers"
    sb.systemctl("stop", unit)
    assert sb.run("test", "-e", "/run/fcgidaemon-demo", check=False).returncode != 0
