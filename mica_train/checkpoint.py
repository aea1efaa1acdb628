"""Training checkpoints: written whole or not at all, resumed exactly.

Layout of ``RUN_DIR/checkpoints/step_NNNNNN/`` (built in a temporary sibling, then renamed)::

    weights/            adapter_model.safetensors + adapter_config.json (LoRA),
                        or model.safetensors (full fine-tuning)
    optimizer.pt        AdamW state
    scheduler.pt        learning-rate schedule state
    rng.pt              python, numpy and torch (CPU and CUDA) RNG states of every process
    trainer_state.json  the last completed step, the config, the sampler position

``RUN_DIR/checkpoints/latest`` names the newest complete checkpoint; it is replaced atomically
after the directory is in place, so a kill at any moment leaves a usable checkpoint.

Resuming reads a run directory that may come from elsewhere, so nothing in it may run code:
the ``.pt`` files are read with ``torch.load(weights_only=True)`` (tensors, numbers, strings
and containers; for ``rng.pt`` also numpy's ``uint32`` state array, allow-listed by name), and
the checkpoint resumed must be a ``step_NNNNNN`` directory of this run, not a link or a
``latest`` pointing elsewhere. Anything else is a :class:`CheckpointError`, one line naming
the file.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from mica_core import MicaInputError
from mica_core.atomic import atomic_dir, atomic_write_text

__all__ = [
    "CheckpointError",
    "RunDirLock",
    "capture_rng_state",
    "checkpoint_dir",
    "latest_checkpoint",
    "load_checkpoint_state",
    "read_json_object",
    "read_trainer_state",
    "restore_rng_state",
    "save_checkpoint",
]

_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(MicaInputError):
    """A checkpoint that cannot be resumed safely: one line naming the file and the problem."""


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def capture_rng_state() -> dict[str, Any]:
    import torch

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    policy,
    optimizer,
    scheduler,
    trainer_state: dict[str, Any],
    rng_states: list[dict[str, Any]],
    keep: int = 0,
) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, keep the newest ``keep``."""
    import torch

    from .policy import save_policy_weights

    target = checkpoint_dir(run_dir, step)
    with atomic_dir(target) as tmp:
        save_policy_weights(policy, tmp / "weights")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_states, tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(
            json.dumps({**trainer_state, "step": step}, indent=2, sort_keys=True, default=str) + "\n"
        )
    atomic_write_text(target.parent / "latest", target.name + "\n")
    if keep > 0:
        steps = sorted(_listed_steps(target.parent))
        for old in steps[:-keep]:
            shutil.rmtree(checkpoint_dir(run_dir, old), ignore_errors=True)
    return target


def _listed_steps(ckpt_root: Path) -> list[int]:
    out = []
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / "trainer_state.json").is_file():
                out.append(int(m.group(1)))
    return out


