"""The exceptions of the Quantum ESPRESSO layer."""


class QEError(RuntimeError):
    """A Quantum ESPRESSO run failed, or one of its files cannot be used.

    The message names the file and the problem, and what to do where that is known."""


class EnergyWindowError(QEError):
    """The LDOS energy window does not cover a run's occupied or computed bands: this
    structure's states lie outside what an LDOS on that window can describe."""
