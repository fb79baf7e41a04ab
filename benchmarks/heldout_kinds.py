"""A model against the held-out QE references of every kind (``data/make_al_heldout.py``):
free-energy and force errors per kind, and for an ensemble its uncertainty and how well
it ranks the errors (Spearman rank correlation, issue 17).

    python benchmarks/heldout_kinds.py [MODEL.pt] [--data data/al_heldout_933K]
        [--spacing H] [--threads N] [--plot calibration.png]

Prints one row per structure: A - A_QE (meV/atom), force RMSE against QE (eV/A), and for
ensembles the energy uncertainty (meV/atom) and max force deviation (eV/A); then, for
ensembles, Spearman's rho between energy uncertainty and |A - A_QE| over the structures,
and between per-atom force deviation and per-atom force error over all atoms; ``--plot``
draws both as scatter plots. Grid: the model's training spacing unless ``--spacing``.
E_ii is LAMMPS's Ewald sum.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mlsurrogate.evaluate import (
    evaluate_references,
    format_reference_errors,
    load_references,
    plot_calibration,
)
from mlsurrogate.model import Model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=str(ROOT / "models" / "al_933K.pt"))
    parser.add_argument("--data", default=str(ROOT / "data" / "al_heldout_933K"))
    parser.add_argument("--spacing", type=float, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--plot", help="scatter plot of error against uncertainty (ensembles)")
    args = parser.parse_args()
    model = Model.load(args.model)
    references = load_references([args.data])
    print(f"model {args.model} ({model.ensemble_size} network(s)); references {args.data}")
    errors = evaluate_references(model, references, args.spacing, args.threads, progress=True)
    print(format_reference_errors(errors))
    if args.plot:
        print(f"wrote {plot_calibration(errors, args.plot)}")


if __name__ == "__main__":
    main()
