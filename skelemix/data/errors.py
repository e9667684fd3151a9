"""The error every dataset converter raises for bad input: it names the file, the line (or sample) and what
was expected, so a corrupt file among 100k is found without a debugger. Also the rule for names that come
from data files and become file names or lines of a list (:func:`check_name`)."""
from __future__ import annotations

import os
import reprlib

MAX_NAME_BYTES = 200  # leaves room for "_names.txt" and the like under the usual 255-byte file-name limit

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlevel, _short.maxlist, _short.maxdict = 2, 4, 4


class DataFormatError(ValueError):
    """Malformed raw data. ``str(err)`` is ``"<file>:<line>: <what was expected and what was found>"``, one
    line even when the file name holds a newline."""

    skippable = False  # set where --skip-bad would have left the input out (the CLI then suggests it)

    def __init__(self, path: str | os.PathLike, message: str, line: int | None = None):
        self.path, self.line, self.message = str(path), line, message
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{printable(where)}: {printable(message)}")

    def __reduce__(self):  # travels back from worker processes intact
        return DataFormatError, (self.path, self.message, self.line)


def printable(text: str) -> str:
    """``text``, or its ``repr`` where it holds a control character: a newline in a file name must not split
    a one-line message or a line of a list."""
    return text if text.isprintable() else repr(text)


def quote(value) -> str:
    """A short ``repr`` of a value from a file for a message (bytes decoded; long or deep values cut)."""
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return _short.repr(value)


def check_name(name, path, what: str) -> str:
    """Return ``name`` if it can become a file name or a line of a list; raise :class:`DataFormatError`
    (naming ``path``, the file it came from) otherwise. Names in data files are untrusted: ``../x`` or
    ``/abs`` would write (and with ``--force`` delete) outside the output folder, a newline would add a
    line to ``<split>_names.txt``."""
    if not isinstance(name, str):
        raise DataFormatError(path, f"{what} must be a string; found {type(name).__name__} {quote(name)}")
    problem = ("is empty" if not name
               else "contains a path separator" if "/" in name or "\\" in name
               else "contains '..'" if ".." in name
               else "starts with '.'" if name.startswith(".")
               else "contains a control or other non-printable character" if not name.isprintable()
               else "starts or ends with a space" if name != name.strip()
               else f"is longer than {MAX_NAME_BYTES} bytes" if len(name.encode()) > MAX_NAME_BYTES
               else None)
    if problem:
        raise DataFormatError(path, f"refusing {what} {quote(name)}: it {problem} (names from data files become "
                              "file names and lines of lists)")
    return name
