"""Only the C extension is declared here; everything else is in pyproject.toml.

`optional=True`: without a C compiler or Python's headers the build warns and goes on, and
fcgidaemon.fastcgi falls back to its pure-Python decoder (same results, slower).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("fcgidaemon._speedups", ["src/fcgidaemon/_speedups.c"], optional=True)])
