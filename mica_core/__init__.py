"""mica_core: multi-turn credit assignment (MICA) for policy-gradient training.

Ragged trajectories in; per-turn and per-token advantages out. See ``estimate`` (arrays) and
``compute_advantages`` (Arrow tables). Importing this package compiles nothing and never
imports numba or torch.
"""

from ._errors import MicaInputError
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
from .signals import (
    absolute_distance_reward,
    discounted_returns,
    distance_from_state,
    incremental_distance_reward,
    trajectory_outcome,
    turn_index,
)

__version__ = "0.1.0"


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
    "bucket_zscore",
    "absolute_distance_reward",
    "discounted_returns",
    "distance_from_state",
    "incremental_distance_reward",
    "trajectory_outcome",
    "turn_index",
]
