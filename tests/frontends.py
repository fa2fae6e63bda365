"""Real web-server front ends for integration tests.

Starts the Debian ``apache2`` (event MPM, real worker processes) and ``nginx``
binaries as foreground subprocesses with a configuration generated under a
temporary directory. Nothing under ``/etc`` is read or written and no system
service is involved. Each front end listens on ``127.0.0.1`` on a free port and
forwards to a FastCGI backend given either as ``("127.0.0.1", port)`` or as a
unix socket path.

URL mappings (identical for both servers so tests can be written once):

``/<name>.py``
    the "script" mapping. Apache: ``ProxyPassMatch ^/(.*)\\.py$`` (note: the
    ``$`` anchor means ``/<name>.py/extra`` is *not* forwarded by Apache).
    nginx: ``location ~ \\.py(/|$)`` with ``fastcgi_split_path_info``.
``/app/<anything>``
    the catch-all "mount" mapping for tests needing arbitrary paths.
    Apache: ``ProxyPass /app/ fcgi://.../``; nginx: ``location ^~ /app/``
    with ``SCRIPT_NAME=/app`` and ``PATH_INFO=/<anything>``.

Anything else is a 404 from the front end itself.

The exact CGI parameters each server sends for these mappings are recorded in
``tests/test_frontends_smoke.py``.

Typical use::

    with start_nginx(tmp_path, ("127.0.0.1", port), keep_conn=True) as fe:
        status, headers, body = fe.request("GET", "/app/x?y=1")

Running as root: Apache refuses to run its workers as root, so they run as
:func:`worker_user` (``www-data``). A unix socket used as Apache's backend must
therefore be reachable by that user: put it in :func:`shared_tmpdir` (pytest's
``tmp_path`` lives below a mode-0700 directory) and make it ``0o666``.
nginx runs its workers as root in that case, so it has no such restriction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import grp
import http.client
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType

APACHE_BIN = "/usr/sbin/apache2"
NGINX_BIN = "/usr/sbin/nginx"
APACHE_MODULE_DIR = Path("/usr/lib/apache2/modules")

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 15.0  # seconds to wait for the listening port
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL

#: ``("127.0.0.1", port)`` for TCP, or the filesystem path of a unix socket.
Backend = tuple[str, int] | str | os.PathLike[str]

#: Modules every generated Apache config loads (unixd and log_config are
#: compiled into Debian's binary).
APACHE_MODULES: tuple[str, ...] = ("mpm_event", "authz_core", "proxy", "proxy_fcgi")


class FrontEndError(RuntimeError):
    """A front end could not be configured, started or stopped."""


# --------------------------------------------------------------------------
# small helpers


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on *host* that is free right now (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def apache_available() -> bool:
    """True when the Apache binary and mod_proxy_fcgi are installed."""
    return os.access(APACHE_BIN, os.X_OK) and (APACHE_MODULE_DIR / "mod_proxy_fcgi.so").exists()


def nginx_available() -> bool:
    """True when the nginx binary is installed."""
    return os.access(NGINX_BIN, os.X_OK)


def worker_user() -> tuple[str, str]:
    """``(user, group)`` Apache workers run as.

    As root this is ``www-data`` (or ``nobody``); otherwise the current user,
    since an unprivileged Apache cannot switch users anyway.
    """
    if os.geteuid() == 0:
        for name in ("www-data", "nobody"):
            with contextlib.suppress(KeyError):
                entry = pwd.getpwnam(name)
                return entry.pw_name, grp.getgrgid(entry.pw_gid).gr_name
        raise FrontEndError("running as root but neither www-data nor nobody exists")
    entry = pwd.getpwuid(os.geteuid())
    return entry.pw_name, grp.getgrgid(os.getegid()).gr_name


@contextlib.contextmanager
def shared_tmpdir(prefix: str = "fcgid-") -> Iterator[Path]:
    """A fresh mode-0755 directory in ``/tmp`` for sockets Apache must reach.

    Removed (recursively) on exit.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _reachable_by(path: Path, user: str) -> bool:
    """Rough check that *user* can search every directory above *path*."""
    entry = pwd.getpwnam(user)
    if entry.pw_uid == 0:
        return True
    for directory in path.absolute().parents:
        st = directory.stat()
        if st.st_uid == entry.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid == entry.pw_gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except FileNotFoundError:
        return ""


