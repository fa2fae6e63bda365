"""Memory of fcgidaemon at 8 workers serving an app that holds ~50 MB of Python objects.

Variants, run one after the other (never side by side: PSS splits shared pages
among every process that maps them, so a second daemon would skew the first):

* ``--preload memdata``: the objects are built once in the manager, which calls
  ``gc.freeze()`` before forking, so the workers share them copy-on-write;
* ``--preload memdata, no gc.freeze``: the same, but the app calls gc.unfreeze()
  and one full gc.collect() when each worker imports it: the collector walks the
  shared objects as it would in a long-running worker without the freeze;
* ``import in each worker``: the same app without ``--preload``, each worker
  builds its own copy (what happens without preloading and freezing).

Each daemon serves 10,000 requests (new connection each, 16 at a time, straight
over FastCGI); then PSS, USS (Private_Clean + Private_Dirty) and RSS are read
from /proc/PID/smaps_rollup for the manager and every worker.

`footprint()`: the same figures for every server of the throughput section
serving the hello app with the same worker count, one server at a time: what a
worker of each costs when the application itself holds next to nothing. Plus
fcgidaemon with ``--preload hello``: the app imported before the fork, as flup6
does, instead of in each worker after it.
"""

from __future__ import annotations

import collections
import re
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable

import fcgiclient
import reload
import servers
from procs import LoadMeter, Proc, children, free_port, smaps_rollup

# name -> (fcgidaemon options, environment)
VARIANTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "--preload memdata (gc.freeze)": (["--preload", "memdata"], {}),
    "--preload memdata, no gc.freeze": (["--preload", "memdata"], {"BENCH_GC_UNFREEZE": "1"}),
    "import in each worker": ([], {}),
}


def run(workers: int, requests: int, workdir: Path, progress: Callable[[str], None],
        entries: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"workers": workers, "requests": requests, "variants": {}}
    env_entries = {} if entries is None else {"BENCH_MEM_ENTRIES": str(entries)}
    for name, (extra, env) in VARIANTS.items():
        spec = servers.BackendSpec("fcgidaemon", free_port(), workers, app="memapp:application",
                                   extra=tuple(extra), env={**env_entries, **env})
        proc = servers.start(spec, workdir / "logs", ready_timeout=120)
        try:
            before = snapshot(proc)
            meter = LoadMeter([proc.pid])
            spread = drive(spec.port, requests)
            other = meter.other_cores()
            after = snapshot(proc)
        finally:
            proc.stop()
        out["variants"][name] = {"before": before, "after": after, "requests_per_worker": spread,
                                 "other_cores": other}
        progress(f"memory {name:32} total PSS {after['total_pss_mb']:.1f} MB, "
                 f"worker PSS median {after['worker_pss_mb']['median']:.1f} MB, "
                 f"USS median {after['worker_uss_mb']['median']:.1f} MB")
    return out


# fcgidaemon imports the application in each worker, after the fork (what lets SIGHUP load
# new code); flup6 imports it once, before forking. This row imports it before the fork too
# (--preload of the app module itself, giving up reload for it): the like-for-like figure.
PRELOADED = "fcgidaemon --preload hello"


def footprint(names: tuple[str, ...], workers: int, requests: int, workdir: Path,
              progress: Callable[[str], None]) -> dict[str, Any]:
    """Each server with the hello app: memory after `requests` requests."""
    out: dict[str, Any] = {"workers": workers, "requests": requests, "servers": {}}
    if "fcgidaemon" in names:
        names = (*names, PRELOADED)
    for name in names:
        spec = (servers.BackendSpec("fcgidaemon", free_port(), workers, extra=("--preload", "hello"))
                if name == PRELOADED else servers.BackendSpec(name, free_port(), workers))
        proc = servers.start(spec, workdir / "logs", ready_timeout=120)
        try:
            meter = LoadMeter([proc.pid])
            answers = drive(spec.port, requests, uri="/hello", key=_status_of)
            other = meter.other_cores()
            after = snapshot(proc)
        finally:
            proc.stop()
        out["servers"][name] = {"after": after, "answers": answers, "other_cores": other}
        progress(f"footprint {name:12} worker PSS median {after['worker_pss_mb']['median']:.1f} MB, "
                 f"USS {after['worker_uss_mb']['median']:.1f} MB, answers {answers}")
    return out


SHARING_APP = "stdapp:application"  # imports 30 common standard-library modules
SHARED_RE = re.compile(r"imported \d+ standard-library modules the workers use")


