"""gs-ray eval: the pure pieces against hand computations, merging and generation against peft
and transformers, and the whole comparison on a small run (same rows, same budget, resumable)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gs_ray.core.ensemble import gradient_similarity_probs, mixture_nll
from gs_ray.evaluation.compare import (
    answer_key,
    by_domain,
    is_correct,
    random_partition,
    spread,
)

# --------------------------------------------------------------------------- pure pieces


def test_gradient_similarity_probs_by_hand():
    g = np.array([[1.0, 0.0], [1.0, 1.0]])
    c = np.array([[2.0, 0.0], [0.0, 3.0]])
    p = gradient_similarity_probs(g, c, temperature=0.5)
    # cosines: row 0 -> (1, 0); row 1 -> (1/sqrt2, 1/sqrt2)
    e = math.exp(1 / 0.5)
    assert p[0] == pytest.approx([e / (e + 1), 1 / (e + 1)])
    assert p[1] == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="temperature"):
        gradient_similarity_probs(g, c, temperature=0)


def test_mixture_nll_by_hand():
    nll = np.array([[0.1, 2.0, 0.5], [1.0, 0.2, 3.0]])
    w = np.array([0.25, 0.75])
    want = np.mean([-math.log(0.25 * math.exp(-a) + 0.75 * math.exp(-b)) for a, b in nll.T])
    assert mixture_nll(nll, w) == pytest.approx(want)
    # one-hot weights: exactly that expert's mean loss (routing)
    assert mixture_nll(nll, np.array([0.0, 1.0])) == pytest.approx(nll[1].mean())
    # very large losses do not underflow to inf
    assert math.isfinite(mixture_nll(nll + 2000.0, w))


@pytest.mark.parametrize(
    ("reference", "generated", "kind", "correct"),
    [
        ("She has 3 left.\n#### 1,234", "so... #### 1234", "final_number", True),
        ("x\n#### 72", "#### 27", "final_number", False),
        ("20 * 18 = 360 dollars.\nThe answer is 360.", "The answer is 360.00!", "answer_is", True),
        ("The answer is 360.", "the answer was 360", "answer_is", False),
        ("positive", "Positive. The profit rose", "label", True),
        ("neutral", "negative", "label", False),
        ("... so the payment is $1,404.75.", "Monthly payment: $1404.75.", "amount", True),
        ("def f(x):\n    return x + 1", "def f(x): return x", None, None),
        ("Once upon a time there was a fox.", "A fox.", None, None),
    ],
)
def test_answer_keys_and_exact_match(reference, generated, kind, correct):
    key = answer_key(reference)
    assert (key[0] if key else None) == kind
    assert is_correct(reference, generated) is correct


def test_random_partition_keeps_sizes_and_outsiders():
    labels = np.array([0, 0, 1, -1, 2, 2, 2, -2, 1])
    out = random_partition(labels, seed=3)
    assert (out[labels < 0] == labels[labels < 0]).all()
    assert np.bincount(out[out >= 0]).tolist() == np.bincount(labels[labels >= 0]).tolist()
    assert not (out == labels).all() or len(set(labels)) == 1
    assert (random_partition(labels, 3) == out).all()


def test_by_domain_and_spread():
    assert by_domain(np.array([1.0, 3.0, 5.0]), ["a", None, "a"]) == {"a": 3.0, "unlabelled": 3.0}
    assert spread([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert spread([2.0]) == (2.0, None) and spread([None]) == (None, None)


# --------------------------------------------------------------------------- models


@pytest.fixture
def two_adapters(tiny_peft_model, tmp_path):
    """The conftest model with two saved adapters (different non-zero B) loaded side by side."""
    from peft import PeftModel

    model = tiny_peft_model
    paths = []
    for i in range(2):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.2, generator=torch.Generator().manual_seed(10 * i + len(name)))
        model.save_pretrained(tmp_path / f"a{i}")
        paths.append(tmp_path / f"a{i}")
    base = model.get_base_model()
    peft = PeftModel.from_pretrained(base, paths[0], adapter_name="a0")
    peft.load_adapter(paths[1], adapter_name="a1")
    return peft.eval()


def test_merged_adapter_is_the_mean_of_the_experts_updates(two_adapters):
    """What gs-ray eval builds for 'merged' (combination 'cat', weights 1/K): each layer's
    update equals the mean of the experts' B A (times the LoRA scaling), by hand."""
    model = two_adapters
    model.add_weighted_adapter(["a0", "a1"], [0.5, 0.5], "merged", combination_type="cat")
    checked = 0
    for module in model.modules():
        if hasattr(module, "lora_A") and "merged" in module.lora_A:

            def delta(name, m=module):
                a, b = m.lora_A[name].weight, m.lora_B[name].weight
                return (b @ a) * m.scaling[name]

            want = (delta("a0") + delta("a1")) / 2
            torch.testing.assert_close(delta("merged"), want, rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked == 4  # q and v in two layers


def test_token_losses_match_a_plain_forward(two_adapters):
    from gs_ray.core.gradients import collate, per_sample_loss
    from gs_ray.training.loop import token_losses

    model = two_adapters
    model.set_adapter("a1")
    pairs = [([1, 5, 9, 4, 7], [-100, -100, 9, 4, 7]), ([3, 8, 2], [-100, 8, 2])]
    got = token_losses(model, pairs, pad_id=0)
    for (ids, labels), losses in zip(pairs, got):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
        keep = torch.tensor(labels[1:]) != -100
        np.testing.assert_allclose(losses, nll[keep].double().numpy(), rtol=1e-5)
    batch = collate(pairs, 0)
    with torch.no_grad():
        means = per_sample_loss(model, batch).numpy()
    np.testing.assert_allclose([g.mean() for g in got], means, rtol=1e-5)


def test_greedy_mixture_routes_like_generate_and_mixes_by_hand(two_adapters):
    from gs_ray.core.generate import greedy_mixture, using

    model = two_adapters
    prompts = [[1, 5, 9], [3, 8, 2, 11, 6]]
    one_hot = np.array([[0.0, 1.0], [1.0, 0.0]])
    got = greedy_mixture(model, ["a0", "a1"], one_hot, prompts, 6, eos_id=None, pad_id=0)
    for prompt, name, tokens in zip(prompts, ["a1", "a0"], got):
        model.set_adapter(name)
        with torch.no_grad():
            ref = model.generate(
                input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0
            )
        assert tokens == ref[0, len(prompt) :].tolist()
    # The KV-cached routed path gives the step-by-step mixture's tokens (EOS cut included).
    many = [[1, 5, 9], [3, 8, 2, 11, 6], [7], [4, 4, 10, 2], [12, 3]]
    routes = np.eye(3)[[0, 2, 1, 2, 0]]
    for eos in (None, got[0][2]):
        fast = greedy_mixture(
            model, [None, "a0", "a1"], routes, many, 7, eos_id=eos, pad_id=0, batch_size=2
        )
        slow = greedy_mixture(
            model,
            [None, "a0", "a1"],
            routes,
            many,
            7,
            eos_id=eos,
            pad_id=0,
            batch_size=2,
            cached=False,
        )
        assert fast == slow
    # A soft mixture, one KV cache per adapter (rows with zero weight for some adapters, one
    # row one-hot): the step-by-step mixture's tokens, EOS cut included.
    soft = np.array(
        [[0.2, 0.5, 0.3], [0.0, 0.6, 0.4], [1.0, 0.0, 0.0], [0.1, 0.0, 0.9], [0.5, 0.5, 0.0]]
    )
    plain = greedy_mixture(
        model, [None, "a0", "a1"], soft, many, 7, eos_id=None, pad_id=0, batch_size=3, cached=False
    )
    for eos in (None, plain[0][2], plain[3][0]):
        fast = greedy_mixture(
            model, [None, "a0", "a1"], soft, many, 7, eos_id=eos, pad_id=0, batch_size=3
        )
        slow = greedy_mixture(
            model,
            [None, "a0", "a1"],
            soft,
            many,
            7,
            eos_id=eos,
            pad_id=0,
            batch_size=3,
            cached=False,
        )
        assert fast == slow, eos
    # A soft mixture, first token by hand: argmax of 0.3 p_base + 0.7 p_a0.
    w = np.array([[0.3, 0.7]])
    first = greedy_mixture(model, [None, "a0"], w, prompts[:1], 1, eos_id=None, pad_id=0)[0][0]
    probs = []
    for name in (None, "a0"):
        with using(model, name), torch.no_grad():
            probs.append(
                torch.softmax(
                    model(input_ids=torch.tensor([prompts[0]])).logits[0, -1].double(), -1
                )
            )
    assert first == int((0.3 * probs[0] + 0.7 * probs[1]).argmax())


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def evaluated(ray_cluster, tmp_path_factory):
    """A small finished run, then gs-ray eval on it: (run, eval output)."""
    from gs_ray.cli import main
    from gs_ray.evaluation import baselines
    from gs_ray.rundir import RunDir

    tmp_path = tmp_path_factory.mktemp("eval")

    small = [
        "--data.demo_size",
        "240",
        "--data.n_val",
        "48",
        "--model.tiny_hidden_size",
        "64",
        "--model.tiny_num_layers",
        "2",
        "--model.tiny_pretrain_steps",
        "0",
        "--lora.r",
        "8",
        "--lora.alpha",
        "16",
        "--clustering.batch_size",
        "16",
        "--clustering.max_epochs",
        "1",
        "--clustering.n_clusters",
        "2",
        "--experts.max_steps",
        "3",
        # One worker takes both CPUs: each wave of adapters (the run's, the eval's, a seed's)
        # trains in one Ray Train run instead of two (start-ups cost more than these 3 steps).
        "--experts.cpus_per_worker",
        "2",
        # K = 2 fixed for the baselines' shapes (the routability merge has tests of its own);
        # the generalist fallback is on, as by default. The experts start from the warm-up
        # adapter, beside the generalist: one wave of Ray Train start-ups instead of two (the
        # order from the generalist is test_experts_from_the_generalist_train_after_it_...).
        "--clustering.routability",
        "off",
        "--experts.init",
        "warmup",
        "--run.output_dir",
        str(tmp_path),
        "--run.name",
        "r",
    ]
    # Warm-up and Stage II in this process (`run --local`: test_pipeline runs them on Ray), the
    # later stages on Ray (`--resume`): a Ray Train run and two gradient workers fewer.
    assert main(["run", "--local", *small]) == 0
    assert main(["run", "--resume", str(tmp_path / "r")]) == 0
    run = RunDir(tmp_path / "r")
    # What gs-ray eval must leave as it is (it opens the run read-only).
    kept = [run.manifest_path, run.sub("data", "samples.jsonl"), run.config_yaml]
    before = {path: path.read_bytes() for path in kept}
    sts = tmp_path / "sts.csv"
    sts.write_text("\n".join(STS_ROWS * 4) + "\n")
    out = baselines.evaluate_run(
        run.path,
        [
            "--eval.max_generate",
            "4",
            "--eval.max_new_tokens",
            "4",
            "--eval.sts",
            str(sts),
            "--eval.sts_pairs",
            "8",
        ],
    )
    run.unchanged_by_eval = {path: path.read_bytes() == data for path, data in before.items()}
    return run, out


@pytest.mark.slow
@pytest.mark.ray
def test_eval_analyses_routers_k_ablation_sts(evaluated):
    """Table 3, Fig. 6 and Fig. 4 on the small run: every router scored on the test rows (the
    trained router's agreement is the run's own router accuracy), the ablation's K really
    clustered, trained and scored, the STS pairs correlated; each drawn in the report."""
    run, out = evaluated
    an = out["analyses"]
    routers = {r["router"]: r for r in an["routers"]}
    assert set(routers) == {"keyword", "embedding", "gradient", "trained"}
    assert all(0 <= r["agreement"] <= 1 and r["latency_ms"] > 0 for r in routers.values())
    held = run.metrics()["evaluation"]
    assert routers["trained"]["agreement"] == pytest.approx(held["router_test_accuracy"])

    rows = {r["k"]: r for r in an["k_ablation"]}
    assert sorted(rows) == [1, 2, 4]  # one LoRA, the run (K=2), the ablation's K=4
    assert rows[1]["test_loss_routed"] == pytest.approx(out["methods"]["single_lora"]["test_loss"])
    assert rows[2]["source"] == "run"
    assert rows[2]["test_loss_routed"] == pytest.approx(
        out["methods"]["gradientspace_nofallback"]["test_loss"]
    )
    k4 = rows[4]
    assert k4["source"] == "ablation" and len(k4["cluster_sizes"]) == 4
    assert sum(k4["cluster_sizes"]) == out["n_train"]
    assert -1 <= k4["silhouette"] <= 1 and -1 <= rows[2]["silhouette"] <= 1
    assert k4["test_loss_oracle"] < out["methods"]["base"]["test_loss"]
    from gs_ray.rundir import adapter_complete, expert_name

    for c in range(4):
        if k4["cluster_sizes"][c]:
            assert adapter_complete(run.eval_adapter(0, "k4", expert_name(c)))

    sts = an["sts"]
    assert sts["n_pairs"] == 8 and len(sts["pairs"]) == 8
    r = sts["gradient_vs_embedding"]
    assert r["pearson"] is not None and -1 <= r["pearson"] <= 1
    assert all(-1 - 1e-6 <= q["gradient_cosine"] <= 1 + 1e-6 for q in sts["pairs"])
    assert (run.plots / "eval_k_ablation.png").exists()
    assert (run.plots / "eval_sts_similarity.png").exists()
    page = run.report_html.read_text()
    for text in ("Routers compared", "K ablation", "Gradient vs input-embedding similarity"):
        assert text in page, text


@pytest.mark.slow
@pytest.mark.ray
def test_eval_compares_every_method_on_the_same_rows(evaluated, tmp_path):
    from gs_ray.cli import main
    from gs_ray.evaluation import baselines
    from gs_ray.prepare import prepare
    from gs_ray.training.pretrain import base_model_for

    run, out = evaluated
    saved = json.loads(run.eval_json.read_text())
    assert saved["methods"].keys() == out["methods"].keys()
    assert set(out["methods"]) == set(json.loads(json.dumps(run.config().eval.methods)))

    # Exactly the rows of the run's own evaluation, and the same numbers where methods coincide.
    heldout = run.metrics()["evaluation"]
    assert out["n_test"] == heldout["n_test"]
    m = out["methods"]
    assert m["gradientspace_nofallback"]["test_loss"] == pytest.approx(
        heldout["test_loss_routed"], rel=1e-6
    )
    # What the run deploys: the router, low confidence to the run's own generalist, which is
    # also the one LoRA on everything (not trained again).
    assert m["gradientspace"]["test_loss"] == pytest.approx(heldout["test_loss_deployed"], rel=1e-6)
    assert m["single_lora"]["test_loss"] == pytest.approx(heldout["test_loss_generalist"], rel=1e-6)
    assert not run.eval_adapter(0, "single_lora", "single").exists()
    v = out["verdict"]
    assert v["method"] == "single_lora" and v["verdict"] in ("pays off", "ties", "loses")
    assert v["lo"] <= v["mean"] <= v["hi"] and v["n"] == out["n_test"]
    assert m["gradientspace"]["vs_best_baseline"]["method"] != "gradientspace"
    r = out["routing"]
    assert r["router_accuracy"] == pytest.approx(heldout["router_test_accuracy"])
    assert r["routed_minus_oracle"]["mean"] == pytest.approx(
        heldout["test_loss_routed"] - heldout["test_loss_oracle"], abs=1e-6
    )
    assert "Verdict: GradientSpace" in run.report_html.read_text()
    assert m["gradientspace_oracle"]["test_loss"] == pytest.approx(
        heldout["test_loss_oracle"], rel=1e-6
    )
    assert m["warmup"]["test_loss"] == pytest.approx(heldout["test_loss_warmup"], rel=1e-6)
    assert all(run.unchanged_by_eval.values()), run.unchanged_by_eval  # the run read-only
    p = prepare(run.config(), run, base_model=base_model_for, read_only=True)
    labels, k = p.assignments()
    test = p.splits.test[labels[p.splits.test] >= 0]
    import hashlib

    ids = "\n".join(p.samples[i].id for i in test)
    assert out["test_ids_sha256"] == hashlib.sha256(ids.encode()).hexdigest()

    # The partitions: same K; random has GradientSpace's sizes; all only on train rows.
    parts = {name: np.array(v) for name, v in json.loads(run.eval_partitions.read_text()).items()}
    gs = parts["gradientspace"]
    assert (gs[p.splits.test] == -1).all()
    for name in ("random_clusters", "embedding_kmeans", "elrea"):
        assert ((parts[name] >= 0) == (gs >= 0)).all(), name
        assert set(parts[name][gs >= 0]) <= set(range(k)), name
    assert (
        np.bincount(parts["random_clusters"][gs >= 0]).tolist() == np.bincount(gs[gs >= 0]).tolist()
    )

    # Every trained method really trained, at the same budget: each expert its cluster's steps
    # (at most experts.max_steps = 3) from where the run's experts start (the generalist's
    # steps count too where they start from it), one LoRA on everything K times the limit.
    from gs_ray.rundir import TRAIN_RECORD
    from gs_ray.training.loop import planned_steps

    cfg = run.config()
    start = run.generalist if cfg.expert_start == "generalist" else run.warmup_adapter
    before = 3 * k if cfg.expert_start == "generalist" else 0  # steps before the experts'
    train = p.fit_rows()  # the calibration rows train nothing
    assert len(p.calibration_rows()) > 0 and not set(p.calibration_rows()) & set(train)
    assert m["single_lora"]["train_steps"] == 3 * k
    assert m["single_lora_matched"]["train_steps"] == 3 * k + before
    assert (parts["single_lora_matched"][train] == 0).all()
    for name in ("random_clusters", "embedding_kmeans", "elrea"):
        sizes = np.bincount(parts[name][train][parts[name][train] >= 0], minlength=k)
        experts = sum(planned_steps(n, cfg.experts) for n in sizes)
        assert m[name]["train_steps"] == experts + before, name
        assert m[name]["test_loss"] < m["base"]["test_loss"], name
        record = json.loads((run.eval_adapter(0, name, "expert_0") / TRAIN_RECORD).read_text())
        assert record["init"] == str(start), name
    assert m["single_lora"]["test_loss"] != m["warmup"]["test_loss"]
    assert m["gradientspace_ensemble"]["forward_passes_per_query"] == k
    assert m["elrea"]["forward_passes_per_query"] == k + 1
    assert m["gradientspace_oracle"]["latency_ms_per_query"] is None
    assert all(v["exact_match"] is not None for v in m.values()) == (out["n_exact_match_items"] > 0)

    # A second eval keeps every adapter (nothing to train); that it gives the same numbers is
    # test_eval_seeds_show_the_spread's seed 0.
    from gs_ray.evaluation.analyses import ablation_ks
    from gs_ray.evaluation.methods import METHODS, Evaluation, KAblation

    ev = Evaluation(p)
    ev.parts[0] = parts
    every = [METHODS[name] for name in cfg.eval.methods]
    every += [KAblation(kk) for kk in ablation_ks(cfg, k)]
    assert len(every) > len(METHODS) and baselines.pending_jobs(ev, 0, every) == []

    # Only --eval.* overrides; an unfinished run is refused with a plain message.
    assert main(["eval", str(run.path), "--lora.r", "4"]) == 2
    import shutil

    from gs_ray.rundir import RunDir

    unfinished = tmp_path / "unfinished"  # a copy: the module's run stays whole for the others
    shutil.copytree(run.path, unfinished)
    RunDir.open(unfinished).invalidate("experts")
    assert main(["eval", str(unfinished)]) == 2


@pytest.mark.slow
@pytest.mark.ray
def test_report_renders_in_headless_chromium(evaluated, tmp_path):
    """The report eval rebuilt: self-contained (every figure a data URI that decodes to a PNG),
    and a real browser renders it with its tables and figures."""
    import base64
    import re
    import shutil
    import subprocess

    run, out = evaluated
    page = run.report_html.read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 3
    assert all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for b in images)
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere
    assert (
        json.loads(run.report_json.read_text())["eval"]["methods"].keys() == out["methods"].keys()
    )

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip(
            "headless Chromium is not installed (Debian: apt-get install chromium; "
            ".ci/setup does it where apt-get is available)"
        )
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    shot = tmp_path / "report.png"
    subprocess.run(
        [*flags, "--window-size=1200,3000", f"--screenshot={shot}", run.report_html.as_uri()],
        check=True,
        capture_output=True,
        timeout=120,
    )
    dom = subprocess.run(
        [*flags, "--dump-dom", run.report_html.as_uri()],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    for text in (
        "GradientSpace against the baselines",
        "single_lora",
        "embedding_kmeans",
        "Held-out loss per domain",
        "What ran, where, how long",
        f"{out['n_test']} held-out",
    ):
        assert text in dom, text
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (3000, 1200)
    # Rendered figures: many distinct colours (a page of text and tables has a handful).
    colours = len(np.unique(img.reshape(-1, 3), axis=0))
    assert colours > 500, colours


# --------------------------------------------------------------------------- analyses


def test_theorem2_variance_by_hand_and_on_a_planted_partition():
    from gs_ray.core.clustering import within_cluster_variance

    # Two unit vectors per cluster, by hand: cluster 0 = {e1, e1}, cluster 1 = {e2, -e2}.
    G = np.array([[2.0, 0.0], [5.0, 0.0], [0.0, 1.0], [0.0, -3.0]])
    out = within_cluster_variance(G, np.array([0, 0, 1, 1]))
    assert out["clusters"][0]["variance"] == pytest.approx(0.0)
    assert out["clusters"][1]["variance"] == pytest.approx(1.0)
    assert out["within"] == pytest.approx(0.5)
    # whole set: mean (0.5, 0); squared distances 0.25, 0.25, 1.25, 1.25 -> 0.75
    assert out["total"] == pytest.approx(0.75) and out["ratio"] == pytest.approx(0.5 / 0.75)

    # Planted directions: the planted partition is far tighter than a random one.
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 50))
    planted = np.repeat(np.arange(3), 40)
    X = centres[planted] + 0.2 * rng.normal(size=(120, 50))
    good = within_cluster_variance(X, planted)["ratio"]
    bad = within_cluster_variance(X, rng.permutation(planted))["ratio"]
    assert good < 0.1 < 0.8 < bad


