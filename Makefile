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

.PHONY: all deps apt venv demo test test-all lint bench clean

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
	$(BIN)/pip install -q -e '.[test,hardware]'
	@touch $@

venv: apt $(BIN)/vhsm

deps: venv

demo: venv
	@bash contrib/demo.sh

test: venv
	$(BIN)/ruff check vhsmfs keysvc cli tests bench $(wildcard bench/*)
	$(BIN)/ruff format --check vhsmfs keysvc cli tests bench $(wildcard bench/*)
	$(BIN)/pytest -q tests

# The whole suite plus the full-size variants (`@pytest.mark.full`, e.g. the backup-consistency
# test at full size), which pyproject.toml's `-m 'not full'` leaves out of every other run.
test-all: venv
	$(BIN)/ruff check vhsmfs keysvc cli tests bench $(wildcard bench/*)
	$(BIN)/ruff format --check vhsmfs keysvc cli tests bench $(wildcard bench/*)
	$(BIN)/pytest -q -m "" tests

lint: venv
	$(BIN)/ruff check vhsmfs keysvc cli tests bench $(wildcard bench/*)
	$(BIN)/ruff format --check vhsmfs keysvc cli tests bench $(wildcard bench/*)

bench: venv
	$(BIN)/python bench/token_vs_age
	$(BIN)/python bench/mount_vs_gocryptfs
	$(BIN)/python bench/sign_throughput

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
