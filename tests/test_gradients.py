"""The per-sample gradient engine against an independent reference: batch-1 backwards."""

from __future__ import annotations

import pytest
import torch

from gs_ray.core.gradients import LoRAGradientEngine, RandomProjection, collate, loop_gradients


def _samples(seed: int = 1):
    """Mixed lengths and prompt lengths; labels -100 on the prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for length, prompt in [(9, 3), (23, 7), (40, 12), (5, 2), (17, 16)]:
        ids = torch.randint(1, 300, (length,), generator=g).tolist()
        out.append((ids, [-100] * prompt + ids[prompt:]))
    return out


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).norm(dim=1) / b.norm(dim=1)


@pytest.mark.parametrize("side", ["right", "left"])
def test_rows_equal_batch1_backward(tiny_peft_model, side):
    samples = _samples()
    engine = LoRAGradientEngine(tiny_peft_model)
    reference = loop_gradients(tiny_peft_model, samples, pad_id=0)
    G = engine.compute(collate(samples, pad_id=0, side=side))
    assert G.shape == (len(samples), engine.dim)
    assert torch.isfinite(G).all()
    assert (reference.norm(dim=1) > 0).all()
    assert _rel_err(G, reference).max() < 1e-4


def test_same_sample_same_gradient_in_different_batches(tiny_peft_model):
    samples = _samples()
    engine = LoRAGradientEngine(tiny_peft_model)
    a = engine.compute(collate([samples[2], samples[0], samples[4]], pad_id=0))
    b = engine.compute(collate([samples[1], samples[2]], pad_id=0, side="left"))
    assert _rel_err(a[0:1], b[1:2]).item() < 1e-5


def test_sum_of_rows_is_the_batch_gradient(tiny_peft_model):
    """Summing per-sample gradients must give the ordinary gradient of the summed loss."""
    from gs_ray.core.gradients import lora_parameters, per_sample_loss

    samples = _samples(3)
    engine = LoRAGradientEngine(tiny_peft_model)
    batch = collate(samples, pad_id=0)
    G = engine.compute(batch)
    tiny_peft_model.eval()
    params = [p for _, p in lora_parameters(tiny_peft_model)]
    grads = torch.autograd.grad(per_sample_loss(tiny_peft_model, batch).sum(), params)
    flat = torch.cat([g.reshape(-1) for g in grads])
    assert torch.allclose(G.sum(0), flat, rtol=1e-4, atol=1e-6)


def test_layout_follows_named_parameters(tiny_peft_model):
    engine = LoRAGradientEngine(tiny_peft_model)
    names = [n for n, p in tiny_peft_model.named_parameters() if p.requires_grad]
    assert engine.param_names == names
    assert engine.dim == sum(p.numel() for p in tiny_peft_model.parameters() if p.requires_grad)
    row = torch.arange(engine.dim, dtype=torch.float32)
    parts = engine.split(row)
    first = names[0]
    assert parts[first].shape == dict(tiny_peft_model.named_parameters())[first].shape
    assert parts[first].reshape(-1)[0] == 0


def test_dropout_is_off_and_training_mode_restored(tiny_peft_model):
    tiny_peft_model.train()
    engine = LoRAGradientEngine(tiny_peft_model)
    batch = collate(_samples(), pad_id=0)
    a, b = engine.compute(batch), engine.compute(batch)
    assert torch.equal(a, b)
    assert tiny_peft_model.training


def test_model_without_adapter_is_rejected():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    )
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        LoRAGradientEngine(model)


def test_random_projection_preserves_inner_products_roughly():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 5000, generator=g)
    proj = RandomProjection(5000, 2048, seed=1, chunk=1000)
    P = proj(X)
    assert P.shape == (20, 2048)
    assert torch.equal(P, proj(X))  # seeded, regenerated identically
    cos_full = torch.nn.functional.cosine_similarity(X[:, None], X[None], dim=-1)
    cos_proj = torch.nn.functional.cosine_similarity(P[:, None], P[None], dim=-1)
    assert (cos_full - cos_proj).abs().max() < 0.12


def test_response_only_head_matches_full_logits(tiny_peft_model, monkeypatch):
    """The fast path (LM head on response positions only) gives the same losses and gradients."""
    import gs_ray.core.gradients as gr

    batch = collate(_samples(5), pad_id=0)
    engine = LoRAGradientEngine(tiny_peft_model)
    fast_loss = gr.per_sample_loss(tiny_peft_model.eval(), batch)
    fast = engine.compute(batch)
    monkeypatch.setattr(gr, "_PLAIN_HEAD_TYPES", set())
    assert gr._plain_head(tiny_peft_model) is None
    full_loss = gr.per_sample_loss(tiny_peft_model, batch)
    full = engine.compute(batch)
    assert torch.allclose(fast_loss, full_loss, rtol=1e-5)
    assert _rel_err(fast, full).max() < 1e-5


def test_bucketed_computation_keeps_sample_order(tiny_peft_model):
    from gs_ray.core.gradients import compute_bucketed

    samples = _samples(7)
    engine = LoRAGradientEngine(tiny_peft_model)
    reference = loop_gradients(tiny_peft_model, samples, pad_id=0)
    G = compute_bucketed(engine, samples, pad_id=0, micro_batch=2)
    assert _rel_err(G, reference).max() < 1e-4


def test_countsketch_projection_is_the_sparse_matrix_it_says():
    """Count sketch: every coordinate lands in exactly one bucket with sign +-1 (a hand check of
    the (d, k) matrix), and it keeps inner products roughly like the dense projection."""
    proj = RandomProjection(300, 16, seed=3, chunk=70, kind="countsketch")
    R = proj.matrix()
    assert R.shape == (300, 16)
    assert torch.equal((R != 0).sum(1), torch.ones(300, dtype=torch.long))
    assert set(R[R != 0].tolist()) <= {-1.0, 1.0}
    X = torch.randn(5, 300, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(proj(X), X @ R, atol=1e-5)
    big = RandomProjection(5000, 2048, seed=1, chunk=1000, kind="countsketch")
    X = torch.randn(20, 5000, generator=torch.Generator().manual_seed(0))
    P = big(X)
    cos_full = torch.nn.functional.cosine_similarity(X[:, None], X[None], dim=-1)
    cos_proj = torch.nn.functional.cosine_similarity(P[:, None], P[None], dim=-1)
    assert (cos_full - cos_proj).abs().max() < 0.12
    with pytest.raises(ValueError, match="projection kind"):
        RandomProjection(10, 2, kind="gaussian")


def test_prompt_mix_for_short_answers(tmp_path):
    """gradients.prompt_mix_below: a sample whose response is shorter gets unit(g_response) +
    unit(g_prompt), each from a batch-1 computation; longer responses are left as they are."""
    import numpy as np
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from gs_ray.config import load_config
    from gs_ray.data.loading import prompt_pair
    from gs_ray.stage2.computer import GradientComputer

    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
        )
    )
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "adapter")
    short = ([5, 6, 7, 8, 9], [-100, -100, -100, -100, 9])  # a one-token answer
    long = ([5, 6, 7, 8, 9, 10, 11], [-100, -100, 8, 9, 10, 11, 12])
    computer = lambda m: GradientComputer(  # noqa: E731
        str(tmp_path / "base"),
        load_config(None, ["--gradients.prompt_mix_below", str(m)]),
        str(tmp_path / "adapter"),
        pad_id=0,
    )
    mixed, plain = computer(3), computer(0)
    G = mixed([short, long])
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    ref_short = unit(plain([short])[0]) + unit(plain([prompt_pair(short)])[0])
    np.testing.assert_allclose(G[0], ref_short, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(G[1], plain([long])[0], rtol=1e-4, atol=1e-7)
    assert not np.allclose(unit(G[0]), unit(plain([short])[0]), atol=1e-3)
