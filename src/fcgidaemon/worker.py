"""Life in a worker process, from the fork to ``os._exit``.

A worker imports the application after the fork (so each generation runs the
code on disk when it was started), tells the manager it is ready, then waits
with epoll on the shared listening sockets *and* on every connection it holds,
serving whichever request is ready, one at a time.  Waiting on kept connections
alongside the listener is what stops idle FCGI_KEEP_CONN connections from
pinning the worker.

Stopping never loses accepted work:

* ``retire`` (a message from the manager during a reload): stop accepting,
  finish the request in progress, serve what is half-received, and hand every
  other connection (idle, or with a next request waiting in the kernel) to the
  manager over the channel (SCM_RIGHTS), which passes it to a worker of the new
  generation; bytes still in the kernel travel with it;
* SIGTERM (a stop): the same, but idle kept connections are closed,
  and a connection that has not sent its first request yet is still served;
* SIGINT / SIGQUIT: exit at once.

Why one module of this size (about 800 lines): the loop, the three ways of stopping and the
hand-overs all act on one state, the worker's connection table, its epoll set and its stop
mode, and most defects fixed here were orderings between them (a hand-over arriving as the
stop begins, a connection accepted in the same wake-up as the retire message). The protocol
is in fastcgi.py, the application's adapter in wsgi.py, the scoreboard in scoreboard.py.
"""

from __future__ import annotations

import atexit
import errno
import faulthandler
import logging
import os
import random
import select
import signal
import socket
import _socket
import sys
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import NoReturn

from . import accesslog, loader, logs, selfcheck, sharing, sockets, status, titles
from .config import Config, in_networks
from .scoreboard import Scoreboard, SlotState
from .fastcgi import (DRAIN_LIMIT, Connection, ConnectionLost, Limits, ProtocolError,
                      RequestAborted, Server, peer_idle, readable)
from .wsgi import make_handler

log = logging.getLogger("fcgidaemon")

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_IMPORT_FAILED = 3
EXIT_APP_NOT_FOUND = 4  # the module imported, the callable is not in it: the same every time

MSG_READY = b"ready"
MSG_IMPORT_FAILED = b"import-failed"
MSG_HANDOFF = b"handoff"
MSG_ADOPT = b"adopt"
MSG_RETIRE = b"retire"
MSG_STOP = b"stop"  # a graceful stop, as SIGTERM, which the application may block or take over
MSG_QUOTA = b"quota"  # --max-requests reached: please start my replacement
MSG_EXIT_ASKED = b"exit-asked"  # the application raised SystemExit: the same, for that reason
MSG_STDLIB = b"stdlib"  # "stdlib\nNAME\nNAME...": standard-library modules we imported (--share-stdlib)
MSG_BALANCE = b"balance"  # "balance N": hand N kept connections back (the manager evens them out)
MSG_BALANCED = b"balanced"  # the answer to "balance N", after the hand-offs it made
MAX_MESSAGE = 65536
FDS_PER_MESSAGE = 16  # connections in one MSG_ADOPT or MSG_HANDOFF at most (both ends read as many)
LISTENER_EVENTS = select.EPOLLIN | select.EPOLLEXCLUSIVE  # see Worker._register
ACCEPT_PAUSE = 0.5  # seconds without accepting after accept() ran out of descriptors or memory
OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class StopMode(Enum):
    NONE = "none"
    HANDOFF = "handoff"  # retiring in a reload: idle connections go to the new generation
    CLOSE = "close"  # stopping: idle kept connections are closed


@dataclass
class WorkerSpec:
    """What the manager hands to a freshly forked worker."""

    config: Config
    slot: int
    generation: int
    listeners: list[socket.socket]
    channel: socket.socket
    manager_pid: int
    board: Scoreboard | None = None
    board_index: int = 0
    close_fds: list[int] = field(default_factory=list)
    sigmask: set[int] | None = None  # the mask to restore once our handlers are in place
    shared: frozenset[str] = frozenset()  # standard modules the manager imported for us (sharing.py)


def run(spec: WorkerSpec) -> NoReturn:
    """The whole life of a worker; never returns. A worker that served and leaves as told runs
    the atexit handlers (the application's cleanup: the warning about its own signal handlers
    points it there; multiprocessing's, which ends its daemonic children, orphaned at every
    reload before, holding the listening port after a stop), as a process ending normally does;
    one that crashed or never got to serve does not. Then _exit: nothing of the manager's runs."""
    code = EXIT_CRASH
    try:
        worker = Worker(spec)
        code = worker.run()
        if code == EXIT_OK and worker.accepting:
            atexit._run_exitfuncs()  # noqa: SLF001 - what interpreter exit runs; errors printed
    except BaseException:  # noqa: BLE001 - the last resort before _exit
        log.critical("worker crashed", exc_info=True)
    finally:
        _flush_output()
        logging.shutdown()
    os._exit(code)


