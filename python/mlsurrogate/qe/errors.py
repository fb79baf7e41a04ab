"""The one exception of the Quantum ESPRESSO layer."""


class QEError(RuntimeError):
    """A Quantum ESPRESSO run failed, or one of its files cannot be used.

    The message names the file and the problem, and what to do where that is known."""