_PARTS = ("weights", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json")


def _inside(run_dir: Path, cand: Path) -> Path:
    """``cand`` itself when it is a real ``step_NNNNNN`` directory of ``run_dir``'s own
    ``checkpoints`` folder (no link on the way, none inside, no ``..``), else a
    :class:`CheckpointError`."""
    root = Path(run_dir).resolve() / "checkpoints"  # a linked checkpoints/ resolves elsewhere
    linked = [p.name for p in (cand, *(cand / n for n in _PARTS)) if p.is_symlink()]
    if not _STEP_DIR.match(cand.name) or linked or cand.resolve() != root / cand.name:
        raise CheckpointError(f"{cand}: not a checkpoint of this run (a resumed checkpoint must be a "
                              f"step_NNNNNN directory inside {Path(run_dir) / 'checkpoints'}, not a link "
                              f"or a path elsewhere)")
    return cand


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of ``run_dir``, or None. A ``latest`` pointer naming
    anything but a ``step_NNNNNN`` directory of this run raises :class:`CheckpointError`."""
    root = Path(run_dir) / "checkpoints"
    if root.is_symlink():  # checkpoints would be read from, and written to, another place
        raise CheckpointError(f"{root} is a link; a run keeps its checkpoints in its own folder "
                              f"(link the run directory itself instead)")
    pointer = root / "latest"
    if pointer.is_file():
        with open(pointer, encoding="utf-8", errors="replace") as fh:
            name = fh.read(64).strip()  # a step name is short; never read a planted giant
        if not _STEP_DIR.match(name):
            raise CheckpointError(f"{pointer} names {name[:80]!r}, not a step_NNNNNN checkpoint of "
                                  f"this run")
        cand = root / name
        if (cand / "trainer_state.json").is_file():
            return _inside(run_dir, cand)
    steps = _listed_steps(root)
    return _inside(run_dir, checkpoint_dir(run_dir, max(steps))) if steps else None


def _rng_safe_globals() -> list:
    """What ``weights_only`` unpickling needs for the numpy part of ``rng.pt``
    (``np.random.get_state()`` holds a ``uint32`` array): numpy's array reconstruction (under
    its numpy 2 and numpy 1 names), ``ndarray``, ``dtype`` and the ``uint32`` dtype class;
    none of them runs code."""
    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    return [(reconstruct, "numpy._core.multiarray._reconstruct"),
            (reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
            type(np.dtype(np.uint32))]


def _load_pt(path: Path, safe_globals=()):
    import pickle

    import torch

    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (an incomplete checkpoint)")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, TypeError,
            AttributeError, ImportError) as exc:
        found = re.search(r"GLOBAL ([\w.]+)|but got <class '([^']+)'>", str(exc))
        why = (f"it asks for {found.group(1) or found.group(2)}" if found
               else (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200])
        raise CheckpointError(f"{path}: refused to load: not a plain tensor file that "
                              f"torch.load(weights_only=True) accepts ({why})") from None


def load_checkpoint_state(ckpt: str | Path) -> dict[str, Any]:
    """Trainer state plus the optimizer, scheduler and RNG payloads (tensors on CPU), every
    ``.pt`` file read with ``weights_only=True``. Raises :class:`CheckpointError`."""
    ckpt = Path(ckpt)
    state = read_trainer_state(ckpt)
    state["optimizer"] = _load_pt(ckpt / "optimizer.pt")
    state["scheduler"] = _load_pt(ckpt / "scheduler.pt")
    state["rng"] = _load_pt(ckpt / "rng.pt", _rng_safe_globals())
    if not isinstance(state["rng"], list) or not state["rng"]:
        raise CheckpointError(f"{ckpt / 'rng.pt'}: expected a list of RNG states, one per process")
    return state


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object in ``path`` (a run's ``config.json``, a ``trainer_state.json``), or a
    :class:`CheckpointError` naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_trainer_state(ckpt: str | Path) -> dict[str, Any]:
    """``trainer_state.json`` of checkpoint ``ckpt``: an object with an integer ``step`` and
    the ``config`` the checkpoint was trained with. Raises :class:`CheckpointError`."""
    path = Path(ckpt) / "trainer_state.json"
    state = read_json_object(path)
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: 'step' must be an integer >= 0, got {step!r}"[:300])
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{path}: no 'config' object (the config the checkpoint was trained "
                              f"with, which a resume is checked against)")
    return state


LOCK_NAME = "train.lock"


class RunDirLock:
    """An exclusive lock on a run directory (``RUN_DIR/train.lock``, ``flock``), so that two
    trainers never write one run. The kernel drops it when the process ends, however it ends
    (``kill -9`` included), so a stale lock file never blocks a later run. The file holds the
    owner's process id, for the message of the process refused. Where ``fcntl`` is missing
    (Windows), or the file system refuses ``flock`` (a warning says so), there is no lock."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fh = None

    @property
    def held(self) -> bool:
        return self._fh is not None

    def acquire(self) -> None:
        """Take the lock; a :class:`CheckpointError` naming the owner when another process
        (or another open trainer) holds it."""
        if self._fh is not None:
            return
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        import os
        import stat

        # Never through a link, never a FIFO or device planted under the name: a crafted run
        # dir must not make the lock truncate or block on another file.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK, 0o644)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CheckpointError(f"{self.path} is not a regular file; remove it")
        fh = os.fdopen(fd, "r+", encoding="ascii", errors="replace")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = fh.read(32).strip()
            fh.close()
            who = f"process {owner}" if owner.isdigit() else "another process"
            raise CheckpointError(f"run_dir {self.path.parent} is in use by {who} (another mica train "
                                  f"holds {self.path}); wait for it to end or use another run_dir") from None
        except OSError as exc:  # a file system without flock (some network mounts): go on unlocked
            fh.close()
            import warnings

            warnings.warn(f"{self.path}: cannot lock the run directory ({exc.strerror or exc}); nothing "
                          f"stops a second mica train on it", RuntimeWarning, stacklevel=2)
            return
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the descriptor drops the flock
            self._fh = None
