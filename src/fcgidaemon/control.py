"""The control channel: how `fcgidaemon reload --wait`, `status` and `stop` talk to a manager.

The manager listens on an abstract unix socket named after its pid and a random
token (``@fcgidaemon/<pid>/<token>``): nothing is written to disk, so it works
with ``--pid`` alone (systemd's ``$MAINPID``: clients find the name in
/proc/net/unix and check the listener's pid), and it vanishes with the process.  Only root
and the manager's own user may use it (checked with SO_PEERCRED).  A request is
one line (``reload``, ``status``); the answer is one JSON line.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

from . import sockets
from . import status as status_page

log = logging.getLogger("fcgidaemon")

ENCODING = "utf-8"


PREFIX = "fcgidaemon/"
LISTENING = "00010000"  # /proc/net/unix's Flags of a listening socket (__SO_ACCEPTCON)


def own_address() -> bytes:
    """``@fcgidaemon/<pid>/<random>``: a name nobody can take first. Named after the pid alone,
    any local user could bind the names of the next few hundred pids and the service could
    not start (nor upgrade): abstract names have no permissions. os.urandom, not `secrets`:
    that one imports hmac and hashlib, which load OpenSSL's libcrypto into the manager (11 ms
    of its start, and 3 MB of memory once initialised)."""
    return f"\0{PREFIX}{os.getpid()}/{os.urandom(8).hex()}".encode()


def candidates(pid: int) -> list[bytes]:
    """The listening abstract sockets named like manager `pid`'s control socket (read from
    /proc/net/unix: this network namespace's). Anyone may bind such a name too: `connect`
    tells the manager's own by its credentials."""
    head, legacy = f"@{PREFIX}{pid}/", f"@{PREFIX}{pid}"
    found = []
    try:
        with open("/proc/net/unix") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) >= 8 and fields[3] == LISTENING and (
                        fields[7].startswith(head) or fields[7] == legacy):
                    found.append(b"\0" + fields[7][1:].encode())
    except OSError as exc:
        raise ControlError(f"cannot tell whether {pid} is a manager: {exc}") from None
    return found


