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
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from mica_core.atomic import atomic_dir, atomic_write_text

__all__ = [
    "capture_rng_state",
    "checkpoint_dir",
    "latest_checkpoint",
    "load_checkpoint_state",
    "restore_rng_state",
    "save_checkpoint",
]

_STEP_DIR = re.compile(r"^step_(\d+)$")


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


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of ``run_dir``, or None."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / "trainer_state.json").is_file():
            return cand
    steps = _listed_steps(root)
    return checkpoint_dir(run_dir, max(steps)) if steps else None


def load_checkpoint_state(ckpt: str | Path) -> dict[str, Any]:
    """Trainer state plus the optimizer, scheduler and RNG payloads (tensors on CPU)."""
    import torch

    ckpt = Path(ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["optimizer"] = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False)
    state["scheduler"] = torch.load(ckpt / "scheduler.pt", map_location="cpu", weights_only=False)
    state["rng"] = torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=False)
    return state
