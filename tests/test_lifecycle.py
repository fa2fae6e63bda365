"""The manager's life: preload, reloads, stops, dead workers and dead managers.

Every test runs the real daemon as a subprocess and sends it real signals.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from daemon import APPS, Daemon, alive, wait_for
from fcgiclient import ConnectionClosed, FCGIClient, ResponseTimeout, build_request, make_params
from load import FCGIChecker, run_load


def get(address, uri: str, timeout: float = 10) -> "Response":  # noqa: F821
    with FCGIClient(address, timeout=timeout) as client:
        return client.request(make_params("GET", uri))


def app_copy(tmp_path: Path, version: str = "v1", name: str = "liveapp") -> Path:
    """A copy of the test app in its own directory, so a test can edit it and reload."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    text = (APPS / "testapp.py").read_text().replace('VERSION = "v1"', f'VERSION = "{version}"')
    (src / f"{name}.py").write_text(text)
    shutil.copy(APPS / "preloaded_mod.py", src / "preloaded_mod.py")
    return src


def set_version(src: Path, version: str, name: str = "liveapp") -> None:
    path = src / f"{name}.py"
    text = re.sub(r'VERSION = "[^"]*"', f'VERSION = "{version}"', path.read_text())
    path.write_text(text)


def proc_title(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return fh.read().replace(b"\0", b" ").decode().strip()


# ---------------------------------------------------------------- preload and reload


def test_preload_is_imported_once_in_the_manager(start_daemon, tmp_path):
    src = app_copy(tmp_path)
    d = start_daemon("liveapp", "--preload", "preloaded_mod", workers=3, pythonpath=[src])
    workers = d.wait_workers(3)
    seen = {}
    for _ in range(60):
        info = json.loads(get(d.address, "/preload").body)
        seen[info["pid"]] = info
    for info in seen.values():
        assert info["preload_pid"] == d.pid  # imported in the manager, before the fork
        assert info["app_pid"] == info["pid"] != d.pid  # the app is imported in the worker
        assert info["ppid"] == d.pid
    d.reload(2)
    # a connection made just after "reload complete" may still wake a retiring worker that has
    # not read its retire message yet, and that one serves it on its way out (old code, as a
    # deploy allows): seen once in CI under load. The new generation is asked once they left.
    wait_for(lambda: not any(alive(w) for w in workers), 10, "the old workers to exit")
    info = json.loads(get(d.address, "/preload").body)
    assert info["preload_pid"] == d.pid and info["pid"] not in workers
    assert d.count(r"worker \d+ ready") == 6


def test_a_preload_that_leaves_threads_running_is_warned_about(start_daemon, tmp_path):
    """A preloaded module that starts a thread (a metrics client, a connection pool's reaper):
    the workers do not have it, and a lock it holds as a worker is forked stays held there (a
    review saw a worker hang on its first request so). Nothing was said; now one warning,
    naming the thread, and the daemon serves all the same."""
    src = app_copy(tmp_path)
    (src / "threaded_mod.py").write_text(
        "import threading, time\n"
        "threading.Thread(target=lambda: time.sleep(3600), name='metrics-flusher', daemon=True).start()\n")
    d = start_daemon("liveapp", "--preload", "threaded_mod", workers=1, pythonpath=[src])
    d.wait_workers(1)
    assert get(d.address, "/hello").status == 200
    assert d.count(r"--preload left 1 thread\(s\) running in the manager \(metrics-flusher\)") == 1


def test_reload_serves_new_code_in_new_workers(start_daemon, tmp_path):
    src = app_copy(tmp_path)
    d = start_daemon("liveapp", workers=3, pythonpath=[src])
    old_workers = set(d.wait_workers(3))
    assert get(d.address, "/hello").body.startswith(b"hello v1 ")
    set_version(src, "v2")
    d.reload(2)
    wait_for(lambda: not (set(d.workers()) & old_workers), 10, "old workers to exit")
    new_workers = set(d.wait_workers(3))
    assert not new_workers & old_workers  # every worker pid changed
    assert d.proc.poll() is None  # the manager pid did not
    for _ in range(20):
        body = get(d.address, "/hello").body
        assert body.startswith(b"hello v2 "), body
        assert int(body.split()[-1]) in new_workers


def test_reloads_during_a_reload_are_coalesced(start_daemon, tmp_path):
    src = app_copy(tmp_path)
    (src / "slowimport.py").write_text("import time\ntime.sleep(0.5)\nfrom liveapp import application\n")
    d = start_daemon("slowimport", workers=2, pythonpath=[src])
    for _ in range(5):
        d.signal(signal.SIGHUP)
        time.sleep(0.05)
    d.wait_serving(3)
    time.sleep(1.5)  # a third reload would have started by now: bounded check that it did not
    assert d.count(r"reload: starting generation") == 2
    assert d.count(r"reload queued") >= 1


# ---------------------------------------------------------------- zero loss


@pytest.mark.parametrize("keep_conn", [False, True], ids=["new-connection", "kept-connection"])
def test_zero_failures_under_load_with_sighup_every_half_second(start_daemon, tmp_path, keep_conn):
    d = start_daemon(workers=4)
    stop = threading.Event()
    reloads = 0

    def reloader():
        nonlocal reloads
        while not stop.wait(0.5):
            d.signal(signal.SIGHUP)
            reloads += 1

    thread = threading.Thread(target=reloader)
    thread.start()
    with FCGIChecker(d.address, keep_conn=keep_conn, uri_template="/id?id={uid}") as checker:
        try:
            result = run_load(checker, clients=32, duration=10)
        finally:
            stop.set()
            thread.join()
    completed = d.count(r"reload complete")
    print(f"{result.summary()}; {reloads} SIGHUPs, {completed} reloads completed")
    assert result.requests > 1000
    assert completed >= 5
    assert result.failures == 0, result.errors


# ---------------------------------------------------------------- in-flight requests


def _slow_request(address, out: dict) -> threading.Thread:
    def run():
        try:
            out["resp"] = get(address, "/sleep?s=3", timeout=20)
        except Exception as exc:  # noqa: BLE001 - the assertion reports it
            out["error"] = exc
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _wait_busy(d: Daemon) -> None:
    wait_for(lambda: any("busy" in proc_title(w) for w in d.workers() if alive(w)), 10,
             "a worker to be busy")


def test_in_flight_request_completes_across_sighup(start_daemon):
    d = start_daemon(workers=2)
    out: dict = {}
    thread = _slow_request(d.address, out)
    _wait_busy(d)
    d.reload(2)
    thread.join(20)
    assert "error" not in out, out.get("error")
    assert out["resp"].status == 200
    assert out["resp"].body == b"slept 3 " + b"z" * 100000


def test_in_flight_request_completes_across_sigterm(start_daemon):
    d = start_daemon(workers=2)
    out: dict = {}
    thread = _slow_request(d.address, out)
    _wait_busy(d)
    d.signal(signal.SIGTERM)
    thread.join(20)
    assert "error" not in out, out.get("error")
    assert out["resp"].body == b"slept 3 " + b"z" * 100000
    assert d.wait_exit(15) == 0


def test_graceful_timeout_kills_a_stuck_worker(start_daemon):
    d = start_daemon("testapp", "--graceful-timeout", "1", workers=1)
    out: dict = {}
    thread = _slow_request(d.address, out)
    _wait_busy(d)
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait_exit(10) == 0
    assert time.monotonic() - t0 < 2.5
    thread.join(10)
    assert "error" in out  # the stuck request was cut off at the bound
    assert d.count(r"did not stop in time; killing it") == 1


# ---------------------------------------------------------------- stops and deaths


def test_sigterm_stops_cleanly_and_removes_pidfile(start_daemon, tmp_path):
    pidfile = tmp_path / "fcgi.pid"
    d = start_daemon("testapp", "--pidfile", str(pidfile), workers=2)
    assert pidfile.read_text().strip() == str(d.pid)
    workers = d.wait_workers(2)
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert not pidfile.exists()
    assert not any(alive(w) for w in workers)


def test_sigterm_during_a_hung_reload_does_not_wait_for_its_imports(start_daemon, tmp_path):
    """A reload whose import hangs, then SIGTERM: the workers still importing hold no request,
    so they leave at once, and the stop takes no longer than the old generation's requests (it
    used to wait out --graceful-timeout, 30 s, before killing the importers)."""
    src = app_copy(tmp_path)
    d = start_daemon("liveapp", workers=2, pythonpath=[src])
    old = d.wait_workers(2)
    text = (src / "liveapp.py").read_text()
    (src / "liveapp.py").write_text("import time\ntime.sleep(600)\n" + text)
    d.signal(signal.SIGHUP)
    wait_for(lambda: len(d.workers()) == 4, 10, "the new generation to start importing")
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait_exit(10) == 0
    took = time.monotonic() - t0
    print(f"\nstop with 2 workers hung in their import: {took:.2f}s (--graceful-timeout 30)")
    assert took < 3
    assert not any(alive(w) for w in old) and d.count(r"did not stop in time") == 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGQUIT])
