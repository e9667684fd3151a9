"""Load pickles without executing their content: only plain containers, scalars and numpy arrays.

``pickle.load`` runs whatever callable a file names, so a downloaded annotation file could run code on
load. :func:`load` resolves only the few globals needed to rebuild numpy arrays and dtypes (and
``_codecs.encode``, which protocol-2 pickles use for bytes); anything else raises
:class:`UnsafePickleError` naming the global, before it is called.
"""
from __future__ import annotations

import io
import os
import pickle

ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"), ("builtins", "bytearray"),
    ("collections", "OrderedDict"),
}


class UnsafePickleError(pickle.UnpicklingError):
    pass


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module, name):
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)  # protocols 0-2
        if (module, name) in ALLOWED or (module == "numpy" and name.startswith("dtypes.")) \
                or module in ("numpy.dtypes", "numpy._core.dtypes", "numpy.core.dtypes"):
            return super().find_class(module, name)
        raise UnsafePickleError(f"{self.source}: refusing to load global {module}.{name}: only plain containers, "
                                "scalars and numpy arrays are allowed (the file may execute code if unpickled "
                                "normally)")

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source}: persistent ids are not allowed")


def load(path: str | os.PathLike):
    """Unpickle the file at ``path`` with the restricted unpickler."""
    with open(path, "rb") as f:
        return _Unpickler(f, str(path)).load()


def loads(data: bytes, source: str = "<bytes>"):
    return _Unpickler(io.BytesIO(data), source).load()
