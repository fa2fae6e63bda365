"""Command line: argv -> config -> run.

``fcgidaemon APP [options]`` serves; ``fcgidaemon check APP`` imports the
application in this fresh process and reports (exit 0 or 1), like
``apachectl configtest``.  Every configuration error is one line on stderr and
exit status 2, before anything forks.
"""

from __future__ import annotations

import gc
import grp
import logging
import os
import pwd
import signal
import socket
import sys
import traceback
from contextlib import contextmanager
from typing import Iterator, Sequence

from . import accesslog, commands, control, loader, logs, signals, upgrade
from .commands import EXIT_FAILED, EXIT_USAGE
from .config import Config, ConfigError, log_level_number, resolve
from .manager import MANAGER_SIGNALS, Manager
from .sockets import open_listeners

log = logging.getLogger("fcgidaemon")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["check"]:
        return check(argv[1:])
    if argv[:1] and argv[0] in commands.COMMANDS:
        return commands.run(argv[0], argv[1:])
    try:
        config = resolve(argv)
        prepare(config)
    except ConfigError as exc:
        return usage_error(exc)
    return serve(config)


def usage_error(exc: Exception, prog: str = "fcgidaemon", predecessor: int | None = None) -> int:
    print(f"{prog}: {exc}", file=sys.stderr)
    if prog == "fcgidaemon":  # a new manager in an upgrade: the old one says why it failed
        upgrade.tell_predecessor(f"configuration error: {exc}", predecessor)
    return EXIT_USAGE


def prepare(config: Config) -> None:
    """Everything that can be checked without binding or importing the application."""
    if config.umask is not None:
        os.umask(config.umask)
    if config.chdir and not os.path.isdir(config.chdir):
        raise ConfigError(f"--chdir: no such directory: {config.chdir}")
    loader.setup_paths(config.chdir, config.pythonpath)
    if not loader.module_exists(config.app_module):
        raise ConfigError(f"application module not found: {config.app_module}")
    for name in config.preload:
        if not loader.module_exists(name):
            raise ConfigError(f"--preload: module not found: {name}")
    lookup_ids(config)


def lookup_ids(config: Config) -> tuple[int | None, int | None]:
    try:
        user = pwd.getpwnam(config.user) if config.user else None
    except KeyError:
        raise ConfigError(f"--user {config.user}: no such user") from None
    try:
        gid = grp.getgrnam(config.group).gr_gid if config.group else (user.pw_gid if user else None)
    except KeyError:
        raise ConfigError(f"--group {config.group}: no such group") from None
    return (user.pw_uid if user else None), gid


def drop_privileges(config: Config) -> None:
    uid, gid = lookup_ids(config)
    if gid is not None and gid != os.getgid():
        os.setgroups([gid]) if uid is None else os.initgroups(config.user or "", gid)
        os.setgid(gid)
    if uid is not None and uid != os.getuid():
        if gid is None:
            os.initgroups(config.user or "", pwd.getpwuid(uid).pw_gid)
        os.setuid(uid)


def give_pidfile(config: Config) -> None:
    """With --user, the pidfile becomes that user's: a manager that replaces us (SIGUSR2) runs
    as it, and must be able to rewrite the file where it may not create one (/run)."""
    uid, gid = lookup_ids(config)
    if config.pidfile and uid is not None:
        os.chown(config.pidfile, uid, -1 if gid is None else gid)


def check_access_log(config: Config) -> None:
    """Open it once before any worker starts: a path that cannot be opened is a bad option,
    not a crash in every worker (respawned every 10 s, forever). Opened as the workers will
    open it (--user), but before the pidfile is written: checked after the privileges were
    dropped, a failure left the pidfile behind (the user could not remove it from /run) and
    a second line on stderr saying so."""
    path = config.access_log
    if not path or path == "-":
        return
    try:
        with acting_as(config):
            os.close(accesslog.AccessLog.open(path))
    except OSError as exc:
        raise ConfigError(f"--access-log {path}: {exc.strerror or exc}") from None


@contextmanager
def acting_as(config: Config) -> Iterator[None]:
    """Root taking on --user/--group for a moment (effective ids and groups), then back."""
    uid, gid = lookup_ids(config)
    if os.geteuid() != 0 or (uid is None and gid is None):
        yield  # not root: drop_privileges fails later anyway, or there is nothing to drop
        return
    groups, egid = os.getgroups(), os.getegid()
    target_gid = egid if gid is None else gid
    try:  # inside: a failed setegid or seteuid leaves nothing changed behind
        os.setgroups(os.getgrouplist(config.user, target_gid) if config.user else [target_gid])
        os.setegid(target_gid)
        if uid is not None:
            os.seteuid(uid)
        yield
    finally:
        os.seteuid(0)
        os.setegid(egid)
        os.setgroups(groups)


