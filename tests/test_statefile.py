"""State files without pickle (gs_ray/statefile.py): round trips of real Stage II state, and a
run directory's crafted files are refused, never executed."""

from __future__ import annotations

import json
import pickle
from collections import deque

import numpy as np
import pytest

from gs_ray.statefile import StateFileError, load_state, save_state


def _equal(a, b):
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, deque):
        return isinstance(b, deque) and a.maxlen == b.maxlen and _equal(list(a), list(b))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    if isinstance(a, float) and np.isnan(a):
        return isinstance(b, float) and np.isnan(b)
    return type(a) is type(b) and a == b


def test_round_trip_keeps_types_keys_and_arrays(tmp_path):
    rng = np.random.default_rng(0)
    state = {
        "centers": rng.normal(size=(3, 5)).astype(np.float32),
        "labels": np.array([0, 2, -1], dtype=np.int64),
        "mask": np.array([True, False]),
        "names": np.array(["a", "bc"]),
        "position": ("online", 1, 5),
        "skipped": {3, 1},
        "pairs": {("online", 0, 2): [1, 2], (1, 2): "x"},
        "nan": float("nan"),
        "inf": -np.inf,
        "nested": [{"k": np.float64(0.5), "n": np.int32(7), "b": np.bool_(True)}, None, "s"],
        "__array__": "a user key that looks like a tag",
        "ledger": [deque([(3, 7), (4, 1)]), deque(maxlen=5)],
        "scalar": np.array(2.5, dtype=np.float16),
        "empty": np.zeros((0, 3), dtype=np.int32),
        "strided": np.arange(12.0).reshape(3, 4)[:, ::2],
        "big_endian": np.arange(3, dtype=">i4"),
    }
    want = {**state, "nested": [{"k": 0.5, "n": 7, "b": True}, None, "s"], "inf": float("-inf")}
    save_state(tmp_path, "s", {"other": np.ones(1000)})  # a larger state first: its file is
    save_state(tmp_path, "s", {"other": np.ones(3)})  # overwritten two saves later, shorter
    for _ in range(2):  # saves alternate between the two array files
        save_state(tmp_path, "s", state)
        back = load_state(tmp_path, "s")
        assert _equal(want, back), back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.0.bin", "s.1.bin", "s.json"]
    assert load_state(tmp_path, "absent") is None


def test_stage2_host_state_round_trips(tmp_path, cache="samples"):
    """The centroid host's real checkpoint state (clusterer, positions, consumers) after an
    online batch, saved and restored, continues to the same centres as the original."""
    from gs_ray.core.clustering import GradientSpaceClustering
    from gs_ray.stage2.host import CentroidHost

    def clusterer():
        return GradientSpaceClustering(
            n_clusters=3, random_state=0, n_init=2, batch_size=10, cache=cache
        )

    rng = np.random.default_rng(1)
    X = np.concatenate([rng.normal(size=(40, 16)) + 6 * np.eye(16)[c] for c in range(3)])
    host = CentroidHost(clusterer(), len(X))
    host.clusterer.initialize(X.astype(np.float32))
    host.clusterer.partial_fit(X[:10].astype(np.float32))
    host.position = ("online", 0, 0)
    host.save_checkpoint(tmp_path)
    other = CentroidHost(clusterer(), len(X))
    assert other.load_checkpoint(tmp_path)
    assert other.position == ("online", 0, 0)
    for h in (host, other):
        h.clusterer.partial_fit(X[10:20].astype(np.float32))
    np.testing.assert_array_equal(host.clusterer.cluster_centers_, other.clusterer.cluster_centers_)


class _Boom:
    def __reduce__(self):
        return (open, ("/tmp/gs-ray-pickle-ran", "w"))


