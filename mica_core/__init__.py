"""mica_core: multi-turn credit assignment (MICA) for policy-gradient training.

Ragged trajectories in; per-turn and per-token advantages out. See ``estimate`` (arrays) and
``compute_advantages`` (Arrow tables). Importing this package compiles nothing and never
imports numba or torch. Its public names load on first use (numpy and pyarrow with them), so
that ``import mica_core`` and ``mica --help`` cost next to nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

from ._errors import MicaInputError

__version__ = "0.1.0"

# Public name -> the module that defines it, imported when the name is first used.
_EXPORTS = {
    "EstimateResult": "_result",
    "estimate": "api",
    "compute_advantages": "arrow",
    "ragged_from_table": "arrow",
    "Component": "estimators",
    "Estimator": "estimators",
    "register_estimator": "estimators",
    "unregister_estimator": "estimators",
    "get_estimator": "estimators",
    "list_estimators": "estimators",
    "EstimatorOptions": "options",
    "bucket_zscore": "normalize",
    "absolute_distance_reward": "signals",
    "discounted_returns": "signals",
    "distance_from_state": "signals",
    "incremental_distance_reward": "signals",
    "trajectory_outcome": "signals",
    "turn_index": "signals",
}

if TYPE_CHECKING:  # what static tools see; at run time __getattr__ loads these
    from ._result import EstimateResult
    from .api import estimate
    from .arrow import compute_advantages, ragged_from_table
    from .estimators import (
        Component,
        Estimator,
        get_estimator,
        list_estimators,
        register_estimator,
        unregister_estimator,
    )
    from .normalize import bucket_zscore
    from .options import EstimatorOptions
    from .signals import (
        absolute_distance_reward,
        discounted_returns,
        distance_from_state,
        incremental_distance_reward,
        trajectory_outcome,
        turn_index,
    )


def __getattr__(name):
    """A public name from its module (``_EXPORTS``), or a submodule, loaded on first use."""
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}"):
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


def broadcast_to_tokens(turn_advantage, response_mask, **kwargs):
    """Spread per-turn advantages over assistant tokens (see ``mica_core.tokens``)."""
    from .tokens import broadcast_to_tokens as _impl

    return _impl(turn_advantage, response_mask, **kwargs)


__all__ = [
    "MicaInputError",
    "EstimateResult",
    "estimate",
    "compute_advantages",
    "ragged_from_table",
    "broadcast_to_tokens",
    "Component",
    "Estimator",
    "register_estimator",
    "unregister_estimator",
    "get_estimator",
    "list_estimators",
    "EstimatorOptions",
    "bucket_zscore",
    "absolute_distance_reward",
    "discounted_returns",
    "distance_from_state",
    "incremental_distance_reward",
    "trajectory_outcome",
    "turn_index",
]
