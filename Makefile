# ctbridge — `make demo` and `make test` set up everything they need on a Debian 12 machine (as root).

# Debian 12's own interpreter when present: the one the Debian package runs under.
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
VENV := .venv
PY := $(VENV)/bin/python
# Debian packages the tests and the demo use: the kernel's conntrack table is driven and witnessed
# through these tools, and the lab runs real keepalived and nftables.
APT_PACKAGES := conntrack conntrackd keepalived nftables iproute2 iputils-ping python3 python3-venv python3-pip \
	$(DEB_BUILD_PACKAGES) $(DEB_RUNTIME_PACKAGES)
# Building the Debian package (make deb, and the package test), and what the package depends on:
# Debian's own python3-pyroute2 (0.7.2 in Debian 12), jinja2 and psutil.
DEB_BUILD_PACKAGES := dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools lintian
DEB_RUNTIME_PACKAGES := python3-pyroute2 python3-jinja2 python3-psutil adduser
MYPY_MODULES := ctbridge/ctnetlink.py ctbridge/codec.py ctbridge/kernel.py ctbridge/view.py \
	ctbridge/wire.py ctbridge/engine.py ctbridge/sequence.py ctbridge/filter.py \
	ctbridge/cluster.py ctbridge/render.py ctbridge/gate.py

.PHONY: all deps venv lint test unit demo bench deb clean

all: test

deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@# keepalived and conntrackd must not run as system services on a test machine
	@-systemctl disable --now keepalived conntrackd >/dev/null 2>&1 || true

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv --clear $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check ctbridge tests bench
	$(VENV)/bin/mypy $(MYPY_MODULES)

test: deps venv lint
	$(VENV)/bin/pytest -q -p no:cacheprovider

unit: venv
	$(VENV)/bin/pytest -q -p no:cacheprovider -m "not root"

demo: deps venv
	$(PY) -m ctbridge.demo

bench: deps venv
	$(PY) bench/kernel.py
	$(PY) bench/engine.py --conntrackd

deb: deps
	packaging/build-deb
	lintian --fail-on error build/deb/*.deb

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