def _flush_output() -> None:
    """What the application printed and Python still buffers (stdout to a file or a pipe is
    block-buffered without PYTHONUNBUFFERED): _exit skips the flush, and it was lost."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError) as exc:  # closed, or its reader gone
            log.debug("cannot flush %s: %s", getattr(stream, "name", stream), exc)


class Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.config = spec.config
        self.stop_mode = StopMode.NONE
        self.accepting = False  # the listeners are in the epoll set: see _on_stop_signal
        self.conns: dict[int, Connection] = {}
        self.registered: set[int] = set()  # connection fds in the epoll set
        # connections holding another complete request in their buffer after their turn: the
        # kernel does not report them (what they sent has been read), so the loop does
        self.backlog: dict[int, Connection] = {}
        self.next_sweep = 0.0
        self.requests = 0
        self.replacement_asked = False  # MSG_QUOTA or MSG_EXIT_ASKED sent
        # a descriptor kept in reserve, given up at the descriptor limit to take the connection
        # whose wake-up came to us and pass it on (_hand_on)
        self.spare: int | None = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.since = 0.0  # when the request in progress started (scoreboard clock); 0: none
        self.epoll = select.epoll()
        self.listener_fds = {sock.fileno(): sock for sock in spec.listeners}
        # (family, type, proto) as plain ints, for _accept
        self.listener_kinds = {sock.fileno(): (int(sock.family), int(sock.type), sock.proto)
                               for sock in spec.listeners}
        self.server: Server | None = None
        self.access_log: accesslog.AccessLog | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self.board = spec.board or Scoreboard(1)
        self.index = spec.board_index if spec.board else 0
        self.title = titles.BusyTitle(f"worker {spec.slot} gen {spec.generation}")
        quota = (self.config.max_requests + random.randint(0, self.config.max_requests_jitter)
                 if self.config.max_requests else 0)
        self.replace_at = quota or sys.maxsize  # --max-requests: this many requests, then replaced
        self.paused: dict[int, float] = {}  # listener fd -> when to watch it again (_pause)
        self.accept_failures = logs.Throttle(10.0)  # for want of descriptors or memory
        self.stall_lines = logs.Throttle(10.0)  # "no complete request within" (_sweep)
        self.channel_closed = False  # the manager's end of the channel is gone (EOF)
        self.modules_mark = sharing.newest_module()  # the manager's last, then the last reported

    # ------------------------------------------------------------------ start

    def run(self) -> int:
        self._setup_process()
        try:
            loader.pin_release()  # first: unshadow() looks along sys.path too
        except loader.AppImportError as exc:
            return self._failed_start(exc.summary)
        for name in sharing.unshadow(self.spec.shared):
            log.debug("the application has a module of its own named %s: not the shared one", name)
        try:
            app = loader.load_app(self.config.app)
        except loader.AppImportError as exc:
            log.debug("import failed: %s", exc.summary)
            self._failed_start(f"{exc.summary}\n{exc.text}")
            return EXIT_APP_NOT_FOUND if exc.not_found else EXIT_IMPORT_FAILED
        self._keep_signals()
        if self.config.reload_check:
            failure = selfcheck.self_check(app, self.config.reload_check)
            if failure:
                return self._failed_start(failure)
        if self.config.access_log:
            try:
                self.access_log = accesslog.AccessLog(self.config.access_log)
            except OSError as exc:  # removed or made unwritable since the manager checked it
                return self._failed_start(f"cannot open --access-log {self.config.access_log}: "
                                          f"{exc.strerror or exc}")
        app = self._wrap(app)
        limits = Limits(read_timeout=self.config.read_timeout, max_params=self.config.max_params,
                        max_body=self.config.max_body)
        on_response = self.access_log.record if self.access_log is not None else None
        try:
            self.server = Server(make_handler(app, on_response), limits, pool_size=self._pool_size,
                                 on_done=self._request_done, on_exit_asked=self._on_exit_asked)
        except OSError as exc:  # its read buffer (a memory limit): this worker cannot serve
            return self._failed_start(f"cannot map the read buffer: {exc.strerror or exc}")
        if self._retired_while_starting():
            return EXIT_OK
        self._register()
        self.board.set_state(self.index, SlotState.IDLE)
        self._report_stdlib()
        self.spec.channel.send(MSG_READY)
        self._title("idle")
        self._loop()
        return EXIT_OK

    def _pool_size(self) -> int:
        """FCGI_GET_VALUES (one request at a time per worker, 64 connections each): the most
        workers there may be, --max-workers in dynamic mode, else the manager's count now
        (SIGTTIN/SIGTTOU move it). --workers was answered, whatever the pool had become."""
        return self.config.max_workers or max(1, self.board.read_pool().target)

    def _failed_start(self, reason: str) -> int:
        """Tell the manager why we cannot serve (a reload then fails with this reason)."""
        self.spec.channel.send((MSG_IMPORT_FAILED + b"\n" + reason.encode())[:MAX_MESSAGE])
        return EXIT_IMPORT_FAILED

    def _wrap(self, app: loader.WSGIApp) -> loader.WSGIApp:
        """Our own pages sit in front of the application."""
        config = self.config
        if config.status_path or config.ping_path:
            app = status.middleware(app, self.board, config.app, config.status_path, config.ping_path,
                                    config.status_allow)
        return app

    def _setup_process(self) -> None:
        for fd in self.spec.close_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        logs.set_context(role="worker", generation=self.spec.generation)
        self._title("starting")
        for signum in (signal.SIGCHLD, signal.SIGUSR1, signal.SIGPIPE):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        # the manager's signals, sent to every process of the service (`systemctl kill -s USR2`
        # signals the whole cgroup): by default USR2 ended a worker mid-request and TTIN/TTOU
        # stopped it. A handler, not SIG_IGN, which programs the application runs would inherit
        # SIGHUP too, the deploy signal: taken as a stop, a group-wide one (`systemctl kill -s
        # HUP`, `pkill -HUP`, a closed terminal) made every worker close its idle kept
        # connections while the manager's reload was handing them over: Apache answered 503
        # and nginx 502 for requests sent on them (13-19 per 30 reloads, found by review)
        for signum in (signal.SIGHUP, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(signum, _not_for_workers)
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, _exit_now)
        signal.signal(signal.SIGQUIT, _exit_now)
        # the manager asks for a stack dump of a slow or hung request: written even while the
        # application is stuck inside a C call
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True, chain=False)
        if self.spec.sigmask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.spec.sigmask)

    def _keep_signals(self, when: str = "on import") -> None:
        """An application that set its own handler for a stop signal (for its own cleanup), at
        import or later while it serves (the sweep looks again), took it from us: SIGTERM no
        longer let the request in flight finish, and a reload's retiring worker never left; so
        too SIGUSR1, the stack dump of --slow-log and --timeout. Ours are put back, and that
        is said."""
        ours = {signal.SIGTERM: self._on_stop_signal, signal.SIGHUP: _not_for_workers,
                signal.SIGINT: _exit_now, signal.SIGQUIT: _exit_now,
                signal.SIGUSR1: signal.SIG_DFL}  # the stack dump's (faulthandler, below Python)
        for signum, handler in ours.items():
            if signal.getsignal(signum) != handler:
                log.warning("the application set its own %s handler %s; the worker's is put "
                            "back (use atexit for cleanup)", signal.Signals(signum).name, when)
                signal.signal(signum, handler)
                if signum == signal.SIGUSR1:  # taken, --slow-log and --timeout dumped nothing
                    faulthandler.unregister(signal.SIGUSR1)  # (register alone keeps its old state)
                    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True, chain=False)

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        # only records: a request in progress finishes first. Before the listeners are watched
        # nothing can be in progress: leave at once, not after an import that may take long
        # (or hang: a stop would wait out --graceful-timeout for a worker with nothing to do)
        if not self.accepting:
            os._exit(EXIT_OK)
        # a retiring worker too: the stop that follows a reload has no generation to hand to,
        # so what waits on its connections is served, then they are closed
        self._closing()

    def _retired_while_starting(self) -> bool:
        """Whether the manager retired us before we were ready (its generation was replaced
        meanwhile): we leave without accepting anything. It sends SIGTERM too, which ends a
        worker still importing at once, unless the application swallowed it with a handler of
        its own; then this is what keeps the code of a worker nobody chose from serving."""
        try:
            msg = self.spec.channel.recv(MAX_MESSAGE, socket.MSG_DONTWAIT | socket.MSG_PEEK)
        except BlockingIOError:
            return False
        except OSError:  # the manager is gone: the loop's check of the parent ends us
            return False
        if msg in (MSG_RETIRE, MSG_STOP):
            log.info("%s before it was ready; leaving without serving",
                     "retired" if msg == MSG_RETIRE else "stopped")
            return True
        return False

    def _register(self) -> None:
        self.accepting = True
        for fd, sock in self.listener_fds.items():
            sock.setblocking(False)
            # LISTENER_EVENTS has EPOLLEXCLUSIVE: a new connection wakes one worker waiting in
            # epoll_wait, not every idle one (a herd in which all but one find accept() empty:
            # behind nginx about one wasted wake-up per request, 88 -> 73 us CPU per request
            # and +11% req/s without it). A busy worker is not waiting, so it does not take the
            # wake-up: the kernel passes it on to the next worker that is (and removes a woken
            # waiter at once, so a second connection wakes a second worker); with every worker
            # busy, each finds the listener ready when it next waits.
            self.epoll.register(fd, LISTENER_EVENTS)
        self.epoll.register(self._wake_r.fileno(), select.EPOLLIN)
        self.epoll.register(self.spec.channel.fileno(), select.EPOLLIN)

    # ------------------------------------------------------------------ loop

    def _loop(self) -> None:
        while True:
            if self.stop_mode is not StopMode.NONE and self._wind_down():
                return
            wait = self._resume() if self.paused else 1.0  # a paused listener comes back in time
            try:
                events = self.epoll.poll(0 if self.backlog else wait)
            except InterruptedError:
                continue
            # Everything the kernel reported gets a turn: each ready connection one request,
            # in the kernel's order, and after each of them one accept while the listener has
            # more (a new connection is served at once), so new and kept connections take turns
            # when every worker is busy. Serving only the first ready connection per wait would
            # starve the rest: level-triggered epoll keeps a connection that is ready again at
            # the head of its list, so one busy kept connection won every turn (p99 90 ms
            # behind nginx with fastcgi_keep_conn).
            ready: list[Connection] = []
            listener = None
            mode = self.stop_mode
            for fd, _ in events:
                conn = self.conns.get(fd)
                if conn is not None:
                    ready.append(conn)
                elif fd in self.listener_fds:
                    listener = self.listener_fds[fd]
                elif fd == self._wake_r.fileno():
                    _drain(self._wake_r)
                elif fd == self.spec.channel.fileno():
                    self._channel_message()
            if self.stop_mode is not mode:
                continue  # a stop or retire began in this wake-up: _wind_down decides first
            if self.backlog:  # after those the kernel reported: these have had a turn already
                ready += [conn for conn in self.backlog.values() if conn not in ready]
                self.backlog.clear()
            for conn in ready:
                if self.conns.get(conn.fd) is conn:  # not handed off or closed meanwhile
                    self._serve(conn)
                if listener is not None and not self._accept(listener):
                    listener = None  # nothing waiting: another worker took it
            if listener is not None and not ready:
                self._accept(listener)
            self._sweep()

    def _accept(self, listener: socket.socket) -> bool:
        """Accept one connection and serve it; False when there was none to take."""
        if self.stop_mode is not StopMode.NONE:
            return False  # _wind_down takes the one this wake-up may have been for
        return self._take(listener)

    def _take(self, listener: socket.socket) -> bool:
        try:
            # socket.socket.accept(), less its Python layer: that wraps the descriptor in the
            # Python subclass (an __init__, and family and type turned into enums: three enum
            # lookups), whose close() is Python code too, and the connection needs none of it.
            # 4-6 us of CPU per new connection (of ~75) on one core, loopback, hello app.
            fd, peer = listener._accept()
            sock = _socket.socket(*self.listener_kinds[listener.fileno()], fd)
        except (BlockingIOError, InterruptedError):
            return False  # another worker took it
        except OSError as exc:
            if exc.errno in OUT_OF_RESOURCES and listener.fileno() in self.listener_fds:
                if exc.errno == errno.EMFILE:
                    self._hand_on(listener)
                self._pause(listener, exc)
            else:
                log.warning("accept failed: %s", exc)
            return False
        self.board.connection_accepted(self.index)
        if self.config.allow_from and not self._allowed(sock, peer):
            return True
        # Serve it at once: with TCP_DEFER_ACCEPT its request is already here. Busy, we do
        # not take the next connection, so another idle worker accepts it. Only a connection
        # still open afterwards (kept, or its request not complete yet) joins the epoll set.
        conn = self._adopt(sock, register=False)
        self._serve(conn, socket.MSG_DONTWAIT)
        if not conn.closed:
            self._watch(conn)
            if listener.fileno() in self.listener_fds:  # not when _wind_down takes a last one
                self._requeue(listener)
        return True

    def _hand_on(self, listener: socket.socket) -> None:
        """At our descriptor limit (an application leaking files, or many kept connections):
        the wake-up for the connection waiting came to us alone (EPOLLEXCLUSIVE), and paused,
        we left it in the queue while another worker idled, until the next connection woke
        one (8 s and more with one client). The spare descriptor, given up, makes room to take
        it; it goes to the manager, which passes it to a worker with room or holds it until
        one has; the spare is taken again."""
        if self.spare is None or self.board.read_pool().target < 2:
            return  # alone, it waits in the queue for our descriptors to free: no one else can
        os.close(self.spare)
        self.spare = None
        try:
            fd, _ = listener._accept()
        except OSError:  # taken by another worker meanwhile, or no room after all
            fd = None
        if fd is not None:
            try:
                socket.send_fds(self.spec.channel, [MSG_HANDOFF], [fd])
                log.info("at the descriptor limit: a new connection passed on to the manager")
            except OSError as exc:
                log.warning("at the descriptor limit, cannot pass a new connection on: %s", exc)
            finally:
                os.close(fd)
        self._take_spare()

    def _take_spare(self) -> None:
        try:
            self.spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:  # still at the limit: tried again at the next sweep
            log.debug("cannot take the spare descriptor again: %s", exc)

    def _pause(self, listener: socket.socket, exc: OSError) -> None:
        """accept() found no descriptor (or memory) for a connection: it stays in the kernel's
        queue and the listener stays readable, so trying again at once spun at full CPU with a
        log line each time (146,000 lines in 2 s, measured). Stop watching the listener for
        ACCEPT_PAUSE instead (another worker may take the connection meanwhile), and say so
        at most every 10 s."""
        fd = listener.fileno()
        self.epoll.unregister(fd)
        self.paused[fd] = time.monotonic() + ACCEPT_PAUSE
        count = self.accept_failures.due()
        if count:
            log.warning("accept failed: %s (%d time(s) since the last such line); not accepting "
                        "for %gs at a time", exc.strerror or exc, count, ACCEPT_PAUSE)

    def _resume(self) -> float:
        """Watch paused listeners again once their pause is over; how long the next wait may be."""
        now = time.monotonic()
        for fd, when in list(self.paused.items()):
            if now >= when and self.stop_mode is StopMode.NONE:  # stopping: _wind_down drops it
                del self.paused[fd]
                self.epoll.register(fd, LISTENER_EVENTS)
        return max(0.0, min([1.0, *(when - now for when in self.paused.values())]))

    def _requeue(self, listener: socket.socket) -> None:
        """Go to the back of the listener's wake-up queue. An exclusive wake-up goes to the
        first waiting worker in the order they registered, so the first worker would take
        nearly every new connection while it is idle: fine for connections that close after
        their request, but kept ones (Apache enablereuse, nginx keep_conn) would pile up on
        it until the balancer moved them (8 of 8 in the test). Registering again puts this
        worker last; two system calls, only when a connection stays open."""
        fd = listener.fileno()
        self.epoll.unregister(fd)
        self.epoll.register(fd, LISTENER_EVENTS)

    def _allowed(self, sock: socket.socket, peer: tuple) -> bool:
        """--allow-from: TCP peers outside the list are closed and logged. `peer` is the address
        accept() returned: asking the socket (getpeername) fails once the peer has reset the
        connection, and that error, outside any connection's error handling, ended the worker:
        any client allowed to connect could crash workers at will."""
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return True
        host = peer[0]  # (host, port[, flowinfo, scope_id])
        if in_networks(host, self.config.allow_from):
            return True
        log.warning("connection from %s refused (not in --allow-from)", host)
        sock.close()
        return False

    def _adopt(self, sock: socket.socket, register: bool = True) -> Connection:
        assert self.server is not None
        conn = Connection(sock, self.server)
        conn.on_close = self._unwatch
        self.conns[conn.fd] = conn
        if register:
            self._watch(conn)
        return conn

    def _watch(self, conn: Connection) -> None:
        self.epoll.register(conn.fd, select.EPOLLIN)
        self.registered.add(conn.fd)
        self.board.set_conns(self.index, len(self.registered))

    def _unwatch(self, conn: Connection) -> None:
        """Called by conn.close() before its socket closes (see Connection.close)."""
        if conn.fd in self.registered:
            self.registered.discard(conn.fd)
            self.epoll.unregister(conn.fd)
            self.board.set_conns(self.index, len(self.registered))

    def _drop(self, conn: Connection, reason: str | None = None, level: int = logging.INFO) -> None:
        if reason:
            log.log(level, "connection closed: %s", reason)
        if self.conns.get(conn.fd) is conn:
            del self.conns[conn.fd]
        if self.backlog.get(conn.fd) is conn:
            del self.backlog[conn.fd]
        if conn.request is not None and conn.request.runnable:  # in the middle of a request
            conn.abort()  # (its response may have begun: the web server stalled while the
        else:  # application read its body); one still in its params has nothing to mark failed,
            conn.close()  # and on a unix socket the mark is a send that waits (--read-timeout)

    def _serve(self, conn: Connection, flags: int = 0) -> None:
        """Read what arrived on `conn` and run one complete request: one per turn. A peer
        that pipelines (60 requests in one send) had every one run before anyone else's, new
        and kept connections alike (5.7 s for theirs, behind 60 requests of 0.1 s); what
        else is complete waits in its buffer, in the backlog, for the next turn. Such a
        connection is not read from until that request is served: read at every turn (64 KiB
        a turn, one request served), a peer that kept pipelining filled the worker's memory."""
        waiting = conn.request is not None and conn.request.runnable
        # at EOF, complete requests received are still served
        still_open = True if waiting else conn.receive(flags)
        try:
            conn.parse_available()
            if conn.request is not None and conn.request.runnable and not conn.closed:
                self._run_request(conn)
                conn.parse_available()
                if conn.request is not None and conn.request.runnable and not conn.closed:
                    self.backlog[conn.fd] = conn
                    return  # at EOF too: the peer's complete requests are served first
        except ProtocolError as exc:
            self._drop(conn, f"protocol error: {exc}", logging.WARNING)
        except (ConnectionLost, RequestAborted) as exc:
            self._drop(conn, None if conn.closed else str(exc))  # closed: flush() said why
        except Exception:  # noqa: BLE001 - a fault on one connection must not end the worker
            log.error("internal error on a connection; closing it", exc_info=True)
            self._drop(conn)
        if not still_open and conn.draining:
            self._drop(conn)  # the web server has sent the rest of what we refused, and closed
        elif not still_open and not conn.closed and conn.has_partial_input:
            self._drop(conn, conn.lost or "web server closed the connection in the middle of a request")
        elif conn.closed or not still_open:
            self._drop(conn, None if conn.closed else conn.lost)

    def _run_request(self, conn: Connection) -> None:
        req = conn.request
        assert req is not None
        method = req.params.get("REQUEST_METHOD", "?")
        uri = req.params.get("REQUEST_URI", req.params.get("PATH_INFO", "")).partition("?")[0]
        self.since = self.board.request_started(self.index, method, uri)
        self.title.busy(f"{method} {uri[:80]}", self.since)
        counted = self.requests
        try:
            conn.run_request()
        finally:
            if self.requests == counted:  # ended without a response (connection lost)
                self._request_done(req)
            self.title.done()

    def _on_exit_asked(self, what: str) -> None:
        """The application raised SystemExit (or KeyboardInterrupt) in a request (wsgi.handle,
        through Server.on_exit_asked): that request is answered 500, then we are replaced."""
        if not self.replacement_asked:
            log.warning("the application raised %s; asking for a replacement", what)
            self._ask_for_replacement(MSG_EXIT_ASKED)

    def _report_stdlib(self) -> None:
        """--share-stdlib: name the standard-library modules imported here since the last
        report (the application's, then those it imported while serving) to the manager, which
        imports them so the workers it starts later share them (sharing.py)."""
        if not self.config.share_stdlib:
            return
        try:  # whatever an application put in sys.modules, this must not stop the worker
            names = sharing.stdlib_imported(self.modules_mark)
            self.modules_mark = sharing.newest_module()
        except Exception:  # noqa: BLE001 - logged; the workers after us import their own
            log.warning("cannot list the standard-library modules imported", exc_info=True)
            return
        message = MSG_STDLIB
        for name in names:
            if len(message) + len(name) + 1 > MAX_MESSAGE:
                break
            message += b"\n" + name.encode()
        if message == MSG_STDLIB:
            return
        try:
            self.spec.channel.send(message)
        except OSError as exc:  # the manager is gone: our sweep notices and stops us
            log.debug("cannot report standard-library modules: %s", exc)

    def _ask_for_replacement(self, message: bytes) -> None:
        """The manager starts a replacement, then retires us (as in a reload)."""
        self.replacement_asked = True
        try:
            self.spec.channel.send(message)
        except OSError as exc:  # the manager is gone (our sweep notices and stops us): this
            # runs as a response is finished, which must not fail for it
            log.warning("cannot ask the manager for a replacement: %s", exc)

    def _request_done(self, req: object) -> None:
        self.requests += 1
        # a request ended before it ran (aborted while its params came in) took no time
        since, self.since = self.since or time.monotonic(), 0.0
        self.board.request_finished(self.index, self.requests, since, SlotState.IDLE
                                    if self.stop_mode is StopMode.NONE else SlotState.RETIRING)
        # here, not after running the application: a request aborted or refused before it ran
        # is counted too, and when such a one reached the quota the worker was never recycled
        if self.requests >= self.replace_at and not self.replacement_asked:
            log.info("served %d requests (--max-requests); asking for a replacement", self.requests)
            self._ask_for_replacement(MSG_QUOTA)

    # ------------------------------------------------------------------ manager channel

    def _channel_message(self) -> None:
        try:
            msg, fds = sockets.recv_fds(self.spec.channel, MAX_MESSAGE, FDS_PER_MESSAGE)
        except BlockingIOError:
            return
        if not msg:  # the manager is gone: no orphan keeps serving old code
            log.warning("manager exited; stopping")
            self.channel_closed = True
            self.epoll.unregister(self.spec.channel.fileno())
            self._begin_stop(StopMode.CLOSE)
            return
        if msg == MSG_ADOPT:
            for fd in fds:
                conn = self._adopt(socket.socket(fileno=fd))
                conn.adopted = True
                # Idle since the peer last sent, not since now: begun again at each hand-over,
                # the clock never reached --keep-conn-idle while workers were replaced more
                # often (deploys, --max-requests), and abandoned kept connections piled up
                # until accept() ran out of descriptors. TCP only (the kernel's count): over a
                # unix socket the front end is on this machine and closes what it abandons.
                conn.last_active -= peer_idle(conn.sock)
        elif msg == MSG_RETIRE:
            self._report_stdlib()  # what serving made us import: the next generation shares it
            self._begin_stop(StopMode.HANDOFF)
        elif msg == MSG_STOP:
            self._closing()
        elif msg.startswith(MSG_BALANCE + b" ") and msg[len(MSG_BALANCE) + 1:].isdigit():
            self._give_back(int(msg[len(MSG_BALANCE) + 1:]))
        else:
            log.warning("unknown message from manager: %r", msg[:40])
            for fd in fds:
                os.close(fd)

    def _give_back(self, count: int) -> None:
        """The manager saw us holding more kept connections than our share: hand up to `count`
        of them over, between their requests. A web server's kept connection stays with the worker that accepted it,
        so an uneven first burst would otherwise stay uneven, and the requests on the crowded
        worker's connections wait behind each other.

        Connections with nothing of theirs read here move (has_partial_input: no bytes buffered,
        no request, which also keeps out those in the backlog); the next owner reads their
        stream from a record's start. Those with nothing waiting in the kernel either go first. Under
        load a crowded worker has hardly any of those: moving only them, 12 held against 5
        stayed so for the whole of a 10 s run behind Apache (p99 18.5 ms), each turn asking
        for 3 and getting none. A request waiting in the kernel waits less on a worker with
        fewer connections than at the back of this one's turns."""
        if self.stop_mode is not StopMode.NONE:
            return
        movable = [c for c in self.conns.values()
                   if c.fd in self.registered and not c.has_partial_input]
        movable.sort(key=lambda c: readable(c.sock))  # nothing waiting first (stable order)
        for conn in movable[:count]:
            self._hand_off(conn)
            if self.stop_mode is not StopMode.NONE:  # the channel failed
                return
        try:  # after the hand-offs, on the same channel: the manager has them all when it reads this
            self.spec.channel.send(MSG_BALANCED)
        except OSError as exc:  # the manager is gone: our sweep notices and stops us
            log.debug("cannot answer the manager's balance ask: %s", exc)

    def _begin_stop(self, mode: StopMode) -> None:
        if mode is StopMode.CLOSE:
            self._closing()
        elif self.stop_mode is StopMode.NONE:
            self.stop_mode = mode

    def _closing(self) -> None:
        """Stop, closing the connections (a signal handler may call this: it only records)."""
        self.stop_mode = StopMode.CLOSE
        if self.server is not None:
            self.server.closing = True

    # ------------------------------------------------------------------ stopping

    def _wind_down(self) -> bool:
        """Stop accepting and let go of idle connections; True when nothing is left."""
        waiting = []
        for fd, sock in list(self.listener_fds.items()):
            del self.listener_fds[fd]
            if self.paused.pop(fd, None) is None:  # a paused listener is not in the epoll set
                self.epoll.unregister(fd)
                if readable(sock):
                    waiting.append(sock)
                    continue
            sock.close()
        self._title("retiring")
        self.board.set_state(self.index, SlotState.RETIRING)
        for conn in list(self.conns.values()):
            if self.stop_mode is StopMode.CLOSE:
                conn.served_what_waited()  # marks what had come by now: that much is served
            if conn.has_partial_input:
                continue  # half-received, or complete requests buffered: served first
            if self.stop_mode is StopMode.HANDOFF:
                # A request waiting in the kernel goes with the connection, to the generation
                # that is ready and idle. Served here, one after another, the last ones were cut
                # off at --graceful-timeout (1 of 4 answered, 3 waiting behind a 2 s request).
                self._hand_off(conn)
            elif (conn.received or conn.between_requests) and conn.served_what_waited():
                # Let go once what waited when the stop began is served, even if the peer has
                # sent more since (a client keeping requests in flight kept the worker serving
                # until --graceful-timeout, whose SIGKILL cut a request in the middle); what
                # came after is read and thrown away, not answered with a reset (let_go). Not
                # a connection that has sent nothing yet: that is a request on its way (a unix
                # socket has no TCP_DEFER_ACCEPT: accepted before its bytes came).
                conn.let_go()
                if conn.closed:
                    self._drop(conn)
        for sock in waiting:
            # The wake-up for this connection may have come to this worker, alone
            # (EPOLLEXCLUSIVE), with the retire message: no other worker is woken for it, and
            # it waited in the queue until the next connection arrived (40 s with one client
            # at --max-requests 3). Taken and served here, after the hand-overs above (what
            # waits there must not wait behind it); not handed over itself: the worker the
            # manager picks may have just taken another connection, and this one then waited
            # for that request. A kept one is handed over at the next pass.
            self._take(sock)
            sock.close()
        if not self.conns:
            self._adopt_waiting()  # a hand-over sent to us as we stopped: served, not reset
        return not self.conns

    def _adopt_waiting(self) -> None:
        """Take the messages waiting on the manager's channel before we leave. Stopping with no
        connection left, the worker exited with a hand-over (MSG_ADOPT) unread: the kernel
        closed that kept connection, and the request waiting on it got a reset (SIGTERM during
        a reload, whose old worker had just handed it on). Adopted, it is served like any
        connection of a stopping worker: what waited, then closed."""
        while not self.channel_closed and readable(self.spec.channel):
            self._channel_message()

    def _hand_off(self, conn: Connection) -> None:
        try:
            socket.send_fds(self.spec.channel, [MSG_HANDOFF], [conn.fileno()])
        except OSError as exc:
            log.warning("cannot hand a connection to the manager: %s", exc)
            self._closing()
            return
        self._drop(conn)

    def _sweep(self) -> None:
        """Close stalled and long-idle connections, reopen a rotated access log, notice a dead
        manager (at most 4 times a second).

        `last_active` moves only when this worker reads, so a connection whose bytes arrived
        while we ran a long request looks stalled or idle; it is not: what waits in the kernel
        is served at the next turn. Closed, the request waiting there was lost (after a 2.5 s
        request, a kept connection at --keep-conn-idle 1 and a half-received request at
        --read-timeout 1 were both closed unanswered)."""
        now = time.monotonic()
        if now < self.next_sweep:
            return
        self.next_sweep = now + 0.25
        for conn in list(self.conns.values()):
            if conn.fd in self.backlog:  # a complete request waits for its turn: not stalled
                continue
            idle = now - conn.last_active
            if conn.draining:  # answered; what it still sends is thrown away, for so long
                if now - conn.drain_started > DRAIN_LIMIT or (
                        idle > self.config.read_timeout and not readable(conn.sock)):
                    self._drop(conn, "stopped reading the rest of a refused request")
                elif conn.let_go_by_stop and conn.output_sent():
                    _drain(conn.sock)  # stopping: all of ours is out, and what it sent is read:
                    self._drop(conn)  # closing now drops nothing (a peer that keeps a pooled
                    # connection open while idle, as Apache does, held the stop until here)
            elif not conn.between_requests:  # a request coming in, or a new connection's first
                if idle > self.config.read_timeout and not readable(conn.sock):
                    # throttled: a flood of half-sent connections (slowloris) gave a line each
                    count = self.stall_lines.due()
                    self._drop(conn, f"no complete request within {self.config.read_timeout:g}s"
                               f"{f' ({count} connections since the last such line)' if count > 1 else ''}"
                               if count else None, logging.WARNING)
            elif idle > self.config.keep_conn_idle and not readable(conn.sock):
                conn.end()
                self._drop(conn)
        if self.access_log is not None:
            self.access_log.reopen_if_moved()
        self._keep_signals("while serving")  # as at import
        if self.spare is None:
            self._take_spare()
        if os.getppid() != self.spec.manager_pid and self.stop_mode is StopMode.NONE:
            log.warning("manager %d is gone; stopping", self.spec.manager_pid)
            self._closing()

    def _title(self, state: str) -> None:
        self.title.set(state)


def _not_for_workers(signum: int, frame: object) -> None:
    log.info("%s is the manager's signal; ignored by this worker", signal.Signals(signum).name)


def _exit_now(signum: int, frame: object) -> None:
    _flush_output()
    os._exit(EXIT_OK)


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except BlockingIOError:
        pass


if sys.platform != "linux":  # pragma: no cover
    raise ImportError("fcgidaemon's worker needs Linux (epoll, SCM_RIGHTS, TCP_DEFER_ACCEPT)")
