"""Numba kernels of mica_core: the interpreter's operations as small compiled kernels, a
mirror of the numpy reference functions (see :mod:`mica_core._numba.kernels`).

Importing this package imports numba; ``mica_core`` itself never does (the numba backend
imports it on first use). JIT flags live in :mod:`mica_core._numba.config`.
"""

from .kernels import *  # noqa: F403 - the kernels are this package's whole interface
from .kernels import __all__  # noqa: F401
