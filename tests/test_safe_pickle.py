"""The restricted unpickler: every exploit shape we can build is refused before it runs (and writes nothing),
malformed files end in the package's error naming the file, and genuine PYSKL / NW-UCLA pickles of numpy 1.x
and 2.x still load."""
import contextlib
import copyreg
import os
import pickle
import pickletools
import shutil
import struct
import subprocess
import sys
import warnings
from collections import OrderedDict

import numpy as np
import pytest

from skelemix.data.errors import DataFormatError
from skelemix.data.pyskl import prepare_pyskl, read_pyskl
from skelemix.data.safe_pickle import UnsafePickleError, load, loads

# ---- hand assembly of pickle opcodes -------------------------------------------------------------------------


def _str(s: str) -> bytes:
    b = s.encode()
    return (pickle.SHORT_BINUNICODE + bytes([len(b)]) if len(b) < 256 else pickle.BINUNICODE
            + struct.pack("<I", len(b))) + b


def _stack_global(module: str, name: str) -> bytes:
    return _str(module) + _str(name) + pickle.STACK_GLOBAL


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _call(func: bytes, *args: bytes) -> bytes:
    """``func(*args)``: each of ``func`` and ``args`` is the opcodes that push one value."""
    return func + pickle.MARK + b"".join(args) + pickle.TUPLE + pickle.REDUCE


def _pickle(body: bytes, protocol: int = 4) -> bytes:
    return pickle.PROTO + bytes([protocol]) + body + pickle.STOP


def _int(v: int) -> bytes:
    return pickle.BININT + struct.pack("<i", v)


def _tuple(*items: bytes) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def _dtype(code: str, state: tuple, copy: bytes = pickle.NEWTRUE, module: str = "numpy") -> bytes:
    """A dtype made and built the way numpy writes one (``state`` as Python values of int, str or None)."""
    values = [_int(v) if isinstance(v, int) else _str(v) if isinstance(v, str) else pickle.NONE for v in state]
    return _call(_stack_global(module, "dtype"), _str(code), pickle.NEWFALSE, copy) + _tuple(*values) + pickle.BUILD


def _array(dtype: bytes, shape: tuple, data: bytes, mod="numpy._core.multiarray") -> bytes:
    """An ndarray made and built the way numpy writes one; ``data`` is the opcodes that push the raw data."""
    empty = _call(_stack_global(mod, "_reconstruct"), _stack_global("numpy", "ndarray"), _tuple(_int(0)),
                  pickle.SHORT_BINBYTES + b"\x01b")
    return empty + _tuple(_int(1), _tuple(*map(_int, shape)), dtype, pickle.NEWFALSE, data) + pickle.BUILD


def _short_bytes(b: bytes) -> bytes:
    return pickle.SHORT_BINBYTES + bytes([len(b)]) + b


def _pyskl(n=3, extra=None) -> dict:
    rng = np.random.default_rng(0)
    anns = [{"frame_dir": f"S001C001P001R001A{i + 1:03d}", "label": i, "total_frames": 5 + i, "img_shape": (1080, 1920),
             "keypoint": rng.normal(size=(1 + i % 2, 5 + i, 25, 3)).astype(np.float32 if i % 2 else np.float64),
             "keypoint_score": np.ones((1 + i % 2, 5 + i, 25), np.float16)} for i in range(n)]
    if extra:
        anns[-1].update(extra)
    return {"split": {"xsub_train": [a["frame_dir"] for a in anns[:2]], "xsub_val": [anns[2]["frame_dir"]]},
            "annotations": anns}


# ---- malicious pickles ----------------------------------------------------------------------------------------