# --------------------------------------------------------------------------
# the running server


@dataclasses.dataclass
class FrontEnd:
    """A running Apache or nginx process (group) listening on ``host:port``."""

    name: str
    pid: int
    port: int
    workdir: Path
    config: Path
    error_log: Path
    access_log: Path
    stderr_log: Path
    host: str = LOOPBACK
    _proc: subprocess.Popen[bytes] | None = dataclasses.field(default=None, repr=False)
    _cleanup: list[Callable[[], None]] = dataclasses.field(default_factory=list, repr=False)

    def url(self, path: str = "/") -> str:
        """Absolute ``http://`` URL for *path* on this front end."""
        return f"http://{self.host}:{self.port}{path}"

    def connection(self, timeout: float = 10.0) -> http.client.HTTPConnection:
        """A new (not yet connected) keep-alive HTTP connection to the server."""
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, dict[str, str], bytes]:
        """One request on a fresh connection: ``(status, headers, body)``."""
        conn = self.connection(timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def read_error_log(self) -> str:
        """The server's error log (plus anything it wrote to stderr)."""
        return _tail(self.error_log, limit=1 << 20) + _tail(self.stderr_log, limit=1 << 20)

    def read_access_log(self) -> str:
        """The server's access log."""
        return _tail(self.access_log, limit=1 << 20)

    @property
    def alive(self) -> bool:
        """True while the main server process has not exited."""
        return self._proc is not None and self._proc.poll() is None

    def child_pids(self) -> list[int]:
        """Pids of the direct children (Apache/nginx worker processes)."""
        children: list[int] = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                # the comm field may contain spaces: parse after the last ')'
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == self.pid:
                    children.append(int(entry.name))
        return sorted(children)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the server, SIGKILL its process group after *timeout* s.

        Idempotent. The server was started in its own session, so its process
        group id equals :attr:`pid` and catches stray workers too.
        """
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
            _kill_group(self.pid, grace=timeout)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        while self._cleanup:
            self._cleanup.pop()()

    def __enter__(self) -> FrontEnd:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # members exist but run as another user
        return True
    return True


def _kill_group(pgid: int, grace: float) -> None:
    """Wait up to *grace* s for process group *pgid* to vanish, then SIGKILL it."""
    deadline = time.monotonic() + grace
    while _group_exists(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _group_exists(pgid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


# --------------------------------------------------------------------------
# launching


def _wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    """Poll until *port* accepts connections; False if *proc* exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
        time.sleep(0.05)
    raise FrontEndError(f"pid {proc.pid} not listening on port {port} after {timeout}s")


def _wait_children(front: FrontEnd, count: int, timeout: float) -> None:
    """Poll until *front* has *count* child processes (bounded)."""
    deadline = time.monotonic() + timeout
    while len(front.child_pids()) < count:
        if time.monotonic() > deadline or not front.alive:
            log = front.read_error_log()
            raise FrontEndError(f"{front.name} did not start {count} workers:\n{log}")
        time.sleep(0.05)


def _launch(
    name: str,
    argv: Sequence[str],
    workdir: Path,
    port: int,
    error_log: Path,
    access_log: Path,
    config: Path,
    *,
    min_children: int,
    cleanup: Sequence[Callable[[], None]] = (),
) -> FrontEnd:
    """Start *argv* in its own session; wait until *port* listens and at
    least *min_children* worker processes exist.

    *cleanup* callables run after the server has been stopped.
    """
    stderr_log = workdir / "stderr.log"
    try:
        with open(stderr_log, "wb") as err:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                start_new_session=True,
            )
    except BaseException:
        for func in cleanup:
            func()
        raise
    front = FrontEnd(
        name, proc.pid, port, workdir, config, error_log, access_log, stderr_log,
        _proc=proc, _cleanup=list(cleanup),
    )
    try:
        ready = _wait_listening(proc, port, START_TIMEOUT)
        if ready:
            _wait_children(front, min_children, START_TIMEOUT)
    except BaseException:
        front.stop()
        raise
    if not ready:
        front.stop()
        raise FrontEndError(
            f"{name} exited with status {proc.returncode} during startup "
            f"(config {config}):\n{front.read_error_log()}"
        )
    return front


