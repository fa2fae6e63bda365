"""Imports: preloaded modules in the manager, the application in each worker.

What the manager imports is shared by every worker and never reloaded; what a
worker imports after the fork is fresh code, which is what makes SIGHUP a deploy.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import traceback
from typing import Any, Callable, Iterable

WSGIApp = Callable[..., Any]


class AppImportError(Exception):
    """The application (or a preload module) failed to import; carries the traceback."""

    def __init__(self, what: str, summary: str, text: str, not_found: bool = False) -> None:
        super().__init__(f"{what}: {summary}")
        self.summary = summary
        self.text = text
        self.not_found = not_found  # the module imported, the callable is not in it


# what setup_paths did, for pin_release: --chdir as given (a symlink stays one), the sys.path
# entries of --pythonpath as given (made absolute), and the working directory's entry
_CHDIR: str | None = None
_ENTRIES: list[str] = []
_CWD_ENTRY: str | None = None


def setup_paths(chdir: str | None, pythonpath: Iterable[str]) -> None:
    global _CHDIR, _CWD_ENTRY
    if chdir:
        _CHDIR = os.path.abspath(chdir)
        os.chdir(chdir)
    for entry in reversed(list(pythonpath)):
        # relative to --chdir as given: made absolute by the (resolved) working directory, a
        # relative entry would name the release the daemon started with for good
        path = os.path.normpath(os.path.join(_CHDIR or os.getcwd(), entry))
        if path not in sys.path:
            sys.path.insert(0, path)
            _ENTRIES.append(path)
    # PYTHONPATH's entries too: the same symlinked release directory, named there instead
    # (as the example units once did), was looked up again at every import
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if os.path.isabs(entry) and entry in sys.path and entry not in _ENTRIES:
            _ENTRIES.append(entry)
    # like `python -m`, the working directory is importable
    if "" not in sys.path and os.getcwd() not in sys.path:
        _CWD_ENTRY = os.getcwd()
        sys.path.insert(0, _CWD_ENTRY)


def pin_release() -> None:
    """In a worker, before it imports the application: each --pythonpath and PYTHONPATH entry
    (and --chdir) resolved now, once. Deploys switch a symlink to a new release directory; left unresolved,
    every import resolved it anew, and a switch during a worker's import gave it modules of two
    releases (the soak: 98 mixed responses in 7 of 8 runs). And --chdir, done once in the
    manager, kept every worker in the release the daemon started with: a reload redeployed the
    old code and said it had succeeded."""
    if _CHDIR:
        try:
            os.chdir(_CHDIR)  # the symlink, resolved now (the manager's cwd is the old release)
        except OSError as exc:  # the release it names is gone: this reload fails, says why
            raise AppImportError("--chdir", f"--chdir {_CHDIR}: {exc.strerror or exc}", "") from None
    for index, path in enumerate(sys.path):
        if path == _CWD_ENTRY:
            sys.path[index] = os.getcwd()
        elif path in _ENTRIES:
            sys.path[index] = os.path.realpath(path)


def summarize(exc: BaseException) -> str:
    """One line: 'SyntaxError in app/views.py:12: invalid syntax'."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{type(exc).__name__} in {exc.filename}:{exc.lineno}: {exc.msg}"
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" in {tb[-1].filename}:{tb[-1].lineno}" if tb else ""
    return f"{type(exc).__name__}{where}: {exc}"


def preload(modules: Iterable[str]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException as exc:  # noqa: BLE001 - reported whole, then re-raised as ours
            raise AppImportError(f"preload {name}", summarize(exc), traceback.format_exc()) from exc


def stray_threads() -> list[str]:
    """Threads other than the main one, running in the manager after the preload. A fork
    copies only the thread that forks: a lock another thread holds at that moment (logging's,
    a connection pool's) stays held in the worker for good, and its first use hangs."""
    import threading
    return [t.name for t in threading.enumerate() if t is not threading.main_thread()]


def load_app(spec: str) -> WSGIApp:
    """Import `module:callable` and return the callable."""
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except BaseException as exc:  # noqa: BLE001 - any failure of user code is reported
        raise AppImportError(f"application {spec}", summarize(exc), traceback.format_exc()) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            if exc.obj is not obj or exc.name != part:  # raised inside a module __getattr__
                raise AppImportError(f"application {spec}", summarize(exc), traceback.format_exc()) from exc
            # a typo or a renamed callable: said plainly, without a traceback through this
            # function ("AttributeError in .../loader.py:104" sent operators into our code)
            where = getattr(obj, "__file__", None) or getattr(obj, "__name__", repr(obj))
            raise AppImportError(f"application {spec}", f"{part!r} not found in {where}", "",
                                 not_found=True) from None
        except BaseException as exc:  # noqa: BLE001 - a module __getattr__ that failed otherwise
            raise AppImportError(f"application {spec}", summarize(exc), traceback.format_exc()) from exc
    if not callable(obj):
        raise AppImportError(f"application {spec}", f"{attr} is not callable", f"{spec} is {obj!r}\n")
    return obj


def module_exists(name: str) -> bool:
    """Whether `name` can be found, without importing it or its parent packages.

    The manager must not import the application (a reload could not replace
    it), yet a misspelt module should be reported before anything forks.
    """
    parts = name.split(".")
    try:
        spec = importlib.util.find_spec(parts[0])
    except (ImportError, ValueError):
        return False
    for part in parts[1:]:
        if spec is None or spec.submodule_search_locations is None:
            return False
        spec = importlib.machinery.PathFinder.find_spec(part, list(spec.submodule_search_locations))
    return spec is not None