class _Reduce:
    """Pickles as ``func(*args)``: what an attacker's pickler writes for any callable it names."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _touch_code(marker) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def _exec_by_builtins_get(module: str, name: str, marker, opcode="stack") -> bytes:
    """The reported exploit: a dotted global walks from ``numpy.dtypes`` to the builtins dict's ``get``,
    which hands out ``exec``."""
    get = _stack_global(module, name) if opcode == "stack" else _global(module, name)
    return _pickle(_call(_call(get, _str("exec")), _str(_touch_code(marker))))


def _payloads(marker) -> dict[str, bytes]:
    touch = f"touch {marker}"
    import posix
    out = {
        "dotted_stack_global_under_numpy_dtypes": _exec_by_builtins_get(
            "numpy.dtypes", "_add_dtype_helper.__builtins__.get", marker),
        "dotted_stack_global_numpy_dtypes_prefix": _exec_by_builtins_get(
            "numpy", "dtypes._add_dtype_helper.__builtins__.get", marker),
        "dotted_global_opcode_in_protocol_4": _exec_by_builtins_get(
            "numpy.dtypes", "_add_dtype_helper.__builtins__.get", marker, opcode="global"),
        "dotted_stack_global_via_loader": _exec_by_builtins_get(
            "numpy.dtypes", "__loader__.get_data.__func__.__builtins__.get", marker),
        "dotted_name_under_allowed_global": _pickle(_stack_global("numpy.core.multiarray", "_reconstruct.__self__")),
        "global_posix_system": _pickle(_call(_global("posix", "system"), _str(touch)), 2),
        "global_builtins_eval": _pickle(_call(_global("builtins", "eval"), _str(_touch_code(marker))), 2),
        "global___builtin___eval": _pickle(_call(_global("__builtin__", "eval"), _str(_touch_code(marker))), 2),
        "global_builtins_exec": _pickle(_call(_global("builtins", "exec"), _str(_touch_code(marker))), 2),
        "stack_global_subprocess_popen": _pickle(_call(
            _stack_global("subprocess", "Popen"), pickle.EMPTY_LIST + _str("touch") + pickle.APPEND
            + _str(str(marker)) + pickle.APPEND)),
        "global_builtins___import__": _pickle(_call(_global("builtins", "getattr"), _call(
            _global("builtins", "__import__"), _str("os")), _str("system")) + _str(touch) + pickle.TUPLE1
            + pickle.REDUCE, 2),
        "inst_os_system": pickle.MARK + pickle.UNICODE + touch.encode() + b"\n" + pickle.INST + b"os\nsystem\n"
        + pickle.STOP,
        "obj_os_system": _pickle(pickle.MARK + _global("os", "system") + _str(touch) + pickle.OBJ, 2),
        "inst_of_allowed_class": pickle.MARK + pickle.INST + b"collections\nOrderedDict\n" + pickle.STOP,
        "obj_of_allowed_class": _pickle(pickle.MARK + _global("collections", "OrderedDict") + pickle.OBJ, 2),
        "newobj_of_allowed_class": _pickle(_global("collections", "OrderedDict") + pickle.EMPTY_TUPLE
                                           + pickle.NEWOBJ, 2),
        "newobj_ex_of_allowed_class": _pickle(_stack_global("collections", "OrderedDict") + pickle.EMPTY_TUPLE
                                              + pickle.EMPTY_DICT + pickle.NEWOBJ_EX),
        "ext1_os_system": _pickle(pickle.EXT1 + bytes([0xF1]) + _str(touch) + pickle.TUPLE1 + pickle.REDUCE, 2),
        "ext2_posix_system": _pickle(pickle.EXT2 + struct.pack("<H", 0x7FF1) + _str(touch) + pickle.TUPLE1
                                  + pickle.REDUCE, 2),
        "ext4_subprocess_getoutput": _pickle(pickle.EXT4 + struct.pack("<i", 0x7FFFF1) + _str(touch) + pickle.TUPLE1
                                  + pickle.REDUCE, 2),
        "binpersid": _pickle(_str("os.system") + pickle.BINPERSID, 2),
        "persid": pickle.PERSID + b"os.system\n" + pickle.STOP,
        # BUILD on what an allowed global gives: the class itself, a container, a dtype class, a built array.
        "build_on_allowed_class": _pickle(_global("collections", "OrderedDict") + _tuple(
            pickle.NONE, pickle.EMPTY_DICT + _str("fromkeys") + _str("pwned") + pickle.SETITEM) + pickle.BUILD, 2),
        "build_on_allowed_instance": _pickle(_call(_global("collections", "OrderedDict")) + pickle.EMPTY_DICT
                                             + _str("__class__") + pickle.NONE + pickle.SETITEM + pickle.BUILD, 2),
        "build_on_dtype_class": _pickle(_stack_global("numpy.dtypes", "Float32DType") + _tuple(
            pickle.NONE, pickle.EMPTY_DICT + _str("__reduce__") + _str("pwned") + pickle.SETITEM) + pickle.BUILD),
        "build_twice_on_array": _pickle(_array(_dtype("f4", (3, "<", None, None, None, -1, -1, 0)), (1,),
                                               _short_bytes(b"\0\0\x80?")) + _tuple(
            _int(1), _tuple(_int(3)), _dtype("f4", (3, "<", None, None, None, -1, -1, 0)), pickle.NEWFALSE,
            _short_bytes(b"\0" * 12)) + pickle.BUILD),
        # An object dtype whose flags say "no objects": its array would read raw bytes as object pointers.
        "forged_object_dtype_flags": _pickle(_array(_dtype("O8", (3, "|", None, None, None, -1, -1, 0)), (1,),
                                                    _short_bytes(b"\x41" * 8))),
        "dtype_singleton_without_copy": _pickle(_dtype("f4", (3, ">", None, None, None, -1, -1, 0),
                                                       copy=pickle.NEWFALSE)),
        "structured_dtype_with_object_field": _pickle(_call(_stack_global("numpy", "dtype"), _str("f8,O"),
                                                            pickle.NEWFALSE, pickle.NEWTRUE)),
        "huge_reconstruct_shape": _pickle(_call(_stack_global("numpy.core.multiarray", "_reconstruct"),
                                                _stack_global("numpy", "ndarray"), _tuple(_int(2 ** 31 - 1)),
                                                _short_bytes(b"d"))),
        "huge_bytearray": _pickle(_call(_stack_global("builtins", "bytearray"), _int(2 ** 31 - 1))),
        "object_scalar": _pickle(_call(_stack_global("numpy._core.multiarray", "scalar"),
                                       _dtype("O8", (3, "|", None, None, None, -1, -1, 63)), _str("x"))),
        "codec_other_than_latin1": _pickle(_call(_global("_codecs", "encode"), _str("x"), _str("rot13")), 2),
        "append_onto_allowed_class": _pickle(_global("builtins", "bytearray") + _str("x") + pickle.APPEND, 2),
        "setitem_onto_array": _pickle(_array(_dtype("f4", (3, "<", None, None, None, -1, -1, 0)), (1,),
                                             _short_bytes(b"\0\0\x80?")) + _int(0) + _str("x") + pickle.SETITEM),
        # Names with a dot or a leading underscore next to allowed ones.
        "underscore_in_numpy": _pickle(_stack_global("numpy", "_core")),
        "underscore_in_numpy_dtypes": _pickle(_stack_global("numpy.dtypes", "_add_dtype_helper")),
        "underscore_codecs_decode": _pickle(_call(_stack_global("_codecs", "decode"), _short_bytes(b"x"),
                                                  _str("latin1"))),
        "numpy_load": _pickle(_call(_stack_global("numpy", "load"), _str(str(marker)))),
        "copyreg_reconstructor": _pickle(_stack_global("copyreg", "_reconstructor")),
        "dotted_allowed_name": _pickle(_stack_global("collections", "OrderedDict.fromkeys")),
        "out_of_band_buffer": _pickle(pickle.NEXT_BUFFER, 5),
    }
    for protocol in range(6):
        out[f"reduce_os_system_protocol_{protocol}"] = pickle.dumps(_Reduce(os.system, touch), protocol=protocol)
    out["reduce_posix_system"] = pickle.dumps(_Reduce(posix.system, touch))
    out["reduce_subprocess_popen"] = pickle.dumps(_Reduce(subprocess.Popen, ["touch", str(marker)]))
    out["reduce_builtins_exec"] = pickle.dumps(_Reduce(exec, _touch_code(marker)))
    out["object_array_with_evil_item"] = pickle.dumps(np.array([1, _Reduce(os.system, touch)], dtype=object))
    out["nested_in_valid_pyskl"] = pickle.dumps(_pyskl(extra={"note": [{"x": _Reduce(os.system, touch)}]}))
    return out


_KINDS = sorted(_payloads("marker"))
# What each kind must be refused for (the first matching prefix), so that none passes by an accident.
_REASONS = [("dotted", "to load global"), ("global", "to load global"), ("stack_global", "to load global"),
            ("reduce", "to load global"), ("underscore", "to load global"), ("numpy_load", "to load global"),
            ("copyreg", "to load global"), ("nested", "to load global"), ("object_array", "to load global"),
            ("obj_os", "to load global os.system"), ("obj_of", "opcode OBJ"), ("inst", "opcode INST"),
            ("newobj_ex", "opcode NEWOBJ_EX"), ("newobj", "opcode NEWOBJ"), ("ext", "opcode EXT[124]"),
            ("persid", "opcode PERSID"), ("binpersid", "opcode BINPERSID"), ("out_of_band", "opcode NEXT_BUFFER"),
            ("build", "BUILD on"), ("forged", "the state"), ("append", "APPEND onto"), ("setitem", "SETITEM onto"),
            ("", ".*: not the arguments numpy or pickle write")]


@contextlib.contextmanager
def _extensions():
    """Shell-running callables in copyreg's extension registry (as an earlier import could put them) for the
    EXT1/EXT2/EXT4 opcodes to name. Only while loading: the pickler would use them too."""
    entries = [("os", "system", 0xF1), ("posix", "system", 0x7FF1), ("subprocess", "getoutput", 0x7FFFF1)]
    for entry in entries:
        copyreg.add_extension(*entry)
    try:
        yield
    finally:
        for entry in entries:
            copyreg.remove_extension(*entry)


@pytest.mark.parametrize("kind", _KINDS)
def test_malicious_pickles_are_refused_and_run_nothing(kind, tmp_path):
    marker = tmp_path / "pwned"
    data = _payloads(marker)[kind]
    (tmp_path / "evil.pkl").write_bytes(data)
    reason = next(r for prefix, r in _REASONS if kind.startswith(prefix))
    with _extensions():
        with pytest.raises(UnsafePickleError, match=r"evil\.pkl: refusing " + reason):
            load(tmp_path / "evil.pkl")
        with pytest.raises(UnsafePickleError, match=r"^<bytes>: refusing "):
            loads(data)
    assert not marker.exists(), f"{kind} ran code"
    assert not hasattr(OrderedDict, "pwned") and OrderedDict.fromkeys != "pwned"
    assert np.dtype("f4").byteorder == "=" and np.dtype("f4").str == "<f4"


def test_errors_name_the_global_and_stay_short(tmp_path):
    with pytest.raises(UnsafePickleError, match=r"refusing to load global numpy\.dtypes\._add_dtype_helper\."
                                                r"__builtins__\.get: not on the allow-list"):
        loads(_exec_by_builtins_get("numpy.dtypes", "_add_dtype_helper.__builtins__.get", tmp_path / "m"))
    with pytest.raises(UnsafePickleError, match="refusing opcode INST"):
        loads(_payloads(tmp_path / "m")["inst_os_system"])
    for name in ("x" * 100_000, "system\n\rTraceback (most recent call last):"):
        with pytest.raises(UnsafePickleError) as err:
            loads(_pickle(_stack_global("os", name)))
        assert len(str(err.value)) < 400 and "\n" not in str(err.value) and "\r" not in str(err.value)
    with pytest.raises(DataFormatError, match=r"^<bytes>: not a readable pickle \(it ends early: truncated\?\)$"):
        loads(pickle.dumps(_pyskl())[:-1])


# ---- malformed pickles ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,data", [
    ("empty", b""),
    ("truncated", pickle.dumps(_pyskl(), protocol=4)[:300]),
    ("truncated_protocol_2", pickle.dumps(_pyskl(), protocol=2)[:-40]),
    ("garbage", bytes(range(256)) * 4),
    ("invalid_opcode", b"\x80\x04\xff."),
    ("unknown_protocol", b"\x80\x09N."),
    ("empty_stack_at_stop", b"\x80\x04."),
    ("text", b"frame_dir,label\nS001,1\n"),
    ("huge_decimal", b"I" + b"9" * 10_000 + b"\n."),
    ("unhashable_set_item", _pickle(pickle.EMPTY_SET + pickle.MARK + pickle.EMPTY_LIST + pickle.ADDITEMS)),
    ("array_data_of_wrong_length", _pickle(_array(_dtype("f4", (3, "<", None, None, None, -1, -1, 0)), (3,),
                                                  _short_bytes(b"\0\0\x80?")))),
    ("dtype_of_unknown_code", _pickle(_call(_stack_global("numpy", "dtype"), _str("f3"), pickle.NEWFALSE,
                                            pickle.NEWTRUE))),
    ("memo_miss", b"\x80\x04h\x07."),
])
def test_malformed_pickles_end_in_one_data_error_naming_the_file(tmp_path, name, data):
    path = tmp_path / f"{name}.pkl"
    path.write_bytes(data)
    with pytest.raises((DataFormatError, UnsafePickleError), match=rf"^{path}: ") as err:
        load(path)
    if isinstance(err.value, DataFormatError):
        assert "not a readable pickle" in str(err.value) and len(str(err.value)) < 400


# ---- genuine pickles ------------------------------------------------------------------------------------------

def _same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.flags.f_contiguous == b.flags.f_contiguous \
            and (a.tobytes() == b.tobytes() if not a.dtype.hasobject else all(map(_same, a.ravel(), b.ravel())))
    if isinstance(a, (np.generic, np.dtype)):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes() if isinstance(a, np.generic) else a == b
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _everything() -> dict:
    """What a PYSKL or NW-UCLA pickle (or a reasonable extension of one) holds."""
    rng = np.random.default_rng(1)
    return {
        "pyskl": _pyskl(),
        "arrays": [rng.normal(size=(2, 3)).astype(np.float32), rng.normal(size=(4,)), np.arange(12).reshape(3, 4),
                   np.arange(6, dtype=np.int32), np.arange(5, dtype=np.uint8), np.array([True, False]),
                   np.asfortranarray(rng.normal(size=(3, 5))), np.arange(20.0).reshape(4, 5)[:, ::2],
                   np.arange(4, dtype=">f4"), np.zeros((0, 25, 3), np.float32), np.array(3.5), np.array([1 + 2j]),
                   np.array(["ab", "c"]), np.array([b"x"]), np.array([1, "two", None, [3]], dtype=object),
                   np.ones(3, np.float16), np.arange(3, dtype=np.longdouble), np.zeros(2, "V4")],
        "scalars": [np.float32(2.5), np.float64(-1), np.int64(7), np.int8(-3), np.uint16(9), np.bool_(True),
                    np.complex64(1j), np.str_("ab"), np.bytes_(b"z"), np.dtype("f4"), np.dtype(">i2"), 3, 2.5,
                    -(2 ** 70), 1 + 2j, True, None, "text", b"", b"bytes", bytearray(b"ba")],
        "containers": (OrderedDict(b=1, a=2), {1, 2}, frozenset({"x"}), [], (), {"nested": [{"deep": (1, [2])}]}),
        "val_label": [{"file_name": "a05_s04_e02_v03", "length": 21, "label": 5}],
    }


@pytest.mark.parametrize("protocol", range(6))
def test_genuine_pickles_load_unchanged(tmp_path, protocol):
    data = pickle.dumps(_everything(), protocol=protocol)
    expected = pickle.loads(data)  # differs from _everything() only in byte order: numpy unpickles to native
    assert _same(loads(data), expected)
    (tmp_path / "ok.pkl").write_bytes(data)
    assert _same(load(tmp_path / "ok.pkl"), expected)
    ours, theirs = loads(data)["arrays"], pickle.loads(data)["arrays"]
    assert [a.flags.writeable for a in ours] == [a.flags.writeable for a in theirs]


def _numpy1(data: bytes) -> bytes:
    """numpy 2 pickle bytes of protocol 0-3 as numpy 1.x writes them (its module was numpy.core)."""
    assert b"numpy._core." in data
    return data.replace(b"numpy._core.", b"numpy.core.")


@pytest.mark.parametrize("protocol", range(6))
def test_numpy_1_pickles_load_under_numpy_2(monkeypatch, protocol):
    obj = _everything()
    expected = pickle.loads(pickle.dumps(obj, protocol=protocol))
    if protocol < 4:  # GLOBAL opcodes: module and name are text lines
        data = _numpy1(pickle.dumps(obj, protocol=protocol))
    else:  # STACK_GLOBAL with length-prefixed names inside frames: let the pickler write the 1.x module paths
        multiarray = sys.modules["numpy._core.multiarray"]
        frombuffer = np.empty(3).__reduce_ex__(5)[0]
        monkeypatch.setattr(multiarray._reconstruct, "__module__", "numpy.core.multiarray")
        monkeypatch.setattr(multiarray.scalar, "__module__", "numpy.core.multiarray")
        monkeypatch.setattr(frombuffer, "__module__", "numpy.core.numeric")
        with warnings.catch_warnings():  # pickle checks the names by importing numpy.core, which warns
            warnings.simplefilter("ignore", DeprecationWarning)
            data = pickle.dumps(obj, protocol=protocol)
        monkeypatch.undo()
    modules = {arg.split()[0] if " " in arg else arg for op, arg, _ in pickletools.genops(data)
               if op.name in ("GLOBAL", "SHORT_BINUNICODE") and isinstance(arg, str) and arg.startswith("numpy.")}
    assert "numpy.core.multiarray" in modules and not any("_core" in m for m in modules), modules
    with warnings.catch_warnings():  # numpy 2 warns when numpy.core is touched: the unpickler imports nothing
        warnings.simplefilter("error")
        assert _same(loads(data), expected)


def test_numpy_1_protocol_2_array_written_by_hand():
    """A float32 (2, 3) array and a float64 scalar byte for byte as numpy 1.x writes them at protocol 2."""
    f4 = _global("numpy", "dtype") + _str("f4") + pickle.NEWFALSE + pickle.NEWTRUE + pickle.TUPLE3 \
        + pickle.REDUCE + _tuple(_int(3), _str("<"), pickle.NONE, pickle.NONE, pickle.NONE, _int(-1), _int(-1),
                                 _int(0)) + pickle.BUILD
    raw = np.arange(6, dtype="<f4").tobytes()
    encode = _global("_codecs", "encode")
    array = _global("numpy.core.multiarray", "_reconstruct") + _global("numpy", "ndarray") + _int(0) \
        + pickle.TUPLE1 + encode + _str("b") + _str("latin1") + pickle.TUPLE2 + pickle.REDUCE + pickle.TUPLE3 \
        + pickle.REDUCE + _tuple(_int(1), b"K\x02K\x03" + pickle.TUPLE2, f4, pickle.NEWFALSE,
                                 encode + _str(raw.decode("latin1")) + _str("latin1") + pickle.TUPLE2
                                 + pickle.REDUCE) + pickle.BUILD
    f8 = f4.replace(_str("f4"), _str("f8"))
    scalar = _global("numpy.core.multiarray", "scalar") + f8 + encode + _str(np.float64(0.25).tobytes()
                                                                                .decode("latin1")) \
        + _str("latin1") + pickle.TUPLE2 + pickle.REDUCE + pickle.TUPLE2 + pickle.REDUCE
    out = loads(_pickle(pickle.EMPTY_LIST + array + pickle.APPEND + scalar + pickle.APPEND, 2))
    assert _same(out, [np.arange(6, dtype=np.float32).reshape(2, 3), np.float64(0.25)])


# ---- through the entry points ---------------------------------------------------------------------------------

def test_pyskl_preparation_refuses_an_evil_annotation_file(tmp_path):
    marker = tmp_path / "pwned"
    for kind in ("nested_in_valid_pyskl", "dotted_stack_global_under_numpy_dtypes", "reduce_os_system_protocol_4"):
        evil = tmp_path / f"{kind}.pkl"
        evil.write_bytes(_payloads(marker)[kind])
        with pytest.raises(UnsafePickleError, match=rf"{kind}\.pkl: refusing"):
            prepare_pyskl(evil, tmp_path / "out", progress=False)
        proc = subprocess.run([sys.executable, "-m", "skelemix.data", "prepare", "pyskl", "--raw", str(evil),
                               "--out", str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and f"{kind}.pkl: refusing" in proc.stderr, proc.stderr
        assert not marker.exists() and not (tmp_path / "out").exists()
    good = tmp_path / "good.pkl"
    good.write_bytes(pickle.dumps(_pyskl(), protocol=2))
    assert sorted(read_pyskl(good)["split"]) == ["xsub_train", "xsub_val"]
    report = prepare_pyskl(good, tmp_path / "out", frames=8, progress=False)
    assert report.sizes == {"xsub": {"train": 2, "val": 1}}


def _nwucla_raw(shared_data, tmp_path):
    raw = tmp_path / "raw"
    (raw / "all_sqe").mkdir(parents=True)
    for n in ("a01_s01_e00_v01", "a12_s10_e01_v03"):
        shutil.copy(shared_data / "nw-ucla" / "all_sqe" / f"{n}.json", raw / "all_sqe")
    return raw


@pytest.mark.needs_data
def test_nwucla_refuses_an_evil_val_label_pkl(shared_data, tmp_path):
    from skelemix.data.nwucla import prepare_nwucla
    raw, marker = _nwucla_raw(shared_data, tmp_path), tmp_path / "pwned"
    real = load(shared_data / "nw-ucla" / "val_label.pkl")
    assert len(real) == 464 and set(real[0]) == {"file_name", "length", "label"}
    for kind in ("dotted_stack_global_under_numpy_dtypes", "reduce_os_system_protocol_2", "inst_os_system"):
        (raw / "val_label.pkl").write_bytes(_payloads(marker)[kind])
        with pytest.raises(UnsafePickleError, match=r"val_label\.pkl: refusing"):
            prepare_nwucla(raw, tmp_path / "out", workers=1, progress=False)
        proc = subprocess.run([sys.executable, "-m", "skelemix.data", "prepare", "nwucla", "--raw", str(raw),
                               "--out", str(tmp_path / "out"), "--workers", "1", "--no-progress"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and "val_label.pkl: refusing" in proc.stderr, proc.stderr
        assert not marker.exists() and not (tmp_path / "out" / "meta.json").exists()
    (raw / "val_label.pkl").write_bytes((shared_data / "nw-ucla" / "val_label.pkl").read_bytes()[:200])
    with pytest.raises(DataFormatError, match=r"val_label\.pkl: not a readable pickle"):
        prepare_nwucla(raw, tmp_path / "out", workers=1, progress=False)
    # The genuine list, cut down to the one view-3 file present, passes the check.
    listed = [e for e in real if e["file_name"] == "a12_s10_e01_v03"]
    (raw / "val_label.pkl").write_bytes(pickle.dumps(listed))
    report = prepare_nwucla(raw, tmp_path / "out", workers=1, progress=False)
    assert report.sizes == {None: {"train": 1, "val": 1}}

