# The README's commands. Each works on a fresh machine with Python 3.11 and the package registries.
PY ?= python3.11
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NPROC ?= 4

.PHONY: setup train test test-isa bench lint clean

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

# The suite under each CPU kernel level this machine has (ISA="default avx2 avx512" by default, as the CPU
# allows; e.g. `make test-isa ISA=default`): ATen's, MKL's and oneDNN's kernels lowered alike, so the rounding
# differs from the widest kernels' that `make test` uses.
ISA ?= default $(shell grep -qw avx2 /proc/cpuinfo && echo avx2) $(shell grep -qw avx512f /proc/cpuinfo && echo avx512)

test-isa: setup
	@for level in $(ISA); do \
	  case $$level in default) mkl=SSE4_2; dnnl=SSE41;; avx2) mkl=AVX2; dnnl=AVX2;; avx512) mkl=AVX512; dnnl=AVX512_CORE;; \
	  *) echo "ISA=$$level: not one of default avx2 avx512"; exit 2;; esac; \
	  echo "== ATEN_CPU_CAPABILITY=$$level MKL_ENABLE_INSTRUCTIONS=$$mkl DNNL_MAX_CPU_ISA=$$dnnl"; \
	  ATEN_CPU_CAPABILITY=$$level MKL_ENABLE_INSTRUCTIONS=$$mkl DNNL_MAX_CPU_ISA=$$dnnl \
	    $(VPY) -m pytest -q --durations=25 tests || exit 1; done

bench: setup
	DS_BUILD_OPS=0 $(VPY) -m pip install --quiet --no-build-isolation -e '.[bench]'
	@for b in benchmarks/*.py; do echo "== $$b"; $(VPY) $$b || exit 1; done

lint: setup
	$(VPY) -m ruff check expertmesh tests benchmarks

clean:
	rm -rf build *.egg-info expertmesh/_C*.so runs