def test_crafted_files_are_refused_and_pickles_never_loaded(tmp_path, caplog):
    from gs_ray.core.clustering import GradientSpaceClustering
    from gs_ray.stage2.host import CentroidHost

    marker = "/tmp/gs-ray-pickle-ran"
    # an old-style pickled checkpoint: ignored (Stage II starts afresh), never unpickled
    (tmp_path / "centroids.ckpt").write_bytes(pickle.dumps({"x": _Boom()}))
    host = CentroidHost(GradientSpaceClustering(n_clusters=2), 10)
    assert not host.load_checkpoint(tmp_path)
    assert "not loaded" in caplog.text
    # an older gs-ray's format (arrays in an .npz) holding an object array (pickled inside):
    # refused with the file named
    legacy = {"format": "gs-ray state 1", "state": {"a": {"__array__": "a0"}}}
    (tmp_path / "s.json").write_text(json.dumps(legacy))
    np.save(tmp_path / "obj.npy", np.array([_Boom()], dtype=object), allow_pickle=True)
    import zipfile

    with zipfile.ZipFile(tmp_path / "s.npz", "w") as z:
        z.write(tmp_path / "obj.npy", "a0.npy")
    with pytest.raises(StateFileError, match=r"s\.npz: cannot be read without pickle"):
        load_state(tmp_path, "s")
    # today's format: an index entry that names an object dtype, or bytes beyond the file
    save_state(tmp_path, "r", {"a": np.arange(4.0)})
    doc = json.loads((tmp_path / "r.json").read_text())
    for entry, message in (
        ({"dtype": "|O", "shape": [1], "offset": 0}, "cannot be read without pickle"),
        ({"dtype": "<f8", "shape": [5], "offset": 0}, "lies outside the file"),
        ({"dtype": "<f8", "shape": "x", "offset": 0}, "bad entry"),
    ):
        doc["arrays"]["a0"] = entry
        (tmp_path / "r.json").write_text(json.dumps(doc))
        with pytest.raises(StateFileError, match=rf"r\.0\.bin: array 'a0'.*{message}"):
            load_state(tmp_path, "r")
    doc["bin"] = "../../etc/passwd"
    (tmp_path / "r.json").write_text(json.dumps(doc))
    with pytest.raises(StateFileError, match=r"r\.json: 'bin' must name r\.0\.bin or r\.1\.bin"):
        load_state(tmp_path, "r")
    import os

    assert not os.path.exists(marker)
    (tmp_path / "t.json").write_text(json.dumps({"state": {}}))
    with pytest.raises(StateFileError, match="t.json: not a gs-ray state file"):
        load_state(tmp_path, "t")
    with pytest.raises(StateFileError, match=r"s\.bad: a _Boom cannot be stored without pickle"):
        save_state(tmp_path, "s", {"bad": _Boom()})
    with pytest.raises(StateFileError, match="dtype object"):
        save_state(tmp_path, "s", {"bad": np.array([None])})


def test_adapters_load_from_safetensors_only(tmp_path):
    from gs_ray.core.models import ADAPTER_WEIGHTS, safe_adapter

    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Boom()}))
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        safe_adapter(tmp_path)
    (tmp_path / ADAPTER_WEIGHTS).write_bytes(b"")
    assert safe_adapter(tmp_path) == str(tmp_path)


def test_partial_sums_clusterer_state_round_trips(tmp_path):
    """The external cache (partial-sums transport) keeps a ledger of deques per cluster: the
    checkpoint once refused it (CI's end-to-end partial-sums run)."""
    from gs_ray.core.clustering import GradientSpaceClustering

    rng = np.random.default_rng(2)
    X = np.concatenate([rng.normal(size=(40, 16)) + 6 * np.eye(16)[c] for c in range(3)])
    est = GradientSpaceClustering(n_clusters=3, random_state=0, n_init=2, cache="external")
    est.initialize(X.astype(np.float32))
    est._reset_online_state(16)
    est.ledger_[1].extend([(0, 4), (1, 9)])
    state = est.state_dict()
    save_state(tmp_path, "c", state)
    back = GradientSpaceClustering(n_clusters=3, cache="external").load_state_dict(
        load_state(tmp_path, "c")
    )
    assert [list(q) for q in back.ledger_] == [[], [(0, 4), (1, 9)], []]
    np.testing.assert_array_equal(back.cluster_centers_, est.cluster_centers_)
