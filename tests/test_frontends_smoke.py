"""Smoke tests for tests/frontends.py against a stand-in FastCGI backend.

The backend below is a minimal FastCGI responder (stdlib only, one thread per
connection) that answers every request with ``Status: 200 OK`` and a JSON body
describing what the front end sent: the CGI params, the FCGI_KEEP_CONN flag,
the request body length and how many requests it has seen on the connection.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import pwd
import re
import socket
import socketserver
import struct
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from frontends import (
    APACHE_BIN,
    NGINX_BIN,
    Backend,
    FrontEnd,
    FrontEndError,
    apache_available,
    free_port,
    nginx_available,
    shared_tmpdir,
    start_apache,
    start_nginx,
    worker_user,
)

pytestmark = pytest.mark.timeout(60)

# --------------------------------------------------------------------------
# a tiny FastCGI responder

FCGI_VERSION = 1
BEGIN_REQUEST, ABORT_REQUEST, END_REQUEST = 1, 2, 3
PARAMS, STDIN, STDOUT = 4, 5, 6
GET_VALUES, GET_VALUES_RESULT = 9, 10
FCGI_KEEP_CONN = 1
HEADER = struct.Struct("!BBHHBx")


@dataclass
class FcgiRequest:
    request_id: int
    keep_conn: bool
    params: dict[str, str] = field(default_factory=dict)
    stdin: bytes = b""


def _read_exact(stream: Any, size: int) -> bytes | None:
    data = stream.read(size)
    if len(data) < size:
        return None  # EOF: the front end closed the connection
    return data


def _read_record(stream: Any) -> tuple[int, int, bytes] | None:
    header = _read_exact(stream, HEADER.size)
    if header is None:
        return None
    _version, rtype, request_id, length, padding = HEADER.unpack(header)
    content = _read_exact(stream, length + padding)
    if content is None:
        return None
    return rtype, request_id, content[:length]


def _decode_params(data: bytes) -> dict[str, str]:
    params: dict[str, str] = {}
    pos = 0

    def length() -> int:
        nonlocal pos
        if data[pos] < 0x80:
            pos += 1
            return data[pos - 1]
        pos += 4
        return struct.unpack("!I", data[pos - 4 : pos])[0] & 0x7FFFFFFF

    while pos < len(data):
        name_len, value_len = length(), length()
        name = data[pos : pos + name_len].decode("latin-1")
        pos += name_len
        params[name] = data[pos : pos + value_len].decode("latin-1")
        pos += value_len
    return params


def _record(rtype: int, request_id: int, content: bytes = b"") -> bytes:
    return HEADER.pack(FCGI_VERSION, rtype, request_id, len(content), 0) + content


def _read_request(stream: Any, conn: socket.socket) -> FcgiRequest | None:
    """Read one complete request (BEGIN, PARAMS..., STDIN...) or None on EOF."""
    request: FcgiRequest | None = None
    raw_params, stdin = bytearray(), bytearray()
    while True:
        record = _read_record(stream)
        if record is None:
            return None
        rtype, request_id, content = record
        if rtype == GET_VALUES:
            conn.sendall(_record(GET_VALUES_RESULT, 0))
        elif rtype == BEGIN_REQUEST:
            _role, flags = struct.unpack("!HB", content[:3])
            request = FcgiRequest(request_id, bool(flags & FCGI_KEEP_CONN))
        elif rtype == ABORT_REQUEST:
            return None
        elif rtype == PARAMS and content:
            raw_params += content
        elif rtype == STDIN and content:
            stdin += content
        elif rtype == STDIN and request is not None:
            request.params = _decode_params(bytes(raw_params))
            request.stdin = bytes(stdin)
            return request


def _response(request_id: int, body: bytes) -> bytes:
    head = b"Status: 200 OK\r\nContent-Type: application/json\r\n\r\n"
    payload = head + body
    chunks = [payload[i : i + 65535] for i in range(0, len(payload), 65535)]
    out = b"".join(_record(STDOUT, request_id, c) for c in chunks)
    out += _record(STDOUT, request_id)
    return out + _record(END_REQUEST, request_id, struct.pack("!IB3x", 0, 0))


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.settimeout(20)
        self.server.connections += 1  # type: ignore[attr-defined]
        served = 0
        with contextlib.suppress(OSError), conn.makefile("rb") as stream:
            while (req := _read_request(stream, conn)) is not None:
                served += 1
                body = json.dumps(
                    {
                        "params": req.params,
                        "keep_conn": req.keep_conn,
                        "conn_requests": served,
                        "stdin_len": len(req.stdin),
                    }
                ).encode()
                conn.sendall(_response(req.request_id, body))
                if not req.keep_conn:
                    break


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    connections = 0


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    connections = 0


@dataclass
class EchoBackend:
    """A running echo responder and the address front ends should use."""

    address: Backend
    server: _TCPServer | _UnixServer

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        return self.server.connections


@contextlib.contextmanager
def echo_backend(kind: str) -> Iterator[EchoBackend]:
    """Serve the echo responder on a loopback TCP port (``"tcp"``) or a unix
    socket (``"unix"``) until the context exits.

    The unix socket lives in a world-searchable directory and is mode 0666 so
    that Apache's unprivileged workers can connect to it.
    """
    with contextlib.ExitStack() as stack:
        server: _TCPServer | _UnixServer
        if kind == "tcp":
            server = _TCPServer(("127.0.0.1", 0), _EchoHandler)
            address: Backend = ("127.0.0.1", server.server_address[1])
        else:
            path = stack.enter_context(shared_tmpdir()) / "echo.sock"
            server = _UnixServer(str(path), _EchoHandler)
            path.chmod(0o666)
            address = str(path)
        stack.callback(server.server_close)
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        stack.callback(thread.join, 5)
        stack.callback(server.shutdown)
        yield EchoBackend(address, server)


# --------------------------------------------------------------------------
# fixtures

NEEDS_APACHE = pytest.mark.skipif(
    not apache_available(),
    reason=f"{APACHE_BIN} with mod_proxy_fcgi is not installed (apt-get install apache2)",
)
NEEDS_NGINX = pytest.mark.skipif(
    not nginx_available(), reason=f"{NGINX_BIN} is not installed (apt-get install nginx)"
)


@dataclass
class Rig:
    """A front end wired to an echo backend."""

    front: FrontEnd
    reuse: bool  # enablereuse (Apache) / keep_conn (nginx)
    echo: EchoBackend

    @property
    def is_apache(self) -> bool:
        return self.front.name == "apache"

    def get(
        self,
        path: str,
        *,
        method: str = "GET",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Request *path*, assert 200 and return the decoded echo."""
        status, _, reply = self.front.request(method, path, body=body, headers=headers)
        assert status == 200, (status, reply[:300], self.front.read_error_log()[-2000:])
        return json.loads(reply)


