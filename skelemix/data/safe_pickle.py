"""Load pickles without executing their content: plain containers, scalars and numpy arrays only.

``pickle.load`` calls whatever the file names, so a downloaded annotation file could run code on load.
:func:`load` runs the file on a restricted pickle machine instead, and refuses with
:class:`UnsafePickleError` (naming the file and what was asked for) before anything outside these rules runs:

- Globals come from an exact allow-list of ``(module, name)`` pairs: numpy's array, scalar and dtype
  constructors under both the numpy 1.x (``numpy.core``) and 2.x (``numpy._core``) paths, the plain
  ``numpy.dtypes`` classes, and the few builtins protocols 0-3 use for sets, bytes and complex numbers. The
  pairs map to objects taken when this module is imported: nothing named in a file is imported or looked up
  attribute by attribute, so a dotted name cannot walk anywhere.
- Opcodes come from a fixed set (default deny): INST, OBJ, NEWOBJ and NEWOBJ_EX (they instantiate classes),
  EXT1/2/4 (they name globals through copyreg's extension registry), persistent ids and out-of-band buffers
  are refused.
- REDUCE calls only the allowed callables, each with arguments of the exact form numpy and pickle write
  (a dtype from a plain type code and always a copy, never numpy's shared instance; an array allocated
  empty; a buffer whose length matches its shape).
- BUILD sets the state of an array or dtype this file has just made, once, and only to a state of the form
  numpy writes. A dtype's state must equal that of the plain dtype its code names: numpy trusts the flags in
  it, and a forged state could declare that an object dtype holds no objects, after which an array's raw
  bytes would be used as object pointers. Object arrays take their items as a list, from this same machine.
- APPEND, SETITEM and ADDITEMS only fill lists, dicts and sets.

Any other failure inside the file (truncation, garbage, a numpy error on a malformed array) becomes a
:class:`~skelemix.data.errors.DataFormatError` "not a readable pickle", naming the file.

Why not torch's weights-only unpickler (``torch._weights_only_unpickler``)? It is private API with no
promise of stability, and it implements only what ``torch.save`` writes: protocol 2. Pickles of protocols
0, 1, 3, 4 and 5 are refused (Python has written protocol 4 by default since 3.8, so genuine PYSKL and
NW-UCLA files are among them), and numpy is admitted only through process-wide safe-global registrations that
would loosen checkpoint loading as well. The machine here is instead the standard library's pure-Python
``pickle._Unpickler`` (the reference implementation that CPython tests opcode by opcode against the C one),
with its dispatch table cut down to the opcodes above; the rules specific to this project are the short
tables below. It reads a protocol-4 PYSKL file about five times slower than ``pickle.load`` (some 50 µs per
annotation, 6 s for NTU-120's 114k), small next to preparing the samples.
"""
from __future__ import annotations

import codecs
import collections
import io
import math
import os
import pickle
import pickletools
import re
import reprlib

import numpy as np

from .errors import DataFormatError


class UnsafePickleError(pickle.UnpicklingError):
    """A file that asks for something outside the allow-list; ``str(err)`` starts with the file."""