def sharing(workers: int, requests: int, workdir: Path,
            progress: Callable[[str], None]) -> dict[str, Any]:
    """--share-stdlib yes and no, for an application importing a web framework's usual share of
    the standard library: worker memory in the generation the daemon started with (which
    imported it all itself), then in the next one, after a SIGHUP (which, with yes, finds it
    imported by the manager)."""
    out: dict[str, Any] = {"workers": workers, "requests": requests, "app": SHARING_APP, "variants": {}}
    for share in ("yes", "no"):
        spec = servers.BackendSpec("fcgidaemon", free_port(), workers, app=SHARING_APP,
                                   extra=("--share-stdlib", share))
        proc = servers.start(spec, workdir / "logs", ready_timeout=120)
        try:
            meter = LoadMeter([proc.pid])
            first_answers = drive(spec.port, requests, uri="/", key=_status_of)
            if share == "yes":  # the manager imports what the workers reported, between reloads
                reload.wait_line(proc.log_path, 0, SHARED_RE, proc, 60)
            first = snapshot(proc)
            old = set(children(proc.pid))
            reload.reload_once(proc, 2, timeout=120)
            _wait_gone(proc, old)
            second_answers = drive(spec.port, requests, uri="/", key=_status_of)
            other = meter.other_cores()
            second = snapshot(proc)
        finally:
            proc.stop()
        out["variants"][share] = {"first": first, "second": second, "other_cores": other,
                                  "answers": [first_answers, second_answers]}
        progress(f"sharing --share-stdlib {share}: worker USS {first['worker_uss_mb']['median']:.1f}"
                 f" -> {second['worker_uss_mb']['median']:.1f} MB after SIGHUP, total PSS "
                 f"{first['total_pss_mb']:.1f} -> {second['total_pss_mb']:.1f} MB")
    return out


def _wait_gone(proc: Proc, pids: set[int], timeout: float = 60) -> None:
    """Until the retired generation has exited (its memory would count in the manager's shares)."""
    deadline = time.monotonic() + timeout
    while set(children(proc.pid)) & pids:
        if time.monotonic() > deadline:
            raise RuntimeError(f"old workers still running after {timeout:g}s")
        time.sleep(0.05)


def _status_of(status: int, body: bytes) -> str:
    return str(status)


def _pid_of(status: int, body: bytes) -> str:
    return body.split()[0].decode() if status == 200 else f"status {status}"


def drive(port: int, requests: int, concurrency: int = 16, uri: str = "/mem",
          key: Callable[[int, bytes], str] = _pid_of) -> dict[str, int]:
    """Send `requests` GETs, `concurrency` at a time; count answers by `key` (the memory
    app answers with its worker's pid)."""
    counts: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    errors: list[str] = []

    def loop(n: int) -> None:
        local: collections.Counter[str] = collections.Counter()
        try:
            for _ in range(n):
                status, body = fcgiclient.request(port, uri=uri)
                local[key(status, body)] += 1
        except OSError as exc:
            errors.append(str(exc))
        with lock:
            counts.update(local)

    share = [requests // concurrency + (1 if i < requests % concurrency else 0)
             for i in range(concurrency)]
    threads = [threading.Thread(target=loop, args=(n,)) for n in share]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    if errors:
        counts["errors"] = len(errors)
    return dict(sorted(counts.items()))


def snapshot(proc: Proc) -> dict[str, Any]:
    manager = _mb(smaps_rollup(proc.pid))
    workers = [_mb(smaps_rollup(pid)) for pid in children(proc.pid)]
    pss = [w["pss"] for w in workers]
    uss = [w["uss"] for w in workers]
    return {
        "manager": manager,
        "workers": workers,
        "worker_pss_mb": _mmm(pss),
        "worker_uss_mb": _mmm(uss),
        "worker_rss_mb": _mmm([w["rss"] for w in workers]),
        "total_pss_mb": round(manager["pss"] + sum(pss), 1),
        "total_uss_mb": round(manager["uss"] + sum(uss), 1),
    }


def _mb(rollup: dict[str, int]) -> dict[str, float]:
    uss = rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0)
    return {"pss": round(rollup.get("Pss", 0) / 1024, 2), "uss": round(uss / 1024, 2),
            "rss": round(rollup.get("Rss", 0) / 1024, 2)}


def _mmm(values: list[float]) -> dict[str, float]:
    if not values:
        return {"median": 0.0, "min": 0.0, "max": 0.0, "n": 0}
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2), "n": len(values)}
