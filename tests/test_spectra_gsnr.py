"""Layer-wise gradient spectra against explicit SVDs, the metrics on hand-made matrices, and G-SNR
on planted gradients (pure) and with a LoRA ensemble trained on Ray (slow)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gs_ray.core.gradients import collate, per_sample_loss
from gs_ray.selection.gsnr import GSNRAccumulator, gsnr, select_top
from gs_ray.selection.spectra import (
    ATTENTION_PROJECTIONS,
    SpectraEngine,
    compute_spectra,
    effective_rank,
    factored_singular_values,
    nuclear_norm,
)

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "math" / "gsm8k" / "train.jsonl"


def _samples(seed: int = 1):
    """Mixed lengths and prompt lengths; labels -100 on the prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for length, prompt in [(9, 3), (23, 7), (14, 12)]:
        ids = torch.randint(1, 300, (length,), generator=g).tolist()
        out.append((ids, [-100] * prompt + ids[prompt:]))
    return out


@pytest.fixture
def tiny_base_model():
    """A random 3-layer Llama with grouped-query attention (k/v narrower than q/o), float64 so
    that the explicit SVD reference is exact enough to compare at 1e-4 with every small
    singular value (the metrics themselves are dtype-agnostic)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg).double()
    model.requires_grad_(False)
    return model


def _explicit(model, sample, name: str, pad_id: int = 0) -> torch.Tensor:
    """Singular values of the sample's gradient of one base weight, by autograd (batch 1)."""
    weight = dict(model.named_modules())[name].weight
    weight.requires_grad_(True)
    try:
        loss = per_sample_loss(model.eval(), collate([sample], pad_id=pad_id)).sum()
        (grad,) = torch.autograd.grad(loss, [weight])
    finally:
        weight.requires_grad_(False)
    return torch.linalg.svdvals(grad.double())


def _rel(a, b) -> float:
    return abs(float(a) - float(b)) / abs(float(b))


@pytest.mark.parametrize("side", ["right", "left"])
def test_spectra_equal_explicit_svd_every_projection(tiny_base_model, side):
    samples = _samples()
    engine = SpectraEngine(tiny_base_model)
    assert engine.layers == [0, 1, 2] and engine.kinds == list(ATTENTION_PROJECTIONS)
    out = engine.compute(collate(samples, pad_id=0, side=side))
    assert out.nuclear_norm.shape == (3, 3, 4)
    worst = 0.0
    for p in engine.projections:
        li, ki = engine.layers.index(p.layer), engine.kinds.index(p.kind)
        for i, sample in enumerate(samples):
            s = _explicit(tiny_base_model, sample, p.name)
            assert s[0] > 0
            worst = max(
                worst,
                _rel(out.nuclear_norm[i, li, ki], nuclear_norm(s)),
                _rel(out.effective_rank[i, li, ki], effective_rank(s)),
            )
    assert worst < 1e-4
    assert (out.n_tokens == [9, 23, 14]).all()


def test_spectra_equal_explicit_svd_on_the_embedded_tiny_llama():
    """The embedded default's tiny Llama (core.models, 4 layers, hidden 128) on three tokenised
    samples of different lengths, padded: every q/k/v/o of every layer against autograd + SVD."""
    from gs_ray.config import DataConfig, ModelConfig
    from gs_ray.core.models import build_tiny_llama
    from gs_ray.data import DataReport, Example
    from gs_ray.data.loading import tokenize

    model, tokenizer = build_tiny_llama(ModelConfig(), seed=0)
    model = model.double().requires_grad_(False)
    texts = [
        ("What is 12 plus 7?", "12 + 7 = 19.\n#### 19"),
        ("Name a colour.", "Blue."),
        ("Write a line about the sea.", "The sea keeps every secret the rivers bring it."),
    ]
    report = DataReport()
    samples = [
        tokenize(Example(str(i), p, r), tokenizer, DataConfig(), report).pair
        for i, (p, r) in enumerate(texts)
    ]
    pad = int(tokenizer.pad_token_id)
    engine = SpectraEngine(model)
    assert engine.layers == [0, 1, 2, 3] and len(engine.projections) == 16
    out = engine.compute(collate(samples, pad_id=pad))
    worst = 0.0
    for p in engine.projections:
        li, ki = engine.layers.index(p.layer), engine.kinds.index(p.kind)
        for i, sample in enumerate(samples):
            s = _explicit(model, sample, p.name, pad)
            worst = max(
                worst,
                _rel(out.nuclear_norm[i, li, ki], nuclear_norm(s)),
                _rel(out.effective_rank[i, li, ki], effective_rank(s)),
            )
    assert worst < 1e-4