def _start_with_retry(build: Callable[[int], FrontEnd], attempts: int = 3) -> FrontEnd:
    """Call *build(port)* with fresh ports while a port race makes it fail."""
    error: FrontEndError | None = None
    for _ in range(attempts):
        try:
            return build(free_port())
        except FrontEndError as exc:
            if "in use" not in str(exc):
                raise
            error = exc
    assert error is not None
    raise error


def _fresh_dir(tmp_path: Path, name: str) -> Path:
    """``tmp_path/name``, ``tmp_path/name-2``, ... whichever is unused first."""
    candidate, n = tmp_path / name, 1
    while candidate.exists():
        n += 1
        candidate = tmp_path / f"{name}-{n}"
    candidate.mkdir(parents=True)
    return candidate


# --------------------------------------------------------------------------
# Apache

APACHE_START_SERVERS = 2
APACHE_THREADS_PER_CHILD = 16


def apache_proxy_target(backend: Backend) -> str:
    """mod_proxy URL prefix (no trailing slash) for *backend*."""
    if isinstance(backend, tuple):
        host, port = backend
        return f"fcgi://{host}:{port}"
    return f"unix:{os.fspath(backend)}|fcgi://localhost"


def apache_proxy_params(
    *, enablereuse: bool = False, max_conns: int = APACHE_THREADS_PER_CHILD
) -> str:
    """Worker parameters used on every ProxyPass line.

    ``timeout`` bounds a stalled backend, ``connectiontimeout`` a dead one and
    ``retry=0`` keeps Apache from locking the worker out for 60 s after a
    refused connection (e.g. while the daemon restarts). ``max`` caps the
    per-child connection pool that ``enablereuse=on`` keeps open.
    """
    params = "timeout=30 connectiontimeout=5 retry=0"
    if enablereuse:
        params += f" enablereuse=on max={max_conns}"
    return params


