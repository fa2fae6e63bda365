"""Upgrade in place (SIGUSR2): a new manager is started by fork+exec of our own command line.

It inherits the listening sockets by file descriptor (``FCGIDAEMON_FDS``), so the
socket is never closed; it preloads, forks its workers, and once they are all
ready it announces itself on our control socket (``upgraded <pid>``) and tells
systemd ``MAINPID=<its pid>`` + ``READY=1``.  Only then do our workers retire,
handing their idle connections to the new manager, and the pidfile names it (until
then it names us, the manager in charge).  If the new manager dies or is not ready
in time, we keep serving.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

from . import control, logs, systemd
from .states import Phase
from .sockets import INHERIT_ENV, Listener

log = logging.getLogger("fcgidaemon")

PARENT_ENV = "FCGIDAEMON_UPGRADE_FROM"  # the old manager's pid, read by the new one
GENERATION_ENV = "FCGIDAEMON_GENERATION"  # generations keep counting across upgrades
WORKERS_ENV = "FCGIDAEMON_UPGRADE_WORKERS"  # "configured current": a count set by SIGTTIN/SIGTTOU
UNLINK_ENV = "FCGIDAEMON_UNLINK"  # unix socket path whose removal at exit passes to the new manager
START_DIR = os.getcwd()  # relative paths on the command line are relative to this


@dataclass
class Upgrade:
    """One upgrade in progress, seen from the old manager."""

    pid: int
    deadline: float
    pidfile: str | None
    waiters: list = field(default_factory=list)
    successor_ready: bool = False

    @property
    def oldbin(self) -> str | None:
        return f"{self.pidfile}.oldbin" if self.pidfile else None

    def drop_oldbin(self) -> None:
        if self.oldbin:
            try:
                os.unlink(self.oldbin)
            except FileNotFoundError:
                pass


def start(listeners: Sequence[Listener], pidfile: str | None, timeout: float,
          generation: int, workers: tuple[int, int] = (0, 0)) -> Upgrade:
    """Fork and exec a new manager with our listening sockets; returns its record."""
    fds = [lst.fileno() for lst in listeners]
    env = dict(os.environ)
    env[INHERIT_ENV] = ",".join(str(fd) for fd in fds)
    env[PARENT_ENV] = str(os.getpid())
    env[GENERATION_ENV] = str(generation)
    env[WORKERS_ENV] = "%d %d" % workers
    owned = [lst.unlink_path for lst in listeners if lst.unlink_path]
    if owned:
        env[UNLINK_ENV] = ",".join(owned)
    argv = [sys.executable, *sys.orig_argv[1:]]
    pid = _spawn_detached(argv, env)
    log.info("upgrade: started new manager %d: %s", pid, " ".join(argv))
    return Upgrade(pid, time.monotonic() + timeout, pidfile)


def _spawn_detached(argv: list[str], env: dict[str, str]) -> int:
    """Fork twice, so that the new manager is not our child but init's (under systemd:
    systemd's own child). systemd then accepts it as the main process without taking it
    for an 'alien' it cannot watch: for an alien main process, a stop with KillMode=mixed
    skips SIGTERM and kills it at once. We watch it through /proc instead of waitpid."""
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(read_end)
            pid = os.fork()
            if pid == 0:
                os.close(write_end)
                _exec(argv, env)
            os.write(write_end, str(pid).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        os.waitpid(middle, 0)
        text = os.read(read_end, 32)
    finally:
        os.close(read_end)
    if not text:
        raise OSError("could not start the new manager")
    return int(text)


def _exec(argv: list[str], env: dict[str, str]) -> None:
    try:
        os.chdir(START_DIR)
        signal.set_wakeup_fd(-1)
        for signum in range(1, signal.NSIG):
            try:
                if signal.getsignal(signum) not in (signal.SIG_IGN, None):
                    signal.signal(signum, signal.SIG_DFL)
            except (OSError, ValueError):
                continue
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        systemd.successor_environment(env, os.getpid())
        for fd in env[INHERIT_ENV].split(","):  # only in this process, the one that execs: the
            os.set_inheritable(int(fd), True)  # manager's own stay close-on-exec (sockets.py)
        os.execve(argv[0], argv, env)
    except BaseException as exc:  # noqa: BLE001 - said, then the process ends: the old manager
        # then logs only "exited before it was ready", and why was nowhere (a removed interpreter)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)
        try:
            os.write(2, f"fcgidaemon: cannot exec the new manager {argv[0]}: {reason}\n".encode())
        except OSError:
            pass  # no stderr to say it on: the exit status 127 is all there is
    finally:
        os._exit(127)


def _write_pid(path: str | None) -> None:
    """The pidfile (or .oldbin) at a handover: one that cannot be written is said, and the
    handover goes on (at the start, the same failure is a usage error: cli.serve)."""
    try:
        control.write_pidfile(path)
    except OSError as exc:
        log.warning("cannot write the pidfile %s: %s", path, exc)


def inherited_unlink_paths() -> set[str]:
    return {p for p in os.environ.pop(UNLINK_ENV, "").split(",") if p}


def parent_pid() -> int | None:
    text = os.environ.pop(PARENT_ENV, "")
    return int(text) if text.isdigit() else None


def tell_predecessor(reason: str, pid: int | None = None) -> None:
    """A new manager that cannot start tells the manager it was to replace why: that one
    sees us only through /proc, and `upgrade --wait` said "exited before it was ready" for a
    bad config file and a failed preload alike. `pid`: the predecessor, once parent_pid() has
    taken it from the environment; before that (a config error in cli.main) it is read there."""
    if pid is None:
        text = os.environ.get(PARENT_ENV, "")
        pid = int(text) if text.isdigit() else None
    if pid is None:
        return
    line = " ".join(reason.split())[:400]  # one line: the control protocol is line-based
    try:
        control.ask(pid, f"successor-failed {os.getpid()} {line}", 5.0)
    except control.ControlError as exc:  # it is gone or stopping: nobody waits for the reason
        log.debug("cannot tell manager %d why the upgrade failed: %s", pid, exc)


def worker_count(configured: int) -> int:
    """How many workers a new manager starts: the old manager's count when SIGTTIN/SIGTTOU
    had changed it and our own configuration says what the old one's did (a --config file
    edited for the upgrade wins); otherwise our configured count. The old count used to be
    dropped: every upgrade silently went back to --workers."""
    fields = os.environ.pop(WORKERS_ENV, "").split()
    if len(fields) == 2 and all(f.isdigit() for f in fields) and int(fields[0]) == configured:
        return int(fields[1])  # bounded by the manager (_allowed_count)
    return configured


def first_generation() -> int:
    text = os.environ.pop(GENERATION_ENV, "")
    return int(text) if text.isdigit() and int(text) > 0 else 1


class Upgrading:
    """The manager's side of an upgrade, old and new (a mixin of the manager)."""

    def start_upgrade(self, waiter: socket.socket | None = None) -> None:
        refusal = self.ending_refusal("upgrade")  # a retired manager names its successor
        if refusal is None and self.upgrade is not None:
            refusal = f"upgrade refused: an upgrade to manager {self.upgrade.pid} is in progress"
        elif refusal is None and self.phase is not Phase.RUNNING:
            refusal = f"upgrade refused: the manager is {self.phase.value}"
        elif refusal is None and self.predecessor is not None and self._predecessor_retiring():
            # its workers still hand their kept connections to us when their last requests end:
            # upgraded again, we would be gone, and it closed them (8 requests lost of 8,628)
            refusal = f"upgrade refused: the previous manager {self.predecessor} is still retiring"
        if refusal:
            log.warning("%s", refusal)
            if waiter is not None:
                control.reply(waiter, {"ok": False, "message": refusal})
            return
        try:
            self.upgrade = start(self.listeners, self.config.pidfile, self.config.ready_timeout * 2,
                                 self.generation + 1, (self.config.workers, self.target))
        except OSError as exc:  # no process to fork (a limit)
            reason = f"cannot start a new manager: {exc.strerror or exc}"
            self.pool.last_failure, self.failed_last = reason, True
            log.error("upgrade failed: %s; still serving", reason)
            if waiter is not None:
                control.reply(waiter, {"ok": False, "message": f"upgrade failed: {reason}"})
            return
        if waiter is not None:
            self.upgrade.waiters.append(waiter)
        systemd.notify(f"STATUS=upgrading: new manager {self.upgrade.pid} starting")

    def _predecessor_retiring(self) -> bool:
        """Whether the manager we replaced still runs (its control socket: a pid alone may
        have been reused by now); forgotten once it is gone."""
        try:
            running = control.is_manager(self.predecessor or 0)
        except control.ControlError as exc:
            log.warning("%s; taking it as gone", exc)
            running = False
        if not running:
            self.predecessor = None
        return running

    def _announce_to_predecessor(self) -> None:
        """We replace an old manager: tell it (it retires) and tell systemd we are the main pid."""
        try:
            answer = control.ask(self.predecessor or 0, f"upgraded {os.getpid()}", 10.0)
        except control.ControlError as exc:
            log.error("cannot reach the old manager %s: %s", self.predecessor, exc)
            if not control.alive(self.predecessor or 0):
                self._take_over_sockets()  # gone: nobody else will remove them
                self.took_over = True
            return
        if answer.get("ok"):
            self._take_over_sockets()
            self.took_over = True
            systemd.notify(f"MAINPID={os.getpid()}", "READY=1", f"STATUS={self.status_line()}")
            log.info("took over from manager %d", self.predecessor)

    def _take_over_sockets(self) -> None:
        """We are in charge: the pidfile names us from now on (until now it named the old
        manager, so that `stop`, `reload` and `status` reached the manager serving, which
        stops an upgrade in progress with itself), and the old manager no longer removes its
        unix sockets at exit: now we do."""
        _write_pid(self.config.pidfile)
        for lst in self.listeners:
            lst.unlink_path = lst.takeover_path or lst.unlink_path

    def _successor_speaking(self, conn: socket.socket, pid_text: str) -> Upgrade | None:
        """Our upgrade, if `conn` is its successor speaking while it starts; else refused.
        The kernel's word for who speaks (SO_PEERCRED), not the message's: any process of the
        same user may connect, the application's workers included. Accepted after the
        hand-over, a 'successor-failed' cut the retired manager off from its successor."""
        up = self.upgrade
        if (up is None or pid_text != str(up.pid) or up.successor_ready or self.phase is not Phase.RUNNING
                or control.peer_credentials(conn)[0] != up.pid):
            control.reply(conn, {"ok": False, "message": "no such upgrade in progress"})
            return None
        return up

    def _on_successor(self, conn: socket.socket, pid_text: str) -> None:
        up = self._successor_speaking(conn, pid_text)
        if up is None:
            return
        up.successor_ready = True
        self.phase = Phase.RETIRED
        if up.oldbin:  # as nginx does: our pid stays at hand while we retire
            _write_pid(up.oldbin)
        self.reload_pending = False
        self.respawn_at.clear()
        for lst in self.listeners:
            lst.unlink_path = None  # the new manager removes the socket at its exit
        log.info("upgrade: manager %d is ready; retiring %s", up.pid, logs.workers(len(self.workers)))
        systemd.hand_over_main_pid(up.pid, f"upgraded: manager {up.pid} serving")
        control.reply(conn, {"ok": True})
        for waiter in up.waiters:
            control.reply(waiter, {"ok": True, "pid": up.pid, "message": f"manager {up.pid} serving"})
        up.waiters.clear()
        self._answer_waiters(None, {"ok": False, "message": f"handed over to manager {up.pid}"})
        for rec in list(self.workers.values()):
            self._dismiss(rec)
        self._title()

    def _on_successor_failed(self, conn: socket.socket, pid_text: str, reason: str) -> None:
        """Our successor could not start, and says why (tell_predecessor) before it exits."""
        up = self._successor_speaking(conn, pid_text)
        if up is None:
            return
        control.reply(conn, {"ok": True})
        self._upgrade_failed(f"new manager {up.pid}: {reason}")

    def _upgrade_failed(self, reason: str, kill: bool = False, serving: bool = True) -> None:
        up = self.upgrade
        if up is None:
            return
        self.upgrade = None
        if kill:
            try:
                os.kill(up.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.pool.last_failure, self.failed_last = reason, True
        log.error("upgrade failed: %s%s", reason, "; still serving" if serving else "")
        systemd.notify(f"STATUS=upgrade failed: {reason}; {self.status_line()}")
        for waiter in up.waiters:
            control.reply(waiter, {"ok": False, "message": f"upgrade failed: {reason}"})