def test_same_sample_same_spectra_in_different_batches(tiny_base_model):
    """Padding and batch-mates change nothing (rank-deficient and zero-padded rows give no
    spurious singular values)."""
    samples = _samples(2)
    engine = SpectraEngine(tiny_base_model)
    alone = engine.compute(collate([samples[0]], pad_id=0))
    padded = engine.compute(collate([samples[1], samples[0]], pad_id=0, side="left"))
    assert np.allclose(padded.nuclear_norm[1], alone.nuclear_norm[0], rtol=1e-9)
    assert np.allclose(padded.effective_rank[1], alone.effective_rank[0], rtol=1e-9)


def test_spectra_float32_model_and_bucketed_order(tiny_base_model):
    """In float32 the factored route still matches the float64 reference closely, and the
    length-sorted micro-batches put each sample's row back in its place."""
    samples = _samples(4)
    ref = SpectraEngine(tiny_base_model).compute(collate(samples, pad_id=0))
    model32 = tiny_base_model.float()
    out = compute_spectra(SpectraEngine(model32), samples, pad_id=0, micro_batch=2)
    assert np.allclose(out.nuclear_norm, ref.nuclear_norm, rtol=1e-3)
    assert np.allclose(out.effective_rank, ref.effective_rank, rtol=1e-3)


def test_lora_wrapped_model_measures_the_base_weights(tiny_peft_model):
    """On a peft model the q/v projections are LoRA-wrapped: the engine measures their base
    Linear, and k/o plainly."""
    engine = SpectraEngine(tiny_peft_model)
    assert len(engine.projections) == 2 * 4
    assert all(isinstance(p.module, torch.nn.Linear) for p in engine.projections)
    out = engine.compute(collate(_samples(), pad_id=0))
    assert np.isfinite(out.effective_rank).all() and (out.nuclear_norm > 0).all()


def test_factored_singular_values_match_svd_of_product():
    g = torch.Generator().manual_seed(0)
    for T, o, i in [(5, 16, 12), (30, 8, 20), (7, 7, 7)]:
        D = torch.randn(T, o, generator=g, dtype=torch.float64)
        X = torch.randn(T, i, generator=g, dtype=torch.float64)
        want = torch.linalg.svdvals(D.T @ X).flip(0)
        got = factored_singular_values(D, X)
        k = min(T, o, i)
        assert got.shape == (k,)
        assert torch.allclose(got, want[-k:], rtol=1e-8, atol=1e-10 * float(want.max()))


def test_metrics_of_hand_made_matrices():
    # rank one: effective rank 1, nuclear norm = its one singular value
    u, v = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([1.0, 0.0, 0.0, 0.0])
    s = torch.linalg.svdvals(torch.outer(u, v).double())
    assert math.isclose(float(nuclear_norm(s)), 5.0, rel_tol=1e-12)
    assert math.isclose(float(effective_rank(s)), 1.0, rel_tol=1e-9)
    # 2 * identity(4): four equal singular values
    s = torch.linalg.svdvals(2 * torch.eye(4, dtype=torch.float64))
    assert math.isclose(float(nuclear_norm(s)), 8.0, rel_tol=1e-12)
    assert math.isclose(float(effective_rank(s)), 4.0, rel_tol=1e-12)
    # diag(3, 1): p = (3/4, 1/4)
    s = torch.tensor([3.0, 1.0], dtype=torch.float64)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert math.isclose(float(effective_rank(s)), math.exp(h), rel_tol=1e-12)
    # the zero matrix: nuclear norm 0, effective rank 0 by convention (no NaN)
    s = torch.zeros(3, dtype=torch.float64)
    assert float(nuclear_norm(s)) == 0 and float(effective_rank(s)) == 0


# --------------------------------------------------------------------------- G-SNR (pure)


