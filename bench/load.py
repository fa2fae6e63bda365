"""Load generation with wrk, and parsing of its report.

``wrk -t2 -c32 -d<secs> --latency`` against a front end; the POST case uses a
Lua script that sets a 1 MB body.  From wrk's output: requests, req/s, the 50th
and 99th latency percentiles, non-2xx/3xx responses and socket errors.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

WRK = "/usr/bin/wrk"
POST_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str
    body_bytes: int = 0


CASES: dict[str, Case] = {
    "hello": Case("hello", "GET", "/hello"),
    "64k": Case("64k", "GET", "/64k"),
    "post-1m": Case("post-1m", "POST", "/echo", POST_BYTES),
}


@dataclass
class WrkResult:
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    non_2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    ok: bool = False
    output: str = ""

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("output")
        data["errors"] = self.errors
        return data


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not match:
        raise ValueError(f"unparsable wrk latency {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse(output: str) -> WrkResult:
    result = WrkResult(output=output)
    if m := re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", output, re.M):
        result.requests = int(m.group(1))
        result.seconds = _ms(m.group(2) + m.group(3)) / 1000.0
    if m := re.search(r"^Requests/sec:\s*([\d.]+)", output, re.M):
        result.rps = float(m.group(1))
    for pct, attr in (("50", "p50_ms"), ("99", "p99_ms")):
        if m := re.search(rf"^\s*{pct}(?:\.000)?%\s+(\S+)", output, re.M):
            setattr(result, attr, _ms(m.group(1)))
    if m := re.search(r"Non-2xx or 3xx responses:\s*(\d+)", output):
        result.non_2xx = int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output):
        result.socket_errors = dict(zip(("connect", "read", "write", "timeout"),
                                        (int(x) for x in m.groups())))
    result.ok = result.requests > 0 and result.rps > 0
    return result


def lua_script(case: Case, workdir: Path) -> Path | None:
    """The wrk script for a case with a body (None for plain GETs)."""
    if case.method == "GET":
        return None
    script = workdir / f"{case.name}.lua"
    script.write_text(f'wrk.method = "{case.method}"\n'
                      f'wrk.body = string.rep("x", {case.body_bytes})\n'
                      'wrk.headers["Content-Type"] = "application/octet-stream"\n')
    return script


def run_wrk(port: int, case: Case, duration: float, workdir: Path, connections: int = 32,
            threads: int = 2, timeout_s: int = 5) -> WrkResult:
    """One wrk run against http://127.0.0.1:port<case.path>, bounded in time."""
    argv = [WRK, f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--latency",
            f"--timeout={timeout_s}s"]
    script = lua_script(case, workdir)
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(f"http://127.0.0.1:{port}{case.path}")
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    except subprocess.TimeoutExpired as exc:
        return WrkResult(output=f"wrk timed out: {exc}")
    result = parse(done.stdout)
    if done.returncode != 0:
        result.ok = False
        result.output += done.stderr
    return result
