"""A minimal FastCGI client: readiness probes and the memory benchmark's load.

One request per connection (no FCGI_KEEP_CONN), as nginx sends by default.
"""

from __future__ import annotations

import socket
import struct

import paths

HEADER = struct.Struct("!BBHHBx")
BEGIN_REQUEST, END_REQUEST, PARAMS, STDIN, STDOUT = 1, 3, 4, 5, 6
RESPONDER = 1


def _record(rtype: int, content: bytes, request_id: int = 1) -> bytes:
    padding = -len(content) & 7
    return HEADER.pack(1, rtype, request_id, len(content), padding) + content + b"\0" * padding


def _length(n: int) -> bytes:
    return bytes([n]) if n < 128 else struct.pack("!I", n | 0x80000000)


def encode_params(params: dict[str, str]) -> bytes:
    out = bytearray()
    for name, value in params.items():
        key, val = name.encode("latin-1"), value.encode("latin-1")
        out += _length(len(key)) + _length(len(val)) + key + val
    return bytes(out)


def nginx_params(method: str, uri: str, body_bytes: int) -> dict[str, str]:
    """What nginx's stock fastcgi_params send for a wrk request (which carries only Host)."""
    path, _, query = uri.partition("?")
    return {"QUERY_STRING": query, "REQUEST_METHOD": method,
            "CONTENT_TYPE": "application/octet-stream" if body_bytes else "",
            "CONTENT_LENGTH": str(body_bytes) if body_bytes else "", "SCRIPT_NAME": path,
            "REQUEST_URI": uri, "DOCUMENT_URI": path, "DOCUMENT_ROOT": "/usr/share/nginx/html",
            "SERVER_PROTOCOL": "HTTP/1.1", "REQUEST_SCHEME": "http", "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_SOFTWARE": "nginx/1.22.1", "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "41234",
            "SERVER_ADDR": "127.0.0.1", "SERVER_PORT": "8080", "SERVER_NAME": "",
            "REDIRECT_STATUS": "200", "HTTP_HOST": "127.0.0.1:8080",
            "SCRIPT_FILENAME": str(paths.PHP_APP)}  # for PHP-FPM; the others ignore it


def encode_request(method: str, uri: str, body: bytes = b"", keep_conn: bool = False) -> bytes:
    params = nginx_params(method, uri, len(body))
    parts = [_record(BEGIN_REQUEST, struct.pack("!HB5x", RESPONDER, int(keep_conn))),
             _record(PARAMS, encode_params(params)), _record(PARAMS, b"")]
    for pos in range(0, len(body), 65528):
        parts.append(_record(STDIN, body[pos:pos + 65528]))
    parts.append(_record(STDIN, b""))
    return b"".join(parts)


def read_response(sock: socket.socket) -> bytes:
    """STDOUT bytes of one request, read until its END_REQUEST."""
    buf = bytearray()
    stdout = bytearray()
    while True:
        while len(buf) >= HEADER.size:
            _, rtype, _, length, padding = HEADER.unpack_from(buf)
            end = HEADER.size + length + padding
            if len(buf) < end:
                break
            if rtype == STDOUT:
                stdout += buf[HEADER.size:HEADER.size + length]
            del buf[:end]
            if rtype == END_REQUEST:
                return bytes(stdout)
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("server closed the connection before END_REQUEST")
        buf += data


def split_response(stdout: bytes) -> tuple[int, bytes]:
    """(HTTP status, body) from a CGI-style response."""
    head, _, body = stdout.partition(b"\r\n\r\n")
    status = 200
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"status:"):
            status = int(line.split()[1])
    return status, body


def request(port: int, method: str = "GET", uri: str = "/hello", body: bytes = b"",
            host: str = "127.0.0.1", timeout: float = 10.0) -> tuple[int, bytes]:
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(encode_request(method, uri, body))
        return split_response(read_response(sock))