def test_quick_stop(start_daemon, signum):
    d = start_daemon(workers=2)
    workers = d.wait_workers(2)
    d.signal(signum)
    assert d.wait_exit(5) == 0
    assert not any(alive(w) for w in workers)


def test_kill9_worker_is_replaced_within_a_second(start_daemon):
    d = start_daemon(workers=3)
    workers = d.wait_workers(3)
    victim = workers[0]
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    def replacement():
        found = d.workers()
        return found if len(found) == 3 and victim not in found else None
    replaced = wait_for(replacement, 1.0, "a replacement worker")
    print(f"replaced in {time.monotonic() - t0:.3f}s")
    assert len(set(replaced) - set(workers)) == 1
    assert get(d.address, "/hello").status == 200
    d.wait_log(rf"worker {victim} .* exited: killed by SIGKILL")


def test_ttin_ttou_change_the_worker_count(start_daemon):
    """... and the manager's process title says the new count (it kept the old one)."""
    d = start_daemon(workers=2)
    d.wait_workers(2)
    for signum, count in ((signal.SIGTTIN, 3), (signal.SIGTTOU, 2), (signal.SIGTTOU, 1)):
        d.signal(signum)  # the kernel merges a signal sent twice before delivery: one at a time
        d.wait_workers(count)
        # polled: the title is written just after the fork that the worker count shows
        wait_for(lambda: re.search(r"\d+ workers?\b", proc_title(d.pid)).group()
                 == f"{count} worker{'s' if count > 1 else ''}", 5, f"the title to say {count} workers")
    assert get(d.address, "/hello").status == 200


@pytest.mark.parametrize("signum,before,after", [(signal.SIGTTIN, 2, 3), (signal.SIGTTOU, 3, 2)],
                         ids=["ttin", "ttou"])
def test_worker_count_changed_during_a_reload(start_daemon, tmp_path, signum, before, after):
    """SIGTTIN/SIGTTOU while a reload is starting its generation apply to that generation too.
    (Found by a soak test: the reload waited for a slot that only the old generation got, so it
    never completed, and every later SIGHUP queued behind it: deploys silently stopped.)"""
    src = app_copy(tmp_path)
    d = start_daemon("liveapp", "--pythonpath", str(src), workers=before)
    d.wait_workers(before)
    set_version(src, "v2")
    app = src / "liveapp.py"
    app.write_text("import time\ntime.sleep(1.0)  # a slow import: the reload is in progress\n"
                   + app.read_text())
    d.signal(signal.SIGHUP)
    d.wait_log(r"reload: starting generation 2")
    d.signal(signum)
    d.wait_log(rf"worker count {before} -> {after}")
    d.wait_log(rf"reload complete: generation 2 serving \({after} workers\)", timeout=15)
    pids = d.wait_workers(after)
    bodies = {get(d.address, "/hello").body.decode() for _ in range(4 * after)}
    assert all(body.startswith("hello v2 ") for body in bodies), bodies
    assert {int(body.split()[-1]) for body in bodies} <= set(pids)
    set_version(src, "v3")
    d.reload(3)  # and reloads go on working
    assert get(d.address, "/hello").body.startswith(b"hello v3 ")
    d.wait_workers(after)


def test_fewer_workers_during_a_reload_completes_it_at_once(start_daemon, tmp_path):
    """SIGTTOU during a reload whose remaining slots are all ready already: the reload
    completes then, without waiting for the retired slot's worker (which imports for 5 s)."""
    src = app_copy(tmp_path)
    d = start_daemon("liveapp", "--pythonpath", str(src), workers=3)
    d.wait_workers(3)
    set_version(src, "v2")
    app = src / "liveapp.py"
    app.write_text("import time\nif b'worker 2 gen 2' in open('/proc/self/cmdline', 'rb').read():\n"
                   "    time.sleep(5)  # slot 2 of the new generation imports slowly\n" + app.read_text())
    d.signal(signal.SIGHUP)
    d.wait_log(r"ready \(slot [01], gen 2\)", count=2)
    t0 = time.monotonic()
    d.signal(signal.SIGTTOU)
    d.wait_log(r"reload complete: generation 2 serving \(2 workers\)", timeout=10)
    assert time.monotonic() - t0 < 3, "the reload waited for the retired slot"
    assert get(d.address, "/hello").body.startswith(b"hello v2 ")
    d.wait_workers(2, timeout=15)


