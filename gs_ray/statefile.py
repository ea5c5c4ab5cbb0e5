"""State trees on disk without pickle: arrays as raw bytes in one ``.bin`` file (dtype, shape
and offset in JSON; never unpickled), everything else in JSON beside them.

A run directory may come from someone else (a shared file system, a copied half-finished run),
so resuming must never run code from it: ``pickle.load`` of a crafted checkpoint does. A state
here is a tree of dicts, lists, tuples, sets, deques, strings, numbers, booleans, None and numpy
arrays (numeric, boolean or fixed-width string dtypes); anything else is refused when saving, with
the path of the offending value. Dict keys may be strings, numbers or tuples of them.

Layout (format 2): ``NAME.0.bin`` or ``NAME.1.bin`` (saves alternate, ``bin`` in the JSON
names the current one) holds the arrays' bytes one after another (64-byte aligned);
``NAME.json`` holds ``arrays`` (``a0, a1, ...`` -> dtype, shape, offset) and the tree, where an
array is ``{"__array__": "a3"}``, a tuple ``{"__tuple__": [...]}``, a set ``{"__set__": [...]}``,
a deque ``{"__deque__": {"items": [...], "maxlen": N}}``
and a dict whose keys are not all strings ``{"__items__": [[key, value], ...]}``. The JSON file
is written last: its presence marks a complete state. Arrays are written straight from memory:
no copy of the state, no zip checksum (format 1, an ``.npz`` read with ``allow_pickle=False``,
took 2.5 s with its copy for a K = 16 exact cache of 671 MB; format 2 writes it in about 0.2 s
once both files exist). Format 1 files of an older gs-ray are still read.
"""

from __future__ import annotations

import json
import math
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from gs_ray.io import atomic_write_text

_TAGS = ("__array__", "__tuple__", "__set__", "__items__", "__float__", "__deque__")


class StateFileError(ValueError):
    """A state that cannot be stored without pickle, or a state file that is not one."""


def _encode(x: Any, arrays: dict[str, np.ndarray], where: str) -> Any:
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, (float, np.floating)):
        v = float(x)
        return v if math.isfinite(v) else {"__float__": repr(v)}
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biufcSU":
            raise StateFileError(
                f"{where}: arrays of dtype {x.dtype} cannot be stored without pickle"
            )
        key = f"a{len(arrays)}"
        arrays[key] = x
        return {"__array__": key}
    if isinstance(x, tuple):
        return {"__tuple__": [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(x)]}
    if isinstance(x, deque):
        items = [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(x)]
        return {"__deque__": {"items": items, "maxlen": x.maxlen}}
    if isinstance(x, (set, frozenset)):
        return {"__set__": [_encode(v, arrays, f"{where}{{}}") for v in sorted(x, key=repr)]}
    if isinstance(x, list):
        return [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, dict):
        if all(isinstance(k, str) for k in x) and not any(k in _TAGS for k in x):
            return {k: _encode(v, arrays, f"{where}.{k}") for k, v in x.items()}
        return {
            "__items__": [
                [_encode(k, arrays, f"{where} key"), _encode(v, arrays, f"{where}[{k!r}]")]
                for k, v in x.items()
            ]
        }
    raise StateFileError(f"{where}: a {type(x).__name__} cannot be stored without pickle")


def _decode(x: Any, arrays: Any, where: str) -> Any:
    if isinstance(x, list):
        return [_decode(v, arrays, where) for v in x]
    if not isinstance(x, dict):
        return x
    if len(x) == 1:
        ((tag, value),) = x.items()
        if tag == "__array__":
            if not isinstance(value, str) or value not in arrays.files:
                raise StateFileError(f"{where}: array {value!r} is not in the state's arrays")
            return arrays[value]
        if tag == "__tuple__":
            return tuple(_decode(v, arrays, where) for v in value)
        if tag == "__set__":
            return {_decode(v, arrays, where) for v in value}
        if tag == "__deque__":
            return deque((_decode(v, arrays, where) for v in value["items"]), value["maxlen"])
        if tag == "__float__":
            return float(value)
        if tag == "__items__":
            return {_decode(k, arrays, where): _decode(v, arrays, where) for k, v in value}
    return {k: _decode(v, arrays, where) for k, v in x.items()}


FORMAT = "gs-ray state 2"
_FORMAT_NPZ = "gs-ray state 1"  # an older gs-ray's: arrays in NAME.npz
_ALIGN = 64


