"""Configuration, declared once.

Every option is one `Option` row: its flag, its environment name, its default,
the parser that turns text into a value and the help line.  The command line
parser, the environment and TOML readers and the README's option table are all
generated from that one table, so they cannot drift apart.

Precedence: command line > ``--config FILE`` (TOML) > environment > defaults.
Everything here is pure: no sockets are opened and nothing is imported, so a bad
value is reported (one line, exit status 2) before anything forks.

Why about 670 lines: the table of 35 options is most of it, with the parsers its rows name;
declared once, it cannot be split without splitting the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence


class ConfigError(Exception):
    """A bad option value; the message is the one line the operator sees."""


# --------------------------------------------------------------------------- parsers


# Limits that keep a value the parser accepts from overflowing a C integer later, where it
# would be a traceback at bind time (listen() takes an int) or in every worker's requests
# (poll() takes an int of milliseconds) instead of one line before anything forks.
MAX_C_INT = 2**31 - 1
MAX_SECONDS = MAX_C_INT // 1000  # 2147483 s, about 24.8 days
# workers per manager: the scoreboard (shared memory, 1,024 records) must hold two generations
# at this size during a reload, and the workers of earlier ones still finishing their requests
MAX_WORKERS = 256


def parse_int_min(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(str(text).strip())
        except ValueError:
            raise ConfigError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise ConfigError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"must be at most {maximum}, got {value}")
        return value

    parse.__name__ = f"int>={minimum}"
    return parse


def parse_seconds(text: str) -> float:
    """Seconds, finite and at most MAX_SECONDS: NaN compares false with every deadline (with
    --ready-timeout nan the manager's wait is 0 and it spins), and infinity, or anything over
    MAX_SECONDS, overflows poll() in the worker (--read-timeout), failing every request that
    has to wait for input."""
    try:
        value = float(str(text).strip())
    except ValueError:
        raise ConfigError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"not a finite number of seconds: {text!r}")
    if value < 0:
        raise ConfigError(f"must not be negative, got {value}")
    if value > MAX_SECONDS:
        raise ConfigError(f"must be at most {MAX_SECONDS} (about 24 days), got {value:g}")
    return value


def parse_positive_seconds(text: str) -> float:
    """Seconds above 0, for a wait that cannot be "none": --ready-timeout 0 failed every start
    (exit 1, which systemd restarts without end) and --read-timeout 0 closed any request whose
    body paused for a moment, where --timeout 0 and --slow-log 0 mean "off"."""
    value = parse_seconds(text)
    if value == 0:
        raise ConfigError("must be above 0 (this wait has no 'off')")
    return value


def parse_octal(value: str | int) -> int:
    """A mode. Text (command line, environment, a TOML string such as "0660") is octal; a TOML
    integer is the mode itself, since TOML has already read `0o660` as 432, and reading
    432 as octal digits again gave 0o432 (and refused `0o022` as 18, not octal digits)."""
    if isinstance(value, int):
        mode = value
    else:
        try:
            mode = int(str(value).strip(), 8)
        except ValueError:
            raise ConfigError(f"not an octal mode: {value!r}") from None
    if not 0 <= mode <= 0o777:  # no setuid, setgid or sticky bit means anything for these
        raise ConfigError(f"mode out of range 0..0777: {value if isinstance(value, str) else oct(value)}")
    return mode


def parse_optional_octal(value: str | int) -> int | None:
    return None if isinstance(value, str) and value.strip() == "" else parse_octal(value)


def parse_str(text: str) -> str:
    return str(text)


def parse_optional_str(text: str) -> str | None:
    text = str(text)
    return text if text else None


SWITCH = {"yes": True, "on": True, "true": True, "1": True, "no": False, "off": False, "false": False,
          "0": False}


def parse_switch(value: str | bool) -> bool:
    if isinstance(value, bool):  # a TOML true/false
        return value
    try:
        return SWITCH[str(value).strip().lower()]
    except KeyError:
        raise ConfigError(f"expected yes or no, not {value!r}") from None


def parse_list(text: str | Sequence[str]) -> list[str]:
    """Comma-separated (or a TOML list); empty items are dropped."""
    items = text if isinstance(text, (list, tuple)) else [text]
    out: list[str] = []
    for item in items:
        out.extend(part.strip() for part in str(item).split(",") if part.strip())
    return out


def parse_log_level(text: str) -> str:
    level = str(text).strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"unknown log level {text!r} (debug, info, warning, error, critical)")
    return level


def parse_app(text: str) -> str:
    """``module:callable``; the callable defaults to ``application``."""
    text = str(text).strip()
    module, _, attr = text.partition(":")
    attr = attr or "application"
    if not module or not all(part.isidentifier() for part in module.split(".")):
        raise ConfigError(f"not an importable module name: {module!r}")
    if not all(part.isidentifier() for part in attr.split(".")):
        raise ConfigError(f"not a callable name: {attr!r}")
    return f"{module}:{attr}"


def parse_size(text: str) -> int:
    """Bytes, or a number with k, M or G (powers of 1024).

    `inf`, `nan` and `1e400` read as floats but have no integer value: refused here, where
    int() would raise OverflowError (a traceback, exit 1) or ValueError."""
    text = str(text).strip()
    factor = {"k": 1 << 10, "K": 1 << 10, "m": 1 << 20, "M": 1 << 20, "g": 1 << 30, "G": 1 << 30}
    scale = factor.get(text[-1:], 1)
    number = text[:-1] if scale != 1 else text
    try:
        scaled = float(number) * scale
    except ValueError:
        raise ConfigError(f"not a size: {text!r} (bytes, or with k, M, G)") from None
    if not math.isfinite(scaled):
        raise ConfigError(f"not a finite size: {text!r}")
    value = int(scaled)
    if value < 0:
        raise ConfigError(f"must not be negative: {text!r}")
    if value == 0 and scaled > 0:  # "0.5" rounded down to 0, which means no limit at all
        raise ConfigError(f"less than one byte: {text!r}")
    return value


def parse_params_size(text: str) -> int:
    """--max-params: a size of at least 1k. Every request has params (0 let the daemon start,
    then dropped every request as a protocol error)."""
    value = parse_size(text)
    if value < 1024:
        raise ConfigError(f"must be at least 1k (every request's params count), got {text!r}")
    return value


def parse_networks(text: str | Sequence[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    nets = []
    for item in parse_list(text):
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(f"not an address or network: {item!r}") from None
    return nets


def in_networks(host: str, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    """Whether the address `host` lies in one of `networks` (--allow-from, --status-allow). An
    IPv4-mapped IPv6 address (::ffff:a.b.c.d, from a dual-stack socket) is the IPv4 one; text
    that is no address is in none."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)


@dataclass(frozen=True)
class Address:
    """Where to listen: a unix path, or a host (None = all IPv4) and a port."""

    path: str | None = None
    host: str | None = None
    port: int = 0

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = self.host if self.host is not None else ""
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{self.port}"


def parse_bind(text: str) -> Address:
    """Parse ``:9005``, ``127.0.0.1:9005``, ``[::1]:9005``, ``localhost:9005``,
    ``/run/app.sock`` or ``unix:/path``.

    ``:9005`` means all IPv4 interfaces, as Perl's FCGI reads it.
    """
    text = str(text).strip()
    if text.startswith("unix:"):
        text = text[5:]
        if not text:
            raise ConfigError("empty unix socket path")
        if text.startswith("@"):  # it made a file named "@name" in the working directory
            raise ConfigError(f"abstract unix sockets are not supported: {text!r} (give a path)")
        return Address(path=text)
    if text.startswith("/") or text.startswith("./"):
        return Address(path=text)
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"bad address {text!r} (expected [v6addr]:port)")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"bad IPv6 address {host!r}") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ConfigError(f"bad address {text!r} (expected HOST:PORT, :PORT or a socket path)")
        if ":" in host:
            raise ConfigError(f"bad address {text!r} (write IPv6 addresses as [addr]:port)")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"bad port in {text!r}") from None
    if not 0 < port < 65536:
        raise ConfigError(f"port out of range in {text!r}")
    return Address(host=host or None, port=port)


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Option:
    name: str  # attribute of Config
    flag: str | None  # command line flag (None: positional)
    env: str | None
    default: str | None  # in the text form an operator would write
    parse: Callable[[Any], Any]
    help: str
    metavar: str = ""
    repeat: bool = False  # list options may be given several times

    @property
    def toml_key(self) -> str:
        return self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("app", None, "FCGIDAEMON_APP", None, parse_app,
           "WSGI application as module:callable (callable defaults to `application`); "
           "imported by each worker after the fork, so a reload picks up new code", "APP"),
    Option("bind", "--bind", "FCGI_SOCKET_PATH", "127.0.0.1:9005", parse_bind,
           "listen address: `HOST:PORT`, `:PORT` (all IPv4), `[::1]:PORT`, a name (every address "
           "it resolves to), `/path.sock` or `unix:/path`; ignored when systemd passes sockets", "ADDR"),
    Option("backlog", "--backlog", "FCGI_LISTEN_QUEUE", "1024", parse_int_min(1, MAX_C_INT),
           "listen queue length (the kernel caps it at net.core.somaxconn): connections beyond "
           "the busy workers wait there; a full queue refuses them (a unix socket at once: "
           "nginx 502)", "N"),
    Option("workers", "--workers", "FCGIDAEMON_WORKERS", "4", parse_int_min(1, MAX_WORKERS),
           f"number of worker processes (at most {MAX_WORKERS})", "N"),
    Option("preload", "--preload", "FCGIDAEMON_PRELOAD", "", parse_list,
           "modules imported once in the manager before forking (comma-separated, may repeat); "
           "never reloaded by SIGHUP", "MODS", repeat=True),
    Option("share_stdlib", "--share-stdlib", "FCGIDAEMON_SHARE_STDLIB", "yes", parse_switch,
           "the manager imports the standard-library modules its workers imported (never the "
           "application's or third-party code), so workers it starts later (the next reload, "
           "replacements) share them instead of each holding a copy", "yes/no"),
    Option("chdir", "--chdir", "FCGIDAEMON_CHDIR", None, parse_optional_str,
           "change to this directory before importing anything", "DIR"),
    Option("pythonpath", "--pythonpath", "FCGIDAEMON_PYTHONPATH", "", parse_list,
           "directories put first on sys.path (comma-separated, may repeat)", "DIRS", repeat=True),
    Option("graceful_timeout", "--graceful-timeout", "FCGIDAEMON_GRACEFUL_TIMEOUT", "30",
           parse_seconds, "seconds a stopping worker may take to finish its request before SIGKILL",
           "S"),
    Option("ready_timeout", "--ready-timeout", "FCGIDAEMON_READY_TIMEOUT", "60", parse_positive_seconds,
           "seconds a new worker may take to import the app and become ready; a reload whose "
           "workers are not ready by then is aborted", "S"),
    Option("read_timeout", "--read-timeout", "FCGIDAEMON_READ_TIMEOUT", "30", parse_positive_seconds,
           "seconds a connection may stall in the middle of a request before it is closed", "S"),
    Option("keep_conn_idle", "--keep-conn-idle", "FCGIDAEMON_KEEP_CONN_IDLE", "60", parse_positive_seconds,
           "seconds an idle kept (FCGI_KEEP_CONN) connection is held open", "S"),
    Option("timeout", "--timeout", "FCGIDAEMON_TIMEOUT", "0", parse_seconds,
           "seconds one request may run; a worker busy longer has its stack logged and is killed "
           "and replaced (0: no limit)", "S"),
    Option("slow_log", "--slow-log", "FCGIDAEMON_SLOW_LOG", "0", parse_seconds,
           "log the stack of a request still running after this many seconds, once, without "
           "killing it (0: off)", "S"),
    Option("max_requests", "--max-requests", "FCGIDAEMON_MAX_REQUESTS", "0", parse_int_min(0),
           "a worker is replaced after this many requests; its replacement starts first (0: never)",
           "N"),
    Option("max_requests_jitter", "--max-requests-jitter", "FCGIDAEMON_MAX_REQUESTS_JITTER", "0",
           parse_int_min(0), "add a random 0..J to each worker's --max-requests, so workers do not "
           "all recycle at once", "J"),
    Option("max_memory", "--max-memory", "FCGIDAEMON_MAX_MEMORY", "0", parse_int_min(0),
           "a worker whose RSS exceeds this many MB is replaced the same way (0: no limit)", "MB"),
    Option("max_body", "--max-body", "FCGIDAEMON_MAX_BODY", "0", parse_size,
           "largest request body accepted (bytes, or with k/M/G); a larger CONTENT_LENGTH gets "
           "413, one that is not a number 400, and a body that outgrows the limit as the "
           "application reads it (none or less declared) 413 too (0: no limit)", "SIZE"),
    Option("max_params", "--max-params", "FCGIDAEMON_MAX_PARAMS", "1M", parse_params_size,
           "largest FCGI_PARAMS stream (request headers and CGI variables) accepted, and the "
           "most request body taken before the params end; more closes the connection (at "
           "least 1k)", "SIZE"),
    Option("allow_from", "--allow-from", "FCGI_WEB_SERVER_ADDRS", "", parse_networks,
           "client addresses or networks allowed to connect over TCP (comma-separated, may repeat; "
           "empty: any); others are closed and logged", "ADDRS", repeat=True),
    Option("min_workers", "--min-workers", "FCGIDAEMON_MIN_WORKERS", "0", parse_int_min(0),
           "dynamic mode (needs --max-workers): never fewer workers than this (0: 1)",
           "N"),
    Option("max_workers", "--max-workers", "FCGIDAEMON_MAX_WORKERS", "0", parse_int_min(0, MAX_WORKERS),
           "dynamic mode: add a worker when the workers were busy 9/10 of the last 0.5 s, up "
           "to this many (0: fixed at --workers)", "N"),
    Option("idle_timeout", "--idle-timeout", "FCGIDAEMON_IDLE_TIMEOUT", "10", parse_seconds,
           "dynamic mode: retire a worker when, over this long, one fewer would have been busy "
           "at most half of the time (down to --min-workers)", "S"),
    Option("status_path", "--status-path", "FCGIDAEMON_STATUS_PATH", "", parse_optional_str,
           "answer this path with the status page (text; `?json`, `?full`, `?openmetrics`), "
           "without calling the application (off by default)", "PATH"),
    Option("ping_path", "--ping-path", "FCGIDAEMON_PING_PATH", "", parse_optional_str,
           "answer this path with `pong` (off by default)", "PATH"),
    Option("status_allow", "--status-allow", "FCGIDAEMON_STATUS_ALLOW", "127.0.0.0/8,::1",
           parse_networks, "client addresses (REMOTE_ADDR) allowed to read the status and ping "
           "pages (comma-separated, may repeat)", "ADDRS", repeat=True),
    Option("access_log", "--access-log", "FCGIDAEMON_ACCESS_LOG", "", parse_optional_str,
           "write an access log (combined format, then request time in us and worker pid) to "
           "FILE or `-` for stdout (off by default); a FILE moved or removed (logrotate) is "
           "reopened within a second, no signal needed; one that cannot be opened stops the "
           "start (exit 2) or fails the reload", "FILE"),
    Option("reload_check", "--reload-check", "FCGIDAEMON_RELOAD_CHECK", "", parse_optional_str,
           "a new worker first serves one GET of this path in-process and must answer 2xx before "
           "it counts as ready; otherwise the reload is aborted like an import error", "PATH"),
    Option("pidfile", "--pidfile", "FCGIDAEMON_PIDFILE", None, parse_optional_str,
           "write the manager's pid here (removed on exit)", "FILE"),
    Option("user", "--user", "FCGIDAEMON_USER", None, parse_optional_str,
           "switch to this user after binding, before importing anything", "USER"),
    Option("group", "--group", "FCGIDAEMON_GROUP", None, parse_optional_str,
           "switch to this group after binding", "GROUP"),
    Option("umask", "--umask", "FCGIDAEMON_UMASK", None, parse_optional_octal,
           "process umask (octal)", "MODE"),
    Option("socket_mode", "--socket-mode", "FCGIDAEMON_SOCKET_MODE", "0660", parse_octal,
           "permissions of a unix socket (octal)", "MODE"),
    Option("socket_owner", "--socket-owner", "FCGIDAEMON_SOCKET_OWNER", None, parse_optional_str,
           "owner of a unix socket, `user[:group]` (from the environment, ignored for a TCP "
           "--bind: a site default for unix sockets)", "USER[:GROUP]"),
    Option("log_level", "--log-level", "FCGIDAEMON_LOG_LEVEL", "info", parse_log_level,
           "debug, info, warning, error or critical", "LEVEL"),
)

