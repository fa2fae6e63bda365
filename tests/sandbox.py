"""A real systemd for the tests, and the FastCGI client they run inside it.

Host side: :class:`Sandbox` drives the team's ``systemd-sandbox`` tool
(``<repo>/../shared/tools/systemd-sandbox``): a systemd 252 booted as PID 1 of
its own namespaces over a write-isolated overlay of the host's ``/``.  The host
file system is visible read-only inside, ``/xchg`` is the one folder shared
writable with the host, and the sandbox has its own network namespace -- so
every client runs inside it, through ``exec``.  :func:`install_fcgidaemon` puts
the unit files from deploy/systemd in place *unchanged*; only a drop-in adapts
them to where this checkout's interpreter lives.

Sandbox side: ``python tests/sandbox.py get ADDR URI`` and ``python
tests/sandbox.py load ADDR ...`` are those clients; each prints one JSON line
(``load`` prints ``started`` first, so the host knows the load is running).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT.parent / "shared" / "tools" / "systemd-sandbox"
UNIT_DIR = "/etc/systemd/system"
UNIT_FILES = ("fcgidaemon.service", "fcgidaemon@.service", "fcgidaemon.socket")
SERVICE_USER = "fcgidaemon"


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot be used here; the message is the reason to skip."""


def unavailable_reason() -> str | None:
    if not TOOL.is_file():
        return f"no systemd sandbox: {TOOL} does not exist (only team machines have ../shared)"
    if os.geteuid() != 0:
        return "the systemd sandbox needs root"
    return None


