"""Re-export the bundled model (format version 2) in model format version 3 (adds
``dropout_probability`` and the network's MC-dropout methods), with the same weights
(one-off; the result is committed as ``al_933K.pt``).

    python models/reexport_format3.py [models/al_933K.pt]

Rebuilds the SurrogateModel from the old file's network weights and metadata.json (no
retraining; the functional from the spec), checks that every tensor of the old file is
bit-identical in the new one, and that the free energy of the
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

from mlsurrogate.descriptors import compute_grid_descriptors
from mlsurrogate.export import functional_for_spec
from mlsurrogate.ion_ion import ion_ion_energy
from mlsurrogate.model import LdosNetwork, Model, ModelSpec, SurrogateModel, save_model

HERE = Path(__file__).resolve().parent


def read_version2(path: Path) -> tuple[torch.jit.ScriptModule, dict]:
    extra = {"metadata.json": ""}
    module = torch.jit.load(str(path), _extra_files=extra)
    metadata = json.loads(extra["metadata.json"])
    if metadata.get("format_version") != 2:
        raise SystemExit(f"{path}: format version {metadata.get('format_version')}, not 2")
    return module, metadata


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
    old, metadata = read_version2(path)
    config = metadata["provenance"]["training"]["config"]
    metadata["provenance"]["reexported_from_format_version"] = 2
    spec_json = {**metadata, "format_version": 3, "dropout_probability": config["dropout"]}
    spec = ModelSpec.from_json(json.dumps(spec_json), str(path))
    features, energies = old.network.feature_mean.numel(), len(spec.energies_eV)
    network = LdosNetwork(
        features, energies, config["hidden"], config["activation"], config["dropout"]
    ).double()
    network.load_state_dict(old.network.state_dict())
    # the functional is rebuilt from the spec: it gains the buffers of today's integration
    # rules; every tensor the old file has must come out bit-identical
    model = SurrogateModel(network, functional_for_spec(spec), spec).eval()
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
        f"{path}: format version 3; A = {after:.12f} eV (old file {before:.12f} eV, "
        f"difference {after - before:.1e} eV)"
    )
    if abs(after - before) > 1e-10:
        raise SystemExit("the re-exported model's energy differs from the old file's")


if __name__ == "__main__":
    main()
