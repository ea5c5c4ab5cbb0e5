"""The router: frozen MiniLM features, the feature cache, the stratified hold-out, head training on
learnable and on unlearnable (planted random) labels, save/load, other encoders, small clusters."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gs_ray.config import RouterConfig
from gs_ray.data.demo import build_demo_corpus
from gs_ray.routing import encoder as enc
from gs_ray.routing.encoder import FrozenEncoder, encode_cached, load_encoder, resolve_encoder
from gs_ray.routing.router import Router, make_router, stratified_split

# Demo prompts are 36 tokens at the median and 58 at the 90th percentile: 64 keeps nearly all of
# every prompt and bounds the encode time on a 2-core machine.
DEMO_MAX_LENGTH = 64


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny full-batch steps and batch-1 encodes lose to OpenMP overhead on 2 shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def minilm() -> FrozenEncoder:
    return load_encoder(enc.BUNDLED_ENCODER, 128)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo prompts (instruction + input), domain labels and their cached MiniLM features."""
    records = build_demo_corpus(n_samples=600, seed=1)
    texts = [
        r["instruction"] + (f"\n\n{r['input']}" if r["input"].strip() else "") for r in records
    ]
    domains = sorted({r["domain"] for r in records})
    labels = np.array([domains.index(r["domain"]) for r in records])
    cache = tmp_path_factory.mktemp("router") / "features.npy"
    feats = encode_cached(texts, enc.BUNDLED_ENCODER, cache, max_length=DEMO_MAX_LENGTH)
    return texts, labels, domains, feats


def demo_cfg(**kw) -> RouterConfig:
    return RouterConfig(**{"kind": "encoder", "max_length": DEMO_MAX_LENGTH, **kw})


# --------------------------------------------------------------------------- encoder


def test_resolve_encoder(tmp_path):
    bundled = resolve_encoder("all-MiniLM-L6-v2")
    assert (Path(bundled) / "config.json").exists()
    assert resolve_encoder("sentence-transformers/all-MiniLM-L6-v2") == bundled
    assert resolve_encoder(str(tmp_path)) == str(tmp_path.resolve())
    assert resolve_encoder("distilbert-base-uncased") == "distilbert-base-uncased"


def test_features_shape_norm_determinism(minilm):
    texts = ["Write a haiku about rain.", "What is 17 * 23?", "def f(x): return x + 1"]
    a = minilm.encode(texts)
    b = minilm.encode(texts)
    assert a.shape == (3, 384) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(a, b)
    assert not minilm.model.training
    assert not any(p.requires_grad for p in minilm.model.parameters())


def test_padding_invariance(minilm):
    short = "Add two numbers."
    long_texts = [" ".join(["a much longer prompt about budgets and loans"] * 8)] * 3
    alone = minilm.encode([short])[0]
    in_batch = minilm.encode(long_texts + [short] + long_texts, batch_size=16)[3]
    assert np.max(np.abs(alone - in_batch)) < 1e-5


def test_semantically_close_sentences_are_closer(minilm):
    reset, forgot, cat = minilm.encode(
        ["How do I reset my password?", "I forgot my login password", "The cat sat on the mat"]
    )
    assert reset @ forgot > reset @ cat + 0.3
    assert reset @ forgot > forgot @ cat + 0.3


def test_explicit_path_gives_same_features(minilm):
    texts = ["Explain compound interest.", "Tell me a story about a lighthouse keeper."]
    by_path = FrozenEncoder(resolve_encoder("all-MiniLM-L6-v2"), max_length=128)
    assert by_path.name != minilm.name
    np.testing.assert_allclose(by_path.encode(texts), minilm.encode(texts), atol=1e-6)


def test_other_architecture_distilbert(tmp_path, minilm):
    """A DistilBERT folder (no token_type_ids, config field `dim`) works as the encoder."""
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    cfg = DistilBertConfig(
        vocab_size=minilm.tokenizer.vocab_size, dim=32, hidden_dim=64, n_layers=2, n_heads=2
    )
    DistilBertModel(cfg).save_pretrained(tmp_path)
    minilm.tokenizer.save_pretrained(tmp_path)
    enc = FrozenEncoder(str(tmp_path), max_length=32)
    feats = enc.encode(["one prompt", "and another, longer prompt"])
    assert enc.dim == 32 and feats.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    cfg = RouterConfig(encoder=str(tmp_path), max_length=32, epochs=5)
    router = Router(cfg, 2, seed=0).fit_features(feats, [0, 1])
    assert router.predict(["one prompt", "x"]).shape == (2,)


