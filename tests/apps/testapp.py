"""The WSGI application the tests run under fcgidaemon.

Routes by PATH_INFO; the tests copy this file and change VERSION to see a reload.
"""

import json
import os
import sys
import time
from urllib.parse import parse_qs

VERSION = "v1"
_LEAKED_FDS = []  # /exhaust-fds
IMPORT_PID = os.getpid()


def _query(environ):
    return {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}


def _text(start_response, body, status="200 OK", headers=()):
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body))),
                            *headers])
    return [body]


def application(environ, start_response):
    path = environ.get("PATH_INFO", "")
    q = _query(environ)
    if path.endswith("/echo"):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else environ["wsgi.input"].read()
        return _text(start_response, body)
    if path.endswith("/echo-wrapped"):  # a framework that turns a failed read into its own error
        try:
            body = environ["wsgi.input"].read()
        except Exception as exc:
            raise ValueError("unreadable request body") from exc
        return _text(start_response, body)
    if path.endswith("/read-or-400"):  # the usual "bad body -> 400": every read failure caught
        try:
            body = environ["wsgi.input"].read()
        except Exception:
            start_response("400 Bad Request", [("Content-Type", "text/plain")])
            return [b"bad body\n"]
        return _text(start_response, body)
    if path.endswith("/id"):
        time.sleep(float(q.get("sleep", 0)))
        body = f"id={q.get('id', '')} version={VERSION} pid={os.getpid()}".encode()
        return _text(start_response, body)
    if path.endswith("/sleep"):
        time.sleep(float(q.get("s", 1)))
        return _text(start_response, b"slept " + q.get("s", "1").encode() + b" " + b"z" * 100000)
    if path.endswith("/big"):
        n = int(q.get("n", 1 << 20))
        block = bytes(range(256)) * 256
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(n))])
        return (block[: min(len(block), n - i)] for i in range(0, n, len(block)))
    if path.endswith("/blocks"):  # a list of n small blocks, in order
        blocks = [b"%d," % i for i in range(int(q.get("n", 10)))]
        start_response("200 OK", [("Content-Type", "text/plain")])
        return blocks
    if path.endswith("/headers"):
        n = int(q.get("n", 100))
        return _text(start_response, b"many", headers=[(f"X-H{i}", "v" * 50) for i in range(n)])
    if path.endswith("/latin1"):
        return _text(start_response, b"latin1", headers=[("X-Name", "caf\u00e9 na\u00efve \u00ff")])
    if path.endswith("/error"):
        raise RuntimeError("boom before headers")
    if path.endswith("/exit"):  # an application ending its process in a request
        if q.get("how") == "interrupt":
            raise KeyboardInterrupt
        sys.exit(int(q.get("code", 3)))
    if path.endswith("/base-exception"):  # not an Exception: asyncio's CancelledError is one
        if q.get("where") == "close":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return _RaisingClose()
        raise Cancelled("task cancelled in a request")
    if path.endswith("/swallow"):  # an application that carries on after a failed write()
        write = start_response("200 OK", [("Content-Type", "application/octet-stream")])
        failures = 0
        for _ in range(int(q.get("blocks", 640))):
            try:
                write(b"x" * 65536)
            except Exception:  # noqa: BLE001 - what this route is for
                failures += 1
                if failures == 2:
                    break
        return [b"tail"]
    if path.endswith("/error-after"):
        def gen():
            yield b"partial"
            raise RuntimeError("boom after headers")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return gen()
    if path.endswith("/error-in-iter"):  # headers given, then a failure before any block
        def failing():
            raise RuntimeError("boom in the first block")
            yield b""
        start_response("200 OK", [("Content-Type", "text/plain")])
        return failing()
    if path.endswith("/drip"):  # n blocks, d seconds apart: an event stream
        n, d = int(q.get("n", 3)), float(q.get("d", 0.5))
        start_response("200 OK", [("Content-Type", "text/event-stream")])
        def drip():
            for i in range(n):
                if i:
                    time.sleep(d)
                yield f"data: {i} {time.time():.3f}\n\n".encode()
        return drip()
    if path.endswith("/drip-write"):  # the same through the write() callable
        n, d = int(q.get("n", 3)), float(q.get("d", 0.5))
        write = start_response("200 OK", [("Content-Type", "text/event-stream")])
        for i in range(n):
            if i:
                time.sleep(d)
            write(f"data: {i} {time.time():.3f}\n\n".encode())
        return []
    if path.endswith("/str-body"):  # a body of str, not bytes: the application's error
        start_response("200 OK", [("Content-Type", "text/plain")])
        return ["text"]
    if path.endswith("/no-start"):  # a body with no start_response: the application's error
        return []
    if path.endswith("/status"):  # a one-block body with the status asked for
        code = q.get("code", "200")
        extra = [("X-Value", q["hv"])] if "hv" in q else []
        if "hn" in q:  # a header name of the test's choosing
            extra.append((q["hn"], "v"))
        start_response(q.get("status", f"{code} Whatever"), [("Content-Type", "text/plain"), *extra])
        return [q.get("body", "").encode()]
    if path.endswith("/empty"):
        start_response("204 No Content", [])
        return []
    if path.endswith("/environ"):
        env = {k: v for k, v in environ.items() if isinstance(v, (str, bool, int, tuple))}
        return _text(start_response, json.dumps(env).encode())
    if path.endswith("/preload"):
        import preloaded_mod
        body = json.dumps({"preload_pid": preloaded_mod.IMPORT_PID, "app_pid": IMPORT_PID,
                           "pid": os.getpid(), "ppid": os.getppid(),
                           "preloaded_in_manager": "preloaded_mod" in sys.modules}).encode()
        return _text(start_response, body)
    if path.endswith("/leak"):
        _LEAK.append(bytearray(int(q.get("mb", 10)) << 20))
        return _text(start_response, f"holding {len(_LEAK)} blocks".encode())
    if path.endswith("/closing"):
        return _Closing(start_response, q["marker"], int(q.get("n", 20 << 20)))
    if path.endswith("/fork"):  # a background child, as multiprocessing makes: it holds every fd
        child = os.fork()
        if child == 0:
            time.sleep(float(q.get("s", 5)))
            os._exit(0)
        return _text(start_response, f"child {child}".encode())
    if path.endswith("/exhaust-fds"):  # an application leaking files up to its descriptor limit
        import resource
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
        try:
            while True:  # every number below the limit taken, as a leak leaves it
                _LEAKED_FDS.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        return _text(start_response, f"pid={os.getpid()} leaked {len(_LEAKED_FDS)}".encode())
    if path.endswith("/fork-return"):  # a child that comes back into the server's code
        child = os.fork()  # (a background job that forgot os._exit)
        if child == 0:
            time.sleep(float(q.get("s", 0.3)))
            if q.get("how") == "exit":
                sys.exit(0)
            raise RuntimeError("the forked child failed")
        return _text(start_response, f"child {child}".encode())
    if path.endswith("/spawn"):  # a program run as os.system() runs it: every inheritable fd kept
        import subprocess
        child = subprocess.Popen(["sleep", q.get("s", "5")], close_fds=False)
        return _text(start_response, f"child {child.pid}".encode())
    if path.endswith("/uid"):
        return _text(start_response, f"{os.getuid()} {os.getgid()}".encode())
    if path.endswith("/wsgi-errors"):  # two lines to environ['wsgi.errors'], each with the marker
        marker = q.get("marker", "")
        environ["wsgi.errors"].write(f"wsgi.errors line one {marker}\nwsgi.errors line two {marker}\n")
        return _text(start_response, f"logged {marker}".encode())
    if path.endswith("/cl-short"):  # declares more than it sends, in blocks (each sent at once)
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "100")])
        return iter([b"only-ten!!"])
    if path.endswith("/cl-short-list"):  # the same as one list: nothing has gone out at the end
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "100")])
        return [b"only-ten!!"]
    if path.endswith("/cl-spaced"):  # a Content-Length with spaces, or a list of one value
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", q.get("cl", " 5 "))])
        return [b"hello"]
    if path.endswith("/cl-long"):  # declares less than it sends
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
        return iter([b"hello", b"-and-more-after-the-length"])
    if path.endswith("/mixed-list"):  # a list whose second item is not bytes
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"o" * int(q.get("n", 0)) or b"ok", "str"]  # n: the first item's size
    if path.endswith("/hop"):  # hop-by-hop headers, which PEP 3333 forbids
        start_response("200 OK", [("Content-Type", "text/plain"), ("Connection", "close"),
                                  ("Keep-Alive", "timeout=5"), ("X-Kept", "yes")])
        return [b"hop body"]
    if path.endswith("/cgi-status"):  # a Status header of its own (a proxy passing an upstream's on)
        start_response("201 Created", [("Content-Type", "text/plain"), ("status", "v")])
        return [b"created"]
    if path.endswith("/no-body"):  # a status without a body, given one
        start_response(f"{q.get('code', '204')} Whatever", [("Content-Length", q.get("cl", "11"))]
                       if "cl" in q else [])
        return [b"body-of-it!"]
    if path.endswith("/set-user"):  # an authenticating middleware's REMOTE_USER, of any type
        environ["REMOTE_USER"] = {"int": 42, "bytes": b"bob", "str": "carol"}[q.get("as", "str")]
        environ["REQUEST_METHOD"] = "DELETE"  # a method override: the log keeps the request's own
        return _text(start_response, b"user set")
    if path.endswith("/swallow-all"):  # write() after the web server has gone, errors swallowed
        write = start_response("200 OK", [("Content-Type", "application/octet-stream")])
        blocks, failures = int(q.get("blocks", 50)), 0
        for _ in range(blocks):
            try:
                write(b"x" * 65536)
            except Exception:  # noqa: BLE001 - what this route is for
                failures += 1
        environ["wsgi.errors"].write(f"swallowed write failures: {failures} of {blocks}\n")
        return []
    if path.endswith("/blocks-then-fail"):  # n blocks of `size` bytes, each sent at once, then a failure
        n, size = int(q.get("n", 8)), int(q.get("size", 250000))
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        def blocks():
            for _ in range(n):
                yield b"b" * size
            raise RuntimeError("failed after the blocks")
        return blocks()
    if path.endswith("/yield-then-read"):  # a block goes out, then the body is read (all of it)
        start_response("200 OK", [("Content-Type", "text/plain")])
        def later():
            yield b"first block\n"
            yield str(len(environ["wsgi.input"].read())).encode()
        return later()
    if path.endswith("/read-short"):  # reads the body, then a body short of its Content-Length
        environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "100")])
        return [b"only-ten!!"]
    if path.endswith("/late-exc-info"):  # a block sent, then an error page asked for (PEP 3333)
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"first block\n")
        try:
            raise RuntimeError(f"late failure {q.get('marker', '')}")
        except RuntimeError:
            # the server must re-raise: the status line is gone, no error page can replace it
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info())
        return [b"error page after the headers\n"]
    return _text(start_response, f"hello {VERSION} {os.getpid()}".encode())


_LEAK = []


class Cancelled(BaseException):
    """What asyncio.CancelledError and gevent's GreenletExit are: a BaseException."""


class _RaisingClose:
    """A one-block body whose close() raises a BaseException."""

    def __iter__(self):
        yield b"closed badly"

    def close(self):
        raise Cancelled("cancelled in close()")


class _Closing:
    """A large streamed response whose close() leaves a marker file behind."""

    def __init__(self, start_response, marker, n):
        self.marker, self.left = marker, n
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(n))])

    def __iter__(self):
        while self.left > 0:
            self.left -= 65536
            yield b"x" * 65536

    def close(self):
        with open(self.marker, "w") as fh:
            fh.write(f"closed with {max(self.left, 0)} bytes unsent")