def _planted(M=5, n_good=6, n_bad=6, d=40, seed=0):
    """Consistent examples (one direction for all members, small noise) and noisy ones (a random
    direction per member), with the same gradient norms on average."""
    rng = np.random.default_rng(seed)
    good = rng.normal(size=(n_good, d))
    good /= np.linalg.norm(good, axis=1, keepdims=True)
    G = np.empty((M, n_good + n_bad, d))
    for m in range(M):
        G[m, :n_good] = good + 0.1 * rng.normal(size=(n_good, d)) / math.sqrt(d)
        bad = rng.normal(size=(n_bad, d))
        G[m, n_good:] = bad / np.linalg.norm(bad, axis=1, keepdims=True)
    return G, n_good


@pytest.mark.parametrize("form", ["energy", "coordinate"])
def test_gsnr_ranks_consistent_examples_above_noisy(form):
    G, n_good = _planted()
    scores = gsnr(G, form)
    assert scores[:n_good].min() > scores[n_good:].max()
    top = select_top(scores, 0.5)
    assert sorted(top.tolist()) == list(range(n_good))


def test_gsnr_formulas_and_streaming():
    G, _ = _planted(M=4, n_good=3, n_bad=3, d=10, seed=2)
    mu, var = G.mean(0), G.var(0)
    energy = (mu**2).sum(-1) / (var.sum(-1) + 1e-12)
    coordinate = (mu**2 / (var + 1e-12)).mean(-1)
    assert np.allclose(gsnr(G, "energy"), energy, rtol=1e-10)
    assert np.allclose(gsnr(G, "coordinate"), coordinate, rtol=1e-10)
    acc = GSNRAccumulator("coordinate")
    for member in G.astype(np.float32):  # one member at a time, as streamed
        acc.partial_fit(member)
    assert acc.n_members_ == 4
    assert np.allclose(acc.scores(), coordinate, rtol=1e-5)
    with pytest.raises(ValueError, match="at least two"):
        GSNRAccumulator().partial_fit(G[0]).scores()


def test_select_top():
    scores = np.array([0.5, np.nan, 2.0, 2.0, 1.0])
    assert select_top(scores, 0.4).tolist() == [2, 3]
    assert select_top(scores, 1.0).tolist() == [2, 3, 4, 0, 1]
    assert select_top(scores, 0.01).tolist() == [2]
    with pytest.raises(ValueError):
        select_top(scores, 0)


# --------------------------------------------------------------------------- gs-ray spectra

_TINY = [
    "--model.tiny_hidden_size",
    "32",
    "--model.tiny_num_layers",
    "2",
    "--model.tiny_num_heads",
    "2",
    "--spectra.batch_size",
    "4",
]


def _write_jsonl(path: Path, rows) -> str:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_spectra_command_two_subsets(tmp_path, capsys):
    """Synthetic worked answers against their bare final answers: the table has one row per
    sample (and per sample, layer and projection in the CSV), the summary the B - A gaps,
    and both figures are written."""
    import csv
    import json

    from gs_ray.cli import main
    from gs_ray.io import read_jsonl

    rows = [
        {
            "prompt": f"What is {a} plus {b}?",
            "response": f"We add {a} and {b}: {a} + {b} = {a + b}.\n#### {a + b}",
        }
        for a, b in [(3, 4), (10, 7), (21, 5), (8, 8), (13, 2)]
    ]
    data = _write_jsonl(tmp_path / "a.jsonl", rows)
    out = tmp_path / "out"
    argv = [
        "spectra",
        "--data",
        data,
        "--subset-b",
        data,
        "--out",
        str(out),
        "--spectra.label_a",
        "worked",
        "--spectra.label_b",
        "bare",
        "--spectra.b_response",
        "final_answer",
        *_TINY,
        # What is checked here is the command's output, not the spectra's values: random base
        # weights (a pretrained base is a minute of CPU on a machine whose cache is new).
        "--model.tiny_pretrain_steps",
        "0",
    ]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed["samples_per_s"]) == {"worked", "bare"}
    table = read_jsonl(out / "spectra.jsonl")
    assert len(table) == 10 and {r["subset"] for r in table} == {"worked", "bare"}
    worked = {r["id"]: r for r in table if r["subset"] == "worked"}
    bare = {r["id"]: r for r in table if r["subset"] == "bare"}
    assert all(bare[i]["n_tokens"] < worked[i]["n_tokens"] for i in worked)
    assert len(table[0]["effective_rank"]["q_proj"]) == 2
    with (out / "spectra.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 10 * 2 * 4
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["gap_b_minus_a"]) == {"nuclear_norm", "effective_rank"}
    assert (out / "layer_curves.png").stat().st_size > 0
    assert (out / "distributions.png").stat().st_size > 0


