"""A served request leaves no cyclic garbage behind: what it allocated is freed by reference
counting when it ends, not left for the cyclic collector to find (every request used to leave
five objects in a cycle: the request, its streams and their buffers)."""

from __future__ import annotations

import gc
import socket

import fcgiclient
from fcgidaemon.fastcgi import Connection, Limits, Server
from fcgidaemon.wsgi import make_handler


def hello(environ, start_response):
    environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello\n"]


def test_requests_leave_no_cyclic_garbage():
    ours, theirs = socket.socketpair()
    conn = Connection(ours, Server(make_handler(hello), Limits()))
    requests = [fcgiclient.build_request(fcgiclient.make_params("GET", "/hello"), keep_conn=True),
                fcgiclient.build_request(fcgiclient.make_params("POST", "/post", 100_000),
                                         b"x" * 100_000, keep_conn=True)]
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for i in range(40):
            theirs.sendall(requests[i % 2])
            conn.receive()
            conn.parse_available()
            while conn.request is None or not conn.request.runnable:
                conn.receive()
                conn.parse_available()
            conn.run_request()
            records = _response(theirs)
            status, _, body = fcgiclient.parse_cgi_response(
                b"".join(r.content for r in records if r.type == fcgiclient.FCGI_STDOUT))
            assert (status, body) == (200, b"hello\n")
        found = gc.collect()
        kinds = sorted({type(obj).__name__ for obj in gc.garbage})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        ours.close()
        theirs.close()
    print(f"40 requests, {found} objects of cyclic garbage: {kinds}")
    assert found == 0, kinds


def _response(sock: socket.socket) -> list[fcgiclient.Record]:
    """The records up to END_REQUEST."""
    buf, records = bytearray(), []
    while not records or records[-1].type != fcgiclient.FCGI_END_REQUEST:
        data = sock.recv(65536)
        assert data, "closed before END_REQUEST"
        buf += data
        records += fcgiclient.take_records(buf)
    return records
