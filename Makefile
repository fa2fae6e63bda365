# Two commands do everything from a fresh clone: `make run` and `make test`.
# Both install what they need (Debian packages as root, the venv, the package).
PYTHON ?= python3
BIND   ?= 127.0.0.1:9005
VENV   := .venv
PY     := $(VENV)/bin/python
# python3-venv and python3-dev: a plain Debian 12 python3 has no ensurepip and no Python.h,
# and systemd-python and our C decoder (src/fcgidaemon/_speedups.c, with gcc) are built from source
APT_PACKAGES := python3-venv python3-dev apache2 nginx libfcgi-bin libfcgi-dev libsystemd-dev pkg-config gcc wrk curl
STAMP_APT := $(VENV)/.apt-stamp
STAMP_PIP := $(VENV)/.pip-stamp

.PHONY: all deps run test bench clean readme

all: deps

$(STAMP_APT):
	@mkdir -p $(VENV)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    missing=""; for p in $(APT_PACKAGES); do \
	        dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' \
	            || missing="$$missing $$p"; done; \
	    if [ -n "$$missing" ]; then \
	        echo "installing Debian packages:$$missing"; \
	        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	    fi; \
	else echo "not root or no apt-get: assuming $(APT_PACKAGES) are installed"; fi
	@touch $@

$(STAMP_PIP): $(STAMP_APT) pyproject.toml setup.py src/fcgidaemon/_speedups.c
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

deps: $(STAMP_PIP)

run: deps
	$(VENV)/bin/fcgidaemon examples.hello:application --bind $(BIND) --workers 4

test: deps
	$(PY) -m pytest -q tests

bench: deps
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache src/fcgidaemon/_speedups.*.so

readme: deps
	$(PY) scripts/update_readme.py
