"""The error every dataset converter raises for bad input: it names the file, the line (or sample) and what
was expected, so a corrupt file among 100k is found without a debugger."""
from __future__ import annotations

import os


class DataFormatError(ValueError):
    """Malformed raw data. ``str(err)`` is ``"<file>:<line>: <what was expected and what was found>"``."""

    def __init__(self, path: str | os.PathLike, message: str, line: int | None = None):
        self.path, self.line, self.message = str(path), line, message
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {message}")

    def __reduce__(self):  # travels back from worker processes intact
        return DataFormatError, (self.path, self.message, self.line)
