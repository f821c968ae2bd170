# fair-edge: every target installs what it needs first (system packages, .venv, the project).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fair-edge-installed
APT_PACKAGES := openssh-server dataset-fashion-mnist qemu-user-static debootstrap binfmt-support chromium
DEVICE ?= host
MODEL ?=
DATA ?=
TOD ?=
ARGS ?=

.PHONY: setup system-deps test deploy bench lint clean

setup: $(STAMP)

# Debian packages: the SSH server for the loopback board tests, Fashion-MNIST (real data, no
# download at run time), qemu + debootstrap for the emulated arm64 board.
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

# torch goes in first, pinned, so the resolver takes the local CPU wheel and not a CUDA build.
$(STAMP): pyproject.toml constraints.txt | system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[tflite,vision,data,dev]'
	touch $(STAMP)

test: setup sysroot
	$(BIN)/python -m pytest -q $(ARGS)

# The arm64 Debian sysroot (qemu user emulation) for the emulated-board tests; cached by versions.
.PHONY: sysroot
export FAIR_EDGE_SYSROOT_CACHE ?= $(HOME)/.cache/fair-edge/sysroot
sysroot: setup
	$(BIN)/python -m devices.emulation build

deploy: setup
	$(BIN)/fair-edge deploy --device $(DEVICE) $(if $(MODEL),--model $(MODEL)) $(if $(DATA),--data $(DATA)) $(if $(TOD),--tod $(TOD)) $(ARGS)

bench: setup
	$(BIN)/python -m bench.run_all

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
