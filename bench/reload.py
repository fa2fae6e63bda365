"""Reload figures for fcgidaemon: SIGHUP to "reload complete", and worker spawn times.

Two daemons serve the heavy app (~300 synthetic modules) at 8 workers: one
imports the package in every worker after the fork (what a deploy reloads), one
preloads it in the manager (``--preload``; shared, never reloaded).  They are
reloaded alternately, round after round.  The time is taken from our SIGHUP to
the moment the "reload complete" line appears on the daemon's stderr; the
daemon's own figure from that line and every "worker N ready ... in X s" line of
the new generation are recorded as well.
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import heavy
import paths
import servers
from procs import LoadMeter, Proc, free_port

COMPLETE_RE = re.compile(r"reload complete: generation (\d+) serving.*? in ([\d.]+)s")
SERVING_RE = re.compile(r"generation 1 serving")
READY_RE = re.compile(r"worker \d+ ready \(slot \d+, gen (\d+)\) in ([\d.]+)s")
VARIANTS: dict[str, list[str]] = {
    "import in each worker": [],
    "--preload heavypkg": ["--preload", heavy.PACKAGE],
}


class ReloadTimeout(RuntimeError):
    pass


def run(workers: int, rounds: int, modules: int, workdir: Path,
        progress: Callable[[str], None], timeout: float = 180.0) -> dict[str, Any]:
    root = heavy.generate(paths.HEAVY, modules)
    daemons: dict[str, Proc] = {}
    out: dict[str, Any] = {"workers": workers, "modules": modules, "rounds": rounds, "variants": {}}
    try:
        for name, extra in VARIANTS.items():
            meter, started = LoadMeter(), time.monotonic()
            spec = servers.BackendSpec("fcgidaemon", free_port(), workers,
                                       app=f"{heavy.APP_MODULE}:application", pythonpath=(root,),
                                       extra=(*extra, "--ready-timeout", str(int(timeout))))
            proc = servers.start(spec, workdir / "logs", ready_timeout=timeout)
            wait_line(proc.log_path, 0, SERVING_RE, proc, timeout)
            daemons[name] = proc
            out["variants"][name] = {"first_start_s": round(time.monotonic() - started, 3),
                                     "first_start_other_cores": meter.other_cores(),
                                     "first_spawn_s": _spawn_times(proc.log_path.read_text(), 1),
                                     "reloads": []}
        for rnd in range(rounds):
            for name, proc in daemons.items():
                time.sleep(1.0)  # let the previous generation finish retiring
                result = reload_once(proc, generation=rnd + 2, timeout=timeout)
                out["variants"][name]["reloads"].append(result)
                progress(f"reload {name:24} round {rnd + 1}: {result['sighup_to_complete_s']:.3f} s "
                         f"(spawn median {statistics.median(result['spawn_s']):.3f} s)")
    finally:
        for proc in daemons.values():
            proc.stop()
    for data in out["variants"].values():
        data["summary"] = summarize(data["reloads"])
    return out


def reload_once(proc: Proc, generation: int, timeout: float) -> dict[str, Any]:
    offset = proc.log_path.stat().st_size
    meter, t0 = LoadMeter([proc.pid]), time.monotonic()
    os.kill(proc.pid, signal.SIGHUP)
    match, text = wait_line(proc.log_path, offset, COMPLETE_RE, proc, timeout, generation)
    elapsed = time.monotonic() - t0
    return {"generation": generation, "sighup_to_complete_s": round(elapsed, 4),
            "other_cores": meter.other_cores(),
            "logged_s": float(match.group(2)), "spawn_s": _spawn_times(text, generation)}


def wait_line(log_path: Path, offset: int, pattern: re.Pattern[str], proc: Proc,
              timeout: float, generation: int | None = None) -> tuple[re.Match[str], str]:
    """Poll the log from `offset` until `pattern` (for `generation`, if given) appears."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_path, errors="replace") as fh:
            fh.seek(offset)
            text = fh.read()
        for match in pattern.finditer(text):
            if generation is None or int(match.group(1)) == generation:
                return match, text
        if not proc.alive():
            break
        time.sleep(0.005)
    raise ReloadTimeout(f"no {pattern.pattern!r} within {timeout:g}s:\n{proc.log_tail()}")


def _spawn_times(text: str, generation: int) -> list[float]:
    return [float(m.group(2)) for m in READY_RE.finditer(text) if int(m.group(1)) == generation]


def summarize(reloads: list[dict[str, Any]]) -> dict[str, Any]:
    times = [r["sighup_to_complete_s"] for r in reloads]
    spawns = [s for r in reloads for s in r["spawn_s"]]
    if not times:
        return {}
    return {"reload_s": _mmm(times), "logged_s": _mmm([r["logged_s"] for r in reloads]),
            "spawn_s": _mmm(spawns) if spawns else None,
            "other_cores": _mmm([r["other_cores"] for r in reloads])}


def _mmm(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "n": len(values)}
