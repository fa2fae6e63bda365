"""Growing past one machine: three daemons behind one Apache (mod_proxy_balancer).

The Apache configuration is the shipped ``deploy/apache/balancer.conf`` with
its three ``fcgi://`` members pointed at three real daemons bound to three
different loopback addresses (127.0.0.1, 127.0.0.2, 127.0.0.3 are all
loopback on Linux), plus an ``/app/`` mount of the same balancer.

(a) A rolling deploy across all members under load (32 clients) costs zero
    failed requests: for each member in turn, disable it in the
    balancer-manager (an HTTP POST, as the deploy notes describe), wait until
    Apache has no request on it, SIGHUP it and wait for "reload complete",
    enable it again. At the end all three serve the new VERSION.
(b) SIGKILLing one daemon outright (manager and process group) costs at most
    the requests that were in flight on it: every failed request had been
    sent before the kill, and there are no more of them than the victim was
    serving (at most its worker count); requests after the kill go to the two
    survivors. In practice Apache re-sends the GETs the dead member had not
    answered to another member (balancer failover after AH01075), so the
    measured loss is 0 -- with retry=5 on the members. With retry=0 the dead
    member is tried first by nearly every new request (bybusyness sees it
    idle) and some requests sent after the kill ran out of failover attempts
    and got a 503; that is why balancer.conf now says retry=5.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from daemon import APPS, Daemon, wait_for
from fcgiclient import FCGIClient, Response, make_params
from frontends import FrontEnd, apache_available, free_port, start_apache
from load import LoadResult, http_checker, run_load

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not apache_available(), reason="apache2 with mod_proxy_fcgi not installed")]

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "apache" / "balancer.conf"
MODULES = ("proxy_balancer", "slotmem_shm", "lbmethod_bybusyness", "lbmethod_byrequests", "authz_host", "env")
HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
DEFAULT_PORTS = ("9005", "9006", "9007")  # the member addresses in balancer.conf
CLIENTS = 32
BODY = re.compile(rb"id=(\S+) version=(\S+) pid=(\d+)")
MANAGER = "/balancer-manager"


# ---------------------------------------------------------------------------- the rig


@dataclass
class Member:
    daemon: Daemon
    host: str
    port: int
    src: Path  # this daemon's own copy of the application

    @property
    def url(self) -> str:
        """The member's name in the balancer (and in the balancer-manager)."""
        return f"fcgi://{self.host}:{self.port}"

    def set_version(self, version: str) -> None:
        path = self.src / "liveapp.py"
        path.write_text(re.sub(r'VERSION = "[^"]*"', f'VERSION = "{version}"', path.read_text()))

    def get(self, uri: str) -> Response:
        """One FastCGI request straight to the daemon, bypassing Apache."""
        with FCGIClient((self.host, self.port), timeout=10) as client:
            return client.request(make_params("GET", uri))


@contextlib.contextmanager
def balanced(tmp_path: Path, *, workers: int, args: tuple[str, ...] = ()) -> Iterator[tuple[FrontEnd, list[Member]]]:
    """Three daemons on 127.0.0.{1,2,3} behind one Apache running deploy/apache/balancer.conf."""
    with contextlib.ExitStack() as stack:
        members: list[Member] = []
        conf = DEPLOY.read_text()
        for index, (host, default) in enumerate(zip(HOSTS, DEFAULT_PORTS)):
            src = tmp_path / f"member{index}"
            src.mkdir()
            shutil.copy(APPS / "testapp.py", src / "liveapp.py")
            port = free_port(host)
            d = Daemon(tmp_path, "liveapp", args, workers=workers, bind=f"{host}:{port}", pythonpath=[src])
            stack.callback(d.stop)
            d.address = (host, port)
            members.append(Member(d, host, port, src))
            conf = conf.replace(f"127.0.0.1:{default}", f"{host}:{port}")
        assert all(m.url in conf for m in members), "balancer.conf no longer names 127.0.0.1:9005..9007"
        # The application mounted at /app/ too (the testapp routes by the path's last segment).
        conf += '\nProxyPass "/app/" "balancer://fcgidaemon/"\n'
        front = stack.enter_context(start_apache(tmp_path, None, extra=conf, modules=MODULES, threads=64))
        yield front, members


