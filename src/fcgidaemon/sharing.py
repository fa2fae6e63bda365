"""--share-stdlib: the manager imports the standard-library modules its workers imported.

Each worker imports the application after the fork, and with it whatever part of the
standard library the application uses: email, http, decimal, json, ssl and the rest, a
copy in every worker (an application importing 30 common standard modules: 12.1 MB of
private memory per worker, against 3.7 MB once its manager had imported them). The standard
library is as immutable as a --preload module (a deploy never changes it), so the manager
imports what its workers report, and every worker it forks afterwards (the next
generation, replacements) shares those pages. Never application or third-party code: a
deploy may change those, and the manager must not hold them (loader.is_stdlib).

A mixin of the manager: reports arrive as worker messages; the imports run from the loop
while the pool is RUNNING (not in the middle of a reload, whose timing they would
stretch), a few milliseconds at a time.
"""

from __future__ import annotations

import gc
import logging
import time

from . import loader
from .states import ENDING, Phase

log = logging.getLogger("fcgidaemon")

SLICE = 0.02  # seconds of importing per turn of the loop


class StdlibSharing:
    """Manager state and methods for --share-stdlib."""

    stdlib_wanted: set[str]  # reported, not yet imported or refused
    stdlib_known: set[str]  # imported or refused: never tried again
    stdlib_counts: list[int]  # [imported, refused] in the batch under way

    def _init_sharing(self) -> None:
        self.stdlib_wanted, self.stdlib_known, self.stdlib_counts = set(), set(), [0, 0]

    def _on_stdlib_report(self, names: list[str]) -> None:
        if self.config.share_stdlib and self.phase not in ENDING:
            self.stdlib_wanted.update(name for name in names if name not in self.stdlib_known)

    @property
    def _sharing_due(self) -> bool:
        return bool(self.stdlib_wanted) and self.phase is Phase.RUNNING and self.upgrade is None

    def _share_stdlib(self) -> None:
        imported, refused, rest = loader.share_stdlib(sorted(self.stdlib_wanted),
                                                      time.monotonic() + SLICE)
        self.stdlib_known.update(imported, refused)
        self.stdlib_wanted = set(rest)
        self.stdlib_counts[0] += len(imported)
        self.stdlib_counts[1] += len(refused)
        if rest:
            return
        gc.collect()
        gc.freeze()  # as at start: the collector never writes to what the workers share
        done, skipped = self.stdlib_counts
        self.stdlib_counts = [0, 0]
        if done or skipped:
            log.info("imported %d standard-library modules the workers use; workers started from "
                     "now on share them (%d not shared; %d in all)", done, skipped,
                     len(self.stdlib_known))