def test_a_kept_connection_handed_over_in_a_reload_stays_kept(start_daemon):
    """An idle kept connection handed to the new generation is a kept connection there: closed
    after --keep-conn-idle, not after --read-timeout as if it had never sent a request (it was,
    with a false 'no complete request' warning, so a reload cut every kept connection's idle
    time to the read timeout, and a stop waited for it)."""
    d = start_daemon("testapp", "--read-timeout", "1", "--keep-conn-idle", "60", workers=1)
    (old,) = d.wait_workers(1)
    with FCGIClient(d.address, timeout=10) as client:
        first = client.request(make_params("GET", "/id?id=a"), keep_conn=True)
        d.reload(2)
        time.sleep(2)  # the measured interval: twice --read-timeout, idle
        second = client.request(make_params("GET", "/id?id=b"), keep_conn=True)
    assert first.body.split()[0] == b"id=a" and first.body.endswith(f"pid={old}".encode())
    assert second.body.split()[0] == b"id=b" and not second.body.endswith(f"pid={old}".encode())
    assert d.count(r"no complete request within") == 0


def test_requests_waiting_on_kept_connections_go_to_the_new_generation(start_daemon):
    """One worker, four kept connections: a 2 s request runs on the first while requests wait
    on the other three, then a reload. The retiring worker served the waiting ones itself, one
    after another, and was killed at --graceful-timeout (3 s) in the middle of them: 1 or 2 of
    4 answered while the new generation idled (nginx: 502s, or a GET run twice after its retry).
    Now they are handed over with their requests still unread."""
    d = start_daemon("testapp", "--graceful-timeout", "3", workers=1)
    (old,) = d.wait_workers(1)
    clients = [FCGIClient(d.address, timeout=20) for _ in range(4)]
    try:
        for i, client in enumerate(clients):
            assert client.request(make_params("GET", f"/id?id=w{i}"), keep_conn=True).status == 200
        clients[0].send_raw(build_request(make_params("GET", "/id?id=r0&sleep=2"), keep_conn=True))
        _wait_busy(d)
        for i in (1, 2, 3):  # in the kernel's buffers of the worker's sockets once sent
            clients[i].send_raw(build_request(make_params("GET", f"/id?id=r{i}&sleep=1"), keep_conn=True))
        d.reload(2)
        answers = [client.read_response(1, keep_conn=True) for client in clients]
    finally:
        for client in clients:
            client.close()
    bodies = [a.body.decode() for a in answers]
    print("\n" + "\n".join(bodies))
    assert [b.split()[0] for b in bodies] == ["id=r0", "id=r1", "id=r2", "id=r3"]
    assert bodies[0].endswith(f"pid={old}")  # in flight at the reload: finished by the old worker
    assert not any(b.endswith(f"pid={old}") for b in bodies[1:])  # waiting: handed over
    assert d.count(r"still busy after") == 0


def _pid_of(body: bytes) -> int:
    """The worker pid testapp's /id route ends its answer with."""
    return int(body.rpartition(b"pid=")[2])


def test_kept_connections_are_not_moved_onto_a_busy_worker(start_daemon):
    """Worker A is stuck in a 4 s request, worker B holds 8 idle kept connections: the balancer
    used to move half of B's lead to A, where their next requests waited for A's request to
    end (7 of 7 moved, 5 s each, while B idled). Now connections go only to an idle worker."""
    d = start_daemon("testapp", workers=2)
    d.wait_workers(2)
    clients: list[FCGIClient] = []
    try:
        first = FCGIClient(d.address, timeout=15)
        worker_a = _pid_of(first.request(make_params("GET", "/id?id=a"), keep_conn=True).body)
        while len(clients) < 8:  # 8 kept connections on the other worker
            client = FCGIClient(d.address, timeout=15)
            pid = _pid_of(client.request(make_params("GET", "/id?id=b"), keep_conn=True).body)
            (clients.append(client) if pid != worker_a else client.close())
        first.send_raw(build_request(make_params("GET", "/sleep?s=4"), keep_conn=True))
        _wait_busy(d)
        time.sleep(1.5)  # the measured interval: the balancer looks every 0.25 s
        t0, took = time.monotonic(), []
        for i, client in enumerate(clients):
            client.request(make_params("GET", f"/id?id=c{i}"), keep_conn=True)
            took.append(round(time.monotonic() - t0, 2))
        print(f"\n8 requests on the idle worker's connections while the other sleeps: done at {took} s")
        assert took[-1] < 1.0
        first.read_response(1, keep_conn=True)
    finally:
        for client in clients:
            client.close()


def test_kept_connections_move_to_the_idle_worker_not_the_busy_one(start_daemon):
    """Three workers: A busy for 6 s, B holding 8 idle kept connections, C idle with 1. The
    balancer evens B and C out and moves none to A, where their next requests would wait for
    A's request to end. Every request on the 8 is answered at once, with its own id, by B or C."""
    d = start_daemon("testapp", workers=3)
    d.wait_workers(3)
    kept: dict[int, FCGIClient] = {}  # a kept connection on each of two workers, A and C
    clients: list[FCGIClient] = []
    try:
        while len(kept) < 2:
            client = FCGIClient(d.address, timeout=15)
            pid = _pid_of(client.request(make_params("GET", "/id?id=k"), keep_conn=True).body)
            (client.close() if pid in kept else kept.__setitem__(pid, client))
        (worker_a, on_a), (worker_c, on_c) = kept.items()
        on_a.send_raw(build_request(make_params("GET", "/sleep?s=6"), keep_conn=True))
        on_c.send_raw(build_request(make_params("GET", "/sleep?s=2.5"), keep_conn=True))
        wait_for(lambda: sum("busy" in proc_title(w) for w in d.workers() if alive(w)) == 2, 10,
                 "workers A and C busy")
        for i in range(8):  # only B is free to accept them
            client = FCGIClient(d.address, timeout=15)
            clients.append(client)
            resp = client.request(make_params("GET", f"/id?id=b{i}"), keep_conn=True)
            assert resp.body.startswith(f"id=b{i} ".encode()), resp.body
        worker_b = {_pid_of(client.request(make_params("GET", "/id?id=x"), keep_conn=True).body)
                    for client in clients}
        assert len(worker_b) == 1 and worker_b.isdisjoint({worker_a, worker_c}), worker_b
        on_c.read_response(1, keep_conn=True)  # C is idle again, A still busy
        time.sleep(1.5)  # the measured interval: the balancer looks every 0.25 s
        t0, pids = time.monotonic(), []
        for i, client in enumerate(clients):
            resp = client.request(make_params("GET", f"/id?id=c{i}"), keep_conn=True)
            assert resp.body.startswith(f"id=c{i} ".encode()), resp.body
            pids.append(_pid_of(resp.body))
        took = time.monotonic() - t0
        print(f"\nA={worker_a} busy, B={worker_b.pop()}, C={worker_c}: the 8 answered by {pids} "
              f"in {took:.2f} s")
        assert took < 1.0 and worker_a not in pids and worker_c in pids
        on_a.read_response(1, keep_conn=True)
    finally:
        for client in [*clients, *kept.values()]:
            client.close()


