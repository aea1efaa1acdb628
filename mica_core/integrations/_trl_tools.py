"""Per-turn signals from TRL's tool loop (``tools=`` / ``environment_factory=``).

In TRL's tool loop (TRL 1.16, ``GRPOTrainer._tool_call_loop``) a completion is the model's
first generation, then, for every generation that called tools, the tool results (``tool_mask``
0) and the model's next generation. mica's turns there are those generations, the assistant
segments: turn ``k`` is the ``k``-th run of ones of ``completion_mask * tool_mask`` and the
``k``-th assistant message of the completion's messages (``completions[b]`` in TRL's
reward-function arguments, assistant and ``tool`` messages in order).

An environment sees tool calls, not segments, so it records one value per tool call it executed
(``call_distances``, ``call_states`` or ``call_rewards``) and :func:`turn_fields_from_calls`
assigns them to turns:

- turn ``k``'s calls are the tool results that follow its message, except those TRL wrote for a
  failed call (``{'error': ...}``: an unknown tool, bad arguments, an exception in the tool),
  which executed nothing and need no value;
- a last turn whose calls have no result (TRL dropped them: the result would have passed
  ``max_completion_length``, or ``max_tool_calling_iterations`` was reached) may have values
  for up to that many calls: the environment executed a dropped call, not one past the cap;
- distance or state after turn ``k``: the value of its last call; a turn without an executed
  call (the reply after the last tool result, a reply without a call) leaves the environment as
  it was, so its value is the previous turn's, or ``initial_distance`` / ``initial_state`` for
  the first turn (IDR 0);
- reward of turn ``k``: the sum of its calls' rewards, 0 without a call.

Needs neither TRL nor torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .. import validate_rows as _rows
from ..validate import negative_distance, not_finite

__all__ = ["CALL_FIELDS", "tool_turns", "turn_fields_from_calls"]

#: per-call field -> the per-turn field it becomes
CALL_FIELDS = {"call_distances": "turn_distances", "call_states": "turn_states",
               "call_rewards": "turn_rewards"}
_INITIAL = {"call_distances": "initial_distance", "call_states": "initial_state"}
_FAILED = "{'error': "  # how TRL 1.16 writes a failed call's result: str({"error": message})


def tool_turns(messages: Sequence[Mapping], *, row=None) -> list[tuple[int, int]]:
    """The assistant turns of one completion of TRL's tool loop.

    Args:
      messages: the completion's messages in order (TRL's ``completions[b]``): assistant
        messages, each followed by the ``tool`` messages of the calls it made.
      row: the completion's row, named in errors.

    Returns:
      ``[(executed, dropped), ...]``, one per assistant message: ``executed`` is the number of
      tool results after it that are not TRL's failed-call results, ``dropped`` the number of
      calls of the last message that got no result (0 for the others).

    Raises:
      MicaInputError: a completion that does not start with an assistant message.
    """
    turns = []
    for m in messages:
        role = m.get("role") if isinstance(m, Mapping) else None
        if role == "assistant":
            turns.append([0, 0, m])
        elif role == "tool" and turns:
            content = m.get("content")
            turns[-1][0] += not (isinstance(content, str) and content.startswith(_FAILED))
            turns[-1][2] = None  # its calls got results
        else:
            raise _rows.tool_messages(row, f"a {role!r} message where TRL's tool loop writes "
                                           f"assistant and tool messages, starting with an "
                                           f"assistant message")
    if turns and turns[-1][2] is not None:
        turns[-1][1] = len(turns[-1][2].get("tool_calls") or ())
    return [(executed, dropped) for executed, dropped, _ in turns]


def _values(field, row, value, ndim):
    a = _rows.numbers(field, row, value, noun="completion",
                      hint=" (an empty list if it made no tool call)")
    if a.size == 0:
        return a.reshape((0,) * ndim)
    if a.ndim != ndim:
        what = "a list of numbers" if ndim == 1 else "a list of state vectors [calls, K]"
        raise _rows.row_shape(field, row, what, a.shape, "completion")
    bad = np.flatnonzero(~np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1))
    if bad.size:
        at = f"call {int(bad[0])}: " if field in CALL_FIELDS else ""
        raise not_finite(field, row, a[bad[0]].tolist(), at)
    if field in ("call_distances", "initial_distance") and (a < 0).any():
        c = int(np.flatnonzero(a < 0)[0])
        at = f"call {c}: " if field in CALL_FIELDS else ""
        raise negative_distance(field, row, a[c], at)
    return a


def turn_fields_from_calls(fields: Mapping, completions: Sequence, *, row_offset: int = 0
                           ) -> dict:
    """Replace a per-call field by the per-turn field mica reads (module docstring).

    Args:
      fields: ``{field: list with one entry per completion}``, with at most one of
        :data:`CALL_FIELDS` (each entry: the values the completion's environment recorded, one
        per executed tool call, in call order; an empty list without calls) and, for
        ``call_distances`` / ``call_states``, ``initial_distance`` / ``initial_state`` where a
        turn without a call needs it.
      completions: TRL's ``completions``: per completion, its list of messages.
      row_offset: added to row numbers in errors (this process's first row in the batch).

    Returns:
      ``fields`` with the call field replaced by its per-turn field (``turn_distances``,
      ``turn_states`` or ``turn_rewards``); unchanged without a call field.

    Raises:
      MicaInputError: naming the field and the row: several call fields, a call field with a
      per-turn signal field, values that are missing, non-numeric or non-finite, a number of
      values that does not fit the completion's executed calls, a turn without a call before
      any value and without the initial value.
    """
    present = [f for f in CALL_FIELDS if fields.get(f) is not None]
    if not present:
        return dict(fields)
    turn_fields = [f for f in CALL_FIELDS.values() if fields.get(f) is not None]
    if len(present) > 1 or turn_fields:
        raise _rows.several_signals(present[0], f"needs exactly one per-call or per-turn "
                                                f"signal; got {', '.join(present + turn_fields)}")
    field = present[0]
    col = _rows.entries(field, fields[field], len(completions), noun="completion")
    init_col = fields.get(_INITIAL.get(field))
    out = []
    for b, (value, messages) in enumerate(zip(col, completions, strict=True)):
        row = b + row_offset
        values = _values(field, row, value, 2 if field == "call_states" else 1)
        turns = tool_turns(messages, row=row)
        if not turns:
            raise _rows.tool_messages(row, "the completion has no assistant message")
        executed = sum(e for e, _ in turns)
        dropped = turns[-1][1]
        if not executed <= len(values) <= executed + dropped:
            also = f" (up to {executed + dropped} with the last turn's dropped calls)" \
                if dropped else ""
            raise _rows.values_per_call(field, row, len(values), executed, also)
        ends = np.cumsum([e for e, _ in turns])
        ends[-1] = len(values)  # values of dropped calls belong to the last turn
        starts = np.concatenate([[0], ends[:-1]])
        if field == "call_rewards":
            out.append([float(values[s:e].sum()) for s, e in zip(starts, ends, strict=True)])
            continue
        previous = None
        if init_col is not None and init_col[b] is not None and ends[0] == 0:
            # carried into the first turn: checked here, so that errors name the initial field
            previous = _values(_INITIAL[field], row, [init_col[b]], values.ndim)[0]
        per_turn = []
        for k, (s, e) in enumerate(zip(starts, ends, strict=True)):
            if e > s:
                previous = values[e - 1]
            elif previous is None:
                raise _rows.no_value_before(_INITIAL[field], row, k)
            per_turn.append(previous)
        out.append(per_turn)
    result = {k: v for k, v in fields.items() if k != field}
    result[CALL_FIELDS[field]] = out
    return result