def test_spectra_command_bad_choice_is_one_line(tmp_path, capsys):
    from gs_ray.cli import main

    data = _write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "r"}] * 4)
    argv = ["spectra", "--data", data, "--out", str(tmp_path / "o"), "--spectra.b_response", "x"]
    assert main(argv) == 2
    assert "spectra.b_response" in capsys.readouterr().err


@pytest.mark.skipif(not GSM8K.exists(), reason=f"{GSM8K} is absent (shared data not laid out)")
def test_spectra_on_gsm8k_worked_vs_bare(tmp_path):
    """Real GSM8K (read in place): the worked answers against the bare final answers on the tiny
    model; the paper reports higher effective ranks for the reasoning answers."""
    from gs_ray.config import load_config
    from gs_ray.selection.spectra import run_spectra

    cfg = load_config(
        None,
        [
            *_TINY,
            "--data.format",
            "prompt_response",
            "--data.prompt_field",
            "question",
            "--data.response_field",
            "answer",
            "--spectra.max_samples",
            "8",
            "--spectra.b_response",
            "final_answer",
        ],
    )
    summary = run_spectra(cfg, str(GSM8K), str(tmp_path), str(GSM8K))
    a, b = summary["subsets"]["A"], summary["subsets"]["B"]
    assert a["n"] == b["n"] == 8 and a["mean_tokens"] > b["mean_tokens"]
    gap = np.array([summary["gap_b_minus_a"]["effective_rank"][k] for k in ATTENTION_PROJECTIONS])
    assert (gap < 0).mean() > 0.5  # bare answers: lower effective rank in most (layer, projection)


# --------------------------------------------------------------------------- G-SNR ensemble (Ray)


@pytest.mark.slow
@pytest.mark.ray
def test_gsnr_ensemble_end_to_end_on_ray(tmp_path, ray_session):
    """benchmarks/gsnr_planted.py --smoke, in this process on the shared Ray (the suite's run of
    that benchmark): two LoRA members trained on Ray Train, then every sample's G-SNR under them
    (energy, and coordinate with the same members): finite, positive, equal to the same scoring
    in this process, and the members really differ."""
    import json

    from benchmark_scripts import load_benchmark
    from safetensors.torch import load_file

    from gs_ray.selection.gsnr import member_scores

    bench = load_benchmark("gsnr_planted")
    out, work = tmp_path / "gsnr.json", tmp_path / "work"
    argv = ["--smoke", "--json", str(out), "--work", str(work)]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    for key in ("results", "seconds", "member_final_loss"):  # what docs' tables are built from
        assert key in report, key
    assert set(report["results"]) == {"energy", "coordinate"}
    assert report["member_steps"] == {"member_0": 2, "member_1": 2}
    cfg, base, samples, _, pad = bench.setup(bench.parse(argv), str(work))
    scores = np.array(report["scores"]["energy"])
    assert scores.shape == (len(samples),) == (32,)
    assert np.isfinite(scores).all() and (scores > 0).all()
    assert np.isfinite(report["scores"]["coordinate"]).all()
    members = report["member_paths"]
    a, b = (load_file(str(Path(m) / "adapter_model.safetensors")) for m in members)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    pairs, ids = [s.pair for s in samples], [s.id for s in samples]
    local = member_scores(cfg, base, members, pairs, ids, pad)
    assert np.allclose(local, scores, rtol=1e-5)  # the actor, a chunk per call
    uneven = member_scores(cfg, base, members, pairs, ids, pad, chunk=5)  # 32 = 6 x 5 + 2
    assert np.allclose(uneven, local, rtol=1e-5)


def test_choices_are_checked_when_the_config_loads():
    from gs_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="did you mean 'energy'"):
        load_config(None, ["--gsnr.form", "energi"])
    with pytest.raises(ConfigError, match="gsnr.members"):
        load_config(None, ["--gsnr.members", "1"])
    cfg = load_config(None, ["--gsnr.form", "coordinate", "--spectra.modules", "[q_proj]"])
    assert cfg.gsnr.form == "coordinate" and cfg.spectra.modules == ["q_proj"]
    assert cfg.gsnr.max_steps == 30 and cfg.gsnr.parallel
