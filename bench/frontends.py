"""Real nginx and Apache front ends with their own config and prefix under bench/work.

Kinds:

* ``nginx``           ``fastcgi_pass`` to an upstream: a new backend connection per request
* ``nginx-keepconn``  the same with ``fastcgi_keep_conn on`` and ``keepalive 32`` upstream
* ``apache``          mod_proxy_fcgi (event MPM): a new backend connection per request
* ``apache-reuse``    the same with ``enablereuse=on`` (a pool of kept connections)

Both front ends run 2 worker processes (= the 2 cores of the benchmark machine),
log no accesses, and give up on a backend after 2 s (a 504/503 wrk counts).  With no backend
port, each answers by itself, its ceiling: nginx with ``return 200`` (and a static 64 KB
file), Apache with static files of the same bodies (``/hello``, ``/64k``).
"""

from __future__ import annotations

import http.client
import time
from pathlib import Path

import paths
from procs import LOOPBACK, Proc, StartError, spawn, wait_port

FRONTENDS = ("nginx", "nginx-keepconn", "apache", "apache-reuse")
NGINX_BIN = "/usr/sbin/nginx"
APACHE_BIN = "/usr/sbin/apache2"
APACHE_MODULES = Path("/usr/lib/apache2/modules")
WORKER_PROCESSES = 2
# seconds a request may wait on the backend: well under a run's duration, so a request that a
# pinned backend leaves waiting turns into a 504/503 that wrk counts, not a silent stall
BACKEND_TIMEOUT = 2
HELLO_BODY = b"Hello, world\n"  # what /hello answers, from every server and ceiling
HELLO = HELLO_BODY.decode().replace("\n", "\\n")  # as nginx's `return 200` takes it


def nginx_conf(prefix: Path, port: int, backend: int | None, keep_conn: bool,
               script: Path | None = None) -> str:
    temp = "\n".join(f"    {kind}_temp_path {prefix}/{kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    if backend is None:
        locations = f"""
        location = /64k {{ root {paths.STATIC}; }}
        location / {{ return 200 "{HELLO}"; }}"""
        upstream = ""
    else:
        keep = "fastcgi_keep_conn on;" if keep_conn else ""
        keep += f"\n            fastcgi_param SCRIPT_FILENAME {script};" if script else ""
        pool = "keepalive 32; keepalive_requests 1000000;" if keep_conn else ""
        upstream = f"upstream backend {{ server {LOOPBACK}:{backend}; {pool} }}"
        locations = f"""
        location / {{
            include /etc/nginx/fastcgi_params;
            fastcgi_pass backend;
            {keep}
            fastcgi_connect_timeout {BACKEND_TIMEOUT}s;
            fastcgi_read_timeout {BACKEND_TIMEOUT}s;
            fastcgi_send_timeout {BACKEND_TIMEOUT}s;
        }}"""
    return f"""daemon off;
master_process on;
worker_processes {WORKER_PROCESSES};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type text/plain;
{temp}
    keepalive_requests 1000000;
    client_max_body_size 8m;
    client_body_buffer_size 2m;
    fastcgi_buffer_size 16k;
    fastcgi_buffers 16 16k;
    {upstream}
    server {{
        listen {LOOPBACK}:{port};
        {locations}
    }}
}}
"""


def apache_conf(prefix: Path, port: int, backend: int | None, reuse: bool,
                script: Path | None = None) -> str:
    modules = "\n".join(f"LoadModule {name}_module {APACHE_MODULES}/mod_{name}.so"
                        for name in ("mpm_event", "authz_core", "proxy", "proxy_fcgi"))
    reuse_opt = " enablereuse=on" if reuse else ""
    script_env = f'ProxyFCGISetEnvIf "true" SCRIPT_FILENAME "{script}"' if script else ""
    if backend is None:  # the ceiling: the same bodies, as files Apache's core serves
        route = f"""DocumentRoot {paths.STATIC}
<Directory {paths.STATIC}>
    Require all granted
</Directory>"""
    else:
        route = f"""ProxyTimeout {BACKEND_TIMEOUT}
ProxyPass "/" "fcgi://{LOOPBACK}:{backend}/"{reuse_opt} timeout={BACKEND_TIMEOUT}
{script_env}"""
    return f"""ServerRoot {prefix}
{modules}
ServerName localhost
Listen {LOOPBACK}:{port}
PidFile {prefix}/apache.pid
DefaultRuntimeDir {prefix}
ErrorLog {prefix}/error.log
LogLevel warn
User www-data
Group www-data
ServerLimit {WORKER_PROCESSES}
StartServers {WORKER_PROCESSES}
ThreadLimit 32
ThreadsPerChild 32
MaxRequestWorkers {WORKER_PROCESSES * 32}
MinSpareThreads 32
MaxSpareThreads {WORKER_PROCESSES * 32}
MaxConnectionsPerChild 0
KeepAlive On
MaxKeepAliveRequests 0
KeepAliveTimeout 15
Timeout 30
{route}
"""


def start(kind: str, port: int, backend: int | None, workdir: Path, script: Path | None = None) -> Proc:
    """Start a front end on `port` forwarding to `backend` (None: nginx answers itself);
    `script`: the SCRIPT_FILENAME to send (PHP-FPM needs one)."""
    prefix = workdir / f"{kind}-{port}"
    prefix.mkdir(parents=True, exist_ok=True)
    prefix.chmod(0o755)
    conf = prefix / "server.conf"
    if kind.startswith("nginx"):
        conf.write_text(nginx_conf(prefix, port, backend, keep_conn=kind == "nginx-keepconn",
                                   script=script))
        argv = [NGINX_BIN, "-p", str(prefix), "-c", str(conf)]
    elif kind.startswith("apache"):
        conf.write_text(apache_conf(prefix, port, backend, reuse=kind == "apache-reuse",
                                    script=script))
        argv = [APACHE_BIN, "-f", str(conf), "-DFOREGROUND"]
    else:
        raise ValueError(f"unknown front end {kind!r}")
    proc = spawn(kind, argv, prefix / "stderr.log", env=paths.clean_env(), cwd=prefix)
    try:
        wait_port(port, proc, timeout=20.0)
        check(port, proc)
    except BaseException:
        proc.stop()
        raise
    return proc


def check(port: int, proc: Proc, timeout: float = 15.0) -> None:
    """One GET /hello through the front end must answer 200."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
        try:
            conn.request("GET", "/hello")
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                return
            last = f"status {resp.status}"
        except OSError as exc:
            last = str(exc)
        finally:
            conn.close()
        time.sleep(0.1)
    raise StartError(f"{proc.name} on {port} does not answer /hello ({last}):\n{proc.log_tail()}")


def prepare_static() -> None:
    paths.STATIC.mkdir(parents=True, exist_ok=True)
    for name, body in (("64k", b"x" * 65536), ("hello", HELLO_BODY)):
        path = paths.STATIC / name
        if not path.exists() or path.read_bytes() != body:
            path.write_bytes(body)
    paths.STATIC.chmod(0o755)  # Apache's children run as www-data
    for path in paths.STATIC.iterdir():
        path.chmod(0o644)
