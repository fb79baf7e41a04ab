#!/usr/bin/env bash
# The 4-atom start data of learn.toml: ten fcc cells with Gaussian displacements
# (data/make_al_dataset.py) on the labels' k-converged settings, stored compact (2000 of
# the 24^3 grid points). Resumable: finished QE snapshots are kept in build/. Run from the
# repository root with the venv's python and mlsurrogate on PATH.
set -euo pipefail
full=build/al_melt_initial
make_set() {  # name lattice seed temperatures...
  local name=$1 lattice=$2 seed=$3
  shift 3
  python data/make_al_dataset.py --supercell 1 --kspacing 0.13 --emin -10 --emax 12 \
    --lattice "$lattice" --seed "$seed" --temperatures "$@" \
    --output "$full/$name" --workdir build/al_melt_qe
  mkdir -p "data/al_melt/initial/$name"
  mlsurrogate data compact "$full/$name"/snapshot_*.h5 -o "data/al_melt/initial/$name" \
    --points 2000 --seed "$seed"
}
make_set a405 4.05 19 300 450 600 750 933 1100
make_set a395 3.95 20 600 933
make_set a415 4.15 21 600 933
