"""--share-stdlib: the standard-library modules an application imports are imported once in the
manager, after its workers report them, and every worker it forks afterwards shares them; never a
module of the application's own, even one named like a standard one, and never at the cost of a
worker or the manager."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from fcgidaemon import sharing
from daemon import wait_for
from test_lifecycle import get

APP = '''\
import sys
BEFORE = set(sys.modules)  # what this worker had before the app imported anything: its manager's
import colorsys  # the app's own colorsys.py, beside it: a standard name, not the standard module
import decimal, email.message, http.cookies

WATCH = ("decimal", "email.message", "http.cookies", "colorsys", "wave")


def application(environ, start_response):
    if environ.get("PATH_INFO", "").endswith("/late"):
        import wave  # imported while serving: reported when the worker retires
    body = " ".join(name for name in WATCH if name in BEFORE).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
'''
# an application module named like a standard one: says who imported it, and which version
SHADOW = '''\
import os
VERSION = "{version}"
with open(os.environ["SHADOW_MARKER"], "a") as fh:
    fh.write(f"{{os.getpid()}}\\n")
'''
SHARED_LOG = r"imported \d+ standard-library modules the workers use"


def _app(tmp_path: Path, text: str = APP, shadow: str | None = "colorsys") -> Path:
    src = tmp_path / "shareapp"
    src.mkdir()
    (src / "shareapp.py").write_text(text)
    if shadow:
        (src / f"{shadow}.py").write_text(SHADOW.format(version="v1"))
    return src


def _answer(d, path: str = "/") -> str:
    resp = get(d.address, path)
    assert resp.status == 200, resp
    return resp.body.decode()


def _importers(marker: Path) -> list[int]:
    return [int(line) for line in marker.read_text().split()]


def test_workers_started_later_share_the_standard_library_the_app_imports(start_daemon, tmp_path):
    marker = tmp_path / "shadow-importers"
    d = start_daemon("shareapp:application", workers=1, pythonpath=[_app(tmp_path)],
                     env={"SHADOW_MARKER": str(marker)})
    d.wait_serving(1)
    assert _answer(d) == ""  # the first generation imported everything itself
    d.wait_log(SHARED_LOG)
    assert _answer(d, "/late") == ""  # this worker now has wave too
    d.reload(2)
    assert _answer(d) == "decimal email.message http.cookies"
    d.wait_log(SHARED_LOG, count=2)  # what generation 1 imported while serving, told as it retired
    d.reload(3)
    assert _answer(d) == "decimal email.message http.cookies wave"
    print(f"app's colorsys imported by pids {_importers(marker)}; manager {d.pid}")
    assert len(_importers(marker)) == 3 and d.pid not in _importers(marker)  # per worker, never the manager


def test_share_stdlib_no_keeps_the_manager_as_it_started(start_daemon, tmp_path):
    d = start_daemon("shareapp:application", "--share-stdlib", "no", workers=1,
                     pythonpath=[_app(tmp_path)], env={"SHADOW_MARKER": str(tmp_path / "m")})
    d.wait_serving(1)
    d.reload(2)
    assert _answer(d) == ""
    assert d.count(SHARED_LOG) == 0


CALENDAR_APP = '''\
import calendar  # the application's own calendar.py
import email.message  # whose email._parseaddr imports "calendar" too


def application(environ, start_response):
    body = calendar.VERSION.encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
'''


def test_a_standard_module_that_imports_an_application_module_is_not_shared(start_daemon, tmp_path):
    """email.message imports calendar; this application has a calendar.py of its own. Imported
    in the manager, email.message ran that file there, and the manager's copy then replaced the
    deployed one in every later generation (v1 served after v2 was deployed)."""
    marker = tmp_path / "calendar-importers"
    src = _app(tmp_path, CALENDAR_APP, shadow="calendar")
    d = start_daemon("shareapp:application", workers=1, pythonpath=[src],
                     env={"SHADOW_MARKER": str(marker)})
    d.wait_serving(1)
    assert _answer(d) == "v1"
    d.wait_log(SHARED_LOG)
    (src / "calendar.py").write_text(SHADOW.format(version="v2"))
    d.reload(2)
    assert _answer(d) == "v2"
    print(f"the app's calendar.py imported by pids {_importers(marker)}; manager {d.pid}")
    assert d.pid not in _importers(marker)
    assert "not sharing email._parseaddr: calendar: not reported by a worker" in d.log()


DEPLOY_APP = '''\
import colorsys  # the standard one, until a deploy brings a colorsys.py of the application's


def application(environ, start_response):
    body = getattr(colorsys, "VERSION", "standard").encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
'''


def test_a_deploy_may_add_a_module_named_like_a_shared_one(start_daemon, tmp_path):
    """The manager shares the standard colorsys; then a deploy adds the application's own: the
    next generation imports the application's, as it would without sharing."""
    src = _app(tmp_path, DEPLOY_APP, shadow=None)
    d = start_daemon("shareapp:application", workers=1, pythonpath=[src],
                     env={"SHADOW_MARKER": str(tmp_path / "m")})
    d.wait_serving(1)
    assert _answer(d) == "standard"
    d.wait_log(SHARED_LOG)
    d.reload(2)
    assert _answer(d) == "standard"  # shared now, and still the standard one
    (src / "colorsys.py").write_text(SHADOW.format(version="deployed"))
    d.reload(3)
    assert _answer(d) == "deployed"


