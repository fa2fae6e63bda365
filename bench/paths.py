"""Where things are: the repository, the bench tree and its git-ignored work area."""

from __future__ import annotations

import os
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORK = BENCH / "work"  # git-ignored: venv, binaries, configs, logs, generated modules
APPS = BENCH / "apps"
RESULTS = BENCH / "results"
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() \
    else sys.executable
PEER_VENV = WORK / "venv"
UWSGI = PEER_VENV / "bin" / "uwsgi"
C_SOURCE = BENCH / "c" / "hello.c"
PHP_APP = APPS / "hello.php"
PHP_FPM = "/usr/sbin/php-fpm8.2"  # Debian 12's PHP
C_BINARY = WORK / "hello-fcgi"
HEAVY = WORK / "heavy"
FCGIDAEMON_SRC: Path | None = None  # set by source.use(): a snapshot to run instead of src/
STATIC = WORK / "static"

# variables that would make a server talk to systemd or adopt sockets instead of binding
_SYSTEMD_VARS = ("JOURNAL_STREAM", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                 "INVOCATION_ID", "WATCHDOG_USEC", "WATCHDOG_PID")


def fcgidaemon_env(**extra: str) -> dict[str, str]:
    """clean_env() plus the snapshot of fcgidaemon, if one was chosen, first on PYTHONPATH."""
    if FCGIDAEMON_SRC is not None:
        extra["PYTHONPATH"] = os.pathsep.join(filter(None, (str(FCGIDAEMON_SRC),
                                                            extra.get("PYTHONPATH"))))
    return clean_env(**extra)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _SYSTEMD_VARS and k != "PYTHONPATH"
           and not k.startswith(("FCGIDAEMON_", "FCGI_", "UWSGI_"))}
    env.update(extra)
    return env
