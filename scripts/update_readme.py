"""Rewrite the README's generated tables (options, signals) from the code, and the
latest benchmark table from bench/results/latest.md.

Run `make readme` after changing an option or a signal, or after `make bench`;
tests/test_cli.py fails while the README is stale.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from fcgidaemon.config import options_markdown
from fcgidaemon.manager import signals_markdown

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
LATEST = ROOT / "bench" / "results" / "latest.md"


def bench_markdown() -> str:
    """The latest full run's date, machine, versions and settings, and its hello table."""
    lines = LATEST.read_text().splitlines()
    head = [line for line in lines[:12] if line.startswith("- ")]
    start = lines.index(next(line for line in lines if line.startswith("### hello")))
    table = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        table.append(line)
    date = lines[0].removeprefix("# fcgidaemon benchmark, ")
    return "\n".join([f"Latest full run, {date} ([bench/results/latest.md](bench/results/latest.md), "
                      "which also has the 64k and 1 MiB POST cases, reload, memory and the "
                      "micro-benchmark):", "", *head, "", lines[start], *table]).rstrip()


TABLES = {"options": options_markdown, "signals": signals_markdown, "bench": bench_markdown}


def render(text: str) -> str:
    for name, make in TABLES.items():
        pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(\n<!-- {name}:end -->)", re.S)
        if not pattern.search(text):
            sys.exit(f"README.md has no <!-- {name}:begin/end --> markers")
        text = pattern.sub(lambda m: m.group(1) + make() + m.group(2), text)
    return text


if __name__ == "__main__":
    README.write_text(render(README.read_text()))