def start_front(name: str, reuse: bool, tmp_path: Path, backend: Backend) -> FrontEnd:
    if name == "apache":
        return start_apache(tmp_path, backend, enablereuse=reuse)
    return start_nginx(tmp_path, backend, keep_conn=reuse)


@pytest.fixture(params=["tcp", "unix"])
def echo(request: pytest.FixtureRequest) -> Iterator[EchoBackend]:
    with echo_backend(request.param) as backend:
        yield backend


@pytest.fixture
def tcp_echo() -> Iterator[EchoBackend]:
    with echo_backend("tcp") as backend:
        yield backend


@pytest.fixture(
    params=[
        pytest.param(("apache", False), id="apache", marks=NEEDS_APACHE),
        pytest.param(("apache", True), id="apache-enablereuse", marks=NEEDS_APACHE),
        pytest.param(("nginx", False), id="nginx", marks=NEEDS_NGINX),
        pytest.param(("nginx", True), id="nginx-keep_conn", marks=NEEDS_NGINX),
    ]
)
def rig(request: pytest.FixtureRequest, tmp_path: Path, echo: EchoBackend) -> Iterator[Rig]:
    name, reuse = request.param
    with start_front(name, reuse, tmp_path, echo.address) as front:
        yield Rig(front, reuse, echo)