def test_a_crowded_worker_gives_back_connections_whose_requests_wait(start_daemon):
    """Under load a crowded worker's kept connections nearly always have a request waiting
    in the kernel. Worker A holds 8 kept connections and sleeps in a request on one of them
    while each of the other 7 sends a request; worker B starts idle, holding none. When A
    wakes, the manager has asked it for 4 back: connections with a request waiting move too
    (nothing of theirs was read), so B answers some of the 7. Moving only connections with
    nothing waiting, A kept all 8 and answered all 7 itself (12 held against 5 stayed so
    behind Apache with enablereuse for a whole 10 s run). Every answer carries its own id.
    A is asked once: not again while it is still in the request it was in when asked."""
    d = start_daemon("testapp", "--log-level", "debug", workers=1)
    clients = [FCGIClient(d.address, timeout=20) for _ in range(8)]
    try:
        first = {_pid_of(c.request(make_params("GET", "/id?id=k"), keep_conn=True).body)
                 for c in clients}
        assert len(first) == 1, first
        worker_a = first.pop()
        clients[0].send_raw(build_request(make_params("GET", "/sleep?s=3"), keep_conn=True))
        wait_for(lambda: "busy" in proc_title(worker_a), 10, "worker A busy")
        for i, client in enumerate(clients[1:], 1):
            client.send_raw(build_request(make_params("GET", f"/id?id=w{i}"), keep_conn=True))
        d.signal(signal.SIGTTIN)
        worker_b = (set(d.wait_workers(2)) - {worker_a}).pop()
        d.wait_log(r"worker %d holds 8 kept connections, 8 more than the fewest; asking for 4 back"
                   % worker_a, timeout=10)
        answered: dict[int, int] = {}
        for i, client in enumerate(clients[1:], 1):
            resp = client.read_response(1, keep_conn=True)
            assert resp.status == 200 and resp.body.startswith(f"id=w{i} ".encode()), resp.body
            pid = _pid_of(resp.body)
            answered[pid] = answered.get(pid, 0) + 1
        clients[0].read_response(1, keep_conn=True)
        # asked once: not again while A was still in the request it was in when asked (each
        # ask piled up behind it moved more once A turned: all 8 went to B, and back)
        asks = d.count(r"worker %d holds \d+ kept connections" % worker_a)
        print(f"\nA={worker_a} B={worker_b}: the 7 waiting requests answered {answered}; "
              f"A asked to give back {asks} time(s)")
        assert set(answered) == {worker_a, worker_b} and answered[worker_b] >= 1, answered
        assert asks == 1, re.findall(r".*kept connections.*", d.log())
        for i, client in enumerate(clients):  # every connection still works, wherever it is
            resp = client.request(make_params("GET", f"/id?id=z{i}"), keep_conn=True)
            assert resp.body.startswith(f"id=z{i} ".encode()), resp.body
    finally:
        for client in clients:
            client.close()


def test_a_balance_ask_is_not_repeated_while_the_worker_serves_a_long_turn(start_daemon):
    """A worker reads the manager's channel between turns, and a turn serves every connection
    that was ready. A holds 8 kept connections, each with a 0.4 s request waiting while A is
    busy elsewhere, so its next turn takes 3.2 s; B starts meanwhile. The manager asks A once
    and waits for its answer: asked again every 0.5 s (each request of the turn looked like A
    had moved on), A then moved connections once per stale ask, all 8 went to B and 3 came
    back. Here A gives 4, B holds 4, and nobody is asked again."""
    d = start_daemon("testapp", "--log-level", "debug", workers=1)
    clients = [FCGIClient(d.address, timeout=30) for _ in range(8)]
    other = FCGIClient(d.address, timeout=30)
    try:
        first = {_pid_of(c.request(make_params("GET", "/id?id=k"), keep_conn=True).body)
                 for c in clients}
        assert len(first) == 1, first
        worker_a = first.pop()
        other.send_raw(build_request(make_params("GET", "/sleep?s=0.5")))
        wait_for(lambda: "busy" in proc_title(worker_a), 10, "worker A busy")
        for i, client in enumerate(clients):  # all 8 ready at A's next turn
            client.send_raw(build_request(make_params("GET", f"/id?id=w{i}&sleep=0.4"),
                                          keep_conn=True))
        # B starts once A's turn has begun: the ask comes in the middle of it
        wait_for(lambda: "/id" in proc_title(worker_a), 10, "worker A in its turn")
        d.signal(signal.SIGTTIN)
        worker_b = (set(d.wait_workers(2)) - {worker_a}).pop()
        for i, client in enumerate(clients):
            resp = client.read_response(1, keep_conn=True)
            assert resp.status == 200 and resp.body.startswith(f"id=w{i} ".encode()), resp.body
        other.read_response(1, keep_conn=False)

        def settled() -> list[int] | None:
            where = [_pid_of(c.request(make_params("GET", "/id?id=z"), keep_conn=True).body)
                     for c in clients]
            return where if sorted(where) == sorted([worker_a] * 4 + [worker_b] * 4) else None

        where = wait_for(settled, 10, "4 connections on each worker", interval=0.2)
        asks = re.findall(r"worker (\d+) holds (\d+) kept connections.*asking for (\d+)", d.log())
        print(f"\nA={worker_a} B={worker_b}: asks (worker, held, asked for) {asks}; "
              f"A holds {where.count(worker_a)}, B holds {where.count(worker_b)}")
        assert asks == [(str(worker_a), "8", "4")]
    finally:
        for client in [*clients, other]:
            client.close()