OPTIONS_BY_NAME = {opt.name: opt for opt in OPTIONS}


@dataclass(frozen=True)
class Config:
    """The resolved configuration: one value per `Option`."""

    app: str
    bind: Address
    backlog: int
    workers: int
    preload: list[str] = field(default_factory=list)
    share_stdlib: bool = True
    chdir: str | None = None
    pythonpath: list[str] = field(default_factory=list)
    graceful_timeout: float = 30.0
    ready_timeout: float = 60.0
    read_timeout: float = 30.0
    keep_conn_idle: float = 60.0
    timeout: float = 0.0
    slow_log: float = 0.0
    max_requests: int = 0
    max_requests_jitter: int = 0
    max_memory: int = 0
    max_body: int = 0
    max_params: int = 1 << 20
    allow_from: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(default_factory=list)
    min_workers: int = 0
    max_workers: int = 0
    idle_timeout: float = 10.0
    status_path: str | None = None
    ping_path: str | None = None
    status_allow: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(default_factory=list)
    access_log: str | None = None
    reload_check: str | None = None
    pidfile: str | None = None
    user: str | None = None
    group: str | None = None
    umask: int | None = None
    socket_mode: int = 0o660
    socket_owner: str | None = None
    log_level: str = "INFO"
    config_file: str | None = None

    @property
    def dynamic(self) -> bool:
        return bool(self.max_workers)

    @property
    def app_module(self) -> str:
        return self.app.partition(":")[0]

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)


