# The README's commands. Each works on a fresh machine with Python 3.11 and the package registries.
PY ?= python3.11
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NPROC ?= 4

.PHONY: setup train test bench lint clean

setup: $(STAMP)

# torch is pinned first: on these machines ==2.13.0 resolves to the local CPU wheel,
# while a looser range would pull several GB of CUDA packages. The package itself then
# installs with a range that 2.13.0 already satisfies, so nothing is upgraded.
$(STAMP): setup.py pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip setuptools wheel
	$(VPY) -m pip install --quiet torch==2.13.0
	$(VPY) -m pip install --quiet --no-build-isolation -e '.[dev]'
	touch $(STAMP)

train: setup
	$(VENV)/bin/expertmesh run --config configs/default.toml --nproc $(NPROC)

test: setup
	$(VPY) -m pytest -q --durations=25 tests

bench: setup
	DS_BUILD_OPS=0 $(VPY) -m pip install --quiet --no-build-isolation -e '.[bench]'
	@for b in benchmarks/*.py; do echo "== $$b"; $(VPY) $$b || exit 1; done

lint: setup
	$(VPY) -m ruff check expertmesh tests benchmarks

clean:
	rm -rf build *.egg-info expertmesh/_C*.so runs
