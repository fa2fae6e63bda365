"""--share-stdlib: the standard-library modules an application imports are imported once in the
manager, after its workers report them, and every worker it forks afterwards shares them; never a
module of the application's own, even one named like a standard one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fcgidaemon import loader
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
SHADOW = '''\
import os
with open(os.environ["SHADOW_MARKER"], "a") as fh:
    fh.write(f"{os.getpid()}\\n")
'''
SHARED_LOG = r"imported \d+ standard-library modules the workers use"


def _app(tmp_path: Path) -> Path:
    src = tmp_path / "shareapp"
    src.mkdir()
    (src / "shareapp.py").write_text(APP)
    (src / "colorsys.py").write_text(SHADOW)
    return src


def _inherited(d) -> str:
    return get(d.address, "/").body.decode()


def test_workers_started_later_share_the_standard_library_the_app_imports(start_daemon, tmp_path):
    marker = tmp_path / "shadow-importers"
    d = start_daemon("shareapp:application", workers=1, pythonpath=[_app(tmp_path)],
                     env={"SHADOW_MARKER": str(marker)})
    d.wait_serving(1)
    assert _inherited(d) == ""  # the first generation imported everything itself
    d.wait_log(SHARED_LOG)
    assert get(d.address, "/late").status == 200  # this worker now has wave too
    d.reload(2)
    assert _inherited(d) == "decimal email.message http.cookies"
    d.wait_log(SHARED_LOG, count=2)  # what generation 1 imported while serving, told as it retired
    d.reload(3)
    assert _inherited(d) == "decimal email.message http.cookies wave"
    importers = [int(line) for line in marker.read_text().split()]
    print(f"app's colorsys imported by pids {importers}; manager {d.pid}")
    assert len(importers) == 3 and d.pid not in importers  # once per worker, never the manager


def test_share_stdlib_no_keeps_the_manager_as_it_started(start_daemon, tmp_path):
    d = start_daemon("shareapp:application", "--share-stdlib", "no", workers=1,
                     pythonpath=[_app(tmp_path)], env={"SHADOW_MARKER": str(tmp_path / "m")})
    d.wait_serving(1)
    d.reload(2)
    assert _inherited(d) == ""
    assert d.count(SHARED_LOG) == 0


def test_the_manager_checks_each_name_itself(tmp_path):
    """What a worker reports is checked again where it is imported: an application's module named
    like a standard one, a module with side effects, one that does not exist and a third-party
    one are refused; a package's module is imported with its package."""
    (tmp_path / "colorsys.py").write_text("raise SystemExit('the application module was imported')\n")
    code = (f"import sys, time; sys.path.insert(0, {str(tmp_path)!r})\n"
            "from fcgidaemon import loader\n"
            "names = sorted(['colorsys', 'this', 'no_such_module', 'flup', 'flup.server', 'email',\n"
            "                'email.message', 'wave'])\n"
            "print(loader.share_stdlib(names, time.monotonic() + 30))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    imported, refused, rest = eval(out.stdout)  # noqa: S307 - our own subprocess's repr
    assert imported == ["email", "email.message", "wave"]
    assert refused == ["colorsys", "flup", "flup.server", "no_such_module", "this"]
    assert rest == [] and out.stderr == ""


def test_only_the_interpreters_own_library_counts():
    lib = loader.STDLIB_DIR
    assert loader.is_stdlib("json", f"{lib}/json/__init__.py")
    assert loader.is_stdlib("_socket", f"{lib}/lib-dynload/_socket.cpython-311-x86_64-linux-gnu.so")
    assert loader.is_stdlib("sys", "built-in") and loader.is_stdlib("zipimport", "frozen")
    # a package named like a standard module, installed where a Python outside a venv keeps them
    assert not loader.is_stdlib("json", f"{lib}/site-packages/json/__init__.py")
    assert not loader.is_stdlib("json", "/srv/app/json.py")  # the application's own
    assert not loader.is_stdlib("flup", f"{lib}/flup/__init__.py")  # no standard name
    assert not loader.is_stdlib("this", f"{lib}/this.py")  # a standard name, never shared
    assert not loader.is_stdlib("json", None)
