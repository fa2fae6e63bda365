"""Side-by-side throughput: every (case, front end) with every server, in alternating rounds.

The backends start once and stay up for the whole section.  For each case and
front end, each round runs every server once in turn (A B C D, A B C D, ...), so
slow drifts of the machine hit all servers alike.  A fresh front end is started
for every single run (and stopped after it), so connections a pinned backend
left hanging cannot leak into the next run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import frontends
import load
import paths
import servers
from procs import LoadMeter, Proc, StartError, cpu_seconds, free_port, wait_quiet

log = logging.getLogger("bench")


@dataclass(frozen=True)
class Plan:
    servers: tuple[str, ...]
    frontends: tuple[str, ...]
    cases: tuple[str, ...]
    rounds: int
    duration: float
    workers: int
    connections: int = 32
    threads: int = 2
    quiet_wait: float = 10.0  # seconds to wait for other load to drop before each run
    quiet_budget: float = 180.0  # at most this much waiting in the whole section

    def runs(self) -> list[tuple[str, str, int, str]]:
        """(case, front end, round, server) in the order they are run."""
        out = []
        for case in self.cases:
            for fe in self.frontends:
                here = [s for s in self.servers if s not in servers.CEILINGS.values()
                        or (servers.CEILINGS.get(fe) == s and ceiling_serves(s, case))]
                for rnd in range(self.rounds):
                    out += [(case, fe, rnd, server) for server in here]
        return out


def ceiling_serves(server: str, case: str) -> bool:
    """Apache's core answers a POST to a static file 405, and it has no stock way (as nginx's
    `return 200` is) to take a body and answer: its ceiling is measured for the GET cases."""
    return server != "apache-static" or load.CASES[case].method == "GET"


def run(plan: Plan, workdir: Path, progress: Callable[[str], None]) -> list[dict[str, Any]]:
    frontends.prepare_static()
    backends: dict[str, tuple[Proc, int]] = {}
    rows: list[dict[str, Any]] = []
    try:
        for name in plan.servers:
            if name in servers.BACKENDS:
                backends[name] = _start_backend(name, plan.workers, workdir)
        todo = plan.runs()
        budget = plan.quiet_budget
        for i, (case, fe, rnd, server) in enumerate(todo, 1):
            waited = wait_quiet(min(plan.quiet_wait, budget)) if budget > 0 else 0.0
            budget -= waited
            if server in backends and not backends[server][0].alive():
                log.warning("%s died; restarting it", server)
                backends[server] = _start_backend(server, plan.workers, workdir)
            port = backends[server][1] if server in backends else None
            backend_proc = backends[server][0] if server in backends else None
            row = one_run(plan, case, fe, rnd, server, port, backend_proc, workdir)
            row["quiet_wait_s"] = round(waited, 2)
            rows.append(row)
            progress(f"[{i}/{len(todo)}] {case:8} {fe:15} {server:12} round {rnd + 1}: "
                     f"{row.get('rps', 0):9.1f} req/s  p99 {row.get('p99_ms') or 0:8.2f} ms  "
                     f"errors {row.get('errors', '-')}" + (f"  ({row['error']})" if 'error' in row else ""))
    finally:
        for proc, _ in backends.values():
            proc.stop()
    return rows


def _start_backend(name: str, workers: int, workdir: Path) -> tuple[Proc, int]:
    port = free_port()
    proc = servers.start(servers.BackendSpec(name, port, workers), workdir / "logs")
    servers.warm_up(port)
    return proc, port


def one_run(plan: Plan, case: str, fe: str, rnd: int, server: str, backend_port: int | None,
            backend: Proc | None, workdir: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"case": case, "frontend": fe, "server": server, "round": rnd + 1}
    fe_port = free_port()
    try:
        script = paths.PHP_APP if server == "php-fpm" else None
        front = frontends.start(fe, fe_port, backend_port, workdir / "fe", script)
    except StartError as exc:
        row["error"] = f"front end did not start: {str(exc).splitlines()[0]}"
        return row
    try:
        # a ceiling's "server" is the front end itself
        measured = backend if backend is not None else front
        cpu0, fe_cpu0 = cpu_seconds(measured.pid), cpu_seconds(front.pid)
        meter, started = LoadMeter([measured.pid, front.pid]), time.monotonic()
        result = load.run_wrk(fe_port, load.CASES[case], plan.duration, workdir,
                              plan.connections, plan.threads)
        row["wall_s"] = round(time.monotonic() - started, 3)
        row["other_cores"] = meter.other_cores()  # load that is not ours
        cpu, fe_cpu = cpu_seconds(measured.pid) - cpu0, cpu_seconds(front.pid) - fe_cpu0
    finally:
        front.stop(grace=3.0)
    row.update(result.as_dict())
    if not result.ok:
        row["error"] = "wrk failed: " + result.output.strip()[-300:]
        return row
    per = 10_000 / result.requests
    row["cpu_s"] = round(cpu, 3)
    row["cpu_per_10k"] = round(cpu * per, 4)
    row["fe_cpu_per_10k"] = round(fe_cpu * per, 4)
    return row
