"""Listening sockets: bind them, or take them from systemd or a parent manager.

The manager opens every listening socket before it forks, so workers inherit
them and the sockets stay open across reloads: connections that arrive while
workers are replaced wait in the kernel's backlog and are served.
"""

from __future__ import annotations

import array
import errno
import grp
import logging
import os
import pwd
import socket
import stat
from dataclasses import dataclass

from . import systemd
from .config import Address, Config, ConfigError

log = logging.getLogger("fcgidaemon")

INHERIT_ENV = "FCGIDAEMON_FDS"  # comma-separated listening fds handed to a re-executed manager


@dataclass
class Listener:
    sock: socket.socket
    name: str
    unlink_path: str | None = None  # a unix socket we created, removed at exit
    # a unix socket a previous manager created and will hand over to us (SIGUSR2): ours to remove
    # only once it has accepted us; a new manager that fails must leave the old one its socket
    takeover_path: str | None = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()
        if self.unlink_path:
            try:
                os.unlink(self.unlink_path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove socket %s: %s", self.unlink_path, exc)


def open_listeners(config: Config, owned_paths: set[str] = frozenset()) -> list[Listener]:
    """Sockets from a previous manager (upgrade) or systemd if any were passed, else bind.

    A passed unix socket is unlinked at exit only if it is in `owned_paths` (a previous
    manager that created it hands that duty over: see `Listener.takeover_path`); systemd's
    sockets never are.
    """
    inherited = inherited_sockets()
    passed = inherited or systemd.listen_sockets() or listening_stdin()
    if passed:
        listeners = [validate_passed(sock) for sock in passed]
        for lst in listeners:
            path = unix_path(lst.sock)
            if path in owned_paths:
                lst.takeover_path = path
        if inherited and not any(_binds(lst, config.bind) for lst in listeners):
            log.warning("--bind %s is not where the old manager listened (%s): an upgrade keeps "
                        "the listening sockets; a restart changes them", config.bind,
                        ", ".join(lst.name for lst in listeners))
        return listeners
    if config.bind.path is not None:
        return [bind_unix(config.bind.path, config)]
    return bind_tcp(config.bind, config.backlog)


def _binds(lst: Listener, address: Address) -> bool:
    """Whether `lst` is what --bind `address` would have opened (as far as a port or a path
    tells: a changed host on the same port goes unnoticed)."""
    if address.path is not None:
        return unix_path(lst.sock) == address.path
    return lst.sock.family != socket.AF_UNIX and lst.sock.getsockname()[1] == address.port


def inherited_sockets() -> list[socket.socket]:
    text = os.environ.pop(INHERIT_ENV, "")
    return [socket.socket(fileno=int(fd)) for fd in text.split(",") if fd.strip()]


def listening_stdin() -> list[socket.socket]:
    """FCGI_LISTENSOCK_FILENO (FastCGI spec 2.2): a web server or spawner that starts a FastCGI
    application (mod_fcgid, spawn-fcgi, `cgi-fcgi -start`) passes the listening socket as its
    stdin. It was ignored: the daemon bound --bind instead, and the spawner's address took
    connections that nobody served. Taken on a descriptor of its own; stdin is /dev/null then."""
    try:
        sock = socket.socket(fileno=os.dup(0))  # ENOTSOCK (or EBADF) for any ordinary stdin
    except OSError:
        return []
    try:
        listening = (sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                     and sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_STREAM)
    except OSError:
        listening = False
    if not listening:
        sock.close()
        return []
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    log.info("listening socket passed as stdin (FCGI_LISTENSOCK_FILENO): serving it, not --bind")
    return [sock]


def validate_passed(sock: socket.socket) -> Listener:
    """A passed fd must be a listening stream socket; we never unlink its path."""
    try:
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as exc:
        raise ConfigError(f"passed fd {sock.fileno()} is not a socket: {exc.strerror}") from None
    if kind != socket.SOCK_STREAM or not listening:
        raise ConfigError(f"passed fd {sock.fileno()} is not a listening stream socket")
    # passed without close-on-exec: a program the application runs (os.system, a subprocess
    # with close_fds=False) then held the listening socket, past our exit too
    sock.set_inheritable(False)
    defer_accept(sock)
    return Listener(sock, describe(sock) + " (passed)")


def defer_accept(sock: socket.socket) -> None:
    """TCP_DEFER_ACCEPT: accept() returns a connection once its first bytes are in, so a
    worker that accepts can serve at once, and idle connections never reach a worker."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)


def unix_path(sock: socket.socket) -> str | None:
    """The filesystem path of a unix socket (None for any other, or an abstract one)."""
    if sock.family != socket.AF_UNIX:
        return None
    addr = sock.getsockname()
    path = addr if isinstance(addr, str) else addr.decode(errors="surrogateescape")
    return path if path and not path.startswith("\0") else None


def describe(sock: socket.socket) -> str:
    addr = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{addr if isinstance(addr, str) else addr.decode(errors='replace')}"
    if sock.family == socket.AF_INET6:
        return f"[{addr[0]}]:{addr[1]}"
    return f"{addr[0]}:{addr[1]}"


def bind_tcp(address: Address, backlog: int) -> list[Listener]:
    host = address.host or "0.0.0.0"
    try:
        # an ASCII name goes as bytes: a str is passed through the "idna" codec, whose import
        # (unicodedata, stringprep: ~0.5 MB) would stay in the manager that every worker shares
        infos = socket.getaddrinfo(host.encode() if host.isascii() else host, address.port,
                                   socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--bind {address}: cannot resolve {host!r}: {exc.strerror}") from None
    listeners: list[Listener] = []
    seen: set[tuple[int, str]] = set()
    try:
        for family, kind, proto, _, sockaddr in infos:
            if (family, sockaddr[0]) in seen:
                continue
            seen.add((family, sockaddr[0]))
            listeners.append(_bind_one(family, kind, proto, sockaddr, backlog, address))
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def _bind_one(family: int, kind: int, proto: int, sockaddr: tuple, backlog: int,
              address: Address) -> Listener:
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
        defer_accept(sock)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"--bind {address}: address already in use") from None
        raise ConfigError(f"--bind {address}: cannot bind {sockaddr[0]}: {exc.strerror}") from None
    return Listener(sock, describe(sock))


def bind_unix(path: str, config: Config) -> Listener:
    remove_stale_unix_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~config.socket_mode)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"--bind unix:{path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old_umask)
    try:
        os.chmod(path, config.socket_mode)
        if config.socket_owner:
            uid, gid = resolve_owner(config.socket_owner)
            os.chown(path, uid, gid)
        sock.listen(config.backlog)
    except (OSError, ConfigError) as exc:
        sock.close()
        os.unlink(path)
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"--bind unix:{path}: {exc.strerror or exc}") from None
    return Listener(sock, f"unix:{path}", unlink_path=path)


def remove_stale_unix_socket(path: str) -> None:
    """Remove `path` only if it is a socket nobody listens on."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"--bind unix:{path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)  # a listener whose queue is full made a blocking connect wait for good
    try:
        probe.connect(path)
    except BlockingIOError:
        pass  # a listener with a full queue: in use
    except ConnectionRefusedError:
        log.info("removing stale socket %s", path)
        os.unlink(path)
        return
    except OSError as exc:
        raise ConfigError(f"--bind unix:{path}: cannot check existing socket: {exc.strerror}") from None
    finally:
        probe.close()
    raise ConfigError(f"--bind unix:{path}: address already in use")


def resolve_owner(spec: str) -> tuple[int, int]:
    user, _, group = spec.partition(":")
    try:
        entry = pwd.getpwnam(user)
        gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid
    except KeyError:
        raise ConfigError(f"unknown user or group in {spec!r}") from None
    return entry.pw_uid, gid


def recv_fds(sock: socket.socket, bufsize: int, maxfds: int) -> tuple[bytes, list[int]]:
    """socket.recv_fds, with the descriptors close-on-exec as they arrive (MSG_CMSG_CLOEXEC).
    Received without it, a kept connection a worker was handed was inherited by every program
    its application started (os.system, subprocess with close_fds=False): one such program
    held the connection open after the worker had closed it, and the web server's next
    request on it waited for an answer that could not come. Accepted ones never were."""
    fds = array.array("i")
    msg, ancdata, flags, _ = sock.recvmsg(bufsize, socket.CMSG_LEN(maxfds * fds.itemsize),
                                          socket.MSG_CMSG_CLOEXEC)
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    if flags & socket.MSG_CTRUNC:  # the kernel closed what it could not give us
        log.error("descriptors sent with a message were lost on receipt (%d received): no "
                  "room for them (the descriptor limit?)", len(fds))
    return msg, list(fds)
