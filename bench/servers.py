"""The FastCGI servers compared, each started on 127.0.0.1 with the same app and worker count.

* ``fcgidaemon``  this project (`python -m fcgidaemon`)
* ``flup6``       flup6's preforking server (`flup.server.fcgi_fork.WSGIServer`)
* ``uwsgi``       uWSGI's FastCGI socket, ``--master --processes N``
* ``libfcgi-c``   bench/c/hello.c over libfcgi: the protocol ceiling
* ``php-fpm``     Debian's PHP-FPM, ``pm = static`` with N children, running bench/apps/hello.php
                  (the front ends send it SCRIPT_FILENAME only when it is the backend)

``nginx-return`` (nginx answering by itself) and ``apache-static`` (Apache serving the
same bodies as static files) are the front ends' ceilings, with no backend; frontends.py
handles them.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import fcgiclient
import paths
from procs import LOOPBACK, Proc, StartError, spawn, wait_port

BACKENDS = ("fcgidaemon", "flup6", "uwsgi", "libfcgi-c", "php-fpm")
# each front end's own ceiling, shown in that front end's rows: nginx's behind `nginx` only (as
# it always was), Apache's behind both `apache` and `apache-reuse`, whose p99 target it bounds
CEILINGS = {"nginx": "nginx-return", "apache": "apache-static", "apache-reuse": "apache-static"}
SERVERS = (*BACKENDS, *dict.fromkeys(CEILINGS.values()))
DEFAULT_APP = "hello:application"


@dataclass(frozen=True)
class BackendSpec:
    name: str
    port: int
    workers: int
    app: str = DEFAULT_APP
    pythonpath: Sequence[Path] = (paths.APPS,)
    extra: Sequence[str] = field(default_factory=tuple)  # more fcgidaemon options
    env: Mapping[str, str] = field(default_factory=dict)  # added to the server's environment


def command(spec: BackendSpec) -> tuple[list[str], int, dict[str, str]]:
    """argv, stop signal and environment for one server."""
    pypath = ":".join(str(p) for p in spec.pythonpath)
    port, n = str(spec.port), str(spec.workers)
    if spec.name == "fcgidaemon":
        argv = [paths.PYTHON, "-m", "fcgidaemon", spec.app, "--bind", f"{LOOPBACK}:{port}",
                "--workers", n, "--pythonpath", ",".join(str(p) for p in spec.pythonpath),
                *spec.extra]
        return argv, signal.SIGTERM, paths.fcgidaemon_env(**spec.env)
    if spec.name == "flup6":
        argv = [paths.PYTHON, str(paths.APPS / "flup_server.py"), spec.app, LOOPBACK, port, n]
        return argv, signal.SIGTERM, paths.clean_env(PYTHONPATH=pypath, **spec.env)
    if spec.name == "uwsgi":
        module, _, attr = spec.app.partition(":")
        argv = [str(paths.UWSGI), "--fastcgi-socket", f"{LOOPBACK}:{port}", "--master",
                "--processes", n, "--pythonpath", pypath, "--module", module,
                "--callable", attr or "application", "--need-app", "--disable-logging",
                "--die-on-term", "--listen", "100"]
        return argv, signal.SIGTERM, paths.clean_env(**spec.env)
    if spec.name == "libfcgi-c":
        return [str(paths.C_BINARY), LOOPBACK, port, n], signal.SIGTERM, paths.clean_env(**spec.env)
    if spec.name == "php-fpm":
        argv = [paths.PHP_FPM, "--nodaemonize", "--allow-to-run-as-root", "--fpm-config",
                str(php_fpm_conf(spec))]
        return argv, signal.SIGTERM, paths.clean_env(**spec.env)
    raise ValueError(f"unknown server {spec.name!r}")


def php_fpm_conf(spec: BackendSpec) -> Path:
    """A pool of exactly N children (like the others' N workers), no access log, php.ini as
    Debian ships it for FPM (opcache on)."""
    conf = paths.WORK / "php-fpm" / f"{spec.port}.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(f"""[global]
pid = {conf.with_suffix(".pid")}
error_log = {conf.with_suffix(".log")}
daemonize = no

[bench]
listen = {LOOPBACK}:{spec.port}
listen.backlog = 511
pm = static
pm.max_children = {spec.workers}
pm.max_requests = 0
clear_env = no
""")
    return conf


def start(spec: BackendSpec, logdir: Path, ready_timeout: float = 60.0) -> Proc:
    """Start a server and return once it answers a FastCGI request with 200."""
    argv, stop_signal, env = command(spec)
    proc = spawn(spec.name, argv, logdir / f"{spec.name}-{spec.port}.log", env=env,
                 cwd=paths.ROOT, stop_signal=stop_signal)
    try:
        wait_port(spec.port, proc, timeout=ready_timeout)
        probe(spec.port, proc, timeout=ready_timeout)
    except BaseException:
        proc.stop()
        raise
    return proc


def probe(port: int, proc: Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not proc.alive():
            break
        try:
            status, _ = fcgiclient.request(port, timeout=min(10.0, timeout))
            if status == 200:
                return
            last = f"status {status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise StartError(f"{proc.name} on {port} not answering ({last}):\n{proc.log_tail()}")


def warm_up(port: int, requests: int = 200) -> None:
    """Check each route's answer, then a few requests so first-request costs miss round 1."""
    expected = {("GET", "/hello", b""): b"Hello, world\n", ("GET", "/64k", b""): b"x" * 65536,
                ("POST", "/echo", b"x" * 100_000): b"100000"}
    for (method, uri, body), want in expected.items():
        status, got = fcgiclient.request(port, method, uri, body)
        if status != 200 or got != want:
            raise StartError(f"server on {port}: {method} {uri} answered {status} {got[:40]!r}")
    for uri in ("/hello", "/64k"):
        for _ in range(requests // 2):
            fcgiclient.request(port, uri=uri)
