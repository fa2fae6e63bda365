"""Micro-benchmark of fcgidaemon's own per-request path, with no front end and no network.

A forked client process sends FastCGI requests (FCGI_KEEP_CONN, one in flight,
as nginx with ``fastcgi_keep_conn on`` does) over a socketpair; this process
serves them with fcgidaemon's ``Connection``, ``Server`` and ``make_handler``,
driven the way ``src/fcgidaemon/worker.py`` drives them: wait with epoll,
``receive``, ``parse_available``, then ``run_request`` for every runnable
request with the process title's busy/done around it, and the sweep (at most 4
times a second).  Not mirrored: the worker's scoreboard updates (shared memory, two per
request), whose interface is still moving.

The ``hello-newconn`` case is the other common path, a new TCP connection per
request (nginx without ``fastcgi_keep_conn``, Apache without ``enablereuse``):
a loopback listener with TCP_DEFER_ACCEPT, as ``sockets.py`` opens it, served by
a real ``worker.Worker`` running its own ``_loop`` (its accept path, scoreboard
updates and title included) until the requests are done.

Server and client are pinned to the same CPU, so each run is a strict
ping-pong: requests/s = 1 / (server + client CPU per request), free of the
cross-core wake-ups that make the figure jump by 2x on a VM.  Reported:
requests/s (wall), server CPU microseconds per request, and a cProfile
listing (top 20 by own time, top 20 by cumulative time) of the hello case,
timed in CPU seconds of this process.

    python bench/micro.py [--scale X] [--rounds N] [--json FILE] [--profile-out FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import select
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent / "apps")]

import fcgiclient  # noqa: E402
from fcgidaemon import titles, worker  # noqa: E402
from fcgidaemon.config import resolve  # noqa: E402
from fcgidaemon.fastcgi import Connection, Limits, Server  # noqa: E402
from fcgidaemon.wsgi import make_handler  # noqa: E402
from hello import application  # noqa: E402

CASES: dict[str, tuple[str, str, int, int]] = {  # method, uri, body bytes, default requests
    "hello": ("GET", "/hello", 0, 20000),
    "hello-newconn": ("GET", "/hello", 0, 8000),
    "64k": ("GET", "/64k", 0, 5000),
    "post-1m": ("POST", "/echo", 1024 * 1024, 300),
}


def client(sock: socket.socket, payload: bytes, count: int) -> None:
    """The front end's side: send a request, read its whole response, repeat."""
    for _ in range(count):
        sock.sendall(payload)
        fcgiclient.read_response(sock)


def serve(sock: socket.socket, count: int) -> int:
    """The worker's side, as worker.Worker._loop/_serve/_run_request do it."""
    server = Server(make_handler(application), Limits(), max_conns=256, max_reqs=4)
    conn = Connection(sock, server)
    epoll = select.epoll()
    epoll.register(conn.fileno(), select.EPOLLIN)
    served = 0
    manager = os.getppid()
    next_sweep = 0.0
    title = titles.BusyTitle("worker 0 gen 1")
    while served < count:
        epoll.poll(1.0)
        if not conn.receive():
            break
        conn.parse_available()
        while conn.request is not None and conn.request.runnable and not conn.closed:
            req = conn.request
            title.busy(f"{req.params.get('REQUEST_METHOD', '?')} "
                       f"{req.params.get('REQUEST_URI', req.params.get('PATH_INFO', ''))[:80]}")
            try:
                conn.run_request()
            finally:
                served += 1
                title.done()
            conn.parse_available()
        if time.monotonic() >= next_sweep:  # the sweep, at most 4 times a second
            next_sweep = time.monotonic() + 0.25
            _ = os.getppid() != manager
    epoll.close()
    return served


def newconn_client(port: int, payload: bytes, count: int) -> None:
    """The front end's side without kept connections: connect, send, read, close."""
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(payload)
            fcgiclient.read_response(sock)


def newconn_server(listener: socket.socket, count: int) -> int:
    """A real Worker on `listener`, running its own loop until `count` requests are done."""
    # the manager's end stays open: closed, the channel would be readable (EOF) at every wait
    channel, manager_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    port = listener.getsockname()[1]
    config = resolve(["hello:application", "--bind", f"127.0.0.1:{port}"])
    w = worker.Worker(worker.WorkerSpec(config, 0, 1, [listener], channel, os.getppid()))

    def done(req: object) -> None:
        w._request_done(req)
        if w.requests >= count:  # then the loop winds down: no connection is left open
            w._begin_stop(worker.StopMode.CLOSE)

    w.server = Server(make_handler(application), Limits(), max_conns=256, max_reqs=4,
                      on_done=done)
    w._register()
    try:
        w._loop()
    finally:
        w.epoll.close()
        channel.close()
        manager_end.close()
    return w.requests