def test_domain_counts_and_top_terms_on_known_text():
    from gs_ray.evaluation.compare import domain_counts, top_terms

    labels = np.array([0, 0, 1, 1, -1])
    assert domain_counts(labels, ["math", "code", "code", "code", "math"]) == {
        "0": {"code": 1, "math": 1},
        "1": {"code": 2},
    }
    # Each cluster's own words lead (a word of one text of a cluster scores half its weight).
    texts = [
        "the loan mortgage",
        "mortgage on the loan rate",
        "a python function",
        "the function in python",
        "ignored text",
    ]
    terms = top_terms(texts, labels, n_terms=2)
    assert set(terms["0"]) == {"mortgage", "loan"} and set(terms["1"]) == {"python", "function"}


def test_routers_compared_pure_parts_by_hand():
    from gs_ray.evaluation.compare import (
        KeywordRouter,
        agreement,
        nearest_centroid,
        unit_centroids,
    )

    X = np.array([[2.0, 0.0], [1.0, 0.1], [0.0, 3.0], [0.1, 1.0]])
    labels = np.array([0, 0, 1, 1])
    C = unit_centroids(X, labels, 3)
    assert np.allclose(np.linalg.norm(C[:2], axis=1), 1.0) and np.allclose(C[2], 0.0)
    assert C[0, 0] > 0.99 and C[1, 1] > 0.99
    assert nearest_centroid(np.array([[5.0, 1.0], [-0.1, 2.0]]), C).tolist() == [0, 1]
    assert agreement(np.array([0, 1, 1]), np.array([0, 1, 0])) == pytest.approx(2 / 3)

    texts = [
        "compute the integral of x",
        "integral of the sine",
        "write a python function",
        "python function that sorts",
        "python function for integral",
    ]
    router = KeywordRouter(texts, np.array([0, 0, 1, 1, 1]), n_terms=3)
    assert "integral" in router.terms[0] and "python" in router.terms[1]
    assert router.predict(["the integral please", "a python sorts", "nothing shared"]).tolist() == [
        0,
        1,
        1,
    ]  # no overlap: the larger cluster