LAZY_APP = '''\
import importlib.util, sys

spec = importlib.util.find_spec("gpu")  # optional: loaded on first use, which may never come
gpu = importlib.util.module_from_spec(spec)
spec.loader = importlib.util.LazyLoader(spec.loader)
sys.modules["gpu"] = gpu
spec.loader.exec_module(gpu)


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
'''


def test_a_lazily_imported_module_stays_unloaded(start_daemon, tmp_path):
    """Listing the modules for the report asked each one for its __spec__: that loads a lazy
    module, and this one raises, so every worker crashed before it was ready."""
    src = _app(tmp_path, LAZY_APP, shadow=None)
    (src / "gpu.py").write_text("raise RuntimeError('no GPU driver on this host')\n")
    d = start_daemon("shareapp:application", workers=1, pythonpath=[src])
    d.wait_serving(1)
    assert _answer(d) == "ok"
    assert "crashed" not in d.log() and "no GPU driver" not in d.log()


def _report(*modules: str) -> list[str]:
    """What a worker would report after importing `modules`: asked of a fresh interpreter."""
    code = ("from fcgidaemon import sharing; import json\n"
            "mark = sharing.newest_module()\n"
            f"for m in {list(modules)!r}: __import__(m)\n"
            "print(json.dumps(sharing.stdlib_imported(mark)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_manager_checks_each_name_itself(tmp_path):
    """What a worker reports is checked again where it is imported, by the manager's own search:
    an application's module named like a standard one, a module with side effects, one that does
    not exist, a third-party one and one that exits when imported are refused, and the manager
    goes on."""
    (tmp_path / "colorsys.py").write_text("raise SystemExit('the application module was imported')\n")
    names = sorted({*_report("email.message", "wave", "unittest"), "colorsys", "this", "no_such_module",
                    "flup", "flup.server", "unittest.__main__"})
    code = (f"import sys, time; sys.path.insert(0, {str(tmp_path)!r})\n"
            "from fcgidaemon import sharing\n"
            f"print(sharing.share_stdlib({names!r}, time.monotonic() + 30))\n"
            "print('still here')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.endswith("still here\n"), out.stdout + out.stderr
    imported, refused, rest = eval(out.stdout.splitlines()[0])  # noqa: S307 - our own subprocess's repr
    assert {"email.message", "wave", "unittest"} <= set(imported)
    assert refused == ["colorsys", "flup", "flup.server", "no_such_module", "this", "unittest.__main__"]
    assert rest == [] and out.stderr == ""


def test_only_the_interpreters_own_library_counts():
    lib = sharing.STDLIB_DIR
    assert sharing.is_stdlib("json", f"{lib}/json/__init__.py")
    assert sharing.is_stdlib("_socket", f"{lib}/lib-dynload/_socket.cpython-311-x86_64-linux-gnu.so")
    assert sharing.is_stdlib("sys", "built-in") and sharing.is_stdlib("zipimport", "frozen")
    # a package named like a standard module, installed where a Python outside a venv keeps them
    assert not sharing.is_stdlib("json", f"{lib}/site-packages/json/__init__.py")
    assert not sharing.is_stdlib("json", "/srv/app/json.py")  # the application's own
    assert not sharing.is_stdlib("flup", f"{lib}/flup/__init__.py")  # no standard name
    assert not sharing.is_stdlib("this", f"{lib}/this.py")  # a standard name, never shared
    assert not sharing.is_stdlib("unittest.__main__", f"{lib}/unittest/__main__.py")  # runs tests
    assert not sharing.is_stdlib("ctypes.test", f"{lib}/ctypes/test/__init__.py")
    assert not sharing.is_stdlib("json.\0x", f"{lib}/json/x.py")
    assert not sharing.is_stdlib("json", None)


HELD_V1 = '''\
def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "1")])
    return [b"-"]
'''
HELD_V2 = '''\
import os, sys, time
BEFORE = set(sys.modules)
try:  # the first worker to import this version is ready at once, every other one 2 s later
    os.close(os.open(os.environ["FIRST_MARKER"], os.O_CREAT | os.O_EXCL))
except FileExistsError:
    time.sleep(2)
import fractions  # new in this version: reported by each new worker as it is ready


def application(environ, start_response):
    body = b"fractions" if "fractions" in BEFORE else b"-"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
'''


def test_the_manager_imports_nothing_in_the_middle_of_a_reload(start_daemon, tmp_path):
    """A new generation's first worker reports what it imported 2 s before its generation is
    complete; the manager imports it only after the reload completed (importing in the middle
    of it would stretch the reload's timing and hold the loop that is switching generations),
    and the generation after that has it."""
    src = _app(tmp_path, HELD_V1, shadow=None)
    d = start_daemon("shareapp:application", workers=2, pythonpath=[src],
                     env={"FIRST_MARKER": str(tmp_path / "first")})
    d.wait_serving(1)
    assert _answer(d) == "-"
    (src / "shareapp.py").write_text(HELD_V2)
    d.reload(2)
    begun = d.log().index("reload: starting generation 2")

    def shared_since() -> int | None:  # a line of generation 1's report may come before
        return next((m.start() for m in re.finditer(SHARED_LOG, d.log()) if m.start() > begun), None)
    wait_for(lambda: shared_since() is not None, 15, "the modules generation 2 reported imported")
    log = d.log()
    first_ready, complete = log.index(", gen 2) in "), log.index("reload complete: generation 2")
    print(f"\nlog positions: reload begun {begun}, first gen-2 worker ready {first_ready}, "
          f"reload complete {complete}, modules imported {shared_since()}")
    assert first_ready < complete < shared_since()
    d.reload(3, timeout=20)
    assert _answer(d) == "fractions"


def test_what_the_manager_imported_is_frozen_once(tmp_path):
    """After a batch of reported modules is imported, the manager gc.freeze()s them, as it did its
    preloads at start: a collection in a worker (or the manager) would otherwise write to every
    object of theirs and copy the pages the workers share. A report of modules the manager
    has already is no batch and freezes nothing. The manager's mixin, in a real interpreter."""
    report = _report("fractions", "wave")  # what a worker importing them names, dependencies too
    code = ("import gc, sys\n"
            "from types import SimpleNamespace\n"
            "from fcgidaemon import sharing\n"
            "from fcgidaemon.states import Phase\n"
            "class Manager(sharing.StdlibSharing):\n"
            "    config, phase, upgrade = SimpleNamespace(share_stdlib=True), Phase.RUNNING, None\n"
            "def share(names):\n"
            "    m._on_stdlib_report(names)\n"
            "    while m._sharing_due:\n"
            "        m._share_stdlib()\n"
            "    return gc.get_freeze_count()\n"
            "m = Manager()\n"
            "m._init_sharing()\n"
            "start = gc.get_freeze_count()\n"
            "assert 'fractions' not in sys.modules and 'wave' not in sys.modules\n"
            f"after = share({report!r})\n"
            "keep = [[] for _ in range(1000)]  # alive since: a freeze would take them too\n"
            f"again = share({[*report, 'os']!r})\n"
            "print(start, after, again, 'fractions' in sys.modules, 'wave' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    start, after, again, *imported = out.stdout.split()
    print(f"\nfrozen objects: {start} at start, {after} after the batch, {again} after a report "
          "of modules already imported")
    assert imported == ["True", "True"]
    assert int(after) > int(start) and int(again) < int(after) + 1000