# --------------------------------------------------------------------------
# What the front ends send. Measured with Apache 2.4.71 and nginx 1.22.1 on
# Debian 12; identical over TCP and unix sockets and with or without
# connection reuse (only SCRIPT_FILENAME names the backend, see below).
#
# GET /hello.py/extra?x=1
#   apache  not forwarded: 404. ProxyPassMatch ^/(.*)\.py$ is anchored at
#           ".py", so a trailing path falls through to the document root.
#           (With a ^/(.*\.py(/.*)?)$ rule Apache sends SCRIPT_NAME
#           =/hello.py/extra and no PATH_INFO unless proxy-fcgi-pathinfo
#           is set, e.g. first-dot -> SCRIPT_NAME=/hello.py PATH_INFO=/extra.)
#   nginx   SCRIPT_NAME=/hello.py PATH_INFO=/extra
#           REQUEST_URI=/hello.py/extra?x=1 QUERY_STRING=x=1
#           SCRIPT_FILENAME=<root>/hello.py
# GET /hello.py?x=1
#   apache  SCRIPT_NAME=/hello.py, PATH_INFO absent, REQUEST_URI=/hello.py?x=1,
#           QUERY_STRING=x=1, SCRIPT_FILENAME=proxy:fcgi://127.0.0.1:PORT/hello
#           (unix socket: proxy:fcgi://localhost/hello; note ".py" is gone:
#           it is the $1 of the rule)
#   nginx   SCRIPT_NAME=/hello.py PATH_INFO="" (present but empty)
#           SCRIPT_FILENAME=<root>/hello.py
# GET /app/some/path?x=1 (catch-all mapping)
#   apache  SCRIPT_NAME=/app/some/path (the whole URL-decoded path),
#           PATH_INFO absent, REQUEST_URI=/app/some/path?x=1,
#           SCRIPT_FILENAME=proxy:fcgi://127.0.0.1:PORT/some/path.
#           With proxy-fcgi-pathinfo=unescape: SCRIPT_NAME=/app,
#           PATH_INFO=/some/path (decoded). "=1" leaves PATH_INFO %-encoded
#           and SCRIPT_NAME un-stripped; it must be set with SetEnvIf,
#           SetEnv is too late and silently ignored.
#   nginx   SCRIPT_NAME=/app PATH_INFO=/some/path SCRIPT_FILENAME=<root>/app
# Chunked request bodies: nginx buffers the body and always sends
# CONTENT_LENGTH, plus HTTP_TRANSFER_ENCODING=chunked. Apache sends
# CONTENT_LENGTH (and drops the T-E header) only if the whole body has
# already arrived when it starts proxying; otherwise it streams the body with
# NO CONTENT_LENGTH and HTTP_TRANSFER_ENCODING=chunked, so the backend must
# read FCGI_STDIN to its end. "SetEnv proxy-sendcl 1" (sendcl=True) makes it
# spool and always send the length. nginx passes HTTP_CONTENT_LENGTH too.
# A client "Proxy:" header: Apache drops it, nginx passes HTTP_PROXY.
# Unmapped: Apache 404 for /app (no slash), nginx 301 to /app/.
# Apache answers %2F in the path with 404 (AllowEncodedSlashes Off); nginx
# decodes it into PATH_INFO.
# Both: REMOTE_ADDR=127.0.0.1, HTTPS absent over plain HTTP, REQUEST_URI
# verbatim (still %-encoded), SCRIPT_NAME/PATH_INFO %-decoded raw bytes.
# Apache sends no CONTENT_LENGTH/CONTENT_TYPE on a GET without a body; nginx
# (with the usual params) sends both as "". Apache sends FCGI_KEEP_CONN only
# with enablereuse=on, nginx only with fastcgi_keep_conn on; without it
# each opens one connection per request.
# Apache quirk: a ProxyPassMatch target "fcgi://host:port/$1" only uses its
# own worker (and so its timeout=/retry=/enablereuse= settings) when the
# text substituted for $1 is at least two characters long: /x.py ("x") falls
# back to Apache's default worker with default settings. Use longer names.


