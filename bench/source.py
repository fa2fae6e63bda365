"""Which fcgidaemon is measured: the working tree, or a snapshot of a git revision.

``--rev REV`` exports ``src/fcgidaemon`` at REV with ``git archive`` into
bench/work/src/<sha>/ and puts that directory first on the PYTHONPATH of every
fcgidaemon process (and of micro.py), ahead of the editable install.  The
results then name an exact commit, and edits made to src/ while the benchmark
runs cannot reach it.

Whatever is measured runs from bytecode, as an installed package does (pip
compiles what it installs): PYTHONDONTWRITEBYTECODE is set on these machines,
and without .pyc files every start compiles the package from source, whose
garbage stays resident in the manager and is shared into each worker's memory
(per-worker PSS 5.74 -> 5.30 MB with bytecode, hello app, 4 workers).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import paths


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(paths.ROOT), *args], check=True, capture_output=True,
                          text=True, timeout=60).stdout.strip()


def snapshot(rev: str) -> tuple[Path, str]:
    """Export src/fcgidaemon at `rev`; returns (directory to put on PYTHONPATH, full sha)."""
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    dest = paths.WORK / "src" / sha[:12]
    if not (dest / "fcgidaemon" / "__init__.py").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(paths.ROOT), "archive", sha, "src/fcgidaemon"],
                                 check=True, capture_output=True, timeout=60).stdout
        subprocess.run(["tar", "-x", "--strip-components=1", "-C", str(dest)], input=archive,
                       check=True, timeout=60)
    return dest, sha


def build_speedups(dest: Path) -> None:
    """Compile the snapshot's C speedups (fcgidaemon/_speedups.c) next to its sources, as
    `pip install` does for the working tree: without it the snapshot would silently measure the
    pure-Python fallback. Revisions from before the C speedups have none to build."""
    if not (dest / "fcgidaemon" / "_speedups.c").exists():
        return
    script = ("from setuptools import Extension, setup; setup(name='fcgidaemon-snapshot', "
              "ext_modules=[Extension('fcgidaemon._speedups', ['fcgidaemon/_speedups.c'])], "
              "script_args=['-q', 'build_ext', '--inplace', '--build-temp', 'build'])")
    subprocess.run([paths.PYTHON, "-c", script], cwd=dest, check=True, capture_output=True,
                   timeout=300)


def compile_bytecode(*dirs: Path) -> None:
    """Write the .pyc files of everything under `dirs`, as an installed package has them."""
    subprocess.run([paths.PYTHON, "-m", "compileall", "-q", *map(str, dirs)], check=True,
                   timeout=300)


def use(rev: str | None) -> str:
    """Select what is measured; returns a description for the report."""
    if rev is None:
        paths.FCGIDAEMON_SRC = None
        compile_bytecode(paths.ROOT / "src" / "fcgidaemon")
        sha = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--", "src")
        return (f"{sha} (working tree{', with uncommitted changes in src/' if dirty else ''}"
                f"{_decoder(paths.ROOT / 'src')})")
    paths.FCGIDAEMON_SRC, sha = snapshot(rev)
    build_speedups(paths.FCGIDAEMON_SRC)
    compile_bytecode(paths.FCGIDAEMON_SRC)
    return f"{sha[:12]} (snapshot of {rev}{_decoder(paths.FCGIDAEMON_SRC)})"


def _decoder(tree: Path) -> str:
    """Whether the measured tree runs its C speedups: said in the report's versions line."""
    package = tree / "fcgidaemon"
    if not (package / "_speedups.c").exists():
        return ""
    return ", C speedups" if any(package.glob("_speedups.*.so")) else ", pure Python (C speedups not built)"