def listen_legacy() -> socket.socket | None:
    """Also the name managers had before the random part (@fcgidaemon/<pid>), if nobody took
    it: a manager of that version upgraded (SIGUSR2) to this one hands its kept connections to
    it there. Our own clients check whose a socket is (`connect`). Drop with the next release."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(f"\0{PREFIX}{os.getpid()}".encode())
        sock.listen(16)
    except OSError as exc:
        log.debug("the old-style control socket name is taken: %s", exc)
        sock.close()
        return None
    sock.setblocking(False)
    return sock


def connect(pid: int, timeout: float) -> socket.socket:
    """A connection to manager `pid`'s control socket: the one of its names whose listener is
    process `pid` (SO_PEERCRED), not one another user bound to mislead us."""
    names = candidates(pid)
    if not names:
        raise ControlError(f"process {pid} is not an fcgidaemon manager (no control socket)")
    failure: OSError | None = None
    for name in names:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(name)
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError as exc:  # a full queue (TimeoutError), or gone since it was listed
            sock.close()
            failure = exc
            continue
        if struct.unpack("3i", creds)[0] == pid:
            return sock
        sock.close()
    if isinstance(failure, TimeoutError):
        raise ControlError(f"no answer from manager {pid} within {timeout:g}s")
    raise ControlError(f"process {pid} is not an fcgidaemon manager (no control socket of its own)")


class ControlError(Exception):
    """The manager could not be reached or answered with a failure."""


class NotRunning(ControlError):
    """No manager runs under that pid (gone, or another program has the pid now)."""


def listen() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(own_address())
    sock.listen(16)
    sock.setblocking(False)
    return sock


def peer_allowed(conn: socket.socket) -> bool:
    _, uid, _ = peer_credentials(conn)
    return uid in (0, os.geteuid())


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from the kernel."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


def read_command(conn: socket.socket, timeout: float = 1.0) -> tuple[str, list[int]]:
    """One command line, and any file descriptors sent with it (SCM_RIGHTS), within `timeout`
    in all: the manager's loop waits meanwhile, so a client that dribbles its command must
    not hold it longer (with a timeout per read, one byte a second held it 256 s)."""
    deadline = time.monotonic() + timeout
    data, fds = b"", []
    while b"\n" not in data and len(data) < 256:
        try:
            conn.settimeout(max(0.001, deadline - time.monotonic()))
            chunk, got = sockets.recv_fds(conn, 256, 64)
        except BaseException as exc:  # those already received die with the command, whatever
            for fd in fds:  # ended it: kept, every worker forked later inherited them
                os.close(fd)
            if isinstance(exc, TimeoutError):
                raise TimeoutError(f"no complete command within {timeout:g}s") from None
            raise
        fds += got
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0].decode(ENCODING, "replace").strip(), fds


def send_fds(pid: int, command: str, fds: list[int], timeout: float = 5.0) -> None:
    """Hand connections to manager `pid` (used by a retiring manager after an upgrade)."""
    sock = connect(pid, timeout)
    try:
        socket.send_fds(sock, [command.encode(ENCODING) + b"\n"], fds)
        sock.recv(256)  # wait for the answer: the fds have been taken
    finally:
        sock.close()


def reply(conn: socket.socket, payload: dict[str, Any]) -> None:
    try:
        conn.settimeout(1.0)
        conn.sendall((json.dumps(payload) + "\n").encode(ENCODING))
    except OSError:
        pass
    finally:
        conn.close()


# --------------------------------------------------------------------------- client side


@dataclass
class Target:
    pid: int

    @classmethod
    def from_args(cls, pid: int | None, pidfile: str | None) -> "Target":
        if pid is None:
            if not pidfile:
                raise ControlError("give --pid PID or --pidfile FILE")
            pid = read_pidfile(pidfile)
        if not alive(pid):
            raise NotRunning(f"no process {pid}")
        if not is_manager(pid):  # a pidfile left behind names whatever process has that pid now
            raise NotRunning(f"process {pid} is not an fcgidaemon manager (no control socket)")
        return cls(pid)


def read_pidfile(pidfile: str) -> int:
    """The pid a pidfile names. No pidfile is a manager that does not run: the manager
    removes it on exit, and systemd's RuntimeDirectory= takes its directory away at stop,
    where `status` said "cannot read pid" and exit 1, not LSB's 3."""
    try:
        with open(pidfile) as fh:
            text = fh.read(64).strip()
    except FileNotFoundError:
        raise NotRunning(f"no pidfile {pidfile}") from None
    except OSError as exc:
        raise ControlError(f"cannot read --pidfile {pidfile}: {exc.strerror or exc}") from None
    if not text.isdigit() or not text.isascii() or int(text) < 1:
        raise ControlError(f"--pidfile {pidfile} holds no pid ({text[:20]!r})")
    return int(text)


def write_pidfile(path: str | None) -> None:
    """Write our pid to `path` atomically: a reader sees the old pid or ours, never a part."""
    if not path:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except PermissionError as exc:  # a directory --user may not write (/run): the file itself,
        try:  # made ours at the start (cli), is rewritten in place; after a SIGUSR2 the pidfile
            _rewrite(path)  # kept naming the old manager, gone, and `stop` said "no process"
        except OSError:
            raise OSError(exc.errno, exc.strerror, path) from None
    except OSError as exc:  # said of the pidfile, not of our temporary name for it
        raise OSError(exc.errno, exc.strerror, path) from None


def _rewrite(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)


def claim_pidfile(path: str | None) -> None:
    """Write the pidfile, unless it names another manager that is running: a second daemon
    given the same --pidfile (by mistake) overwrote it, then removed it when it exited, and
    the first one served on out of reach of `fcgidaemon stop --pidfile`."""
    if not path:
        return
    try:
        with open(path) as fh:
            other = int(fh.read().strip())
    except (OSError, ValueError):
        other = 0
    if other and other != os.getpid() and alive(other) and is_manager(other):
        try:  # its own control socket, by the listener's pid: a pid reused by a process that
            connect(other, 1.0).close()  # bound a name like it is no manager
        except ControlError:
            pass
        else:
            raise PidfileTaken(f"--pidfile {path} names manager {other}, which is running")
    write_pidfile(path)


class PidfileTaken(Exception):
    """The pidfile names another running manager."""


def remove_pidfile(path: str | None) -> None:
    """Remove the pidfile only if it is still ours (a successor may have replaced it)."""
    if not path:
        return
    try:
        with open(path) as fh:
            if fh.read().strip() != str(os.getpid()):
                return
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove pidfile %s: %s", path, exc)


