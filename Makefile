# Whole set-up on a fresh Debian/Ubuntu machine: `make demo` (main job) and `make test`.
# System packages are installed with apt when running as root (or via sudo when available);
# Python dependencies go into ./.venv.

SHELL := /bin/bash
# The system interpreter, not one under root's home (pyenv): the venv must be runnable by every
# user, since the security tests run the CLI as a second, unprivileged user (docs/SECURITY.md).
PY ?= /usr/bin/python3
VENV := .venv
BIN := $(VENV)/bin
# fuse3/libfuse3-dev/pkg-config: the mount (pyfuse3 builds from source against libfuse3).
# age, gocryptfs: peers for bench/. softhsm2: PKCS#11 peer and tests. rsync, attr: mount tests.
# xxd: the addendum key-caching script (tests/keysvc).
# restic, borgbackup, rsync, tar: copies of a live store in tests/backup (docs/BACKUP.md).
# Hardware roots of trust (docs/HARDWARE.md): libtss2-dev to build tpm2-pytss, swtpm to test it;
# pcscd + libpcsclite-dev + swig to build pyscard, vsmartcard-vpcd for the tests' virtual card.
# Signing formats (README "SSH signatures and minisign", "ssh-agent and git"): ssh-keygen, sshd, git, minisign and signify
# verify what vhsm signs in tests.
APT_PACKAGES := build-essential python3-dev python3-venv fuse3 libfuse3-dev pkg-config \
	age gocryptfs rsync attr softhsm2 openssl util-linux procps xxd patch \
	restic borgbackup tar \
	libtss2-dev swtpm swtpm-tools pcscd libpcsclite-dev swig vsmartcard-vpcd \
	openssh-client openssh-server git minisign signify-openbsd
SUDO := $(shell [ "$$(id -u)" = 0 ] && echo "" || (command -v sudo >/dev/null && echo sudo))

.PHONY: all deps apt apt-install venv demo test test-all lint bench clean install man

all: venv

apt:
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(BIN)/vhsm: pyproject.toml contrib/pyfuse3/install.sh contrib/pyfuse3/nogil-copies.patch | apt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# pyfuse3 3.5.0 from PyPI's source release plus one patch (see contrib/pyfuse3/install.sh)
	bash contrib/pyfuse3/install.sh $(BIN)/pip
	$(BIN)/pip install -q -e '.[test,hardware,mount]'
	@touch $@

venv: apt $(BIN)/vhsm

deps: venv

demo: venv
	@bash contrib/demo.sh

test: venv
	$(BIN)/ruff check vhsmfs keysvc cli tests tools bench $(wildcard bench/*)
	$(BIN)/ruff format --check vhsmfs keysvc cli tests tools bench $(wildcard bench/*)
	$(BIN)/pytest -q tests

# The whole suite plus the full-size variants (`@pytest.mark.full`, e.g. the backup-consistency
# test at full size), which pyproject.toml's `-m 'not full'` leaves out of every other run.
test-all: venv
	$(BIN)/ruff check vhsmfs keysvc cli tests tools bench $(wildcard bench/*)
	$(BIN)/ruff format --check vhsmfs keysvc cli tests tools bench $(wildcard bench/*)
	$(BIN)/pytest -q -m "" tests

lint: venv
	$(BIN)/ruff check vhsmfs keysvc cli tests tools bench $(wildcard bench/*)
	$(BIN)/ruff format --check vhsmfs keysvc cli tests tools bench $(wildcard bench/*)

bench: venv
	$(BIN)/python bench/token_vs_age
	$(BIN)/python bench/mount_vs_gocryptfs
	$(BIN)/python bench/sign_throughput

# --- deployment (docs/DEPLOY.md) -------------------------------------------------------------
# `make install [PREFIX=/opt/vhsm] [EXTRAS=mount,hardware] [BINDIR=...]`: a virtualenv at PREFIX
# built from the system interpreter (never one under /root: every user must be able to run it),
# a non-editable install of this package, every file world-readable (0755/0644, never
# group/world-writable), man pages under PREFIX/share/man, and the contrib files (units, policy
# example, harden.sh) under PREFIX/share/vhsm. EXTRAS= (empty) is a signing-only install: no
# FUSE, no compiler. With the default PREFIX, `vhsm` and `hsm_enhanced` are linked into
# /usr/local/bin and the man pages into /usr/local/share/man; BINDIR=/MANLINKDIR= set or clear
# those links for any PREFIX.
PREFIX ?= /opt/vhsm
EXTRAS ?= mount,hardware
BINDIR ?= $(if $(filter /opt/vhsm,$(PREFIX)),/usr/local/bin)
MANLINKDIR ?= $(if $(filter /opt/vhsm,$(PREFIX)),/usr/local/share/man/man1)
# What building the install needs (not the test peers `apt` adds): pyfuse3 builds against
# libfuse3, tpm2-pytss against libtss2, pyscard against libpcsclite with swig.
INSTALL_APT := python3-venv fuse3 \
	$(if $(findstring mount,$(EXTRAS)),build-essential python3-dev libfuse3-dev pkg-config patch) \
	$(if $(findstring hardware,$(EXTRAS)),build-essential python3-dev libtss2-dev libpcsclite-dev swig pcscd)

apt-install:
	@$(MAKE) --no-print-directory apt APT_PACKAGES="$(sort $(INSTALL_APT))"

install: apt-install
	@case "$$(realpath -m $(PY))" in /root/*|/home/*) \
		echo "error: PY=$(PY) lives in a home directory other users cannot run; use /usr/bin/python3" >&2; \
		exit 1;; esac
	umask 022 && $(PY) -m venv $(PREFIX)
	# pyfuse3 with contrib/pyfuse3's patch first, so that `.[mount]` finds it installed
	umask 022 && if [[ ",$(EXTRAS)," == *,mount,* ]]; then \
		bash contrib/pyfuse3/install.sh $(PREFIX)/bin/pip; fi
	umask 022 && $(PREFIX)/bin/pip install -q --no-warn-script-location \
		'.$(if $(EXTRAS),[$(EXTRAS)])'
	umask 022 && $(PREFIX)/bin/python tools/gen_man.py $(PREFIX)/share/man/man1 >/dev/null
	umask 022 && mkdir -p $(PREFIX)/share/vhsm && \
		cp -R contrib/keysvc contrib/mount contrib/hardening LICENSE $(PREFIX)/share/vhsm/
	# whatever umask pip or an earlier run had: readable by all, writable by root only
	chmod -R u+rwX,go+rX,go-w $(PREFIX)
	@if [ -n "$(BINDIR)" ]; then mkdir -p $(BINDIR) && \
		ln -sfn $(PREFIX)/bin/vhsm $(BINDIR)/vhsm && \
		ln -sfn $(PREFIX)/bin/hsm_enhanced $(BINDIR)/hsm_enhanced && \
		echo "linked vhsm and hsm_enhanced into $(BINDIR)"; fi
	@if [ -n "$(MANLINKDIR)" ]; then mkdir -p $(MANLINKDIR) && \
		for f in $(PREFIX)/share/man/man1/*.1; do ln -sfn "$$f" $(MANLINKDIR)/; done; fi
	@echo "installed vhsm in $(PREFIX) (extras: $(or $(EXTRAS),none: signing only))"

# man/*.1 from the click commands (tools/gen_man.py); `make install` writes its own copy.
man: venv
	$(BIN)/python tools/gen_man.py man

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
