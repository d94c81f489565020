# splitd — set-up, run, test, bench.
#   make run    install what is missing, start the daemon in the foreground on ./var
#   make test   same install, then the whole test suite
#   make lint   same install, then ruff (style, imports, likely bugs) and mypy (types)
#   make bench  the referee benchmark (splitd vs nbdkit vs qemu-nbd) on tmpfs
#   make crash  many rounds of kill -9 and of power cuts under load, checking every pair's guarantee
#   make powercut  only the power cuts (root, /dev/fuse)
#   make install  install under $(PREFIX) with the systemd unit (as root)
SHELL := /bin/sh
# python3-libnbd installs the `nbd` module for Debian's interpreter only, so the
# virtualenv is made from /usr/bin/python3 with the system site-packages visible.
SYSPYTHON ?= /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
VAR := $(CURDIR)/var
PYTEST_ARGS ?=

.PHONY: all deps venv run test lint bench crash powercut install clean distclean

all: venv

deps:
	@scripts/install-deps

$(VENV)/.installed: pyproject.toml scripts/install-deps
	@scripts/install-deps
	@test -x $(PY) || $(SYSPYTHON) -m venv --system-site-packages $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

run: venv
	@mkdir -p $(VAR)
	@echo "splitd: data in $(VAR); NBD on $(VAR)/nbd.sock and 127.0.0.1:10809; admin on $(VAR)/admin.sock"
	@echo "  try:  nbdinfo 'nbd+unix:///demo?socket=$(VAR)/nbd.sock'"
	@echo "        SPLITD_ADMIN_SOCKET=$(VAR)/admin.sock $(VENV)/bin/splitctl status"
	exec $(VENV)/bin/splitd --data-dir $(VAR) \
		--listen unix:$(VAR)/nbd.sock --listen tcp://127.0.0.1:10809 \
		--admin-socket $(VAR)/admin.sock --ensure-volume demo:1G

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

# Every package we ship, and the tests and tools beside them.
LINT_PATHS := agents common remoteapi daemon controller volumes splitctl nbdwire harness tests bench scripts
TYPED_PATHS := agents common remoteapi daemon controller volumes splitctl nbdwire harness
lint: venv
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/mypy $(TYPED_PATHS)

bench: venv
	$(PY) bench/run.py

# Many rounds of kill -9 during copies, resync and restore, then of power cuts
# (the data directory on a disk that loses unflushed writes; needs root and
# /dev/fuse, else skipped). make test runs a few of each.
CRASH_ROUNDS ?= 50
POWER_ROUNDS ?= 25
crash: venv
	@rc=0; $(PY) scripts/crash.py --rounds $(CRASH_ROUNDS) || rc=1; \
	$(PY) scripts/crash.py --power --rounds $(POWER_ROUNDS) || rc=1; exit $$rc

powercut: venv
	$(PY) scripts/crash.py --power --rounds $(POWER_ROUNDS)

PREFIX ?= /opt/splitd
install:
	@scripts/install-deps
	test -x $(PREFIX)/bin/python || $(SYSPYTHON) -m venv --system-site-packages $(PREFIX)
	$(PREFIX)/bin/python -m pip install -q --disable-pip-version-check .
	ln -sf $(PREFIX)/bin/splitd /usr/local/bin/splitd
	ln -sf $(PREFIX)/bin/splitctl /usr/local/bin/splitctl
	ln -sf $(PREFIX)/bin/splitd-host /usr/local/bin/splitd-host
	install -D -m 0644 systemd/splitd.service /etc/systemd/system/splitd.service
	install -D -m 0644 systemd/splitd.sysusers /usr/lib/sysusers.d/splitd.conf
	test -e /etc/splitd/splitd.toml || install -D -m 0640 systemd/splitd.toml /etc/splitd/splitd.toml
	install -D -m 0644 systemd/splitd-host.service /etc/systemd/system/splitd-host.service
	test -e /etc/splitd-host/splitd-host.toml || install -D -m 0640 systemd/splitd-host.toml /etc/splitd-host/splitd-host.toml
	-systemd-sysusers /usr/lib/sysusers.d/splitd.conf
	-systemctl daemon-reload
	@echo "installed; start with: systemctl enable --now splitd"
	@echo "  on an application host: systemctl enable --now splitd-host"

clean:
	rm -rf .pytest_cache .hypothesis build *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(VAR)
