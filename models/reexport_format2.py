"""Re-export the bundled model (format version 1) in model format version 2, with the
same weights (one-off; the result is committed as ``al_933K.pt``).

    python models/reexport_format2.py [models/al_933K.pt]

Rebuilds the SurrogateModel from the old file's state_dict and metadata.json (no
retraining), checks that every tensor is bit-identical, and that the free energy of the
first held-out structure (``al_933K_heldout.json``, its QE grid) equals the old file's
to 1e-10 eV, computed directly with the old TorchScript module.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ase
import numpy as np
import torch

from mlsurrogate.data import params_from_json
from mlsurrogate.descriptors import compute_grid_descriptors
from mlsurrogate.export import functional_for_spec
from mlsurrogate.ion_ion import ion_ion_energy
from mlsurrogate.model import LdosNetwork, Model, ModelSpec, SurrogateModel, save_model

HERE = Path(__file__).resolve().parent


def read_version1(path: Path) -> tuple[torch.jit.ScriptModule, dict]:
    extra = {"metadata.json": ""}
    module = torch.jit.load(str(path), _extra_files=extra)
    metadata = json.loads(extra["metadata.json"])
    if metadata.get("format_version") != 1:
        raise SystemExit(f"{path}: format version {metadata.get('format_version')}, not 1")
    return module, metadata


def spec_of_version1(metadata: dict) -> ModelSpec:
    elements = tuple(metadata["elements"])
    params = params_from_json(json.dumps(metadata["descriptor_params"]))
    provenance_keys = ("num_valence_electrons_per_cell", "core_correction", "pseudopotentials")
    return ModelSpec(
        elements=elements,
        valence_charges=tuple(float(metadata["valence_charges"][e]) for e in elements),
        masses=tuple(float(metadata["masses"][e]) for e in elements),
        grid_spacing_A=float(metadata["grid_spacing_A"]),
        descriptor_params=type(params)(**{**params.__dict__, "elements": elements}),
        energies_eV=tuple(float(e) for e in metadata["energies_eV"]),
        electronic_temperature_K=float(metadata["electronic_temperature_K"]),
        xc_functional=metadata["xc_functional"],
        ldos_broadening_kernel=metadata["ldos_broadening_kernel"],
        ldos_broadening_eV=float(metadata["ldos_broadening_eV"]),
        provenance={
            **{key: metadata[key] for key in provenance_keys},
            "training": metadata["training"],
            "reexported_from_format_version": 1,
        },
    )


def free_energy(
    network: torch.nn.Module,
    functional: torch.nn.Module,
    spec: ModelSpec,
    atoms: ase.Atoms,
    grid: tuple[int, int, int],
) -> float:
    """A = electronic free energy of the network's LDOS + E_ii, without the Model class."""
    descriptors = compute_grid_descriptors(atoms, grid, spec.descriptor_params)
    with torch.no_grad():
        ldos = network(torch.as_tensor(descriptors.reshape(-1, descriptors.shape[-1])))
    charges = dict(zip(spec.elements, spec.valence_charges))
    cell = torch.as_tensor(np.asarray(atoms.cell), dtype=torch.float64)
    electrons = float(sum(charges[s] for s in atoms.get_chemical_symbols()))
    terms, _ = functional.evaluate(ldos.reshape(*grid, -1), cell, electrons, False, None)
    return float(terms["electronic"]) + ion_ion_energy(atoms, charges).energy


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "al_933K.pt"
    old, metadata = read_version1(path)
    spec = spec_of_version1(metadata)
    config = metadata["training"]["config"]
    features, energies = old.network.feature_mean.numel(), len(spec.energies_eV)
    network = LdosNetwork(
        features, energies, config["hidden"], config["activation"], config["dropout"]
    ).double()
    model = SurrogateModel(network, functional_for_spec(spec), spec)
    model.load_state_dict(old.state_dict())
    model.eval()
    for name, tensor in old.state_dict().items():
        new = model.state_dict()[name]
        if new.dtype != tensor.dtype or not torch.equal(new, tensor):
            raise SystemExit(f"{name} differs after the rebuild")
    structure = json.loads((HERE / "al_933K_heldout.json").read_text())[0]
    atoms = ase.Atoms(
        structure["symbols"],
        positions=structure["positions_A"],
        cell=structure["cell_A"],
        pbc=True,
    )
    grid = tuple(structure["grid"])
    before = free_energy(old.network, old.functional, spec, atoms, grid)
    save_model(model, path)
    loaded = Model.load(path)
    after = loaded.energy(atoms, grid)
    for name, tensor in old.state_dict().items():
        if not torch.equal(loaded.module.state_dict()[name], tensor):
            raise SystemExit(f"{name} differs in the written file")
    print(
        f"{path}: format version 2; A = {after:.12f} eV (old file {before:.12f} eV, "
        f"difference {after - before:.1e} eV)"
    )
    if abs(after - before) > 1e-10:
        raise SystemExit("the re-exported model's energy differs from the old file's")


if __name__ == "__main__":
    main()