# --------------------------------------------------------------------------- feature cache


def test_cache_reuses_and_recomputes(tmp_path, monkeypatch):
    calls = []
    real = FrozenEncoder.encode

    def counting(self, texts, batch_size=64):
        calls.append(len(texts))
        return real(self, texts, batch_size)

    monkeypatch.setattr(FrozenEncoder, "encode", counting)
    path = tmp_path / "feats.npy"
    texts = ["first prompt", "second prompt"]
    a = encode_cached(texts, "all-MiniLM-L6-v2", path)
    b = encode_cached(texts, "all-MiniLM-L6-v2", path)
    assert calls == [2]
    np.testing.assert_array_equal(a, b)
    assert json.loads((tmp_path / "feats.npy.key.json").read_text())["n_texts"] == 2

    c = encode_cached(texts + ["third prompt"], "all-MiniLM-L6-v2", path)
    assert calls == [2, 3] and c.shape == (3, 384)
    np.testing.assert_allclose(c[:2], a, atol=1e-5)
    encode_cached(texts + ["third prompt"], "all-MiniLM-L6-v2", path, max_length=16)
    assert calls == [2, 3, 3]  # a different max_length is a different key
    path.write_bytes(b"not an npy file")
    encode_cached(texts + ["third prompt"], "all-MiniLM-L6-v2", path, max_length=16)
    assert calls == [2, 3, 3, 3]  # a damaged cache is recomputed


def test_cache_key_sees_text_boundaries():
    key = enc.features_key
    assert key(["ab", "c"], "enc", 128) != key(["a", "bc"], "enc", 128)
    assert key(["a"], "enc", 128) != key(["a"], "enc", 64) != key(["a"], "other", 64)


# --------------------------------------------------------------------------- split and training


def test_stratified_split():
    labels = np.repeat([0, 1, 2, 3], [50, 30, 10, 1])
    train, hold = stratified_split(labels, 0.2, seed=3)
    assert len(np.intersect1d(train, hold)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, hold])), np.arange(len(labels)))
    assert np.bincount(labels[hold], minlength=4).tolist() == [10, 6, 2, 0]
    again, _ = stratified_split(labels, 0.2, seed=3)
    other, _ = stratified_split(labels, 0.2, seed=4)
    np.testing.assert_array_equal(train, again)
    assert not np.array_equal(train, other)


def test_router_learns_demo_domains(demo):
    texts, labels, domains, feats = demo
    router = Router(demo_cfg(), len(domains), seed=0).fit_features(feats, labels)
    m = router.metrics
    print(f"\ndemo router: holdout {m['holdout_accuracy']:.3f}, chance {m['chance_accuracy']:.3f}")
    assert m["holdout_accuracy"] >= 0.8
    assert m["holdout_accuracy"] >= m["chance_accuracy"] + 0.4
    assert m["n_train"] + m["n_holdout"] == len(texts)
    assert m["n_holdout"] == pytest.approx(0.2 * len(texts), abs=len(domains))
    assert len(m["per_cluster_holdout_accuracy"]) == len(domains)
    assert m["final_train_loss"] < math.log(len(domains))
    # The same head on freshly encoded prompts: the router encodes as its features were made.
    np.testing.assert_allclose(
        router.predict_proba(texts[:8]), router.proba_from_features(feats[:8]), atol=1e-4
    )
    again = Router(demo_cfg(), len(domains), seed=0).fit_features(feats, labels)
    torch.testing.assert_close(again.head.weight, router.head.weight)


def test_random_labels_are_not_learnable(demo):
    """Planted labels independent of the text: the head memorises its training part, but the
    holdout stays at chance; a leak between train and holdout would lift it."""
    _, _, _, feats = demo
    labels = np.random.default_rng(7).integers(0, 5, len(feats))
    m = Router(demo_cfg(), 5, seed=0).fit_features(feats, labels).metrics
    assert m["holdout_accuracy"] <= m["chance_accuracy"] + 0.15
    assert m["train_accuracy"] >= m["holdout_accuracy"] + 0.3