def _bin_names(name: str) -> tuple[str, str]:
    """The two array files a state alternates between."""
    return f"{name}.0.bin", f"{name}.1.bin"


def _current_bin(folder: Path, name: str) -> str | None:
    """The array file the state saved under ``folder/NAME`` names, if it is one of ours."""
    try:
        doc = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc.get("bin") if isinstance(doc, dict) and doc.get("bin") in _bin_names(name) else None


def save_state(folder: str | Path, name: str, state: Any) -> Path:
    """Write ``state`` as ``folder/NAME.json`` and the arrays file it names; returns the JSON
    path. The arrays go to the one of ``NAME.0.bin`` / ``NAME.1.bin`` that the current JSON
    does not name, overwritten in place (4x faster here than a new file: the page cache keeps
    its pages), and the JSON, replaced atomically and last, then names it: a crash at any
    point leaves a complete state. The arrays are written from memory as they are (the
    caller must not change them meanwhile: the centroid host saves between batches)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    tree = _encode(state, arrays, name)
    index: dict[str, dict[str, Any]] = {}
    first, second = _bin_names(name)
    target = second if _current_bin(folder, name) == first else first
    raw = folder / target
    with raw.open("r+b" if raw.exists() else "wb") as f:
        offset = 0
        for key, a in arrays.items():
            a = np.asarray(a, order="C")  # the array itself where it is C-ordered (usual)
            pad = -offset % _ALIGN
            f.write(b"\0" * pad)
            offset += pad
            index[key] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset}
            f.write(a.reshape(-1).view(np.uint8))
            offset += a.nbytes
        f.truncate()
    path = folder / f"{name}.json"
    doc = {"format": FORMAT, "bin": target, "arrays": index, "state": tree}
    atomic_write_text(path, json.dumps(doc) + "\n")
    return path


class _RawArrays:
    """The arrays of a format-2 state, read on demand from NAME.bin by the JSON's index; every
    field checked (a plain dtype, a shape and an offset inside the file), nothing unpickled."""

    def __init__(self, path: Path, index: Any):
        if not isinstance(index, dict):
            raise StateFileError(f"{path}: 'arrays' is not a mapping")
        self.path, self.index, self.size = path, index, path.stat().st_size
        self.files = list(index)

    def __getitem__(self, key: str) -> np.ndarray:
        entry = self.index[key]
        try:
            dtype = np.dtype(str(entry["dtype"]))
            shape = tuple(int(n) for n in entry["shape"])
            offset = int(entry["offset"])
        except (KeyError, TypeError, ValueError) as e:
            raise StateFileError(f"{self.path}: array {key!r} has a bad entry ({e})") from None
        if dtype.hasobject or dtype.kind not in "biufcSU" or any(n < 0 for n in shape):
            raise StateFileError(
                f"{self.path}: array {key!r} of dtype {dtype} and shape {shape} cannot be read "
                "without pickle"
            )
        count = math.prod(shape)
        if offset < 0 or offset + count * dtype.itemsize > self.size:
            raise StateFileError(f"{self.path}: array {key!r} lies outside the file")
        with self.path.open("rb") as f:
            f.seek(offset)
            out = np.fromfile(f, dtype=dtype, count=count)
        return out.reshape(shape)


def load_state(folder: str | Path, name: str) -> Any | None:
    """The state saved under ``folder/NAME``, or None where there is none. Never unpickles:
    arrays are read as raw bytes of a checked plain dtype (format 2) or with
    ``allow_pickle=False`` (format 1)."""
    folder = Path(folder)
    path = folder / f"{name}.json"
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise StateFileError(f"{path}: not a gs-ray state file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") not in (FORMAT, _FORMAT_NPZ):
        raise StateFileError(f"{path}: not a gs-ray state file (no 'format: {FORMAT}')")
    if doc["format"] == FORMAT:
        if doc.get("bin") not in _bin_names(name):
            raise StateFileError(f"{path}: 'bin' must name {' or '.join(_bin_names(name))}")
        raw = folder / doc["bin"]
        try:
            return _decode(doc["state"], _RawArrays(raw, doc.get("arrays")), str(path))
        except OSError as e:
            raise StateFileError(f"{raw}: cannot be read ({e})") from None
    try:
        with np.load(folder / f"{name}.npz", allow_pickle=False) as arrays:
            return _decode(doc["state"], arrays, str(path))
    except (OSError, ValueError) as e:
        raise StateFileError(
            f"{folder / (name + '.npz')}: cannot be read without pickle ({e})"
        ) from None
