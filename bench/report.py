"""Results: the machine and versions, aggregation of runs, JSON and a Markdown table."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
from pathlib import Path
from typing import Any, Iterable

import paths
import tables

FIELDS = ("rps", "p50_ms", "p99_ms", "cpu_per_10k", "fe_cpu_per_10k", "other_cores")


# --------------------------------------------------------------------------- environment


def _cmd(argv: list[str], pattern: str = r"(.+)") -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = done.stdout + done.stderr
    match = re.search(pattern, text)
    return match.group(1).strip() if match else text.strip()[:80]


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def environment(fcgidaemon: str) -> dict[str, Any]:
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
    py_version = ("import importlib.metadata as m, sys; "
                  "print(sys.version.split()[0], m.version('flup6'))")
    python, flup = (_cmd([paths.PYTHON, "-c", py_version]).split() + ["?", "?"])[:2]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"nproc": os.cpu_count(), "cpu": _cpu_model(), "memory_gib": round(mem_kb / 2**20, 1),
                    "kernel": platform.release(), "os": _cmd(["sh", "-c", ". /etc/os-release; echo $PRETTY_NAME"])},
        "versions": {
            "python": python,
            "fcgidaemon": fcgidaemon,
            "flup6": flup,
            "uwsgi": _cmd([str(paths.UWSGI), "--version"]),
            "nginx": _cmd(["nginx", "-v"], r"nginx/(\S+)"),
            "apache": _cmd(["apache2", "-v"], r"Apache/(\S+)"),
            "libfcgi": _cmd(["dpkg-query", "-W", "-f", "${Version}", "libfcgi-dev"]),
            "php-fpm": _cmd([paths.PHP_FPM, "--version"], r"PHP (\S+)"),
            "wrk": _cmd(["wrk", "-v"], r"wrk (\S+)"),
            "gcc": _cmd(["gcc", "-dumpfullversion"]),
        },
    }


# --------------------------------------------------------------------------- aggregation


def mmm(values: Iterable[float | None]) -> dict[str, float] | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": round(statistics.median(vals), 4), "min": round(min(vals), 4),
            "max": round(max(vals), 4)}


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (case, front end, server) with median/min/max and ratios to fcgidaemon."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["case"], row["frontend"], row["server"]), []).append(row)
    out = []
    for (case, fe, server), runs in groups.items():
        good = [r for r in runs if "error" not in r]
        entry: dict[str, Any] = {"case": case, "frontend": fe, "server": server,
                                 "runs": len(runs), "failed_runs": len(runs) - len(good),
                                 "errors": sum(r.get("errors", 0) for r in good),
                                 "requests": sum(r.get("requests", 0) for r in good)}
        for name in FIELDS:
            entry[name] = mmm(r.get(name) for r in good)
        out.append(entry)
    base = {(e["case"], e["frontend"]): e for e in out if e["server"] == "fcgidaemon"}
    for entry in out:
        ref = base.get((entry["case"], entry["frontend"]))
        entry["rps_ratio"] = _ratio(entry, ref, "rps")
        entry["cpu_ratio"] = _ratio(entry, ref, "cpu_per_10k")
    return out


def _ratio(entry: dict[str, Any], ref: dict[str, Any] | None, name: str) -> float | None:
    if ref is None or not entry.get(name) or not ref.get(name) or not ref[name]["median"]:
        return None
    return round(entry[name]["median"] / ref[name]["median"], 3)


# --------------------------------------------------------------------------- writing


def write(results: dict[str, Any], stem: str) -> tuple[Path, Path]:
    paths.RESULTS.mkdir(parents=True, exist_ok=True)
    json_path, md_path = paths.RESULTS / f"{stem}.json", paths.RESULTS / f"{stem}.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path.write_text(tables.render(results))
    return json_path, md_path
