"""--share-stdlib: the manager imports the standard-library modules its workers imported.

Each worker imports the application after the fork, and with it whatever part of the
standard library the application uses: email, http, decimal, json, ssl and the rest, a
copy in every worker (an application importing 30 common standard modules: 12.7 MB of
private memory per worker, against 7.3 MB once its manager had imported them; bench/). The standard
library is as immutable as a --preload module (a deploy never changes it), so the manager
imports what its workers report, and every worker it forks afterwards (the next
generation, replacements) shares those pages. Never application or third-party code: a
deploy may change those, and the manager must not hold them (is_stdlib, _StandardOnly).

A mixin of the manager: reports arrive as worker messages; the imports run from the loop
while the pool is RUNNING (not in the middle of a reload, whose timing they would
stretch), a few milliseconds at a time.
"""

from __future__ import annotations

import gc
import importlib
import importlib.machinery
import logging
import os
import sys
import time
import types
from contextlib import contextmanager

from .states import ENDING, Phase

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterable, Iterator

log = logging.getLogger("fcgidaemon")

SLICE = 0.02  # seconds of importing per turn of the loop
# Standard modules with effects beyond being imported (printing, a browser, the terminal, a GUI,
# a test run): a worker's application may import them; the manager never does.
NEVER_SHARED = frozenset({"__main__", "__mp_main__", "antigravity", "this", "readline", "rlcompleter",
                          "tkinter", "_tkinter", "turtle", "turtledemo", "idlelib", "test", "site",
                          "sitecustomize", "usercustomize"})
NEVER_PART = frozenset({"__main__", "test", "tests", "idle_test"})  # unittest.__main__ exits
STDLIB_DIR = os.path.dirname(os.path.realpath(os.__file__))  # lib-dynload lies inside it
THIRD_PARTY = ("site-packages", "dist-packages")  # inside STDLIB_DIR when Python is not a venv's


def is_stdlib(name: str, origin: str | None) -> bool:
    """Whether module `name`, loaded from `origin`, is the standard library's own: its name is
    one, and it is built in or comes from the interpreter's library directory (not an app's
    file that shadows a standard name, nor a third-party package, which a deploy may change)."""
    parts = name.split(".")
    if parts[0] not in sys.stdlib_module_names or parts[0] in NEVER_SHARED or \
            not all(part.isidentifier() for part in parts) or NEVER_PART.intersection(parts):
        return False
    if origin in ("built-in", "frozen"):
        return True
    path = os.path.realpath(origin) if origin else ""
    return path.startswith(STDLIB_DIR + os.sep) and \
        path[len(STDLIB_DIR) + 1:].partition(os.sep)[0] not in THIRD_PARTY


def origin_of(module: object) -> str | None:
    """Where a module in sys.modules was loaded from, without an attribute lookup on it: a lazy
    module (importlib.util.LazyLoader) would load on one, and could raise."""
    if not isinstance(module, types.ModuleType):
        return None
    spec = types.ModuleType.__getattribute__(module, "__dict__").get("__spec__")
    return spec.origin if isinstance(spec, importlib.machinery.ModuleSpec) else None


def newest_module() -> str | None:
    """The name last added to sys.modules, which keeps the order modules were imported in."""
    return next(reversed(sys.modules), None)


def stdlib_imported(after: str | None) -> list[str]:
    """In a worker: the standard-library modules imported since module `after` was (see
    newest_module). Read newest first and only back to `after`: touching every module object,
    even to read it, copies the pages the worker shares with its manager (0.1 MB a worker)."""
    names = []
    for name in reversed(sys.modules):
        if name == after:
            break
        names.append(name)
    return sorted(name for name in names if is_stdlib(name, origin_of(sys.modules.get(name))))