assert {f.name for f in dataclasses.fields(Config)} == {o.name for o in OPTIONS} | {"config_file"}


# --------------------------------------------------------------------------- resolution


COMMANDS_HELP = """\
commands, as fcgidaemon COMMAND (--pid PID | --pidfile FILE), each with its own --help:
  reload   SIGHUP: deploy new code (--wait: until it serves, exit 1 if it failed)
  upgrade  SIGUSR2: a new manager (--wait: until it serves)
  status   manager, generation, every worker (--json)
  stop     graceful stop, waiting for the exit (--quick: SIGQUIT)
  check    fcgidaemon check APP [options]: import the application in a fresh process"""


def build_parser(prog: str = "fcgidaemon") -> argparse.ArgumentParser:
    daemon = prog == "fcgidaemon"
    parser = ErrorParser(
        prog=prog,
        description="Preforking FastCGI daemon for WSGI applications." if daemon else
        "Import the application (and --preload) in a fresh process, as a worker would: exit 0 "
        "if it imports, 1 if it fails, 2 if it is not found or an option is wrong.",
        epilog=COMMANDS_HELP if daemon else None,
        argument_default=argparse.SUPPRESS,
        formatter_class=_Formatter,
    )
    for opt in OPTIONS:
        if opt.flag is None:
            parser.add_argument(opt.name, nargs="?", metavar=opt.metavar, help=opt.help)
        else:
            parser.add_argument(opt.flag, dest=opt.name, metavar=opt.metavar, help=opt.help,
                                action="append" if opt.repeat else "store")
    parser.add_argument("--config", dest="config_file", metavar="FILE",
                        help="TOML file with option values (keys as the long flags without --)")
    return parser


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter with the width found without `shutil`.

    argparse builds a formatter for every add_argument() and, with no width given, imports
    shutil for the terminal size; shutil imports zlib, bz2 and lzma (~0.5 MB of modules and
    libraries in the manager, a share of every worker's memory) that the daemon never uses.
    """

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=terminal_width())

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        """Each line of the description and epilog wrapped on its own (argparse joins them)."""
        import textwrap

        return "\n".join(textwrap.fill(line, width, initial_indent=indent,  # under the text
                                        subsequent_indent=indent + " " * (11 if line[:1] == " " else 0))
                         for line in text.splitlines())


def terminal_width() -> int:
    """COLUMNS, else the terminal's width, else 80; what shutil.get_terminal_size() gives, less 2."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 80
    return max(columns - 2, 20)


class ErrorParser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage, so every error is one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def read_toml(path: str) -> dict[str, Any]:
    # imported here: ~0.85 MB of objects in the manager (shared by every worker's PSS) that
    # a daemon started without a config file never needs
    import tomllib

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8; this escaped as a traceback, exit 1
        raise ConfigError(f"config file {path}: not UTF-8 (byte {exc.start}: "
                          f"{exc.object[exc.start:exc.start + 1]!r})") from None
    table = data.get("fcgidaemon", data)
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [fcgidaemon] must be a table")
    if "fcgidaemon" in data:
        # with the table, keys outside it are not read at all: an error, not a silently
        # ignored `workers = 8` (or misspelt `wrokers`) above the [fcgidaemon] line
        outside = sorted(k for k in data if k != "fcgidaemon")
        if outside:
            raise ConfigError(f"config file {path}: {outside[0]!r} is outside the [fcgidaemon] "
                              f"table (keys go in the table, or all at the top level)")
    known = {opt.toml_key for opt in OPTIONS} | {opt.name for opt in OPTIONS}
    unknown = sorted(k for k in table if k not in known)
    if unknown:
        raise ConfigError(f"config file {path}: unknown option {unknown[0]!r}")
    _decimal_modes(path, table)
    values: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name in values:  # both spellings: TOML refuses a repeated key, so do we
            raise ConfigError(f"config file {path}: {key!r} is given twice (as "
                              f"{name.replace('_', '-')!r} and as {name!r})")
        values[name] = value
    return values


MODE_KEYS = ("umask", "socket-mode", "socket_mode")


def _decimal_modes(path: str, table: dict[str, Any]) -> None:
    """A mode written as a bare TOML integer is decimal: `umask = 77` was the mask 0o115 and
    left files world-writable, silently. Only 0o... or a string may say a mode; the file's text
    tells how the value was written (TOML has already turned it into a number)."""
    import re
    text = None
    for key in MODE_KEYS:
        if isinstance(table.get(key), int) and not isinstance(table[key], bool):
            if text is None:  # read once, and only when a mode is a number
                with open(path, encoding="utf-8") as fh:
                    text = fh.read()
            # bare or quoted (a TOML key may be written "umask" or 'umask')
            written = re.search(rf"^\s*([\"']?){re.escape(key)}\1\s*=\s*(\S+)", text, re.M)
            if written is None or not written.group(2).lower().startswith("0o"):
                literal = written.group(2) if written else str(table[key])
                raise ConfigError(f"config file {path}: {key} = {literal} is a decimal number; "
                                  f"write a mode as 0o{literal.lstrip('0') or '0'} or \"{literal}\"")


def resolve(argv: Sequence[str], environ: Mapping[str, str] | None = None,
            prog: str = "fcgidaemon") -> Config:
    """Turn argv (without the program name) and the environment into a Config."""
    environ = os.environ if environ is None else environ
    given = vars(build_parser(prog).parse_args(list(argv)))
    config_file = given.pop("config_file", None)
    if config_file == "":  # `--config "$UNSET"` read no file and said nothing
        raise ConfigError("--config: empty file name")
    from_file = read_toml(config_file) if config_file else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for opt in OPTIONS:
        source, raw = _pick(opt, given, from_file, environ, config_file)
        sources[opt.name] = source
        if raw is None and opt.name == "app":
            raise ConfigError("no application given (APP as module:callable)")
        if isinstance(raw, list) and not opt.repeat:
            raise ConfigError(f"{opt.flag or opt.name}: a single value is expected ({source})")
        try:
            values[opt.name] = None if raw is None else opt.parse(raw)
        except ConfigError as exc:
            raise ConfigError(f"{opt.flag or opt.name} ({source}): {exc}") from None
    if values["socket_owner"] and values["bind"].path is None and sources["socket_owner"].startswith("environment"):
        # a site default for unix sockets (fcgidaemon@.service sets one, and tells how to
        # bind TCP in the instance's TOML file instead): refused, that instance never started
        values["socket_owner"] = None
    config = Config(config_file=config_file, **values)
    check_consistency(config, sources)
    return config


def check_consistency(config: Config, sources: Mapping[str, str] | None = None) -> None:
    """Options that contradict each other; the error says where each value came from (an
    Environment= line of a unit is easily forgotten)."""
    def said(name: str) -> str:
        return f" ({sources[name]})" if sources and sources.get(name, "default") != "default" else ""

    if config.max_workers:
        low = config.min_workers or 1
        if not low <= config.workers <= config.max_workers:
            raise ConfigError(f"--workers {config.workers}{said('workers')} must lie within "
                              f"--min-workers {low}{said('min_workers')} and --max-workers "
                              f"{config.max_workers}{said('max_workers')}")
    elif config.min_workers:
        raise ConfigError(f"--min-workers{said('min_workers')} needs --max-workers")
    if config.socket_owner and config.bind.path is None:  # accepted, and silently unused
        raise ConfigError(f"--socket-owner{said('socket_owner')} applies to a unix socket "
                          f"(--bind unix:PATH), not --bind {config.bind}{said('bind')}")
    for name in ("status_path", "ping_path", "reload_check"):
        path = getattr(config, name)
        if path is not None and not path.startswith("/"):
            raise ConfigError(f"--{name.replace('_', '-')}{said(name)} must start with /: {path!r}")


def _pick(opt: Option, given: dict[str, Any], from_file: dict[str, Any],
          environ: Mapping[str, str], config_file: str | None) -> tuple[str, Any]:
    if opt.name in given and given[opt.name] is not None:
        return "command line", given[opt.name]
    if opt.name in from_file:
        value = from_file[opt.name]
        if (isinstance(value, bool) and opt.parse is not parse_switch) or \
                not isinstance(value, (str, int, float, list)):
            raise ConfigError(f"config file {config_file}: bad value for {opt.toml_key}")
        return f"config file {config_file}", value
    if opt.env and environ.get(opt.env, "") != "":
        return f"environment {opt.env}", environ[opt.env]
    return "default", opt.default


def log_level_number(config: Config) -> int:
    return int(getattr(logging, config.log_level))


def options_markdown() -> str:
    """The README's option table, generated from `OPTIONS`."""
    rows = ["| option | environment | default | meaning |", "| --- | --- | --- | --- |"]
    for opt in OPTIONS:
        flag = f"`{opt.flag} {opt.metavar}`" if opt.flag else f"`{opt.metavar}`"
        env = f"`{opt.env}`" if opt.env else ""
        rows.append(f"| {flag} | {env} | {_show_default(opt)} | {opt.help} |")
    rows.append("| `--config FILE` | | | TOML file with option values "
                "(keys as the long flags without `--`, top level or under `[fcgidaemon]`) |")
    return "\n".join(rows)


def _show_default(opt: Option) -> str:
    return f"`{opt.default}`" if opt.default else ""