def test_tiny_clusters_do_not_crash():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((23, 16)).astype(np.float32)
    labels = np.array([0] * 20 + [1] * 2 + [2])
    router = Router(RouterConfig(epochs=20), 4, seed=0).fit_features(feats, labels)
    m = router.metrics
    assert m["n_train"] + m["n_holdout"] == 23
    assert m["cluster_sizes"] == [20, 2, 1, 0]
    assert m["per_cluster_holdout_accuracy"][2] is None  # the singleton is trained on, not held out
    assert m["per_cluster_holdout_accuracy"][3] is None  # an empty cluster keeps its output
    assert router.proba_from_features(feats).shape == (23, 4)
    m1 = Router(RouterConfig(epochs=3), 1, seed=0).fit_features(feats[:1], [0]).metrics
    assert m1["n_holdout"] == 0 and m1["holdout_accuracy"] is None


def test_bad_labels_are_rejected():
    with pytest.raises(ValueError, match="labels must lie"):
        Router(RouterConfig(), 3, seed=0).fit_features(np.zeros((3, 4), np.float32), [0, 1, 3])
    with pytest.raises(ValueError, match="do not match"):
        Router(RouterConfig(), 3, seed=0).fit_features(np.zeros((3, 4), np.float32), [0, 1])


# --------------------------------------------------------------------------- save, load, latency


def test_save_load_round_trip(demo, tmp_path):
    texts, labels, domains, feats = demo
    router = Router(demo_cfg(epochs=50), len(domains), seed=0).fit_features(feats, labels)
    metrics = router.metrics
    router.save(tmp_path / "router")
    meta = json.loads((tmp_path / "router" / "router.json").read_text())
    assert {
        "format",
        "encoder",
        "max_length",
        "n_clusters",
        "feature_dim",
        "head",
        "metrics",
    } <= set(meta)
    assert meta["encoder"] == "all-MiniLM-L6-v2" and meta["max_length"] == DEMO_MAX_LENGTH
    assert (meta["n_clusters"], meta["feature_dim"]) == (len(domains), 384)
    assert meta["metrics"]["holdout_accuracy"] == metrics["holdout_accuracy"]

    loaded = Router.load(tmp_path / "router")
    sample = texts[:12]
    np.testing.assert_array_equal(loaded.predict_proba(sample), router.predict_proba(sample))
    np.testing.assert_array_equal(loaded.predict(sample), router.predict(sample))
    assert loaded.predict("What is 12 + 30?").shape == (1,)


def test_loaded_router_checks_encoder_dim(tmp_path):
    router = Router.from_head(torch.nn.Linear(10, 2), encoder="all-MiniLM-L6-v2")
    router.save(tmp_path)
    with pytest.raises(ValueError, match="expects 10"):
        Router.load(tmp_path).predict(["hello"])


def test_make_router_and_latency(demo, tmp_path):
    texts, labels, domains, _ = demo
    cfg = demo_cfg(epochs=50, holdout_fraction=0.25)
    router = make_router(cfg, len(domains), cache_path=tmp_path / "f.npy")
    m = router.fit(texts[:40], labels[:40]).metrics
    assert (tmp_path / "f.npy").exists() and m["n_train"] + m["n_holdout"] == 40
    ms = router.route_latency_ms(texts[:10], warmup=2)
    print(f"\nrouting latency (batch 1, {torch.get_num_threads()} thread): {ms:.1f} ms/prompt")
    assert 0.0 < ms < 5000.0


def test_routers_are_estimators(demo, tmp_path):
    """scikit-learn style: ``fit`` returns the router, an unfitted router raises
    ``NotFittedError``, and the encoder router's ``fit(texts, y)`` is
    ``fit_features(encode(texts), y)``, to the bit."""
    from sklearn.exceptions import NotFittedError

    from gs_ray.routing.router import TfidfRouter

    texts, labels, domains, _ = demo
    texts, labels = texts[:60], labels[:60]
    cfg = demo_cfg(epochs=30)
    for unfitted in (Router(cfg, 3), TfidfRouter(demo_cfg(kind="tfidf"), 3)):
        assert unfitted.n_clusters == 3 and unfitted.metrics == {}
        with pytest.raises(NotFittedError, match="not fitted"):
            unfitted.predict(texts[:2])
        with pytest.raises(NotFittedError, match="not fitted"):
            unfitted.save(tmp_path / "unfitted")
    with pytest.raises(NotFittedError, match="not fitted"):
        Router(cfg).proba_from_features(np.zeros((1, 384), np.float32))

    router = Router(cfg, seed=1)  # n_clusters None: one more than the largest label
    assert router.fit(texts, labels) is router
    feats = load_encoder(cfg.encoder, cfg.max_length).encode(texts)
    direct = Router(cfg, seed=1).fit_features(feats, labels)
    torch.testing.assert_close(router.head.weight, direct.head.weight, rtol=0, atol=0)
    torch.testing.assert_close(router.head.bias, direct.head.bias, rtol=0, atol=0)
    assert router.metrics == direct.metrics and router.n_clusters == int(labels.max()) + 1
    tfidf = make_router(demo_cfg(kind="tfidf"), len(domains))
    assert isinstance(tfidf, TfidfRouter) and tfidf.fit(texts, labels) is tfidf
    assert tfidf.n_clusters == len(domains) and tfidf.predict(texts[:3]).shape == (3,)


