"""Shared fixtures. ``backend`` runs a test once per installed backend (POT's conftest
pattern): every test that takes it checks every backend, and no test file keeps its own list.
"""

import importlib.util
import os
import sys

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, os.path.dirname(__file__))

import mica_core as mc  # noqa: E402
from mica_core.options import BACKENDS  # noqa: E402

HAVE_NUMBA = importlib.util.find_spec("numba") is not None
HAVE_TORCH = importlib.util.find_spec("torch") is not None


def _cuda_available():
    if not HAVE_TORCH:
        return False
    import torch

    return torch.cuda.is_available()


class Backend:
    """One way of running :func:`mica_core.estimate`, with numpy arrays in and out.

    ``name``: ``numpy``, ``cython``, ``numba``, ``torch`` (host arrays, ``backend="torch"``),
    ``torch-cpu`` (torch tensors on the CPU) or ``torch-cuda`` (tensors on the GPU).
    ``tensors``: whether inputs travel as torch tensors (then group labels stay host data,
    which the torch path factorizes on the host).
    """

    def __init__(self, name):
        self.name = name
        self.tensors = name in ("torch-cpu", "torch-cuda")
        self.device = "cuda" if name == "torch-cuda" else "cpu"
        self.option = "torch" if name.startswith("torch") else name

    def __repr__(self):
        return self.name

    def to_input(self, x):
        if x is None or not self.tensors:
            return x
        import torch

        a = np.asarray(x)
        return torch.as_tensor(a).to(self.device)

    def estimate(self, offsets, group, **kw):
        """``mc.estimate`` through this backend; the result's arrays as numpy."""
        for key in ("distance", "initial_distance", "reward"):
            if key in kw:
                kw[key] = self.to_input(kw[key])
        res = mc.estimate(self.to_input(offsets), group, backend=self.option, **kw)
        if not self.tensors:
            return res
        return mc.EstimateResult(*(a.cpu().numpy() for a in res))


# Ways of running each backend of mica_core.options.BACKENDS ("auto" picks one of them):
# torch runs on host arrays and on tensors (on the CPU, and on the GPU where there is one).
_VARIANTS = {"torch": ["torch", "torch-cpu"] + (["torch-cuda"] if _cuda_available() else [])}
_INSTALLED = {"numba": HAVE_NUMBA, "torch": HAVE_TORCH}
BACKEND_NAMES = [variant for name in BACKENDS if name != "auto" and _INSTALLED.get(name, True)
                 for variant in _VARIANTS.get(name, [name])]


@pytest.fixture(scope="session", params=BACKEND_NAMES)
def backend(request):
    """Every installed backend in turn (see :class:`Backend`)."""
    return Backend(request.param)
