"""The rules of estimator options (:class:`mica_core.EstimatorOptions`) and their messages:
an option the estimator does not take, a value of the wrong type or range, and ``eps=0`` under
a ``std`` scale. :mod:`mica_core.options` (every front end's option check) and
:func:`mica_core.estimators.resolve` raise them; each names the option as the user spelled it
and the rule, in one line.
"""

from __future__ import annotations

from ._errors import MicaInputError

__all__ = ["bad_option", "eps_zero_with_std", "unknown_option"]


def bad_option(label, rule, value) -> MicaInputError:
    """``label`` (the option as the user spelled it) does not satisfy ``rule``."""
    err = MicaInputError(f"{label} must be {rule}; got {value!r}")
    err.column, err.rule = label, rule  # the option and the rule, for programs
    return err


def unknown_option(label, known) -> MicaInputError:
    """The error of an unknown option ``label`` (as the user spelled it), listing ``known``."""
    err = MicaInputError(f"unknown option {label!r}; known: {', '.join(known)}")
    err.column, err.rule = label, "known option"
    return err


def eps_zero_with_std() -> MicaInputError:
    """``eps=0`` with a component scaled by its bucket's std."""
    return MicaInputError("eps must be > 0 with scale='std': a bucket whose values are all "
                          "equal has std 0 (use scale='none' to centre without scaling)")
