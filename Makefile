# ctbridge — `make demo` and `make test` set up everything they need on a Debian 12 machine (as root).

# Debian 12's own interpreter when present: the one the Debian package runs under.
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
VENV := .venv
PY := $(VENV)/bin/python
# Every Debian package that `make test`, `make demo`, `make deb` and the package test use, named
# explicitly: a pristine Debian 12 root (.ci/fresh-root, which CI runs) has none of them.
# tests/unit/test_setup.py fails when the code calls a tool that no package here provides.
# The kernel's conntrack table is driven and witnessed through conntrack, the lab runs real
# keepalived and nftables, sysctl (procps) turns forwarding on, ping checks the lab's links; iptables
# (nft's compat layer) adds the NFQUEUE rule the active-active defer needs: this kernel has no nft queue.
TEST_PACKAGES = conntrack conntrackd keepalived nftables iptables iproute2 iputils-ping procps \
	python3 python3-venv python3-pip
# Building the Debian package (make deb, and the package test)
DEB_BUILD_PACKAGES = build-essential dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools lintian
# What the package depends on: Debian's own python3-pyroute2 (0.7.2 in Debian 12), jinja2 and psutil
DEB_RUNTIME_PACKAGES = python3-pyroute2 python3-jinja2 python3-psutil adduser
# bench/profile.py counts the daemons' system calls with perf's tracepoints
BENCH_PACKAGES = linux-perf
APT_PACKAGES = $(TEST_PACKAGES) $(DEB_BUILD_PACKAGES) $(DEB_RUNTIME_PACKAGES) $(BENCH_PACKAGES)
# mypy --strict on the whole package (pyproject.toml's [tool.mypy])
MYPY_MODULES := ctbridge

.PHONY: all deps venv lint test unit demo bench deb fresh-test print-apt-packages clean

all: test

# Setup prints one line per step. apt's and pip's own output goes to a log in build/, shown whole
# when the step fails, or always when CI=true (so that a CI log shows every install).
# $(call step,TITLE,LOG,COMMANDS)
define step
	@mkdir -p build; printf '%s ... ' $(1); \
	if ( $(3) ) >$(2) 2>&1; then echo "done (log: $(2))"; [ "$$CI" != true ] || cat $(2); \
	else echo "failed; the last lines of $(2):"; tail -n 40 $(2); exit 1; fi
endef

deps:
	@mkdir -p build; missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -z "$$missing" ]; then echo "setup: Debian packages: all $(words $(APT_PACKAGES)) installed"; exit 0; fi; \
	printf 'setup: Debian packages: %s ... ' "$$(echo $$missing)"; \
	policy=; if [ ! -e /usr/sbin/policy-rc.d ]; then policy=/usr/sbin/policy-rc.d; \
		printf '#!/bin/sh\nexit 101\n' >$$policy; chmod 755 $$policy; trap 'rm -f $$policy' EXIT; fi; \
	if (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing) \
		>build/apt.log 2>&1; then echo "done (log: build/apt.log)"; [ "$$CI" != true ] || cat build/apt.log; \
	else echo "failed; the last lines of build/apt.log:"; tail -n 40 build/apt.log; exit 1; fi
	@# keepalived and conntrackd must not run as system services on a test machine: the tests and the
	@# lab start their own. policy-rc.d (invoke-rc.d(8)) kept apt from starting them above.
	@-systemctl disable --now keepalived conntrackd >/dev/null 2>&1 || true

$(VENV)/.installed: pyproject.toml
	$(call step,'setup: $(VENV) with ctbridge and its test tools (pip)',build/venv.log,\
		$(PYTHON) -m venv --clear $(VENV) && $(PY) -m pip install --upgrade pip && $(PY) -m pip install -e '.[test]')
	@touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check ctbridge tests bench
	$(VENV)/bin/mypy $(MYPY_MODULES)

test: deps venv lint
	$(VENV)/bin/pytest -q -p no:cacheprovider

unit: venv
	$(VENV)/bin/pytest -q -p no:cacheprovider -m "not root and not lab"

demo: deps venv
	@$(PY) -m ctbridge.lab.demo

bench: deps venv
	$(PY) bench/kernel.py
	$(PY) bench/engine.py --conntrackd

print-apt-packages:
	@echo $(APT_PACKAGES)

# make test in a pristine Debian 12 root built by mmdebstrap, from a clone of HEAD: what CI runs
fresh-test:
	.ci/fresh-root make test

deb: deps
	packaging/build-deb
	lintian --fail-on error build/deb/*.deb

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
