"""Inference on a finished run: the router picks one expert per prompt, that expert generates.

Pure torch + peft, no Ray Serve; ``gs_ray.serving.app`` wraps these pieces in Serve deployments,
and they work as well in a notebook::

    run = ServedRun.open("runs/my-run")
    router, pool = run.router(), run.expert_pool()
    prompt = "Write a function that reverses a list."
    expert = int(router.predict([prompt])[0])
    print(pool.generate([prompt], [expert])[0].text)

``ExpertPool`` holds the base model once with all K LoRA experts attached as named peft adapters
(``expert_0`` ... ``expert_{K-1}``): an adapter is a few MB against a base model of GBs, so every
replica can hold all of them and a batch may mix experts. A mixed batch runs as one ``generate``
with peft's per-row ``adapter_names`` (a batch for one expert as a plain ``generate`` with that
adapter active); decoding is greedy, so an answer does not depend on the
other prompts in its batch (tested against each expert loaded alone with plain peft).

The prompt is rendered with the run's own ``data.template`` and tokenised as in training, so an
expert sees at inference exactly the prompt format it was trained on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from gs_ray.config import Config
from gs_ray.rundir import RunDir

log = logging.getLogger(__name__)


class ServingError(ValueError):
    """A request or a run directory cannot be served; the message says which field or file."""


@dataclass
class Generation:
    """One answer: the expert that wrote it, its text, and how generation ended."""

    expert: int
    text: str
    n_prompt_tokens: int
    n_new_tokens: int
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens reached)


def adapter_name(k: int) -> str:
    """The peft adapter name of expert k inside an ``ExpertPool``."""
    return f"expert_{k}"


class ExpertPool:
    """The base model once, with the K experts as named LoRA adapters; greedy generation."""

    def __init__(
        self,
        base_path: str,
        cfg: Config,
        expert_paths: Sequence[str | Path],
        device: str | torch.device | None = None,
    ):
        from peft import PeftModel

        from gs_ray.core.models import load_base_model, load_tokenizer, resolve_device

        if not expert_paths:
            raise ServingError("an expert pool needs at least one expert adapter")
        self.cfg = cfg
        self.template = cfg.data.template
        self.device = torch.device(device) if device is not None else resolve_device("auto")
        self.tokenizer = load_tokenizer(base_path)
        self.tokenizer.padding_side = "left"  # generation continues every row at the same column
        base = load_base_model(base_path, cfg.model, self.device)
        model = PeftModel.from_pretrained(base, str(expert_paths[0]), adapter_name=adapter_name(0))
        for k, path in enumerate(expert_paths[1:], start=1):
            model.load_adapter(str(path), adapter_name=adapter_name(k))
        self.model = model.eval()
        self.n_experts = len(expert_paths)
        self.max_positions = getattr(base.config, "max_position_embeddings", None)

    def render(self, prompt: str) -> str:
        """The prompt as the experts saw prompts in training (``data.template``)."""
        return self.template.format(prompt=prompt)

    def check(self, expert: int, max_new_tokens: int) -> None:
        """Reject an expert index or length that cannot be served, naming the field."""
        if not 0 <= int(expert) < self.n_experts:
            raise ServingError(f"expert: {expert} is not in [0, {self.n_experts})")
        if max_new_tokens < 1:
            raise ServingError(f"max_new_tokens: must be at least 1, got {max_new_tokens}")

    def validate(self, prompt: str, expert: int, max_new_tokens: int) -> None:
        """``check`` plus the prompt's length: what one request needs before it joins a batch."""
        self.check(expert, max_new_tokens)
        n = len(self.tokenizer(self.render(prompt), add_special_tokens=True)["input_ids"])
        self._check_length(n, max_new_tokens)

    def _check_length(self, n_prompt_tokens: int, max_new_tokens: int) -> None:
        if self.max_positions is not None and n_prompt_tokens + max_new_tokens > self.max_positions:
            raise ServingError(
                f"prompt: {n_prompt_tokens} tokens + max_new_tokens {max_new_tokens} exceed the "
                f"model's {self.max_positions} positions"
            )

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        experts: Sequence[int],
        max_new_tokens: int | Sequence[int] = 64,
    ) -> list[Generation]:
        """Greedy answers, row i from ``experts[i]``; ``max_new_tokens`` per row or for all.

        One ``generate`` call for the whole batch (the longest request's length; greedy decoding
        makes a shorter request's answer a prefix of the longer run, so each row is cut to its own
        limit)."""
        n = len(prompts)
        if len(experts) != n:
            raise ServingError(f"{n} prompts but {len(experts)} experts")
        limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != n:
            raise ServingError(f"{n} prompts but {len(limits)} max_new_tokens values")
        for k, m in zip(experts, limits, strict=True):
            self.check(k, m)
        if n == 0:
            return []
        texts = [self.render(p) for p in prompts]
        batch = self.tokenizer(texts, add_special_tokens=True, padding=True, return_tensors="pt")
        prompt_lens = batch["attention_mask"].sum(dim=1).tolist()
        longest = max(limits)
        width = batch["input_ids"].shape[1]
        self._check_length(width, longest)  # every row runs `longest` steps from column `width`
        eos = self.tokenizer.eos_token_id
        if len(set(experts)) == 1:  # one expert: the plain forward of the active adapter
            self.model.set_adapter(adapter_name(int(experts[0])))
            per_row = {}
        else:  # peft splits each LoRA layer's batch by adapter
            per_row = {"adapter_names": [adapter_name(int(k)) for k in experts]}
        out = self.model.generate(
            input_ids=batch["input_ids"].to(self.device),
            attention_mask=batch["attention_mask"].to(self.device),
            **per_row,
            max_new_tokens=longest,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=eos,
        )
        results = []
        for i in range(n):
            new = out[i, width:].tolist()[: limits[i]]
            stop = eos is not None and eos in new
            if stop:
                new = new[: new.index(eos)]
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            results.append(
                Generation(
                    int(experts[i]),
                    text,
                    int(prompt_lens[i]),
                    len(new),
                    "stop" if stop else "length",
                )  # fmt: skip
            )
        return results


