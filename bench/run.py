#!/usr/bin/env python3
"""fcgidaemon's benchmark: one command (`make bench`) that installs what it needs and measures.

Sections (all by default; pick with --only):

* throughput  fcgidaemon, flup6, uWSGI, PHP-FPM, a C libfcgi server and nginx itself behind
              nginx and Apache, with and without kept backend connections, three cases
* reload      SIGHUP to "reload complete" for a heavy app, with and without --preload
* memory      PSS/USS of 8 workers holding ~50 MB, preloaded (gc.freeze) or not; and
              every server's per-worker PSS/USS serving the hello app
* micro       fcgidaemon's per-request path (kept connection on a socketpair; a new
              loopback connection per request), and its cProfile

Results go to bench/results/<stem>.json and .md ("latest" for a full run).
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

import deps
import frontends
import load
import memory
import paths
import procs
import reload
import report
import servers
import source
import throughput

SECTIONS = ("throughput", "reload", "memory", "micro")
_t0 = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - _t0:7.1f}s] {message}", flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark fcgidaemon against its peers.")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 round of 3 s, hello case only, small reload/memory/micro")
    p.add_argument("--rounds", type=int, help="rounds per server (default 3; quick 1)")
    p.add_argument("--duration", type=float, help="seconds per wrk run (default 5; quick 3)")
    p.add_argument("--workers", type=int, default=4, help="workers per server (default 4)")
    p.add_argument("--only", action="append", default=[], metavar="NAME[,NAME]",
                   help=f"sections {SECTIONS}, servers {servers.SERVERS}, front ends "
                        f"{frontends.FRONTENDS} or cases {tuple(load.CASES)}; "
                        "each dimension not named is run whole")
    p.add_argument("--out", type=_stem, help="result file name (no directory) in bench/results "
                                             "(default: latest, quick, or partial)")
    p.add_argument("--rev", help="measure fcgidaemon as committed at this git revision (a "
                                 "snapshot under bench/work) instead of the working tree")
    p.add_argument("--max-minutes", type=float, default=45.0,
                   help="hard limit for the whole run; everything started is stopped")
    return p.parse_args(argv)


def _stem(text: str) -> str:
    if not text or "/" in text or text.startswith("."):
        raise argparse.ArgumentTypeError("a plain file name, written to bench/results/")
    return text


def select(args: argparse.Namespace) -> tuple[tuple[str, ...], throughput.Plan]:
    """Sections to run and the throughput plan, from --quick and --only."""
    names = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    dims: dict[str, tuple[str, ...]] = {"section": SECTIONS, "server": servers.SERVERS,
                                        "frontend": frontends.FRONTENDS, "case": tuple(load.CASES)}
    chosen: dict[str, list[str]] = {d: [] for d in dims}
    for name in names:
        hits = [d for d, values in dims.items() if name in values]
        if not hits:
            raise SystemExit(f"--only: unknown name {name!r}")
        chosen[hits[0]].append(name)
    sections = tuple(chosen["section"]) or (
        ("throughput",) if any(chosen[d] for d in ("server", "frontend", "case")) else SECTIONS)
    server_list = chosen["server"] or list(servers.SERVERS)
    if "fcgidaemon" not in server_list:
        server_list.insert(0, "fcgidaemon")  # the reference for every ratio
    cases = tuple(chosen["case"]) or (("hello",) if args.quick else tuple(load.CASES))
    plan = throughput.Plan(servers=tuple(s for s in servers.SERVERS if s in server_list),
                           frontends=tuple(chosen["frontend"]) or frontends.FRONTENDS,
                           cases=cases,
                           rounds=args.rounds or (1 if args.quick else 3),
                           duration=args.duration or (3.0 if args.quick else 5.0),
                           workers=args.workers,
                           quiet_wait=0.0 if args.quick else 10.0)
    return sections, plan


def run_sections(sections: tuple[str, ...], plan: throughput.Plan, quick: bool,
                 results: dict[str, Any]) -> None:
    work = paths.WORK
    for section in sections:
        progress(f"--- {section}")
        try:
            if section == "throughput":
                rows = throughput.run(plan, work, progress)
                results["throughput"] = {"rows": rows, "summary": report.aggregate(rows)}
            elif section == "reload":
                results["reload"] = reload.run(workers=8, rounds=1 if quick else plan.rounds,
                                               modules=100 if quick else 300, workdir=work,
                                               progress=progress)
            elif section == "memory":
                results["memory"] = memory.run(workers=8, requests=2000 if quick else 10_000,
                                               workdir=work, progress=progress)
                results["memory"]["footprint"] = memory.footprint(
                    servers.BACKENDS, plan.workers, 2000 if quick else 10_000, work, progress)
                results["memory"]["sharing"] = memory.sharing(
                    plan.workers, 2000 if quick else 10_000, work, progress)
            elif section == "micro":
                results["micro"] = run_micro(0.1 if quick else 1.0, 1 if quick else 3)
        except Exception as exc:  # noqa: BLE001 - one failed section must not lose the others
            traceback.print_exc()
            results.setdefault("failed_sections", {})[section] = f"{type(exc).__name__}: {exc}"[:500]
        finally:
            procs.stop_all()


def run_micro(scale: float, rounds: int) -> dict[str, Any]:
    """micro.py in a fresh interpreter (its own process to profile), bounded in time."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "micro.json"
        profile_txt = paths.RESULTS / "micro-profile.txt"
        paths.RESULTS.mkdir(parents=True, exist_ok=True)
        meter = procs.LoadMeter()  # micro.py is a child: its CPU counts as ours once reaped
        subprocess.run([paths.PYTHON, str(paths.BENCH / "micro.py"), "--scale", str(scale),
                        "--rounds", str(rounds), "--json", str(out),
                        "--profile-out", str(profile_txt)],
                       check=True, timeout=900, stdout=subprocess.DEVNULL, cwd=paths.ROOT,
                       env=paths.fcgidaemon_env())
        data: dict[str, Any] = json.loads(out.read_text())
        data["other_cores"] = meter.other_cores()
    progress("micro: " + ", ".join(f"{c} {d['rps']['median']:.0f} req/s"
                                   for c, d in data["cases"].items()))
    return data


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(f"stopped by signal {signum}")


