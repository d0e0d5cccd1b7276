# wattstream: the two commands are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: help install demo test test-unit lint format bench servers clean

help:
	@echo "make demo   - install into $(VENV) and run the pipeline on the bundled sample"
	@echo "make test   - install test dependencies (pip and Debian) and run the whole suite"
	@echo "make lint   - ruff format --check, ruff check, mypy"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(INSTALLED)

demo: $(INSTALLED)
	$(VENV)/bin/wattstream demo

# Install the Debian packages of the servers the integration tests run, if missing:
# InfluxDB 1.x, VictoriaMetrics (InfluxDB v2 write API), Mosquitto, Prometheus.
servers:
	@missing=""; \
	command -v influxd >/dev/null || missing="$$missing influxdb"; \
	command -v victoria-metrics >/dev/null || missing="$$missing victoria-metrics"; \
	command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

test: $(INSTALLED) servers
	$(VENV)/bin/pytest

test-unit: $(INSTALLED)
	$(VENV)/bin/pytest tests/unit

lint: $(INSTALLED)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy pipeline ingest processors sinks benchmarks tests

format: $(INSTALLED)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(INSTALLED)
	$(PY) -m benchmarks

clean:
	rm -rf out build *.egg-info .pytest_cache .mypy_cache .ruff_cache
