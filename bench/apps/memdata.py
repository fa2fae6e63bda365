"""~50 MB of ordinary Python objects (dicts and lists of strings), built at import."""

from __future__ import annotations

import os

ENTRIES = int(os.environ.get("BENCH_MEM_ENTRIES", "40000"))
PER_ENTRY = 10


def _build(entries: int) -> dict[str, list[str]]:
    return {f"key-{i:07d}": [f"value {i:07d}/{j:02d} of the preloaded table" for j in range(PER_ENTRY)]
            for i in range(entries)}


TABLE = _build(ENTRIES)
KEYS = list(TABLE)