# --------------------------------------------------------------------------- router.kind: tfidf


def test_tfidf_router_learns_demo_domains_and_round_trips(demo, tmp_path):
    """The TF-IDF router on the demo's domains: within a few points of the encoder router on the
    same split (planted labels: the 8 domains; 0.975 vs 0.992 here), chance on shuffled labels,
    and a saved router (plain arrays, no pickle) loads back to the same probabilities."""
    from gs_ray.routing.router import TfidfRouter, load_router

    texts, labels, domains, feats = demo
    cfg = demo_cfg(kind="tfidf")
    router = make_router(cfg, len(domains), seed=0).fit(texts, labels)
    m = router.metrics
    assert isinstance(router, TfidfRouter) and m["kind"] == "tfidf"
    enc = Router(demo_cfg(), len(domains), seed=0).fit_features(feats, labels).metrics
    assert m["n_holdout"] == enc["n_holdout"]  # the same stratified split
    assert m["holdout_accuracy"] >= 0.95 and m["holdout_accuracy"] >= enc["holdout_accuracy"] - 0.03
    assert m["holdout_accuracy"] >= m["chance_accuracy"] + 0.4
    shuffled = np.random.default_rng(0).permutation(labels)
    bad = make_router(cfg, len(domains), seed=0).fit(texts, shuffled).metrics
    assert bad["holdout_accuracy"] < bad["chance_accuracy"] + 0.15

    p = router.predict_proba(texts[:20])
    assert p.shape == (20, len(domains)) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert (router.predict(texts[:20]) == p.argmax(1)).all()
    router.save(tmp_path / "r")
    assert not list((tmp_path / "r").glob("*.pkl"))
    loaded = load_router(tmp_path / "r")
    assert isinstance(loaded, TfidfRouter) and loaded.n_clusters == len(domains)
    assert isinstance(Router.load(tmp_path / "r"), TfidfRouter)  # older callers keep working
    np.testing.assert_allclose(loaded.predict_proba(texts[:20]), p, atol=1e-6)
    assert loaded.metrics["holdout_accuracy"] == m["holdout_accuracy"]
    assert loaded.route_latency_ms(texts[:5]) > 0
    assert loaded.quantize() is loaded


def test_tfidf_router_with_an_empty_cluster_and_a_single_cluster(tmp_path):
    from gs_ray.routing.router import TfidfRouter, load_router

    texts = [f"alpha beta {i}" for i in range(6)] + [f"gamma delta {i}" for i in range(6)]
    labels = np.array([0] * 6 + [2] * 6)  # cluster 1 has no sample
    router = TfidfRouter(RouterConfig(kind="tfidf"), 3, 0).fit(texts, labels)
    p = router.predict_proba(["alpha beta", "gamma delta"])
    assert p.shape == (2, 3) and (p[:, 1] == 0).all()
    assert router.predict(["alpha beta", "gamma delta"]).tolist() == [0, 2]
    one = TfidfRouter(RouterConfig(kind="tfidf"), 2, 0).fit(texts, np.full(12, 1))
    assert one.predict(["anything"]).tolist() == [1]
    one.save(tmp_path / "one")
    assert load_router(tmp_path / "one").predict(["x"]).tolist() == [1]


def test_router_kind_and_ngrams_are_checked_at_load():
    from gs_ray.config import load_config
    from gs_ray.errors import ConfigError

    assert load_config(None, ["--router.kind", "tfidf"]).router.kind == "tfidf"
    with pytest.raises(ConfigError, match="router.kind"):
        load_config(None, ["--router.kind", "bm25"])
    with pytest.raises(ConfigError, match="tfidf_ngrams"):
        load_config(None, ["--router.tfidf_ngrams", "[5, 2]"])