def serve(config: Config) -> int:
    logs.setup(log_level_number(config))
    predecessor = upgrade.parent_pid()
    try:
        listeners = open_listeners(config, upgrade.inherited_unlink_paths())
    except ConfigError as exc:
        return usage_error(exc, predecessor=predecessor)
    # Signals are recorded from here on, for the manager's loop: a SIGHUP during a slow preload
    # (the default action) killed the manager, and a SIGTERM left the pidfile and socket behind.
    queue = signals.SignalQueue(MANAGER_SIGNALS)
    ctl: socket.socket | None = None
    try:
        try:
            # bound before the pidfile names us: `fcgidaemon stop` checks that the pid has one
            ctl = control.listen()
            check_access_log(config)
            if predecessor is None:  # in an upgrade the pidfile names the old manager until
                try:  # we take over (_announce_to_predecessor)
                    control.claim_pidfile(config.pidfile)
                    give_pidfile(config)
                except OSError as exc:  # said of the option, not as a bare errno
                    raise ConfigError(f"--pidfile {config.pidfile}: {exc.strerror or exc}") from None
            drop_privileges(config)
        except ConfigError as exc:
            return usage_error(exc, predecessor=predecessor)
        except control.PidfileTaken as exc:
            return usage_error(ConfigError(str(exc)), predecessor=predecessor)
        except OSError as exc:
            return usage_error(ConfigError(f"cannot start: {exc}"), predecessor=predecessor)
        # only now: a startup error above is then the one line on stderr, not the second
        for lst in listeners:
            log.info("listening on %s", lst.name)
        try:
            loader.preload(config.preload)
        except loader.AppImportError as exc:  # found, but raised: not a configuration error,
            # so exit 1, which systemd's Restart=on-failure retries (a database down at import)
            log.error("preload failed:\n%s", exc.text.rstrip())
            upgrade.tell_predecessor(f"preload failed: {exc}", predecessor)
            return EXIT_FAILED
        strays = loader.stray_threads()
        if strays:
            log.warning("--preload left %d thread(s) running in the manager (%s): threads do not "
                        "survive the fork, and a lock one holds as a worker is forked stays held in "
                        "that worker (a hang); start them in the application, after the fork",
                        len(strays), ", ".join(strays))
        stop = [signum for signum in queue.pending() if signum in STOP_SIGNALS]
        if stop:  # asked to stop while preloading: no worker is started
            log.info("%s during startup; exiting", signals.name(stop[0]))
            return 0
        gc.collect()
        gc.freeze()  # preloaded objects stay shared copy-on-write across forks
        manager = Manager(config, listeners, predecessor, queue, ctl)
        try:
            return manager.run()
        finally:
            manager.close()
    finally:
        if ctl is not None:
            ctl.close()
        for lst in listeners:
            lst.close()
        control.remove_pidfile(config.pidfile)  # if it still names us


def check(argv: Sequence[str]) -> int:
    """Import the application in a fresh process, as a worker would, and report: exit 0, 1 if
    it fails, 2 if it is not found (module or callable) or an option is wrong.

    The import runs in a child, bounded by --ready-timeout, and only the child's own verdict
    counts: imported in this process, an os._exit(0) at import ended `check` with 0 and no
    word (the daemon refuses that code), and an import that hangs hung the deploy script."""
    try:
        config = resolve(argv, prog="fcgidaemon check")
        prepare(config)
    except ConfigError as exc:
        return usage_error(exc, "fcgidaemon check")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # never returns into the caller's code
        code = EXIT_FAILED
        try:
            os.setpgid(0, 0)  # a group of its own: whatever the import starts goes with it
            os.close(read_end)
            code = _import_and_tell(config, write_end)
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        try:
            os.setpgid(pid, pid)  # as the child does: whichever comes first
        except OSError:
            pass  # it already has, or has exited
        verdict, status = _wait_for_verdict(read_end, pid, config.ready_timeout)
    finally:  # processes the import started (a metrics agent, a multiprocessing helper): the
        try:  # daemon's workers would own theirs; `check` leaves nothing running
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # none left
    if verdict.startswith("OK "):
        print(f"fcgidaemon check: OK: {verdict[3:]}")
        return 0
    if verdict.startswith("FAILED "):
        print(f"fcgidaemon check: FAILED: {verdict[7:]}", file=sys.stderr)
        return EXIT_USAGE if status == EXIT_USAGE else EXIT_FAILED
    print(f"fcgidaemon check: FAILED: {verdict}", file=sys.stderr)
    return EXIT_FAILED


def _import_and_tell(config: Config, out: int) -> int:
    """In the child: import, write the verdict line to `out`; the exit status to use."""
    try:
        loader.preload(config.preload)
        app = loader.load_app(config.app)
    except loader.AppImportError as exc:
        print(exc.text, end="", file=sys.stderr)
        _tell(out, f"FAILED {exc}")
        return EXIT_USAGE if exc.not_found else EXIT_FAILED
    except BaseException as exc:  # noqa: BLE001 - anything else is a failure to report too
        traceback.print_exc()
        _tell(out, f"FAILED {loader.summarize(exc)}")
        return EXIT_FAILED
    _tell(out, f"OK {config.app} is {type(app).__name__} {getattr(app, '__qualname__', '')}")
    return 0


def _tell(out: int, verdict: str) -> None:
    """One line: the parent reads up to its newline, not to EOF (a process the import started
    holds the pipe open: check waited for it, then said "not imported" of a good app)."""
    os.write(out, (" ".join(verdict.split()) + "\n").encode(errors="replace"))


def _wait_for_verdict(fd: int, pid: int, timeout: float) -> tuple[str, int]:
    """The child's verdict line (or why there is none) and its exit status."""
    import select
    import time

    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([pipe], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return f"not imported within {timeout:g}s (--ready-timeout)", EXIT_FAILED
            chunk = pipe.read(65536)
            if not chunk:
                break
            chunks.append(chunk)
            if chunk.endswith(b"\n"):
                break
    _, raw = os.waitpid(pid, 0)
    status = os.waitstatus_to_exitcode(raw)
    verdict = b"".join(chunks).decode(errors="replace").strip()
    if verdict:
        return verdict, status
    how = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
    return f"the import ended the process without a verdict ({how})", EXIT_FAILED