@contextmanager
def _stopped_worker_holding_some(d: Daemon, *others: FCGIClient
                                 ) -> Iterator[tuple[int, int, list[FCGIClient]]]:
    """Workers A and B; B is stopped (SIGSTOP), so A accepts 4 kept connections, and the
    balance passes 2 of them to B, idle as far as the scoreboard tells, where they wait unread.
    Gives A, B and the 4 clients; at the end closes them (and `others`) and lets B run again,
    should the test not have killed it."""
    a, b = d.wait_workers(2)
    clients: list[FCGIClient] = []
    try:
        os.kill(b, signal.SIGSTOP)
        wait_for(lambda: _proc_state(b) == "T", 5, f"worker {b} stopped")
        clients += [FCGIClient(d.address, timeout=15) for _ in range(4)]
        first = {_pid_of(c.request(make_params("GET", "/id?id=k"), keep_conn=True).body) for c in clients}
        assert first == {a}, (first, a, b)
        d.wait_log(rf"passed 1 connection\(s\) to worker {b}", count=2, timeout=10)
        yield a, b, clients
    finally:
        for client in (*clients, *others):
            client.close()
        _resume(b)


def _proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rpartition(")")[2].split()[0]


def _taken_back(d: Daemon, pid: int) -> int:
    """How many connections the manager took back from dead worker `pid` (waits for the line)."""
    pattern = rf"worker {pid} left (\d+) connection\(s\) passed to it unread; passing them on"
    d.wait_log(pattern)
    return int(re.search(pattern, d.log()).group(1))