def apache_config(
    workdir: Path,
    docroot: Path,
    port: int,
    backend: Backend | None,
    *,
    enablereuse: bool = False,
    pathinfo: str | None = None,
    sendcl: bool = False,
    extra: str = "",
    modules: Sequence[str] = (),
    log_level: str = "warn",
    threads: int = 0,
) -> str:
    """Text of a self-contained ``httpd.conf`` for :func:`start_apache`."""
    user, group = worker_user()
    if pathinfo:
        modules = (*modules, "setenvif")
    if sendcl:
        modules = (*modules, "env")
    load = "\n".join(
        f"LoadModule {mod}_module {APACHE_MODULE_DIR}/mod_{mod}.so"
        for mod in dict.fromkeys((*APACHE_MODULES, *modules))
    )
    # SetEnvIf (not SetEnv) so the variable exists before mod_proxy_fcgi
    # canonicalises the URL; SetEnv runs too late and is silently ignored.
    pathinfo_line = (
        f"SetEnvIf Request_URI . proxy-fcgi-pathinfo={pathinfo}" if pathinfo else ""
    )
    # Without it a request body that has not fully arrived when the proxy
    # starts is streamed: no CONTENT_LENGTH, HTTP_TRANSFER_ENCODING=chunked.
    sendcl_line = "SetEnv proxy-sendcl 1" if sendcl else ""
    mappings = _apache_mappings(backend, enablereuse) if backend is not None else ""
    threads = threads or APACHE_THREADS_PER_CHILD
    return f"""\
# generated by tests/frontends.py
ServerRoot "{workdir}"
DefaultRuntimeDir "{workdir}/run"
PidFile "{workdir}/run/httpd.pid"
{load}

User {user}
Group {group}
ServerName {LOOPBACK}
Listen {LOOPBACK}:{port}

StartServers {APACHE_START_SERVERS}
ServerLimit 4
ThreadLimit {threads}
ThreadsPerChild {threads}
MinSpareThreads {threads // 2}
MaxSpareThreads {threads * 2}
MaxRequestWorkers {threads * 4}
Timeout 60
KeepAlive On
GracefulShutdownTimeout 5

ErrorLog "{workdir}/logs/error.log"
LogLevel {log_level}
LogFormat "%h \\"%r\\" %>s %b %D" smoke
CustomLog "{workdir}/logs/access.log" smoke

# An empty document root the unprivileged workers can search, so unmapped
# URLs give a quiet 404 instead of a logged "search permissions" 403.
DocumentRoot "{docroot}"
<Directory />
    AllowOverride None
    Require all denied
</Directory>
<Directory "{docroot}">
    Require all granted
</Directory>

{pathinfo_line}
{sendcl_line}
{mappings}

{extra}
"""


def _apache_mappings(backend: Backend, enablereuse: bool) -> str:
    """The ``/app/`` and ``.py`` ProxyPass lines for *backend*."""
    target = apache_proxy_target(backend)
    params = apache_proxy_params(enablereuse=enablereuse)
    return f"""\
# The catch-all mount first, so /app/x.py is not taken by the .py rule.
ProxyPass "/app/" "{target}/" {params}
ProxyPassMatch "^/(.*)\\.py$" "{target}/$1" {params}"""


def start_apache(
    tmp_path: Path,
    backend: Backend | None,
    *,
    enablereuse: bool = False,
    pathinfo: str | None = None,
    sendcl: bool = False,
    extra: str = "",
    modules: Sequence[str] = (),
    log_level: str = "warn",
    threads: int = 0,
) -> FrontEnd:
    """Run Apache (event MPM, ``-DFOREGROUND``) in front of *backend*.

    *threads* per child (default 16; load tests use more, so that Apache itself never
    runs out of workers and closes client connections).

    *enablereuse* adds ``enablereuse=on max=N`` to both mappings, which
    makes Apache pool backend connections and set FCGI_KEEP_CONN.
    *pathinfo* sets the ``proxy-fcgi-pathinfo`` variable for every request
    (``"unescape"``, ``"first-dot"``, ``"last-dot"``, ``"full"``, ``"1"``).
    *sendcl* sets ``proxy-sendcl``: Apache then spools every request body
    and always sends CONTENT_LENGTH, instead of streaming a chunked body
    without one. *extra* is appended verbatim to the server config, after the mappings;
    *modules* names additional modules to load (``"setenvif"`` loads
    ``mod_setenvif.so``). With *backend* ``None`` the two standard mappings
    are left out and *extra* has to provide the proxying.

    Workers run as :func:`worker_user`; a unix-socket *backend* they cannot
    reach raises :class:`FrontEndError` before anything starts.
    """
    if not apache_available():
        raise FrontEndError(f"{APACHE_BIN} or mod_proxy_fcgi is not installed")
    if isinstance(backend, (str, os.PathLike)):
        _check_apache_can_reach(Path(os.fspath(backend)))

    def build(port: int) -> FrontEnd:
        workdir = _fresh_dir(tmp_path, "apache")
        for sub in ("run", "logs"):
            (workdir / sub).mkdir()
        docroot = Path(tempfile.mkdtemp(prefix="fcgid-docroot-", dir="/tmp"))
        docroot.chmod(0o755)
        remove_docroot = functools.partial(shutil.rmtree, docroot, ignore_errors=True)
        conf = workdir / "httpd.conf"
        conf.write_text(
            apache_config(
                workdir, docroot, port, backend, enablereuse=enablereuse,
                pathinfo=pathinfo, sendcl=sendcl, extra=extra, modules=modules,
                log_level=log_level, threads=threads,
            )
        )
        argv = [APACHE_BIN, "-d", str(workdir), "-f", str(conf), "-DFOREGROUND"]
        logs = workdir / "logs"
        return _launch(
            "apache", argv, workdir, port, logs / "error.log", logs / "access.log", conf,
            min_children=APACHE_START_SERVERS, cleanup=[remove_docroot],
        )

    return _start_with_retry(build)