def _clip(text: str, limit: int = 100) -> str:
    """``text`` for a one-line message: control characters escaped, at most ``limit`` characters."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: limit + 1])
    return text if len(text) <= limit else text[:limit] + "..."


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60

# numpy's reconstruction functions as numpy itself hands them to pickle: the same objects whichever module path
# (numpy.core in 1.x, numpy._core in 2.x) this numpy has, and numpy.core, deprecated in 2.x, is never imported.
_reconstruct = np.empty(0).__reduce__()[0]
_scalar = np.float64(0).__reduce__()[0]
_frombuffer = np.empty(1).__reduce_ex__(5)[0]

_DTYPE_CLASSES = (
    "BoolDType", "Int8DType", "UInt8DType", "Int16DType", "UInt16DType", "Int32DType", "UInt32DType", "Int64DType",
    "UInt64DType", "ByteDType", "UByteDType", "ShortDType", "UShortDType", "IntDType", "UIntDType", "LongDType",
    "ULongDType", "LongLongDType", "ULongLongDType", "Float16DType", "Float32DType", "Float64DType",
    "LongDoubleDType", "Complex64DType", "Complex128DType", "CLongDoubleDType", "BytesDType", "StrDType",
    "VoidDType", "ObjectDType")

ALLOWED = {
    **{(m, "_reconstruct"): _reconstruct for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): _scalar for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): _frombuffer for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # The dtype classes themselves (numpy >= 1.25): values only, never called or built.
    **{("numpy.dtypes", n): getattr(np.dtypes, n) for n in _DTYPE_CLASSES if hasattr(getattr(np, "dtypes", None), n)},
    ("_codecs", "encode"): codecs.encode,  # protocols 0-2 write bytes as encode(str, "latin1")
    **{(m, f.__name__): f for m in ("builtins", "__builtin__") for f in (set, frozenset, complex, bytes, bytearray)},
    ("collections", "OrderedDict"): collections.OrderedDict,
}
"""Every global a file may name, mapped to the object it gets."""

_DTYPE_CODE = re.compile(r"[biufcSUVO]\d+")  # what numpy writes for unstructured dtypes ("f4", "U12", "O8")


def _is_shape(x) -> bool:
    return type(x) is tuple and all(type(n) is int and n >= 0 for n in x)


def _is_raw(data, dtype, shape) -> bool:
    """``data`` holds exactly the bytes of an array of ``dtype`` and ``shape`` without objects."""
    return type(data) in (bytes, bytearray) and not dtype.hasobject and len(data) == math.prod(shape) * dtype.itemsize


# callable -> (shown name, check of the argument tuple: the exact forms numpy and pickle write)
_CALLS = {
    _reconstruct: ("numpy _reconstruct", lambda a: len(a) == 3 and a[0] is np.ndarray and _is_shape(a[1])
                   and a[1] == (0,) and type(a[2]) in (bytes, str) and a[2] in (b"b", "b")),
    _scalar: ("numpy scalar", lambda a: len(a) == 2 and isinstance(a[0], np.dtype) and _is_raw(a[1], a[0], ())),
    _frombuffer: ("numpy _frombuffer", lambda a: len(a) == 4 and isinstance(a[1], np.dtype) and _is_shape(a[2])
                  and _is_raw(a[0], a[1], a[2]) and type(a[3]) is str and a[3] in ("C", "F")),
    np.dtype: ("numpy dtype", lambda a: len(a) == 3 and type(a[0]) is str and _DTYPE_CODE.fullmatch(a[0]) is not None
               and type(a[1]) in (bool, int) and a[1] == 0 and type(a[2]) in (bool, int) and a[2] == 1),
    codecs.encode: ("_codecs encode", lambda a: len(a) == 2 and type(a[0]) is str and type(a[1]) is str
                      and a[1] == "latin1"),
    bytes: ("bytes", lambda a: a == ()),
    bytearray: ("bytearray", lambda a: a == () or (len(a) == 1 and type(a[0]) is bytes)),
    set: ("set", lambda a: a == () or (len(a) == 1 and type(a[0]) is list)),
    frozenset: ("frozenset", lambda a: a == () or (len(a) == 1 and type(a[0]) is list)),
    complex: ("complex", lambda a: len(a) == 2 and all(type(x) in (int, float) for x in a)),
    collections.OrderedDict: ("OrderedDict", lambda a: a == ()),
}
_CALLS_BY_ID = {id(f): (f, *entry) for f, entry in _CALLS.items()}


def _expected_dtype_state(code: str, byteorder) -> tuple:
    """The state numpy writes for the plain dtype ``code`` in ``byteorder``."""
    dtype = np.dtype(code)
    if type(byteorder) is str and byteorder in ("<", ">"):
        dtype = dtype.newbyteorder(byteorder)
    return dtype.__reduce__()[2]


def _same_values(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(type(x) is type(y) and x == y for x, y in zip(a, b))


def _is_array_state(state) -> bool:
    if not (type(state) is tuple and len(state) == 5):
        return False
    version, shape, dtype, fortran, data = state
    if not (type(version) is int and version == 1 and _is_shape(shape) and isinstance(dtype, np.dtype)
            and type(fortran) is bool):
        return False
    if dtype.hasobject:  # the items, already unpickled by this machine
        return type(data) is list and len(data) == math.prod(shape)
    return _is_raw(data, dtype, shape)


_SAFE_OPCODES = """MARK STOP POP POP_MARK DUP FLOAT INT BININT BININT1 LONG BININT2 NONE BINFLOAT LONG1 LONG4 STRING
    BINSTRING SHORT_BINSTRING UNICODE BINUNICODE SHORT_BINUNICODE BINUNICODE8 BINBYTES SHORT_BINBYTES BINBYTES8
    BYTEARRAY8 EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_LIST LIST EMPTY_DICT DICT EMPTY_SET FROZENSET NEWTRUE
    NEWFALSE GET BINGET LONG_BINGET PUT BINPUT LONG_BINPUT MEMOIZE PROTO FRAME GLOBAL STACK_GLOBAL""".split()
_WHY_REFUSED = {
    "INST": "it instantiates a class", "OBJ": "it instantiates a class", "NEWOBJ": "it instantiates a class",
    "NEWOBJ_EX": "it instantiates a class", "EXT1": "it names a global through copyreg's extension registry",
    "EXT2": "it names a global through copyreg's extension registry",
    "EXT4": "it names a global through copyreg's extension registry", "PERSID": "persistent ids are not allowed",
    "BINPERSID": "persistent ids are not allowed", "NEXT_BUFFER": "out-of-band buffers are not allowed",
    "READONLY_BUFFER": "out-of-band buffers are not allowed",
}


class _Dispatch(dict):
    def __missing__(self, code):
        raise pickle.UnpicklingError(f"invalid opcode {code:#04x}")


class _Unpickler(pickle._Unpickler):
    """The standard library's pure-Python unpickler with every opcode that can reach code guarded or removed."""

    dispatch = _Dispatch()

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source
        self.unbuilt = {}  # id -> (object, kind, its constructor's arguments): arrays and dtypes awaiting BUILD

    def refuse(self, what: str) -> UnsafePickleError:
        return UnsafePickleError(f"{self.source}: refusing {what}")

    def find_class(self, module, name):
        try:
            return ALLOWED[module, name]
        except KeyError:
            raise self.refuse(f"to load global {_clip(module)}.{_clip(name)}: not on the allow-list of numpy array, "
                              "scalar and dtype constructors and plain containers (unpickled normally, the file "
                              "could run code)") from None

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        func_, name, check = _CALLS_BY_ID.get(id(func), (None, None, None))
        if func_ is not func:
            raise self.refuse(f"to call {_repr.repr(func)}: only numpy's array, scalar and dtype constructors and "
                              "plain containers may be called")
        if type(args) is not tuple or not check(args):
            raise self.refuse(f"{name}{_repr.repr(args)}: not the arguments numpy or pickle write")
        out = self.stack[-1] = func(*args)
        if func is _reconstruct or func is np.dtype:
            self.unbuilt[id(out)] = (out, args)

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        obj, args = self.unbuilt.pop(id(inst), (None, None))
        if obj is not inst:
            raise self.refuse(f"BUILD on {_repr.repr(inst)}: only an array or dtype just made by this file takes "
                              "a state, once")
        if isinstance(inst, np.dtype):
            ok = type(state) is tuple and len(state) > 1 and _same_values(state,
                                                                          _expected_dtype_state(args[0], state[1]))
        else:
            ok = _is_array_state(state)
        if not ok:
            raise self.refuse(f"the state {_repr.repr(state)} for {_repr.repr(inst)}: not the form numpy writes")
        type(inst).__setstate__(inst, state)

    def _target(self, opcode: str, kinds: tuple):
        target = self.stack[-1]
        if type(target) not in kinds:
            raise self.refuse(f"{opcode} onto a {type(target).__name__}: only "
                              f"{' and '.join(k.__name__ for k in kinds)} objects take items")
        return target

    def load_append(self):
        value = self.stack.pop()
        self._target("APPEND", (list,)).append(value)

    def load_appends(self):
        items = self.pop_mark()
        self._target("APPENDS", (list,)).extend(items)

    def load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        self._target("SETITEM", (dict, collections.OrderedDict))[key] = value

    def load_setitems(self):
        items = self.pop_mark()
        target = self._target("SETITEMS", (dict, collections.OrderedDict))
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def load_additems(self):
        items = self.pop_mark()
        self._target("ADDITEMS", (set,)).update(items)