def test_correlations_and_cosine_silhouette_match_references():
    from sklearn.metrics import silhouette_score

    from gs_ray.evaluation.compare import correlations, cosine_silhouette

    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = 0.5 * x + rng.normal(size=50)
    r = correlations(x, y)
    assert r["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    assert r["spearman"] == pytest.approx(np.corrcoef(ranks(x), ranks(y))[0, 1])
    assert correlations(x, np.ones(50))["pearson"] is None

    G = np.concatenate(
        [
            rng.normal(size=(20, 30)) + 3 * np.eye(30)[0],
            rng.normal(size=(25, 30)) + 3 * np.eye(30)[1],
        ]
    )
    lab = np.array([0] * 20 + [1] * 25)
    assert cosine_silhouette(G, lab) == pytest.approx(
        silhouette_score(G, lab, metric="cosine"), abs=1e-5
    )
    assert cosine_silhouette(G, np.zeros(45, dtype=int)) is None


STS_ROWS = [
    "main-captions\tMSRvid\t2012test\t0001\t5.000\tA man is playing a flute.\tA man plays a flute.",
    "main-news\theadlines\t2013\t0002\t0.400\tThe cat sat.\tStocks fell on Monday.\textra\tcols",
    'main-forums\tans\t2015\t0003\t2.5\tShe reads "books".\tHe reads a paper.',
]


def test_read_sts_pairs_and_plain_errors(tmp_path):
    from gs_ray.data.sts import read_sts, sample_pairs
    from gs_ray.errors import DataError

    path = tmp_path / "sts.csv"
    path.write_text("\n".join(STS_ROWS) + "\n")
    pairs = read_sts(path)
    assert [p.score for p in pairs] == [5.0, 0.4, 2.5]
    assert pairs[2].first == 'She reads "books".' and pairs[1].line == 2
    assert sample_pairs(pairs, 2, seed=0) == sample_pairs(pairs, 2, seed=0)
    assert len(sample_pairs(pairs, 2, seed=0)) == 2 and sample_pairs(pairs, 9, 0) == pairs
    for bad, match in [
        ("a\tb\tc", r"sts.csv:2: 3 tab-separated fields"),
        ("g\tf\ty\ti\tfive\ts1\ts2", r"sts.csv:2: field 5 \(score\) is 'five'"),
        ("g\tf\ty\ti\t7\ts1\ts2", r"sts.csv:2: field 5 \(score\) 7.0 is outside"),
        ("g\tf\ty\ti\t1\ts1\t ", r"sts.csv:2: field 7 \(sentence\) is empty"),
    ]:
        path.write_text(STS_ROWS[0] + "\n" + bad + "\n")
        with pytest.raises(DataError, match=match):
            read_sts(path)
    with pytest.raises(DataError, match="no such STS file"):
        read_sts(tmp_path / "missing.csv")


STS_DEV = Path(__file__).resolve().parents[2] / "shared/data/sts/stsbenchmark/sts-dev.csv"


@pytest.mark.skipif(not STS_DEV.is_file(), reason=f"the shared STS benchmark is not at {STS_DEV}")
def test_the_shared_sts_benchmark_reads_whole():
    from gs_ray.data.sts import read_sts

    pairs = read_sts(STS_DEV)
    assert len(pairs) == 1500  # MANIFEST: 1,500 dev pairs
    scores = np.array([p.score for p in pairs])
    assert scores.min() >= 0 and scores.max() <= 5 and scores.std() > 1


@pytest.mark.slow
@pytest.mark.ray
def test_eval_seeds_show_the_spread(evaluated, tmp_path):
    """--eval.seeds 2 on a copy of the evaluated run: seed 0's adapters are kept and give the
    same numbers as the first eval, seed 1 trains its own (GradientSpace's experts again too),
    and the table shows mean ± std over both. With --eval.analyses false: no analysis gradient
    pass, no K ablation, no routers compared (the domains per cluster stay)."""
    import shutil

    from gs_ray.evaluation import baselines

    run, out = evaluated
    copy = tmp_path / "r"
    shutil.copytree(run.path, copy)
    two = baselines.evaluate_run(
        copy,
        [
            "--eval.seeds",
            "2",
            "--eval.methods",
            "[single_lora, gradientspace]",
            "--eval.analyses",
            "false",
            "--eval.max_generate",
            "0",
        ],
    )
    assert set(two["analyses"]) == {"gradientspace"}  # domains and top terms only
    assert "theorem2" not in two["analyses"]["gradientspace"]
    from gs_ray.rundir import RunDir

    assert "k4" in json.loads(run.eval_partitions.read_text())  # the first eval's K = 4 ablation
    assert set(json.loads(RunDir(copy).eval_partitions.read_text())) == {"gradientspace"}
    m = two["methods"]
    assert set(m) == {"single_lora", "gradientspace"}
    for name, v in m.items():
        seeds = [s["test_loss"] for s in v["per_seed"]]
        assert len(seeds) == 2
        assert seeds[0] == pytest.approx(out["methods"][name]["test_loss"], rel=1e-6), name
        assert v["test_loss"] == pytest.approx(np.mean(seeds))
        assert v["test_loss_std"] == pytest.approx(np.std(seeds, ddof=1))
    assert (
        m["gradientspace"]["per_seed"][1]["test_loss"]
        != m["gradientspace"]["per_seed"][0]["test_loss"]
    )  # retrained experts: another seed
    assert "±" in baselines.table(two)


@pytest.mark.slow
def test_experts_from_the_generalist_train_after_it_in_the_run_and_in_eval(
    evaluated, tmp_path, monkeypatch
):
    """experts.init generalist: the experts stage trains the generalist first, alone, then every
    expert from it; gs-ray eval trains a later seed's one LoRA in a first wave and every
    partitioned method's experts from it in the next (the first seed's from the run's
    generalist). Ray Train is replaced by a copy of the starting adapter: what is checked is the
    order and where each adapter starts (that an adapter starts from its init_adapter is
    test_training's)."""
    import shutil

    from gs_ray.config import apply_overrides
    from gs_ray.evaluation import baselines
    from gs_ray.evaluation.methods import METHODS, Adapter, Evaluation
    from gs_ray.pipeline import base_model_for
    from gs_ray.prepare import prepare
    from gs_ray.rundir import GENERALIST, RunDir
    from gs_ray.training import experts

    run, _ = evaluated
    copy = tmp_path / "r"
    shutil.copytree(run.path, copy)
    cfg = apply_overrides(RunDir(copy).config(), ["--experts.init", "generalist"])
    p = prepare(cfg, RunDir(copy), base_model=base_model_for, read_only=True)
    k = p.assignments()[1]
    for folder in [p.run.generalist, *(p.run.expert(c) for c in range(k))]:
        shutil.rmtree(folder)

    calls = []

    def fake_train(p, jobs, resume, alone=False):
        calls.append([(j.name, j.init_adapter, alone) for j in jobs])
        for j in jobs:
            shutil.copytree(j.init_adapter, j.output_dir, dirs_exist_ok=True)
        return {j.name: {"ok": True, "losses": [1.0], "engine": "fake"} for j in jobs}

    monkeypatch.setattr(experts, "_train", fake_train)
    with monkeypatch.context() as m:  # the stage writes into the copy only
        m.setattr(p.run, "stage", _null_stage)
        experts.experts_ray(p)
    warm, generalist = str(p.run.warmup_adapter), str(p.run.generalist)
    assert calls[0] == [(GENERALIST, warm, True)]  # alone: it may take every CPU slot
    assert sorted(calls[1]) == sorted((f"expert_{c}", generalist, False) for c in range(k))
    assert json.loads((p.run.expert(0) / "expert.json").read_text())["init"] == generalist

    ev = Evaluation(p)
    methods = [METHODS[m] for m in ("single_lora", "gradientspace", "embedding_kmeans")]
    assert ev.init_of(Adapter("eval", 0, "embedding_kmeans", 0)) == Adapter("generalist")
    baselines.partition(ev, 1, methods)
    single = Adapter("eval", 1, "single_lora", None)
    first = baselines.pending_jobs(ev, 1, methods)
    assert [(j.name, j.init_adapter) for j in first] == [(single.job_name, warm)]
    shutil.copytree(p.run.generalist, single.path(p.run))  # as if trained
    second = baselines.pending_jobs(ev, 1, methods)
    assert len(second) == 2 * k  # GradientSpace's and embedding K-means' experts
    assert {j.init_adapter for j in second} == {str(single.path(p.run))}
    assert {j.name for j in second}.isdisjoint({j.name for j in first})


class _null_stage:
    def __init__(self, name):
        self.info = {}

    def __enter__(self):
        return self.info

    def __exit__(self, *exc):
        return False
