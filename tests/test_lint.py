"""Static checks: no undefined names, unused imports or syntax errors in the package."""

from __future__ import annotations

import subprocess
import sys

from daemon import ROOT


def test_ruff_pyflakes_clean():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F,E9", "--no-cache",
                          str(ROOT / "src"), str(ROOT / "bench")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
