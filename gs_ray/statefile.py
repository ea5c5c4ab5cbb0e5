"""State trees on disk without pickle: arrays in an ``.npz`` (read with ``allow_pickle=False``),
everything else in JSON beside them.

A run directory may come from someone else (a shared file system, a copied half-finished run),
so resuming must never run code from it: ``pickle.load`` of a crafted checkpoint does. A state
here is a tree of dicts, lists, tuples, sets, deques, strings, numbers, booleans, None and numpy
arrays (numeric, boolean or fixed-width string dtypes); anything else is refused when saving, with
the path of the offending value. Dict keys may be strings, numbers or tuples of them.

Layout: ``NAME.npz`` holds the arrays as ``a0, a1, ...``; ``NAME.json`` the tree, where an
array is ``{"__array__": "a3"}``, a tuple ``{"__tuple__": [...]}``, a set ``{"__set__": [...]}``,
a deque ``{"__deque__": {"items": [...], "maxlen": N}}``
and a dict whose keys are not all strings ``{"__items__": [[key, value], ...]}``. The JSON file
is written last: its presence marks a complete state.
"""

from __future__ import annotations

import json
import math
import os
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
                raise StateFileError(f"{where}: array {value!r} is not in the .npz")
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


def save_state(folder: str | Path, name: str, state: Any) -> Path:
    """Write ``state`` as ``folder/NAME.npz`` + ``folder/NAME.json`` (atomically, JSON last);
    returns the JSON path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    tree = _encode(state, arrays, name)
    tmp = folder / f".{name}.npz.tmp{os.getpid()}"
    with tmp.open("wb") as f:  # streamed array by array: no copy of the state in memory
        np.savez(f, **arrays)
    tmp.replace(folder / f"{name}.npz")
    path = folder / f"{name}.json"
    atomic_write_text(path, json.dumps({"format": "gs-ray state 1", "state": tree}) + "\n")
    return path


def load_state(folder: str | Path, name: str) -> Any | None:
    """The state saved under ``folder/NAME``, or None where there is none. Never unpickles:
    arrays are read with ``allow_pickle=False``."""
    folder = Path(folder)
    path = folder / f"{name}.json"
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise StateFileError(f"{path}: not a gs-ray state file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != "gs-ray state 1":
        raise StateFileError(f"{path}: not a gs-ray state file (no 'format: gs-ray state 1')")
    try:
        with np.load(folder / f"{name}.npz", allow_pickle=False) as arrays:
            return _decode(doc["state"], arrays, str(path))
    except (OSError, ValueError) as e:
        raise StateFileError(
            f"{folder / (name + '.npz')}: cannot be read without pickle ({e})"
        ) from None
