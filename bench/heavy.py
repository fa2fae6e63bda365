"""Synthesise a heavy application: a package of ~300 modules with some code each.

Each module has what application modules have at import: a dataclass, an enum,
a class with methods, compiled regular expressions, a table built at import and
a few plain functions, and imports its predecessor.  The package is written
under bench/work/heavy/ (git-ignored), byte-compiled (a deployed app has its
.pyc files), and rewritten only when its shape changes.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import paths

PACKAGE = "heavypkg"
APP_MODULE = "heavyapp"
VERSION = "4"  # bump when the template changes

MODULE = '''"""Synthetic module {i} of {n}."""
import dataclasses
import enum
import re
{import_prev}

PATTERNS = [re.compile(r"^/m{i}/(?P<id>\\d+)/(?P<slug>[a-z-]+)/v" + str(k) + "$") for k in range(4)]
TABLE = {{f"k{i}-{{j}}": (j * {i}) % 97 for j in range(200)}}


class Kind{i}(enum.Enum):
{enum_members}


@dataclasses.dataclass(frozen=True)
class Record{i}:
{fields}

    def total(self) -> int:
        return {field_sum}


class Service{i}:
    """Something with state and methods."""

    def __init__(self, name: str = "s{i}") -> None:
        self.name = name
        self.calls = 0
{methods}

{functions}
'''


def module_text(i: int, n: int) -> str:
    prev = f"from . import m{i - 1:03d}  # noqa: F401" if i else ""
    enum_members = "\n".join(f"    V{k} = {k}" for k in range(12))
    fields = "\n".join(f"    f{k}: int = {k}" for k in range(12))
    field_sum = " + ".join(f"self.f{k}" for k in range(12))
    methods = "\n".join(
        f"\n    def op{k}(self, x: int, y: int = {k}) -> int:\n"
        f"        self.calls += 1\n"
        f"        if x > y:\n            return (x * {k + 1}) // (y + 1)\n"
        f"        return sum(range(y - x)) + TABLE.get(f\"k{i}-{{x}}\", 0)"
        for k in range(20))
    functions = "\n\n".join(
        f"def helper{k}(items: list[int]) -> dict[str, int]:\n"
        f"    out = {{}}\n"
        f"    for pos, item in enumerate(items):\n"
        f"        if PATTERNS[{k % 4}].match(str(item)):\n"
        f"            out[str(pos)] = item * {k}\n"
        f"    return out"
        for k in range(15))
    return MODULE.format(i=i, n=n, import_prev=prev, enum_members=enum_members, fields=fields,
                         field_sum=field_sum, methods=methods, functions=functions)


APP = '''"""A WSGI app whose import pulls in the whole synthetic package."""
import {package}

MODULES = {package}.COUNT


def application(environ, start_response):
    body = b"Hello, world\\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
'''


def generate(root: Path, count: int = 300) -> Path:
    """Write the package and the app under `root`; returns `root` (for --pythonpath)."""
    stamp = root / ".stamp"
    want = hashlib.sha256(f"{VERSION}:{count}".encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        return root
    shutil.rmtree(root, ignore_errors=True)
    pkg = root / PACKAGE
    pkg.mkdir(parents=True)
    for i in range(count):
        (pkg / f"m{i:03d}.py").write_text(module_text(i, count))
    imports = "\n".join(f"from . import m{i:03d}  # noqa: F401" for i in range(count))
    (pkg / "__init__.py").write_text(f'"""{count} synthetic modules."""\n{imports}\n\nCOUNT = {count}\n')
    (root / f"{APP_MODULE}.py").write_text(APP.format(package=PACKAGE))
    # bytecode as a deployed app has it (PYTHONDONTWRITEBYTECODE may be set here)
    subprocess.run([paths.PYTHON, "-m", "compileall", "-q", str(root)], check=True, timeout=600)
    stamp.write_text(want)
    return root