def _check_apache_can_reach(sock: Path) -> None:
    """Fail early if Apache's workers could not search their way to *sock*."""
    user, _ = worker_user()
    if not _reachable_by(sock, user):
        raise FrontEndError(
            f"Apache workers run as {user!r} and cannot reach {sock}; "
            "create the socket inside frontends.shared_tmpdir()"
        )


# --------------------------------------------------------------------------
# nginx

NGINX_WORKERS = 2

# Our own list of FastCGI parameters: the CGI/1.1 meta-variables plus the
# usual extras. They are set at server level and inherited by every location
# that sets no fastcgi_param of its own; $fastcgi_script_name and
# $fastcgi_path_info follow each location's fastcgi_split_path_info.
NGINX_FASTCGI_PARAMS: tuple[tuple[str, str], ...] = (
    ("GATEWAY_INTERFACE", "CGI/1.1"),
    ("SERVER_SOFTWARE", "nginx/$nginx_version"),
    ("SERVER_PROTOCOL", "$server_protocol"),
    ("SERVER_NAME", "$server_name"),
    ("SERVER_ADDR", "$server_addr"),
    ("SERVER_PORT", "$server_port"),
    ("REQUEST_METHOD", "$request_method"),
    ("REQUEST_URI", "$request_uri"),
    ("REQUEST_SCHEME", "$scheme"),
    ("SCRIPT_NAME", "$fastcgi_script_name"),
    ("PATH_INFO", "$fastcgi_path_info"),
    ("SCRIPT_FILENAME", "$document_root$fastcgi_script_name"),
    ("DOCUMENT_URI", "$document_uri"),
    ("DOCUMENT_ROOT", "$document_root"),
    ("QUERY_STRING", "$query_string"),
    ("CONTENT_TYPE", "$content_type"),
    ("CONTENT_LENGTH", "$content_length"),
    ("REMOTE_ADDR", "$remote_addr"),
    ("REMOTE_PORT", "$remote_port"),
    ("HTTPS", "$https if_not_empty"),
)


def nginx_params_block(indent: str = "        ") -> str:
    """``fastcgi_param`` lines for :data:`NGINX_FASTCGI_PARAMS`."""
    return "\n".join(f"{indent}fastcgi_param {k} {v};" for k, v in NGINX_FASTCGI_PARAMS)


def nginx_upstream_server(backend: Backend) -> str:
    """Address for an ``upstream { server ...; }`` line."""
    if isinstance(backend, tuple):
        host, port = backend
        return f"{host}:{port}"
    return f"unix:{os.fspath(backend)}"


def _nginx_upstream(backend: Backend | None, keep_conn: bool, keepalive: int) -> str:
    if backend is None:
        return "# no built-in upstream"
    pool = f"keepalive {keepalive};" if keep_conn else "# no keepalive pool"
    return f"""upstream fcgidaemon {{
        server {nginx_upstream_server(backend)};
        {pool}
    }}"""