def _refused(name: str):
    def handler(self):
        raise self.refuse(f"opcode {name} ({_WHY_REFUSED.get(name, 'not needed by plain data')})")
    return handler


_GUARDED = {"REDUCE": _Unpickler.load_reduce, "BUILD": _Unpickler.load_build, "APPEND": _Unpickler.load_append,
            "APPENDS": _Unpickler.load_appends, "SETITEM": _Unpickler.load_setitem,
            "SETITEMS": _Unpickler.load_setitems, "ADDITEMS": _Unpickler.load_additems}
for _op in pickletools.opcodes:
    _code = _op.code.encode("latin-1")[0]
    _Unpickler.dispatch[_code] = (_GUARDED[_op.name] if _op.name in _GUARDED
                                  else pickle._Unpickler.dispatch[_code] if _op.name in _SAFE_OPCODES
                                  else _refused(_op.name))


def _load(file, source: str):
    try:
        return _Unpickler(file, source).load()
    except UnsafePickleError:
        raise
    except EOFError:
        raise DataFormatError(source, "not a readable pickle (it ends early: truncated?)") from None
    except Exception as err:  # noqa: BLE001 - whatever a malformed file makes the machine or numpy raise
        raise DataFormatError(source, f"not a readable pickle ({type(err).__name__}: {_clip(str(err), 200)})") \
            from None


def load(path: str | os.PathLike):
    """Unpickle the file at ``path`` with the restricted machine. Raises :class:`UnsafePickleError` for anything
    outside the allow-list and :class:`~skelemix.data.errors.DataFormatError` for a malformed file or one that
    cannot be read (a FIFO or a directory included)."""
    from .prepare import read_file

    return loads(read_file(path), str(path))


def loads(data: bytes, source: str = "<bytes>"):
    """:func:`load` for bytes in memory; ``source`` names them in errors."""
    return _load(io.BytesIO(data), source)
