"""The benchmark application: the same three routes every server serves.

Routes are chosen on REQUEST_URI (every front end sends it, and no server
rewrites it), so the app behaves the same whatever SCRIPT_NAME/PATH_INFO
split a front end or server makes:

* ``/hello``  -> ``Hello, world\\n`` (13 bytes)
* ``/64k``    -> 65,536 bytes
* ``/echo``   -> reads the whole request body, returns its length as text
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

HELLO = b"Hello, world\n"
BIG = b"x" * 65536
TEXT = "text/plain"


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    uri = environ.get("REQUEST_URI", "")
    if uri.startswith("/echo"):
        body = str(_read_all(environ["wsgi.input"])).encode()
    elif uri.startswith("/64k"):
        body = BIG
    else:
        body = HELLO
    start_response("200 OK", [("Content-Type", TEXT), ("Content-Length", str(len(body)))])
    return [body]


def _read_all(stream: Any) -> int:
    total = 0
    while True:
        chunk = stream.read(65536)
        if not chunk:
            return total
        total += len(chunk)
