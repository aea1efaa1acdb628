"""Errors raised at mica's input boundary."""


class MicaInputError(ValueError):
    """Invalid input: names the column (or argument), the first offending row and the rule.

    Subclasses :class:`ValueError` so generic handlers keep working.
    """

    def __init__(self, message, *, column=None, row=None, rule=None):
        self.detail = message
        self.column = column
        self.row = row
        self.rule = rule
        parts = []
        if column is not None:
            parts.append(f"column {column!r}")
        if row is not None:
            parts.append(f"row {row}")
        prefix = (", ".join(parts) + ": ") if parts else ""
        suffix = f" (rule: {rule})" if rule else ""
        super().__init__(prefix + message + suffix)

    def with_row(self, row) -> "MicaInputError":
        """The same error naming another row (e.g. counted from a dataset's start, or the
        table row that holds a list element)."""
        return MicaInputError(self.detail, column=self.column, row=row, rule=self.rule)