class Deadline(BaseException):
    """--max-minutes ran out: not an Exception, so no section swallows it."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise Deadline("--max-minutes exceeded")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sections, plan = select(args)
    full = not args.quick and not args.only and args.rounds is None and args.duration is None
    stem = args.out or ("latest" if full else "quick" if args.quick else "partial")
    atexit.register(procs.stop_all)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(int(args.max_minutes * 60))
    paths.WORK.mkdir(parents=True, exist_ok=True)
    for stale in ("fe", "logs"):  # configs and logs of the previous run
        shutil.rmtree(paths.WORK / stale, ignore_errors=True)
    results: dict[str, Any] = {}
    try:
        deps.ensure_all(progress)
        # the apps' bytecode, as a deployed app has it: without it (PYTHONDONTWRITEBYTECODE is
        # set here) a server that imports the app in each worker compiles it in each one
        # (~0.15 MB of private memory per fcgidaemon worker), one that imports it before
        # forking (flup6, uWSGI) once
        source.compile_bytecode(paths.APPS)
        measured = source.use(args.rev)
        progress(f"fcgidaemon: {measured}")
        results = {"environment": report.environment(measured),
                                   "settings": {"quick": args.quick, "sections": sections,
                                                "workers": plan.workers, "rounds": plan.rounds,
                                                "duration": plan.duration,
                                                "connections": plan.connections,
                                                "threads": plan.threads,
                                                "servers": plan.servers, "frontends": plan.frontends,
                                                "cases": plan.cases}}
        run_sections(sections, plan, args.quick, results)
    except Deadline as exc:
        results.setdefault("failed_sections", {})["run"] = str(exc)
        if "environment" not in results:
            raise
    finally:
        signal.alarm(0)
        procs.stop_all()
    results["settings"]["elapsed_s"] = round(time.monotonic() - _t0, 1)
    json_path, md_path = report.write(results, stem)
    progress(f"results: {json_path.relative_to(paths.ROOT)}, {md_path.relative_to(paths.ROOT)}")
    return 1 if results.get("failed_sections") else 0


if __name__ == "__main__":
    sys.exit(main())
