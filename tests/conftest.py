"""Fixtures shared by the suite: a factory for real daemons, each torn down by pid."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from daemon import Daemon  # noqa: E402


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator:
    started: list[Daemon] = []

    def start(app: str = "testapp:application", *args: str, **kw) -> Daemon:
        d = Daemon(tmp_path, app, args, **kw)
        started.append(d)
        return d

    yield start
    failed = []
    for d in started:  # one that fails to stop must not leave the others running
        try:
            d.stop()
        except Exception as exc:  # noqa: BLE001 - reported below, after every stop was tried
            failed.append(repr(exc))
    assert not failed, failed
