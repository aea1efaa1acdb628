"""The rules of token layouts (``[rows, tokens]`` masks, turn boundaries, token rewards and
per-turn values spread over tokens) and their messages. :mod:`mica_core.tokens` checks its
input through this module, and so do the integrations that find turns in a trainer's tokens
(verl, TRL), so that one rule has one name and one message whichever path meets it.
"""

from __future__ import annotations

from ._errors import MicaInputError


def not_2d(column, shape) -> MicaInputError:
    return MicaInputError(f"must be 2-D [rows, tokens]; got shape {shape}", column=column,
                          rule="shape")


def shape_differs(column, shape, mask_shape) -> MicaInputError:
    """A token array whose shape is not ``response_mask``'s."""
    return MicaInputError(f"shape {shape} differs from response_mask's {mask_shape}",
                          column=column, rule="shape")


def starts_shape(rows, shape) -> MicaInputError:
    return MicaInputError(f"needs one row of turn starts per response row ({rows}); got shape "
                          f"{shape}", column="turn_start", rule="shape")


def starts_rows(rows, got) -> MicaInputError:
    return MicaInputError(f"needs one list of turn starts per response row ({rows}); got "
                          f"{got}", column="turn_start", rule="length")


def starts_not_integer(row, positions) -> MicaInputError:
    return MicaInputError(f"turn starts must be token positions (integers); got {positions}",
                          column="turn_start", row=row, rule="integer positions")


def start_outside(row, position, length) -> MicaInputError:
    return MicaInputError(f"turn start {position} is outside the response (0..{length - 1})",
                          column="turn_start", row=row, rule="in range")


def starts_not_increasing(row, positions) -> MicaInputError:
    return MicaInputError(f"turn starts must increase; got {positions}", column="turn_start",
                          row=row, rule="increasing")


def start_not_assistant(row, position) -> MicaInputError:
    return MicaInputError(f"turn start {position} is not an assistant token (response_mask is 0 "
                          f"there)", column="turn_start", row=row,
                          rule="a turn starts on an assistant token")


def token_before_first_start(row, token, column="turn_start", first_start=None) \
        -> MicaInputError:
    """An assistant token before the row's first turn start (``first_start``: that start, to
    name it)."""
    detail = (f"assistant token {token} comes before the row's first turn start"
              if first_start is None else
              f"token {token} is an assistant token before the first turn start {first_start}")
    return MicaInputError(detail, column=column, row=row,
                          rule="every assistant token belongs to a turn")


def turn_index_decreases(row, token, index, previous) -> MicaInputError:
    return MicaInputError(f"token {token}: turn index {index} is lower than the previous "
                          f"assistant token's {previous}", column="turn_index", row=row,
                          rule="non-decreasing")


def token_reward_not_finite(row, token, value) -> MicaInputError:
    return MicaInputError(f"token {token}: reward {value} is not finite",
                          column="token_level_rewards", row=row, rule="finite")


def reward_before_turns(row, token, value, where) -> MicaInputError:
    return MicaInputError(f"token {token}: reward {value} lies {where}; a reward belongs to the "
                          f"most recent turn that starts at or before it, and there is none",
                          column="token_level_rewards", row=row,
                          rule="reward after a turn start")


def turn_without_reward(row, start) -> MicaInputError:
    return MicaInputError(f"the turn starting at token {start} has no reward (reward_mask is "
                          f"False on all its tokens)", column="reward_mask", row=row,
                          rule="a reward per turn")


def offsets_length(rows, shape) -> MicaInputError:
    return MicaInputError(f"needs shape ({rows + 1},); got {shape}", column="offsets",
                          rule="length")


def spans_differ(row, turns, spans) -> MicaInputError:
    return MicaInputError(f"offsets give {turns} turns but response_mask has {spans} assistant "
                          f"spans", column="response_mask", row=row, rule="one span per turn")


def values_for_spans(got, spans) -> MicaInputError:
    return MicaInputError(f"turn_advantage has {got} values but response_mask has {spans} "
                          f"assistant spans (turns)", column="turn_advantage",
                          rule="one value per turn")


def spans_for_values(row, spans, per_row) -> MicaInputError:
    return MicaInputError(f"response_mask has {spans} assistant spans but turn_advantage holds "
                          f"{per_row} per row", column="turn_advantage", row=row,
                          rule="one value per turn")


def turns_for_values(column, row, found, values, where, hint) -> MicaInputError:
    """A row whose turns found in its tokens (``where``: how they were found) are not as many
    as the values given for it."""
    return MicaInputError(f"the completion has {found} assistant turns ({where}) but {column} "
                          f"has {values} values; {hint}", column=column, row=row,
                          rule="one value per turn")


def layout_shape(layout, needs, shape) -> MicaInputError:
    return MicaInputError(f"layout {layout!r} needs {needs}; got shape {shape}" if layout ==
                          "trajectory" else f"layout {layout!r} needs {needs}; got {shape}",
                          column="turn_advantage", rule="shape")


def starts_per_turn(row, starts, signal, turns) -> MicaInputError:
    return MicaInputError(f"{starts} turn starts but {signal} has {turns} turns",
                          column="turn_starts", row=row, rule="one start per turn")


def starts_not_positions(row, positions) -> MicaInputError:
    return MicaInputError(f"{positions} are not strictly increasing token positions >= 0",
                          column="turn_starts", row=row, rule="increasing positions")


def turn_without_token(row, turn, start, mask="completion_mask * tool_mask") -> MicaInputError:
    return MicaInputError(f"turn {turn} (from token {start}) has no assistant token ({mask} is 0 "
                          f"there)", column="turn_starts", row=row, rule="a token per turn")


def mask_length(got, tokens) -> MicaInputError:
    return MicaInputError(f"has {got} entries for {tokens} response tokens",
                          column="response_mask", rule="one per token")


def runs_in_turns(turns, runs) -> MicaInputError:
    return MicaInputError(f"{turns} turns hold {runs} runs of assistant tokens (a tool call "
                          f"inside a turn): verl's v1 advantage step would count each run as "
                          f"a turn; use layout='turn'", column="turn_start",
                          rule="one run per turn")
