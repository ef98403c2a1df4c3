"""Errors that a user can act on: the CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class Nar4recError(Exception):
    """An error caused by the user's input or environment, not by a bug in nar4rec."""


class DataError(Nar4recError):
    """A problem with an input file, located by file, row and field where known.

    Rows are 0-based positions in the file as it was read (for Parquet: the row index over the
    whole file; for text files: the line number, 1-based, header included).
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        row: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.file = None if file is None else str(file)
        self.row = row
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.file is not None:
            where.append(self.file)
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        return ": ".join([*where, self.message])