def _SAME_SITE(front: FrontEnd) -> dict[str, str]:
    # Without a same-site Referer the manager logs AH10187 ("ignoring params in
    # balancer-manager cross-site access") at error level, even for a plain GET.
    return {"Referer": front.url(MANAGER)}


def _wait_elected(front: FrontEnd, members: list, count: int, what: str) -> None:
    """Poll the balancer manager until Apache has sent `count` requests to every member."""
    wait_for(lambda: all(int(manager_rows(front)[m.url]["Elected"]) >= count for m in members),
             20, what, interval=0.1)


def manager_rows(front: FrontEnd) -> dict[str, dict[str, str]]:
    """The member table of /balancer-manager: {worker url: {column: value}}."""
    _, _, page = front.request("GET", MANAGER, headers=_SAME_SITE(front))
    text = page.decode()
    header = re.search(r"<tr><th>Worker URL</th>(.*?)</tr>", text)
    assert header, text[:2000]
    columns = ["Worker URL", *re.findall(r"<th>(.*?)</th>", header[1])]
    rows = {}
    for row in re.findall(r"<tr>\s*<td><a href=[^>]*>(fcgi://[^<]+)</a></td>(.*?)</tr>", text, re.DOTALL):
        cells = [row[0], *(c.strip() for c in re.findall(r"<td>(.*?)</td>", row[1], re.DOTALL))]
        rows[row[0]] = dict(zip(columns, cells))
    return rows


def set_disabled(front: FrontEnd, member: Member, disabled: bool) -> None:
    """What an operator does in /balancer-manager, done like the curl recipe in balancer.conf."""
    _, _, page = front.request("GET", MANAGER, headers=_SAME_SITE(front))
    nonce = re.search(rb"nonce=([0-9a-f-]+)", page)
    assert nonce, page[:500]
    form = urllib.parse.urlencode({"b": "fcgidaemon", "w": member.url,
                                   "w_status_D": int(disabled), "nonce": nonce[1].decode()})
    status, _, _ = front.request("POST", MANAGER, body=form.encode(), headers={
        "Content-Type": "application/x-www-form-urlencoded",
        "Referer": front.url(MANAGER),  # the manager ignores cross-site posts
    })
    assert status == 200
    row = manager_rows(front)[member.url]
    assert ("Dis" in row["Status"]) is disabled, row


def busy(front: FrontEnd, member: Member) -> int:
    return int(manager_rows(front)[member.url]["Busy"])


