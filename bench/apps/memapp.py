"""An application that holds ~50 MB of Python objects built at import (via memdata).

Each request looks up one entry (so serving touches some of the shared objects'
reference counts, as a real app would) and answers with the worker's pid, which
lets the memory benchmark see how requests spread over the workers.

With BENCH_GC_UNFREEZE=1 it calls gc.unfreeze() at import (in each worker, after
the fork): the preloaded objects go back to the collector's oldest generation, as
if the manager had not frozen them; then one full collection, which a worker that
runs long enough does sooner or later (10,000 requests are not enough to trigger
one), so the memory benchmark can show what the freeze saves.
"""

from __future__ import annotations

import gc
import os
from typing import Any, Callable, Iterable

import memdata

if os.environ.get("BENCH_GC_UNFREEZE") == "1":
    gc.unfreeze()
    gc.collect()

_counter = 0


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    global _counter
    _counter += 1
    entry = memdata.TABLE[memdata.KEYS[_counter % len(memdata.KEYS)]]
    body = f"{os.getpid()} {len(entry)}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