def _resume(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def _closed_within(client: FCGIClient, timeout: float) -> bool:
    """The server closed this idle connection (EOF) within `timeout`."""
    sock = client._socket()
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except (socket.timeout, ConnectionResetError):
        return False


def _answered_on_each(clients: list[FCGIClient], tag: str) -> list[int]:
    """A request on each kept connection, each answered 200 with its own id; who answered."""
    answers = [c.request(make_params("GET", f"/id?id={tag}{i}"), keep_conn=True) for i, c in enumerate(clients)]
    assert [r.status for r in answers] == [200] * len(clients)
    assert all(r.body.startswith(f"id={tag}{i} ".encode()) for i, r in enumerate(answers)), answers
    return [_pid_of(r.body) for r in answers]


def test_connections_passed_to_a_worker_that_died_before_reading_them_are_passed_on(start_daemon):
    """The balance passes some of A's 4 kept connections to B, which never reads them (stopped)
    and dies (SIGKILL). They died with it: the kernel closed them with B's end of the channel,
    and the web server's next request on each failed. The manager keeps that end open, takes
    them back when it reaps B, and passes them on: all 4 keep working, each answer its own."""
    d = start_daemon("testapp", workers=2)
    with _stopped_worker_holding_some(d) as (a, b, clients):
        os.kill(b, signal.SIGKILL)
        taken = _taken_back(d, b)
        where = _answered_on_each(clients, "z")
        print(f"\nA={a} B={b} (killed, {taken} taken back): the 4 kept connections answered from {where}")
        assert taken >= 2 and b not in where and d.count(r"closing them") == 0, d.log()[-2000:]


def test_a_worker_that_does_not_read_its_channel_is_passed_no_more(start_daemon):
    """B is stopped (as a debugger stops it) with the 2 connections the balance passed it
    unread. Its record still says idle and holding none, so every balance turn (each 0.5 s)
    passed it one more, each then stuck with its next request until B ran again. The manager
    sees what waits unread in B's channel and passes it nothing more; once B runs again it takes
    them in, and all 4 connections answer."""
    d = start_daemon("testapp", workers=2)
    with _stopped_worker_holding_some(d) as (a, b, clients):
        deadline = time.monotonic() + 2.0  # four balance turns: each used to pass one more
        while True:
            passes = d.count(rf"passed \d+ connection\(s\) to worker {b}")
            assert passes == 2, d.log()[-2000:]
            if time.monotonic() > deadline:
                break  # (checked once more after the deadline: up to SIGCONT)
            time.sleep(0.1)
        asks = d.count(rf"worker {a} holds")
        os.kill(b, signal.SIGCONT)
        where = sorted(_answered_on_each(clients, "c"))  # each its own answer
        print(f"\nA={a} B={b}: B (stopped 2 s) was passed {passes} connections, A asked {asks} "
              f"time(s); after SIGCONT the 4 answered by {where}")
        assert set(where) <= {a, b} and b in where  # B, running again, serves what it was passed


def test_connections_taken_back_with_no_worker_ready_wait_for_the_next_one(start_daemon):
    """As above, B holds some of the 4 kept connections unread; then A and B die. Those A held
    die with it (its own: their requests were in its hands). Those taken back from B find no
    worker ready, both replacements still starting: they were closed ("no ready worker to
    take"); now they are held until a replacement is ready, and its answers come on them.
    Held, they are no replacement's to inherit: with --keep-conn-idle 1 each is closed (EOF)
    once idle, which a copy left open in another worker prevented."""
    d = start_daemon("testapp", "--keep-conn-idle", "1", workers=2)
    with _stopped_worker_holding_some(d) as (a, b, clients):
        os.kill(a, signal.SIGKILL)  # together: replacements take longer to be ready than this
        os.kill(b, signal.SIGKILL)  # (reaped B first, A looked ready: they went to A's channel,
        # and were taken back from it in turn)
        d.wait_log(r"no ready worker \(with descriptors to spare\) to take \d+ connection\(s\); holding them until one is ready")
        taken = _taken_back(d, b)
        survivors = []
        for i, client in enumerate(clients):
            try:
                survivors.append((client, client.request(make_params("GET", f"/id?id=s{i}"), keep_conn=True)))
            except (ConnectionClosed, ConnectionResetError):
                pass  # one A held
        answered_by = [_pid_of(r.body) for _, r in survivors]
        closed = [_closed_within(c, 6) for c, _ in survivors]
        print(f"\nA={a} B={b}, both killed: {len(survivors)} of 4 kept connections answered "
              f"(taken back: {taken}), from {answered_by}; closed once idle: {closed}")
        assert len(survivors) == taken and all(r.status == 200 for _, r in survivors), survivors
        assert not {a, b} & set(answered_by)
        assert all(closed) and d.count(r"closing them") == 0, d.log()[-2000:]


def test_connections_held_for_a_worker_are_closed_when_none_is_ready_in_time(start_daemon, tmp_path):
    """The same, with broken code on disk when A and B die: no replacement gets ready. The
    held connections are closed after --ready-timeout (2 s), said once; the daemon serves again
    as soon as the code is fixed."""
    src = app_copy(tmp_path)
    d = start_daemon("liveapp", "--ready-timeout", "2", workers=2, pythonpath=[src])
    with _stopped_worker_holding_some(d) as (a, b, clients):
        (src / "liveapp.py").write_text("def application(:\n")
        os.kill(a, signal.SIGKILL)
        os.kill(b, signal.SIGKILL)
        taken = _taken_back(d, b)
        d.wait_log(r"holding them until one is ready")
        d.wait_log(rf"no worker ready within 2s to take {taken} connection\(s\); closing them", timeout=10)
        for client in clients:
            with pytest.raises((ConnectionClosed, ConnectionResetError)):
                client.request(make_params("GET", "/id?id=late"), keep_conn=True)
        set_version(app_copy(tmp_path), "v2")
        answer = wait_for(lambda: _answer_or_none(d.address), 20, "a worker of the fixed code")
        print(f"\n{taken} held connection(s) closed after 2 s; after the fix: {answer.body[:20]!r}")
        assert answer.status == 200 and d.count(r"closing them") == 1


def _answer_or_none(address) -> "Response | None":  # noqa: F821
    try:
        return get(address, "/id?id=fixed", timeout=2)
    except (OSError, ConnectionClosed):
        return None


def _requests_waiting_while_busy(a: int, clients: list[FCGIClient], slow: FCGIClient,
                                 seconds: float) -> None:
    """A busy in a request of `seconds` (on `slow`), then a request waiting on each client."""
    slow.send_raw(build_request(make_params("GET", f"/id?id=slow&sleep={seconds}"), keep_conn=False))
    wait_for(lambda: "busy" in proc_title(a), 10, "worker A busy")
    for i, client in enumerate(clients):
        client.send_raw(build_request(make_params("GET", f"/id?id=w{i}"), keep_conn=True, request_id=2))


def _waiting_answers(clients: list[FCGIClient], slow: FCGIClient) -> list[int]:
    """Every waiting request answered, each with its own id; the pids that answered them."""
    answers = [c.read_response(2, keep_conn=True) for c in clients]
    assert slow.read_response(1, keep_conn=False).body.startswith(b"id=slow ")
    assert [r.status for r in answers] == [200] * len(clients)
    assert all(r.body.startswith(f"id=w{i} ".encode()) for i, r in enumerate(answers)), answers
    return [_pid_of(r.body) for r in answers]


def test_a_graceful_stop_serves_what_waits_on_connections_taken_back(start_daemon):
    """As above, B holds some of the 4 kept connections unread; a request waits on each of the
    4 while A is busy in a 2 s request. SIGTERM, then B dies: the manager, stopping, takes them
    back and gives them to A, still finishing, which serves what waited on them before it
    leaves. All 5 requests are answered and the daemon exits 0."""
    d = start_daemon("testapp", workers=2)
    slow = FCGIClient(d.address, timeout=15)
    with _stopped_worker_holding_some(d, slow) as (a, b, clients):
        _requests_waiting_while_busy(a, clients, slow, 2)
        d.signal(signal.SIGTERM)
        d.wait_log(r"graceful stop")
        os.kill(b, signal.SIGKILL)
        taken = _taken_back(d, b)
        where = _waiting_answers(clients, slow)
        print(f"\nA={a} B={b} (killed after SIGTERM, {taken} taken back): the 4 waiting "
              f"requests answered by {where}")
        assert set(where) == {a} and d.wait_exit(15) == 0


def test_a_stop_gives_connections_taken_back_to_a_retired_worker_still_finishing(start_daemon):
    """Stopping with no ready worker left: the new generation has exited, and only a worker
    the reload retired is still finishing a 4 s request. What is taken back from B (stopped,
    then killed) goes to that retired worker, which serves what waits on it before it leaves,
    instead of being closed for want of a ready worker."""
    d = start_daemon("testapp", workers=2)
    slow = FCGIClient(d.address, timeout=20)
    with _stopped_worker_holding_some(d, slow) as (a, b, clients):
        _requests_waiting_while_busy(a, clients, slow, 4)
        d.signal(signal.SIGHUP)
        d.wait_serving(2)
        new = [w for w in d.workers() if w not in (a, b)]
        d.signal(signal.SIGTERM)
        for pid in new:
            d.wait_log(rf"worker {pid} \(slot \d+, gen 2, \w+\) exited")
        os.kill(b, signal.SIGKILL)
        taken = _taken_back(d, b)
        where = _waiting_answers(clients, slow)
        print(f"\nA={a} (retired, finishing) B={b} (killed, {taken} taken back) new={new}: "
              f"the 4 waiting requests answered by {where}")
        assert set(where) == {a}
        assert d.count(r"closing them") == 0 and d.wait_exit(15) == 0, d.log()[-2000:]


def test_kept_connections_are_spread_over_new_workers(start_daemon):
    """12 kept connections, all held by the one worker; grow to 4 workers: the manager has the
    crowded worker hand its surplus over (SCM_RIGHTS) until each holds 3, and every connection
    keeps working: same client socket, each answer with its own id. The status page shows it."""
    d = start_daemon("testapp", "--status-path", "/fcgi-status", workers=1)
    clients = [FCGIClient(d.address, timeout=10) for _ in range(12)]
    ends = [c._socket().getsockname() for c in clients]
    counts = {"requests": 0, "failures": 0}

    def holders() -> dict[int, int]:
        """Ask on every connection; which worker answered, and how many each holds."""
        held: dict[int, int] = {}
        for i, client in enumerate(clients):
            counts["requests"] += 1
            uid = f"k{i}-{counts['requests']}"
            resp = client.request(make_params("GET", f"/id?id={uid}"), keep_conn=True)
            if resp.status != 200 or not resp.body.startswith(f"id={uid} ".encode()):
                counts["failures"] += 1
            pid = _pid_of(resp.body)
            held[pid] = held.get(pid, 0) + 1
        return held

    try:
        assert list(holders().values()) == [12]
        for n in (2, 3, 4):
            d.signal(signal.SIGTTIN)
            d.wait_workers(n)

        def even() -> dict[int, int] | None:
            held = holders()
            return held if sorted(held.values()) == [3, 3, 3, 3] else None

        spread = wait_for(even, 10, "the 12 connections to be spread 3 per worker", interval=0.1)
        assert set(spread) == set(d.workers())
        assert [c._socket().getsockname() for c in clients] == ends  # none was reopened
        snap = json.loads(get(d.address, "/fcgi-status?json&full").body)
        assert snap["kept_connections"] == 12
        assert {p["pid"]: p["kept_connections"] for p in snap["processes"]} == spread
    finally:
        for client in clients:
            client.close()
    print(f"requests={counts['requests']} failures={counts['failures']}")
    assert counts["failures"] == 0


def test_workers_exit_when_the_manager_dies(start_daemon):
    d = start_daemon(workers=3)
    workers = d.wait_workers(3)
    os.kill(d.pid, signal.SIGKILL)
    d.proc.wait(5)
    wait_for(lambda: not any(alive(w) for w in workers), 5, "orphaned workers to exit")


@pytest.mark.parametrize("when", ["at-import", "after-ready"])
def test_crash_loop_backs_off_and_recovers(start_daemon, tmp_path, when):
    """Workers that die young are respawned with a doubling delay, whether they die in their
    import or 0.15 s after reporting ready (a background thread's crash, a C extension's).
    The back-off used to restart at 0.1 s on every ready report, so the second kind was
    respawned every 0.1 s for as long as it lasted (46 in 12 s)."""
    src = app_copy(tmp_path)
    flag = tmp_path / "crash"
    crash = "os._exit(7)" if when == "at-import" else "threading.Timer(0.15, os._exit, (7,)).start()"
    (src / "crashy.py").write_text(
        "import os, threading\n"
        f"if os.path.exists({str(flag)!r}):\n    {crash}\n"
        "from liveapp import application\n")
    d = start_daemon("crashy", workers=1, pythonpath=[src])
    flag.write_text("1")
    os.kill(d.wait_workers(1)[0], signal.SIGKILL)
    time.sleep(4)  # observe the back-off for a fixed window
    spawned = d.count(r"exited: exit 7")
    print(f"{spawned} crashed respawns in 4s")
    assert 3 <= spawned <= 8  # 0.1+0.2+0.4+0.8+1.6 s: bounded, not a spin
    assert d.count(r"respawning in") == 1  # the summary is rate-limited: one line per 10 s
    assert d.proc.poll() is None
    flag.unlink()

    def recovered() -> bool | None:
        if not d.workers():
            return None
        try:
            return get(d.address, "/hello", timeout=5).status == 200
        except (ResponseTimeout, ConnectionClosed, OSError):
            # a worker started before the unlink still crashes (its connection goes with it,
            # as documented), or the back-off holds the next one back: ask again
            return None
    wait_for(recovered, 20, "recovery once the cause is gone")


# ---------------------------------------------------------------- sockets, titles


def test_unix_socket_mode_and_cleanup(start_daemon, tmp_path):
    path = tmp_path / "app.sock"
    d = start_daemon(bind=f"unix:{path}", workers=2)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    assert get(str(path), "/hello").status == 200
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert not path.exists()


def test_stale_unix_socket_is_replaced(start_daemon, tmp_path):
    path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on
    d = start_daemon(bind=str(path), workers=1)
    assert get(str(path), "/hello").status == 200
    d.wait_log(r"removing stale socket")


def test_process_titles(start_daemon):
    d = start_daemon(workers=2)
    assert re.match(r"fcgidaemon: manager testapp:application \[gen 1, 2 workers, running\] 127\.0\.0\.1:\d+",
                    proc_title(d.pid)), proc_title(d.pid)
    titles = sorted(proc_title(w) for w in d.wait_workers(2))
    assert titles == ["fcgidaemon: worker 0 gen 1 idle", "fcgidaemon: worker 1 gen 1 idle"]


def test_bind_localhost_binds_every_address(start_daemon):
    """A name binds every address it resolves to (both loopbacks where /etc/hosts has both)."""
    d = start_daemon(workers=1, wait=False)
    d.stop()
    port = d.port
    d = start_daemon("testapp", workers=1, bind=f"localhost:{port}")
    resolved = {info[4][0] for info in socket.getaddrinfo("localhost", port, type=socket.SOCK_STREAM)}
    for addr in sorted(resolved):
        d.wait_log(rf"listening on \[?{re.escape(addr)}\]?:{port}")
        assert get((addr, port), "/hello").status == 200
    print(f"localhost resolved to {sorted(resolved)}; all served")


def test_worker_death_right_before_sighup_does_not_harm_the_manager(start_daemon):
    """A young worker's replacement starts 0.1 s after its death; a SIGHUP then can replace
    its generation while it is still starting, and its late 'ready' must not upset the
    manager's state table (it once raised 'retiring -> ready not allowed' and took the
    manager down)."""
    d = start_daemon(workers=4)
    generation = 1
    for delay in (0.08, 0.09, 0.1, 0.105, 0.11, 0.12) * 2:
        os.kill(d.wait_workers(4)[0], signal.SIGKILL)
        time.sleep(delay)
        generation += 1
        d.reload(generation)
        assert d.proc.poll() is None
    assert get(d.address, "/hello").status == 200
    assert "manager loop error" not in d.log()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_during_a_slow_preload(start_daemon, tmp_path, signum):
    """Signals are recorded from before the preload: SIGHUP (whose default action kills) used to
    end the manager with no cleanup, and SIGTERM left the pidfile and the unix socket behind.
    Now SIGTERM exits 0 before any worker starts, cleaned up; SIGHUP is a reload once serving."""
    src = app_copy(tmp_path)
    (src / "slowpre.py").write_text("import time\ntime.sleep(1.5)\n")
    pidfile, path = tmp_path / "m.pid", tmp_path / "pre.sock"
    d = start_daemon("liveapp", "--preload", "slowpre", "--pidfile", str(pidfile), bind=f"unix:{path}",
                     workers=1, pythonpath=[src], wait=False)
    wait_for(pidfile.exists, 10, "the pidfile (written before the preload)")
    assert d.proc.poll() is None and not d.workers()  # still preloading
    d.signal(signum)
    if signum == signal.SIGTERM:
        assert d.wait_exit(10) == 0
        assert not pidfile.exists() and not path.exists()
        assert d.count(r"SIGTERM during startup; exiting") == 1 and d.count(r"worker \d+ ready") == 0
    else:
        d.wait_serving(2, timeout=15)
        assert get(str(path), "/hello").status == 200 and d.proc.poll() is None


@pytest.mark.parametrize("swallows", [False, True], ids=["plain", "app-takes-sigterm"])
def test_a_worker_still_importing_when_its_generation_retires_serves_nothing(start_daemon, tmp_path, swallows):
    """SIGTTIN while slow code is on disk: the new worker of the serving generation imports it
    (4 s). Meanwhile good code is deployed and reloaded, and the serving generation retires,
    the importing worker with it. It was asked to retire like the others: it finished its
    import, then took a connection waiting in the queue on its way out and answered it with
    code that never reported ready (the soak saw a failed release answer 20 s after its
    deploy). Now it is stopped at once (SIGTERM); and when the slow code's own SIGTERM handler
    swallows that (app-takes-sigterm), it reads that it was retired before it accepts anything.
    Either way every queued request gets the new code."""
    src = app_copy(tmp_path)
    d = start_daemon("liveapp", workers=1, pythonpath=[src])
    d.wait_workers(1)
    text = (src / "liveapp.py").read_text()
    swallow = "import signal\nsignal.signal(signal.SIGTERM, lambda *a: None)\n" if swallows else ""
    (src / "liveapp.py").write_text(swallow + "import time\ntime.sleep(4)\n"
                                    + text.replace('VERSION = "v1"', 'VERSION = "slow"'))
    t0 = time.monotonic()
    d.signal(signal.SIGTTIN)
    d.wait_log(r"spawned worker \d+ \(slot 1, gen 1\)")
    (src / "liveapp.py").write_text(text.replace('VERSION = "v1"', 'VERSION = "v3"'))
    d.reload(2)  # both slots of generation 2 ready: generation 1 retires, the importer too
    answers: dict = {}

    def ask(name: str, uri: str) -> None:
        answers[name] = get(d.address, uri, timeout=20).body.split(b" pid=")[0].decode()

    time.sleep(max(0.0, 3.3 - (time.monotonic() - t0)))  # the schedule, not a readiness wait
    busy = [threading.Thread(target=ask, args=(f"busy{i}", "/sleep?s=2")) for i in range(2)]
    for thread in busy:  # both new workers busy as the importer's import ends (at 4 s)
        thread.start()
    time.sleep(0.3)
    queued = [threading.Thread(target=ask, args=(f"q{i}", f"/id?id=q{i}")) for i in range(4)]
    for thread in queued:
        thread.start()
    for thread in busy + queued:
        thread.join(30)
    versions = sorted(answers[f"q{i}"].split()[1] for i in range(4))
    print(f"\nqueued requests answered by: {versions}")
    assert versions == ["version=v3"] * 4


def _release(root: Path, name: str, import_delay: float = 0.0) -> Path:
    """releases/NAME: an app module that imports a helper module of its release, after
    `import_delay` seconds; it answers with both modules' release names."""
    rel = root / "releases" / name
    rel.mkdir(parents=True)
    (rel / "relhelper.py").write_text(f"RELEASE = {name!r}\n")
    (rel / "relapp.py").write_text(
        f"import time\ntime.sleep({import_delay})\nimport relhelper\nRELEASE = {name!r}\n"
        "def application(environ, start_response):\n"
        "    body = f'app={RELEASE} helper={relhelper.RELEASE}'.encode()\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [body]\n")
    return rel


def _switch(root: Path, name: str) -> None:
    """The deploy: `current` now names releases/NAME (an atomic rename of a new symlink)."""
    tmp = root / "current.new"
    tmp.symlink_to(root / "releases" / name)
    tmp.rename(root / "current")


@pytest.mark.parametrize("named_by", ["--pythonpath", "PYTHONPATH"])
def test_a_symlink_switched_during_an_import_gives_no_worker_two_releases(start_daemon, tmp_path, named_by):
    """The README's deploy: new release directory, switch the `current` symlink, SIGHUP. A switch
    while workers import (the reload of the release before, a respawn) gave a worker modules
    of two releases: --pythonpath current was resolved at each import (the soak: 98 mixed
    responses in 7 of 8 runs). Each worker now resolves it once, before its import; the same
    directory in PYTHONPATH (as the example units had it) too."""
    root = tmp_path / "deploy"
    _release(root, "r1")
    _release(root, "r2", import_delay=1.0)  # relapp imported, then 1 s, then relhelper
    _release(root, "r3")
    _switch(root, "r1")
    if named_by == "PYTHONPATH":
        d = start_daemon("relapp", workers=2, env={"PYTHONPATH": str(root / "current")})
    else:
        d = start_daemon("relapp", workers=2, pythonpath=[root / "current"])
    d.wait_workers(2)
    _switch(root, "r2")
    d.signal(signal.SIGHUP)
    d.wait_log(r"spawned worker \d+ \(slot 1, gen 2\)")
    time.sleep(0.3)  # inside the 1 s between the two imports: the schedule, not a readiness wait
    _switch(root, "r3")  # the next release, deployed before its SIGHUP
    d.wait_serving(2)
    bodies = {get(d.address, "/").body for _ in range(10)}
    print(f"\ngeneration 2 answers: {bodies}")
    assert bodies == {b"app=r2 helper=r2"}


def test_a_reload_with_chdir_on_a_symlink_serves_the_new_release(start_daemon, tmp_path):
    """--chdir /srv/app/current (a symlink), the application found in the working directory.
    The manager changed directory once, so every worker stayed in the release the daemon
    started with: after the switch, `reload --wait` said generation 2 served, and it served
    the old code. Each worker now changes directory itself, before its import."""
    root = tmp_path / "deploy"
    _release(root, "r1")
    _release(root, "r2")
    _switch(root, "r1")
    d = start_daemon("relapp", "--chdir", str(root / "current"), workers=1)
    d.wait_workers(1)
    assert get(d.address, "/").body == b"app=r1 helper=r1"
    _switch(root, "r2")
    d.reload(2)
    assert get(d.address, "/").body == b"app=r2 helper=r2"


def test_a_stop_during_a_reload_serves_the_connection_handed_over(start_daemon):
    """A kept connection B with a request waiting is handed over by its retiring worker (once
    that one finished its slow request) to the new generation's only worker, busy; then
    SIGTERM. The new worker, stopping with no connection of its own, exited with the hand-over
    unread on its channel: the kernel closed B with a reset, its request unanswered (Apache's
    enablereuse answers 503). It now reads its channel before it leaves."""
    d = start_daemon("testapp", workers=1)
    d.wait_workers(1)
    b = FCGIClient(d.address, timeout=15)
    slow_a = FCGIClient(d.address, timeout=15)
    slow_c = FCGIClient(d.address, timeout=15)
    try:
        assert b.request(make_params("GET", "/id?id=b1"), keep_conn=True).status == 200
        slow_a.send_raw(build_request(make_params("GET", "/id?id=a&sleep=3"), keep_conn=False))
        _wait_busy(d)
        d.signal(signal.SIGHUP)
        d.wait_serving(2)
        slow_c.send_raw(build_request(make_params("GET", "/id?id=c&sleep=4"), keep_conn=False))
        time.sleep(0.2)
        b.send_raw(build_request(make_params("GET", "/id?id=b2"), keep_conn=True, request_id=2))
        assert slow_a.read_response(1, keep_conn=False).body.startswith(b"id=a ")
        time.sleep(0.5)  # B is handed over by now, to the new worker, busy with C
        d.signal(signal.SIGTERM)
        assert slow_c.read_response(1, keep_conn=False).body.startswith(b"id=c ")
        answer = b.read_response(2, keep_conn=True)
    finally:
        for client in (b, slow_a, slow_c):
            client.close()
    assert answer.status == 200 and answer.body.startswith(b"id=b2 ")
    assert d.wait_exit(15) == 0
