"""The compiled Cython kernels, ``mica_core._ext``, imported in this one place.

The Cython backend (:mod:`mica_core._backend_cython`) and the Arrow reader's single-pass
checks (:mod:`mica_core.arrow`) take the module from here. A normal install always builds it
(``setup.py`` fails loudly otherwise); ``ext`` is ``None`` only on a broken install, where
:func:`require` names the remedy and the reader uses its numpy fallbacks.
"""

from __future__ import annotations

try:
    from . import _ext as ext
    _IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    ext = None
    _IMPORT_ERROR = exc

__all__ = ["ext", "require"]


def require():
    """The compiled module, or an ImportError saying how to build it."""
    if ext is None:  # pragma: no cover - exercised only on a broken install
        raise ImportError(
            "mica_core._ext (the compiled Cython kernels) is not built. Reinstall mica with a "
            "C compiler available (`pip install -e .` or `make setup`), or pass "
            "backend='numpy'.") from _IMPORT_ERROR
    return ext