class ServedRun:
    """A finished run directory seen from the serving side: config, base model, experts, router."""

    def __init__(self, run: RunDir, cfg: Config, n_experts: int):
        self.run, self.cfg, self.n_experts = run, cfg, n_experts

    @classmethod
    def open(cls, path: str | Path) -> ServedRun:
        """Check that ``path`` holds a router and all its experts; the error names what is
        missing and how to complete it."""
        run = RunDir(path)
        if not run.manifest_path.exists():
            raise ServingError(f"{run.path}: no manifest.json, not a gs-ray run directory")
        cfg = run.config()
        router_json = run.router / "router.json"
        resume = f"complete it with `gs-ray run --resume {run.path}`"
        if not router_json.exists():
            raise ServingError(f"{router_json} is missing: the run has no router yet; {resume}")
        import json

        k = int(json.loads(router_json.read_text())["n_clusters"])
        for c in range(k):
            if not (run.expert(c) / "adapter_config.json").exists():
                raise ServingError(
                    f"{run.expert(c)} is missing or incomplete (the router has {k} experts); {resume}"
                )
        return cls(run, cfg, k)

    @property
    def name(self) -> str:
        return self.run.path.name

    def base_path(self) -> str:
        """The base model the experts were trained on (tiny-llama: the run's own copy)."""
        from gs_ray.core.models import materialize_base_model

        return materialize_base_model(self.cfg.model, self.run.path, self.cfg.run.seed)

    def expert_paths(self) -> list[str]:
        return [str(self.run.expert(c)) for c in range(self.n_experts)]

    def router(self, device: str | None = None):
        from gs_ray.routing.router import Router

        return Router.load(self.run.router, device=device)

    def expert_pool(self, device: str | torch.device | None = None) -> ExpertPool:
        return ExpertPool(self.base_path(), self.cfg, self.expert_paths(), device)

    def info(self) -> dict:
        """What a client may want to know: the run, K, the base model, per-expert cluster facts."""
        manifest = self.run.manifest()
        metrics = self.run.metrics()
        sizes: dict[int, dict[str, int]] = {}
        if self.run.assignments_path.exists():
            for row in self.run.assignments():
                c = int(row["cluster"])
                dom = row.get("domain") or "?"
                sizes.setdefault(c, {})
                sizes[c][dom] = sizes[c].get(dom, 0) + 1
        return {
            "run": self.name,
            "n_experts": self.n_experts,
            "base_model": self.cfg.model.name,
            "template": self.cfg.data.template,
            "experts": [
                {
                    "expert": c,
                    "adapter": adapter_name(c),
                    "n_samples": sum(sizes.get(c, {}).values()),
                    "domains": sizes.get(c, {}),
                }  # fmt: skip
                for c in range(self.n_experts)
            ],
            "router_holdout_accuracy": metrics.get("router", {}).get("holdout_accuracy"),
            "created": manifest.get("created"),
        }