def measure(case: str, count: int, wrap: Callable[[Callable[[], int]], int] | None = None
            ) -> dict[str, Any]:
    """One run: fork the client, serve `count` requests here, time them."""
    method, uri, size, _ = CASES[case]
    newconn = case.endswith("-newconn")
    payload = fcgiclient.encode_request(method, uri, b"x" * size, keep_conn=not newconn)
    if newconn:
        ours = socket.socket()
        ours.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
        ours.bind(("127.0.0.1", 0))
        ours.listen(128)
        theirs = socket.socket()  # unused: the client connects anew for each request
        port = ours.getsockname()[1]
    else:
        ours, theirs = socket.socketpair()
    saved = os.sched_getaffinity(0)
    cpus = sorted(saved)
    pid = os.fork()
    if pid == 0:  # the client
        os.sched_setaffinity(0, {cpus[0]})
        ours.close()
        code = 0
        try:
            if newconn:
                newconn_client(port, payload, count)
            else:
                client(theirs, payload, count)
        except BaseException:  # noqa: BLE001 - reported by the exit status
            code = 1
        os._exit(code)
    theirs.close()
    os.sched_setaffinity(0, {cpus[0]})  # server and client on the same core: no cross-CPU wake-ups
    try:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        run = (lambda: newconn_server(ours, count)) if newconn else (lambda: serve(ours, count))
        served = wrap(run) if wrap else run()
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    finally:
        os.sched_setaffinity(0, saved)
        ours.close()
        _, status = os.waitpid(pid, 0)
    if served != count or status != 0:
        raise RuntimeError(f"{case}: served {served}/{count}, client status {status}")
    return {"requests": count, "rps": round(count / wall, 1),
            "cpu_us_per_request": round(cpu / count * 1e6, 1)}


def profile(case: str, count: int, top: int = 20) -> dict[str, Any]:
    # CPU time, not wall time: the client shares the core, and a wall clock would
    # charge its turns (and every wait) to whatever server frame was preempted
    prof = cProfile.Profile(time.process_time)

    def wrap(fn: Callable[[], int]) -> int:
        prof.enable()
        try:
            return fn()
        finally:
            prof.disable()

    measure(case, count, wrap)
    stats = pstats.Stats(prof)
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = []
    for (filename, line, func), (cc, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{_short(filename)}:{line}({func})", "ncalls": nc,
                     "tottime_s": round(tt, 4), "cumtime_s": round(ct, 4),
                     "own_share": round(tt / total, 4) if total else 0.0,
                     "cum_share": round(ct / total, 4) if total else 0.0})
    text = io.StringIO()
    stats.stream = text  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return {"case": case, "requests": count, "total_s": round(total, 4),
            "by_own_time": sorted(rows, key=lambda r: -r["tottime_s"])[:top],
            "by_cumulative": sorted(rows, key=lambda r: -r["cumtime_s"])[:top],
            "text": text.getvalue()}


def _short(filename: str) -> str:
    """fcgidaemon/fastcgi.py, flup/server/fcgi_base.py, apps/hello.py ... or the C builtin."""
    for marker, keep in (("/fcgidaemon/", "fcgidaemon/"), ("/site-packages/", ""), ("/bench/", ""),
                         ("/lib/python3.11/", "")):
        if marker in filename:
            return keep + filename.rsplit(marker, 1)[1]
    return filename


def run(scale: float = 1.0, rounds: int = 3) -> dict[str, Any]:
    import fcgidaemon
    out: dict[str, Any] = {"fcgidaemon_file": fcgidaemon.__file__, "cases": {}}
    for case, (_, _, _, default) in CASES.items():
        count = max(10, int(default * scale))
        runs = [measure(case, count) for _ in range(rounds)]
        rps = [r["rps"] for r in runs]
        cpu = [r["cpu_us_per_request"] for r in runs]
        out["cases"][case] = {"requests": count, "rounds": rounds,
                              "rps": {"median": statistics.median(rps), "min": min(rps), "max": max(rps)},
                              "cpu_us_per_request": {"median": statistics.median(cpu),
                                                     "min": min(cpu), "max": max(cpu)}}
    out["profile"] = profile("hello", max(10, int(10000 * scale)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply request counts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--profile-out", help="write the cProfile listing here")
    args = parser.parse_args(argv)
    result = run(args.scale, args.rounds)
    for case, data in result["cases"].items():
        print(f"{case:13} {data['rps']['median']:10.1f} req/s  "
              f"{data['cpu_us_per_request']['median']:8.1f} us CPU/request")
    text = result["profile"].pop("text")
    print(text)
    if args.profile_out:
        Path(args.profile_out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