def apache_script_filename(echo: EchoBackend, rest: str) -> str:
    host = "localhost" if isinstance(echo.address, str) else "{}:{}".format(*echo.address)
    return f"proxy:fcgi://{host}/{rest}"


def test_script_mapping(rig: Rig) -> None:
    params = rig.get("/hello.py?x=1")["params"]

    assert params["REQUEST_METHOD"] == "GET"
    assert params["SCRIPT_NAME"] == "/hello.py"
    assert params["REQUEST_URI"] == "/hello.py?x=1"
    assert params["QUERY_STRING"] == "x=1"
    assert params["REMOTE_ADDR"] == "127.0.0.1"
    assert params["SERVER_PORT"] == str(rig.front.port)
    assert params["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert "HTTPS" not in params
    if rig.is_apache:
        assert "PATH_INFO" not in params
        assert params["SCRIPT_FILENAME"] == apache_script_filename(rig.echo, "hello")
    else:
        assert params["PATH_INFO"] == ""
        assert params["SCRIPT_FILENAME"].endswith("/htdocs/hello.py")


def test_path_info_after_script(rig: Rig) -> None:
    if rig.is_apache:
        status, _, _ = rig.front.request("GET", "/hello.py/extra?x=1")
        assert status == 404  # the anchored ProxyPassMatch does not forward it
        return
    params = rig.get("/hello.py/extra?x=1")["params"]
    assert params["SCRIPT_NAME"] == "/hello.py"
    assert params["PATH_INFO"] == "/extra"
    assert params["REQUEST_URI"] == "/hello.py/extra?x=1"
    assert params["QUERY_STRING"] == "x=1"


def test_catch_all_mapping(rig: Rig) -> None:
    params = rig.get("/app/some/path?x=1")["params"]

    assert params["REQUEST_URI"] == "/app/some/path?x=1"
    assert params["QUERY_STRING"] == "x=1"
    if rig.is_apache:
        assert params["SCRIPT_NAME"] == "/app/some/path"
        assert "PATH_INFO" not in params
        assert params["SCRIPT_FILENAME"] == apache_script_filename(rig.echo, "some/path")
    else:
        assert (params["SCRIPT_NAME"], params["PATH_INFO"]) == ("/app", "/some/path")


def test_unmapped_path_is_not_forwarded(rig: Rig) -> None:
    status, _, _ = rig.front.request("GET", "/nothing")
    assert status == 404
    assert rig.echo.connections == 0


def test_post_body_reaches_backend(rig: Rig) -> None:
    body = os.urandom(100_000)
    reply = rig.get(
        "/app/upload", method="POST", body=body,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert reply["stdin_len"] == len(body)
    assert reply["params"]["REQUEST_METHOD"] == "POST"
    assert reply["params"]["CONTENT_LENGTH"] == str(len(body))
    assert reply["params"]["CONTENT_TYPE"] == "application/octet-stream"


def _post_chunked(
    front: FrontEnd, parts: list[bytes], pause: float, path: str = "/app/upload"
) -> dict[str, Any]:
    """POST *parts* to *path* as chunks, *pause* seconds apart."""
    conn = front.connection()
    try:
        conn.putrequest("POST", path)
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        for i, part in enumerate(parts):
            if i:
                time.sleep(pause)
            conn.send(b"%x\r\n%s\r\n" % (len(part), part))
        conn.send(b"0\r\n\r\n")
        resp = conn.getresponse()
        assert resp.status == 200
        return json.loads(resp.read())
    finally:
        conn.close()


def test_chunked_request_body_still_arriving(rig: Rig) -> None:
    reply = _post_chunked(rig.front, [b"x" * 5000, b"y" * 7000], pause=0.3)
    params = reply["params"]

    assert reply["stdin_len"] == 12000
    if rig.is_apache:
        # Normally streamed: no length up front and the client's header passed
        # on. Had Apache been slower than the pause, it would have seen the
        # whole body and sent its length instead.
        streamed = ("CONTENT_LENGTH" not in params, params.get("HTTP_TRANSFER_ENCODING"))
        buffered = (params.get("CONTENT_LENGTH") == "12000", params.get("HTTP_TRANSFER_ENCODING"))
        assert streamed == (True, "chunked") or buffered == (True, None), params
    else:
        # nginx buffers the whole body first (fastcgi_request_buffering on)
        assert params["CONTENT_LENGTH"] == "12000"
        assert params["HTTP_TRANSFER_ENCODING"] == "chunked"


@NEEDS_APACHE
def test_apache_sendcl_always_sends_content_length(
    tmp_path: Path, tcp_echo: EchoBackend
) -> None:
    with start_apache(tmp_path, tcp_echo.address, sendcl=True) as front:
        reply = _post_chunked(front, [b"x" * 5000, b"y" * 7000], pause=0.3)
    assert reply["stdin_len"] == 12000
    assert reply["params"]["CONTENT_LENGTH"] == "12000"
    assert "HTTP_TRANSFER_ENCODING" not in reply["params"]


def test_proxy_request_header(rig: Rig) -> None:
    params = rig.get("/app/x", headers={"Proxy": "http://evil/"})["params"]
    # Apache drops it (httpoxy); the harness nginx passes it on like a
    # config without a guard would (deploy/nginx/fcgidaemon.conf drops it)
    assert params.get("HTTP_PROXY") == (None if rig.is_apache else "http://evil/")


def test_backend_connection_reuse(rig: Rig) -> None:
    conn = rig.front.connection()
    try:
        replies = []
        for _ in range(5):
            conn.request("GET", "/hello.py")
            resp = conn.getresponse()
            assert resp.status == 200
            replies.append(json.loads(resp.read()))
    finally:
        conn.close()

    assert {r["keep_conn"] for r in replies} == {rig.reuse}
    served = [r["conn_requests"] for r in replies]
    if rig.reuse:
        assert max(served) > 1, served
    else:
        assert served == [1] * 5
        assert rig.echo.connections == 5


# --------------------------------------------------------------------------
# Apache specifics


@NEEDS_APACHE
@pytest.mark.parametrize(
    ("pathinfo", "path", "script_name", "path_info"),
    [
        ("unescape", "/app/a%20b/c?x=1", "/app", "/a b/c"),
        ("first-dot", "/pi/hello.py/extra?x=1", "/pi/hello.py", "/extra"),
    ],
)
def test_apache_proxy_fcgi_pathinfo(
    tmp_path: Path,
    tcp_echo: EchoBackend,
    pathinfo: str,
    path: str,
    script_name: str,
    path_info: str,
) -> None:
    # a rule that, unlike the anchored .py one, forwards trailing path info
    target = "fcgi://{}:{}".format(*tcp_echo.address)
    extra = f'ProxyPassMatch "^/pi/(.*\\.py(/.*)?)$" "{target}/$1" retry=0'
    with start_apache(tmp_path, tcp_echo.address, pathinfo=pathinfo, extra=extra) as front:
        params = Rig(front, False, tcp_echo).get(path)["params"]
    assert (params["SCRIPT_NAME"], params["PATH_INFO"]) == (script_name, path_info)


@NEEDS_APACHE
def test_apache_runs_real_unprivileged_workers(tmp_path: Path, tcp_echo: EchoBackend) -> None:
    with start_apache(tmp_path, tcp_echo.address) as front:
        Rig(front, False, tcp_echo).get("/hello.py")
        worker_uid = pwd.getpwnam(worker_user()[0]).pw_uid
        # a freshly forked child drops privileges a moment after fork
        deadline = time.monotonic() + 10
        while {_uid(pid) for pid in front.child_pids()} != {worker_uid}:
            assert time.monotonic() < deadline, [_uid(pid) for pid in front.child_pids()]
            time.sleep(0.05)
        assert len(front.child_pids()) >= 2  # event MPM, StartServers 2
        assert _uid(front.pid) == os.geteuid()


@NEEDS_APACHE
@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands Apache workers to www-data")
def test_apache_rejects_socket_its_workers_cannot_reach(tmp_path: Path) -> None:
    # pytest's tmp_path sits below a mode-0700 directory
    with pytest.raises(FrontEndError, match="shared_tmpdir"):
        start_apache(tmp_path, tmp_path / "app.sock")


@NEEDS_APACHE
def test_apache_startup_error_is_reported(tmp_path: Path, tcp_echo: EchoBackend) -> None:
    with pytest.raises(FrontEndError, match="NoSuchDirective"):
        start_apache(tmp_path, tcp_echo.address, extra="NoSuchDirective on")


# --------------------------------------------------------------------------
# nginx specifics and teardown


@NEEDS_NGINX
def test_nginx_runs_two_workers(tmp_path: Path, tcp_echo: EchoBackend) -> None:
    with start_nginx(tmp_path, tcp_echo.address) as front:
        assert len(front.child_pids()) == 2


@NEEDS_NGINX
def test_nginx_startup_error_is_reported(tmp_path: Path, tcp_echo: EchoBackend) -> None:
    with pytest.raises(FrontEndError, match="no_such_directive"):
        start_nginx(tmp_path, tcp_echo.address, extra="no_such_directive on;")


@pytest.mark.parametrize(
    "name",
    [pytest.param("apache", marks=NEEDS_APACHE), pytest.param("nginx", marks=NEEDS_NGINX)],
)
def test_stop_tears_down_whole_process_group(
    name: str, tmp_path: Path, tcp_echo: EchoBackend
) -> None:
    front = start_front(name, False, tmp_path, tcp_echo.address)
    pids = [front.pid, *front.child_pids()]
    assert front.alive

    front.stop()
    front.stop()  # idempotent

    assert not front.alive
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    with pytest.raises(ProcessLookupError):
        os.killpg(front.pid, 0)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", front.port), timeout=1).close()


# --------------------------------------------------------------------------
# the shipped deploy/ snippets, run for real with ports and paths swapped in

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _apache_variant(text: str, title: str | None) -> str:
    """Switch deploy/apache/fcgidaemon.conf to the variant titled *title*.

    Comments out the active main example and uncomments the directives of
    the "# Variant: <title>..." section (None keeps the main example).
    """
    out, section = [], ""
    for line in text.splitlines():
        if line.startswith("# Variant: "):
            section = line
        words = line.removeprefix("# ").split(maxsplit=1)
        example = line.startswith("# ") and words[:1] in (["ProxyPassMatch"], ["SetEnvIf"])
        if title is not None and line.startswith("ProxyPassMatch"):
            line = "# " + line
        elif title is not None and example and title in section:
            line = line.removeprefix("# ")
        out.append(line)
    return "\n".join(out)


def _get_json(port: int, path: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200, (resp.status, body[:300])
        return json.loads(body)
    finally:
        conn.close()


@NEEDS_APACHE
@pytest.mark.parametrize(
    ("variant", "kind"),
    [
        (None, "tcp"),
        ("unix domain socket", "unix"),
        ("keep backend connections", "tcp"),
        ("forward path info", "tcp"),
    ],
)
def test_deploy_apache_snippet(tmp_path: Path, variant: str | None, kind: str) -> None:
    with echo_backend(kind) as echo:
        text = _apache_variant((DEPLOY / "apache" / "fcgidaemon.conf").read_text(), variant)
        if isinstance(echo.address, tuple):
            text = text.replace("localhost:9005", "127.0.0.1:9005")
            text = text.replace("127.0.0.1:9005", "127.0.0.1:%d" % echo.address[1])
        else:
            text = text.replace("/run/fcgidaemon/app.sock", str(echo.address))
        with start_apache(tmp_path, None, extra=text, modules=("setenvif", "env")) as front:
            reply = Rig(front, False, echo).get("/hello.py?x=1")
            extra_status, _, extra_body = front.request("GET", "/hello.py/extra?x=1")
            chunked = _post_chunked(front, [b"x" * 100, b"y" * 200], pause=0.1, path="/up.py")

    assert reply["params"]["SCRIPT_NAME"] == "/hello.py"
    assert "PATH_INFO" not in reply["params"]
    assert reply["keep_conn"] is (variant == "keep backend connections")
    assert chunked["params"]["CONTENT_LENGTH"] == "300"  # proxy-sendcl
    if variant == "forward path info":
        params = json.loads(extra_body)["params"]
        assert (params["SCRIPT_NAME"], params["PATH_INFO"]) == ("/hello.py", "/extra")
    else:
        assert extra_status == 404


BALANCER_MODULES = ("proxy_balancer", "slotmem_shm", "lbmethod_bybusyness", "authz_host", "env")


def _set_member_disabled(front: FrontEnd, member: str, disabled: bool) -> None:
    """What an operator does in /balancer-manager, done like the curl recipe."""
    manager = "/balancer-manager"
    _, _, page = front.request("GET", manager)
    nonce = re.search(rb"nonce=([0-9a-f-]+)", page)
    assert nonce, page[:500]
    form = urllib.parse.urlencode(
        {"b": "fcgidaemon", "w": member, "w_status_D": int(disabled), "nonce": nonce[1].decode()}
    )
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "Referer": front.url(manager),  # the manager ignores cross-site posts
    }
    status, _, _ = front.request("POST", manager, body=form.encode(), headers=headers)
    assert status == 200


@NEEDS_APACHE
def test_deploy_apache_balancer_member_can_be_taken_out(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        echoes = [stack.enter_context(echo_backend("tcp")) for _ in range(3)]
        text = (DEPLOY / "apache" / "balancer.conf").read_text()
        for default, echo in zip(("9005", "9006", "9007"), echoes):
            text = text.replace(f"127.0.0.1:{default}", "127.0.0.1:%d" % echo.address[1])
        front = stack.enter_context(
            start_apache(tmp_path, None, extra=text, modules=BALANCER_MODULES)
        )

        def spread(requests: int = 9) -> list[int]:
            before = [e.connections for e in echoes]
            for _ in range(requests):
                Rig(front, False, echoes[0]).get("/hello.py")
            return [e.connections - b for e, b in zip(echoes, before)]

        assert all(spread()), "every member gets traffic"
        first = "fcgi://127.0.0.1:%d" % echoes[0].address[1]
        _set_member_disabled(front, first, True)
        taken_out = spread()
        _set_member_disabled(front, first, False)
        back_in = spread()

    assert taken_out[0] == 0 and sum(taken_out) == 9
    assert back_in[0] > 0


@NEEDS_NGINX
def test_deploy_nginx_snippet(tmp_path: Path, tcp_echo: EchoBackend) -> None:
    site_port = free_port()
    text = (DEPLOY / "nginx" / "fcgidaemon.conf").read_text()
    text = text.replace("127.0.0.1:9005", "127.0.0.1:%d" % tcp_echo.address[1])
    text = text.replace("listen 80;", f"listen 127.0.0.1:{site_port};")
    with start_nginx(tmp_path, None, http_extra=text):
        script = _get_json(site_port, "/hello.py/extra?x=1", {"Proxy": "http://evil/"})
        mounted = [_get_json(site_port, "/app/some/path?x=1") for _ in range(3)]

    params = script["params"]
    assert (params["SCRIPT_NAME"], params["PATH_INFO"]) == ("/hello.py", "/extra")
    assert params["QUERY_STRING"] == "x=1"
    assert "HTTP_PROXY" not in params  # httpoxy guard (the harness passes it on)
    assert script["keep_conn"] is False
    params = mounted[0]["params"]
    assert (params["SCRIPT_NAME"], params["PATH_INFO"]) == ("/app", "/some/path")
    assert all(reply["keep_conn"] for reply in mounted)
    assert max(reply["conn_requests"] for reply in mounted) > 1


def _uid(pid: int) -> int | None:
    """Effective uid of *pid* from /proc (None if it has gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return None
    for line in status.splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[2])
    return None
