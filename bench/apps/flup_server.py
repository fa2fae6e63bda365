"""Run a WSGI app under flup6's preforking FastCGI server (the peer being compared).

Usage: python flup_server.py MODULE:CALLABLE HOST PORT WORKERS
minSpare = maxSpare = maxChildren = WORKERS, so flup keeps exactly WORKERS children.
"""

from __future__ import annotations

import importlib
import sys

from flup.server.fcgi_fork import WSGIServer


def main(argv: list[str]) -> int:
    spec, host, port, workers = argv[0], argv[1], int(argv[2]), int(argv[3])
    module, _, attr = spec.partition(":")
    app = getattr(importlib.import_module(module), attr or "application")
    server = WSGIServer(app, bindAddress=(host, port), debug=False,
                        minSpare=workers, maxSpare=workers, maxChildren=workers)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