def is_manager(pid: int) -> bool:
    """Whether `pid` has bound a manager's control socket (from its first step, before the
    preload). Read from /proc/net/unix, not by connecting: the manager reads a command from
    each connection."""
    return bool(candidates(pid))


def send_signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except PermissionError:
        raise ControlError(f"permission denied to signal manager {pid} (run as root or as "
                           f"its user)") from None
    except ProcessLookupError:
        raise ControlError(f"no process {pid}") from None


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def ask(pid: int, command: str, timeout: float) -> dict[str, Any]:
    """Send one command and wait (bounded) for the manager's one-line JSON answer."""
    sock = connect(pid, timeout)
    try:
        try:
            sock.sendall(command.encode(ENCODING) + b"\n")
        except BrokenPipeError:  # refused at once ("permission denied") and closed: the answer
            pass  # is still there to read
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except ConnectionRefusedError:
        raise ControlError(f"process {pid} is not an fcgidaemon manager (no control socket)") from None
    except TimeoutError:
        raise ControlError(f"no answer from manager {pid} within {timeout:g}s") from None
    except OSError as exc:
        raise ControlError(f"manager {pid}: {exc}") from None
    finally:
        sock.close()
    if not data:
        raise ControlError(f"manager {pid} closed the control connection without an answer")
    return json.loads(data)


def stop(pid: int, timeout: float, quick: bool = False) -> None:
    """SIGTERM (or SIGQUIT) and wait, bounded, for the manager to exit."""
    send_signal(pid, signal.SIGQUIT if quick else signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            raise ControlError(f"manager {pid} still running after {timeout:g}s")
        time.sleep(0.05)


# --------------------------------------------------------------------------- manager side



class ControlCommands:
    """The manager's side of the control socket (a mixin of the manager)."""

    def _on_control(self, listener: socket.socket | None = None) -> None:
        try:
            conn, _ = (listener or self.control).accept()
        except BlockingIOError:
            return
        try:
            if not peer_allowed(conn):
                reply(conn, {"ok": False, "message": "permission denied"})
                return
            command = read_command(conn)
        except OSError as exc:
            log.warning("control connection failed: %s", exc)
            conn.close()
            return
        command, fds = command
        if command == "adopt":
            self._pass_on(fds, None)
            reply(conn, {"ok": True})
            return
        for fd in fds:
            os.close(fd)
        if command.startswith("upgraded "):
            self._on_successor(conn, command.split()[1])
        elif command.startswith("successor-failed "):
            _, pid_text, reason = (command + " ").split(" ", 2)
            self._on_successor_failed(conn, pid_text, reason.strip())
        elif command == "upgrade":
            self.start_upgrade(conn)
        elif command == "status":
            reply(conn, self.status())
        elif command == "reload":
            refusal = self.ending_refusal("reload")
            if refusal:
                reply(conn, {"ok": False, "message": refusal})
                return
            log.info("reload requested over the control socket")
            self.reload_waiters.append((conn, self.generation + 1))
            self.request_reload()
        else:
            reply(conn, {"ok": False, "message": f"unknown command {command!r}"})

    def _answer_waiters(self, generation: int | None, payload: dict) -> None:
        """Answer everyone waiting for a reload up to `generation` (None: everyone)."""
        keep = []
        for conn, wanted in self.reload_waiters:
            if generation is None or wanted <= generation:
                reply(conn, payload)
            else:
                keep.append((conn, wanted))
        self.reload_waiters = keep

    def status(self) -> dict:
        """What `fcgidaemon status` shows: the status page's snapshot plus the manager's table."""
        self._publish()
        snap = status_page.snapshot(self.board, self.config.app)
        by_pid = {p["pid"]: p for p in snap.pop("processes")}
        now = time.monotonic()
        snap.update({
            "ok": True, "pid": os.getpid(), "newest_generation": self.generation,
            "listeners": [lst.name for lst in self.listeners],
            "worker_list": [{**by_pid.get(w.pid, {}), "pid": w.pid, "slot": w.slot,
                             "generation": w.generation, "state": w.state.value,
                             "activity": by_pid.get(w.pid, {}).get("state", ""),
                             "age": round(now - w.started, 3)}
                            for w in sorted(self.workers.values(), key=lambda w: (w.generation, w.slot))],
        })
        return snap
