"""The manager: one event loop over signals, worker channels and timers.

The manager never imports the application and never serves a request.  It keeps
a table of worker records, each in one of the states of `WState`, and moves them
only along `TRANSITIONS`.  A reload is a new *generation*: all of its workers must
report ready before any worker of the old generation is retired, so broken code
never replaces working code, and capacity never drops during a deploy.

Why about 700 lines: this is the loop, the worker table and the generations; the rest of the
manager's behaviour is in its mixins, one concern each (handover.py: passing connections on;
supervise.py: timers, scaling and the balancer; upgrade.py: a new manager taking over;
control.py: the control socket; sharing.py: standard-library modules imported once for the
workers), which act on the same table.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import time

from . import control, handover, logs, sharing, signals, sockets, supervise, systemd, titles, upgrade, worker
from .commands import EXIT_FAILED, EXIT_USAGE
from .config import MAX_WORKERS, Config
from .fastcgi import SIOCINQ, queued
from .scoreboard import Pool, Scoreboard
from .states import ENDING, TRANSITIONS, Phase, WorkerRecord, WState  # noqa: F401 - re-exported
from .sockets import Listener

log = logging.getLogger("fcgidaemon")

BACKOFF_START = 0.1
BACKOFF_MAX = 10.0
YOUNG = 2.0  # a worker that dies within this many seconds of its start died young
CRASH_LOG_EVERY = 10.0  # seconds between crash-loop summaries
STARTING_MESSAGES = 8  # read at most from a starting worker whose ready deadline ran out
MANAGER_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD,
                   signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR2)


# What each signal does to the manager; the README's signal table is rendered from this.
SIGNAL_DOCS: dict[signal.Signals, str] = {
    signal.SIGHUP: "graceful reload: start a new generation of workers (new application code); "
                   "once all of them are ready, the old generation finishes its requests, hands its "
                   "idle connections to the new one and exits. A reload that fails to start keeps "
                   "the old generation serving. Reloads during a reload are coalesced into one more; "
                   "refused (one log line) during an upgrade",
    signal.SIGTERM: "graceful stop: workers finish in-flight requests (bounded by `--graceful-timeout`, "
                    "then SIGKILL); the pidfile and our unix socket are removed; exit 0",
    signal.SIGINT: "quick stop: workers exit at once; exit 0",
    signal.SIGQUIT: "quick stop, as SIGINT",
    signal.SIGTTIN: "one worker more",
    signal.SIGTTOU: "one worker fewer (never below 1)",
    signal.SIGUSR2: "upgrade in place: start a new manager (fork+exec of the same command line: new "
                    "Python, new fcgidaemon, new preloaded modules) that inherits the listening "
                    "sockets; once its workers are ready, this manager's workers hand their "
                    "connections over and it exits. If the new manager fails, this one keeps "
                    "serving, and the kept connections the new manager's workers had accepted "
                    "are handed back to it. Refused (one log line) while the manager is starting, reloading or "
                    "stopping, or an upgrade is in progress (including the one that started this "
                    "manager, until the previous manager has exited)",
}


def signals_markdown() -> str:
    rows = ["| signal | to the manager |", "| --- | --- |"]
    rows += [f"| {sig.name} | {text} |" for sig, text in SIGNAL_DOCS.items()]
    return "\n".join(rows)


class Manager(supervise.Supervision, control.ControlCommands, upgrade.Upgrading,
              sharing.StdlibSharing, handover.HandOver):
    def __init__(self, config: Config, listeners: list[Listener], predecessor: int | None = None,
                 queue: signals.SignalQueue | None = None,
                 control_sock: socket.socket | None = None) -> None:
        self.config = config
        self.predecessor = predecessor  # the manager we replace (SIGUSR2), told once we are ready
        self.took_over = predecessor is None  # in charge: the predecessor has handed over
        self.failed_last = False  # the last reload or upgrade failed (STATUS= says so)
        self.upgrade: upgrade.Upgrade | None = None  # our own successor, while one starts
        self.listeners = listeners
        self.target = config.workers
        inherited = upgrade.worker_count(config.workers)  # SIGTTIN/SIGTTOU survive SIGUSR2
        if inherited != config.workers:
            self.target = self._allowed_count(inherited)
        self.phase = Phase.STARTING
        self.workers: dict[int, WorkerRecord] = {}
        self.generation = upgrade.first_generation()  # the newest generation started
        self.serving = 0  # the generation that serves (0: none yet)
        self.reload_pending = False
        self.reload_started = 0.0
        self.respawn_at: dict[int, float] = {}  # slot -> when to start its replacement
        self.backoff: dict[int, float] = {}  # slot -> next delay
        self.crashes = logs.Throttle(CRASH_LOG_EVERY)  # young deaths, summarised
        self.stop_deadline: float | None = None
        self.exit_code = 0
        self.pool = Pool(start_time=time.time(), manager_pid=os.getpid(), backlog=config.backlog)
        self.all_busy_now = False
        self.watchdog = systemd.watchdog_interval()
        self.next_watchdog = 0.0
        self.selector = selectors.DefaultSelector()
        self.queue = queue or signals.SignalQueue(MANAGER_SIGNALS)  # cli's: recording since before preload
        self.selector.register(self.queue.fileno(), selectors.EVENT_READ, None)
        self.board = Scoreboard()
        self.next_memory_check = 0.0
        self.reload_waiters: list[tuple[socket.socket, int]] = []  # (client, generation it waits for)
        self.control = control_sock or control.listen()  # cli's: bound before the pidfile
        self.selector.register(self.control, selectors.EVENT_READ, "control")
        self.legacy_control = control.listen_legacy()  # for a manager of the previous version
        if self.legacy_control is not None:
            self.selector.register(self.legacy_control, selectors.EVENT_READ, "control")
        self._init_sharing()
        self._init_handover()
        # dynamic mode's measure of how busy the workers are
        self.load = supervise.LoadMeter(keep=max(supervise.SCALE_UP_WINDOW, config.idle_timeout))

    # ------------------------------------------------------------------ the loop

    def run(self) -> int:
        logs.set_context(role="manager", generation=self.generation)
        self._title()
        for slot in range(self.target):
            self._spawn(slot, self.generation)
        while not (self.phase in ENDING and not self.workers and not self._predecessor_finishing()):
            try:
                self._turn()
            except Exception:  # noqa: BLE001 - the manager going down takes the site down
                log.critical("manager loop error (carrying on)", exc_info=True)
                time.sleep(0.1)  # never a hot loop, even if the error repeats
        if self.phase is Phase.RETIRED and self.upgrade:
            self.upgrade.drop_oldbin()
            if control.alive(self.upgrade.pid):
                log.info("handed over to manager %d", self.upgrade.pid)
            else:  # it took over, then died: what serves now is up to systemd (or the operator)
                log.error("handed over to manager %d, which has exited since", self.upgrade.pid)
        else:
            systemd.notify("STATUS=stopped")
        log.info("manager exiting with status %d", self.exit_code)
        return self.exit_code

    def _predecessor_finishing(self) -> bool:
        """After a SIGUSR2 handover the old manager's workers may still be finishing requests.
        A stop of ours waits for them (within its deadline): under systemd (KillMode=mixed) our
        exit had the rest of the cgroup killed, the old manager's workers mid-request with it."""
        if not (self.predecessor and self.took_over) or self.stop_deadline is None:
            return False
        return time.monotonic() < self.stop_deadline and control.alive(self.predecessor)

    def _turn(self) -> None:
        """One turn of the loop: wait for signals, worker messages and timers, then act."""
        for key, _ in self.selector.select(self._timeout()):
            if key.data is None:
                for signum in self.queue.drain():
                    self._on_signal(signum)
            elif key.data == "control":
                self._on_control(key.fileobj)  # type: ignore[arg-type]
            else:
                self._on_message(key.data)
        self._reap()
        self._tick()

    def _timeout(self) -> float:
        moments = [t for t in self.respawn_at.values()]
        moments += [w.deadline for w in self.workers.values() if w.deadline is not None]
        if self.stop_deadline is not None:
            moments.append(self.stop_deadline)
        if self.upgrade is not None and not self.upgrade.successor_ready:
            moments.append(self.upgrade.deadline)
        if self.watchdog:
            moments.append(self.next_watchdog)
        if self._sharing_due:
            return 0.0
        longest = 0.1 if (self.config.timeout or self.config.slow_log or self.config.dynamic) else 0.25
        if not moments:
            return longest
        return min(longest, max(0.0, min(moments) - time.monotonic()))

    # ------------------------------------------------------------------ signals

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            return  # reaped after every wake-up
        log.info("received %s", signals.name(signum))
        if signum == signal.SIGHUP:
            self.request_reload()
        elif signum == signal.SIGTERM:
            self.stop(graceful=True)
        elif signum in (signal.SIGINT, signal.SIGQUIT):
            self.stop(graceful=False)
        elif signum == signal.SIGTTIN:
            self._resize(self.target + 1)
        elif signum == signal.SIGTTOU:
            self._resize(self.target - 1)
        elif signum == signal.SIGUSR2:
            self.start_upgrade()

    def ending_refusal(self, what: str) -> str | None:
        """Why `what` (a reload, an upgrade) is refused by a manager that is ending, if it is;
        a retired one names its successor (it said "stopping", or "an upgrade is in progress")."""
        if self.phase is Phase.RETIRED and self.upgrade is not None:
            return f"{what} refused: this manager handed over to manager {self.upgrade.pid}; signal that one"
        if self.phase in ENDING:
            return f"{what} refused: the manager is {self.phase.value}"
        return None

    def request_reload(self) -> None:
        refusal = self.ending_refusal("reload")
        if refusal:
            log.warning("%s", refusal)
            return
        if self.upgrade is not None:
            log.warning("reload refused: an upgrade to manager %d is in progress", self.upgrade.pid)
            self._answer_waiters(None, {"ok": False, "message": "an upgrade is in progress"})
            return
        if self.phase in (Phase.STARTING, Phase.RELOADING):
            self.reload_pending = True  # coalesced: one more reload after this one
            log.info("reload queued behind generation %d", self.generation)
            return
        self._start_reload()

    def _start_reload(self) -> None:
        self.reload_pending = False
        self.generation += 1
        self.phase = Phase.RELOADING
        self.reload_started = time.monotonic()
        logs.set_context(generation=self.generation)
        log.info("reload: starting generation %d (%s)", self.generation, logs.workers(self.target))
        systemd.notify("RELOADING=1", f"MONOTONIC_USEC={systemd.monotonic_usec()}",
                       f"STATUS=reloading: starting gen {self.generation}")
        for slot in range(self.target):
            if self.phase is not Phase.RELOADING:
                break  # a worker could not be started: the reload failed
            self._spawn(slot, self.generation)
        self._title()

    def stop(self, graceful: bool) -> None:
        if self.phase is Phase.RETIRED:  # handed over: our workers finish and leave on their own
            if not graceful:  # unless told to quit now
                log.info("quick stop: %s retiring", logs.workers(len(self.workers)))
                for rec in self.workers.values():
                    self._kill(rec, signal.SIGQUIT)
            return
        if self.phase is Phase.QUITTING or (graceful and self.phase is Phase.STOPPING):
            return
        if not graceful and self.predecessor and self.took_over and control.alive(self.predecessor):
            os.kill(self.predecessor, signal.SIGQUIT)  # its retiring workers: a quick stop too
        if self.upgrade is not None:  # stopping during an upgrade stops the new manager too
            self._upgrade_failed("the old manager is stopping", kill=True, serving=False)
        self.phase = Phase.STOPPING if graceful else Phase.QUITTING
        self.respawn_at.clear()
        self.reload_pending = False
        wait = self.config.graceful_timeout if graceful else 1.0
        self.stop_deadline = time.monotonic() + wait
        systemd.notify("STOPPING=1", f"STATUS={self.phase.value}")
        back = self._other_manager()
        log.info("%s: %s, up to %gs%s", "graceful stop" if graceful else "quick stop",
                 logs.workers(len(self.workers)), wait,
                 f"; handing kept connections back to manager {back}" if back else "")
        for rec in list(self.workers.values()):
            if back and rec.state is WState.READY:
                self._retire(rec)  # its kept connections go back (_pass_on), not closed
            elif graceful:
                self._stop_worker(rec)
            else:
                self._kill(rec, signal.SIGQUIT)
        self._answer_waiters(None, {"ok": False, "message": "the manager is stopping"})
        self._unpark()  # stopping gracefully: to a worker still finishing; quitting: closed
        self._title()

    def _allowed_count(self, count: int) -> int:
        """`count` brought within the bounds a worker count has: at least --min-workers (and
        1), at most --max-workers in dynamic mode, else MAX_WORKERS."""
        return min(max(count, self.config.min_workers, 1), self.config.max_workers or MAX_WORKERS)

    def _resize(self, target: int) -> None:
        if target != self._allowed_count(target) or self.phase in ENDING:
            log.warning("worker count stays %d", self.target)
            return
        old, self.target = self.target, target
        self.load.reset()
        log.info("worker count %d -> %d", old, target)
        self._reconcile(time.monotonic())
        self._switch_if_ready()  # fewer slots: those left may all be ready, and no READY will come
        self._title()

    # ------------------------------------------------------------------ workers

    def _spawn(self, slot: int, generation: int) -> None:
        try:
            parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as exc:
            self._spawn_failed(slot, generation, exc)
            return
        close_fds = [parent_end.fileno(), self.selector.fileno(), self.control.fileno(),
                     *self.queue.fds()]
        if self.legacy_control is not None:
            close_fds.append(self.legacy_control.fileno())
        close_fds += [rec.channel.fileno() for rec in self.workers.values()]
        close_fds += [rec.inbox.fileno() for rec in self.workers.values() if rec.inbox is not None]
        close_fds += self.parked_fds()  # held for a ready worker: not this one's to keep
        # clients waiting for an answer: a worker holding them open would keep them waiting
        # past the manager's death instead of seeing the connection close
        close_fds += [conn.fileno() for conn, _ in self.reload_waiters]
        close_fds += [conn.fileno() for conn in (self.upgrade.waiters if self.upgrade else [])]
        try:
            index = self.board.allocate(0, generation)
        except OSError as exc:  # BoardFull
            parent_end.close()
            child_end.close()
            self._spawn_failed(slot, generation, exc)
            return
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, MANAGER_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:  # EAGAIN (a process limit), ENOMEM
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            parent_end.close()
            child_end.close()
            self.board.release(index, self.pool)
            self._spawn_failed(slot, generation, exc)
            return
        if pid == 0:  # the child never returns into the manager's code, whatever happens
            try:
                worker.run(worker.WorkerSpec(self.config, slot, generation,
                                             [lst.sock for lst in self.listeners], child_end,
                                             os.getppid(), self.board, index, close_fds, old_mask,
                                             frozenset(self.stdlib_shared)))
            finally:
                os._exit(worker.EXIT_CRASH)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        self.board.set_pid(index, pid)
        # child_end stays open here too: what we pass the worker and it never reads is taken
        # back when it exits (handover._take_back), instead of being closed with it
        rec = WorkerRecord(pid, slot, generation, parent_end, board_index=index, inbox=child_end)
        rec.deadline = rec.started + self.config.ready_timeout
        self.workers[pid] = rec
        self.selector.register(parent_end, selectors.EVENT_READ, rec)
        log.debug("spawned worker %d (slot %d, gen %d)", pid, slot, generation)

    def _spawn_failed(self, slot: int, generation: int, exc: OSError) -> None:
        """No process (or no descriptors) for a new worker. A reload's generation cannot be
        complete: the reload fails and the old one serves on. Otherwise the slot is tried
        again with the crash back-off, so a lasting limit is not a hot loop."""
        reason = f"cannot start a worker: {exc.strerror or exc}"
        if self.phase is Phase.RELOADING and generation == self.generation:
            self._abort_reload(reason, None)
            return
        self._respawn_backed_off(slot, reason)

    def _kill(self, rec: WorkerRecord, signum: int) -> None:
        try:
            os.kill(rec.pid, signum)
        except ProcessLookupError:
            pass

    def _retire(self, rec: WorkerRecord) -> None:
        """Ask a worker to finish, hand its idle connections over, and leave.

        One still starting gets SIGTERM as well, on which a worker that does not accept yet
        exits at once; if an application's own handler swallowed it, the message, which such a
        worker reads before it accepts, stops it. With the message alone, it finished its
        import, then took a connection waiting in the queue on its way out: code that never
        reported ready (a respawn's import of code whose reload had failed) answered requests
        after the next reload had succeeded."""
        starting = rec.state is WState.STARTING
        rec.move(WState.RETIRING)
        rec.deadline = time.monotonic() + self.config.graceful_timeout
        self._tell(rec, worker.MSG_RETIRE, starting)

    def _stop_worker(self, rec: WorkerRecord) -> None:
        """A graceful stop: a message, read between requests. SIGTERM only to one still
        importing (it leaves at once) or when the message cannot go: an application may block
        the signal (the worker served on through the stop, then was killed mid-request at
        --graceful-timeout) or take it with a handler set while serving (its request was
        answered 500, and the stop took --graceful-timeout)."""
        self._tell(rec, worker.MSG_STOP, rec.state is WState.STARTING)

    def _tell(self, rec: WorkerRecord, message: bytes, starting: bool) -> None:
        """Send a worker a stop or retire message; SIGTERM as well to one still starting (it
        reads the message only before it accepts, an application's own handler may swallow
        the signal: each covers the other), and instead when the message cannot go."""
        if starting:
            self._kill(rec, signal.SIGTERM)
        try:
            rec.channel.send(message)
        except OSError:
            self._kill(rec, signal.SIGTERM)

    def _dismiss(self, rec: WorkerRecord) -> None:
        """A worker no longer wanted (its generation failed, or a new manager took over): one
        ready retires; one still starting is killed at once, as it serves nothing yet, unless
        it has sent something we have not read. That may be its ready report, sent as it began
        to accept: killed, a connection it had taken was lost. It retires instead, as a ready
        one does (SIGTERM: one that does not accept yet leaves at once)."""
        if rec.state is WState.STARTING and not self._unread(rec):
            rec.move(WState.RETIRING)
            rec.deadline = None  # its ready deadline, run out, read as "still busy"
            self._kill_starting(rec)
        elif rec.state is not WState.RETIRING:
            self._retire(rec)

    def _kill_starting(self, rec: WorkerRecord) -> None:
        rec.killed = True  # a ready report it sends from now on is void
        self._kill(rec, signal.SIGKILL)

    @staticmethod
    def _unread(rec: WorkerRecord) -> bool:
        """Whether the worker has sent something (a message) we have not read yet."""
        return queued(rec.channel, SIOCINQ) > 0

    def _on_message(self, rec: WorkerRecord) -> None:
        try:
            msg, fds = sockets.recv_fds(rec.channel, worker.MAX_MESSAGE, worker.FDS_PER_MESSAGE)
        except (BlockingIOError, ConnectionResetError):
            return
        if not msg:
            self.selector.unregister(rec.channel)
            return
        self._handle_message(rec, msg, fds)

    def _handle_message(self, rec: WorkerRecord, msg: bytes, fds: list[int]) -> None:
        """One message from a worker (live, or read after its exit by _on_message_backlog)."""
        live = self.workers.get(rec.pid) is rec
        if msg == worker.MSG_READY:
            if live and rec.state is WState.STARTING and not rec.killed:
                self._on_ready(rec)
            else:  # retired, or gone, before it finished starting: it is not used
                log.debug("worker %d ready while %s; not used", rec.pid, rec.state.value)
        elif msg.startswith(worker.MSG_IMPORT_FAILED):
            rec.failure = msg[len(worker.MSG_IMPORT_FAILED) + 1:].decode(errors="replace")
        elif msg == worker.MSG_BALANCED:
            rec.balance_pending = False
        elif msg == worker.MSG_HANDOFF:
            self._pass_on(fds, rec)
            fds = []
        elif msg == worker.MSG_QUOTA:
            if live:
                self._mark_for_replacement(rec, "served its --max-requests")
        elif msg == worker.MSG_EXIT_ASKED:
            if live:
                self._mark_for_replacement(rec, "was asked to exit by its application")
        elif msg.startswith(worker.MSG_STDLIB + b"\n"):
            self._on_stdlib_report(msg.decode(errors="replace").split("\n")[1:])
        else:
            log.warning("unknown message from worker %d: %r", rec.pid, msg[:40])
        for fd in fds:
            os.close(fd)

    def _mark_for_replacement(self, rec: WorkerRecord, why: str) -> None:
        if rec.state is WState.READY and not rec.replace:
            rec.replace = True
            log.info("worker %d %s; starting its replacement", rec.pid, why)

    def _on_ready(self, rec: WorkerRecord) -> None:
        rec.move(WState.READY)
        rec.deadline = None  # the slot's back-off stays until this worker outlives YOUNG
        log.info("worker %d ready (slot %d, gen %d) in %.3fs", rec.pid, rec.slot, rec.generation,
                 time.monotonic() - rec.started)
        for other in list(self.workers.values()):  # a replacement is ready: its predecessor retires
            if (other.replace and other.slot == rec.slot and other.generation == rec.generation
                    and other.state is WState.READY):
                self._retire(other)
        self._switch_if_ready()
        self._unpark()

    def _switch_if_ready(self) -> None:
        """The generation being started takes over once every slot is ready. Only that one: a
        respawned worker of the serving generation must not make the manager "switch" back to
        its own generation."""
        if self.phase in (Phase.STARTING, Phase.RELOADING) and self._generation_ready(self.generation):
            self._switch_to(self.generation)

    def _generation_ready(self, generation: int) -> bool:
        ready = {w.slot for w in self.workers.values()
                 if w.generation == generation and w.state is WState.READY}
        return ready.issuperset(range(self.target))

    def _switch_to(self, generation: int) -> None:
        """The whole new generation is ready: it serves; the old one retires."""
        first = self.serving == 0
        old = self.serving
        self.serving = generation
        self.phase = Phase.RUNNING
        for rec in list(self.workers.values()):
            if rec.generation != generation and rec.state is not WState.RETIRING:
                self._retire(rec)
        if first:
            log.info("generation %d serving: %s", generation, logs.workers(self.target))
            if self.predecessor:
                self._announce_to_predecessor()
        else:
            self.pool.reloads_ok += 1
            self.failed_last = False
            log.info("reload complete: generation %d serving (%s) in %.3fs, "
                     "generation %d retiring", generation, logs.workers(self.target),
                     time.monotonic() - self.reload_started, old)
        systemd.notify("READY=1", f"STATUS={self.status_line()}")
        self._answer_waiters(generation, {"ok": True, "generation": generation,
                                          "message": f"generation {generation} serving"})
        self._title()
        if self.reload_pending:
            self._start_reload()

    def _abort_reload(self, reason: str, detail: str | None) -> None:
        """A new worker failed before its generation was ready: keep the old one serving."""
        failed = self.generation
        self.pool.reloads_failed += 1
        self.pool.last_failure, self.failed_last = reason, True
        log.error("reload to generation %d failed: %s; still serving generation %d%s",
                  failed, reason, self.serving, f"\n{detail.rstrip()}" if detail else "")
        for rec in list(self.workers.values()):
            if rec.generation == failed:
                self._dismiss(rec)
        self.phase = Phase.RUNNING
        logs.set_context(generation=self.serving)
        systemd.notify("READY=1", f"STATUS=reload failed: {reason}, still serving gen {self.serving}")
        self._answer_waiters(failed, {"ok": False, "generation": failed, "serving": self.serving,
                                      "message": f"reload failed: {reason}; "
                                                 f"still serving generation {self.serving}"})
        self._title()
        if self.reload_pending:
            self._start_reload()

    # ------------------------------------------------------------------ exits and timers

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            rec = self.workers.pop(pid, None)
            if rec is not None:
                self._on_exit(rec, status)


    def _on_exit(self, rec: WorkerRecord, status: int) -> None:
        try:
            self.selector.unregister(rec.channel)
        except (KeyError, ValueError):
            pass
        try:
            self._on_message_backlog(rec)
        finally:
            # before the channel closes: closed with messages unread, its peer (the inbox)
            # reads as reset, and what waited there was lost
            self._take_back(rec)
            rec.channel.close()
        self.board.release(rec.board_index, self.pool)
        how = signals.describe_status(status)
        expected = rec.state is WState.RETIRING or self.phase in ENDING
        log.log(logging.INFO if expected else logging.WARNING, "worker %d (slot %d, gen %d, %s) exited: %s",
                rec.pid, rec.slot, rec.generation, rec.state.value, how)
        young = rec.state is WState.STARTING or time.monotonic() - rec.started < YOUNG
        if not young:
            # it lived: the slot's back-off starts over. Not at its ready report: a worker that
            # crashed just after it was ready was then respawned every 0.1 s, for good.
            self.backoff.pop(rec.slot, None)
        if expected:
            return
        reason = rec.failure.splitlines()[0] if rec.failure else (
            f"worker {rec.pid} {how} while importing the application" if rec.state is WState.STARTING
            else f"worker {rec.state.value} {how}")  # "worker starting exit 0" said little
        if self.phase is Phase.RELOADING and rec.generation == self.generation:
            self._abort_reload(reason, rec.failure)
            return
        if rec.state is WState.STARTING and self.phase is Phase.STARTING:
            # import error, not ready in time, or a death with no traceback (os._exit, a C
            # extension's crash: that one was respawned for good, the manager never ready)
            failure = rec.failure or f"worker {rec.pid} {how} while importing the application"
            log.error("application failed to start: %s", failure.rstrip())
            # a callable not found is a mistake in APP, the same at every start: 2, which
            # systemd's RestartPreventExitStatus=2 does not restart, as for a module not found
            not_found = os.WIFEXITED(status) and os.WEXITSTATUS(status) == worker.EXIT_APP_NOT_FOUND
            self.exit_code = EXIT_USAGE if not_found else EXIT_FAILED
            if self.predecessor is not None and not self.took_over:
                upgrade.tell_predecessor(f"application failed to start: {reason}", self.predecessor)
            # graceful: workers already ready may be serving (beside an old manager, in an
            # upgrade); those still importing leave at once on SIGTERM (worker._on_stop_signal)
            self.stop(graceful=True)
            return
        if young:
            self._respawn_backed_off(rec.slot, reason)
        else:
            self.respawn_at[rec.slot] = time.monotonic()

    def _respawn_backed_off(self, slot: int, reason: str) -> None:
        """Start the slot again after its crash back-off (doubling up to BACKOFF_MAX); crash
        loops are logged at most once per CRASH_LOG_EVERY seconds, as a summary."""
        delay = self.backoff.get(slot, BACKOFF_START)
        self.backoff[slot] = min(BACKOFF_MAX, delay * 2)
        self.respawn_at[slot] = time.monotonic() + delay
        count = self.crashes.due()
        if count:
            log.warning("slot %d: respawning in %.1fs (%s); %d worker(s) died young since the "
                        "last such line", slot, delay, reason, count)

    def _on_message_backlog(self, rec: WorkerRecord) -> None:
        """Read what an exited worker sent last (its import failure or hand-offs): all of it,
        as a worker handing over more than 64 kept connections on its way out sends as many."""
        rec.channel.setblocking(False)
        while True:
            try:
                msg, fds = sockets.recv_fds(rec.channel, worker.MAX_MESSAGE, worker.FDS_PER_MESSAGE)
            except (BlockingIOError, ConnectionResetError):
                return
            if not msg:
                return
            self._handle_message(rec, msg, fds)

    def _tick(self) -> None:
        now = time.monotonic()
        for rec in list(self.workers.values()):
            if rec.deadline is not None and now >= rec.deadline:
                for _ in range(STARTING_MESSAGES):  # it may have reported ready
                    if rec.state is not WState.STARTING or not self._unread(rec):  # since the
                        break  # last wait: then it is ready, not late
                    self._on_message(rec)
                if rec.state is WState.STARTING:
                    rec.deadline = None
                    log.error("worker %d not ready after %gs; killing it", rec.pid, self.config.ready_timeout)
                    rec.failure = rec.failure or f"not ready within {self.config.ready_timeout:g}s"
                    self._kill_starting(rec)
                elif rec.deadline is not None and now >= rec.deadline:  # not a new one (_retire)
                    rec.deadline = None
                    log.warning("worker %d still busy after %gs; killing it", rec.pid,
                                self.config.graceful_timeout)
                    self._kill(rec, signal.SIGKILL)
        if self.upgrade is not None and self.phase is not Phase.RETIRED:
            if not control.alive(self.upgrade.pid):  # not our child: watched through /proc
                self._upgrade_failed(f"new manager {self.upgrade.pid} exited before it was ready")
            elif now >= self.upgrade.deadline:
                self._upgrade_failed(f"new manager {self.upgrade.pid} not ready within "
                                     f"{self.config.ready_timeout * 2:g}s", kill=True)
        if self.stop_deadline is not None and now >= self.stop_deadline:
            self.stop_deadline = None
            for rec in self.workers.values():
                log.warning("worker %d did not stop in time; killing it", rec.pid)
                self._kill(rec, signal.SIGKILL)
        if self.config.timeout or self.config.slow_log:
            self._check_requests(now)
        self._expire_parked(now)
        self._unpark()  # a worker may have become free to take them without a ready report
        if self.config.max_memory and now >= self.next_memory_check:
            self.next_memory_check = now + 1.0
            self._check_memory()
        self._publish()
        if self.phase is Phase.RUNNING:
            self._balance(now)
        if self._sharing_due:
            self._share_stdlib()
        if self.config.dynamic and self.phase is Phase.RUNNING:
            self._scale(now)
        if self.phase in (Phase.RUNNING, Phase.STARTING, Phase.RELOADING):
            self._reconcile(now)
        if self.watchdog and now >= self.next_watchdog and self.took_over:  # systemd takes
            # WATCHDOG=1 from the main process only: a successor's were refused, one journal
            # warning each, until it took over
            systemd.notify("WATCHDOG=1")
            self.next_watchdog = now + self.watchdog

    def _reconcile(self, now: float) -> None:
        """Keep one live worker in every slot below the target, and none above it, in the
        serving generation and in the one a reload is starting.

        A slot whose only live workers asked to be replaced (--max-requests, --max-memory)
        gets one more: the old one retires when the new one is ready, so capacity never drops.
        A reload's generation takes over only with every slot ready, so a worker count changed
        during the reload (SIGTTIN, SIGTTOU) applies to it too, or it would never be complete.
        """
        generation = self.serving or self.generation
        filled = {w.slot for w in self.workers.values()
                  if w.generation == generation and w.state is not WState.RETIRING and not w.replace}
        for slot in range(self.target):
            if slot in filled:
                self.respawn_at.pop(slot, None)
                continue
            due = self.respawn_at.setdefault(slot, now)
            if now >= due:
                del self.respawn_at[slot]
                self._spawn(slot, generation)
        for slot in [s for s in self.respawn_at if s >= self.target]:
            del self.respawn_at[slot]
        if self.phase is Phase.RELOADING:
            # its workers are not respawned: one that dies aborts the reload (_on_exit)
            started = {w.slot for w in self.workers.values()
                       if w.generation == self.generation and w.state is not WState.RETIRING}
            for slot in range(self.target):
                if slot not in started and self.phase is Phase.RELOADING:
                    self._spawn(slot, self.generation)
        for rec in list(self.workers.values()):
            if (rec.slot >= self.target and rec.state is not WState.RETIRING
                    and rec.generation in (generation, self.generation)):
                self._retire(rec)

    # ------------------------------------------------------------------ reporting

    def status_line(self) -> str:
        ready = sum(1 for w in self.workers.values()
                    if w.generation == self.serving and w.state is WState.READY)
        line = f"serving gen {self.serving}, {ready}/{self.target} workers"
        if self.pool.last_failure and self.failed_last:  # not once a reload has succeeded since:
            line += f"; last failure: {self.pool.last_failure}"  # the status page keeps it
        return line

    def _title(self) -> None:
        binds = ",".join(lst.name for lst in self.listeners)
        titles.set_title(f"manager {self.config.app} [gen {self.serving or self.generation}, "
                         f"{logs.workers(self.target)}, {self.phase.value}] {binds}")

    def close(self) -> None:
        handover.close_all(self.parked_fds())
        self.parked.clear()
        self.control.close()
        if self.legacy_control is not None:
            self.legacy_control.close()