@dataclass
class Timeline:
    """Start/end time and outcome of every request, to place failures relative to an event."""

    records: list[tuple[float, float, bool]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wrap(self, make_request: Callable[[int, int], None]) -> Callable[[int, int], None]:
        def timed(client: int, seq: int) -> None:
            begin = time.monotonic()
            ok = False
            try:
                make_request(client, seq)
                ok = True
            finally:
                with self.lock:
                    self.records.append((begin, time.monotonic(), ok))
        return timed

    def in_flight(self, moment: float) -> int:
        return sum(1 for begin, end, _ in self.records if begin <= moment < end)

    def failures(self) -> list[tuple[float, float, bool]]:
        return [r for r in self.records if not r[2]]


def exact_id_check(versions: Counter) -> Callable[[Response, str], None]:
    """Status 200 and the body is exactly this request's answer (crosstalk check)."""
    lock = threading.Lock()

    def check(resp: Response, uid: str) -> None:
        assert resp.status == 200, f"{uid}: status {resp.status}: {resp.body[:200]!r}"
        match = BODY.fullmatch(resp.body)
        assert match and match[1].decode() == uid, f"{uid}: got {resp.body[:200]!r}"
        with lock:
            versions[match[2].decode()] += 1

    return check


def load_in_background(front: FrontEnd, path: str, duration: float, check: Callable[[Response, str], None],
                       timeline: Timeline | None = None) -> tuple[threading.Thread, list[LoadResult]]:
    out: list[LoadResult] = []
    checker = http_checker(front.host, front.port, path, check, timeout=60.0)
    make_request = timeline.wrap(checker) if timeline else checker

    def run() -> None:
        try:
            out.append(run_load(make_request, clients=CLIENTS, duration=duration, grace=30.0))
        finally:
            checker.close()

    thread = threading.Thread(target=run, daemon=True, name="balancer-load")
    thread.start()
    return thread, out


def daemon_problems(members: list[Member]) -> list[str]:
    """Log lines of any member that would mean a worker crashed or a connection was lost."""
    return [f"{m.url}: {line}" for m in members for line in m.daemon.log().splitlines()
            if " ERROR " in line or " CRITICAL " in line or "Traceback" in line
            or "closing them" in line or "cannot pass connections" in line]


def apache_proxy_errors(front: FrontEnd) -> list[str]:
    return [line for line in front.read_error_log().splitlines()
            if re.search(r"\[proxy[\w]*:(?:warn|error|crit)\]", line)]


def _group_alive(pgid: int) -> bool:
    """True while a live (not zombie) process is in process group `pgid`, from /proc."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    state, _ppid, pgrp = fh.read().rsplit(")", 1)[1].split()[:3]
            except OSError:
                continue
            if int(pgrp) == pgid and state != "Z":
                return True
    return False


# ---------------------------------------------------------------------------- (a) rolling deploy


def test_rolling_deploy_across_members_loses_nothing(tmp_path: Path) -> None:
    # 50 ms requests, so that "wait until Apache has nothing on the member" really waits.
    duration = 8.0
    with balanced(tmp_path, workers=6) as (front, members):
        assert {m.get("/id?id=0").body.split()[1] for m in members} == {b"version=v1"}
        versions: Counter = Counter()
        t0 = time.monotonic()
        thread, out = load_in_background(front, "/app/id?id={uid}&sleep=0.05", duration,
                                         exact_id_check(versions))
        _wait_elected(front, members, 40, "the load to run on all three members")
        steps = []
        for member in members:
            begin = time.monotonic()
            member.set_version("v2")  # the deploy: new code on disk for this daemon
            set_disabled(front, member, True)  # 1. out of rotation
            busy_at_disable = busy(front, member)
            wait_for(lambda m=member: busy(front, m) == 0, 30, f"{member.url} to drain")  # 2. drained
            elected = int(manager_rows(front)[member.url]["Elected"])
            member.daemon.reload(2, timeout=30)  # 3. SIGHUP, wait for "reload complete"
            # while out of rotation it was sent nothing
            assert int(manager_rows(front)[member.url]["Elected"]) == elected
            set_disabled(front, member, False)  # 4. back in rotation
            wait_for(lambda m=member, e=elected: int(manager_rows(front)[m.url]["Elected"]) > e + 10, 15,
                     f"{member.url} to take traffic again")
            steps.append(f"{member.url}: {time.monotonic() - begin:.2f}s (busy {busy_at_disable} when disabled)")
        deployed = time.monotonic() - t0
        assert deployed < duration - 1, f"the rolling deploy took {deployed:.1f}s, longer than the load"
        thread.join(duration + 60)
        assert not thread.is_alive() and out, "the load did not finish"
        result = out[0]
        rows = manager_rows(front)
        errors = apache_proxy_errors(front)
        finals = [m.get("/id?id=final").body.split()[1] for m in members]
        through_apache = Counter(front.request("GET", f"/app/id?id=f{i}")[2].split()[1] for i in range(30))

        print(f"\n[rolling deploy, 3 members, {CLIENTS} clients] {result.summary()}")
        print(f"  versions served during the run: {dict(versions)}; steps: {', '.join(steps)}")
        print("  elected per member: " + ", ".join(f"{u}={r['Elected']}" for u, r in rows.items()))
        print(f"  Apache proxy error lines: {len(errors)}; after: {dict(through_apache)}")
        assert result.failures == 0 and result.stuck == 0, result.summary()
        assert versions["v1"] > 0 and versions["v2"] > 0
        assert not errors, "\n".join(errors[:20])
        assert finals == [b"version=v2"] * 3, finals
        assert through_apache == Counter({b"version=v2": 30}), through_apache
        assert all(m.daemon.count("reload complete") == 1 for m in members)
        problems = daemon_problems(members)
        assert not problems, "\n".join(problems[:20])


# ---------------------------------------------------------------------------- (b) a member dies


def test_killing_a_member_costs_at_most_its_requests_in_flight(tmp_path: Path) -> None:
    # 12 workers per daemon, 36 in all for 32 clients: no request waits in a
    # listen queue, so what a daemon holds is what its workers are serving.
    workers = 12
    duration = 7.0
    with balanced(tmp_path, workers=workers,
                  args=("--status-path", "/fcgi-status")) as (front, members):
        victim = members[1]
        versions: Counter = Counter()
        timeline = Timeline()
        thread, out = load_in_background(front, "/app/id?id={uid}&sleep=0.2", duration,
                                         exact_id_check(versions), timeline)
        _wait_elected(front, members, 60, "the load to run on all three members")
        # Right before the kill: what the victim is serving, by its own scoreboard
        # (less the status request itself) and by Apache's count.
        snap = json.loads(victim.get("/fcgi-status?json").body)
        busy_daemon = snap["workers"].get("busy", 0) - 1
        busy_apache = busy(front, victim)
        killed_at = time.monotonic()
        os.killpg(victim.daemon.pid, signal.SIGKILL)
        victim.daemon.proc.wait(10)
        wait_for(lambda: not _group_alive(victim.daemon.pid), 10, "the victim's workers to die")
        dead_at = time.monotonic()
        thread.join(duration + 60)
        assert not thread.is_alive() and out, "the load did not finish"
        result = out[0]
        failures = timeline.failures()
        late = [f for f in failures if f[0] > dead_at]
        in_flight_all = timeline.in_flight(killed_at)
        after = sum(1 for begin, _, ok in timeline.records if begin > dead_at and ok)
        rows = manager_rows(front)
        log = front.read_error_log()
        died_on_victim = log.count("AH01075")  # "Error dispatching request": sent, then the member died
        refused = log.count("AH00957")  # connect refused: Apache tried the dead member again

        print(f"\n[kill 1 of 3 members, {CLIENTS} clients, 200ms requests, {workers} workers each] "
              f"{result.summary()}")
        print(f"  in flight at the kill: victim scoreboard busy={busy_daemon}, Apache busy={busy_apache}, "
              f"all members (client side)={in_flight_all}; failed: {len(failures)} "
              f"(started after the victim was gone: {len(late)}, {(dead_at - killed_at) * 1000:.0f}ms after the kill); succeeded after the kill: {after}")
        print(f"  Apache: {died_on_victim} requests lost their member (AH01075) and were re-sent "
              f"to another one unless they failed above; {refused} refused connects (AH00957)")
        print("  members: " + ", ".join(f"{u} {r['Status'].strip()} elected={r['Elected']}"
                                        for u, r in rows.items()))
        assert result.stuck == 0
        problems = daemon_problems(members)  # the victim's log ends at the SIGKILL, unremarked
        assert not problems, "\n".join(problems[:20])
        assert not late, "requests sent after the kill failed: the dead member was not skipped"
        assert len(failures) <= min(workers, max(busy_daemon, busy_apache), in_flight_all)
        assert after > 0
        for m in members:
            if m is not victim:
                assert m.daemon.proc.poll() is None
