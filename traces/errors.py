"""The one exception type for bad trace input, so callers (and the CLI) can catch it cleanly."""

from __future__ import annotations

from pathlib import Path


class TraceError(ValueError):
    """Bad trace input. The message names the file, the line (or parquet row) and the field.

    Keeping the location as attributes lets tests and tools check *where* the error is without
    parsing the message.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        row: int | None = None,
        field: str | None = None,
    ) -> None:
        self.reason = message
        self.file = None if file is None else str(file)
        self.line = line
        self.row = row
        self.field = field
        parts = []
        if self.file is not None:
            parts.append(self.file)
        if line is not None:
            parts.append(f"line {line}")
        if row is not None:
            parts.append(f"row {row}")
        if field is not None:
            parts.append(f"field {field!r}")
        where = ", ".join(parts)
        super().__init__(f"{where}: {message}" if where else message)