@dataclass
class Sandbox:
    """One booted sandbox, addressed by name; every command runs inside it."""

    name: str
    xchg: Path  # the host's side of /xchg
    root: str = str(ROOT)  # this checkout, as seen inside
    python: str = ""  # its venv interpreter, as seen inside

    @classmethod
    def boot(cls, name: str | None = None) -> "Sandbox":
        reason = unavailable_reason()
        if reason:
            raise SandboxUnavailable(reason)
        name = name or f"fcgidaemon-test-{os.getpid()}"
        up = subprocess.run([str(TOOL), "-n", name, "up", str(ROOT)], capture_output=True,
                            text=True, timeout=150)
        if up.returncode != 0:
            subprocess.run([str(TOOL), "-n", name, "down"], capture_output=True, timeout=60)
            raise SandboxUnavailable(f"systemd-sandbox up failed ({up.returncode}): "
                                     f"{up.stderr.strip()[-800:]}")
        status = subprocess.run([str(TOOL), "-n", name, "status"], capture_output=True, text=True,
                                timeout=30).stdout
        match = re.search(r"xchg=(\S+)", status)
        sandbox = cls(name, Path(match.group(1) if match else "/nonexistent"))
        try:
            if not sandbox.xchg.is_dir():
                raise SandboxUnavailable(f"cannot find the sandbox's /xchg on the host: {status!r}")
            sandbox._find_project()
        except SandboxUnavailable:
            sandbox.down()
            raise
        return sandbox

    def _find_project(self) -> None:
        """Use this checkout at its own path if the sandbox sees it (the host's / is its
        lower layer), else the read-only bind at /srv/project."""
        for root in (str(ROOT), "/srv/project"):
            python = f"{root}/.venv/bin/python"
            probe = self.run(python, "-c", f"import sys; sys.path.insert(0, {root + '/src'!r}); "
                             "import fcgidaemon, systemd; print(fcgidaemon.__file__)", check=False)
            if probe.returncode == 0 and probe.stdout.startswith(root):
                self.root, self.python = root, python
                return
        raise SandboxUnavailable(f"the sandbox cannot run {ROOT}/.venv/bin/python with fcgidaemon "
                                 "and python-systemd (run `make deps` first)")

    # ------------------------------------------------------------------ commands

    def command(self, *cmd: str) -> list[str]:
        return [str(TOOL), "-n", self.name, "exec", "--", *cmd]

    def run(self, *cmd: str, input: str | None = None, timeout: float = 60,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(self.command(*cmd), input=input, capture_output=True, text=True,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"in sandbox: {shlex.join(cmd)} -> {done.returncode}\n"
                                 f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
        return done

    def sh(self, script: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run("/bin/sh", "-ec", script, **kwargs)

    def popen(self, *cmd: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.command(*cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    def write(self, path: str, text: str) -> None:
        self.run("/bin/sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1"', "sh", path, input=text)

    def systemctl(self, *args: str, check: bool = True,
                  timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", *args, check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, "--property=" + ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> list[dict[str, Any]]:
        """Journal entries as JSON objects (journald flushed first)."""
        self.run("journalctl", "--sync")
        out = self.run("journalctl", "--no-pager", "-o", "json", *args).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def client(self, *args: str, timeout: float = 60) -> dict[str, Any]:
        """Run this file's client inside the sandbox; its one JSON line."""
        done = self.run(self.python, f"{self.root}/tests/sandbox.py", *args, timeout=timeout)
        return json.loads(done.stdout.splitlines()[-1])

    def client_in_background(self, *args: str) -> subprocess.Popen[str]:
        return self.popen(self.python, f"{self.root}/tests/sandbox.py", *args)

    def down(self, keep_logs: bool = True) -> None:
        """Tear down; the tool keeps the journal in its state directory unless `keep_logs` is off."""
        subprocess.run([str(TOOL), "-n", self.name, "down"], capture_output=True, timeout=120)
        state = self.xchg.parent
        if not keep_logs and state.name == self.name and self.xchg.name == "xchg":
            shutil.rmtree(state, ignore_errors=True)
            (state.parent / f".{self.name}.lock").unlink(missing_ok=True)


def wait_line(proc: subprocess.Popen[str], expected: str, timeout: float) -> None:
    """Wait (bounded) for `proc` to print the line `expected`."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sel.select(deadline - time.monotonic()):
                line = proc.stdout.readline()
                if line.strip() == expected:
                    return
                if not line:
                    break
    raise AssertionError(f"no {expected!r} from {proc.args!r} within {timeout}s")


def finish(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """The JSON result of a background client."""
    out, err = proc.communicate(timeout=timeout)
    lines = out.strip().splitlines()
    assert proc.returncode == 0 and lines, f"client failed ({proc.returncode}): {out[-1000:]}{err[-2000:]}"
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- installing


def install_fcgidaemon(sb: Sandbox) -> None:
    """The deploy/systemd unit files, verbatim, plus what a real install would have:
    the service user, /usr/local/bin/fcgidaemon, and an interpreter it may run."""
    interpreter = sb.run("readlink", "-f", sb.python).stdout.strip()
    sb.sh(f"id -u {SERVICE_USER} >/dev/null 2>&1 || useradd --system --user-group --no-create-home "
          f"--home-dir /nonexistent --shell /usr/sbin/nologin {SERVICE_USER}")
    # inside the sandbox only (the overlay): let the service user reach the interpreter
    dirs = sorted({str(p) for path in (interpreter, f"{sb.root}/src/fcgidaemon/__init__.py")
                   for p in Path(path).parents})
    sb.run("chmod", "o+x", *dirs, check=False)
    sb.write("/usr/local/bin/fcgidaemon",
             "#!/bin/sh\n# test install: this checkout's fcgidaemon\n"
             f"export PYTHONPATH={sb.root}/src${{PYTHONPATH:+:$PYTHONPATH}}\n"
             f'exec {sb.python} -m fcgidaemon "$@"\n')
    sb.run("chmod", "755", "/usr/local/bin/fcgidaemon")
    for unit in UNIT_FILES:
        sb.run("install", "-m", "644", f"{sb.root}/deploy/systemd/{unit}", f"{UNIT_DIR}/{unit}")
    if interpreter.startswith(("/root/", "/home/")):
        dropin = ("[Service]\n# test install: the interpreter of this checkout lives in a home "
                  "directory\nProtectHome=read-only\n")
        for unit in ("fcgidaemon.service", "fcgidaemon@.service"):
            sb.write(f"{UNIT_DIR}/{unit}.d/10-test-interpreter.conf", dropin)
    sb.systemctl("daemon-reload")


# --------------------------------------------------------------------------- inside: clients


def parse_address(text: str) -> tuple[str, int] | str:
    if text.startswith("/"):
        return text
    host, _, port = text.rpartition(":")
    return host, int(port)


def cmd_get(args: argparse.Namespace) -> dict[str, Any]:
    from fcgiclient import FCGIClient, make_params
    try:
        with FCGIClient(parse_address(args.address), timeout=args.timeout) as client:
            resp = client.request(make_params("GET", args.uri))
    except Exception as exc:  # noqa: BLE001 - reported to the host as data
        return {"status": 0, "body": "", "error": f"{type(exc).__name__}: {exc}"}
    return {"status": resp.status, "body": resp.body[:200].decode("latin-1"), "error": None}


def cmd_load(args: argparse.Namespace) -> dict[str, Any]:
    """Bounded load: `clients` threads for `seconds`; the first `kept` reuse their connection."""
    from fcgiclient import Response
    from load import FCGIChecker, default_check, run_load
    versions: Counter[str] = Counter()
    lock = threading.Lock()

    def check(resp: Response, uid: str) -> None:
        default_check(resp, uid)
        found = re.search(rb"version=(\S+)", resp.body)
        with lock:
            versions[found.group(1).decode() if found else "?"] += 1

    address = parse_address(args.address)
    template = "/id?id={uid}"
    kept = FCGIChecker(address, keep_conn=True, check=check, uri_template=template)
    fresh = FCGIChecker(address, keep_conn=False, check=check, uri_template=template)

    def request(client: int, seq: int) -> None:
        (kept if client < args.kept else fresh)(client, seq)

    print("started", flush=True)
    with kept, fresh:
        result = run_load(request, args.clients, args.seconds)
    return {"requests": result.requests, "failures": result.failures, "errors": result.errors,
            "stuck": result.stuck, "elapsed": round(result.elapsed, 3), "versions": dict(versions),
            "p99_ms": round(result.p99 * 1000, 1)}


def main(argv: Sequence[str]) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    parser = argparse.ArgumentParser(prog="sandbox.py", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    get = sub.add_parser("get", help="one FastCGI GET")
    get.add_argument("address")
    get.add_argument("uri")
    get.add_argument("--timeout", type=float, default=15.0)
    load = sub.add_parser("load", help="bounded concurrent load, /id?id=... checked per request")
    load.add_argument("address")
    load.add_argument("--seconds", type=float, default=3.0)
    load.add_argument("--clients", type=int, default=4)
    load.add_argument("--kept", type=int, default=0, help="clients keeping their connection")
    args = parser.parse_args(argv)
    result = cmd_get(args) if args.command == "get" else cmd_load(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
