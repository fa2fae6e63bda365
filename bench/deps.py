"""Install what the benchmark needs: Debian packages, the peers' venv, the C server."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Callable

import paths

APT = {  # command or file that must exist -> Debian package
    "/usr/sbin/nginx": "nginx",
    "/usr/sbin/apache2": "apache2",
    "/usr/lib/apache2/modules/mod_proxy_fcgi.so": "apache2",
    "/usr/bin/wrk": "wrk",
    "/usr/include/fcgiapp.h": "libfcgi-dev",
    "/usr/bin/gcc": "gcc",
    "/usr/bin/git": "git",
    paths.PHP_FPM: "php-fpm",
}


class DepsError(RuntimeError):
    pass


def ensure_all(progress: Callable[[str], None]) -> None:
    ensure_apt(progress)
    ensure_peer_venv(progress)
    ensure_c_server(progress)
    ensure_flup()


def ensure_apt(progress: Callable[[str], None]) -> None:
    missing = sorted({pkg for path, pkg in APT.items() if not os.path.exists(path)})
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise DepsError(f"missing Debian packages (install as root): {' '.join(missing)}")
    progress(f"installing Debian packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env, timeout=1200,
                   stdout=subprocess.DEVNULL)
    # the packages start system services we do not use
    for unit in ("nginx", "apache2", "php8.2-fpm"):
        subprocess.run(["sh", "-c", f"command -v systemctl >/dev/null && systemctl stop {unit} "
                        f"|| service {unit} stop"], capture_output=True, timeout=60)


def ensure_peer_venv(progress: Callable[[str], None]) -> None:
    """uWSGI in its own venv under bench/work (git-ignored): the wheel of pyuwsgi, else uwsgi."""
    if paths.UWSGI.exists():
        return
    progress(f"creating {paths.PEER_VENV} with uWSGI")
    subprocess.run([paths.PYTHON, "-m", "venv", str(paths.PEER_VENV)], check=True, timeout=300)
    pip = [str(paths.PEER_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    if subprocess.run([*pip, "pyuwsgi"], timeout=900).returncode != 0:
        subprocess.run([*pip, "uwsgi"], check=True, timeout=1800)
    if not paths.UWSGI.exists():
        raise DepsError(f"uWSGI installed but {paths.UWSGI} is missing")


def ensure_c_server(progress: Callable[[str], None]) -> None:
    binary, source = paths.C_BINARY, paths.C_SOURCE
    if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
        return
    progress(f"compiling {source.relative_to(paths.ROOT)}")
    binary.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(binary), str(source), "-lfcgi"],
                   check=True, timeout=120)


def ensure_flup() -> None:
    done = subprocess.run([paths.PYTHON, "-c", "import flup.server.fcgi_fork, fcgidaemon"],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise DepsError(f"{paths.PYTHON} cannot import flup6 and fcgidaemon (run `make deps`):\n"
                        f"{done.stderr[-500:]}")
