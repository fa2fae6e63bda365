"""`fcgidaemon reload|status|stop`: the operator's side of the control channel.

``reload --wait`` blocks until the new generation serves (exit 0) or the reload
failed (exit 1, with the reason) -- what a deploy script and systemd's
``ExecReload=`` need to know.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any, Sequence

from . import control
from .config import ConfigError, ErrorParser

COMMANDS = ("reload", "upgrade", "status", "stop")
EXIT_FAILED = 1  # the application or a preloaded module failed to import or start; a command failed
EXIT_USAGE = 2  # a bad option or configuration: the same error every time
EXIT_NOT_RUNNING = 3  # `status` of a manager that does not run (LSB's "program is not running")


def parser(command: str) -> argparse.ArgumentParser:
    p = ErrorParser(prog=f"fcgidaemon {command}")  # an error is one line, not usage + error
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--pid", type=int, help="the manager's pid")
    target.add_argument("--pidfile", help="file holding the manager's pid")
    p.add_argument("--timeout", type=_seconds, default=120.0, help="seconds to wait (default 120)")
    if command in ("reload", "upgrade"):
        p.add_argument("--wait", action="store_true",
                       help=f"wait until the {command} is done; exit 1 if it failed")
    if command == "status":
        p.add_argument("--json", action="store_true", help="machine-readable output")
    if command == "stop":
        p.add_argument("--quick", action="store_true", help="SIGQUIT: do not wait for requests")
    return p


def _seconds(text: str) -> float:
    """--timeout: a number of seconds above 0. -1, nan and inf reached the socket's timeout
    and ended in a traceback; 0 waited for nothing and called a stop that went on a failure."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds: {text!r}") from None
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"must be above 0 and below 1e6 seconds: {text!r}")
    return value


def run(command: str, argv: Sequence[str]) -> int:
    try:
        args = parser(command).parse_args(list(argv))
    except ConfigError as exc:
        print(f"fcgidaemon {command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return EXIT_USAGE if exc.code else 0
    try:
        target = control.Target.from_args(args.pid, args.pidfile)
        return {"reload": reload, "upgrade": upgrade, "status": status,
                "stop": stop}[command](target.pid, args)
    except control.NotRunning as exc:  # as LSB init scripts answer: a status of a service
        # that is not running is 3, a stop of one is done already
        print(f"fcgidaemon {command}: {exc}: not running", file=sys.stderr)
        return {"status": EXIT_NOT_RUNNING, "stop": 0}.get(command, EXIT_FAILED)
    except control.ControlError as exc:
        print(f"fcgidaemon {command}: {exc}", file=sys.stderr)
        return EXIT_FAILED


class Interrupted(Exception):
    """SIGTERM while waiting for an answer."""


def _interrupted(signum: int, frame: object) -> None:
    raise Interrupted


def _ask_waiting(pid: int, command: str, timeout: float) -> dict[str, Any] | None:
    """The manager's answer; None when SIGTERM came first. systemd sends the stop's SIGTERM to
    ExecReload= as well (KillMode=mixed): killed by it, `reload --wait` had a stop during a
    reload leave the unit "failed" (Result=signal), though the manager stopped cleanly."""
    previous = signal.signal(signal.SIGTERM, _interrupted)
    try:
        return control.ask(pid, command, timeout)
    except Interrupted:
        print(f"fcgidaemon {command}: SIGTERM while waiting (the service is stopping?); "
              f"the {command} was not waited for", file=sys.stderr)
        return None
    finally:
        signal.signal(signal.SIGTERM, previous)


def reload(pid: int, args: argparse.Namespace) -> int:
    if not args.wait:
        control.send_signal(pid, signal.SIGHUP)
        print(f"sent SIGHUP to {pid}")
        return 0
    started = time.monotonic()
    answer = _ask_waiting(pid, "reload", args.timeout)
    if answer is None:
        return 0
    took = time.monotonic() - started
    print(f"{answer.get('message', answer)} ({took:.2f}s)",
          file=sys.stdout if answer.get("ok") else sys.stderr)
    return 0 if answer.get("ok") else EXIT_FAILED


def upgrade(pid: int, args: argparse.Namespace) -> int:
    if not args.wait:
        control.send_signal(pid, signal.SIGUSR2)
        print(f"sent SIGUSR2 to {pid}")
        return 0
    answer = _ask_waiting(pid, "upgrade", args.timeout)
    if answer is None:
        return 0
    print(answer.get("message", answer), file=sys.stdout if answer.get("ok") else sys.stderr)
    return 0 if answer.get("ok") else EXIT_FAILED


def status(pid: int, args: argparse.Namespace) -> int:
    answer = control.ask(pid, "status", args.timeout)
    if not answer.get("ok"):  # e.g. permission denied: the manager answers, without a snapshot
        print(f"fcgidaemon status: {answer.get('message', answer)}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(render_status(answer))
    return 0


def render_status(s: dict[str, Any]) -> str:
    """The status page's text, then one row per worker process."""
    from .status import render_text

    head = render_text(s)
    rows = [f"{'PID':>8} {'SLOT':>4} {'GEN':>4} {'STATE':<9} {'ACTIVITY':<9} {'REQS':>7} "
            f"{'RSS':>7} {'AGE':>8}  REQUEST"]
    for w in s["worker_list"]:
        request = f"{w.get('request_method', '')} {w.get('request_uri', '')} " \
                  f"({w.get('request_age', 0):.1f}s)" if w.get("activity") == "busy" else ""
        rows.append(f"{w['pid']:>8} {w['slot']:>4} {w['generation']:>4} {w['state']:<9} "
                    f"{w.get('activity', ''):<9} {w.get('requests', 0):>7} "
                    f"{w.get('rss', 0) >> 20:>6}M {w['age']:>7.1f}s  {request}")
    return f"listen:               {', '.join(s['listeners'])}\n{head}\n" + "\n".join(rows)


def stop(pid: int, args: argparse.Namespace) -> int:
    control.stop(pid, args.timeout, quick=args.quick)
    print(f"manager {pid} stopped")
    return 0