def share_stdlib(names: list[str], deadline: float) -> tuple[list[str], list[str], list[str]]:
    """In the manager: import the standard-library modules `names` (sorted: a package before
    its modules) that its workers reported, until `deadline`. Every worker forked afterwards
    finds them imported and shares their pages, instead of importing a copy of its own.

    Every module imported meanwhile, even one a standard module imports in turn, must be one of
    `names` that this process finds in the library itself (_StandardOnly), or the import fails:
    an application file that shadows a standard name never runs here. Returns (imported,
    refused, not reached before the deadline)."""
    before = set(sys.modules)
    refused: list[str] = []
    rest: list[str] = []
    with _standard_only(set(names)):
        for i, name in enumerate(names):
            if time.monotonic() >= deadline:
                rest = [name for name in names[i:] if name not in sys.modules]
                break
            if name in sys.modules:  # imported already, by a module before it
                continue
            try:
                importlib.import_module(name)
            except BaseException as exc:  # noqa: BLE001 - SystemExit too: a report must never
                log.debug("not sharing %s: %s", name, exc)  # stop the manager
                refused.append(name)
    return sorted(set(sys.modules) - before), refused, rest


class _StandardOnly:
    """First on sys.meta_path while the manager imports what workers reported."""

    def __init__(self, allowed: set[str]) -> None:
        self.allowed = allowed

    def find_spec(self, name: str, path: object = None, target: object = None) -> object:
        if name not in self.allowed:
            raise ImportError(f"{name}: not reported by a worker")
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                if not is_stdlib(name, spec.origin):
                    raise ImportError(f"{name}: found at {spec.origin}, not the standard library")
                return spec
        return None


@contextmanager
def _standard_only(allowed: set[str]) -> Iterator[None]:
    guard = _StandardOnly(allowed)
    sys.meta_path.insert(0, guard)
    try:
        yield
    finally:
        sys.meta_path.remove(guard)


def unshadow(shared: Iterable[str]) -> list[str]:
    """In a worker, before the application is imported: a deploy may have added a module of the
    application's named like a standard one the manager shares. The application's must win, as
    it would without sharing, so the shared one is dropped from this worker's sys.modules (the
    standard modules that imported it keep their reference to it)."""
    dropped = []
    for top in sorted({name.partition(".")[0] for name in shared}):
        if origin_of(sys.modules.get(top)) in ("built-in", "frozen", None):
            continue  # found before any file on sys.path: nothing can shadow it
        spec = importlib.machinery.PathFinder.find_spec(top)  # sys.path's order, as an import
        if spec is not None and not is_stdlib(top, spec.origin):
            for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
                del sys.modules[name]
            dropped.append(top)
    return dropped


class StdlibSharing:
    """Manager state and methods for --share-stdlib."""

    stdlib_wanted: set[str]  # reported, not yet imported or refused
    stdlib_known: set[str]  # imported or refused: never tried again
    stdlib_shared: set[str]  # imported: each worker checks that its application does not shadow them
    stdlib_counts: list[int]  # [imported, refused] in the batch under way

    def _init_sharing(self) -> None:
        self.stdlib_wanted, self.stdlib_known, self.stdlib_counts = set(), set(), [0, 0]
        self.stdlib_shared = set()

    def _on_stdlib_report(self, names: list[str]) -> None:
        if self.config.share_stdlib and self.phase not in ENDING:  # what it has is not wanted
            self.stdlib_wanted.update(name for name in names
                                      if name not in self.stdlib_known and name not in sys.modules)

    @property
    def _sharing_due(self) -> bool:
        return bool(self.stdlib_wanted) and self.phase is Phase.RUNNING and self.upgrade is None

    def _share_stdlib(self) -> None:
        imported, refused, rest = share_stdlib(sorted(self.stdlib_wanted), time.monotonic() + SLICE)
        self.stdlib_known.update(imported, refused)
        self.stdlib_shared.update(imported)
        self.stdlib_wanted = set(rest)
        self.stdlib_counts[0] += len(imported)
        self.stdlib_counts[1] += len(refused)
        if rest:
            return
        done, skipped = self.stdlib_counts
        self.stdlib_counts = [0, 0]
        if done:
            gc.collect()
            # as at start: the collector never writes to what the workers share. What else is
            # alive now is frozen too; a freeze comes only with modules new here: bounded
            gc.freeze()
        if done or skipped:
            log.info("imported %d standard-library modules the workers use; workers started from "
                     "now on share them (%d not shared; %d in all)", done, skipped,
                     len(self.stdlib_known))
