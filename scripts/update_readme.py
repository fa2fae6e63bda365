"""Rewrite the README's generated tables (options, signals) from the code.

Run `make readme` after changing an option or a signal; tests/test_cli.py fails
while the README is stale.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from fcgidaemon.config import options_markdown
from fcgidaemon.manager import signals_markdown

README = Path(__file__).resolve().parent.parent / "README.md"
TABLES = {"options": options_markdown, "signals": signals_markdown}


def render(text: str) -> str:
    for name, make in TABLES.items():
        pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(\n<!-- {name}:end -->)", re.S)
        if not pattern.search(text):
            sys.exit(f"README.md has no <!-- {name}:begin/end --> markers")
        text = pattern.sub(lambda m: m.group(1) + make() + m.group(2), text)
    return text


if __name__ == "__main__":
    README.write_text(render(README.read_text()))