def _nginx_locations(backend: Backend | None) -> str:
    if backend is None:
        return "# no built-in mappings"
    return r"""# ^~ so the .py regex below cannot steal /app/anything.py
        location ^~ /app/ {
            fastcgi_split_path_info ^(/app)(/.*)$;
            fastcgi_pass fcgidaemon;
        }

        location ~ \.py(/|$) {
            fastcgi_split_path_info ^(.+?\.py)(/.*)$;
            fastcgi_pass fcgidaemon;
        }"""


def nginx_config(
    prefix: Path,
    port: int,
    backend: Backend | None,
    *,
    keep_conn: bool = False,
    keepalive: int = 32,
    extra: str = "",
    http_extra: str = "",
    log_level: str = "notice",
) -> str:
    """Text of a self-contained ``nginx.conf`` for :func:`start_nginx`."""
    user = "user root;" if os.geteuid() == 0 else "# not root: workers keep our uid"
    return f"""\
# generated by tests/frontends.py
{user}
worker_processes {NGINX_WORKERS};
pid {prefix}/nginx.pid;
lock_file {prefix}/nginx.lock;
error_log {prefix}/logs/error.log {log_level};

events {{
    worker_connections 512;
}}

http {{
    access_log {prefix}/logs/access.log;
    client_body_temp_path {prefix}/tmp/client_body;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    proxy_temp_path {prefix}/tmp/proxy;
    scgi_temp_path {prefix}/tmp/scgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    client_max_body_size 20m;
    keepalive_timeout 30s;

    {_nginx_upstream(backend, keep_conn, keepalive)}

    server {{
        listen {LOOPBACK}:{port};
        server_name localhost;
        root {prefix}/htdocs;

{nginx_params_block()}
        fastcgi_keep_conn {"on" if keep_conn else "off"};
        fastcgi_connect_timeout 5s;
        fastcgi_read_timeout 30s;
        fastcgi_send_timeout 30s;

        # Unmapped URLs: a plain 404 without a "file not found" log line.
        location / {{
            return 404;
        }}

        {_nginx_locations(backend)}

{extra}
    }}

{http_extra}
}}
"""


def start_nginx(
    tmp_path: Path,
    backend: Backend | None,
    *,
    keep_conn: bool = False,
    keepalive: int = 32,
    extra: str = "",
    http_extra: str = "",
    log_level: str = "notice",
) -> FrontEnd:
    """Run nginx (master + 2 workers, ``daemon off``) in front of *backend*.

    With *keep_conn* the upstream gets a ``keepalive`` pool of *keepalive*
    idle connections per worker and ``fastcgi_keep_conn on``, so nginx sets
    FCGI_KEEP_CONN and reuses backend connections. *extra* is inserted into
    the ``server`` block (it inherits the FastCGI params unless it sets its
    own), *http_extra* into the ``http`` block. With *backend* ``None`` the
    upstream and the two standard locations are left out.
    """
    if not nginx_available():
        raise FrontEndError(f"{NGINX_BIN} is not installed")

    def build(port: int) -> FrontEnd:
        prefix = _fresh_dir(tmp_path, "nginx")
        for sub in ("logs", "tmp", "htdocs"):
            (prefix / sub).mkdir()
        conf = prefix / "nginx.conf"
        conf.write_text(
            nginx_config(
                prefix, port, backend, keep_conn=keep_conn, keepalive=keepalive,
                extra=extra, http_extra=http_extra, log_level=log_level,
            )
        )
        error_log = prefix / "logs" / "error.log"
        argv = [
            NGINX_BIN, "-p", f"{prefix}/", "-c", str(conf),
            "-e", str(error_log), "-g", "daemon off;",
        ]
        access_log = prefix / "logs" / "access.log"
        return _launch(
            "nginx", argv, prefix, port, error_log, access_log, conf,
            min_children=NGINX_WORKERS,
        )

    return _start_with_retry(build)
